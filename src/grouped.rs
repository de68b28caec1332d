//! Grouped matrix multiplication over expert segments, with a backward pass (the training-path
//! counterpart of [`crate::kernels`]; MegaBlocks' grouped GEMM, Gale et al. 2023, on CPU).
//!
//! For tokens sorted by expert (`x` rows `offsets[e]..offsets[e + 1]` belong to expert `e`) and
//! stacked expert weights `w` `(E, N, K)`, `y[seg_e] = x[seg_e] · w[e]ᵀ`. All segments run in
//! parallel on rayon's pool with single-threaded GEMMs, instead of `3·E` small multi-threaded
//! matmuls one after another. The backward pass is the same kind of op:
//! `dx[seg_e] = dy[seg_e] · w[e]` and `dw[e] = dy[seg_e]ᵀ · x[seg_e]`.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `c (m × n) = a · b` where `a[i, p] = a_buf[i·a_rs + p·a_cs]`, `b[p, j] = b_buf[p·b_rs + j·b_cs]`,
/// `c` row-major; bounds are checked before the single-threaded GEMM runs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    c: &mut [f32],
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = 0.0);
        return Ok(());
    }
    let a_last = (m - 1) * a_rs + (k - 1) * a_cs;
    let b_last = (k - 1) * b_rs + (n - 1) * b_cs;
    if c.len() < m * n || a_last >= a.len() || b_last >= b.len() {
        bail!("grouped gemm: buffers too small for {m}x{k}x{n}")
    }
    // SAFETY: every index the GEMM reads or writes is bounded by the checks above:
    // a[i·a_rs + p·a_cs] ≤ a_last, b[p·b_rs + j·b_cs] ≤ b_last, c[i·n + j] < m·n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0f32,
            1f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// Which product the op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `y[seg] = x[seg] · w[e]ᵀ`: arg1 `(n, K)`, arg2 `(E, N, K)` -> `(n, N)`.
    Forward,
    /// `dx[seg] = dy[seg] · w[e]`: arg1 `(n, N)`, arg2 `(E, N, K)` -> `(n, K)`.
    InputGrad,
    /// `dw[e] = dy[seg]ᵀ · x[seg]`: arg1 `(n, N)`, arg2 `(n, K)` -> `(E, N, K)`.
    WeightGrad,
}

/// The grouped matmul as a candle op.
#[derive(Debug, Clone)]
pub struct GroupedMatmul {
    offsets: Arc<Vec<usize>>,
    mode: Mode,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("grouped matmul: {what} must be a contiguous f32 tensor"),
    }
}

const CHUNK: usize = 96;

impl CustomOp2 for GroupedMatmul {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "lhs")?;
        let b = f32_slice(s2, l2, "rhs")?;
        let offs = &self.offsets;
        let e_count = offs.len() - 1;
        let rows = offs[e_count];
        match self.mode {
            Mode::Forward | Mode::InputGrad => {
                let (n_rows, a_cols) = l1.shape().dims2()?;
                let (e, nw, kw) = l2.shape().dims3()?;
                if n_rows != rows || e != e_count {
                    bail!("grouped matmul: {n_rows} rows / {e} experts vs plan {rows} / {e_count}")
                }
                let (inner, out_cols) = match self.mode {
                    Mode::Forward => (kw, nw),
                    _ => (nw, kw),
                };
                if a_cols != inner {
                    bail!("grouped matmul: lhs has {a_cols} columns, expected {inner}")
                }
                let mut out = vec![0f32; rows * out_cols];
                let mut tasks = vec![];
                for ex in 0..e_count {
                    let mut at = offs[ex];
                    while at < offs[ex + 1] {
                        let len = (offs[ex + 1] - at).min(CHUNK);
                        tasks.push((ex, at, len));
                        at += len;
                    }
                }
                let mut slices = Vec::with_capacity(tasks.len());
                let mut rest: &mut [f32] = &mut out;
                for t in &tasks {
                    let (h, r) = rest.split_at_mut(t.2 * out_cols);
                    slices.push(h);
                    rest = r;
                }
                tasks.par_iter().zip(slices.into_par_iter()).try_for_each(
                    |(&(ex, start, len), c)| {
                        let a_seg = &a[start * inner..(start + len) * inner];
                        let w = &b[ex * nw * kw..(ex + 1) * nw * kw];
                        match self.mode {
                            // w[e] is (N, K): bᵀ[p, j] = w[j, p] -> b_rs = 1, b_cs = K.
                            Mode::Forward => {
                                gemm_strided(c, a_seg, inner, 1, w, 1, kw, len, out_cols, inner)
                            }
                            // w[e] as (N, K) row-major: b[p, j] = w[p, j] -> b_rs = K, b_cs = 1.
                            _ => gemm_strided(c, a_seg, inner, 1, w, kw, 1, len, out_cols, inner),
                        }
                    },
                )?;
                Ok((CpuStorage::F32(out), Shape::from((rows, out_cols))))
            }
            Mode::WeightGrad => {
                let (n1, nn) = l1.shape().dims2()?;
                let (n2, kk) = l2.shape().dims2()?;
                if n1 != rows || n2 != rows {
                    bail!("grouped matmul: weight grad with {n1}/{n2} rows vs plan {rows}")
                }
                let mut out = vec![0f32; e_count * nn * kk];
                out.par_chunks_mut((nn * kk).max(1))
                    .enumerate()
                    .try_for_each(|(ex, c)| {
                        let (s, t) = (offs[ex], offs[ex + 1]);
                        if t == s {
                            return Ok(());
                        }
                        let dy = &a[s * nn..t * nn];
                        let x = &b[s * kk..t * kk];
                        // dyᵀ[i, p] = dy[p, i] -> a_rs = 1, a_cs = N; x[p, j] -> b_rs = K, b_cs = 1.
                        gemm_strided(c, dy, 1, nn, x, kk, 1, nn, kk, t - s)
                    })?;
                Ok((CpuStorage::F32(out), Shape::from((e_count, nn, kk))))
            }
        }
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.mode != Mode::Forward {
            bail!("grouped matmul: only the forward product has a backward pass")
        }
        let dy = grad.contiguous()?;
        let op = |mode| GroupedMatmul {
            offsets: self.offsets.clone(),
            mode,
        };
        let dx = dy.apply_op2_no_bwd(arg2, &op(Mode::InputGrad))?;
        let dw = dy.apply_op2_no_bwd(arg1, &op(Mode::WeightGrad))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `y[seg_e] = x[seg_e] · w[e]ᵀ` with gradients for `x` and `w`.
///
/// # Shapes
/// - `x`: `(n, K)` f32 CPU, rows sorted by expert; `w`: `(E, N, K)`; `offsets`: `E + 1` -> `(n, N)`
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        GroupedMatmul {
            offsets: Arc::new(offsets.to_vec()),
            mode: Mode::Forward,
        },
    )
}
