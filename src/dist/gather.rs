//! What an expert-parallel run assembles on one rank: the sharded tensors of every rank (the
//! experts' weights, their optimizer moments) gathered to rank 0 under their global names, so
//! that rank 0 can write the single-process checkpoint layout; and the aux losses a model pools
//! over its sparse layers, summed over the ranks.
//!
//! Gathering needs no collective of its own: it is an all-to-all-v in which every rank sends
//! everything to rank 0 and nothing elsewhere.

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor};

use super::Communicator;
use crate::losses::{pooled_aux_sums, AuxSums, RouterAux};

/// The global expert id in a parameter (or optimizer moment) name: the `i` of an
/// `experts.{i}.` component (`model.layers.0.block_sparse_moe.experts.3.w1.weight` -> 3), with
/// the byte range of its digits.
pub fn expert_id(name: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let mut from = 0;
    while let Some(at) = name[from..].find("experts.") {
        let start = from + at;
        let digits = start + "experts.".len();
        let end = name[digits..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(name.len(), |e| digits + e);
        let boundary = start == 0 || name.as_bytes()[start - 1] == b'.';
        if boundary && end > digits && name[end..].starts_with('.') {
            if let Ok(i) = name[digits..end].parse::<usize>() {
                return Some((i, digits..end));
            }
        }
        from = digits;
    }
    None
}

/// `name` with its expert id ([`expert_id`]) replaced by `id`.
pub fn with_expert_id(name: &str, id: usize) -> Option<String> {
    let (_, r) = expert_id(name)?;
    Some(format!("{}{id}{}", &name[..r.start], &name[r.end..]))
}

/// Gathers the sharded expert tensors of every rank to rank 0; a collective (every rank calls
/// it with the same structure: rank `r` passes the tensors of its experts
/// `[r·E/W, (r+1)·E/W)`, named with their global ids, in the same order on every rank).
/// Returns, on rank 0, every rank's tensors in rank order, each named with its global expert
/// id; `None` on the other ranks. The values travel as f32 (bf16 and f16 exactly); f64 tensors
/// are refused.
pub fn gather_experts(
    comm: &Arc<dyn Communicator>,
    local: &[(String, Tensor)],
    num_experts: usize,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let (w, rank) = (comm.size(), comm.rank());
    if w == 0 || !num_experts.is_multiple_of(w) {
        bail!("gather_experts: {num_experts} experts cannot be sharded evenly over {w} ranks")
    }
    let per = num_experts / w;
    let first = rank * per;
    let mut flat: Vec<f32> = Vec::new();
    let mut offsets = Vec::with_capacity(local.len());
    for (name, t) in local {
        match expert_id(name) {
            Some((i, _)) if (first..first + per).contains(&i) => {}
            _ => bail!(
                "gather_experts: `{name}` is not a tensor of rank {rank}'s experts {first}..{}",
                first + per
            ),
        }
        if t.dtype() == DType::F64 {
            bail!("gather_experts: `{name}` is f64; the communicator moves f32 values")
        }
        offsets.push(flat.len());
        flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let mut send_counts = vec![0usize; w];
    send_counts[0] = flat.len();
    let (recv, counts) = comm.all_to_all_v(&flat, &send_counts)?;
    if rank != 0 {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(local.len() * w);
    let mut at = 0;
    for (s, &count) in counts.iter().enumerate() {
        if count != flat.len() {
            bail!(
                "gather_experts: rank {s} sent {count} values, rank 0 holds {} (the ranks' shards differ)",
                flat.len()
            )
        }
        for ((name, t), &off) in local.iter().zip(&offsets) {
            let Some((i, _)) = expert_id(name) else {
                bail!("gather_experts: `{name}` names no expert")
            };
            let Some(global) = with_expert_id(name, s * per + (i - first)) else {
                bail!("gather_experts: `{name}` names no expert")
            };
            let n = t.elem_count();
            let vals = recv[at + off..at + off + n].to_vec();
            let x = Tensor::from_vec(vals, t.shape(), t.device())?.to_dtype(t.dtype())?;
            out.push((global, x));
        }
        at += count;
    }
    Ok(Some(out))
}

/// The load-balancing and z-loss pooled over `layers` exactly as
/// [`crate::losses::pooled_aux_losses`] pools them, over the union of every rank's rows: the
/// counts and row totals are all-reduced (one `u64` all-reduce), the probability and
/// `logsumexp²` sums too (one `f32` all-reduce), the other ranks' parts entering as constants,
/// so each rank's gradient reaches its own router inputs only and the ranks' gradients sum to
/// the gradient of the global losses. A collective; masks must be 0/1. Zero scalars when there
/// are no layers (on every rank alike).
pub fn global_pooled_aux_losses(
    comm: &Arc<dyn Communicator>,
    layers: &[&RouterAux],
    row_masks: Option<&[Tensor]>,
    num_experts: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let Some(s) = pooled_aux_sums(layers, row_masks, num_experts)? else {
        let z = Tensor::new(0f32, device)?;
        return Ok((z.clone(), z));
    };
    let mut ints: Vec<u64> = Vec::with_capacity(num_experts + 2);
    for &c in s.counts.iter().chain([&s.valid]) {
        if c.fract() != 0.0 || c < 0.0 {
            bail!("expert-parallel aux losses: padding masks must be 0 or 1 (a weighted count {c})")
        }
        ints.push(c as u64);
    }
    ints.push(s.rows as u64);
    comm.all_reduce_sum_u64(&mut ints)?;
    let dt = s.p_sum.dtype();
    let local = Tensor::cat(&[&s.p_sum, &s.z_sum.reshape(1)?], 0)?.to_dtype(DType::F32)?;
    let mut all = local.to_vec1::<f32>()?;
    comm.all_reduce_sum_f32(&mut all)?;
    let all = Tensor::from_vec(all, num_experts + 1, device)?;
    let others = (all - local)?.detach().to_dtype(dt)?;
    let sums = AuxSums {
        counts: ints[..num_experts].iter().map(|&c| c as f64).collect(),
        valid: ints[num_experts] as f64,
        rows: ints[num_experts + 1] as usize,
        p_sum: (s.p_sum + others.narrow(0, 0, num_experts)?)?,
        z_sum: (s.z_sum + others.narrow(0, num_experts, 1)?.reshape(())?)?,
    };
    sums.losses(device)
}
