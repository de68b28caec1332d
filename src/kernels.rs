//! CPU fast path for inference: all experts of a layer in one pass, in parallel across cores.
//!
//! The candle-ops path (used whenever gradients may be needed) runs each expert's three
//! matmuls one after another, each a small multi-threaded GEMM far below the machine's peak.
//! Here, for f32 on CPU with no gradient tracking, the kept assignments are cut into row chunks
//! (per expert), the chunks run in parallel on rayon's pool, each with single-threaded GEMMs on
//! a fused `[w1; w3]` weight (one `(2f, h)` matmul instead of two), and one pass sums every
//! token's weighted expert outputs. The fused weights are built once per layer, not per forward.
//! The result equals the candle-ops path (checked against the per-token reference in tests).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::dispatch::DispatchPlan;
use crate::experts::Experts;

/// Inference-only weight layout of SwiGLU experts: `w13[e] = [w1_e; w3_e]` `(2f, h)` and
/// `w2[e]` `(h, f)`, row-major, contiguous.
#[derive(Debug)]
pub struct FusedExperts {
    h: usize,
    f: usize,
    w13: Vec<f32>,
    w2: Vec<f32>,
}

impl FusedExperts {
    /// Builds the fused layout; `None` when the experts are not bias-free SwiGLU in f32.
    pub fn new(experts: &Experts) -> Result<Option<Self>> {
        let ex = experts.experts();
        let Some(first) = ex.first() else {
            return Ok(None);
        };
        let (w1, w3, _) = first.weights();
        if w3.is_none() || first.has_bias() || w1.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let (f, h) = w1.dims2()?;
        let mut w13 = Vec::with_capacity(ex.len() * 2 * f * h);
        let mut w2s = Vec::with_capacity(ex.len() * h * f);
        for e in ex {
            let (w1, w3, w2) = e.weights();
            let Some(w3) = w3 else { return Ok(None) };
            w13.extend(w1.flatten_all()?.to_vec1::<f32>()?);
            w13.extend(w3.flatten_all()?.to_vec1::<f32>()?);
            w2s.extend(w2.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Some(Self { h, f, w13, w2: w2s }))
    }
}

/// `c (m × n) = a (m × k) · bᵀ` with `b` `(n × k)`, all row-major, single-threaded.
fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> Result<()> {
    crate::grouped::gemm_strided(c, a, k, 1, b, 1, k, m, n, k)
}

/// One chunk of work: rows `start..start + len` of expert `e`'s segment.
#[derive(Debug, Clone, Copy)]
struct Task {
    e: usize,
    start: usize,
    len: usize,
}

/// The fused expert computation as a candle custom op on the token states `(n, h)`.
pub struct MoeCpuOp<'a> {
    /// Fused weights.
    pub fused: &'a FusedExperts,
    /// The dispatch plan.
    pub plan: &'a DispatchPlan,
    /// Gate weight of each kept assignment, in plan order.
    pub gate: &'a [f32],
}

impl CustomOp1 for MoeCpuOp<'_> {
    fn name(&self) -> &'static str {
        "moe-cpu-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h) = layout.shape().dims2()?;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => bail!("moe-cpu-fused: needs contiguous f32 input"),
        };
        let FusedExperts { f, .. } = *self.fused;
        if h != self.fused.h {
            bail!("moe-cpu-fused: hidden size {h} != {}", self.fused.h)
        }
        let plan = self.plan;
        let kept = plan.num_kept();
        if self.gate.len() != kept {
            bail!(
                "moe-cpu-fused: {} gate weights for {kept} assignments",
                self.gate.len()
            )
        }
        // Chunks of at most CHUNK rows so that a hot expert spreads over the cores.
        const CHUNK: usize = 96;
        let mut tasks = vec![];
        for e in 0..plan.offsets.len() - 1 {
            let (s, t) = (plan.offsets[e], plan.offsets[e + 1]);
            let mut at = s;
            while at < t {
                let len = (t - at).min(CHUNK);
                tasks.push(Task { e, start: at, len });
                at += len;
            }
        }
        // Per-assignment outputs, expert-sorted: disjoint slices, one per task.
        let mut ys = vec![0f32; kept * h];
        let mut slices = Vec::with_capacity(tasks.len());
        let mut rest: &mut [f32] = &mut ys;
        for t in &tasks {
            let (a, b) = rest.split_at_mut(t.len * h);
            slices.push(a);
            rest = b;
        }
        let (w13, w2) = (&self.fused.w13, &self.fused.w2);
        tasks
            .par_iter()
            .zip(slices.into_par_iter())
            .try_for_each(|(t, out)| -> Result<()> {
                let mut xe = Vec::with_capacity(t.len * h);
                for r in t.start..t.start + t.len {
                    let tok = plan.token_idx[r] as usize;
                    xe.extend_from_slice(&x[tok * h..(tok + 1) * h]);
                }
                let mut g = vec![0f32; t.len * 2 * f];
                matmul_bt(
                    &xe,
                    &w13[t.e * 2 * f * h..(t.e + 1) * 2 * f * h],
                    &mut g,
                    t.len,
                    h,
                    2 * f,
                )?;
                let mut act = vec![0f32; t.len * f];
                for r in 0..t.len {
                    let row = &g[r * 2 * f..(r + 1) * 2 * f];
                    let (a, b) = row.split_at(f);
                    for ((o, &a), &b) in act[r * f..(r + 1) * f].iter_mut().zip(a).zip(b) {
                        *o = a / (1.0 + (-a).exp()) * b;
                    }
                }
                matmul_bt(&act, &w2[t.e * h * f..(t.e + 1) * h * f], out, t.len, f, h)?;
                for r in 0..t.len {
                    let w = self.gate[t.start + r];
                    out[r * h..(r + 1) * h].iter_mut().for_each(|v| *v *= w);
                }
                Ok(())
            })?;
        // Combine: every token sums its kept assignments (inverse of the plan's permutation).
        let mut first = vec![usize::MAX; n];
        let mut next = vec![usize::MAX; kept];
        for r in (0..kept).rev() {
            let tok = plan.token_idx[r] as usize;
            next[r] = first[tok];
            first[tok] = r;
        }
        let mut out = vec![0f32; n * h];
        out.par_chunks_mut(h).enumerate().for_each(|(tok, row)| {
            let mut r = first[tok];
            while r != usize::MAX {
                for (o, v) in row.iter_mut().zip(&ys[r * h..(r + 1) * h]) {
                    *o += v;
                }
                r = next[r];
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }
}

/// Runs the fused op.
///
/// # Shapes
/// - `x`: `(n, h)` f32 on CPU -> `(n, h)`
pub fn moe_cpu_forward(
    x: &Tensor,
    fused: &FusedExperts,
    plan: &DispatchPlan,
    gate: &[f32],
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&MoeCpuOp { fused, plan, gate })
}
