//! Decoder-only MoE language model (Mixtral layout and weight names).

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::generate::{Sampler, SamplingConfig};
use super::{pool_aux, DecodeCache, LayerRouting, Trunk};
use crate::config::ModelConfig;
use crate::moe::replay::RoutingRecord;

/// What [`CausalLm::forward`] returns.
#[derive(Debug, Clone)]
pub struct CausalLmOutput {
    /// Next-token logits at every position, `(b, t, vocab)`.
    pub logits: Tensor,
    /// Load-balancing loss pooled over all sparse layers exactly as transformers' `aux_loss`
    /// (unscaled by the coefficient); scalar f32.
    pub load_balancing_loss: Tensor,
    /// Router z-loss pooled over all sparse layers; scalar f32.
    pub z_loss: Tensor,
    /// Per-layer routing statistics.
    pub routing: Vec<LayerRouting>,
    /// The other balance losses (sequence-wise, importance / load; unscaled, `None` when
    /// their coefficient is 0) and every sparse layer's router outputs.
    pub balance: crate::losses::BalanceLosses,
    /// Router logits of every sparse layer, `(b·t, E)` each.
    pub router_logits: Vec<Tensor>,
    /// The expert ids every sparse layer chose, `(b·t, k)` each: replay them with
    /// [`CausalLm::forward_replay`].
    pub routing_record: RoutingRecord,
}

/// A decoder-only transformer LM whose feed-forwards are (some or all) sparse MoE layers.
///
/// Weights: `model.embed_tokens.weight`, `model.layers.{i}.*` (see
/// [`TransformerBlock`](crate::block::TransformerBlock)), `model.norm.weight`, and
/// `lm_head.weight` unless the head is tied to the embeddings.
#[derive(Debug)]
pub struct CausalLm {
    pub(super) trunk: Trunk,
    lm_head: Linear,
    pub(super) cfg: ModelConfig,
    pub(super) params: Vec<(String, Tensor)>,
    pub(super) origin: Origin,
    /// The communicator of an expert-parallel model (`None`: every expert is here).
    pub(super) comm: Option<std::sync::Arc<dyn crate::dist::Communicator>>,
}

/// Where a model came from: what `save_pretrained` needs to write it back, and the variables
/// that train it.
#[derive(Clone, Default)]
pub struct Origin {
    /// The Hugging Face `config.json` it was loaded from (`None`: built by the crate).
    pub hf_config: Option<serde_json::Value>,
    /// The checkpoint's `tokenizer.json`, when it had one.
    pub tokenizer_json: Option<String>,
    /// The checkpoint's `generation_config.json`, when it had one.
    pub generation_config: Option<serde_json::Value>,
    /// The trainable variables (loaded with `trainable: true`).
    pub varmap: Option<candle_nn::VarMap>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("hf_config", &self.hf_config.is_some())
            .field("tokenizer_json", &self.tokenizer_json.is_some())
            .field("trainable", &self.varmap.is_some())
            .finish()
    }
}

impl CausalLm {
    /// Builds the model (random weights from a `VarMap`, or loaded from safetensors).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated(cfg, vb)
    }

    /// [`Self::new`] for a configuration already validated (the loaders validate it once).
    pub(crate) fn new_validated(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_validated_with(cfg, vb, None)
    }

    /// [`Self::new_validated`], expert-parallel over `comm` when given.
    pub(super) fn new_validated_with(
        cfg: &ModelConfig,
        vb: VarBuilder,
        comm: Option<std::sync::Arc<dyn crate::dist::Communicator>>,
    ) -> Result<Self> {
        if (0..cfg.num_layers).any(|i| cfg.is_sparse_layer(i)) {
            if let Err(e) = cfg
                .moe
                .check_causal_routing("a CausalLm (decoder-only, causal)")
            {
                bail!("{e}")
            }
        }
        let (vb, log) = super::recording(vb);
        let embed =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("model.embed_tokens"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let trunk = Trunk::new_with(
            cfg,
            cfg.num_layers,
            true,
            false,
            embed,
            vb.pp("model"),
            comm.as_ref(),
        )?;
        let params = std::mem::take(&mut *crate::ops::lock(&log));
        Ok(Self {
            trunk,
            lm_head,
            cfg: cfg.clone(),
            params,
            origin: Origin::default(),
            comm,
        })
    }

    /// The model's parameters under its own names (`model.layers.0.block_sparse_moe.gate.weight`,
    /// ...), in construction order. For a trainable model these are the variables' tensors.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The trainable variables when the model was loaded with `trainable: true` (what
    /// [`Trainer`](crate::Trainer) and candle-nn optimizers train); `None` for frozen models.
    pub fn varmap(&self) -> Option<&candle_nn::VarMap> {
        self.origin.varmap.as_ref()
    }

    /// Where the model came from (its Hugging Face config, tokenizer, variables).
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Sets where the model came from (used by the loaders).
    pub fn set_origin(&mut self, origin: Origin) {
        self.origin = origin;
    }

    /// Turns the model into an inference model over plain tensors holding the current
    /// weights (no copy): every fast path applies (fused experts, fused norms and softmax) and
    /// [`Self::varmap`] becomes `None`.
    pub fn freeze(&mut self) -> Result<()> {
        *self = self.frozen_copy()?;
        Ok(())
    }

    /// An inference model over the current weights (shared, not copied), leaving this one
    /// trainable: what evaluation during training uses, so that it takes the fast paths.
    pub fn frozen_copy(&self) -> Result<Self> {
        self.rebuilt_over(std::collections::HashMap::new())
    }

    /// A frozen model over the current weights (detached, not copied), with the tensors in
    /// `replace` (by parameter name) in place of the current ones; the origin is kept, without
    /// variables.
    pub(super) fn rebuilt_over(
        &self,
        mut replace: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        let Some((_, first)) = self.params.first() else {
            bail!("the model has no parameters")
        };
        let (dtype, dev) = (first.dtype(), first.device().clone());
        let map: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), replace.remove(n).unwrap_or_else(|| t.detach())))
            .collect();
        let vb = VarBuilder::from_tensors(map, dtype, &dev);
        let mut frozen = Self::new_validated_with(&self.cfg, vb, self.comm.clone())?;
        frozen.origin = Origin {
            varmap: None,
            ..self.origin.clone()
        };
        Ok(frozen)
    }

    /// Whether the parameters are trainable variables.
    pub fn is_trainable(&self) -> bool {
        self.params.iter().any(|(_, t)| t.is_variable())
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Inference forward on a fresh context (no cache, no router noise).
    ///
    /// # Shapes
    /// - `input_ids`: `(b, t)` u32 -> `logits` `(b, t, vocab)`
    pub fn forward(&self, input_ids: &Tensor) -> Result<CausalLmOutput> {
        self.forward_t(input_ids, None, false)
    }

    /// Forward with an optional padding mask (1 = token, 0 = padding) and training mode.
    /// Padding rows are excluded from the load-balancing loss, as transformers excludes them.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `(b, t)` -> `logits` `(b, t, vocab)`
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<CausalLmOutput> {
        let out = self
            .trunk
            .forward(input_ids, None, attention_mask, None, None, train, 0)?;
        self.finish(out, attention_mask)
    }

    /// [`Self::forward_t`] with the expert ids of `record` forced in every sparse layer
    /// (routing replay, see [`crate::moe::replay`]): typically the `routing_record` of an
    /// earlier forward of the same batch (e.g. the rollout, before the weights changed). The
    /// gate weights come from the current routers, so gradients reach them. The record must
    /// hold `(b·t, k)` ids for exactly the model's sparse layers.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `(b, t)` -> `logits` `(b, t, vocab)`
    pub fn forward_replay(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        record: &RoutingRecord,
        train: bool,
    ) -> Result<CausalLmOutput> {
        let out = self.trunk.forward_replay(
            input_ids,
            None,
            attention_mask,
            None,
            None,
            train,
            0,
            Some(record),
        )?;
        self.finish(out, attention_mask)
    }

    /// Incremental decoding: `input_ids` are the next positions after those in `cache`.
    ///
    /// # Shapes
    /// - `input_ids`: `(b, t_new)` -> `logits` `(b, t_new, vocab)`
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut DecodeCache,
    ) -> Result<CausalLmOutput> {
        let out = self
            .trunk
            .forward(input_ids, None, None, None, Some(cache), false, 0)?;
        self.finish(out, None)
    }

    /// Logits of the last position only, `(b, vocab)`, optionally extending `cache`: what
    /// prefill and sampling need, without the `(b, t, vocab)` head over every position.
    ///
    /// # Shapes
    /// - `input_ids`: `(b, t)` -> `(b, vocab)`
    pub fn last_logits(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut DecodeCache>,
    ) -> Result<Tensor> {
        let out = self
            .trunk
            .forward(input_ids, None, None, None, cache, false, 0)?;
        let t = out.hidden.dim(1)?;
        let last = out.hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // (b, h)
        self.head(&last)
    }

    /// The LM head, with GraniteMoE's `logits_scaling` (logits divided by it).
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        let s = self.cfg.logits_scaling;
        if s == 1.0 {
            Ok(logits)
        } else {
            logits / s
        }
    }

    /// A cache sized for this model.
    pub fn new_cache(&self) -> DecodeCache {
        DecodeCache::new(self.trunk.num_layers())
    }

    /// Every sparse layer's trainable selection bias (`gate.e_score_correction_bias`, with
    /// `selection_bias`) with its layer index as in [`LayerRouting::layer`]: what
    /// [`crate::Trainer::track_selection_biases`] updates.
    pub fn selection_biases(&self) -> Vec<(usize, Tensor)> {
        super::selection_biases(&[(&self.trunk, 0)])
    }

    /// The blocks (to inspect their sparse layers).
    pub fn layers(&self) -> &[crate::block::TransformerBlock] {
        self.trunk.layers()
    }

    fn finish(&self, out: super::TrunkOut, mask: Option<&Tensor>) -> Result<CausalLmOutput> {
        let logits = self.head(&out.hidden)?; // (b, t, vocab)
        let row_masks = match mask {
            Some(m) => Some(vec![m.flatten_all()?; out.aux.len()]),
            None => None,
        };
        let (mut lb, mut z, balance) = pool_aux(
            &self.cfg,
            &out.aux.iter().collect::<Vec<_>>(),
            row_masks.as_deref(),
            logits.device(),
            logits.dim(0)?,
        )?;
        if let Some(comm) = &self.comm {
            // Over the union of the ranks' tokens (a collective), as the layers' counts are.
            (lb, z) = crate::dist::global_pooled_aux_losses(
                comm,
                &out.aux.iter().collect::<Vec<_>>(),
                row_masks.as_deref(),
                self.cfg.moe.num_experts,
                logits.device(),
            )?;
        }
        Ok(CausalLmOutput {
            logits,
            load_balancing_loss: lb,
            z_loss: z,
            routing: out.routing,
            router_logits: out.router_logits,
            routing_record: out.record,
            balance,
        })
    }

    /// Samples a continuation of `prompt` with the KV cache; returns the new tokens only.
    /// Stops at `cfg.eos_token_id`, after `cfg.max_new_tokens`, or at the maximum length.
    pub fn generate(&self, prompt: &[u32], cfg: &SamplingConfig) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("generate: empty prompt")
        }
        let dev = self.lm_head.weight().device();
        let mut sampler = Sampler::new(cfg.clone());
        let mut cache = self.new_cache();
        let mut out = Vec::new();
        let mut next_input = Tensor::new(prompt, dev)?.unsqueeze(0)?;
        for _ in 0..cfg.max_new_tokens {
            if cache.len() + next_input.dim(1)? > self.cfg.position_limit() {
                break;
            }
            let logits = self.forward_cached(&next_input, &mut cache)?.logits;
            let t = logits.dim(1)?;
            let last = logits
                .narrow(1, t - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let tok = sampler.sample(&last)?;
            out.push(tok);
            if Some(tok) == cfg.eos_token_id {
                break;
            }
            next_input = Tensor::new(&[tok], dev)?.unsqueeze(0)?;
        }
        Ok(out)
    }
}
