//! The classic mixture of experts (Jordan & Jacobs 1994, "Hierarchical mixtures of experts and
//! the EM algorithm", Neural Computation 6:181–214): softmax-gated experts of any kind, trained
//! by expectation-maximisation; hierarchical MoE; and mixture density networks (Bishop 1994).
//!
//! The model (Jordan & Jacobs 1994, eqs. 1–4) is the conditional mixture
//!
//! ```text
//! P(y | x) = Σ_k g_k(x) · P_k(y | x),     g(x) = softmax([x, 1] · V)
//! ```
//!
//! with prediction `ŷ(x) = Σ_k g_k(x) · μ_k(x)`. EM alternates
//! - **E-step** (eq. 20): posterior responsibilities `h_nk = g_k(x_n) P_k(y_n|x_n) / P(y_n|x_n)`;
//! - **M-step** (eqs. 21–22): each expert maximises `Σ_n h_nk log P_k(y_n|x_n)` (closed-form
//!   weighted least squares for [`LinearGaussianExpert`], IRLS for [`SoftmaxExpert`], a few
//!   weighted gradient steps for [`NeuralExpert`]) and the gate maximises
//!   `Σ_n Σ_k h_nk log g_k(x_n)` (Newton / IRLS steps with a line search).
//!
//! Every M-step here is *guarded*: it never decreases its own objective, so the procedure is a
//! generalised EM and the observed log-likelihood `Σ_n log P(y_n | x_n)` never decreases
//! (Dempster, Laird & Rubin 1977). EM runs in `f64` on the CPU.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_moe::classic::{EmConfig, LinearGaussianExpert, MixtureOfExperts, SoftmaxGate};
//! use rand::{rngs::StdRng, SeedableRng};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // y = |x|: two linear regimes.
//! let x: Vec<f64> = (0..200).map(|i| i as f64 / 100.0 - 1.0).collect();
//! let y: Vec<f64> = x.iter().map(|v| v.abs()).collect();
//! let xs = Tensor::from_vec(x, (200, 1), &dev)?;
//! let ys = Tensor::from_vec(y, (200, 1), &dev)?;
//! let experts = (0..2)
//!     .map(|_| LinearGaussianExpert::new(1, 1, &dev))
//!     .collect::<candle_core::Result<Vec<_>>>()?;
//! let mut moe = MixtureOfExperts::new(SoftmaxGate::new(1, 2, &dev)?, experts)?;
//! moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(0))?;
//! let report = moe.fit_em(&xs, &ys, &EmConfig::default())?;
//! // The log-likelihood never decreases.
//! assert!(report.log_likelihood.windows(2).all(|w| w[1] >= w[0] - 1e-9 * w[0].abs()));
//! let pred = moe.predict(&xs)?; // (200, 1)
//! assert_eq!(pred.dims(), &[200, 1]);
//! # Ok(())
//! # }
//! ```

mod em;
mod expert;
mod gate;
mod hierarchical;
mod linalg;
mod mdn;
mod mixture;
mod neural;
pub mod series;

pub use em::{fit_em_restarts, EmModel, Restarts};
pub use expert::{Expert, LinearGaussianExpert, SoftmaxExpert};
pub use gate::SoftmaxGate;
pub use hierarchical::{HierarchicalMoe, HmeNode};
pub use mdn::{MdnHead, MdnOutput};
pub use mixture::{EmConfig, EmReport, GradientConfig, GradientReport, MixtureOfExperts};
pub use neural::{GruWindow, NeuralExpert, NeuralExpertConfig};

use candle_core::{bail, DType, IndexOp, Result, Tensor, D};

/// `ln(2π)`.
pub(crate) const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// Appends a column of ones: `(n, d)` → `(n, d + 1)`.
pub(crate) fn append_bias(xs: &Tensor) -> Result<Tensor> {
    let n = xs.dim(0)?;
    let ones = Tensor::ones((n, 1), xs.dtype(), xs.device())?; // (n, 1)
    Tensor::cat(&[xs, &ones], 1) // (n, d + 1)
}

/// Differentiable `log Σ exp` over the last dimension, removing it.
pub(crate) fn logsumexp_last(xs: &Tensor) -> Result<Tensor> {
    crate::ops::logsumexp_keepdim(xs)?.squeeze(D::Minus1)
}

/// Regression targets `(n, out_dim)` (a `(n,)` vector when `out_dim` is 1) as f64; `who`
/// names the expert in the error.
pub(crate) fn gaussian_targets(
    who: &str,
    xs: &Tensor,
    ys: &Tensor,
    out_dim: usize,
) -> Result<Tensor> {
    let ys = if ys.rank() == 1 && out_dim == 1 {
        ys.unsqueeze(1)?
    } else {
        ys.clone()
    };
    if ys.dims() != [xs.dim(0)?, out_dim] {
        bail!(
            "{who}: targets must be ({}, {out_dim}), got {:?}",
            xs.dim(0)?,
            ys.shape()
        )
    }
    ys.to_dtype(DType::F64)
}

/// `log N(y_n | μ_n, diag σ²)` per example, with `log σ²` of shape `(out,)`.
///
/// # Shapes
/// - `mu`, `ys`: `(n, out)`; `log_var`: `(out,)` → `(n,)`
pub(crate) fn gaussian_log_density(mu: &Tensor, ys: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    let lv = log_var.unsqueeze(0)?; // (1, out)
    let quad = (ys - mu)?.sqr()?.broadcast_div(&lv.exp()?)?; // (n, out)
    ((quad.broadcast_add(&lv)? + LN_2PI)? * -0.5)?.sum(D::Minus1) // (n,)
}

/// `Σ_c g[:, c] · pred_c`: the gate-weighted sum of the `(n, out)` predictions, summed in order;
/// `empty` is the error without any prediction.
///
/// # Shapes
/// - `g`: `(n, C)`; every prediction `(n, out)` f64 → `(n, out)`
pub(crate) fn gated_sum(
    g: &Tensor,
    preds: impl IntoIterator<Item = Result<Tensor>>,
    empty: &str,
) -> Result<Tensor> {
    let mut out: Option<Tensor> = None;
    for (c, pred) in preds.into_iter().enumerate() {
        let term = pred?.broadcast_mul(&g.i((.., c..c + 1))?)?; // (n, out)
        out = Some(match out {
            None => term,
            Some(o) => (o + term)?,
        });
    }
    match out {
        Some(o) => Ok(o),
        None => bail!("{empty}"),
    }
}

/// All values of a tensor, row-major, as `f64` on the host.
pub(crate) fn tensor_to_host(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Checks that `weights` is `(n,)` (or `(n, 1)`) and returns it as host `f64` values.
pub(crate) fn weights_to_host(weights: &Tensor, n: usize) -> Result<Vec<f64>> {
    if weights.elem_count() != n || weights.rank() > 2 {
        bail!(
            "expert M-step: weights must be ({n},), got {:?}",
            weights.shape()
        )
    }
    let w = tensor_to_host(weights)?;
    if w.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
        bail!("expert M-step: weights must be finite and non-negative")
    }
    Ok(w)
}
