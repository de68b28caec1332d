//! The EM driver both [`MixtureOfExperts`] and [`HierarchicalMoe`] use, and EM from several
//! random starts.
//!
//! EM climbs to a local maximum of the likelihood, so the usual practice (Jordan & Jacobs 1994,
//! §6) is to run it from a few random initialisations and keep the fit with the best training
//! log-likelihood: [`fit_em_restarts`].

use candle_core::{bail, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{EmConfig, EmReport, Expert, HierarchicalMoe, MixtureOfExperts};

/// A model EM fits: one EM iteration and the observed log-likelihood.
pub trait EmModel {
    /// One EM iteration; returns the total log-likelihood *before* it.
    fn em_iteration(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<f64>;

    /// The total log-likelihood `Σ_n log P(y_n | x_n)`.
    fn total_log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<f64>;
}

macro_rules! em_model {
    ($($ty:ident),*) => {$(
        impl<E: Expert> EmModel for $ty<E> {
            fn em_iteration(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<f64> {
                self.em_step(xs, ys, cfg)
            }

            fn total_log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<f64> {
                self.log_likelihood(xs, ys)
            }
        }
    )*};
}
em_model!(MixtureOfExperts, HierarchicalMoe);

/// EM until `cfg.max_iters` iterations or a mean per-example log-likelihood change below
/// `cfg.tol`; the trace ends with the log-likelihood after the last iteration.
pub(crate) fn run_em<M: EmModel>(
    model: &mut M,
    xs: &Tensor,
    ys: &Tensor,
    cfg: &EmConfig,
) -> Result<EmReport> {
    let n = xs.dim(0)?.max(1) as f64;
    let mut trace: Vec<f64> = Vec::with_capacity(cfg.max_iters + 1);
    let mut converged = false;
    let mut iterations = 0;
    for _ in 0..cfg.max_iters {
        let ll = model.em_iteration(xs, ys, cfg)?;
        iterations += 1;
        let stop = trace
            .last()
            .is_some_and(|prev| ((ll - prev) / n).abs() < cfg.tol);
        trace.push(ll);
        if stop {
            converged = true;
            break;
        }
    }
    trace.push(model.total_log_likelihood(xs, ys)?);
    Ok(EmReport {
        log_likelihood: trace,
        iterations,
        converged,
    })
}

/// What [`fit_em_restarts`] returns.
#[derive(Debug)]
pub struct Restarts<M> {
    /// The model of the restart with the highest final training log-likelihood (the first of
    /// equals).
    pub model: M,
    /// Which restart that was (an index into `seeds` and [`Restarts::reports`]).
    pub best: usize,
    /// Every restart's EM report, in the order of `seeds`.
    pub reports: Vec<EmReport>,
}

impl<M> Restarts<M> {
    /// The EM report of the kept model.
    pub fn report(&self) -> &EmReport {
        &self.reports[self.best]
    }

    /// The kept model's final training log-likelihood.
    pub fn log_likelihood(&self) -> f64 {
        final_ll(self.report())
    }
}

fn final_ll(report: &EmReport) -> f64 {
    report
        .log_likelihood
        .last()
        .copied()
        .unwrap_or(f64::NEG_INFINITY)
}

/// EM from several random starts, keeping the best: for every seed, `start` makes a fresh model
/// and breaks its symmetry with a `StdRng` seeded with the seed (typically
/// [`init_random`](MixtureOfExperts::init_random)), and EM runs with `cfg`. Returns the model
/// with the highest final training log-likelihood (the first of equals) and every report.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_moe::classic::{
///     fit_em_restarts, EmConfig, LinearGaussianExpert, MixtureOfExperts, SoftmaxGate,
/// };
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x: Vec<f64> = (0..200).map(|i| i as f64 / 100.0 - 1.0).collect();
/// let y: Vec<f64> = x.iter().map(|v| v.abs()).collect();
/// let xs = Tensor::from_vec(x, (200, 1), &dev)?;
/// let ys = Tensor::from_vec(y, (200, 1), &dev)?;
/// let start = |rng: &mut rand::rngs::StdRng| {
///     let experts = (0..2)
///         .map(|_| LinearGaussianExpert::new(1, 1, &dev))
///         .collect::<candle_core::Result<Vec<_>>>()?;
///     let mut moe = MixtureOfExperts::new(SoftmaxGate::new(1, 2, &dev)?, experts)?;
///     moe.init_random(&xs, &ys, 2.0, rng)?;
///     Ok(moe)
/// };
/// let fit = fit_em_restarts(0..3, start, &xs, &ys, &EmConfig::default())?;
/// assert_eq!(fit.reports.len(), 3);
/// assert!(fit.reports.iter().all(|r| r.log_likelihood.last() <= Some(&fit.log_likelihood())));
/// # Ok(())
/// # }
/// ```
pub fn fit_em_restarts<M: EmModel>(
    seeds: impl IntoIterator<Item = u64>,
    mut start: impl FnMut(&mut StdRng) -> Result<M>,
    xs: &Tensor,
    ys: &Tensor,
    cfg: &EmConfig,
) -> Result<Restarts<M>> {
    let mut best: Option<(usize, M)> = None;
    let mut reports = Vec::new();
    for seed in seeds {
        let mut model = start(&mut StdRng::seed_from_u64(seed))?;
        let report = run_em(&mut model, xs, ys, cfg)?;
        let ll = final_ll(&report);
        if best
            .as_ref()
            .is_none_or(|(i, _)| ll > final_ll(&reports[*i]))
        {
            best = Some((reports.len(), model));
        }
        reports.push(report);
    }
    let Some((best, model)) = best else {
        bail!("fit_em_restarts: no seeds")
    };
    Ok(Restarts {
        model,
        best,
        reports,
    })
}
