//! The transformer block: norms, attention (self, and cross in decoders) and a feed-forward
//! that is dense or a sparse mixture of experts, with residual connections.
//!
//! Pre-norm (Xiong et al. 2020; Llama, Mixtral): `x + attn(norm(x))`, `x + ffn(norm(x))`.
//! Post-norm (Vaswani et al. 2017; BERT): `norm(x + attn(x))`, `norm(x + ffn(x))`.
//! Which blocks are sparse is `ModelConfig::sparse_step` (every layer, or every n-th as in
//! Switch/GShard).

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use crate::attention::{Attention, KvCache, Rope, SelfAttention};
use crate::config::ModelConfig;
use crate::dist::{Communicator, ExpertParallelMoe};
use crate::layers::{Dropout, Norm};
use crate::moe::experts::Expert;
use crate::moe::{MoeOutput, SparseMoe};

/// The feed-forward half of a block.
#[derive(Debug)]
pub enum FeedForward {
    /// A dense feed-forward (weights under `mlp`).
    Dense(Expert),
    /// A sparse mixture of experts (weights under `block_sparse_moe`).
    Sparse(Box<SparseMoe>),
    /// A sparse mixture of experts whose experts are sharded over the ranks of a communicator
    /// (weights under `block_sparse_moe`, this rank's experts only).
    ExpertParallel(Box<ExpertParallelMoe>),
}

/// Per-layer caches of a decoding model.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Self-attention keys and values.
    pub self_attn: KvCache,
    /// Cross-attention keys and values of the encoder memory.
    pub cross_attn: KvCache,
}

/// What a block's forward needs besides its input.
#[derive(Debug, Clone, Copy)]
pub struct BlockCtx<'a> {
    /// RoPE tables (None for learned positions).
    pub rope: Option<&'a Rope>,
    /// Causal self-attention.
    pub causal: bool,
    /// Padding mask of the keys of self-attention `(b, t_k)`.
    pub key_mask: Option<&'a Tensor>,
    /// Encoder memory `(b, s, h)` and its padding mask `(b, s)`, for decoder blocks.
    pub memory: Option<(&'a Tensor, Option<&'a Tensor>)>,
    /// Training mode (router noise and dropout on).
    pub train: bool,
    /// Dropout on the attention and feed-forward outputs (training only).
    pub dropout: Option<&'a Dropout>,
    /// Expert ids `(b·t, k)` to force in this block's sparse layer (routing replay,
    /// [`SparseMoe::forward_replay`]); `None` routes normally. A dense block refuses them.
    pub replay: Option<&'a Tensor>,
}

/// One transformer block.
#[derive(Debug)]
pub struct TransformerBlock {
    input_norm: Norm,
    attn: SelfAttention,
    cross: Option<(Norm, Attention)>,
    post_attn_norm: Norm,
    ffn: FeedForward,
    post_norm: bool,
    /// Multiplier on the sublayer outputs before the residual adds (GraniteMoE).
    residual_multiplier: f64,
}

impl TransformerBlock {
    /// Weights (Mixtral names): `input_layernorm`, `self_attn`, `post_attention_layernorm`,
    /// `block_sparse_moe` (sparse) or `mlp` (dense), and for decoder blocks `cross_attn` and
    /// `cross_attn_layernorm`.
    pub fn new(cfg: &ModelConfig, layer: usize, cross: bool, vb: VarBuilder) -> Result<Self> {
        Self::new_with(cfg, layer, cross, vb, None)
    }

    /// [`Self::new`] with the sparse feed-forward an [`ExpertParallelMoe`] over `comm` (this
    /// rank's experts only) when `comm` is given.
    pub fn new_with(
        cfg: &ModelConfig,
        layer: usize,
        cross: bool,
        vb: VarBuilder,
        comm: Option<&Arc<dyn Communicator>>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let ffn = if cfg.is_sparse_layer(layer) {
            let vb = vb.pp("block_sparse_moe");
            match comm {
                Some(c) => FeedForward::ExpertParallel(Box::new(ExpertParallelMoe::new(
                    &cfg.moe,
                    vb,
                    c.clone(),
                )?)),
                None => FeedForward::Sparse(Box::new(SparseMoe::new_validated(&cfg.moe, vb)?)),
            }
        } else {
            FeedForward::Dense(Expert::new_with_bias(
                h,
                cfg.dense_intermediate_size,
                cfg.moe.expert_kind,
                cfg.moe.expert_bias,
                vb.pp("mlp"),
            )?)
        };
        let cross = if cross {
            Some((
                Norm::new(cfg, h, vb.pp("cross_attn_layernorm"))?,
                Attention::new(cfg, vb.pp("cross_attn"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            input_norm: Norm::new(cfg, h, vb.pp("input_layernorm"))?,
            attn: SelfAttention::new(cfg, vb.pp("self_attn"))?
                .with_window(cfg.layer_window(layer))?,
            cross,
            post_attn_norm: Norm::new(cfg, h, vb.pp("post_attention_layernorm"))?,
            ffn,
            post_norm: cfg.post_norm,
            residual_multiplier: cfg.residual_multiplier,
        })
    }

    /// The self-attention, mutably (to attach or merge adapters).
    pub fn attention_mut(&mut self) -> &mut SelfAttention {
        &mut self.attn
    }

    /// The feed-forward, mutably (to attach or merge adapters).
    pub fn feed_forward_mut(&mut self) -> &mut FeedForward {
        &mut self.ffn
    }

    /// The feed-forward of this block.
    pub fn feed_forward(&self) -> &FeedForward {
        &self.ffn
    }

    /// # Shapes
    /// - `xs`: `(b, t, h)` -> `(b, t, h)`, plus the sparse layer's output when there is one
    pub fn forward(
        &self,
        xs: &Tensor,
        ctx: &BlockCtx,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Option<MoeOutput>)> {
        let (self_cache, cross_cache) = match cache {
            Some(c) => (Some(&mut c.self_attn), Some(&mut c.cross_attn)),
            None => (None, None),
        };
        let rm = self.residual_multiplier;
        let drop = |t: Tensor| {
            let t = match ctx.dropout {
                Some(d) => d.forward_t(&t, ctx.train)?,
                None => t,
            };
            if rm == 1.0 {
                Ok(t)
            } else {
                t * rm
            }
        };
        let mut x = if self.post_norm {
            let a = self
                .attn
                .forward_self(xs, ctx.rope, ctx.causal, ctx.key_mask, self_cache)?;
            self.input_norm.forward(&(xs + drop(a)?)?)?
        } else {
            let a = self.attn.forward_self(
                &self.input_norm.forward(xs)?,
                ctx.rope,
                ctx.causal,
                ctx.key_mask,
                self_cache,
            )?;
            (xs + drop(a)?)?
        };
        if let Some((norm, cross)) = &self.cross {
            let Some((mem, mem_mask)) = ctx.memory else {
                bail!("decoder block needs the encoder memory")
            };
            x = if self.post_norm {
                let a = cross.forward_cross(&x, mem, mem_mask, cross_cache)?;
                norm.forward(&(x + drop(a)?)?)?
            } else {
                let a = cross.forward_cross(&norm.forward(&x)?, mem, mem_mask, cross_cache)?;
                (x + drop(a)?)?
            };
        }
        let ffn_in = if self.post_norm {
            x.clone()
        } else {
            self.post_attn_norm.forward(&x)?
        };
        let (f, moe) = match &self.ffn {
            FeedForward::Dense(_) if ctx.replay.is_some() => {
                bail!("routing replay: expert ids given for a dense block")
            }
            FeedForward::Dense(e) => (e.forward(&ffn_in)?, None),
            FeedForward::Sparse(m) => {
                let o = match ctx.replay {
                    Some(ids) => m.forward_replay(&ffn_in, ids, ctx.train)?,
                    // Expert choice skips padding (the key mask of a bidirectional stack
                    // marks the tokens themselves).
                    None if !ctx.causal => m.forward_masked(&ffn_in, ctx.key_mask, ctx.train)?,
                    None => m.forward_t(&ffn_in, ctx.train)?,
                };
                (o.hidden_states.clone(), Some(o))
            }
            FeedForward::ExpertParallel(_) if ctx.replay.is_some() => {
                bail!("routing replay is not supported by an expert-parallel layer")
            }
            FeedForward::ExpertParallel(m) => {
                let o = m.forward_t(&ffn_in, ctx.train)?;
                (o.hidden_states.clone(), Some(o))
            }
        };
        let f = drop(f)?;
        let out = if self.post_norm {
            self.post_attn_norm.forward(&(x + f)?)?
        } else {
            (x + f)?
        };
        Ok((out, moe))
    }
}

/// Checks that `record` holds ids for exactly the sparse blocks of `layers` (numbered from
/// `layer_base`); the error names the first layer that differs.
pub(crate) fn check_replay(
    record: &crate::moe::replay::RoutingRecord,
    layers: &[TransformerBlock],
    layer_base: usize,
) -> Result<()> {
    for (i, b) in layers.iter().enumerate() {
        let sparse = matches!(
            b.feed_forward(),
            FeedForward::Sparse(_) | FeedForward::ExpertParallel(_)
        );
        if sparse && record.get(layer_base + i).is_none() {
            bail!(
                "routing replay: the record has no expert ids for sparse layer {}",
                layer_base + i
            )
        }
    }
    for l in record.layers() {
        let sparse = l
            .layer
            .checked_sub(layer_base)
            .and_then(|i| layers.get(i))
            .is_some_and(|b| matches!(b.feed_forward(), FeedForward::Sparse(_)));
        if !sparse {
            bail!(
                "routing replay: the record has expert ids for layer {}, which is not a sparse layer of this model",
                l.layer
            )
        }
    }
    Ok(())
}
