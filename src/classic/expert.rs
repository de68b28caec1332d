//! Experts of the classic mixture of experts and their EM M-steps (Jordan & Jacobs 1994, §4).
//!
//! - [`LinearGaussianExpert`]: `y ~ N([x, 1] U, diag σ²)` (eq. 5 with a learned variance); its
//!   M-step (eq. 21) is closed-form weighted least squares `U = (XᵀHX)⁻¹ XᵀHY` followed by the
//!   weighted mean squared residual for `σ²` (floored).
//! - [`SoftmaxExpert`]: `P(y = c | x) = softmax([x, 1] U)_c` for classification (§4, "multinomial
//!   experts"); its M-step is IRLS on the responsibility-weighted cross-entropy.
//!
//! Any other model becomes an expert by implementing [`Expert`] (see
//! [`NeuralExpert`](super::NeuralExpert) for any `candle_nn::Module`).

use candle_core::{bail, DType, Device, Result, Tensor, Var, D};

use super::linalg::{multinomial_ascent, solve_spd};
use super::{
    append_bias, gaussian_log_density, gaussian_targets, tensor_to_host, weights_to_host, LN_2PI,
};
use crate::ops::log_softmax_last_dim;

/// An expert of a classic mixture of experts: a conditional density `P_k(y | x)` with a mean
/// prediction and a weighted maximum-likelihood M-step.
///
/// Implementors must make [`Expert::m_step`] never decrease `Σ_n w_n log P(y_n | x_n)` (a
/// generalised M-step); then EM on the mixture never decreases the log-likelihood.
pub trait Expert {
    /// The expert's prediction: the conditional mean for regression, class probabilities for
    /// classification.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, out_dim)`
    fn predict(&self, xs: &Tensor) -> Result<Tensor>;

    /// Per-example log-likelihood `log P(y_n | x_n)` as f64, differentiable with respect to
    /// [`Expert::vars`].
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`, `ys`: `(n, out_dim)` (regression) or `(n,)` class ids / `(n, C)`
    ///   one-hot (classification) → `(n,)`
    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor>;

    /// The M-step: refit on the examples weighted by `weights` (the posterior responsibilities),
    /// without decreasing `Σ_n w_n log P(y_n | x_n)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`, `ys` as in [`Expert::log_likelihood`], `weights`: `(n,)`
    fn m_step(&mut self, xs: &Tensor, ys: &Tensor, weights: &Tensor) -> Result<()>;

    /// The trainable variables, for plain gradient training of the whole mixture.
    fn vars(&self) -> Vec<Var>;

    /// Predictive variance of a regression expert (`None` for classification experts).
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, out_dim)`
    fn predictive_variance(&self, _xs: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

impl<E: Expert + ?Sized> Expert for Box<E> {
    fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        (**self).predict(xs)
    }
    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        (**self).log_likelihood(xs, ys)
    }
    fn m_step(&mut self, xs: &Tensor, ys: &Tensor, weights: &Tensor) -> Result<()> {
        (**self).m_step(xs, ys, weights)
    }
    fn vars(&self) -> Vec<Var> {
        (**self).vars()
    }
    fn predictive_variance(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        (**self).predictive_variance(xs)
    }
}

/// A linear-Gaussian regression expert `y ~ N([x, 1] U, diag σ²)` with closed-form weighted
/// least-squares M-step (Jordan & Jacobs 1994, eq. 21).
#[derive(Debug)]
pub struct LinearGaussianExpert {
    /// `(in_dim + 1, out_dim)`, last row = bias.
    weight: Var,
    /// `(out_dim,)`, `log σ²` per output.
    log_var: Var,
    in_dim: usize,
    out_dim: usize,
    min_variance: f64,
    ridge: f64,
}

impl LinearGaussianExpert {
    /// Zero weights and unit variance, f64 on `device`; variance floor `1e-6`, ridge `1e-8`.
    pub fn new(in_dim: usize, out_dim: usize, device: &Device) -> Result<Self> {
        if out_dim == 0 {
            bail!("LinearGaussianExpert: out_dim must be at least 1")
        }
        Ok(Self {
            weight: Var::zeros((in_dim + 1, out_dim), DType::F64, device)?,
            log_var: Var::zeros(out_dim, DType::F64, device)?,
            in_dim,
            out_dim,
            min_variance: 1e-6,
            ridge: 1e-8,
        })
    }

    /// An expert with the given weight `(in_dim + 1, out_dim)` (last row = bias) and variances
    /// `(out_dim,)`.
    pub fn from_weights(weight: &Tensor, variance: &Tensor) -> Result<Self> {
        let (p, out_dim) = weight.dims2()?;
        if p == 0 || variance.dims() != [out_dim] {
            bail!(
                "LinearGaussianExpert::from_weights: weight (in_dim + 1, out) and variance (out,) expected, got {:?} and {:?}",
                weight.shape(),
                variance.shape()
            )
        }
        let var = variance.to_dtype(DType::F64)?;
        if tensor_to_host(&var)?
            .iter()
            .any(|v| !(v.is_finite() && *v > 0.0))
        {
            bail!("LinearGaussianExpert::from_weights: variances must be positive")
        }
        Ok(Self {
            weight: Var::from_tensor(&weight.to_dtype(DType::F64)?.copy()?)?,
            log_var: Var::from_tensor(&var.log()?)?,
            in_dim: p - 1,
            out_dim,
            min_variance: 1e-6,
            ridge: 1e-8,
        })
    }

    /// Sets the variance floor of the M-step (default `1e-6`; keeps the likelihood bounded).
    pub fn with_min_variance(mut self, min_variance: f64) -> Self {
        self.min_variance = min_variance.max(0.0);
        self
    }

    /// Sets the relative ridge of the weighted least squares (default `1e-8`).
    pub fn with_ridge(mut self, ridge: f64) -> Self {
        self.ridge = ridge.max(0.0);
        self
    }

    /// An independent copy (new variables, same values and settings).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&self.weight.as_tensor().copy()?)?,
            log_var: Var::from_tensor(&self.log_var.as_tensor().copy()?)?,
            ..*self
        })
    }

    /// The weight `(in_dim + 1, out_dim)`, last row = bias.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The variances `σ²`, `(out_dim,)`.
    pub fn variance(&self) -> Result<Tensor> {
        self.log_var.as_tensor().exp()
    }

    fn check(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.rank() != 2 || xs.dim(1)? != self.in_dim {
            bail!(
                "LinearGaussianExpert: inputs must be (n, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        xs.to_dtype(DType::F64)
    }

    fn check_ys(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        gaussian_targets("LinearGaussianExpert", xs, ys, self.out_dim)
    }

    /// `Σ_n w_n log N(y_n | x_n U, σ²)` on host buffers.
    fn weighted_objective(
        x: &[f64],
        y: &[f64],
        w: &[f64],
        u: &[f64],
        var: &[f64],
        p: usize,
    ) -> f64 {
        let m = var.len();
        let n = w.len();
        let mut q = 0.0;
        for i in 0..n {
            if w[i] == 0.0 {
                continue;
            }
            for c in 0..m {
                let mu: f64 = (0..p).map(|j| x[i * p + j] * u[j * m + c]).sum();
                let r = y[i * m + c] - mu;
                q += w[i] * (-0.5 * (LN_2PI + var[c].ln()) - 0.5 * r * r / var[c]);
            }
        }
        q
    }

    /// Weighted mean squared residual per output, floored.
    fn variance_update(&self, x: &[f64], y: &[f64], w: &[f64], u: &[f64], p: usize) -> Vec<f64> {
        let m = self.out_dim;
        let n = w.len();
        let sw: f64 = w.iter().sum();
        (0..m)
            .map(|c| {
                let sse: f64 = (0..n)
                    .map(|i| {
                        let mu: f64 = (0..p).map(|j| x[i * p + j] * u[j * m + c]).sum();
                        w[i] * (y[i * m + c] - mu).powi(2)
                    })
                    .sum();
                (sse / sw).max(self.min_variance)
            })
            .collect()
    }
}

impl Expert for LinearGaussianExpert {
    /// `[x, 1] U`.
    fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.check(xs)?;
        append_bias(&xs)?.matmul(self.weight.as_tensor()) // (n, out)
    }

    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        let mu = self.predict(xs)?; // (n, out)
        let ys = self.check_ys(xs, ys)?;
        gaussian_log_density(&mu, &ys, self.log_var.as_tensor()) // (n,)
    }

    fn m_step(&mut self, xs: &Tensor, ys: &Tensor, weights: &Tensor) -> Result<()> {
        let xs = self.check(xs)?;
        let ys = self.check_ys(&xs, ys)?;
        let n = xs.dim(0)?;
        let w = weights_to_host(weights, n)?;
        let sw: f64 = w.iter().sum();
        if sw.is_nan() || sw <= 1e-12 {
            return Ok(()); // no responsibility: keep the expert as it is
        }
        let p = self.in_dim + 1;
        let m = self.out_dim;
        let x = tensor_to_host(&append_bias(&xs)?)?;
        let y = tensor_to_host(&ys)?;
        let mut a = vec![0.0; p * p];
        let mut b = vec![0.0; p * m];
        for i in 0..n {
            let wi = w[i];
            if wi == 0.0 {
                continue;
            }
            let xi = &x[i * p..(i + 1) * p];
            for j in 0..p {
                let wx = wi * xi[j];
                for (jj, xjj) in xi.iter().enumerate().skip(j) {
                    a[j * p + jj] += wx * xjj;
                }
                for c in 0..m {
                    b[j * m + c] += wx * y[i * m + c];
                }
            }
        }
        for j in 0..p {
            for jj in 0..j {
                a[j * p + jj] = a[jj * p + j];
            }
        }
        let u_old = tensor_to_host(self.weight.as_tensor())?;
        let var_old: Vec<f64> = tensor_to_host(self.log_var.as_tensor())?
            .iter()
            .map(|v| v.exp())
            .collect();
        let q_old = Self::weighted_objective(&x, &y, &w, &u_old, &var_old, p);
        let u_new = solve_spd(&a, &b, p, m, self.ridge)?;
        let var_new = self.variance_update(&x, &y, &w, &u_new, p);
        let q_new = Self::weighted_objective(&x, &y, &w, &u_new, &var_new, p);
        // Guard: accept only an improvement (the ridge or rounding could, in principle, lose).
        let (u, var) = if q_new.is_finite() && q_new >= q_old {
            (u_new, var_new)
        } else {
            let var_only = self.variance_update(&x, &y, &w, &u_old, p);
            let q_var = Self::weighted_objective(&x, &y, &w, &u_old, &var_only, p);
            if q_var.is_finite() && q_var >= q_old {
                (u_old, var_only)
            } else {
                return Ok(());
            }
        };
        let dev = self.weight.device().clone();
        self.weight.set(&Tensor::from_vec(u, (p, m), &dev)?)?;
        let lv: Vec<f64> = var.iter().map(|v| v.ln()).collect();
        self.log_var.set(&Tensor::from_vec(lv, m, &dev)?)?;
        Ok(())
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.log_var.clone()]
    }

    fn predictive_variance(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let n = xs.dim(0)?;
        let v = self
            .variance()?
            .unsqueeze(0)?
            .broadcast_as((n, self.out_dim))?; // (n, out)
        Ok(Some(v.contiguous()?))
    }
}

/// A multinomial-logit classification expert `P(y = c | x) = softmax([x, 1] U)_c`, refit by IRLS
/// on the responsibility-weighted cross-entropy.
#[derive(Debug)]
pub struct SoftmaxExpert {
    /// `(in_dim + 1, n_classes)`, last row = bias.
    weight: Var,
    in_dim: usize,
    n_classes: usize,
    newton_steps: usize,
}

impl SoftmaxExpert {
    /// Zero weights (uniform class probabilities), f64 on `device`, 5 IRLS steps per M-step.
    pub fn new(in_dim: usize, n_classes: usize, device: &Device) -> Result<Self> {
        if n_classes < 2 {
            bail!("SoftmaxExpert: need at least 2 classes, got {n_classes}")
        }
        Ok(Self {
            weight: Var::zeros((in_dim + 1, n_classes), DType::F64, device)?,
            in_dim,
            n_classes,
            newton_steps: 5,
        })
    }

    /// An expert with the given weight `(in_dim + 1, n_classes)`.
    pub fn from_weight(weight: &Tensor) -> Result<Self> {
        let (p, c) = weight.dims2()?;
        if p == 0 || c < 2 {
            bail!(
                "SoftmaxExpert::from_weight: weight must be (in_dim + 1, n_classes ≥ 2), got {:?}",
                weight.shape()
            )
        }
        Ok(Self {
            weight: Var::from_tensor(&weight.to_dtype(DType::F64)?.copy()?)?,
            in_dim: p - 1,
            n_classes: c,
            newton_steps: 5,
        })
    }

    /// Sets the number of IRLS steps per M-step (default 5).
    pub fn with_newton_steps(mut self, steps: usize) -> Self {
        self.newton_steps = steps;
        self
    }

    /// The weight `(in_dim + 1, n_classes)`, last row = bias.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    fn logp(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.rank() != 2 || xs.dim(1)? != self.in_dim {
            bail!(
                "SoftmaxExpert: inputs must be (n, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        let xs = xs.to_dtype(DType::F64)?;
        log_softmax_last_dim(&append_bias(&xs)?.matmul(self.weight.as_tensor())?)
        // (n, C)
    }
}

/// Class targets as f64 `(n, C)`: integer ids `(n,)` become one-hot rows, float `(n, C)` is
/// taken as given (one-hot or soft labels).
pub(crate) fn class_targets(ys: &Tensor, n: usize, n_classes: usize) -> Result<Tensor> {
    if ys.rank() == 1 && ys.dim(0)? == n {
        let ids: Vec<i64> = ys.to_dtype(DType::I64)?.to_vec1()?;
        let mut oh = vec![0.0f64; n * n_classes];
        for (i, &c) in ids.iter().enumerate() {
            if c < 0 || c as usize >= n_classes {
                bail!("class target {c} out of range 0..{n_classes}")
            }
            oh[i * n_classes + c as usize] = 1.0;
        }
        Tensor::from_vec(oh, (n, n_classes), ys.device())
    } else if ys.dims() == [n, n_classes] {
        ys.to_dtype(DType::F64)
    } else {
        bail!(
            "class targets must be ({n},) ids or ({n}, {n_classes}) one-hot, got {:?}",
            ys.shape()
        )
    }
}

impl Expert for SoftmaxExpert {
    /// Class probabilities `(n, n_classes)`.
    fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        self.logp(xs)?.exp()
    }

    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        let logp = self.logp(xs)?; // (n, C)
        let t = class_targets(ys, xs.dim(0)?, self.n_classes)?; // (n, C)
        (logp * t)?.sum(D::Minus1) // (n,)
    }

    fn m_step(&mut self, xs: &Tensor, ys: &Tensor, weights: &Tensor) -> Result<()> {
        let n = xs.dim(0)?;
        if xs.rank() != 2 || xs.dim(1)? != self.in_dim {
            bail!(
                "SoftmaxExpert: inputs must be (n, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        let w = weights_to_host(weights, n)?;
        let c = self.n_classes;
        let mut r = tensor_to_host(&class_targets(ys, n, c)?)?;
        for i in 0..n {
            for v in &mut r[i * c..(i + 1) * c] {
                *v *= w[i];
            }
        }
        let x = tensor_to_host(&append_bias(&xs.to_dtype(DType::F64)?)?)?;
        let p = self.in_dim + 1;
        let mut u = tensor_to_host(self.weight.as_tensor())?;
        multinomial_ascent(&x, &r, &mut u, p, c, self.newton_steps)?;
        let dev = self.weight.device().clone();
        self.weight.set(&Tensor::from_vec(u, (p, c), &dev)?)
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone()]
    }
}
