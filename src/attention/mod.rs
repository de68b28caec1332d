//! Multi-head and grouped-query attention (Vaswani et al. 2017; Ainslie et al. 2023) with
//! rotary position embeddings (Su et al. 2021, RoFormer eq. 34, "rotate-half" layout as in
//! Llama/Mixtral), causal and padding masks, an incremental KV cache, and cross-attention.
//!
//! The `(b, heads, t_q, t_k)` score tensor is the only quadratic intermediate; masks are built
//! once per forward as `(b, 1, t_q, t_k)` additive biases (or not at all when nothing is
//! masked). Softmax runs in f32 (it has a backward, unlike `candle_nn::ops::softmax_last_dim`).
//! In inference on CPU without a padding mask, scaling, the causal mask and the softmax are one
//! pass over the scores that skips the masked keys.

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::layers::{Norm, Proj};
use crate::ops::softmax_last_dim;

mod rope;
pub use rope::Rope;

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

/// Additive attention bias `(b, 1, t_q, t_k)` in f32, or `None` when nothing is masked.
///
/// `causal` allows key `j` for query `i` iff `j <= offset + i`; `key_mask` `(b, t_k)` (1 = keep,
/// 0 = padding) removes padding keys.
pub fn attention_bias(
    b: usize,
    t_q: usize,
    t_k: usize,
    offset: usize,
    causal: bool,
    key_mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    const NEG: f32 = -1e9;
    let mut bias: Option<Tensor> = None;
    if causal && t_q > 1 {
        let v: Vec<f32> = (0..t_q)
            .flat_map(|i| (0..t_k).map(move |j| if j <= offset + i { 0.0 } else { NEG }))
            .collect();
        bias = Some(Tensor::from_vec(v, (1, 1, t_q, t_k), dev)?);
    }
    if let Some(m) = key_mask {
        if m.dims() != [b, t_k] {
            bail!(
                "attention mask must be (batch, keys) = ({b}, {t_k}), got {:?}",
                m.dims()
            )
        }
        let pad =
            ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * NEG as f64)?).reshape((b, 1, 1, t_k))?;
        bias = Some(match bias {
            Some(c) => c.broadcast_add(&pad)?,
            None => pad,
        });
    }
    Ok(bias)
}

/// `softmax(scale · s)` over the last dimension of `(b, heads, t_q, t_k)` f32 scores, with keys
/// `j > offset + i` of query row `i` masked out when `causal` (they get probability 0, as with
/// an additive `-inf` bias). Inference only (no backward pass).
#[derive(Debug, Clone, Copy)]
struct ScaledCausalSoftmax {
    scale: f32,
    causal: bool,
    offset: usize,
}

impl candle_core::CustomOp1 for ScaledCausalSoftmax {
    fn name(&self) -> &'static str {
        "scaled-causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let s = match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => bail!("scaled-causal-softmax: needs contiguous f32 scores"),
        };
        let dims = layout.shape().dims();
        let (t_q, t_k) = match dims {
            [.., q, k] if *k > 0 => (*q, *k),
            _ => bail!("scaled-causal-softmax: bad score shape {dims:?}"),
        };
        let rows = s.len() / t_k;
        let mut out = vec![0f32; s.len()];
        let per_part = rows
            .div_ceil(8 * candle_core::utils::get_num_threads().max(1))
            .max(1);
        let (scale, causal, offset) = (self.scale, self.causal, self.offset);
        crate::cpu::par_each(out.chunks_mut(per_part * t_k).collect(), |p, chunk| {
            for (r, o) in chunk.chunks_mut(t_k).enumerate() {
                let row = p * per_part + r;
                let i = row % t_q.max(1);
                let len = if causal {
                    (offset + i + 1).min(t_k)
                } else {
                    t_k
                };
                let x = &s[row * t_k..row * t_k + len];
                let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
                let mut sum = 0f32;
                for (o, &v) in o[..len].iter_mut().zip(x) {
                    let e = (v * scale - m).exp();
                    *o = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                o[..len].iter_mut().for_each(|v| *v *= inv);
            }
            Ok(())
        })?;
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
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
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Softmax scale: `attention_multiplier`, else 1/sqrt(head_dim).
    scale: f64,
}

impl Attention {
    /// Weights `{q,k,v,o}_proj.weight` (and biases with `attention_bias`; `o_proj.bias` only
    /// for post-norm models), `q_norm.weight` / `k_norm.weight` with `qk_norm`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim(),
        );
        let qkv_bias = cfg.attention_bias;
        let o_bias = cfg.attention_bias && cfg.post_norm;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(Norm::new(cfg, nh * hd, vb.pp("q_norm"))?),
                Some(Norm::new(cfg, nkv * hd, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: Proj::new(h, nh * hd, qkv_bias, vb.pp("q_proj"))?,
            k_proj: Proj::new(h, nkv * hd, qkv_bias, vb.pp("k_proj"))?,
            v_proj: Proj::new(h, nkv * hd, qkv_bias, vb.pp("v_proj"))?,
            o_proj: Proj::new(nh * hd, h, o_bias, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: cfg.attention_multiplier.unwrap_or(1.0 / (hd as f64).sqrt()),
        })
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

    fn keys_values(&self, src: &Tensor, rope: Option<(&Rope, usize)>) -> Result<(Tensor, Tensor)> {
        let mut k = self.k_proj.forward(src)?;
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let mut k = self.heads(&k, self.num_kv_heads)?; // (b, kv, t, d)
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
        self.attend(
            xs,
            rope.map(|r| (r, offset)),
            k,
            v,
            causal,
            offset,
            key_mask,
        )
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
        self.attend(xs, None, k, v, false, 0, memory_mask)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        xs: &Tensor,
        rope: Option<(&Rope, usize)>,
        k: Tensor,
        v: Tensor,
        causal: bool,
        offset: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let mut q = self.q_proj.forward(xs)?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        let mut q = self.heads(&q, self.num_heads)?; // (b, nh, t, d)
        if let Some((r, off)) = rope {
            q = r.apply(&q, off)?;
        }
        let k = self.repeat_kv(k)?; // (b, nh, tk, d)
        let v = self.repeat_kv(v)?;
        let t_k = k.dim(2)?;
        let dtype = q.dtype();
        let scale = self.scale;
        let raw = q.contiguous()?.matmul(&k.t()?.contiguous()?)?; // (b, nh, t, tk)
        if key_mask.is_none()
            && !raw.track_op()
            && raw.dtype() == DType::F32
            && raw.device().is_cpu()
        {
            // Inference without padding: scale, causal mask and softmax in one pass over the
            // scores, skipping the masked keys (no bias tensor, no extra passes).
            let probs = raw.apply_op1_no_bwd(&ScaledCausalSoftmax {
                scale: scale as f32,
                causal,
                offset,
            })?;
            let out = probs.matmul(&v)?; // (b, nh, t, d)
            let out = out
                .transpose(1, 2)?
                .reshape((b, t, self.num_heads * self.head_dim))?;
            return self.o_proj.forward(&out);
        }
        let scores = (raw * scale)?;
        let mut scores = scores.to_dtype(DType::F32)?;
        if let Some(bias) = attention_bias(b, t, t_k, offset, causal, key_mask, xs.device())? {
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = if scores.track_op() {
            softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
        }
        .to_dtype(dtype)?;
        let out = probs.matmul(&v)?; // (b, nh, t, d)
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?; // (b, t, nh·d)
        self.o_proj.forward(&out)
    }
}
