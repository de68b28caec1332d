//! The building blocks around attention and the feed-forward: [`Norm`] (RMSNorm, Zhang &
//! Sennrich 2019; LayerNorm, Ba et al. 2016) and [`Dropout`] (inverted dropout, Srivastava et
//! al. 2014) with its own seeded generator.

use std::sync::Mutex;

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{ModelConfig, NormKind};
use crate::ops::lock;

/// RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016), computed in f32 and built
/// from primitive ops so it has a backward pass.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// `weight` `(size,)` (and `bias` for LayerNorm) under `vb`.
    pub fn new(cfg: &ModelConfig, size: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = match cfg.norm {
            NormKind::Rmsnorm => None,
            NormKind::Layernorm => {
                Some(vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?)
            }
        };
        Ok(Self {
            weight,
            bias,
            eps: cfg.norm_eps,
        })
    }
}

impl Module for Norm {
    /// # Shapes
    /// - `xs`: `(..., size)` -> same
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Inference on frozen weights: candle's fused kernels (they have no backward pass).
        if !xs.track_op() && !self.weight.track_op() && xs.dtype() != DType::F64 {
            let x = xs.contiguous()?;
            return match &self.bias {
                None => candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32),
                Some(b) => candle_nn::ops::layer_norm(&x, &self.weight, b, self.eps as f32),
            };
        }
        let dtype = xs.dtype();
        let x = if dtype == DType::F64 {
            xs.clone()
        } else {
            xs.to_dtype(DType::F32)?
        };
        let x = match &self.bias {
            None => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            }
            Some(_) => {
                let mu = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mu)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
        };
        let x = x
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)?;
        match &self.bias {
            Some(b) => x.broadcast_add(&b.to_dtype(dtype)?),
            None => Ok(x),
        }
    }
}

/// Inverted dropout (Srivastava et al. 2014) with its own seeded generator, so that training
/// runs are reproducible from their seed (candle's `ops::dropout` draws from the thread RNG).
///
/// On CPU the mask comes from the layer's own generator. On a GPU it is drawn on the device
/// (`Tensor::rand_like`, no host-made mask to upload): the device generator is seeded with the
/// layer's seed before its first draw after [`Dropout::set_seed`], so a run that reseeds its
/// layers every step (as the examples do) draws the same masks when resumed.
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    rng: Mutex<StdRng>,
    /// The seed to give the device generator before the next device-side draw.
    device_seed: Mutex<Option<u64>>,
}

impl Dropout {
    /// Drops with probability `p` in `[0, 1)`; the mask generator starts from `seed`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout probability must be in [0, 1), got {p}")
        }
        Ok(Self {
            p,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            device_seed: Mutex::new(Some(seed)),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Restarts the mask generator from `seed`.
    pub fn set_seed(&self, seed: u64) {
        *lock(&self.rng) = StdRng::seed_from_u64(seed);
        *lock(&self.device_seed) = Some(seed);
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)` when
    /// `train`; the identity otherwise.
    ///
    /// # Shapes
    /// - `xs`: any -> same shape
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let p = self.p as f32;
        if !xs.device().is_cpu() {
            if let Some(seed) = lock(&self.device_seed).take() {
                xs.device().set_seed(seed)?;
            }
            let u = Tensor::rand(0f32, 1f32, xs.shape(), xs.device())?;
            let mask = (u.ge(p as f64)?.to_dtype(DType::F32)? * keep as f64)?;
            return xs * mask.to_dtype(xs.dtype())?;
        }
        let mask: Vec<f32> = {
            let mut g = lock(&self.rng);
            (0..xs.elem_count())
                .map(|_| if g.random::<f32>() < p { 0.0 } else { keep })
                .collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// A low-rank adapter (Hu et al. 2021, LoRA) on a linear projection: `y = W x + s · B (A x)`
/// with `A` `(r, in)`, `B` `(out, r)`, `s = alpha / r`; applied in split form (the full `ΔW`
/// is only formed when merging).
#[derive(Debug, Clone)]
pub struct Lora {
    /// `(r, in)`, trainable.
    pub a: Tensor,
    /// `(out, r)`, trainable (zero at the start, so the adapter starts as the identity).
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

/// How [`Lora`] adapters are attached to a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// Scale numerator (`s = alpha / r`).
    pub alpha: f64,
    /// Adapters on the attention projections (`q, k, v, o`).
    pub attention: bool,
    /// Adapters on every expert's (and dense feed-forward's) `w1, w3, w2`.
    pub experts: bool,
    /// Seed of `A`'s initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, attention and experts.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            attention: true,
            experts: true,
            seed: 0,
        }
    }
}

/// A linear projection with an optional [`Lora`] adapter.
#[derive(Debug, Clone)]
pub struct Proj {
    base: candle_nn::Linear,
    lora: Option<Lora>,
}

impl Proj {
    /// `in -> out`, bias optional, weights `weight` (`bias`) under `vb`.
    pub fn new(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_linear(candle_nn::linear_b(i, o, bias, vb)?))
    }

    /// Wraps an existing linear layer.
    pub fn from_linear(base: candle_nn::Linear) -> Self {
        Self { base, lora: None }
    }

    /// The base layer.
    pub fn base(&self) -> &candle_nn::Linear {
        &self.base
    }

    /// The base weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Attaches a fresh adapter: `A` uniform in `±1/sqrt(in)` from `rng`, `B` zero, both new
    /// variables registered in `varmap` as `{name}.lora_A.weight` / `{name}.lora_B.weight`.
    pub fn attach_lora(
        &mut self,
        cfg: &LoraConfig,
        name: &str,
        varmap: &candle_nn::VarMap,
        rng: &mut StdRng,
    ) -> Result<()> {
        let (o, i) = self.base.weight().dims2()?;
        let (dt, dev) = (
            self.base.weight().dtype(),
            self.base.weight().device().clone(),
        );
        let r = cfg.rank;
        if r == 0 {
            bail!("LoRA rank must be > 0")
        }
        let bound = 1.0 / (i as f64).sqrt();
        let a: Vec<f32> = (0..r * i)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = candle_core::Var::from_tensor(&Tensor::from_vec(a, (r, i), &dev)?.to_dtype(dt)?)?;
        let b = candle_core::Var::zeros((o, r), dt, &dev)?;
        let mut data = lock(varmap.data());
        data.insert(format!("{name}.lora_A.weight"), a.clone());
        data.insert(format!("{name}.lora_B.weight"), b.clone());
        self.lora = Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.alpha / r as f64,
        });
        Ok(())
    }

    /// The merged weight `W + s · B A` (the base weight when there is no adapter).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.base.weight();
        match &self.lora {
            None => Ok(w.clone()),
            Some(l) => {
                let delta = (l.b.matmul(&l.a)? * l.scale)?; // (out, in)
                (w.detach() + delta.detach().to_dtype(w.dtype())?)?.contiguous()
            }
        }
    }
}

impl Module for Proj {
    /// # Shapes
    /// - `xs`: `(..., in)` -> `(..., out)`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(xs)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let low = xs.broadcast_matmul(&l.a.t()?)?; // (..., r)
                y + (low.broadcast_matmul(&l.b.t()?)? * l.scale)?
            }
        }
    }
}
