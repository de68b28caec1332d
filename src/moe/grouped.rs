//! Grouped matrix multiplication over expert segments, with a backward pass (the training-path
//! counterpart of [`crate::moe::fused`]; MegaBlocks' grouped GEMM, Gale et al. 2023, on CPU).
//!
//! For tokens sorted by expert (`x` rows `offsets[e]..offsets[e + 1]` belong to expert `e`),
//! `y[seg_e] = x[seg_e] · w[e]ᵀ`. All segments run in parallel on candle's CPU worker pool with
//! single-threaded GEMMs, instead of `3·E` small multi-threaded matmuls one after another. The
//! backward pass is the same kind of op: `dx[seg_e] = dy[seg_e] · w[e]` and
//! `dw[e] = dy[seg_e]ᵀ · x[seg_e]`.
//!
//! The forward product is computed with a column-major output, which lets the GEMM read each
//! `(N, K)` weight in place instead of repacking it for every segment (weights are the large
//! operand: `E/k` times the dense FFN's), and is transposed back afterwards.
//!
//! [`expert_matmul`] (what the layer uses) takes the experts' own weight tensors (the
//! Mixtral-named `Var`s). Stacking them for a single-tensor op would copy every weight on every
//! forward and make candle accumulate every weight gradient twice (once for the stacked tensor,
//! once per slice), which for `E/k` times the dense FFN's parameters is most of the training
//! step's overhead. Instead the op reads the weights where they live, and each weight's gradient
//! enters candle's graph through a tap: a tiny op on that weight whose scalar output feeds the
//! grouped op, so candle runs its backward after the grouped op's, which leaves the per-expert
//! weight gradients in a shared stash.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{
    gemm_strided, par_each, segment_tasks, transpose_into, with_f32_slices as with_slices,
    with_scratch, Out,
};

/// Which product [`segment_products`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `y[seg] = x[seg] · w[e]ᵀ`: `x` `(n, K)`, `w[e]` `(N, K)` -> `(n, N)`.
    Forward,
    /// `dx[seg] = dy[seg] · w[e]`: `dy` `(n, N)`, `w[e]` `(N, K)` -> `(n, K)`.
    InputGrad,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("grouped matmul: {what} must be a contiguous f32 tensor"),
    }
}

/// `y[seg_e] = a[seg_e] · w_eᵀ` (`Forward`) or `a[seg_e] · w_e` (`InputGrad`) for row-major
/// `(nw, kw)` expert weights `ws[e]`; `a` is `(rows, inner)` row-major.
fn segment_products(
    a: &[f32],
    offs: &[usize],
    mode: Mode,
    nw: usize,
    kw: usize,
    ws: &[&[f32]],
) -> Result<(Vec<f32>, usize)> {
    let rows = offs.last().copied().unwrap_or(0);
    let (inner, out_cols) = match mode {
        Mode::Forward => (kw, nw),
        Mode::InputGrad => (nw, kw),
    };
    if a.len() != rows * inner {
        bail!(
            "grouped matmul: lhs has {} values, expected {rows} rows of {inner}",
            a.len()
        )
    }
    if ws.len() + 1 != offs.len() || ws.iter().any(|w| w.len() != nw * kw) {
        bail!(
            "grouped matmul: expected {} weights of {nw}x{kw}",
            offs.len().saturating_sub(1)
        )
    }
    let mut out = vec![0f32; rows * out_cols];
    let tasks = segment_tasks(offs);
    let mut slices = Vec::with_capacity(tasks.len());
    let mut rest: &mut [f32] = &mut out;
    for t in &tasks {
        let (h, r) = rest.split_at_mut(t.2 * out_cols);
        slices.push(h);
        rest = r;
    }
    par_each(
        tasks.iter().copied().zip(slices).collect(),
        |_, ((ex, start, len), c)| {
            let a_seg = &a[start * inner..(start + len) * inner];
            let w = ws[ex];
            match mode {
                // w[e] is (N, K): bᵀ[p, j] = w[j, p] -> b_rs = 1, b_cs = K; computed
                // column-major so the weights are read in place, then transposed.
                Mode::Forward => with_scratch(|[ct, ..]| {
                    ct.resize(len * out_cols, 0.0);
                    let ct = &mut ct[..len * out_cols];
                    gemm_strided(
                        ct,
                        Out::ColMajor,
                        a_seg,
                        inner,
                        1,
                        w,
                        1,
                        kw,
                        len,
                        out_cols,
                        inner,
                    )?;
                    transpose_into(ct, out_cols, len, c)
                }),
                // w[e] as (N, K) row-major: b[p, j] = w[p, j] -> b_rs = K, b_cs = 1.
                Mode::InputGrad => gemm_strided(
                    c,
                    Out::RowMajor,
                    a_seg,
                    inner,
                    1,
                    w,
                    kw,
                    1,
                    len,
                    out_cols,
                    inner,
                ),
            }
        },
    )?;
    Ok((out, out_cols))
}

/// `dw_e = dy[seg_e]ᵀ · x[seg_e]` `(nn, kk)` into `outs[e]` (left as is for empty segments).
fn weight_grads_into(
    dy: &[f32],
    x: &[f32],
    nn: usize,
    kk: usize,
    offs: &[usize],
    outs: Vec<&mut [f32]>,
) -> Result<()> {
    let rows = offs.last().copied().unwrap_or(0);
    if dy.len() != rows * nn || x.len() != rows * kk || outs.len() + 1 != offs.len() {
        bail!(
            "grouped matmul: weight grad with {} / {} values vs plan {rows} rows",
            dy.len(),
            x.len()
        )
    }
    par_each(outs, |ex, c| {
        let (s, t) = (offs[ex], offs[ex + 1]);
        if t == s {
            return Ok(());
        }
        let dy = &dy[s * nn..t * nn];
        let x = &x[s * kk..t * kk];
        // dyᵀ[i, p] = dy[p, i] -> a_rs = 1, a_cs = N; x[p, j] -> b_rs = K, b_cs = 1.
        gemm_strided(c, Out::RowMajor, dy, 1, nn, x, kk, 1, nn, kk, t - s)
    })
}

/// Weight gradients handed from an [`ExpertMatmul`]'s backward pass to the [`GradTap`]s of its
/// weights (which run after it: they are its inputs).
type Stash = Arc<Mutex<Option<Vec<Tensor>>>>;

/// The grouped product over per-expert weight tensors read in place (no concatenated copy);
/// arg1 is `x`, arg2 the scalar end of the weights' tap chain (which carries their gradients).
struct ExpertMatmul {
    weights: Arc<Vec<Tensor>>,
    offsets: Arc<Vec<usize>>,
    stash: Stash,
    n: usize,
    k: usize,
}

impl CustomOp2 for ExpertMatmul {
    fn name(&self) -> &'static str {
        "expert-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "lhs")?;
        let rows = self.offsets.last().copied().unwrap_or(0);
        let (out, cols) = with_slices(&self.weights, |ws| {
            segment_products(a, &self.offsets, Mode::Forward, self.n, self.k, ws)
        })?;
        Ok((CpuStorage::F32(out), Shape::from((rows, cols))))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let x = arg1.contiguous()?;
        let (dy_s, x_s) = (dy.storage_and_layout(), x.storage_and_layout());
        let (dy_v, x_v) = match ((&*dy_s.0, dy_s.1), (&*x_s.0, x_s.1)) {
            (
                (candle_core::Storage::Cpu(CpuStorage::F32(d)), ld),
                (candle_core::Storage::Cpu(CpuStorage::F32(xv)), lx),
            ) => match (ld.contiguous_offsets(), lx.contiguous_offsets()) {
                (Some((a, b)), Some((c, e))) => (&d[a..b], &xv[c..e]),
                _ => bail!("expert matmul: non-contiguous gradient"),
            },
            _ => bail!("expert matmul: gradients must be f32 on CPU"),
        };
        let rows = self.offsets.last().copied().unwrap_or(0);
        let (dx, _) = with_slices(&self.weights, |ws| {
            segment_products(dy_v, &self.offsets, Mode::InputGrad, self.n, self.k, ws)
        })?;
        // Weight gradients only when some weight needs one (frozen experts: the tap chain
        // does not track).
        if arg2.track_op() {
            let mut dws: Vec<Vec<f32>> = (0..self.weights.len())
                .map(|_| vec![0f32; self.n * self.k])
                .collect();
            weight_grads_into(
                dy_v,
                x_v,
                self.n,
                self.k,
                &self.offsets,
                dws.iter_mut().map(|v| v.as_mut_slice()).collect(),
            )?;
            let dws = dws
                .into_iter()
                .map(|v| Tensor::from_vec(v, (self.n, self.k), arg1.device()))
                .collect::<Result<Vec<_>>>()?;
            *crate::ops::lock(&self.stash) = Some(dws);
        }
        let dx = Tensor::from_vec(dx, (rows, self.k), arg1.device())?;
        Ok((Some(dx), Some(arg2.zeros_like()?)))
    }
}

/// A scalar zero that depends on one weight (and the previous tap): the weight's gradient
/// enters candle's graph here, from the stash its [`ExpertMatmul`] filled. One accumulation per
/// weight, where concatenating the weights would cost a copy forward and two accumulations.
struct GradTap {
    stash: Stash,
    index: usize,
}

impl GradTap {
    fn grad(&self) -> Result<Tensor> {
        match crate::ops::lock(&self.stash)
            .as_ref()
            .and_then(|v| v.get(self.index))
        {
            Some(g) => Ok(g.clone()),
            None => bail!("expert matmul: weight gradient {} missing", self.index),
        }
    }
}

fn scalar_zero() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(()))
}

impl CustomOp1 for GradTap {
    fn name(&self) -> &'static str {
        "grad-tap"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(scalar_zero())
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad()?))
    }
}

impl CustomOp2 for GradTap {
    fn name(&self) -> &'static str {
        "grad-tap"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(scalar_zero())
    }

    fn bwd(
        &self,
        _prev: &Tensor,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(self.grad()?)))
    }
}

/// `y[seg_e] = x[seg_e] · ws[e]ᵀ` over separate per-expert weights `ws[e]` `(N, K)` (f32, CPU),
/// with gradients for `x` and for every weight. The weights are read where they live (no
/// stacked copy per call), and each weight's gradient reaches it through a small tap op, so
/// candle accumulates it once (see the module docs).
///
/// # Shapes
/// - `x`: `(n, K)` rows sorted by expert; `ws`: `E` tensors `(N, K)`; `offsets`: `E + 1`
///   -> `(n, N)`
pub fn expert_matmul(x: &Tensor, ws: &[&Tensor], offsets: &[usize]) -> Result<Tensor> {
    let Some(first) = ws.first() else {
        bail!("expert matmul: no expert weights")
    };
    if offsets.len() != ws.len() + 1 {
        bail!(
            "expert matmul: {} offsets for {} experts",
            offsets.len(),
            ws.len()
        )
    }
    let (n, k) = first.dims2()?;
    if ws.iter().any(|w| w.dims() != [n, k]) {
        bail!("expert matmul: every expert weight must be ({n}, {k})")
    }
    let stash: Stash = Arc::new(Mutex::new(None));
    let tap = |i: usize| GradTap {
        stash: stash.clone(),
        index: i,
    };
    let mut chain = ws[0].apply_op1(tap(0))?;
    for (i, w) in ws.iter().enumerate().skip(1) {
        chain = chain.apply_op2(w, tap(i))?;
    }
    let weights = ws
        .iter()
        .map(|w| w.contiguous())
        .collect::<Result<Vec<_>>>()?;
    x.contiguous()?.apply_op2(
        &chain,
        ExpertMatmul {
            weights: Arc::new(weights),
            offsets: Arc::new(offsets.to_vec()),
            stash,
            n,
            k,
        },
    )
}
