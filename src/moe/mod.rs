//! The sparse mixture-of-experts feed-forward: router + dispatch + experts (+ shared expert).
//!
//! `y = Σ_{e ∈ top-k(x)} g_e(x) · E_e(x)` (Shazeer et al. 2017, eq. 1), with tokens permuted by
//! expert, each expert run once on its contiguous segment, and one weighted combine back
//! (see [`crate::moe::dispatch`]). The layer returns its aux losses as values ([`MoeOutput`]).
//!
//! With `routing = expert_choice` the experts pick their tokens instead
//! ([`crate::moe::expert_choice`]); [`SparseMoe::forward_replay`] forces recorded expert ids
//! ([`crate::moe::replay`]). [`is_router_param`] names the router variables, to train with the
//! routers frozen.

use std::sync::{Arc, OnceLock};

use candle_core::{bail, DType, Module, Result, Tensor};

use crate::ops::HostRead;
use candle_nn::VarBuilder;

pub mod dispatch;
pub mod expert_choice;
pub mod experts;
pub(crate) mod fused;
pub(crate) mod grouped;
pub mod replay;
pub mod router;
mod stats;

use crate::config::{MoeConfig, RoutingKind};
use crate::losses;
use dispatch::DispatchPlan;
use dispatch::PlanTensors;
use experts::{Experts, SharedExpert};
use fused::FusedExperts;
use router::{Router, RouterOutput};
pub use stats::RouterStats;

/// What a sparse layer returns.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// The layer output, same shape and dtype as the input.
    pub hidden_states: Tensor,
    /// Router logits `(tokens, E)`, pre-softmax, f32.
    pub router_logits: Tensor,
    /// Scalar f32: the Hugging Face load-balancing loss over this layer's tokens
    /// (a balanced router scores `top_k`); unscaled by the coefficient.
    pub load_balancing_loss: Tensor,
    /// Scalar f32: the ST-MoE router z-loss; unscaled.
    pub z_loss: Tensor,
    /// Kept (token, slot) assignments per expert; under expert choice, the tokens each expert
    /// picked (`C` for every expert).
    pub expert_counts: Vec<usize>,
    /// Assignments dropped by the capacity limit (0 when dropless); under expert choice, the
    /// tokens no expert picked (they get only the shared expert, or zero).
    pub dropped: usize,
    /// The router outputs the aux losses are formed from (models pool these over layers).
    /// Under expert choice the load-balancing loss is formed as for token choice, from the
    /// softmax scores and the top-k each token's scores would pick (expert choice itself is
    /// balanced by construction, so it is a diagnostic there); the z-loss is the usual one.
    pub aux: losses::RouterAux,
    /// The expert ids routed to, `(tokens, k)` u32 (before capacity drops): what
    /// [`SparseMoe::forward_replay`] can force later. `None` under expert choice.
    pub expert_ids: Option<Tensor>,
    /// The other balance losses of this layer, unscaled (`None` when their coefficient is 0):
    /// the sequence-wise loss treats a `(b, t, h)` input as `b` sequences, `(n, h)` as one.
    pub balance: losses::BalanceLosses,
    /// Router entropy, mean probability per expert and selection bias of this forward.
    pub stats: RouterStats,
}

/// Whether the variable `name` belongs to a router (its gate projection `gate.weight` /
/// `gate.bias`, the noise projection `gate_noise.weight`, the selection-bias buffer
/// `gate.e_score_correction_bias`), under the crate's own parameter names
/// (`model.layers.{i}.block_sparse_moe.gate.weight`, or `gate.weight` for a bare layer).
/// The shared expert's `shared_expert_gate` is not a router. Train with the routers frozen by
/// training `select_vars(&varmap, |n| !is_router_param(n))`
/// ([`crate::train::select_vars`]).
///
/// ```
/// use candle_moe::moe::is_router_param;
/// assert!(is_router_param("model.layers.0.block_sparse_moe.gate.weight"));
/// assert!(is_router_param("gate_noise.weight"));
/// assert!(!is_router_param("model.layers.0.block_sparse_moe.experts.1.w1.weight"));
/// assert!(!is_router_param("model.layers.0.block_sparse_moe.shared_expert_gate.weight"));
/// ```
pub fn is_router_param(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).any(|w| {
        matches!(
            (w[0], w[1]),
            ("gate", "weight" | "bias" | "e_score_correction_bias") | ("gate_noise", "weight")
        )
    })
}

/// The layer's one device-to-host transfer: the integer ids `ids` (expert ids, or under
/// expert choice the picked tokens), the router statistics ([`RouterStats`]) and a flag that
/// says whether any router logit is NaN or infinite (NaN or Inf anywhere in the input shows up
/// there), which is an error. The ids travel as f32, exact below 2^24 (more experts or tokens
/// than that take a second transfer).
pub(super) fn host_routing(
    routed: &RouterOutput,
    ids: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Vec<u32>, RouterStats)> {
    let e = routed.probs.dim(1)?;
    let stats = RouterStats::device_vector(routed, bias)?;
    // 0 when every logit is finite, NaN otherwise.
    let flag = (routed.logits.abs()?.max_all()? * 0.0)?
        .to_dtype(DType::F32)?
        .reshape(1)?;
    let ids = ids.flatten_all()?;
    let exact = (1usize << 24) > e.max(routed.probs.dim(0)?);
    let (ids_host, rest) = if exact {
        let all = Tensor::cat(&[&ids.to_dtype(DType::F32)?, &stats, &flag], 0)?;
        let mut v = all.host_vec1::<f32>()?;
        let rest = v.split_off(ids.elem_count());
        (v.iter().map(|&x| x as u32).collect(), rest)
    } else {
        let v = ids.to_dtype(DType::U32)?.host_vec1::<u32>()?;
        (v, Tensor::cat(&[&stats, &flag], 0)?.host_vec1::<f32>()?)
    };
    if rest.last().is_none_or(|f| *f != 0.0) {
        bail!("SparseMoe: the input contains non-finite values (NaN or Inf): router logits are not finite")
    }
    let stats = RouterStats::from_host(&rest[..rest.len() - 1], e);
    Ok((ids_host, stats))
}

/// How a sparse layer computes its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertBackend {
    /// The fastest that applies (fused, then grouped, then the loop).
    #[default]
    Auto,
    /// The fused CPU inference op (frozen f32 or bf16 weights, f32 arithmetic, no gradient).
    Fused,
    /// The grouped CPU op with a backward pass (f32 SwiGLU experts).
    Grouped,
    /// One expert after another with candle ops (any dtype, device or expert kind; the
    /// reference the others are tested against).
    Loop,
}

/// The backend chosen for one forward.
enum Backend {
    Fused(Arc<FusedExperts>),
    Grouped,
    Loop,
}

/// A sparse mixture-of-experts feed-forward layer (Mixtral weight names).
#[derive(Debug)]
pub struct SparseMoe {
    cfg: MoeConfig,
    router: Router,
    experts: Experts,
    shared: Option<SharedExpert>,
    /// Fused inference weights, built on the first fast-path forward (frozen weights only).
    fused: OnceLock<Option<Arc<FusedExperts>>>,
    trainable: bool,
    backend: ExpertBackend,
}

impl SparseMoe {
    /// Creates the layer; weights under `vb` are `gate.weight` `(E, h)`,
    /// `experts.{i}.w1.weight` `(f, h)`, `experts.{i}.w3.weight` `(f, h)`,
    /// `experts.{i}.w2.weight` `(h, f)`, and optionally `gate_noise.weight`,
    /// `shared_expert.{w1,w3,w2}.weight`, `shared_expert_gate.weight` `(1, h)`.
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated(cfg, vb)
    }

    /// [`Self::new`] for a configuration the caller has validated (a model validates its
    /// whole configuration once, not once per layer).
    pub(crate) fn new_validated(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let router = Router::new_validated(cfg, vb.clone())?;
        let experts = Experts::new(
            cfg.num_experts,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.expert_kind,
            cfg.expert_bias,
            vb.pp("experts"),
        )?;
        let experts = match cfg.swiglu_limit {
            Some(limit) => experts.with_clamped_swiglu(limit, cfg.swiglu_alpha),
            None => experts,
        };
        let shared = if cfg.shared_expert_intermediate_size > 0 {
            Some(SharedExpert::new(
                cfg.hidden_size,
                cfg.shared_expert_intermediate_size,
                cfg.expert_kind,
                cfg.shared_expert_gate,
                vb.clone(),
            )?)
        } else {
            None
        };
        let trainable = experts.experts().iter().any(|e| e.is_trainable());
        Ok(Self {
            cfg: cfg.clone(),
            router,
            experts,
            shared,
            fused: OnceLock::new(),
            trainable,
            backend: ExpertBackend::Auto,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The routed experts.
    pub fn experts(&self) -> &Experts {
        &self.experts
    }

    /// The routed experts, mutably (to attach or merge adapters); the fused inference weights
    /// are rebuilt on the next forward.
    pub fn experts_mut(&mut self) -> &mut Experts {
        self.fused = OnceLock::new();
        &mut self.experts
    }

    /// Reseeds the generator of the router noise (noisy gating and jitter, training only).
    pub fn set_seed(&self, seed: u64) {
        self.router.set_seed(seed);
    }

    /// Inference forward (no router noise).
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)` or `(n, h)` -> `hidden_states` of the same shape,
    ///   `router_logits` `(b·t, E)`
    pub fn forward(&self, xs: &Tensor) -> Result<MoeOutput> {
        self.forward_t(xs, false)
    }

    /// Forward in training (`train = true`: router noise and jitter on) or inference mode.
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)` or `(n, h)` -> `hidden_states` of the same shape,
    ///   `router_logits` `(b·t, E)`
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<MoeOutput> {
        let (dims, n) = self.check_input(xs)?;
        let x = xs.reshape((n, self.cfg.hidden_size))?; // (n, h)
        let routed = self.router.forward_t(&x, train)?;
        if self.cfg.routing == RoutingKind::ExpertChoice {
            return self.expert_choice(&x, routed, None, &dims, train);
        }
        let bias = self.router.selection_bias();
        let (ids, aux_ids, stats) = if train && self.cfg.noisy_gating {
            // The loss counts the clean top-k choices, as transformers does: in the same
            // transfer, after the routed ids.
            let clean = routed
                .logits
                .arg_sort_last_dim(false)?
                .narrow(1, 0, self.cfg.top_k)?
                .flatten_all()?;
            let both = Tensor::cat(&[&routed.experts.flatten_all()?, &clean], 0)?;
            let (mut ids, stats) = host_routing(&routed, &both, bias)?;
            let aux_ids = ids.split_off(n * self.cfg.top_k);
            (ids, aux_ids, stats)
        } else {
            let (ids, stats) = host_routing(&routed, &routed.experts, bias)?;
            (ids.clone(), ids, stats)
        };
        self.token_choice(&x, routed, &ids, (aux_ids, stats), &dims, train)
    }

    /// Forward with the expert ids forced to `expert_ids` (routing replay, see
    /// [`crate::moe::replay`]): the gate weights are the current router's scores at those ids
    /// (renormalised as configured), differentiable; the returned `expert_ids` are the forced
    /// ones. Token-choice routing only.
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)` or `(n, h)`; `expert_ids`: `(b·t, k)` integer ids in `0..E`
    pub fn forward_replay(
        &self,
        xs: &Tensor,
        expert_ids: &Tensor,
        train: bool,
    ) -> Result<MoeOutput> {
        if self.cfg.routing == RoutingKind::ExpertChoice {
            bail!("SparseMoe::forward_replay: replay needs token-choice routing (`routing` is expert_choice)")
        }
        let (dims, n) = self.check_input(xs)?;
        let (k, e) = (self.cfg.top_k, self.cfg.num_experts);
        let forced = replay::check_ids(expert_ids, n, k, e, xs.device())?;
        let x = xs.reshape((n, self.cfg.hidden_size))?; // (n, h)
        let routed = self.router.forward_t(&x, train)?;
        let routed = RouterOutput {
            weights: replay::forced_weights(&self.cfg, &routed, &forced)?,
            experts: forced,
            ..routed
        };
        let (ids, stats) = host_routing(&routed, &routed.experts, self.router.selection_bias())?;
        self.token_choice(&x, routed, &ids, (ids.clone(), stats), &dims, train)
    }

    /// The token-choice layer output for the routed ids `ids` (host copy of
    /// `routed.experts`); `counted`: the ids the load-balancing loss counts and the router
    /// statistics.
    fn token_choice(
        &self,
        x: &Tensor,
        routed: RouterOutput,
        ids: &[u32],
        counted: (Vec<u32>, RouterStats),
        dims: &[usize],
        train: bool,
    ) -> Result<MoeOutput> {
        let n = x.dim(0)?;
        let cap = self
            .cfg
            .capacity_factor
            .map(|cf| dispatch::capacity(cf, n, self.cfg.top_k, self.cfg.num_experts));
        let plan = dispatch::plan(ids, self.cfg.top_k, self.cfg.num_experts, cap)?;
        let y = self.experts_forward(x, &routed.weights, &plan, train)?; // (n, h)
        let expert_ids = Some(routed.experts.clone());
        self.finish(x, y, routed, counted, plan, dims, expert_ids)
    }

    /// Adds the shared expert and forms the aux losses and stats.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        &self,
        x: &Tensor,
        mut y: Tensor,
        routed: RouterOutput,
        (aux_ids, stats): (Vec<u32>, RouterStats),
        plan: DispatchPlan,
        dims: &[usize],
        expert_ids: Option<Tensor>,
    ) -> Result<MoeOutput> {
        if let Some(shared) = &self.shared {
            y = (y + shared.forward(x)?)?;
        }
        let mut aux =
            losses::RouterAux::new(&routed.logits, routed.probs, aux_ids, self.cfg.top_k)?;
        (aux.affinity, aux.cv) = (routed.affinity, routed.cv);
        let batch = if dims.len() == 3 { dims[0] } else { 1 };
        let balance =
            losses::BalanceLosses::pooled(std::slice::from_ref(&aux), batch, self.cfg.num_experts)?;
        let (load_balancing_loss, z_loss) =
            losses::pooled_aux_losses(&[&aux], None, self.cfg.num_experts, x.device())?;
        Ok(MoeOutput {
            hidden_states: y.reshape(dims)?,
            router_logits: routed.logits,
            load_balancing_loss,
            z_loss,
            expert_counts: plan.counts(),
            dropped: plan.dropped,
            aux,
            expert_ids,
            balance,
            stats,
        })
    }

    /// Checks the input's shape and dtype; returns its dims and token count.
    fn check_input(&self, xs: &Tensor) -> Result<(Vec<usize>, usize)> {
        let h = self.cfg.hidden_size;
        let dims = xs.dims().to_vec();
        if !matches!(dims.len(), 2 | 3) {
            bail!(
                "SparseMoe: input must be (batch, seq, hidden) or (tokens, hidden), got shape {:?}",
                dims
            )
        }
        if dims[dims.len() - 1] != h {
            bail!(
                "SparseMoe: input hidden size {} does not match config hidden_size {h}",
                dims[dims.len() - 1]
            )
        }
        if !xs.dtype().is_float() {
            bail!(
                "SparseMoe: input must be a float tensor, got {:?}",
                xs.dtype()
            )
        }
        let n: usize = dims[..dims.len() - 1].iter().product();
        if n == 0 {
            bail!(
                "SparseMoe: empty input (shape {:?}): no tokens to route",
                dims
            )
        }
        Ok((dims, n))
    }

    /// The routed experts' weighted outputs `(n, h)` for `plan`, by the chosen backend;
    /// `weights` holds the gate weights the plan's `slot_idx` index (flattened).
    pub(super) fn experts_forward(
        &self,
        x: &Tensor,
        weights: &Tensor,
        plan: &DispatchPlan,
        train: bool,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let backend = self.backend_for(x, train)?;
        if let Backend::Fused(fused) = &backend {
            // Frozen f32 weights on CPU, no gradient needed: all experts in one parallel pass.
            let w = weights.flatten_all()?.host_vec1::<f32>()?;
            let gate: Vec<f32> = plan.slot_idx.iter().map(|&s| w[s as usize]).collect();
            // The op computes in f32 (bf16 weights are converted inside it, per matrix).
            let x32 = x.to_dtype(DType::F32)?;
            return fused::moe_cpu_forward(&x32, fused, plan, &gate)?.to_dtype(x.dtype());
            // (n, h)
        }
        let idx = PlanTensors::new(plan, x.device())?;
        let gathered = dispatch::gather(x, &idx)?; // (n_kept, h)
        let grouped = match backend {
            Backend::Grouped => self.experts.forward_grouped(&gathered, &plan.offsets)?,
            _ => None,
        };
        let expert_out = match grouped {
            Some(y) => y,
            None => self
                .experts
                .forward_segments_loop(&gathered, &plan.offsets)?,
        }; // (n_kept, h)
        let w = dispatch::gather_weights(weights, &idx, x.dtype())?; // (n_kept, 1)
        dispatch::combine(&expert_out, &w, &idx, n) // (n, h)
    }

    /// Restricts the expert computation to one backend (default [`ExpertBackend::Auto`]); a
    /// backend that does not apply to a forward's dtype, device or mode falls back to the loop.
    pub fn set_backend(&mut self, backend: ExpertBackend) {
        self.backend = backend;
    }

    /// The expert backend this layer is restricted to.
    pub fn backend(&self) -> ExpertBackend {
        self.backend
    }

    /// The backend a forward of `xs` (in training mode or not) would use.
    pub fn chosen_backend(&self, xs: &Tensor, train: bool) -> Result<ExpertBackend> {
        let x = xs.flatten_to(xs.rank().saturating_sub(2))?;
        Ok(match self.backend_for(&x, train)? {
            Backend::Fused(_) => ExpertBackend::Fused,
            Backend::Grouped => ExpertBackend::Grouped,
            Backend::Loop => ExpertBackend::Loop,
        })
    }

    /// The one place the expert computation is chosen: the fused inference op when the layer
    /// is frozen and nothing needs a gradient (f32 or bf16 on CPU), else the grouped op (f32 on CPU,
    /// SwiGLU), else the per-expert loop (any dtype, device, expert kind).
    fn backend_for(&self, x: &Tensor, train: bool) -> Result<Backend> {
        let cpu_fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16);
        let want = self.backend;
        if matches!(want, ExpertBackend::Auto | ExpertBackend::Fused)
            && cpu_fused
            && !train
            && !self.trainable
            && !x.track_op()
        {
            let f = match self.fused.get() {
                Some(f) => f.clone(),
                None => {
                    let f = FusedExperts::new(&self.experts)?.map(Arc::new);
                    self.fused.get_or_init(|| f).clone()
                }
            };
            if let Some(f) = f {
                return Ok(Backend::Fused(f));
            }
        }
        if matches!(want, ExpertBackend::Auto | ExpertBackend::Grouped)
            && self.experts.supports_grouped(x)
        {
            return Ok(Backend::Grouped);
        }
        Ok(Backend::Loop)
    }
}

impl Module for SparseMoe {
    /// Hidden states only (inference mode), so the layer drops into existing candle models.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(SparseMoe::forward(self, xs)?.hidden_states)
    }
}
