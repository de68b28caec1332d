//! The flat mixture of experts and its training (Jordan & Jacobs 1994, §3–4; Jacobs, Jordan,
//! Nowlan & Hinton 1991 for the gradient-trained original).
//!
//! `P(y|x) = Σ_k g_k(x) P_k(y|x)` (eq. 4). EM (eqs. 20–22): the E-step computes the posterior
//! responsibilities `h_nk ∝ g_k(x_n) P_k(y_n|x_n)`; the M-step refits each expert on the data
//! weighted by `h_·k` and the gate towards `h` (weighted cross-entropy). With the guarded M-steps
//! of this module the observed log-likelihood never decreases (generalised EM, Dempster et al.
//! 1977). [`MixtureOfExperts::fit_gradient`] trains the same model by full-batch Adam on the
//! negative log-likelihood for comparison.

use candle_core::{bail, DType, IndexOp, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::Rng;

use super::expert::Expert;
use super::gate::SoftmaxGate;
use super::{gated_sum, logsumexp_last};

/// Settings of EM training.
#[derive(Debug, Clone, PartialEq)]
pub struct EmConfig {
    /// Maximum number of EM iterations (E-step + M-step).
    pub max_iters: usize,
    /// Stop when the mean per-example log-likelihood changes by less than this.
    pub tol: f64,
    /// Newton (IRLS) steps of the gate per M-step.
    pub gate_steps: usize,
}

impl Default for EmConfig {
    fn default() -> Self {
        Self {
            max_iters: 100,
            tol: 1e-7,
            gate_steps: 5,
        }
    }
}

/// What EM did.
#[derive(Debug, Clone, PartialEq)]
pub struct EmReport {
    /// Total log-likelihood `Σ_n log P(y_n|x_n)` before the first iteration and after each one
    /// (`iterations + 1` values); never decreasing.
    pub log_likelihood: Vec<f64>,
    /// Number of EM iterations run.
    pub iterations: usize,
    /// Whether the change threshold `tol` stopped EM (rather than `max_iters`).
    pub converged: bool,
}

/// Settings of plain gradient training (full-batch Adam on the mean negative log-likelihood).
#[derive(Debug, Clone, PartialEq)]
pub struct GradientConfig {
    /// Number of Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
}

impl Default for GradientConfig {
    fn default() -> Self {
        Self {
            steps: 500,
            learning_rate: 0.02,
        }
    }
}

/// What gradient training did.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientReport {
    /// Total log-likelihood before the first step and after each step (`steps + 1` values).
    pub log_likelihood: Vec<f64>,
}

/// A mixture of experts: a [`SoftmaxGate`] over experts of any kind ([`Expert`]).
///
/// Use `MixtureOfExperts<Box<dyn Expert>>` (the default) to mix experts of different kinds.
pub struct MixtureOfExperts<E: Expert = Box<dyn Expert>> {
    gate: SoftmaxGate,
    experts: Vec<E>,
}

impl<E: Expert> MixtureOfExperts<E> {
    /// A mixture of `experts` gated by `gate` (`gate.n_out()` must equal the number of experts).
    pub fn new(gate: SoftmaxGate, experts: Vec<E>) -> Result<Self> {
        if experts.is_empty() || gate.n_out() != experts.len() {
            bail!(
                "MixtureOfExperts: the gate has {} outputs for {} experts",
                gate.n_out(),
                experts.len()
            )
        }
        Ok(Self { gate, experts })
    }

    /// The gate.
    pub fn gate(&self) -> &SoftmaxGate {
        &self.gate
    }

    /// The gate, mutably.
    pub fn gate_mut(&mut self) -> &mut SoftmaxGate {
        &mut self.gate
    }

    /// The experts.
    pub fn experts(&self) -> &[E] {
        &self.experts
    }

    /// The experts, mutably.
    pub fn experts_mut(&mut self) -> &mut [E] {
        &mut self.experts
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Gate probabilities `g_k(x)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, K)`
    pub fn gate_probs(&self, xs: &Tensor) -> Result<Tensor> {
        self.gate.probs(xs)
    }

    /// The gate-weighted prediction `Σ_k g_k(x) μ_k(x)` (class probabilities for softmax experts).
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, out_dim)`
    pub fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        let g = self.gate.probs(xs)?; // (n, K)
        let preds = self
            .experts
            .iter()
            .map(|e| e.predict(xs)?.to_dtype(DType::F64)); // (n, out) each
        gated_sum(&g, preds, "MixtureOfExperts: no experts")
    }

    /// Predictive variance of the mixture, `Σ_k g_k (σ²_k + μ_k²) − ŷ²` (regression experts only).
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, out_dim)`
    pub fn predictive_variance(&self, xs: &Tensor) -> Result<Tensor> {
        let g = self.gate.probs(xs)?; // (n, K)
        let mut mean: Option<Tensor> = None;
        let mut second: Option<Tensor> = None;
        for (k, e) in self.experts.iter().enumerate() {
            let mu = e.predict(xs)?.to_dtype(DType::F64)?; // (n, out)
            let Some(var) = e.predictive_variance(xs)? else {
                bail!("MixtureOfExperts::predictive_variance: expert {k} has no variance")
            };
            let gk = g.i((.., k..k + 1))?; // (n, 1)
            let m = mu.broadcast_mul(&gk)?;
            let s = (var.to_dtype(DType::F64)? + mu.sqr()?)?.broadcast_mul(&gk)?;
            mean = Some(match mean {
                None => m,
                Some(a) => (a + m)?,
            });
            second = Some(match second {
                None => s,
                Some(a) => (a + s)?,
            });
        }
        match (mean, second) {
            (Some(m), Some(s)) => s - m.sqr()?,
            _ => bail!("MixtureOfExperts: no experts"),
        }
    }

    /// `log P_k(y_n | x_n)` for every expert.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`, `ys`: the experts' target shape → `(n, K)`
    pub fn expert_log_likelihoods(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        let cols = self
            .experts
            .iter()
            .map(|e| e.log_likelihood(xs, ys)?.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?; // K × (n,)
        Tensor::stack(&cols, 1) // (n, K)
    }

    /// `log g_k(x_n) + log P_k(y_n | x_n)`, differentiable.
    fn log_joint(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        self.gate.log_probs(xs)? + self.expert_log_likelihoods(xs, ys)? // (n, K)
    }

    /// Per-example log-likelihood `log P(y_n | x_n)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n,)`
    pub fn log_likelihood_per_example(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        logsumexp_last(&self.log_joint(xs, ys)?)
    }

    /// Total log-likelihood `Σ_n log P(y_n | x_n)`.
    pub fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<f64> {
        self.log_likelihood_per_example(xs, ys)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    /// The E-step: posterior responsibilities `h_nk = g_k P_k / Σ_j g_j P_j`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, K)`; rows sum to one
    pub fn responsibilities(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        Ok(self.responsibilities_and_ll(xs, ys)?.0)
    }

    fn responsibilities_and_ll(&self, xs: &Tensor, ys: &Tensor) -> Result<(Tensor, f64)> {
        let joint = self.log_joint(xs, ys)?.detach(); // (n, K)
        let ll = logsumexp_last(&joint)?; // (n,)
        let h = joint.broadcast_sub(&ll.unsqueeze(1)?)?.exp()?; // (n, K)
        Ok((h, ll.sum_all()?.to_scalar::<f64>()?))
    }

    /// The M-step from given responsibilities `h` `(n, K)`: every expert on its column, the gate
    /// towards `h`.
    pub fn m_step(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        h: &Tensor,
        gate_steps: usize,
    ) -> Result<()> {
        let (n, k) = h.dims2()?;
        if k != self.experts.len() || n != xs.dim(0)? {
            bail!(
                "MixtureOfExperts::m_step: responsibilities must be ({}, {}), got {:?}",
                xs.dim(0)?,
                self.experts.len(),
                h.shape()
            )
        }
        self.gate.m_step(xs, h, gate_steps)?;
        for (k, e) in self.experts.iter_mut().enumerate() {
            e.m_step(xs, ys, &h.i((.., k))?.contiguous()?)?;
        }
        Ok(())
    }

    /// One EM iteration (E-step with the current parameters, then the M-step). Returns the total
    /// log-likelihood *before* the iteration.
    pub fn em_step(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<f64> {
        let (h, ll) = self.responsibilities_and_ll(xs, ys)?;
        self.m_step(xs, ys, &h, cfg.gate_steps)?;
        Ok(ll)
    }

    /// EM until `cfg.max_iters` iterations or a mean per-example log-likelihood change below
    /// `cfg.tol`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`, `ys`: `(n, out_dim)` (regression) or `(n,)` class ids
    pub fn fit_em(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<EmReport> {
        super::em::run_em(self, xs, ys, cfg)
    }

    /// Initialises from given responsibilities `(n, K)`: one M-step (experts and gate).
    pub fn init_from_responsibilities(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        h: &Tensor,
        gate_steps: usize,
    ) -> Result<()> {
        self.m_step(xs, ys, h, gate_steps)
    }

    /// Breaks the symmetry between experts before EM: a random gate (logits of standard
    /// deviation `scale` on `xs`, hyperplanes through the data mean) softly partitions the
    /// inputs, and each expert is fitted to its part (the gate keeps the random partition).
    pub fn init_random<R: Rng + ?Sized>(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        scale: f64,
        rng: &mut R,
    ) -> Result<()> {
        self.gate.randomize(xs, scale, rng)?;
        let g = self.gate.probs(xs)?.detach(); // (n, K)
        for (k, e) in self.experts.iter_mut().enumerate() {
            e.m_step(xs, ys, &g.i((.., k))?.contiguous()?)?;
        }
        Ok(())
    }

    /// All trainable variables: the gate's, then each expert's.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.gate.var().clone()];
        for e in &self.experts {
            v.extend(e.vars());
        }
        v
    }

    /// Plain gradient training of the same model (Jacobs et al. 1991): full-batch Adam on the mean
    /// negative log-likelihood, all parameters at once. No monotonicity guarantee.
    pub fn fit_gradient(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        cfg: &GradientConfig,
    ) -> Result<GradientReport> {
        let n = xs.dim(0)?.max(1) as f64;
        let params = ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt = AdamW::new(self.vars(), params)?;
        let mut trace = Vec::with_capacity(cfg.steps + 1);
        for _ in 0..cfg.steps {
            let ll = self.log_likelihood_per_example(xs, ys)?.sum_all()?; // scalar
            trace.push(ll.to_scalar::<f64>()?);
            let loss = (ll * (-1.0 / n))?;
            opt.backward_step(&loss)?;
        }
        trace.push(self.log_likelihood(xs, ys)?);
        Ok(GradientReport {
            log_likelihood: trace,
        })
    }
}

impl<E: Expert> std::fmt::Debug for MixtureOfExperts<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixtureOfExperts")
            .field("gate", &self.gate)
            .field("n_experts", &self.experts.len())
            .finish()
    }
}
