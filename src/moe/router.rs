//! Routing: token states -> router logits -> probabilities -> top-k (gate weights, expert ids).
//!
//! - Softmax top-k gating (Mixtral, Qwen2-MoE, OLMoE): `p = softmax(x W_g^T)`, keep the `k`
//!   largest, optionally renormalise them to sum to one (`norm_topk_prob`).
//! - Noisy top-k gating (Shazeer et al. 2017, eq. 3-5): `H = x W_g^T + ε · softplus(x W_noise^T)`,
//!   `ε ~ N(0, 1)` in training only (`H = x W_g^T` in inference); the weights are
//!   `softmax(KeepTopK(H, k))`, a softmax over the `k` kept values of `H`, whatever
//!   `norm_topk_prob` says (times `routed_scaling_factor`). With `cv_loss_coef > 0` the router
//!   also forms the importance and load losses (eq. 6-10, [`crate::losses::balance`]).
//! - Multiplicative jitter (Fedus et al. 2021, Switch Transformer): in training the router input
//!   is multiplied by `U(1 - ε, 1 + ε)`.
//! - Dense softmax gating when `k == E`: every expert weighted by the softmax gate (Jordan &
//!   Jacobs 1994).
//! - DeepSeek variants (DeepSeek-V2, Liu et al. 2024; DeepSeek-V3, 2024 §2.1.2), as options of
//!   the same router ([`crate::config::RouterScoring`], [`crate::config::GroupScore`]):
//!   sigmoid scores; a selection bias added for choosing only (`e_score_correction_bias`,
//!   auxiliary-loss-free balancing); group-limited selection (keep the `topk_group` best of
//!   `n_group` expert groups, scored by their best expert or the sum of their two best, then
//!   top-k among the kept groups); the weights (renormalised when `norm_topk_prob`) times
//!   `routed_scaling_factor`. The selection is integer-valued and has no gradient; the weights
//!   are gathered from the unbiased scores, so gradients reach the gate. The bias is trained
//!   by the trainer's auxiliary-loss-free update ([`crate::train::balance`]), not by gradients.
//!
//! All router math runs in f32 whatever the model dtype (f64 models keep f64). The softmax is built from primitive ops
//! so that it has a backward pass (`candle_nn::ops::softmax_last_dim` has none), and the top-k is
//! chosen with `arg_sort_last_dim` + `gather`, so gradients reach the gate weights.

use std::sync::Mutex;

use candle_core::{bail, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::{GroupScore, MoeConfig, RouterScoring};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ops::{compute_dtype, lock, normal, softmax_last_dim, softplus};

/// What the router decided for a batch of tokens.
#[derive(Debug, Clone)]
pub struct RouterOutput {
    /// Router logits `x W_g^T` (before noise), `(tokens, E)`, f32; what the aux losses use.
    pub logits: Tensor,
    /// Softmax of `logits`, `(tokens, E)`, f32 (whatever the scoring: what the load-balancing
    /// loss uses).
    pub probs: Tensor,
    /// Gate weights of the chosen experts, `(tokens, k)`, f32, differentiable.
    pub weights: Tensor,
    /// Chosen expert ids, `(tokens, k)`, u32, best first.
    pub experts: Tensor,
    /// With noisy gating in training, the noisy logits `H` `(tokens, E)` the top-k was chosen
    /// from (the weights are the softmax over the kept entries).
    pub noisy_logits: Option<Tensor>,
    /// Normalised affinities `s / Σ_j s_j` `(tokens, E)` (softmax probabilities, or sigmoid
    /// scores over their sum), kept when `seq_aux_loss_coef > 0`.
    pub affinity: Option<Tensor>,
    /// Shazeer et al.'s `(importance, load)` CV² losses, scalars, when `cv_loss_coef > 0`.
    pub cv: Option<(Tensor, Tensor)>,
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
    scoring: RouterScoring,
    /// DeepSeek-V3's `e_score_correction_bias` `(E,)`: detached here (no gradient); moved only
    /// by the trainer's bias update (`TrainConfig::bias_update_rate`), never by AdamW.
    selection_bias: Option<Tensor>,
    n_group: usize,
    topk_group: usize,
    group_score: GroupScore,
    scaling: f64,
    /// Keep the normalised affinities (sequence-wise balance loss on).
    keep_affinity: bool,
    /// Form the importance and load losses.
    cv_losses: bool,
}

impl Router {
    /// Creates the router; weights `gate.weight` `(E, h)` (and `gate.bias` `(E,)` with
    /// `router_bias`) and, with noisy gating, `gate_noise.weight` `(E, h)`; with a selection
    /// bias, `gate.e_score_correction_bias` `(E,)` (zeros when built from scratch; a variable
    /// over a `VarMap`, which AdamW skips and the trainer's bias update moves).
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
        let selection_bias = if cfg.selection_bias {
            Some(vb.pp("gate").get_with_hints(
                cfg.num_experts,
                "e_score_correction_bias",
                candle_nn::Init::Const(0.0),
            )?)
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
            scoring: cfg.scoring,
            selection_bias,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            group_score: cfg.group_score,
            scaling: cfg.routed_scaling_factor,
            keep_affinity: cfg.seq_aux_loss_coef > 0.0,
            cv_losses: cfg.cv_loss_coef > 0.0,
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

    /// The selection bias `(E,)` (DeepSeek-V3 `e_score_correction_bias`), when configured.
    pub fn selection_bias(&self) -> Option<&Tensor> {
        self.selection_bias.as_ref()
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
        let noise_std = match &self.noise {
            Some(p) if train || self.cv_losses => {
                let wn = p.weight().to_dtype(dt)?;
                Some(softplus(&x.matmul(&wn.t()?)?)?) // (n, E)
            }
            _ => None,
        };
        let noisy_logits = match (&noise_std, train) {
            (Some(std), true) => {
                let eps = self
                    .noise(std.dims(), NoiseKind::Normal, x.device())?
                    .to_dtype(dt)?;
                Some((&logits + (std * eps)?)?)
            }
            _ => None,
        };
        let sigmoid = match self.scoring {
            RouterScoring::Sigmoid => Some(candle_nn::ops::sigmoid(&logits)?), // (n, E)
            RouterScoring::Softmax => None,
        };
        let (weights, experts) = if self.noise.is_some() {
            self.noisy_top_k(noisy_logits.as_ref().unwrap_or(&logits))?
        } else {
            match &sigmoid {
                // Rank by the logits, not the probabilities: they order the same, and the
                // logits cannot tie where the softmax underflows to zero.
                None => self.top_k(&probs, &self.selection_order(&probs, &logits)?)?,
                Some(s) => self.top_k(s, &self.selection_order(s, s)?)?,
            }
        };
        let affinity = match (self.keep_affinity, &sigmoid) {
            (false, _) => None,
            (true, Some(s)) => Some(crate::losses::balance::normalized_affinity(s)?),
            (true, None) => Some(probs.clone()),
        };
        let cv = if self.cv_losses {
            let h = noisy_logits.as_ref().unwrap_or(&logits);
            Some(crate::losses::balance::importance_load_losses(
                &weights,
                &experts,
                &logits,
                noise_std.as_ref().map(|s| (h, s)),
                self.top_k,
            )?)
        } else {
            None
        };
        Ok(RouterOutput {
            logits,
            probs,
            weights,
            experts,
            noisy_logits,
            affinity,
            cv,
        })
    }

    /// The chosen expert ids `(n, k)`: the `k` largest of `order_by` `(n, E)`, best first; with
    /// dense gating (`k == E`) every expert in id order (no sort needed).
    fn chosen_ids(&self, order_by: &Tensor) -> Result<Tensor> {
        if self.top_k == self.num_experts {
            let n = order_by.dim(0)?;
            return Tensor::arange(0u32, self.num_experts as u32, order_by.device())?
                .unsqueeze(0)?
                .broadcast_as((n, self.num_experts))?
                .contiguous();
        }
        order_by
            .arg_sort_last_dim(false)? // (n, E) descending
            .narrow(1, 0, self.top_k)?
            .contiguous()
    }

    /// Shazeer et al.'s `softmax(KeepTopK(h, k))`: the top-k of `h` `(n, E)`, weights the
    /// softmax over the kept values (every expert in id order when `k == E`).
    fn noisy_top_k(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = self.chosen_ids(h)?;
        let w = softmax_last_dim(&h.gather(&ids, 1)?)?;
        let w = if self.scaling != 1.0 {
            (w * self.scaling)?
        } else {
            w
        };
        Ok((w, ids))
    }

    /// Picks the top-k of `scores` `(n, E)` (ranked by `order_by`, the matching logits): weights `(n, k)` (renormalised if configured) and
    /// expert ids `(n, k)`.
    fn top_k(&self, scores: &Tensor, order_by: &Tensor) -> Result<(Tensor, Tensor)> {
        let experts = self.chosen_ids(order_by)?;
        let weights = if self.top_k == self.num_experts {
            scores.clone() // every expert, in id order
        } else {
            scores.gather(&experts, 1)?
        };
        let sigmoid = self.scoring == RouterScoring::Sigmoid;
        let weights = if self.norm_topk_prob && (self.top_k < self.num_experts || sigmoid) {
            let sum = weights.sum_keepdim(1)?;
            // DeepSeek-V3 adds 1e-20 to the sum of its sigmoid weights.
            let sum = if sigmoid { (sum + 1e-20)? } else { sum };
            weights.broadcast_div(&sum)?
        } else {
            weights
        };
        let weights = if self.scaling != 1.0 {
            (weights * self.scaling)?
        } else {
            weights
        };
        Ok((weights, experts))
    }

    /// What the top-k is ranked by: `plain` (the logits for softmax scoring, which order like
    /// the probabilities) unless a selection bias or expert groups are configured; then the
    /// detached `scores` plus the bias, with the experts outside the `topk_group` best groups
    /// set to `-inf`.
    fn selection_order(&self, scores: &Tensor, plain: &Tensor) -> Result<Tensor> {
        if self.selection_bias.is_none() && self.n_group <= 1 {
            return Ok(plain.clone());
        }
        let mut choice = scores.detach();
        if let Some(b) = &self.selection_bias {
            let b = b.detach().to_dtype(choice.dtype())?.unsqueeze(0)?; // (1, E)
            choice = choice.broadcast_add(&b)?;
        }
        if self.n_group > 1 {
            choice = self.mask_groups(&choice)?;
        }
        Ok(choice)
    }

    /// `choice` `(n, E)` with the experts of all but the `topk_group` best of the `n_group`
    /// groups set to `-inf`; a group scores its best expert (`max`) or its two best (`top2_sum`).
    fn mask_groups(&self, choice: &Tensor) -> Result<Tensor> {
        let (n, e) = choice.dims2()?;
        let (g, per) = (self.n_group, e / self.n_group);
        let dev = choice.device();
        let grouped = choice.reshape((n, g, per))?.contiguous()?; // (n, g, per)
        let group_scores = match self.group_score {
            GroupScore::Max => grouped.max(2)?, // (n, g)
            GroupScore::Top2Sum => grouped.sort_last_dim(false)?.0.narrow(2, 0, 2)?.sum(2)?,
        };
        let keep = group_scores
            .contiguous()?
            .arg_sort_last_dim(false)?
            .narrow(1, 0, self.topk_group)?; // (n, tg)
        let gids = Tensor::arange(0u32, g as u32, dev)?.reshape((1, 1, g))?;
        let hit = keep
            .unsqueeze(2)?
            .broadcast_eq(&gids)?
            .to_dtype(candle_core::DType::F32)?
            .sum(1)?; // (n, g): 1 for kept groups
        let mask = hit
            .unsqueeze(2)?
            .broadcast_as((n, g, per))?
            .reshape((n, e))?
            .gt(0.0)?; // (n, E) u8
        let neg = Tensor::full(f32::NEG_INFINITY, (n, e), dev)?.to_dtype(choice.dtype())?;
        mask.where_cond(choice, &neg)
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
