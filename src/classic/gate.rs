//! The softmax gating network of the classic mixture of experts (Jordan & Jacobs 1994, eq. 3):
//! `g_k(x) = exp(ξ_k) / Σ_j exp(ξ_j)` with `ξ = [x, 1] · V`, a multinomial-logit model.
//!
//! Its EM M-step (Jordan & Jacobs 1994, eq. 22; IRLS in §5) maximises the weighted
//! cross-entropy `Σ_n Σ_k h_nk log g_k(x_n)` towards the posterior responsibilities `h`. Here it
//! takes a few Newton (IRLS) steps with a backtracking line search, so the objective never
//! decreases and EM stays a generalised EM with a monotone log-likelihood.

use candle_core::{bail, DType, Device, Result, Tensor, Var, D};
use rand::Rng;

use super::linalg::multinomial_ascent;
use super::{append_bias, tensor_to_host};
use crate::ops::{log_softmax_last_dim, normal};

/// A linear softmax gate over `n_out` alternatives (experts or sub-trees).
///
/// The weight matrix `V` has shape `(in_dim + 1, n_out)`; its last row is the bias.
#[derive(Debug)]
pub struct SoftmaxGate {
    weight: Var,
    in_dim: usize,
    n_out: usize,
}

impl SoftmaxGate {
    /// A gate with all weights zero (uniform gating), f64 on `device`.
    pub fn new(in_dim: usize, n_out: usize, device: &Device) -> Result<Self> {
        if n_out == 0 {
            bail!("SoftmaxGate: n_out must be at least 1")
        }
        let weight = Var::zeros((in_dim + 1, n_out), DType::F64, device)?;
        Ok(Self {
            weight,
            in_dim,
            n_out,
        })
    }

    /// A gate with the given weights `(in_dim + 1, n_out)` (last row = bias), converted to f64.
    pub fn from_weight(weight: &Tensor) -> Result<Self> {
        let (p, n_out) = weight.dims2()?;
        if p == 0 || n_out == 0 {
            bail!(
                "SoftmaxGate::from_weight: weight must be (in_dim + 1, n_out), got {:?}",
                weight.shape()
            )
        }
        Ok(Self {
            weight: Var::from_tensor(&weight.to_dtype(DType::F64)?.copy()?)?,
            in_dim: p - 1,
            n_out,
        })
    }

    /// An independent copy (new variables, same values).
    pub fn try_clone(&self) -> Result<Self> {
        Self::from_weight(self.weight.as_tensor())
    }

    /// Input dimension (without the bias).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Number of alternatives gated over.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// The weight `(in_dim + 1, n_out)`, last row = bias.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The trainable variable (for plain gradient training).
    pub fn var(&self) -> &Var {
        &self.weight
    }

    /// Replaces the weights with random ones so that, on `xs`, every logit has roughly standard
    /// deviation `scale` and the separating hyperplanes pass through the data mean: a random soft
    /// partition of the input space, used to break the symmetry between experts before EM.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`
    pub fn randomize<R: Rng + ?Sized>(
        &mut self,
        xs: &Tensor,
        scale: f64,
        rng: &mut R,
    ) -> Result<()> {
        let (n, d) = xs.dims2()?;
        if d != self.in_dim || n == 0 {
            bail!(
                "SoftmaxGate::randomize: xs must be (n > 0, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        let x = tensor_to_host(xs)?;
        let k = self.n_out;
        let mut w = vec![0.0; (d + 1) * k];
        let mut mean = vec![0.0; d];
        let mut sd = vec![0.0; d];
        for j in 0..d {
            mean[j] = (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64;
            sd[j] = ((0..n)
                .map(|i| (x[i * d + j] - mean[j]).powi(2))
                .sum::<f64>()
                / n as f64)
                .sqrt()
                .max(1e-12);
        }
        for c in 0..k {
            let mut b = 0.0;
            for j in 0..d {
                let v = scale * normal(rng) / (sd[j] * (d as f64).sqrt());
                w[j * k + c] = v;
                b -= v * mean[j];
            }
            w[d * k + c] = b;
        }
        self.weight
            .set(&Tensor::from_vec(w, (d + 1, k), self.weight.device())?)
    }

    /// Gate logits `ξ = [x, 1] V`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, n_out)`
    pub fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.check(xs)?;
        append_bias(&xs)?.matmul(self.weight.as_tensor()) // (n, k)
    }

    /// `log g_k(x)`, differentiable with respect to the gate weights.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, n_out)`
    pub fn log_probs(&self, xs: &Tensor) -> Result<Tensor> {
        log_softmax_last_dim(&self.logits(xs)?)
    }

    /// Gate probabilities `g_k(x)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, n_out)`; rows sum to one
    pub fn probs(&self, xs: &Tensor) -> Result<Tensor> {
        self.log_probs(xs)?.exp()
    }

    /// The M-step: `steps` Newton (IRLS) steps with line search on
    /// `Σ_n Σ_k targets_nk log g_k(x_n)`, which never decreases. Returns the final objective.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)`
    /// - `targets`: `(n, n_out)`, non-negative (posterior responsibilities; rows may sum to
    ///   less than one, as in a sub-tree of a hierarchical MoE)
    pub fn m_step(&mut self, xs: &Tensor, targets: &Tensor, steps: usize) -> Result<f64> {
        let xs = self.check(xs)?;
        let (n, k) = targets.dims2()?;
        if n != xs.dim(0)? || k != self.n_out {
            bail!(
                "SoftmaxGate::m_step: targets must be ({}, {}), got {:?}",
                xs.dim(0)?,
                self.n_out,
                targets.shape()
            )
        }
        let x = tensor_to_host(&append_bias(&xs)?)?;
        let r = tensor_to_host(targets)?;
        let p = self.in_dim + 1;
        let mut w = tensor_to_host(self.weight.as_tensor())?;
        let f = multinomial_ascent(&x, &r, &mut w, p, k, steps)?;
        self.weight
            .set(&Tensor::from_vec(w, (p, k), self.weight.device())?)?;
        Ok(f)
    }

    fn check(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.rank() != 2 || xs.dim(D::Minus1)? != self.in_dim {
            bail!(
                "SoftmaxGate: inputs must be (n, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        xs.to_dtype(DType::F64)
    }
}
