//! The CPU compute helpers the fast expert paths and attention share: candle's worker pool
//! ([`par_each`]), per-thread scratch buffers, a bounds-checked strided single-threaded GEMM
//! (the `gemm` crate, which candle's CPU matmul also uses) and a tiled transpose.

use std::sync::Mutex;

use candle_core::{bail, Result};

use crate::ops::lock;

/// How a GEMM output `c (m × n)` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    /// `c[i, j] = c_buf[i·n + j]`.
    RowMajor,
    /// `c[i, j] = c_buf[i + j·m]` (`cᵀ` row-major). The GEMM then keeps its own orientation: the
    /// rows of `a` (tokens) run down the micro-kernel and `b` is read in place when `b_rs == 1`
    /// (an `(n, k)` row-major weight used as `bᵀ`), so expert weights are never repacked.
    ColMajor,
}

/// `c (m × n) = a · b` where `a[i, p] = a_buf[i·a_rs + p·a_cs]`, `b[p, j] = b_buf[p·b_rs + j·b_cs]`,
/// `c` stored as `out` says; bounds are checked before the single-threaded GEMM runs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    c: &mut [f32],
    out: Out,
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
    let (c_rs, c_cs) = match out {
        Out::RowMajor => (n, 1),
        Out::ColMajor => (1, m),
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    let c_last = (m - 1) * c_rs + (n - 1) * c_cs;
    if c_last >= c.len() {
        bail!("grouped gemm: output buffer too small for {m}x{n}")
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = 0.0);
        return Ok(());
    }
    let a_last = (m - 1) * a_rs + (k - 1) * a_cs;
    let b_last = (k - 1) * b_rs + (n - 1) * b_cs;
    if a_last >= a.len() || b_last >= b.len() {
        bail!("grouped gemm: buffers too small for {m}x{k}x{n}")
    }
    // SAFETY: every index the GEMM reads or writes is bounded by the checks above:
    // a[i·a_rs + p·a_cs] ≤ a_last, b[p·b_rs + j·b_cs] ≤ b_last, c[i·c_rs + j·c_cs] ≤ c_last.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
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

/// `dst (cols × rows)` = `srcᵀ` for `src` `(rows × cols)`, both row-major, in cache-sized tiles.
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) -> Result<()> {
    if src.len() < rows * cols || dst.len() < rows * cols {
        bail!("transpose: buffers too small for {rows}x{cols}")
    }
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &src[r * cols..(r + 1) * cols];
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = row[c];
                }
            }
        }
    }
    Ok(())
}

/// Runs `f(i, parts[i])` for every part on candle's CPU worker pool, the pool candle's own
/// element-wise ops run on (a second pool would leave candle's workers spinning for cores while
/// ours compute); parts are handed out one at a time, so uneven parts balance. Returns the first
/// error.
pub(crate) fn par_each<T: Send>(
    parts: Vec<T>,
    f: impl Fn(usize, T) -> Result<()> + Sync,
) -> Result<()> {
    let n = parts.len();
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let first_err: Mutex<Option<candle_core::Error>> = Mutex::new(None);
    let run = |i: usize| {
        let part = lock(&slots[i]).take();
        if let Some(part) = part {
            if let Err(e) = f(i, part) {
                lock(&first_err).get_or_insert(e);
            }
        }
    };
    if n <= 1 {
        (0..n).for_each(run);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(run));
    }
    let err = match first_err.into_inner() {
        Ok(e) => e,
        Err(p) => p.into_inner(),
    };
    err.map_or(Ok(()), Err)
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 4]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()])
    };
}

/// Runs `f` with four scratch buffers owned by the current thread (their contents are
/// unspecified; they keep their capacity between calls, so the per-task temporaries of the
/// expert GEMMs are not freshly mapped and page-faulted on every forward). A nested call on
/// the same thread gets fresh buffers.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [Vec<f32>; 4]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut bufs) => f(&mut bufs),
        Err(_) => f(&mut [Vec::new(), Vec::new(), Vec::new(), Vec::new()]),
    })
}

/// Cuts expert segments into `(expert, start, len)` tasks for the worker pool. Every GEMM call
/// streams (and packs) its expert's whole weight matrix, so a segment stays in one task unless it
/// holds more than a core's fair share of the rows; then it is cut into equal parts, so that a hot
/// expert still spreads over the cores.
pub(crate) fn segment_tasks(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let total = offsets.last().copied().unwrap_or(0);
    let max_rows = total
        .div_ceil(candle_core::utils::get_num_threads().max(1))
        .max(64);
    let mut tasks = vec![];
    for (e, w) in offsets.windows(2).enumerate() {
        let len = w[1].saturating_sub(w[0]);
        if len == 0 {
            continue;
        }
        let parts = len.div_ceil(max_rows);
        let mut at = w[0];
        for p in 0..parts {
            let rows = len / parts + usize::from(p < len % parts);
            tasks.push((e, at, rows));
            at += rows;
        }
    }
    tasks
}

/// Runs `f` on the f32 data of `ts` read in place (each must be a contiguous f32 CPU tensor).
pub(crate) fn with_f32_slices<R>(
    ts: &[candle_core::Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    with_weight_slices(ts, |ws| {
        let mut slices = Vec::with_capacity(ws.len());
        for w in ws {
            match *w {
                WeightSlice::F32(v) => slices.push(v),
                WeightSlice::Bf16(_) => bail!("expert weights must be contiguous f32 CPU tensors"),
            }
        }
        f(&slices)
    })
}

/// Expert weights read in place: f32, or bf16 to convert before use.
#[derive(Clone, Copy)]
pub(crate) enum WeightSlice<'a> {
    /// f32, used as is.
    F32(&'a [f32]),
    /// bf16, converted into a buffer by [`WeightSlice::as_f32`].
    Bf16(&'a [half::bf16]),
}

impl<'a> WeightSlice<'a> {
    /// The weights as f32: in place, or converted into `buf` (which is overwritten).
    pub(crate) fn as_f32<'b>(&self, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            WeightSlice::F32(v) => v,
            WeightSlice::Bf16(v) => {
                buf.clear();
                buf.extend(v.iter().map(|x| x.to_f32()));
                buf
            }
        }
    }
}

/// Runs `f` on the data of `ts` read in place (each a contiguous f32 or bf16 CPU tensor).
pub(crate) fn with_weight_slices<R>(
    ts: &[candle_core::Tensor],
    f: impl FnOnce(&[WeightSlice<'_>]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (st, l) in &guards {
        match (&**st, l.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
                slices.push(WeightSlice::F32(&v[a..b]))
            }
            (candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)), Some((a, b))) => {
                slices.push(WeightSlice::Bf16(&v[a..b]))
            }
            _ => bail!("expert weights must be contiguous f32 or bf16 CPU tensors"),
        }
    }
    f(&slices)
}

thread_local! {
    static WEIGHT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with the current thread's buffer for one converted weight matrix (kept between
/// calls, like [`with_scratch`]'s; a nested call gets a fresh one).
pub(crate) fn with_weight_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    WEIGHT_SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}
