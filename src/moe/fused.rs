//! CPU fast path for inference: all experts of a layer in one pass, in parallel across cores.
//!
//! The weights are f32 or bf16 (a frozen bf16 model keeps its experts in bf16: no f32 copy is
//! kept); bf16 weights are converted to f32 one matrix at a time inside the task that uses them
//! (a per-thread buffer of one expert matrix), and every product accumulates in f32. The
//! activations are f32 (a bf16 layer converts its input and output around the op).
//!
//! For CPU with no gradient tracking, each expert's kept assignments form one task (cut
//! into equal parts only when an expert holds more than a core's share of the rows); the tasks
//! run on candle's CPU worker pool, each with single-threaded GEMMs that read the experts' own
//! weight tensors in place (no second copy of the experts is kept). The products are computed with a column-major output
//! so that the GEMM reads the weights in place rather than repacking them per call (the weights
//! are the large operand), then transposed back with the gate weight applied; one pass sums
//! every token's weighted expert outputs. The result equals the candle-ops path (checked against the per-token reference in
//! tests).

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::dispatch::DispatchPlan;
use super::experts::Experts;
use crate::cpu;

/// The weights the fused op reads, in place: per expert `w1` `(f, h)`, `w3` `(f, h)` and `w2`
/// `(h, f)`, each a contiguous f32 or bf16 CPU tensor, all of one dtype (handles on the experts'
/// own tensors, not copies).
#[derive(Debug)]
pub struct FusedExperts {
    h: usize,
    f: usize,
    /// `[w1_0, w3_0, w2_0, w1_1, ...]`.
    ws: Vec<Tensor>,
}

impl FusedExperts {
    /// Collects the weight handles; `None` when the experts are not bias-free SwiGLU in
    /// contiguous f32 or bf16 (one dtype) on the CPU.
    pub fn new(experts: &Experts) -> Result<Option<Self>> {
        let ex = experts.experts();
        let Some(first) = ex.first() else {
            return Ok(None);
        };
        let (w1, _, _) = first.weights();
        let dtype = w1.dtype();
        if !first.is_plain_swiglu()
            || first.has_bias()
            || !matches!(dtype, DType::F32 | DType::BF16)
        {
            return Ok(None);
        }
        let (f, h) = w1.dims2()?;
        let mut ws = Vec::with_capacity(3 * ex.len());
        for e in ex {
            let (w1, w3, w2) = e.weights();
            let Some(w3) = w3 else { return Ok(None) };
            if e.has_lora() || !e.is_plain_swiglu() || e.has_bias() {
                return Ok(None);
            }
            for w in [w1, w3, w2] {
                if !w.is_contiguous() || w.dtype() != dtype || !w.device().is_cpu() {
                    return Ok(None);
                }
                ws.push(w.clone());
            }
        }
        Ok(Some(Self { h, f, ws }))
    }
}

/// `cᵀ (n × m, row-major) = (a · wᵀ)ᵀ` for `a` `(m × k)` row-major (`a_rs`, `a_cs` strides) and
/// `w` `(n × k)` row-major, single-threaded; the weights are read in place, not repacked.
#[allow(clippy::too_many_arguments)]
fn matmul_wt_t(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    w: &[f32],
    ct: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    cpu::gemm_strided(ct, cpu::Out::ColMajor, a, a_rs, a_cs, w, 1, k, m, n, k)
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
        let tasks: Vec<Task> = cpu::segment_tasks(&plan.offsets)
            .into_iter()
            .map(|(e, start, len)| Task { e, start, len })
            .collect();
        // Per-assignment outputs, expert-sorted: disjoint slices, one per task.
        let mut ys = vec![0f32; kept * h];
        let mut slices = Vec::with_capacity(tasks.len());
        let mut rest: &mut [f32] = &mut ys;
        for t in &tasks {
            let (a, b) = rest.split_at_mut(t.len * h);
            slices.push(a);
            rest = b;
        }
        cpu::with_weight_slices(&self.fused.ws, |ws| {
            cpu::par_each(
                tasks.iter().zip(slices).collect(),
                |_, (t, out)| -> Result<()> {
                    cpu::with_scratch(|[xe, gt, act, yt]| {
                        cpu::with_weight_scratch(|wbuf| {
                            let m = t.len;
                            xe.clear();
                            for r in t.start..t.start + m {
                                let tok = plan.token_idx[r] as usize;
                                xe.extend_from_slice(&x[tok * h..(tok + 1) * h]);
                            }
                            // gᵀ (2f × m): rows 0..f are w1·x, rows f..2f are w3·x.
                            gt.resize(2 * f * m, 0.0);
                            let (gt1, gt3) = gt[..2 * f * m].split_at_mut(f * m);
                            matmul_wt_t(xe, h, 1, ws[3 * t.e].as_f32(wbuf), gt1, m, h, f)?;
                            matmul_wt_t(xe, h, 1, ws[3 * t.e + 1].as_f32(wbuf), gt3, m, h, f)?;
                            let (g1, g3) = gt[..2 * f * m].split_at(f * m);
                            act.clear();
                            act.extend(
                                g1.iter().zip(g3).map(|(&a, &b)| a / (1.0 + (-a).exp()) * b),
                            ); // actᵀ (f × m)
                               // yᵀ (h × m) = (act · w2ᵀ)ᵀ, act read column-major from actᵀ.
                            yt.resize(h * m, 0.0);
                            let w2 = ws[3 * t.e + 2].as_f32(wbuf);
                            matmul_wt_t(act, 1, m, w2, &mut yt[..h * m], m, f, h)?;
                            // Back to row-major (m × h), gate-weighted.
                            cpu::transpose_into(&yt[..h * m], h, m, out)?;
                            for (r, row) in out.chunks_mut(h).enumerate() {
                                let w = self.gate[t.start + r];
                                row.iter_mut().for_each(|v| *v *= w);
                            }
                            Ok(())
                        })
                    })
                },
            )
        })?;
        let out = combine(&ys, plan, n, h)?;
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }
}

/// Sums every token's kept, gate-weighted expert outputs (`ys` in plan order) into `(n, h)`
/// rows: the inverse of the plan's permutation, in parallel over row blocks.
fn combine(ys: &[f32], plan: &DispatchPlan, n: usize, h: usize) -> Result<Vec<f32>> {
    let kept = plan.num_kept();
    // Combine: every token sums its kept assignments (inverse of the plan's permutation).
    let mut first = vec![usize::MAX; n];
    let mut next = vec![usize::MAX; kept];
    for r in (0..kept).rev() {
        let tok = plan.token_idx[r] as usize;
        next[r] = first[tok];
        first[tok] = r;
    }
    let mut out = vec![0f32; n * h];
    let per_part = n
        .div_ceil(8 * candle_core::utils::get_num_threads().max(1))
        .max(16);
    cpu::par_each(out.chunks_mut(per_part * h).collect(), |p, rows| {
        for (i, row) in rows.chunks_mut(h).enumerate() {
            let mut r = first[p * per_part + i];
            while r != usize::MAX {
                for (o, v) in row.iter_mut().zip(&ys[r * h..(r + 1) * h]) {
                    *o += v;
                }
                r = next[r];
            }
        }
        Ok(())
    })?;
    Ok(out)
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
