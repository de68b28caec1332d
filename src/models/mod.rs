//! Whole models: a shared trunk (embeddings, blocks, final norm) and three heads.
//!
//! - [`CausalLm`]: decoder-only language model (tied or untied `lm_head`).
//! - [`Seq2Seq`]: encoder-decoder with cross-attention.
//! - [`SequenceClassifier`]: bidirectional encoder, mean or first-token pooling, linear head.
//!
//! Every forward returns its task output, the aux losses pooled over all sparse layers the way
//! transformers pools them (one `load_balancing_loss_func` over the concatenated router logits),
//! and per-layer routing statistics.

pub mod causal_lm;
pub mod classifier;
pub mod generate;
mod lora;
mod parallel;
mod routing;
mod seeds;
pub mod seq2seq;

use candle_core::{bail, DType, Module, Result, Tensor};

use crate::ops::HostRead;
use candle_nn::{Embedding, VarBuilder};

use crate::attention::Rope;
use crate::block::{BlockCtx, LayerCache, TransformerBlock};
use crate::config::{ModelConfig, PositionKind};
use crate::layers::{Dropout, Norm};

pub use causal_lm::{CausalLm, CausalLmOutput, Origin};
pub use classifier::{ClassifierOutput, SequenceClassifier};
pub use routing::{LayerRouting, RoutedOutput};
pub use seq2seq::{Encoded, Seq2Seq, Seq2SeqOutput};

/// KV caches of every block of a decoding model.
#[derive(Debug, Clone, Default)]
pub struct DecodeCache {
    layers: Vec<LayerCache>,
}

impl DecodeCache {
    /// An empty cache for `n` blocks.
    pub fn new(n: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n],
        }
    }
    /// Number of positions already decoded.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.self_attn.len())
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reorders the batch rows of every cached tensor (beam search): row `i` becomes old row
    /// `idx[i]`.
    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut() {
            l.self_attn.reorder(idx)?;
            l.cross_attn.reorder(idx)?;
        }
        Ok(())
    }
}

/// Output of a trunk.
#[derive(Debug, Clone)]
pub(crate) struct TrunkOut {
    pub hidden: Tensor,
    pub router_logits: Vec<Tensor>,
    pub aux: Vec<crate::losses::RouterAux>,
    pub routing: Vec<LayerRouting>,
    /// The expert ids of every token-choice sparse layer.
    pub record: crate::moe::replay::RoutingRecord,
}

/// Embeddings, blocks and final norm, shared by the three models.
#[derive(Debug)]
pub(crate) struct Trunk {
    embed: Embedding,
    positions: Option<Embedding>,
    token_types: Option<Embedding>,
    embed_norm: Option<Norm>,
    layers: Vec<TransformerBlock>,
    norm: Option<Norm>,
    rope: Option<Rope>,
    cfg: ModelConfig,
    causal: bool,
    dropout: Option<Dropout>,
}

/// Checks token ids: `(b, t)` integers, non-empty, below the vocabulary, within the maximum
/// length; returns them as u32.
pub(crate) fn check_ids(ids: &Tensor, cfg: &ModelConfig, offset: usize) -> Result<Tensor> {
    let (b, t) = match ids.dims() {
        [b, t] => (*b, *t),
        d => bail!("input_ids must be (batch, seq), got shape {d:?}"),
    };
    if b == 0 || t == 0 {
        bail!("empty batch: input_ids has shape ({b}, {t})")
    }
    if ids.dtype().is_float() {
        bail!("input_ids must be integer token ids, got {:?}", ids.dtype())
    }
    if offset + t > cfg.position_limit() {
        bail!(
            "sequence length {} exceeds the model's max_position_embeddings {}",
            offset + t,
            cfg.position_limit()
        )
    }
    // Range-check in the ids' own dtype before any cast, so that a negative or huge id cannot
    // wrap around into the vocabulary.
    let vocab = cfg.vocab_size;
    match ids.dtype() {
        DType::U8 | DType::U32 => {
            let ids = ids.to_dtype(DType::U32)?;
            let max = ids.max_all()?.host_scalar::<u32>()?;
            if max as usize >= vocab {
                bail!("token id {max} is out of range for vocab_size {vocab}")
            }
            Ok(ids)
        }
        DType::I16 | DType::I32 | DType::I64 => {
            // Widening to i64 is lossless for every signed dtype.
            let wide = ids.to_dtype(DType::I64)?;
            let min = wide.min_all()?.host_scalar::<i64>()?;
            if min < 0 {
                bail!("token id {min} is negative: ids must be in 0..{vocab}")
            }
            let max = wide.max_all()?.host_scalar::<i64>()?;
            if max as u64 >= vocab as u64 {
                bail!("token id {max} is out of range for vocab_size {vocab}")
            }
            wide.to_dtype(DType::U32)
        }
        d => bail!("input_ids must be integer token ids (u8, u32, i16, i32 or i64), got {d:?}"),
    }
}

impl Trunk {
    pub(crate) fn new(
        cfg: &ModelConfig,
        num_layers: usize,
        causal: bool,
        cross: bool,
        embed: Embedding,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::new_with(cfg, num_layers, causal, cross, embed, vb, None)
    }

    /// [`Self::new`] with expert-parallel sparse layers over `comm` when given.
    pub(crate) fn new_with(
        cfg: &ModelConfig,
        num_layers: usize,
        causal: bool,
        cross: bool,
        embed: Embedding,
        vb: VarBuilder,
        comm: Option<&std::sync::Arc<dyn crate::dist::Communicator>>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let (positions, rope) = match cfg.position {
            PositionKind::Learned => (
                Some(candle_nn::embedding(
                    cfg.max_position_embeddings,
                    h,
                    vb.pp("embed_positions"),
                )?),
                None,
            ),
            PositionKind::Rope => (
                None,
                Some(Rope::with_scaling(
                    cfg.head_dim(),
                    cfg.max_position_embeddings,
                    cfg.rope_theta,
                    cfg.rope_scaling.clone(),
                    vb.dtype(),
                    vb.device(),
                )?),
            ),
        };
        let token_types = if cfg.type_vocab_size > 0 {
            Some(candle_nn::embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?)
        } else {
            None
        };
        let (embed_norm, norm) = if cfg.post_norm {
            (Some(Norm::new(cfg, h, vb.pp("embed_norm"))?), None)
        } else {
            (None, Some(Norm::new(cfg, h, vb.pp("norm"))?))
        };
        let layers = (0..num_layers)
            .map(|i| TransformerBlock::new_with(cfg, i, cross, vb.pp(format!("layers.{i}")), comm))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            positions,
            token_types,
            embed_norm,
            layers,
            norm,
            rope,
            cfg: cfg.clone(),
            causal,
            // Encoder and decoder trunks draw different masks.
            dropout: if cfg.hidden_dropout > 0.0 {
                Some(Dropout::new(cfg.hidden_dropout, 0xd0_u64 + cross as u64)?)
            } else {
                None
            },
        })
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Restarts every generator of this trunk (dropout masks; each sparse layer's router noise
    /// and jitter) from streams of `seed` derived per `part` (encoder 0, decoder 1) and per layer.
    pub(crate) fn reseed(&self, seed: u64, part: u64) {
        if let Some(d) = &self.dropout {
            d.set_seed(crate::ops::stream_seed(seed, &[part, u64::MAX]));
        }
        for (l, b) in self.layers.iter().enumerate() {
            let s = crate::ops::stream_seed(seed, &[part, l as u64]);
            match b.feed_forward() {
                crate::block::FeedForward::Sparse(m) => m.set_seed(s),
                crate::block::FeedForward::ExpertParallel(m) => m.set_seed(s),
                crate::block::FeedForward::Dense(_) => {}
            }
        }
    }

    pub(crate) fn layers(&self) -> &[TransformerBlock] {
        &self.layers
    }

    pub(crate) fn layers_mut(&mut self) -> &mut [TransformerBlock] {
        &mut self.layers
    }

    /// # Shapes
    /// - `ids`: `(b, t)`; `type_ids`: `(b, t)`; `key_mask`: `(b, offset + t)`;
    ///   memory `(b, s, h)` with mask `(b, s)`; returns hidden `(b, t, h)`
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        ids: &Tensor,
        type_ids: Option<&Tensor>,
        key_mask: Option<&Tensor>,
        memory: Option<(&Tensor, Option<&Tensor>)>,
        cache: Option<&mut DecodeCache>,
        train: bool,
        layer_base: usize,
    ) -> Result<TrunkOut> {
        self.forward_replay(
            ids, type_ids, key_mask, memory, cache, train, layer_base, None,
        )
    }

    /// [`Self::forward`] with the expert ids of `replay` forced in the sparse layers (every
    /// sparse layer of the stack must be recorded, and nothing else).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_replay(
        &self,
        ids: &Tensor,
        type_ids: Option<&Tensor>,
        key_mask: Option<&Tensor>,
        memory: Option<(&Tensor, Option<&Tensor>)>,
        mut cache: Option<&mut DecodeCache>,
        train: bool,
        layer_base: usize,
        replay: Option<&crate::moe::replay::RoutingRecord>,
    ) -> Result<TrunkOut> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let ids = check_ids(ids, &self.cfg, offset)?;
        let (b, t) = ids.dims2()?;
        let mut x = self.embed.forward(&ids)?; // (b, t, h)
        if self.cfg.embedding_multiplier != 1.0 {
            x = (x * self.cfg.embedding_multiplier)?;
        }
        if let Some(p) = &self.positions {
            let pos = Tensor::arange(offset as u32, (offset + t) as u32, ids.device())?;
            x = x.broadcast_add(&p.forward(&pos)?.unsqueeze(0)?)?;
        }
        if let Some(tt) = &self.token_types {
            let types = match type_ids {
                Some(ty) => ty.to_dtype(DType::U32)?,
                None => Tensor::zeros((b, t), DType::U32, ids.device())?,
            };
            x = (x + tt.forward(&types)?)?;
        }
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        if let Some(d) = &self.dropout {
            x = d.forward_t(&x, train)?;
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                *c = DecodeCache::new(self.layers.len());
            }
        }
        let ctx = BlockCtx {
            rope: self.rope.as_ref(),
            causal: self.causal,
            key_mask,
            memory,
            train,
            dropout: self.dropout.as_ref(),
            replay: None,
        };
        if let Some(r) = replay {
            crate::block::check_replay(r, &self.layers, layer_base)?;
        }
        let mut router_logits = Vec::new();
        let mut aux = Vec::new();
        let mut routing = Vec::new();
        let mut record = crate::moe::replay::RoutingRecord::default();
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let ctx = BlockCtx {
                replay: replay.and_then(|r| r.get(layer_base + i)),
                ..ctx
            };
            let (y, moe) = layer.forward(&x, &ctx, lc)?;
            x = y;
            if let Some(m) = moe {
                if let Some(e) = &m.expert_ids {
                    record.push(layer_base + i, e.clone());
                }
                // An expert-parallel layer's counts are global: so is its token count.
                let tokens = match layer.feed_forward() {
                    crate::block::FeedForward::ExpertParallel(_) => {
                        (m.expert_counts.iter().sum::<usize>() + m.dropped)
                            / self.cfg.moe.top_k.max(1)
                    }
                    _ => b * t,
                };
                routing.push(LayerRouting {
                    layer: layer_base + i,
                    tokens,
                    top_k: self.cfg.moe.top_k,
                    expert_counts: m.expert_counts,
                    dropped: m.dropped,
                    router: m.stats,
                });
                router_logits.push(m.router_logits);
                aux.push(m.aux);
            }
        }
        if let Some(n) = &self.norm {
            x = n.forward(&x)?;
        }
        Ok(TrunkOut {
            hidden: x,
            router_logits,
            aux,
            routing,
            record,
        })
    }
}

/// The aux losses pooled over the given layers' router outputs (see
/// [`crate::losses::pooled_aux_losses`]), and the other balance losses
/// ([`crate::losses::BalanceLosses::pooled`], sequences of `batch` rows each layer).
pub(crate) fn pool_aux(
    cfg: &ModelConfig,
    aux: &[&crate::losses::RouterAux],
    row_masks: Option<&[Tensor]>,
    dev: &candle_core::Device,
    batch: usize,
) -> Result<(Tensor, Tensor, crate::losses::BalanceLosses)> {
    let (lb, z) = crate::losses::pooled_aux_losses(aux, row_masks, cfg.moe.num_experts, dev)?;
    let mut layers: Vec<crate::losses::RouterAux> = aux.iter().map(|a| (*a).clone()).collect();
    if let Some(masks) = row_masks {
        let mut host: Option<(candle_core::TensorId, Vec<f32>)> = None;
        for (a, m) in layers.iter_mut().zip(masks) {
            let v = match &host {
                Some((id, v)) if *id == m.id() => v.clone(),
                _ => m.flatten_all()?.to_dtype(DType::F32)?.host_vec1::<f32>()?,
            };
            host = Some((m.id(), v.clone()));
            a.row_mask = Some(v);
        }
    }
    let balance = crate::losses::BalanceLosses::pooled(&layers, batch, cfg.moe.num_experts)?;
    Ok((lb, z, balance))
}

/// Every sparse layer's selection bias (`gate.e_score_correction_bias`) of `trunks`, with the
/// layer index its [`LayerRouting::layer`] carries (a trunk's layers numbered from its base).
pub(crate) fn selection_biases(trunks: &[(&Trunk, usize)]) -> Vec<(usize, Tensor)> {
    let mut out = Vec::new();
    for (trunk, base) in trunks {
        for (i, b) in trunk.layers().iter().enumerate() {
            let router = match b.feed_forward() {
                crate::block::FeedForward::Sparse(m) => m.router(),
                crate::block::FeedForward::ExpertParallel(m) => m.router(),
                crate::block::FeedForward::Dense(_) => continue,
            };
            if let Some(bias) = router.selection_bias() {
                out.push((base + i, bias.clone()));
            }
        }
    }
    out
}

/// Every parameter a model asked its `VarBuilder` for, under the model's own (Mixtral-style)
/// names, in request order: what `save_pretrained` writes and `freeze` rebuilds from.
pub(crate) type ParamLog = std::sync::Arc<std::sync::Mutex<Vec<(String, Tensor)>>>;

/// A `VarBuilder` backend that forwards to `inner` and records what it hands out.
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    log: ParamLog,
}

impl candle_nn::var_builder::SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        crate::ops::lock(&self.log).push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        crate::ops::lock(&self.log).push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Wraps `vb` so that every parameter built through it is recorded in the returned log.
pub(crate) fn recording(vb: VarBuilder<'_>) -> (VarBuilder<'_>, ParamLog) {
    let log = ParamLog::default();
    let (dtype, dev) = (vb.dtype(), vb.device().clone());
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend + '_> = Box::new(Recorder {
        inner: vb,
        log: log.clone(),
    });
    (VarBuilder::from_backend(backend, dtype, dev), log)
}
