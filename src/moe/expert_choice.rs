//! Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").
//!
//! The router scores every token against every expert, `S = softmax(x W_g^T)` `(n, E)` (over
//! the experts, as in token choice). Each expert then picks the `C` tokens it scores highest,
//! by `S[:, e]`, instead of each token picking its experts. The gate of a picked pair is
//! `G[t, e] = S[t, e]` (times `routed_scaling_factor`), and
//! `y_t = Σ_{e that picked t} G[t, e] · E_e(x_t)` (plus the shared expert, when configured).
//! A token no expert picks gets only the shared expert (or zero): the block's residual carries
//! it. A token may be picked by several experts, or by none.
//!
//! Capacity: `C = ceil(n · c / E)`, clamped to `n`, where `c` is `capacity_factor` when set and
//! `top_k` otherwise, so that on average a token gets `c` experts (the paper's capacity factor
//! is this average). Every expert processes exactly `C` tokens: the load is balanced by
//! construction.
//!
//! The choice looks at every token of the batch at once, future positions included, so the
//! models refuse it in causal stacks (see [`crate::config::MoeConfig::check_causal_routing`]).
//! With a token mask ([`SparseMoe::forward_masked`]; the encoders pass their padding mask)
//! padding positions rank below every real token and `C` counts the real tokens only, so
//! padding is never picked (unless a batch is all padding).
//!
//! The picks are integer-valued; the gates are gathered from `S`, so gradients reach the
//! router through `G` and the experts through their outputs. The plan is an ordinary
//! [`DispatchPlan`]: the kept pairs are already expert-contiguous (expert `e` owns rows
//! `e·C..(e+1)·C`, best first), each with its token index, and `slot_idx` indexes the
//! flattened `(E, C)` gate matrix, so the gather / expert backends / combine of token choice
//! run unchanged.

use candle_core::{bail, DType, Result, Tensor};

use crate::ops::HostRead;

use super::dispatch::DispatchPlan;
use super::router::RouterOutput;
use super::{host_routing, MoeOutput, SparseMoe};
use crate::config::RoutingKind;

impl SparseMoe {
    /// [`SparseMoe::forward_t`] with a token mask (1 = real token, 0 = padding), which expert
    /// choice uses: padding is never picked and the capacity counts the real tokens. Token
    /// choice ignores the mask (the models exclude padding from its aux losses).
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)` or `(n, h)`; `token_mask`: `(b, t)` or `(n,)`
    pub fn forward_masked(
        &self,
        xs: &Tensor,
        token_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<MoeOutput> {
        if self.cfg.routing != RoutingKind::ExpertChoice || token_mask.is_none() {
            return self.forward_t(xs, train);
        }
        let (dims, n) = self.check_input(xs)?;
        let x = xs.reshape((n, self.cfg.hidden_size))?; // (n, h)
        let routed = self.router.forward_t(&x, train)?;
        self.expert_choice(&x, routed, token_mask, &dims, train)
    }

    /// The expert-choice layer output for the flattened input `x` `(n, h)`.
    pub(super) fn expert_choice(
        &self,
        x: &Tensor,
        routed: RouterOutput,
        token_mask: Option<&Tensor>,
        dims: &[usize],
        train: bool,
    ) -> Result<MoeOutput> {
        let (n, e, k) = (x.dim(0)?, self.cfg.num_experts, self.cfg.top_k);
        let (order_by, real) = match token_mask {
            None => (routed.probs.detach(), None),
            Some(m) => {
                let m = m.flatten_all()?;
                if m.dim(0)? != n {
                    bail!(
                        "expert choice: the token mask has {} entries for {n} tokens",
                        m.dim(0)?
                    )
                }
                let host = m.to_dtype(DType::F32)?.host_vec1::<f32>()?;
                let real: Vec<bool> = host.iter().map(|v| *v > 0.0).collect();
                // Scores are in [0, 1]: padding ranks at -1, below every real token.
                let keep = Tensor::from_vec(
                    real.iter().map(|&r| if r { 1f32 } else { 0.0 }).collect(),
                    (n, 1),
                    x.device(),
                )?
                .to_dtype(routed.probs.dtype())?;
                let order = routed
                    .probs
                    .detach()
                    .broadcast_mul(&keep)?
                    .broadcast_add(&(keep - 1.0)?)?;
                (order, Some(real))
            }
        };
        let tokens = real
            .as_ref()
            .map_or(n, |r| r.iter().filter(|v| **v).count());
        let cap = expert_capacity(self.cfg.capacity_factor, tokens, k, e).min(n);
        let scaling = self.cfg.routed_scaling_factor;
        let (picked, gates) = pick(&routed.probs, &order_by, cap, scaling)?; // (E, C) each
                                                                             // One transfer: the picks, then the token-choice top-k the load-balancing loss counts.
        let both = Tensor::cat(&[picked.flatten_all()?, routed.experts.flatten_all()?], 0)?;
        let (mut host, stats) = host_routing(&routed, &both, self.router.selection_bias())?;
        let aux_ids = host.split_off(e * cap);
        let plan = plan(host, e, n, real.as_deref());
        let y = self.experts_forward(x, &gates, &plan, train)?; // (n, h)
        self.finish(x, y, routed, (aux_ids, stats), plan, dims, None)
    }
}

/// Tokens per expert under expert choice: `ceil(n · c / E)` clamped to `1..=n`, with
/// `c = capacity_factor` when given and `top_k` otherwise.
///
/// ```
/// use candle_moe::moe::expert_choice::expert_capacity;
/// // 10 tokens, 4 experts, two experts per token on average: each expert takes 5 tokens.
/// assert_eq!(expert_capacity(None, 10, 2, 4), 5);
/// // A capacity factor of 0.5: ceil(10 · 0.5 / 4) = 2 tokens per expert.
/// assert_eq!(expert_capacity(Some(0.5), 10, 2, 4), 2);
/// // Never more than the tokens there are.
/// assert_eq!(expert_capacity(Some(8.0), 10, 2, 4), 10);
/// ```
pub fn expert_capacity(
    capacity_factor: Option<f64>,
    tokens: usize,
    top_k: usize,
    num_experts: usize,
) -> usize {
    let c = capacity_factor.unwrap_or(top_k as f64);
    let cap = (tokens as f64 * c / num_experts.max(1) as f64).ceil() as usize;
    cap.clamp(1, tokens.max(1))
}

/// The per-expert token picks of `scores` `(n, E)`, ranked by `order_by` `(n, E)`: the picked
/// token ids `(E, C)` u32 (best first, not yet on the host) and their gates `(E, C)` from
/// `scores`, differentiable, in `scores`' dtype.
fn pick(
    scores: &Tensor,
    order_by: &Tensor,
    capacity: usize,
    scaling: f64,
) -> Result<(Tensor, Tensor)> {
    let per_expert = scores.t()?.contiguous()?; // (E, n)
    let order = order_by.t()?.contiguous()?.arg_sort_last_dim(false)?; // (E, n) descending
    let picked = order.narrow(1, 0, capacity)?.contiguous()?; // (E, C)
    let gates = per_expert.gather(&picked, 1)?; // (E, C)
    let gates = if scaling != 1.0 {
        (gates * scaling)?
    } else {
        gates
    };
    Ok((picked, gates))
}

/// The dispatch plan of expert-choice picks (`E · C` token ids on the host, row-major by
/// expert) over `num_tokens` tokens: segments of `C` rows per expert, `slot_idx` the identity
/// (the row of the flattened gate matrix), `routed` = `C` per expert, and `dropped` = the
/// (real, when `real` marks them) tokens no expert picked.
fn plan(
    picked: Vec<u32>,
    num_experts: usize,
    num_tokens: usize,
    real: Option<&[bool]>,
) -> DispatchPlan {
    let cap = picked.len() / num_experts.max(1);
    let mut seen = vec![false; num_tokens];
    for &t in &picked {
        if let Some(s) = seen.get_mut(t as usize) {
            *s = true;
        }
    }
    let unpicked = (0..num_tokens)
        .filter(|&t| !seen[t] && real.is_none_or(|r| r[t]))
        .count();
    DispatchPlan {
        slot_idx: (0..picked.len() as u32).collect(),
        token_idx: picked,
        offsets: (0..=num_experts).map(|e| e * cap).collect(),
        routed: vec![cap; num_experts],
        dropped: unpicked,
    }
}
