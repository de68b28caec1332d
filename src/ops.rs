//! Small differentiable tensor ops and helpers every layer shares.
//!
//! - [`softmax_last_dim`], [`logsumexp_keepdim`], [`softplus`]: built from primitive ops so they
//!   have a backward pass (`candle_nn::ops::softmax_last_dim` has none); the max shift is
//!   detached (it cancels).
//! - [`compute_dtype`]: the dtype router and loss math run in (f32, or f64 for f64 models).
//! - [`normal`]: one seeded standard-normal draw (Box–Muller), so the crate needs no
//!   `rand_distr`.
//! - `lock` (crate-internal): a poison-tolerant `Mutex` lock (a panic elsewhere must not turn every later
//!   forward into an error).

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Result, Tensor, D};
use rand::Rng;

/// Differentiable softmax over the last dimension.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let p = candle_moe::ops::softmax_last_dim(&Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?)?;
/// assert_eq!(p.to_vec2::<f32>()?, [[0.5, 0.5]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Differentiable `log Σ exp` over the last dimension, keeping it (size 1).
pub fn logsumexp_keepdim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    xs.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

/// Differentiable `log softmax` over the last dimension.
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_sub(&logsumexp_keepdim(xs)?)
}

/// Numerically stable `softplus(x) = log(1 + e^x) = relu(x) + log(1 + e^{-|x|})`, differentiable.
pub fn softplus(xs: &Tensor) -> Result<Tensor> {
    let relu = xs.relu()?;
    let tail = (xs.abs()?.neg()?.exp()? + 1.0)?.log()?;
    relu + tail
}

/// The dtype router and loss math run in: f32, or f64 for f64 models (never half precision).
pub fn compute_dtype(model: DType) -> DType {
    if model == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One standard normal draw (Box–Muller) from `rng`.
pub fn normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The variables of `varmap` sorted by name (handles sharing the variables, not copies): the
/// deterministic order seeded initialisation, optimizers and loaders walk them in.
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<(String, candle_core::Var)> = lock(varmap.data())
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Locks `m`, recovering the data of a poisoned lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A seed for one random stream of a run: `seed` mixed with the stream's coordinates (e.g.
/// part, layer) by SplitMix64 (Steele et al. 2014), so that streams are independent and a
/// function of `(seed, coordinates)` alone.
pub fn stream_seed(seed: u64, coords: &[u64]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    coords.iter().fold(mix(seed), |h, &c| mix(h ^ mix(c)))
}

thread_local! {
    static HOST_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many device-to-host reads (tensor data copied to host memory: a transfer and a
/// synchronisation on a GPU) the crate's forward passes, losses and training steps have made on
/// the calling thread so far. Take the difference around a call to count its reads, e.g. one per
/// sparse layer forward and one for the gradient norm of a training step.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_moe::{MoeConfig, SparseMoe};
/// use candle_nn::{VarBuilder, VarMap};
/// let cfg = MoeConfig { hidden_size: 8, intermediate_size: 16, num_experts: 4, top_k: 2, ..Default::default() };
/// let vm = VarMap::new();
/// let moe = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let xs = Tensor::ones((5, 8), DType::F32, &Device::Cpu)?;
/// let before = candle_moe::ops::host_reads();
/// moe.forward_t(&xs, true)?;
/// assert_eq!(candle_moe::ops::host_reads() - before, 1); // the expert ids (and statistics)
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn host_reads() -> usize {
    HOST_READS.with(|c| c.get())
}

/// Device-to-host reads that count in [`host_reads`].
pub(crate) trait HostRead {
    /// `to_vec1`, counted.
    fn host_vec1<T: candle_core::WithDType>(&self) -> Result<Vec<T>>;
    /// `to_scalar`, counted.
    fn host_scalar<T: candle_core::WithDType>(&self) -> Result<T>;
}

impl HostRead for Tensor {
    fn host_vec1<T: candle_core::WithDType>(&self) -> Result<Vec<T>> {
        HOST_READS.with(|c| c.set(c.get() + 1));
        self.to_vec1::<T>()
    }
    fn host_scalar<T: candle_core::WithDType>(&self) -> Result<T> {
        HOST_READS.with(|c| c.set(c.get() + 1));
        self.to_scalar::<T>()
    }
}
