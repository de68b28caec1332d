//! Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, §2.1, eq. 9-19), as transformers'
//! `DeepseekV2Attention` / `DeepseekV3Attention` compute it.
//!
//! - Queries: `q_proj(x)`, or through a low-rank bottleneck `q_b_proj(rms(q_a_proj(x)))`;
//!   each head is split into a position-free part (`qk_nope_head_dim`) and a RoPE part
//!   (`qk_rope_head_dim`).
//! - Keys and values: one compressed latent `c = rms(kv_a_proj_with_mqa(x)[..kv_lora_rank])`
//!   and one RoPE key shared by all heads (`kv_a_proj_with_mqa(x)[kv_lora_rank..]`); the cache
//!   keeps only these two (`(b, 1, t, r)` and `(b, 1, t, d_rope)`), and `kv_b_proj(c)` expands
//!   them to per-head keys (nope part) and values at every step.
//! - RoPE stored as interleaved pairs (`rope_interleave`, DeepSeek-V2 always) is de-interleaved
//!   (even dims, then odd) before the rotate-half rotation, which rotates each original pair by
//!   its frequency: the scores equal transformers' complex / interleaved rotation.
//! - Softmax scale `qk_head_dim^-0.5`, times `mscale²` with YaRN and `mscale_all_dim`
//!   (`mscale = 0.1 · mscale_all_dim · ln(factor) + 1` when `factor > 1`).

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{attention_bias, Attention, KvCache, Rope};
use crate::config::{MlaConfig, ModelConfig, RopeScaling};
use crate::layers::{Norm, Proj};
use crate::ops::softmax_last_dim;

/// How queries are projected.
#[derive(Debug, Clone)]
enum QueryProj {
    /// `q_proj` `(nh·qk, h)`.
    Plain(Proj),
    /// `q_b_proj(rms(q_a_proj(x)))`: `q_a_proj` `(r_q, h)`, `q_a_layernorm` `(r_q,)`,
    /// `q_b_proj` `(nh·qk, r_q)`.
    LowRank(Proj, Norm, Proj),
}

/// Multi-head latent attention (self-attention only).
#[derive(Debug, Clone)]
pub struct Mla {
    q: QueryProj,
    kv_a: Proj,
    kv_norm: Norm,
    kv_b: Proj,
    o_proj: Proj,
    cfg: MlaConfig,
    num_heads: usize,
    scale: f64,
}

/// The softmax scale: `qk_head_dim^-0.5`, times `mscale²` under YaRN with `mscale_all_dim`
/// (transformers' `yarn_apply_mscale`).
pub fn mla_softmax_scale(qk_head_dim: usize, rope_scaling: Option<&RopeScaling>) -> f64 {
    let mut scale = 1.0 / (qk_head_dim as f64).sqrt();
    if let Some(RopeScaling::Yarn {
        factor,
        mscale_all_dim: Some(all),
        ..
    }) = rope_scaling
    {
        if *all != 0.0 && *factor > 1.0 {
            let m = 0.1 * all * factor.ln() + 1.0;
            scale *= m * m;
        }
    }
    scale
}

impl Mla {
    /// Weights under `vb` (transformers' names): `q_proj` or `q_a_proj` + `q_a_layernorm` +
    /// `q_b_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj` (biases on
    /// `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` with `attention_bias`).
    pub fn new(cfg: &ModelConfig, mla: &MlaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, nh, bias) = (cfg.hidden_size, cfg.num_heads, cfg.attention_bias);
        let qk = mla.qk_head_dim();
        let mut norm_cfg = cfg.clone();
        norm_cfg.norm_eps = mla.latent_norm_eps;
        let q = match mla.q_lora_rank {
            None => QueryProj::Plain(Proj::new(h, nh * qk, false, vb.pp("q_proj"))?),
            Some(r) => QueryProj::LowRank(
                Proj::new(h, r, bias, vb.pp("q_a_proj"))?,
                Norm::new(&norm_cfg, r, vb.pp("q_a_layernorm"))?,
                Proj::new(r, nh * qk, false, vb.pp("q_b_proj"))?,
            ),
        };
        let r = mla.kv_lora_rank;
        Ok(Self {
            q,
            kv_a: Proj::new(
                h,
                r + mla.qk_rope_head_dim,
                bias,
                vb.pp("kv_a_proj_with_mqa"),
            )?,
            kv_norm: Norm::new(&norm_cfg, r, vb.pp("kv_a_layernorm"))?,
            kv_b: Proj::new(
                r,
                nh * (mla.qk_nope_head_dim + mla.v_head_dim),
                false,
                vb.pp("kv_b_proj"),
            )?,
            o_proj: Proj::new(nh * mla.v_head_dim, h, bias, vb.pp("o_proj"))?,
            cfg: mla.clone(),
            num_heads: nh,
            scale: mla_softmax_scale(qk, cfg.rope_scaling.as_ref()),
        })
    }

    /// The projections with their names, for attaching or merging adapters.
    pub fn projs_mut(&mut self) -> Vec<(&'static str, &mut Proj)> {
        let mut v = match &mut self.q {
            QueryProj::Plain(p) => vec![("q_proj", p)],
            QueryProj::LowRank(a, _, b) => vec![("q_a_proj", a), ("q_b_proj", b)],
        };
        v.push(("kv_a_proj_with_mqa", &mut self.kv_a));
        v.push(("kv_b_proj", &mut self.kv_b));
        v.push(("o_proj", &mut self.o_proj));
        v
    }

    /// The softmax scale in use.
    pub fn softmax_scale(&self) -> f64 {
        self.scale
    }

    /// Interleaved pairs -> even dims then odd dims, on the last dimension.
    fn deinterleave(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.cfg.rope_interleave {
            return Ok(xs.clone());
        }
        let (b, n, t, d) = xs.dims4()?;
        xs.reshape((b, n, t, d / 2, 2))?
            .transpose(3, 4)?
            .reshape((b, n, t, d)) // (b, n, t, d)
    }

    /// Self-attention; with a cache, `xs` holds positions `offset..offset + t` and the cache
    /// (the compressed latent and the RoPE key) grows by `t`.
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)`; `key_mask`: `(b, offset + t)`; returns `(b, t, h)`
    pub fn forward_self(
        &self,
        xs: &Tensor,
        rope: Option<&Rope>,
        causal: bool,
        key_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let Some(rope) = rope else {
            bail!("multi-head latent attention needs RoPE")
        };
        let (b, t, _) = xs.dims3()?;
        let (nh, c) = (self.num_heads, &self.cfg);
        let (nope, dr, dv, r) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let q = match &self.q {
            QueryProj::Plain(p) => p.forward(xs)?,
            QueryProj::LowRank(a, n, bp) => bp.forward(&n.forward(&a.forward(xs)?)?)?,
        };
        let q = q.reshape((b, t, nh, nope + dr))?.transpose(1, 2)?; // (b, nh, t, qk)
        let q_nope = q.narrow(3, 0, nope)?;
        let q_rot = rope.apply(&self.deinterleave(&q.narrow(3, nope, dr)?)?, offset)?;
        let ckv = self.kv_a.forward(xs)?; // (b, t, r + dr)
        let latent = self
            .kv_norm
            .forward(&ckv.narrow(2, 0, r)?)?
            .reshape((b, 1, t, r))?; // (b, 1, t, r)
        let k_rot = ckv
            .narrow(2, r, dr)?
            .reshape((b, t, 1, dr))?
            .transpose(1, 2)?; // (b, 1, t, dr)
        let mut k_rot = rope.apply(&self.deinterleave(&k_rot)?, offset)?;
        let mut latent = latent.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pl, pk)) = &cache.kv {
                latent = Tensor::cat(&[pl, &latent], 2)?; // (b, 1, offset + t, r)
                k_rot = Tensor::cat(&[pk, &k_rot], 2)?;
            }
            cache.kv = Some((latent.clone(), k_rot.clone()));
        }
        let t_k = latent.dim(2)?;
        let kv = self
            .kv_b
            .forward(&latent.reshape((b, t_k, r))?)?
            .reshape((b, t_k, nh, nope + dv))?
            .transpose(1, 2)?; // (b, nh, tk, nope + dv)
        let k = Tensor::cat(
            &[
                &kv.narrow(3, 0, nope)?,
                &k_rot.broadcast_as((b, nh, t_k, dr))?,
            ],
            3,
        )?; // (b, nh, tk, qk)
        let v = kv.narrow(3, nope, dv)?.contiguous()?; // (b, nh, tk, dv)
        let q = Tensor::cat(&[&q_nope, &q_rot], 3)?.contiguous()?; // (b, nh, t, qk)
        let dtype = q.dtype();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?.to_dtype(DType::F32)?;
        let mut scores = scores; // (b, nh, t, tk)
        if let Some(bias) = attention_bias(b, t, t_k, offset, causal, key_mask, xs.device())? {
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = if scores.track_op() {
            softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
        }
        .to_dtype(dtype)?;
        let out = probs
            .matmul(&v)? // (b, nh, t, dv)
            .transpose(1, 2)?
            .reshape((b, t, nh * dv))?; // (b, t, nh·dv)
        self.o_proj.forward(&out)
    }
}

/// A block's self-attention: standard MHA/GQA or multi-head latent attention, chosen by
/// [`ModelConfig::mla`].
#[derive(Debug, Clone)]
pub enum SelfAttention {
    /// Multi-head / grouped-query attention.
    Standard(Box<Attention>),
    /// Multi-head latent attention (DeepSeek-V2/V3).
    Latent(Box<Mla>),
}

impl SelfAttention {
    /// MLA when `cfg.mla` is set, else [`Attention`]; weights under `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match &cfg.mla {
            Some(m) => Self::Latent(Box::new(Mla::new(cfg, m, vb)?)),
            None => Self::Standard(Box::new(Attention::new(cfg, vb)?)),
        })
    }

    /// Restricts self-attention to a sliding window (see [`Attention::with_window`]); multi-head
    /// latent attention has none, so a window there is an error.
    pub fn with_window(self, window: Option<usize>) -> Result<Self> {
        match (self, window) {
            (Self::Standard(a), w) => Ok(Self::Standard(Box::new(a.with_window(w)))),
            (s @ Self::Latent(_), None) => Ok(s),
            (Self::Latent(_), Some(w)) => candle_core::bail!(
                "a sliding window ({w}) is not supported with multi-head latent attention"
            ),
        }
    }

    /// The projections with their names, for attaching or merging adapters.
    pub fn projs_mut(&mut self) -> Vec<(&'static str, &mut Proj)> {
        match self {
            Self::Standard(a) => a.projs_mut().into_iter().collect(),
            Self::Latent(m) => m.projs_mut(),
        }
    }

    /// Self-attention (see [`Attention::forward_self`]).
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)`; `key_mask`: `(b, offset + t)`; returns `(b, t, h)`
    pub fn forward_self(
        &self,
        xs: &Tensor,
        rope: Option<&Rope>,
        causal: bool,
        key_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Self::Standard(a) => a.forward_self(xs, rope, causal, key_mask, cache),
            Self::Latent(m) => m.forward_self(xs, rope, causal, key_mask, cache),
        }
    }
}
