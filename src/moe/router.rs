//! Routing: token states -> router logits -> probabilities -> top-k (gate weights, expert ids).
//!
//! - Softmax top-k gating (Mixtral, Qwen2-MoE, OLMoE): `p = softmax(x W_g^T)`, keep the `k`
//!   largest, optionally renormalise them to sum to one (`norm_topk_prob`).
//! - Noisy top-k gating (Shazeer et al. 2017, eq. 3-5): `H = x W_g^T + ε · softplus(x W_noise^T)`,
//!   `ε ~ N(0, 1)` in training only; keep the top-k of `H`, softmax over them.
//! - Multiplicative jitter (Fedus et al. 2021, Switch Transformer): in training the router input
//!   is multiplied by `U(1 - ε, 1 + ε)`.
//! - Dense softmax gating when `k == E`: every expert weighted by the softmax gate (Jordan &
//!   Jacobs 1994).
//!
//! All router math runs in f32 whatever the model dtype (f64 models keep f64). The softmax is built from primitive ops
//! so that it has a backward pass (`candle_nn::ops::softmax_last_dim` has none), and the top-k is
//! chosen with `arg_sort_last_dim` + `gather`, so gradients reach the gate weights.

use std::sync::Mutex;

use candle_core::{bail, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::MoeConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ops::{compute_dtype, lock, normal, softmax_last_dim, softplus};

/// What the router decided for a batch of tokens.
#[derive(Debug, Clone)]
pub struct RouterOutput {
    /// Router logits `x W_g^T` (before noise), `(tokens, E)`, f32; what the aux losses use.
    pub logits: Tensor,
    /// Softmax of `logits`, `(tokens, E)`, f32.
    pub probs: Tensor,
    /// Gate weights of the chosen experts, `(tokens, k)`, f32, differentiable.
    pub weights: Tensor,
    /// Chosen expert ids, `(tokens, k)`, u32, best first.
    pub experts: Tensor,
}

/// The gating network of a sparse layer. It owns the seeded generator of its training noise
/// (noisy gating and jitter), like [`crate::layers::Dropout`].
#[derive(Debug)]
pub struct Router {
    rng: Mutex<StdRng>,
    gate: Linear,
    noise: Option<Linear>,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    jitter: f64,
}

impl Router {
    /// Creates the router; weights `gate.weight` `(E, h)` (and `gate.bias` `(E,)` with
    /// `router_bias`) and, with noisy gating,
    /// `gate_noise.weight` `(E, h)`.
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated(cfg, vb)
    }

    /// [`Self::new`] for a configuration the caller has validated.
    pub(crate) fn new_validated(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let gate = candle_nn::linear_b(
            cfg.hidden_size,
            cfg.num_experts,
            cfg.router_bias,
            vb.pp("gate"),
        )?;
        let noise = if cfg.noisy_gating {
            // Start with little noise: zero-initialised noise projection gives softplus(0) = ln 2.
            let w = vb.get_with_hints(
                (cfg.num_experts, cfg.hidden_size),
                "gate_noise.weight",
                candle_nn::Init::Const(0.0),
            )?;
            Some(Linear::new(w, None))
        } else {
            None
        };
        Ok(Self {
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            gate,
            noise,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            norm_topk_prob: cfg.norm_topk_prob,
            jitter: cfg.router_jitter_noise,
        })
    }

    /// `x W_g^T (+ b_g)` in `x`'s dtype.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.gate.weight().to_dtype(x.dtype())?;
        let logits = x.matmul(&w.t()?)?; // (n, E)
        match self.gate.bias() {
            Some(b) => logits.broadcast_add(&b.to_dtype(x.dtype())?),
            None => Ok(logits),
        }
    }

    /// The gate projection `(E, h)`.
    pub fn gate_weight(&self) -> &Tensor {
        self.gate.weight()
    }

    /// Restarts the noise generator from `seed`.
    pub fn set_seed(&self, seed: u64) {
        *lock(&self.rng) = StdRng::seed_from_u64(seed);
    }

    /// `shape` samples of `kind` from the router's generator, f32 on `device`.
    fn noise(&self, shape: &[usize], kind: NoiseKind, device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let mut rng = lock(&self.rng);
        let v: Vec<f32> = match kind {
            NoiseKind::Uniform(lo, hi) => (0..count)
                .map(|_| rng.random_range(lo..hi) as f32)
                .collect(),
            NoiseKind::Normal => (0..count).map(|_| normal(&mut *rng) as f32).collect(),
        };
        Tensor::from_vec(v, shape, device)
    }

    /// Routes tokens; noise and jitter (when configured) are drawn only when `train` is true.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// use candle_moe::{MoeConfig, Router};
    /// let cfg = MoeConfig { hidden_size: 4, intermediate_size: 8, num_experts: 4, top_k: 2, ..Default::default() };
    /// let vm = VarMap::new();
    /// let router = Router::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let out = router.forward_t(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?, false)?;
    /// assert_eq!(out.experts.dims(), &[3, 2]); // two expert ids per token, best first
    /// let w = out.weights.sum(1)?.to_vec1::<f32>()?; // renormalised gate weights sum to one
    /// assert!(w.iter().all(|s| (s - 1.0).abs() < 1e-6));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    ///
    /// # Shapes
    /// - `xs`: `(tokens, h)`, any float dtype
    /// - returns logits and probs `(tokens, E)`, weights and experts `(tokens, k)`
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<RouterOutput> {
        let dt = compute_dtype(xs.dtype());
        let mut x = xs.to_dtype(dt)?; // (n, h)
        if train && self.jitter > 0.0 {
            let u = self.noise(
                x.dims(),
                NoiseKind::Uniform(1.0 - self.jitter, 1.0 + self.jitter),
                x.device(),
            )?;
            x = (x * u.to_dtype(dt)?)?;
        }
        let logits = self.logits(&x)?; // (n, E)
        let probs = softmax_last_dim(&logits)?;
        // Rank by the (noisy) logits, not the probabilities: they order the same, and the
        // logits cannot tie where the softmax underflows to zero.
        let (scores, order_by) = match (&self.noise, train) {
            (Some(noise_proj), true) => {
                let wn = noise_proj.weight().to_dtype(dt)?;
                let std = softplus(&x.matmul(&wn.t()?)?)?; // (n, E)
                let eps = self
                    .noise(std.dims(), NoiseKind::Normal, x.device())?
                    .to_dtype(dt)?;
                let h = (&logits + (std * eps)?)?;
                (softmax_last_dim(&h)?, h)
            }
            _ => (probs.clone(), logits.clone()),
        };
        let (weights, experts) = self.top_k(&scores, &order_by)?;
        Ok(RouterOutput {
            logits,
            probs,
            weights,
            experts,
        })
    }

    /// Picks the top-k of `scores` `(n, E)` (ranked by `order_by`, the matching logits): weights `(n, k)` (renormalised if configured) and
    /// expert ids `(n, k)`.
    fn top_k(&self, scores: &Tensor, order_by: &Tensor) -> Result<(Tensor, Tensor)> {
        let (weights, experts) = if self.top_k == self.num_experts {
            // Dense gating: every expert, in id order (no sort needed).
            let n = scores.dim(0)?;
            let ids = Tensor::arange(0u32, self.num_experts as u32, scores.device())?
                .unsqueeze(0)?
                .broadcast_as((n, self.num_experts))?
                .contiguous()?;
            (scores.clone(), ids)
        } else {
            let order = order_by.arg_sort_last_dim(false)?; // (n, E) descending
            let ids = order.narrow(1, 0, self.top_k)?.contiguous()?; // (n, k)
            (scores.gather(&ids, 1)?, ids)
        };
        let weights = if self.norm_topk_prob && self.top_k < self.num_experts {
            weights.broadcast_div(&weights.sum_keepdim(1)?)?
        } else {
            weights
        };
        Ok((weights, experts))
    }
}

/// What random numbers a router draws.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NoiseKind {
    /// Standard normal samples.
    Normal,
    /// Uniform samples in `[lo, hi)`.
    Uniform(f64, f64),
}

impl Module for Router {
    /// Router logits `(tokens, E)` in f32.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.logits(&xs.to_dtype(compute_dtype(xs.dtype()))?)
    }
}
