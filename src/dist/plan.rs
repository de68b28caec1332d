//! The global routing table of an expert-parallel step: every rank's routed assignments per
//! expert (one all-reduce), from which each rank derives, without further messages, the global
//! capacity, what every rank keeps per expert, and the row counts of both all-to-alls.

use candle_core::{bail, Result};

use crate::moe::dispatch::{self, DispatchPlan};

/// What every rank routed, and what the capacity lets each keep.
#[derive(Debug, Clone)]
pub(crate) struct GlobalTable {
    /// World size `W`.
    pub world: usize,
    /// Experts `E`.
    pub experts: usize,
    /// `kept[s * E + e]`: assignments of rank `s` kept for expert `e`.
    pub kept: Vec<usize>,
    /// `routed[s * E + e]`: assignments of rank `s` routed to expert `e` (before capacity).
    pub routed: Vec<usize>,
    /// Tokens on each rank.
    pub tokens: Vec<usize>,
}

impl GlobalTable {
    /// Builds the table from the all-reduced `routed` matrix (`W × E`, rank-major) and token
    /// counts; `capacity_factor` is applied to the global token count, and each expert keeps
    /// its first `C` assignments in the order of the union of the ranks' tokens (rank 0's
    /// first), exactly as the single-process layer on that union would.
    pub fn new(
        world: usize,
        experts: usize,
        routed: Vec<usize>,
        tokens: Vec<usize>,
        top_k: usize,
        capacity_factor: Option<f64>,
    ) -> Self {
        let total: usize = tokens.iter().sum();
        let cap = capacity_factor.map(|cf| dispatch::capacity(cf, total, top_k, experts));
        let mut kept = vec![0usize; world * experts];
        for e in 0..experts {
            let mut before = 0usize;
            for s in 0..world {
                let r = routed[s * experts + e];
                kept[s * experts + e] = cap.map_or(r, |c| r.min(c.saturating_sub(before)));
                before += r;
            }
        }
        Self {
            world,
            experts,
            kept,
            routed,
            tokens,
        }
    }

    /// Experts per rank.
    pub fn local(&self) -> usize {
        self.experts / self.world
    }

    /// Rows rank `src` sends to rank `dst` (its kept assignments to `dst`'s experts).
    pub fn rows(&self, src: usize, dst: usize) -> usize {
        let l = self.local();
        (dst * l..(dst + 1) * l)
            .map(|e| self.kept[src * self.experts + e])
            .sum()
    }

    /// Per-expert limits of rank `rank`'s local plan.
    pub fn limits(&self, rank: usize) -> &[usize] {
        &self.kept[rank * self.experts..(rank + 1) * self.experts]
    }

    /// Kept assignments per expert over all ranks.
    pub fn kept_per_expert(&self) -> Vec<usize> {
        (0..self.experts)
            .map(|e| {
                (0..self.world)
                    .map(|s| self.kept[s * self.experts + e])
                    .sum()
            })
            .collect()
    }

    /// Assignments dropped by the capacity over all ranks.
    pub fn dropped(&self) -> usize {
        self.routed.iter().sum::<usize>() - self.kept.iter().sum::<usize>()
    }

    /// For the rows rank `rank` receives (source-major, then local expert, in token order):
    /// the permutation that sorts them by local expert (source order within an expert), and the
    /// local expert segment offsets after sorting.
    pub fn expert_major(&self, rank: usize) -> (Vec<u32>, Vec<usize>) {
        let l = self.local();
        let first = rank * l;
        // Start of block (s, j) in the received buffer.
        let mut start = vec![0usize; self.world * l];
        let mut at = 0usize;
        for s in 0..self.world {
            for j in 0..l {
                start[s * l + j] = at;
                at += self.kept[s * self.experts + first + j];
            }
        }
        let mut perm = Vec::with_capacity(at);
        let mut offsets = Vec::with_capacity(l + 1);
        offsets.push(0);
        for j in 0..l {
            for s in 0..self.world {
                let b = start[s * l + j];
                let c = self.kept[s * self.experts + first + j];
                perm.extend((b..b + c).map(|i| i as u32));
            }
            offsets.push(perm.len());
        }
        (perm, offsets)
    }
}

/// The inverse of a permutation of `0..n`.
pub(crate) fn inverse(perm: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as u32;
    }
    inv
}

/// A rank's dispatch plan: its (token, slot) assignments sorted by expert (so by destination
/// rank), expert `e` keeping its first `limits[e]` assignments in token order.
pub(crate) fn plan_with_limits(
    expert_ids: &[u32],
    top_k: usize,
    num_experts: usize,
    limits: &[usize],
) -> Result<DispatchPlan> {
    if limits.len() != num_experts {
        bail!(
            "expert-parallel plan: {} limits for {num_experts} experts",
            limits.len()
        )
    }
    let mut p = dispatch::plan(expert_ids, top_k, num_experts, None)?;
    // `plan` without capacity keeps everything, expert-contiguous in token order: keep a prefix
    // of each segment.
    let (mut token_idx, mut slot_idx, mut offsets) = (vec![], vec![], vec![0usize]);
    for (e, &limit) in limits.iter().enumerate() {
        let (a, b) = (p.offsets[e], p.offsets[e + 1]);
        let end = a + (b - a).min(limit);
        token_idx.extend_from_slice(&p.token_idx[a..end]);
        slot_idx.extend_from_slice(&p.slot_idx[a..end]);
        offsets.push(token_idx.len());
    }
    p.dropped = expert_ids.len() - token_idx.len();
    p.token_idx = token_idx;
    p.slot_idx = slot_idx;
    p.offsets = offsets;
    Ok(p)
}
