//! Dispatch: permute (token, slot) assignments by expert, gather once, combine once.
//!
//! The plan is a stable counting sort of the `tokens × k` assignments by expert id, so each
//! expert's assignments are contiguous and in token order. With a capacity factor each expert
//! keeps its first `C = ceil(cf · tokens · k / E)` assignments in token order (GShard, Lepikhin
//! et al. 2020; Switch, Fedus et al. 2021, eq. 3); the rest are dropped, contribute zero, and
//! are counted. Only integer index lists live on the host; the gather is one `index_select` and
//! the combine one weighted `index_add`, so no tensor of size tokens × experts × capacity exists.

use candle_core::{bail, DType, Device, Result, Tensor};

/// Where every kept assignment goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Token index of each kept assignment, sorted by expert (then token): length `n_kept`.
    pub token_idx: Vec<u32>,
    /// Where each kept assignment's gate weight is in the flattened weight tensor, same order
    /// as `token_idx`: the slot `t * k + j` of the `(tokens, k)` router weights under token
    /// choice; the row of the `(E, C)` gate matrix under expert choice
    /// ([`crate::moe::expert_choice`]), where a token may have any number of assignments.
    pub slot_idx: Vec<u32>,
    /// Segment offsets: expert `e` owns rows `offsets[e]..offsets[e + 1]`; length `E + 1`.
    pub offsets: Vec<usize>,
    /// Assignments routed to each expert before capacity drops.
    pub routed: Vec<usize>,
    /// Assignments dropped by the capacity limit (expert choice: tokens no expert picked).
    pub dropped: usize,
}

impl DispatchPlan {
    /// Kept assignments per expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
    /// Number of kept assignments.
    pub fn num_kept(&self) -> usize {
        self.token_idx.len()
    }
}

/// Expert capacity `ceil(cf · tokens · k / E)`.
pub fn capacity(capacity_factor: f64, tokens: usize, top_k: usize, num_experts: usize) -> usize {
    (capacity_factor * (tokens * top_k) as f64 / num_experts as f64).ceil() as usize
}

/// Builds the plan from the router's expert ids (`tokens × k`, row-major).
///
/// ```
/// use candle_moe::moe::dispatch::plan;
///
/// # fn main() -> candle_core::Result<()> {
/// // 3 tokens, top-2, 3 experts: token 0 -> (2, 0), token 1 -> (0, 1), token 2 -> (2, 0).
/// let ids = [2, 0, 0, 1, 2, 0];
/// let p = plan(&ids, 2, 3, None)?;
/// // Expert-contiguous and in token order: expert 0 gets tokens 0, 1, 2; expert 1 token 1;
/// // expert 2 tokens 0 and 2.
/// assert_eq!(p.offsets, vec![0, 3, 4, 6]);
/// assert_eq!(p.token_idx, vec![0, 1, 2, 1, 0, 2]);
/// assert_eq!(p.slot_idx, vec![1, 2, 5, 3, 0, 4]);
/// assert_eq!((p.counts(), p.dropped), (vec![3, 1, 2], 0));
///
/// // A capacity of 2 per expert keeps each expert's first two assignments in token order.
/// let p = plan(&ids, 2, 3, Some(2))?;
/// assert_eq!(p.counts(), vec![2, 1, 2]);
/// assert_eq!(p.routed, vec![3, 1, 2]);
/// assert_eq!(p.dropped, 1);
/// # Ok(())
/// # }
/// ```
pub fn plan(
    expert_ids: &[u32],
    top_k: usize,
    num_experts: usize,
    capacity: Option<usize>,
) -> Result<DispatchPlan> {
    if top_k == 0 || !expert_ids.len().is_multiple_of(top_k) {
        bail!(
            "dispatch: {} expert ids is not a multiple of top_k = {top_k}",
            expert_ids.len()
        )
    }
    let mut routed = vec![0usize; num_experts];
    for &e in expert_ids {
        if e as usize >= num_experts {
            bail!("dispatch: expert id {e} out of range for {num_experts} experts")
        }
        routed[e as usize] += 1;
    }
    let kept: Vec<usize> = routed
        .iter()
        .map(|&r| capacity.map_or(r, |c| r.min(c)))
        .collect();
    let mut offsets = Vec::with_capacity(num_experts + 1);
    offsets.push(0);
    for &k in &kept {
        offsets.push(offsets[offsets.len() - 1] + k);
    }
    let n_kept = offsets[num_experts];
    let mut cursor = offsets[..num_experts].to_vec();
    let mut token_idx = vec![0u32; n_kept];
    let mut slot_idx = vec![0u32; n_kept];
    for (slot, &e) in expert_ids.iter().enumerate() {
        let e = e as usize;
        if cursor[e] < offsets[e + 1] {
            token_idx[cursor[e]] = (slot / top_k) as u32;
            slot_idx[cursor[e]] = slot as u32;
            cursor[e] += 1;
        }
    }
    Ok(DispatchPlan {
        token_idx,
        slot_idx,
        offsets,
        routed,
        dropped: expert_ids.len() - n_kept,
    })
}

/// Device copies of a plan's index lists.
#[derive(Debug, Clone)]
pub struct PlanTensors {
    /// `(n_kept,)` u32 token indices.
    pub token_idx: Tensor,
    /// `(n_kept,)` u32 flat slot indices.
    pub slot_idx: Tensor,
}

impl PlanTensors {
    /// Uploads the index lists of `plan` to `device` (one transfer each).
    pub fn new(plan: &DispatchPlan, device: &Device) -> Result<Self> {
        let n = plan.num_kept();
        Ok(Self {
            token_idx: Tensor::from_slice(&plan.token_idx, n, device)?,
            slot_idx: Tensor::from_slice(&plan.slot_idx, n, device)?,
        })
    }
}

/// Gathers the tokens of every kept assignment into expert-contiguous rows.
///
/// # Shapes
/// - `xs`: `(tokens, h)` -> `(n_kept, h)`
pub fn gather(xs: &Tensor, idx: &PlanTensors) -> Result<Tensor> {
    xs.index_select(&idx.token_idx, 0)
}

/// Gate weight of each kept assignment, in the plan's order, in `dtype`.
///
/// # Shapes
/// - `weights`: `(tokens, k)` -> `(n_kept, 1)`
pub fn gather_weights(weights: &Tensor, idx: &PlanTensors, dtype: DType) -> Result<Tensor> {
    weights
        .flatten_all()?
        .index_select(&idx.slot_idx, 0)?
        .to_dtype(dtype)?
        .unsqueeze(1)
}

/// Weights the expert outputs and scatters them back to their tokens with one `index_add`.
///
/// # Shapes
/// - `expert_out`: `(n_kept, h)`, `weights`: `(n_kept, 1)` -> `(tokens, h)`
pub fn combine(
    expert_out: &Tensor,
    weights: &Tensor,
    idx: &PlanTensors,
    num_tokens: usize,
) -> Result<Tensor> {
    let h = expert_out.dim(1)?;
    let weighted = expert_out.broadcast_mul(weights)?;
    let acc = Tensor::zeros((num_tokens, h), expert_out.dtype(), expert_out.device())?;
    acc.index_add(&idx.token_idx, &weighted, 0)
}
