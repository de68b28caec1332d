//! The expert-parallel sparse layer: the experts of one [`crate::moe::SparseMoe`] sharded over
//! the ranks of a [`Communicator`], the router (and shared expert) replicated.
//!
//! Rank `r` of `W` owns experts `[r·E/W, (r+1)·E/W)`. A forward on the rank's own tokens:
//! route locally → one all-reduce of the routed counts (`W × E`, plus token counts and the
//! aux-loss counts), from which every rank knows the global capacity, what each rank keeps and
//! every row count → permute the kept (token, slot) rows by expert (hence by destination rank)
//! → all-to-all the rows ([`all_to_all_rows`]) → sort the received rows by local expert → the
//! local experts → unsort → all-to-all back → weighted combine on the source rank. Both
//! all-to-alls are differentiable, so the backward sends gradients back along the same routes;
//! router gradients stay local (through the gate weights), expert gradients land on the
//! expert's owner. See `docs/expert_parallel.md`.

use std::sync::Arc;

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::all_to_all::all_to_all_rows;
use super::plan::{inverse, plan_with_limits, GlobalTable};
use super::Communicator;
use crate::config::{MoeConfig, RoutingKind};
use crate::losses::RouterAux;
use crate::moe::dispatch::{self, PlanTensors};
use crate::moe::experts::{Expert, Experts, SharedExpert};
use crate::moe::router::Router;
use crate::moe::MoeOutput;

/// A sparse layer whose routed experts are sharded over the ranks of a communicator.
#[derive(Debug)]
pub struct ExpertParallelMoe {
    cfg: MoeConfig,
    router: Router,
    experts: Experts,
    shared: Option<SharedExpert>,
    comm: Arc<dyn Communicator>,
}

impl ExpertParallelMoe {
    /// Creates rank `comm.rank()`'s shard of the layer. The weight names are those of
    /// [`crate::moe::SparseMoe::new`] (`gate.weight`, `experts.{i}.w{1,2,3}.weight`, ...), with
    /// only this rank's experts `i ∈ [r·E/W, (r+1)·E/W)` read. `E` must be divisible by the
    /// world size; token-choice routing only.
    pub fn new(cfg: &MoeConfig, vb: VarBuilder, comm: Arc<dyn Communicator>) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        let (w, e) = (comm.size(), cfg.num_experts);
        if w == 0 || e % w != 0 {
            bail!("ExpertParallelMoe: {e} experts cannot be sharded evenly over {w} ranks")
        }
        if cfg.seq_aux_loss_coef != 0.0 || cfg.cv_loss_coef != 0.0 {
            bail!("ExpertParallelMoe: seq_aux_loss_coef and cv_loss_coef must be 0 (the sequence-wise and CV² losses are not formed across ranks yet)")
        }
        if cfg.routing != RoutingKind::TokenChoice {
            bail!("ExpertParallelMoe: only token-choice routing is supported")
        }
        let router = Router::new_validated(cfg, vb.clone())?;
        let local = e / w;
        let first = comm.rank() * local;
        let experts = (first..first + local)
            .map(|i| {
                let x = Expert::new_with_bias(
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.expert_kind,
                    cfg.expert_bias,
                    vb.pp("experts").pp(i.to_string()),
                )?;
                Ok(match cfg.swiglu_limit {
                    Some(limit) => x.with_clamped_swiglu(limit, cfg.swiglu_alpha),
                    None => x,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = if cfg.shared_expert_intermediate_size > 0 {
            Some(SharedExpert::new(
                cfg.hidden_size,
                cfg.shared_expert_intermediate_size,
                cfg.expert_kind,
                cfg.shared_expert_gate,
                vb,
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            router,
            experts: Experts::from_experts(experts, cfg.hidden_size),
            shared,
            comm,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The (replicated) router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// This rank's experts (global ids [`Self::expert_range`]).
    pub fn local_experts(&self) -> &Experts {
        &self.experts
    }

    /// The global ids of this rank's experts.
    pub fn expert_range(&self) -> std::ops::Range<usize> {
        let l = self.cfg.num_experts / self.comm.size();
        let first = self.comm.rank() * l;
        first..first + l
    }

    /// The communicator.
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Restarts the router's noise generator (noisy gating, jitter) from `seed`.
    pub fn set_seed(&self, seed: u64) {
        self.router.set_seed(seed);
    }

    /// Forward on this rank's tokens, in training (router noise and jitter on) or inference
    /// mode; a collective: every rank calls it (and the backward of anything using its outputs)
    /// in the same order, each with at least one token.
    ///
    /// `hidden_states` and `router_logits` are this rank's; `expert_counts`, `dropped` and the
    /// router statistics' entropy and mean probabilities are global (all ranks); `load_balancing_loss` and `z_loss` have the value of the
    /// single-process losses over the union of the ranks' tokens, with gradients reaching this
    /// rank's router inputs only (the other ranks' parts are constants), so summing the router
    /// gradients over the ranks gives the gradient of the global loss; `aux` holds this rank's
    /// rows.
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)` or `(n, h)` -> `hidden_states` of the same shape
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<MoeOutput> {
        let h = self.cfg.hidden_size;
        let dims = xs.dims().to_vec();
        if !matches!(dims.len(), 2 | 3) || dims[dims.len() - 1] != h {
            bail!("ExpertParallelMoe: input must be (batch, seq, {h}) or (tokens, {h}), got shape {dims:?}")
        }
        let n: usize = dims[..dims.len() - 1].iter().product();
        if n == 0 {
            bail!("ExpertParallelMoe: rank {} has no tokens", self.comm.rank())
        }
        let (e, k, w, rank) = (
            self.cfg.num_experts,
            self.cfg.top_k,
            self.comm.size(),
            self.comm.rank(),
        );
        let x = xs.reshape((n, h))?;
        let routed = self.router.forward_t(&x, train)?;
        let ids = routed.experts.flatten_all()?.to_vec1::<u32>()?;
        let logits_ok = routed.logits.abs()?.max_all()?.to_dtype(DType::F64)?;
        if !logits_ok.to_scalar::<f64>()?.is_finite() {
            bail!("ExpertParallelMoe: rank {rank}: router logits are not finite (NaN or Inf in the input)")
        }
        let aux_ids = if train && self.cfg.noisy_gating {
            routed
                .logits
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .flatten_all()?
                .to_vec1::<u32>()?
        } else {
            ids.clone()
        };
        // One all-reduce: routed counts (W × E), tokens per rank (W), aux top-k counts (E).
        let mut table = vec![0u64; w * e + w + e];
        for &id in &ids {
            if id as usize >= e {
                bail!("ExpertParallelMoe: expert id {id} out of range for {e} experts")
            }
            table[rank * e + id as usize] += 1;
        }
        table[w * e + rank] = n as u64;
        for &id in &aux_ids {
            table[w * e + w + id as usize] += 1;
        }
        self.comm.all_reduce_sum_u64(&mut table)?;
        let as_usize = |s: &[u64]| s.iter().map(|&v| v as usize).collect::<Vec<_>>();
        let global = GlobalTable::new(
            w,
            e,
            as_usize(&table[..w * e]),
            as_usize(&table[w * e..w * e + w]),
            k,
            self.cfg.capacity_factor,
        );
        let plan = plan_with_limits(&ids, k, e, global.limits(rank))?;
        let send: Vec<usize> = (0..w).map(|d| global.rows(rank, d)).collect();
        let recv: Vec<usize> = (0..w).map(|s| global.rows(s, rank)).collect();

        let idx = PlanTensors::new(&plan, x.device())?;
        let gathered = dispatch::gather(&x, &idx)?; // (n_kept, h), by destination rank
        let received = all_to_all_rows(&gathered, &send, &recv, &self.comm)?; // by source rank
        let out = self.local_compute(&received, &global)?; // same order as `received`
        let back = all_to_all_rows(&out, &recv, &send, &self.comm)?; // (n_kept, h)
        let wts = dispatch::gather_weights(&routed.weights, &idx, x.dtype())?;
        let mut y = dispatch::combine(&back, &wts, &idx, n)?;
        if let Some(shared) = &self.shared {
            y = (y + shared.forward(&x)?)?;
        }

        // Router statistics: the rank's, made global with the aux-loss all-reduce below.
        let mut stats = crate::moe::RouterStats::fetch(&routed, self.router.selection_bias())?;
        let aux = RouterAux::new(&routed.logits, routed.probs, aux_ids, k)?;
        let counts = &table[w * e + w..];
        let total: usize = global.tokens.iter().sum();
        let (lb, z, p_sum, entropy_sum) =
            self.global_aux_losses(&aux, counts, total, stats.entropy * n as f64)?;
        stats.entropy = entropy_sum / total as f64;
        stats.mean_probs = p_sum.iter().map(|&p| p as f64 / total as f64).collect();
        Ok(MoeOutput {
            hidden_states: y.reshape(dims)?,
            router_logits: routed.logits,
            load_balancing_loss: lb,
            z_loss: z,
            expert_counts: global.kept_per_expert(),
            dropped: global.dropped(),
            expert_ids: Some(routed.experts.clone()),
            stats,
            balance: crate::losses::BalanceLosses {
                router_aux: vec![aux.clone()],
                ..Default::default()
            },
            aux,
        })
    }

    /// The local experts on the received rows (source-major), returned in the same order. The
    /// result always depends on the local expert weights (also with no rows), so every rank's
    /// autograd graph holds the returning all-to-all and the backward collectives pair up.
    fn local_compute(&self, received: &Tensor, global: &GlobalTable) -> Result<Tensor> {
        let (perm, offsets) = global.expert_major(self.comm.rank());
        let rows = perm.len();
        if rows == 0 {
            // The first local expert on the empty rows: `(0, h)`, in the graph of its weights.
            return match self.experts.experts().first() {
                Some(x) => x.forward(received),
                None => bail!("ExpertParallelMoe: this rank owns no experts"),
            };
        }
        let dev = received.device();
        let inv = inverse(&perm);
        let perm = Tensor::from_vec(perm, rows, dev)?;
        let inv = Tensor::from_vec(inv, rows, dev)?;
        let sorted = received.index_select(&perm, 0)?;
        let out = self.experts.forward_segments(&sorted, &offsets)?;
        out.index_select(&inv, 0)
    }

    /// The load-balancing and z-loss over the union of the ranks' tokens (one all-reduce of the
    /// per-expert probability sums, the `logsumexp²` sum and the router entropy sum
    /// `entropy_sum`); the other ranks' parts enter as constants. Also returns the global
    /// probability sums `(E,)` and entropy sum (the router statistics).
    fn global_aux_losses(
        &self,
        aux: &RouterAux,
        counts: &[u64],
        total: usize,
        entropy_sum: f64,
    ) -> Result<(Tensor, Tensor, Vec<f32>, f64)> {
        let e = self.cfg.num_experts;
        let dev = aux.probs.device();
        let p_local = aux.probs.sum(0)?; // (E,)
        let z_local = aux.lse_sq_sum.reshape(1)?;
        let local = Tensor::cat(&[&p_local, &z_local], 0)?.to_dtype(DType::F32)?;
        let mut all = local.to_vec1::<f32>()?;
        all.push(entropy_sum as f32);
        self.comm.all_reduce_sum_f32(&mut all)?;
        let entropy_sum = all.pop().map_or(f64::NAN, |v| v as f64);
        let p_sum = all[..e].to_vec();
        let all = Tensor::from_vec(all, e + 1, dev)?.to_dtype(p_local.dtype())?;
        let others = (all - local.to_dtype(p_local.dtype())?)?.detach();
        let total = total as f64;
        let p = ((p_local + others.narrow(0, 0, e)?)? / total)?;
        let f: Vec<f32> = counts.iter().map(|&c| (c as f64 / total) as f32).collect();
        let f = Tensor::from_vec(f, e, dev)?.to_dtype(p.dtype())?;
        let lb = ((f * p)?.sum_all()? * e as f64)?;
        let z = ((z_local + others.narrow(0, e, 1)?)? / total)?.reshape(())?;
        Ok((lb, z, p_sum, entropy_sum))
    }
}
