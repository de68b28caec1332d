//! Multi-head and grouped-query attention (Vaswani et al. 2017; Ainslie et al. 2023) with
//! rotary position embeddings (Su et al. 2021, RoFormer eq. 34, "rotate-half" layout as in
//! Llama/Mixtral), causal and padding masks, an incremental KV cache, and cross-attention.
//!
//! The `(b, heads, t_q, t_k)` score tensor is the only quadratic intermediate; masks are built
//! once per forward as `(b, 1, t_q, t_k)` additive biases (or not at all when nothing is
//! masked). Softmax runs in f32 (it has a backward, unlike `candle_nn::ops::softmax_last_dim`).
//! In inference on CPU without a padding mask, scaling, the causal mask and the softmax are one
//! pass over the scores that skips the masked keys.
//!
//! Sliding windows (`ModelConfig::sliding_window`, per layer by `layer_types`) and attention
//! sinks (`ModelConfig::attention_sinks`) are in `mask.rs`. With a window, the KV cache still
//! keeps every position and the window is applied as a mask (decode = full forward exactly;
//! the cache is not trimmed to the window).

use candle_core::{DType, Module, Result, Tensor};

use crate::ops::HostRead;
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::layers::{Norm, Proj};

mod mask;
pub mod mla;
mod rope;
use mask::ScaledCausalSoftmax;
pub use mask::{attention_bias, softmax_with_sinks, window_bias};
pub use mla::{Mla, SelfAttention};
pub use rope::{rope_parameters, Rope};

/// Cached keys and values of one attention layer, `(b, kv_heads, t, d)` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.kv.is_none()
    }
    /// Selects batch rows `idx` of the cached keys and values.
    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        if let Some((k, v)) = &self.kv {
            self.kv = Some((k.index_select(idx, 0)?, v.index_select(idx, 0)?));
        }
        Ok(())
    }
}

/// Multi-head / grouped-query attention, self or cross.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// The q/k norms act on each head (Qwen3) instead of the whole projection (OLMoE).
    norm_per_head: bool,
    /// Learned per-head sink logits `(heads,)` (gpt-oss).
    sinks: Option<Tensor>,
    /// Sliding window of this layer's self-attention (`None`: every earlier position).
    window: Option<usize>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Softmax scale: `attention_multiplier`, else 1/sqrt(head_dim).
    scale: f64,
}

impl Attention {
    /// Weights `{q,k,v,o}_proj.weight` (and biases with `attention_bias`; `o_proj.bias` for
    /// post-norm models or with `attention_out_bias`), `q_norm.weight` / `k_norm.weight` with
    /// `qk_norm` (sized `head_dim` with `qk_norm_per_head`), `sinks` `(heads,)` with
    /// `attention_sinks`. No sliding window: see [`Self::with_window`].
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim(),
        );
        let qkv_bias = cfg.attention_bias;
        let o_bias = (cfg.attention_bias && cfg.post_norm) || cfg.attention_out_bias;
        let per_head = cfg.qk_norm_per_head;
        let (q_norm, k_norm) = if cfg.qk_norm || per_head {
            let (qn, kn) = if per_head {
                (hd, hd)
            } else {
                (nh * hd, nkv * hd)
            };
            (
                Some(Norm::new(cfg, qn, vb.pp("q_norm"))?),
                Some(Norm::new(cfg, kn, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        let sinks = if cfg.attention_sinks {
            Some(vb.get_with_hints(nh, "sinks", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            q_proj: Proj::new(h, nh * hd, qkv_bias, vb.pp("q_proj"))?,
            k_proj: Proj::new(h, nkv * hd, qkv_bias, vb.pp("k_proj"))?,
            v_proj: Proj::new(h, nkv * hd, qkv_bias, vb.pp("v_proj"))?,
            o_proj: Proj::new(nh * hd, h, o_bias, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            norm_per_head: per_head,
            sinks,
            window: None,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: cfg.attention_multiplier.unwrap_or(1.0 / (hd as f64).sqrt()),
        })
    }

    /// This attention with a sliding window of `window` positions for self-attention (`None`:
    /// every earlier position): query `i` sees keys `j` with `i - window < j <= i`.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// The sliding window of this attention's self-attention, if any.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// The four projections with their names, for attaching or merging adapters.
    pub fn projs_mut(&mut self) -> [(&'static str, &mut Proj); 4] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }

    fn heads(&self, xs: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, n, self.head_dim))?.transpose(1, 2) // (b, n, t, d)
    }

    fn repeat_kv(&self, xs: Tensor) -> Result<Tensor> {
        let rep = self.num_heads / self.num_kv_heads;
        if rep == 1 {
            return Ok(xs);
        }
        let (b, n, t, d) = xs.dims4()?;
        // (b, n, t, d) -> (b, n, rep, t, d) -> (b, n·rep, t, d)
        xs.unsqueeze(2)?
            .broadcast_as((b, n, rep, t, d))?
            .reshape((b, n * rep, t, d))
    }

    /// `proj(xs)` split into `n` heads `(b, n, t, d)`, normed by `norm` (over the whole
    /// projection, or per head with `norm_per_head`).
    fn normed_heads(&self, p: &Proj, norm: Option<&Norm>, xs: &Tensor, n: usize) -> Result<Tensor> {
        let x = p.forward(xs)?;
        match norm {
            Some(nm) if self.norm_per_head => nm.forward(&self.heads(&x, n)?),
            Some(nm) => self.heads(&nm.forward(&x)?, n),
            None => self.heads(&x, n),
        }
    }

    fn keys_values(&self, src: &Tensor, rope: Option<(&Rope, usize)>) -> Result<(Tensor, Tensor)> {
        let mut k =
            self.normed_heads(&self.k_proj, self.k_norm.as_ref(), src, self.num_kv_heads)?; // (b, kv, t, d)
        if let Some((r, off)) = rope {
            k = r.apply(&k, off)?;
        }
        let v = self
            .heads(&self.v_proj.forward(src)?, self.num_kv_heads)?
            .contiguous()?;
        Ok((k.contiguous()?, v))
    }

    /// Self-attention. With a cache, `xs` holds the new positions `offset..offset + t` and the
    /// cache grows by `t`.
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
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (mut k, mut v) = self.keys_values(xs, rope.map(|r| (r, offset)))?;
        if let Some(c) = cache {
            if let Some((pk, pv)) = &c.kv {
                k = Tensor::cat(&[pk, &k], 2)?; // (b, kv, offset + t, d)
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            c.kv = Some((k.clone(), v.clone()));
        }
        let span = Span {
            causal,
            offset,
            window: self.window,
        };
        self.attend(xs, rope.map(|r| (r, offset)), k, v, span, key_mask)
    }

    /// Cross-attention of `xs` over an encoder `memory`; the memory's keys and values are
    /// computed once and kept in `cache` when one is given.
    ///
    /// # Shapes
    /// - `xs`: `(b, t, h)`, `memory`: `(b, s, h)`, `memory_mask`: `(b, s)`; returns `(b, t, h)`
    pub fn forward_cross(
        &self,
        xs: &Tensor,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (k, v) = match cache {
            Some(c) => match &c.kv {
                Some(kv) => kv.clone(),
                None => {
                    let kv = self.keys_values(memory, None)?;
                    c.kv = Some(kv.clone());
                    kv
                }
            },
            None => self.keys_values(memory, None)?,
        };
        let span = Span {
            causal: false,
            offset: 0,
            window: None,
        };
        self.attend(xs, None, k, v, span, memory_mask)
    }

    fn attend(
        &self,
        xs: &Tensor,
        rope: Option<(&Rope, usize)>,
        k: Tensor,
        v: Tensor,
        span: Span,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let mut q = self.normed_heads(&self.q_proj, self.q_norm.as_ref(), xs, self.num_heads)?; // (b, nh, t, d)
        if let Some((r, off)) = rope {
            q = r.apply(&q, off)?;
        }
        let k = self.repeat_kv(k)?; // (b, nh, tk, d)
        let v = self.repeat_kv(v)?;
        let t_k = k.dim(2)?;
        let dtype = q.dtype();
        let scale = self.scale;
        let raw = q.contiguous()?.matmul(&k.t()?.contiguous()?)?; // (b, nh, t, tk)
        let sinks_train = self.sinks.as_ref().is_some_and(|s| s.track_op());
        let probs = if key_mask.is_none()
            && !raw.track_op()
            && !sinks_train
            && raw.dtype() == DType::F32
            && raw.device().is_cpu()
        {
            // Inference without padding: scale, causal / window mask, sinks and softmax in one
            // pass over the scores, skipping the masked keys (no bias tensor, no extra passes).
            let sinks = match &self.sinks {
                Some(s) => s.to_dtype(DType::F32)?.host_vec1::<f32>()?,
                None => vec![],
            };
            raw.apply_op1_no_bwd(&ScaledCausalSoftmax {
                scale: scale as f32,
                causal: span.causal,
                offset: span.offset,
                window: span.window,
                sinks,
            })?
        } else {
            // Softmax in f32 (f64 for f64 models).
            let sdt = match raw.dtype() {
                DType::F64 => DType::F64,
                _ => DType::F32,
            };
            let mut scores = (raw * scale)?.to_dtype(sdt)?;
            let bias = window_bias(
                b,
                t,
                t_k,
                span.offset,
                span.causal,
                span.window,
                key_mask,
                xs.device(),
            )?;
            if let Some(bias) = bias {
                scores = scores.broadcast_add(&bias.to_dtype(sdt)?)?;
            }
            softmax_with_sinks(&scores, self.sinks.as_ref())?.to_dtype(dtype)?
        };
        let out = probs.matmul(&v)?; // (b, nh, t, d)
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?; // (b, t, nh·d)
        self.o_proj.forward(&out)
    }
}

/// Which keys the queries of one attention call see.
#[derive(Debug, Clone, Copy)]
struct Span {
    causal: bool,
    /// Absolute position of the first query.
    offset: usize,
    window: Option<usize>,
}
