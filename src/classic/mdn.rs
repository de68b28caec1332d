//! Mixture density network head (Bishop 1994, "Mixture Density Networks", NCRG/94/004): a
//! network's hidden state is mapped to the parameters of a Gaussian mixture over the target,
//!
//! ```text
//! p(t | x) = Σ_k π_k(x) N(t | μ_k(x), diag σ_k(x)²)          (Bishop 1994, eq. 22)
//! π = softmax(z_π) (eq. 25),  σ = exp(z_σ) (eq. 26),  μ = z_μ (eq. 27)
//! ```
//!
//! trained by the negative log-likelihood `E = −Σ_n log p(t_n | x_n)` (eq. 29). Unlike a
//! least-squares head, it can represent several answers per input (the inverse problem of
//! Bishop's §4). It works on any leading shape, so it can sit on a transformer's hidden states
//! `(b, t, h)` to predict a continuous target per position.

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use rand::Rng;

use super::{logsumexp_last, tensor_to_host, LN_2PI};
use crate::ops::{log_softmax_last_dim, normal};

/// The mixture parameters an [`MdnHead`] produces.
#[derive(Debug, Clone)]
pub struct MdnOutput {
    /// Log mixture weights `log π`, `(…, K)`; `logsumexp` over the last dimension is 0.
    pub log_pi: Tensor,
    /// Component means `μ`, `(…, K, D)`.
    pub mu: Tensor,
    /// Component log standard deviations `log σ`, `(…, K, D)` (diagonal covariance).
    pub log_sigma: Tensor,
}

impl MdnOutput {
    /// Number of mixture components `K`.
    pub fn n_components(&self) -> Result<usize> {
        self.log_pi.dim(D::Minus1)
    }

    /// Checks `log_pi` `(…, K)`, `mu` and `log_sigma` `(…, K, D)` with `K, D ≥ 1`.
    fn check(&self) -> Result<()> {
        let (p, m, s) = (self.log_pi.dims(), self.mu.dims(), self.log_sigma.dims());
        if m.len() < 2
            || m != s
            || p.len() + 1 != m.len()
            || p != &m[..m.len() - 1]
            || m[m.len() - 1] == 0
            || p[p.len() - 1] == 0
        {
            bail!(
                "MdnOutput: expected log_pi (…, K), mu and log_sigma (…, K, D) with K, D ≥ 1, got {:?}, {:?}, {:?}",
                self.log_pi.shape(),
                self.mu.shape(),
                self.log_sigma.shape()
            )
        }
        Ok(())
    }

    /// `log p(t | x)` per example, differentiable.
    ///
    /// # Shapes
    /// - `target`: `(…, D)` → `(…)`
    pub fn log_prob(&self, target: &Tensor) -> Result<Tensor> {
        self.check()?;
        let mu_dims = self.mu.dims();
        let want = &mu_dims[..mu_dims.len() - 2];
        let d = mu_dims[mu_dims.len() - 1];
        let t_dims = target.dims();
        if t_dims.len() != want.len() + 1
            || &t_dims[..want.len()] != want
            || t_dims[want.len()] != d
        {
            bail!(
                "MdnOutput::log_prob: target must be {:?} + [{d}], got {:?}",
                want,
                target.shape()
            )
        }
        let t = target.to_dtype(self.mu.dtype())?.unsqueeze(D::Minus2)?; // (…, 1, D)
        let z = t
            .broadcast_sub(&self.mu)?
            .mul(&self.log_sigma.neg()?.exp()?)?; // (…, K, D)
        let comp = ((z.sqr()? * -0.5)? - &self.log_sigma)?
            .sum(D::Minus1)?
            .affine(1.0, -0.5 * LN_2PI * d as f64)?; // (…, K)
        logsumexp_last(&(comp + &self.log_pi)?) // (…)
    }

    /// Mean negative log-likelihood over all examples (a scalar).
    ///
    /// # Shapes
    /// - `target`: `(…, D)` → `()`
    pub fn nll(&self, target: &Tensor) -> Result<Tensor> {
        self.log_prob(target)?.mean_all()?.neg()
    }

    /// Mixture weights `π`, `(…, K)`.
    pub fn pi(&self) -> Result<Tensor> {
        self.log_pi.exp()
    }

    /// Mean of the mixture `Σ_k π_k μ_k` (the least-squares answer).
    ///
    /// # Shapes
    /// - `(…, D)`
    pub fn mean(&self) -> Result<Tensor> {
        self.check()?;
        let pi = self.log_pi.exp()?.unsqueeze(D::Minus1)?; // (…, K, 1)
        self.mu.broadcast_mul(&pi)?.sum(D::Minus2) // (…, D)
    }

    /// Variance of the mixture per output, `Σ_k π_k (σ_k² + μ_k²) − mean²` (Bishop 1994, eq. 31
    /// per dimension).
    ///
    /// # Shapes
    /// - `(…, D)`
    pub fn variance(&self) -> Result<Tensor> {
        let pi = self.log_pi.exp()?.unsqueeze(D::Minus1)?; // (…, K, 1)
        let second = ((self.log_sigma.clone() * 2.0)?.exp()? + self.mu.sqr()?)?
            .broadcast_mul(&pi)?
            .sum(D::Minus2)?; // (…, D)
        second - self.mean()?.sqr()?
    }

    /// The mean of the most probable component (Bishop 1994 §4: a good single answer when the
    /// components are well separated).
    ///
    /// # Shapes
    /// - `(…, D)`
    pub fn mode_mean(&self) -> Result<Tensor> {
        self.check()?;
        let d = self.mu.dim(D::Minus1)?;
        let idx = self
            .log_pi
            .argmax_keepdim(D::Minus1)?
            .unsqueeze(D::Minus1)?; // (…, 1, 1)
        let mut shape = self.mu.dims().to_vec();
        let nd = shape.len();
        shape[nd - 2] = 1;
        shape[nd - 1] = d;
        let idx = idx.broadcast_as(shape.as_slice())?.contiguous()?; // (…, 1, D)
        self.mu
            .contiguous()?
            .gather(&idx, D::Minus2)?
            .squeeze(D::Minus2) // (…, D)
    }

    /// Draws one sample per example: a component from `π`, then `μ + σ ⊙ ε`, `ε ~ N(0, I)`.
    ///
    /// # Shapes
    /// - `(…, D)`, same dtype and device as `mu`
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Result<Tensor> {
        self.check()?;
        let k = self.n_components()?;
        let d = self.mu.dim(D::Minus1)?;
        let pi = tensor_to_host(&self.log_pi.exp()?)?;
        let mu = tensor_to_host(&self.mu)?;
        let ls = tensor_to_host(&self.log_sigma)?;
        let rows = pi.len() / k.max(1);
        let mut out = Vec::with_capacity(rows * d);
        for r in 0..rows {
            let w = &pi[r * k..(r + 1) * k];
            let total: f64 = w.iter().sum();
            let u = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut c = k - 1;
            for (j, wj) in w.iter().enumerate() {
                acc += wj;
                if u < acc {
                    c = j;
                    break;
                }
            }
            for j in 0..d {
                let o = (r * k + c) * d + j;
                out.push(mu[o] + ls[o].exp() * normal(rng));
            }
        }
        let mut shape = self.mu.dims().to_vec();
        shape.remove(shape.len() - 2);
        Tensor::from_vec(out, shape, self.mu.device())?.to_dtype(self.mu.dtype())
    }
}

/// A mixture density network output layer: three linear maps from hidden states to `log π`,
/// `μ` and `log σ` of a `K`-component diagonal Gaussian mixture over a `D`-dimensional target.
///
/// Parameters under `vb`: `pi.{weight,bias}` `[K, H]`, `mu.{weight,bias}` `[K·D, H]`,
/// `log_sigma.{weight,bias}` `[K·D, H]`.
#[derive(Debug, Clone)]
pub struct MdnHead {
    pi: Linear,
    mu: Linear,
    log_sigma: Linear,
    in_dim: usize,
    n_components: usize,
    out_dim: usize,
}

impl MdnHead {
    /// A head from `in_dim` hidden units to a mixture of `n_components` Gaussians over `out_dim`
    /// target dimensions.
    pub fn new(in_dim: usize, n_components: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        if in_dim == 0 || n_components == 0 || out_dim == 0 {
            bail!("MdnHead: in_dim, n_components and out_dim must be positive")
        }
        Ok(Self {
            pi: candle_nn::linear(in_dim, n_components, vb.pp("pi"))?,
            mu: candle_nn::linear(in_dim, n_components * out_dim, vb.pp("mu"))?,
            log_sigma: candle_nn::linear(in_dim, n_components * out_dim, vb.pp("log_sigma"))?,
            in_dim,
            n_components,
            out_dim,
        })
    }

    /// Number of mixture components `K`.
    pub fn n_components(&self) -> usize {
        self.n_components
    }

    /// Target dimension `D`.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The mixture parameters for each hidden state.
    ///
    /// # Shapes
    /// - `xs`: `(…, in_dim)`, e.g. `(b, t, h)`
    /// - returns `log_pi` `(…, K)`, `mu` and `log_sigma` `(…, K, D)`
    pub fn forward(&self, xs: &Tensor) -> Result<MdnOutput> {
        let dims = xs.dims();
        if dims.is_empty() || dims[dims.len() - 1] != self.in_dim {
            bail!(
                "MdnHead: hidden states must be (…, {}), got {:?}",
                self.in_dim,
                xs.shape()
            )
        }
        let lead = &dims[..dims.len() - 1];
        let n: usize = lead.iter().product();
        let flat = xs.reshape((n, self.in_dim))?; // (N, H)
        let (k, d) = (self.n_components, self.out_dim);
        let log_pi = log_softmax_last_dim(&self.pi.forward(&flat)?)?; // (N, K)
        let mu = self.mu.forward(&flat)?.reshape((n, k, d))?; // (N, K, D)
        let log_sigma = self.log_sigma.forward(&flat)?.reshape((n, k, d))?; // (N, K, D)
        let with = |extra: &[usize]| -> Vec<usize> {
            let mut s = lead.to_vec();
            s.extend_from_slice(extra);
            s
        };
        Ok(MdnOutput {
            log_pi: log_pi.reshape(with(&[k]))?,          // (…, K)
            mu: mu.reshape(with(&[k, d]))?,               // (…, K, D)
            log_sigma: log_sigma.reshape(with(&[k, d]))?, // (…, K, D)
        })
    }

    /// Mean negative log-likelihood of `target` under `out` (Bishop 1994, eq. 29, averaged).
    ///
    /// # Shapes
    /// - `target`: `(…, D)` → `()`
    pub fn nll(&self, out: &MdnOutput, target: &Tensor) -> Result<Tensor> {
        out.nll(target)
    }

    /// One sample per example from the predicted mixture.
    ///
    /// # Shapes
    /// - returns `(…, D)`
    pub fn sample<R: Rng + ?Sized>(&self, out: &MdnOutput, rng: &mut R) -> Result<Tensor> {
        out.sample(rng)
    }
}
