//! Neural experts for the classic mixture of experts: any `candle_nn::Module` as the mean of a
//! Gaussian with learned variance, refit in the EM M-step by a few responsibility-weighted
//! gradient steps (a generalised M-step, Jordan & Jacobs 1994 §4 / Dempster et al. 1977 GEM).
//!
//! The M-step minimises `Σ_n h_n ‖(y_n − f(x_n)) / σ‖² / (2 Σ_n h_n)` with Adam, then sets
//! `σ²` to the weighted mean squared residual (its exact maximiser given `f`). If the weighted
//! log-likelihood `Σ_n h_n log N(y_n | f(x_n), σ²)` ends lower than it started, the step is
//! undone, so EM stays monotone.

use candle_core::{bail, DType, Module, Result, Tensor, Var};
use candle_nn::rnn::{GRUConfig, GRU, RNN};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};

use super::expert::Expert;
use super::{gaussian_log_density, gaussian_targets, tensor_to_host, weights_to_host};

/// Settings of a [`NeuralExpert`]'s M-step.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuralExpertConfig {
    /// Adam steps per M-step.
    pub steps: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Floor on the variance.
    pub min_variance: f64,
}

impl Default for NeuralExpertConfig {
    fn default() -> Self {
        Self {
            steps: 20,
            learning_rate: 1e-2,
            min_variance: 1e-6,
        }
    }
}

/// A Gaussian expert `y ~ N(f(x), diag σ²)` whose mean `f` is any `candle_nn::Module` built from
/// a [`VarMap`] (an MLP, a [`GruWindow`], …) and whose `log σ²` is learned.
pub struct NeuralExpert {
    module: Box<dyn Module>,
    varmap: VarMap,
    log_var: Var,
    out_dim: usize,
    cfg: NeuralExpertConfig,
    opt: AdamW,
    dtype: DType,
}

impl std::fmt::Debug for NeuralExpert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuralExpert")
            .field("out_dim", &self.out_dim)
            .field("cfg", &self.cfg)
            .field("n_vars", &self.varmap.all_vars().len())
            .finish()
    }
}

impl NeuralExpert {
    /// Wraps `module` (whose parameters live in `varmap`) as an expert with `out_dim` outputs and
    /// unit initial variance.
    pub fn new(
        module: Box<dyn Module>,
        varmap: VarMap,
        out_dim: usize,
        cfg: NeuralExpertConfig,
    ) -> Result<Self> {
        if out_dim == 0 {
            bail!("NeuralExpert: out_dim must be at least 1")
        }
        let vars = varmap.all_vars();
        let (dtype, device) = match vars.first() {
            Some(v) => (v.dtype(), v.device().clone()),
            None => (DType::F64, candle_core::Device::Cpu),
        };
        let log_var = Var::zeros(out_dim, DType::F64, &device)?;
        let params = ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let opt = AdamW::new(vars, params)?;
        Ok(Self {
            module,
            varmap,
            log_var,
            out_dim,
            cfg,
            opt,
            dtype,
        })
    }

    /// The variances `σ²`, `(out_dim,)`.
    pub fn variance(&self) -> Result<Tensor> {
        self.log_var.as_tensor().exp()
    }

    fn ys(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        gaussian_targets("NeuralExpert", xs, ys, self.out_dim)
    }

    /// `Σ_n w_n log N(y_n | f(x_n), σ²)` with the current parameters.
    fn weighted_ll(&self, xs: &Tensor, ys: &Tensor, w: &Tensor) -> Result<f64> {
        (self.log_likelihood(xs, ys)?.detach() * w)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    fn snapshot(&self) -> Result<Vec<(Var, Tensor)>> {
        let mut s: Vec<(Var, Tensor)> = self
            .varmap
            .all_vars()
            .into_iter()
            .map(|v| {
                let t = v.as_tensor().copy()?;
                Ok((v, t))
            })
            .collect::<Result<_>>()?;
        s.push((self.log_var.clone(), self.log_var.as_tensor().copy()?));
        Ok(s)
    }
}

impl Expert for NeuralExpert {
    fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        let mu = self.module.forward(&xs.to_dtype(self.dtype)?)?; // (n, out)
        if mu.dims() != [xs.dim(0)?, self.out_dim] {
            bail!(
                "NeuralExpert: the module must map (n, in) to ({}, {}), got {:?}",
                xs.dim(0)?,
                self.out_dim,
                mu.shape()
            )
        }
        mu.to_dtype(DType::F64)
    }

    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        let mu = self.predict(xs)?; // (n, out)
        let ys = self.ys(xs, ys)?;
        gaussian_log_density(&mu, &ys, self.log_var.as_tensor()) // (n,)
    }

    fn m_step(&mut self, xs: &Tensor, ys: &Tensor, weights: &Tensor) -> Result<()> {
        let n = xs.dim(0)?;
        let wv = weights_to_host(weights, n)?;
        let sw: f64 = wv.iter().sum();
        if sw.is_nan() || sw <= 1e-12 {
            return Ok(());
        }
        let w = Tensor::from_vec(wv, (n, 1), xs.device())?; // (n, 1)
        let ys64 = self.ys(xs, ys)?;
        let q_old = self.weighted_ll(xs, &ys64, &w.squeeze(1)?)?;
        let saved = self.snapshot()?;
        let inv_var = self
            .log_var
            .as_tensor()
            .detach()
            .neg()?
            .exp()?
            .unsqueeze(0)?; // (1, out)
        for _ in 0..self.cfg.steps {
            let mu = self.predict(xs)?;
            let loss = (ys64
                .sub(&mu)?
                .sqr()?
                .broadcast_mul(&inv_var)?
                .broadcast_mul(&w)?)
            .sum_all()?
            .affine(0.5 / sw, 0.0)?;
            self.opt.backward_step(&loss)?;
        }
        // closed-form variance given the new mean
        let mu = self.predict(xs)?.detach();
        let wse = ys64.sub(&mu)?.sqr()?.broadcast_mul(&w)?.sum(0)?; // (out,)
        let var: Vec<f64> = tensor_to_host(&wse)?
            .iter()
            .map(|v| (v / sw).max(self.cfg.min_variance).ln())
            .collect();
        self.log_var
            .set(&Tensor::from_vec(var, self.out_dim, self.log_var.device())?)?;
        let q_new = self.weighted_ll(xs, &ys64, &w.squeeze(1)?)?;
        if !(q_new.is_finite() && q_new >= q_old) {
            for (v, t) in saved {
                v.set(&t)?;
            }
        }
        Ok(())
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = self.varmap.all_vars();
        v.push(self.log_var.clone());
        v
    }

    fn predictive_variance(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let n = xs.dim(0)?;
        let v = self
            .variance()?
            .unsqueeze(0)?
            .broadcast_as((n, self.out_dim))?;
        Ok(Some(v.contiguous()?))
    }
}

/// A GRU over a window of past values, for autoregressive experts: reads the window one value at
/// a time from its **last column to its first** (so a lag matrix `[y_{t-1}, …, y_{t-p}]`, as
/// [`lagged`](super::series::lagged) builds, is read oldest first) and maps the final hidden
/// state through a linear layer.
#[derive(Debug, Clone)]
pub struct GruWindow {
    gru: GRU,
    out: Linear,
    window: usize,
}

impl GruWindow {
    /// A GRU with `hidden` units over windows of `window` scalars, with `out_dim` outputs.
    /// Parameters: `gru.*` and `out.{weight,bias}` under `vb`.
    pub fn new(window: usize, hidden: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        if window == 0 || hidden == 0 {
            bail!("GruWindow: window and hidden must be positive")
        }
        let gru = candle_nn::rnn::gru(1, hidden, GRUConfig::default(), vb.pp("gru"))?;
        let out = candle_nn::linear(hidden, out_dim, vb.pp("out"))?;
        Ok(Self { gru, out, window })
    }
}

impl Module for GruWindow {
    /// # Shapes
    /// - `xs`: `(n, window)` → `(n, out_dim)`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, w) = xs.dims2()?;
        if w != self.window {
            bail!(
                "GruWindow: expected (n, {}), got {:?}",
                self.window,
                xs.shape()
            )
        }
        let mut state = self.gru.zero_state(n)?;
        for t in (0..w).rev() {
            let x_t = xs.narrow(1, t, 1)?; // (n, 1)
            state = self.gru.step(&x_t, &state)?;
        }
        self.out.forward(&state.h) // (n, out)
    }
}
