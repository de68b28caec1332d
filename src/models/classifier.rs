//! Sequence classification with a bidirectional MoE encoder, mean or first-token pooling and a
//! linear head.

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::{pool_aux, LayerRouting, Trunk};
use crate::config::{ModelConfig, Pooling};

/// What [`SequenceClassifier::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// Class logits `(b, num_labels)`.
    pub logits: Tensor,
    /// Load-balancing loss pooled over all sparse layers (padding excluded); scalar f32.
    pub load_balancing_loss: Tensor,
    /// Router z-loss pooled over all sparse layers; scalar f32.
    pub z_loss: Tensor,
    /// Per-layer routing statistics.
    pub routing: Vec<LayerRouting>,
    /// The other balance losses (sequence-wise, importance / load; unscaled, `None` when
    /// their coefficient is 0) and every sparse layer's router outputs.
    pub balance: crate::losses::BalanceLosses,
}

/// A bidirectional encoder with a pooled linear classification head.
///
/// Weights: `model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight` (pre-norm)
/// or `model.embed_norm.*` (post-norm), `classifier.weight` `(labels, h)`, `classifier.bias`.
#[derive(Debug)]
pub struct SequenceClassifier {
    pub(super) trunk: Trunk,
    head: Linear,
    cfg: ModelConfig,
}

impl SequenceClassifier {
    /// Builds the classifier with `cfg.num_labels` classes.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated(cfg, vb)
    }

    /// [`Self::new`] for a configuration already validated (the loaders validate it once).
    pub(crate) fn new_validated(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.num_labels == 0 {
            bail!("num_labels must be > 0")
        }
        let embed =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("model.embed_tokens"))?;
        let trunk = Trunk::new(cfg, cfg.num_layers, false, false, embed, vb.pp("model"))?;
        let head = candle_nn::linear(cfg.hidden_size, cfg.num_labels, vb.pp("classifier"))?;
        Ok(Self {
            trunk,
            head,
            cfg: cfg.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Inference forward with an optional padding mask.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `(b, t)` -> `logits` `(b, num_labels)`
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClassifierOutput> {
        self.forward_t(input_ids, None, attention_mask, false)
    }

    /// The encoder's last hidden states `(b, t, h)` (BERT's `last_hidden_state`).
    ///
    /// # Shapes
    /// - `input_ids`, `token_type_ids`, `attention_mask`: `(b, t)` -> `(b, t, h)`
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .trunk
            .forward(
                input_ids,
                token_type_ids,
                attention_mask,
                None,
                None,
                false,
                0,
            )?
            .hidden)
    }

    /// Every sparse layer's trainable selection bias (`gate.e_score_correction_bias`, with
    /// `selection_bias`) with its layer index as in [`LayerRouting::layer`]: what
    /// [`crate::Trainer::track_selection_biases`] updates.
    pub fn selection_biases(&self) -> Vec<(usize, Tensor)> {
        super::selection_biases(&[(&self.trunk, 0)])
    }

    /// The pooled encoder states `(b, h)` (before the head).
    pub fn encode(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Vec<crate::losses::RouterAux>, Vec<LayerRouting>)> {
        let out = self.trunk.forward(
            input_ids,
            token_type_ids,
            attention_mask,
            None,
            None,
            train,
            0,
        )?;
        let pooled = match self.cfg.pooling {
            Pooling::First => out.hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => match attention_mask {
                None => out.hidden.mean(1)?,
                Some(m) => {
                    let m = m.to_dtype(out.hidden.dtype())?.unsqueeze(2)?; // (b, t, 1)
                    let s = out.hidden.broadcast_mul(&m)?.sum(1)?; // (b, h)
                    s.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)?
                }
            },
        };
        Ok((pooled, out.aux, out.routing))
    }

    /// Forward with token types, padding mask and training mode.
    ///
    /// # Shapes
    /// - `input_ids`, `token_type_ids`, `attention_mask`: `(b, t)` -> `logits` `(b, num_labels)`
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<ClassifierOutput> {
        let (pooled, aux, routing) =
            self.encode(input_ids, token_type_ids, attention_mask, train)?;
        let logits = self.head.forward(&pooled)?;
        let masks = match attention_mask {
            Some(m) => Some(vec![m.flatten_all()?.to_dtype(DType::F32)?; aux.len()]),
            None => None,
        };
        let (lb, z, balance) = pool_aux(
            &self.cfg,
            &aux.iter().collect::<Vec<_>>(),
            masks.as_deref(),
            logits.device(),
            logits.dim(0)?,
        )?;
        Ok(ClassifierOutput {
            logits,
            load_balancing_loss: lb,
            z_loss: z,
            routing,
            balance,
        })
    }
}
