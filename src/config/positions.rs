//! The position settings of [`ModelConfig`]: RoPE scaling, sliding windows and per-layer
//! attention spans — their validation (errors name the field) and what they mean per layer.

use serde::{Deserialize, Serialize};

use super::ModelConfig;
use crate::error::{Error, Result};

/// The attention span of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionSpan {
    /// Every earlier position (transformers' `full_attention`).
    #[default]
    FullAttention,
    /// The last `sliding_window` positions (transformers' `sliding_attention`).
    SlidingAttention,
}

/// RoPE frequency scaling for contexts longer than the pretraining length, as transformers'
/// `rope_scaling` / `rope_parameters` (`rope_type` names the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Scaling factor (> 0).
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the sequence length past
    /// `original_max_position_embeddings`.
    Dynamic {
        /// Scaling factor (> 0).
        factor: f64,
        /// The pretraining context length (`None`: `max_position_embeddings`).
        original_max_position_embeddings: Option<usize>,
    },
    /// YaRN (Peng et al. 2023): per-frequency interpolation between `beta_fast` and
    /// `beta_slow` rotations, and an attention temperature.
    Yarn {
        /// Scaling factor (> 0).
        factor: f64,
        /// The pretraining context length.
        original_max_position_embeddings: usize,
        /// Fast boundary (rotations), transformers' default 32.
        beta_fast: f64,
        /// Slow boundary (rotations), transformers' default 1.
        beta_slow: f64,
        /// DeepSeek's `mscale` (`None`: not given).
        mscale: Option<f64>,
        /// DeepSeek's `mscale_all_dim` (`None`: not given).
        mscale_all_dim: Option<f64>,
        /// Explicit attention factor (`None`: derived from `factor` and the mscales).
        attention_factor: Option<f64>,
        /// Round the correction range to whole dimensions (transformers' `truncate`, default
        /// true; gpt-oss sets false).
        truncate: bool,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        /// Scaling factor (> 0).
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pretraining context length.
        original_max_position_embeddings: usize,
    },
}

/// The longest sequence a model with dynamic-NTK `scaling` serves: its original length times
/// the factor (transformers places no bound; the base keeps growing), at least `max_pos`.
pub fn dynamic_limit(scaling: &RopeScaling, max_pos: usize) -> usize {
    match scaling {
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings,
        } => {
            let orig = original_max_position_embeddings.unwrap_or(max_pos);
            let scaled = (orig as f64 * factor).floor();
            if scaled.is_finite() && scaled < usize::MAX as f64 {
                max_pos.max(scaled as usize)
            } else {
                max_pos
            }
        }
        _ => max_pos,
    }
}

fn positive(name: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{name} must be finite and > 0, got {v}"
        )))
    }
}

impl RopeScaling {
    /// Checks the parameters; the error names the field (`rope_scaling.<field>`).
    pub fn validate(&self) -> Result<()> {
        let nonzero = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Config(format!("{name} must be > 0")))
            } else {
                Ok(())
            }
        };
        match self {
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", *factor),
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", *factor)?;
                if let Some(o) = original_max_position_embeddings {
                    nonzero("rope_scaling.original_max_position_embeddings", *o)?;
                }
                Ok(())
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => {
                positive("rope_scaling.factor", *factor)?;
                nonzero(
                    "rope_scaling.original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                positive("rope_scaling.beta_fast", *beta_fast)?;
                positive("rope_scaling.beta_slow", *beta_slow)?;
                for (name, v) in [
                    ("rope_scaling.mscale", mscale),
                    ("rope_scaling.mscale_all_dim", mscale_all_dim),
                ] {
                    if let Some(v) = v {
                        if !v.is_finite() {
                            return Err(Error::Config(format!("{name} must be finite, got {v}")));
                        }
                    }
                }
                if let Some(a) = attention_factor {
                    positive("rope_scaling.attention_factor", *a)?;
                }
                Ok(())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", *factor)?;
                positive("rope_scaling.low_freq_factor", *low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::Config(format!(
                        "rope_scaling.high_freq_factor ({high_freq_factor}) must be > low_freq_factor ({low_freq_factor})"
                    )));
                }
                nonzero(
                    "rope_scaling.original_max_position_embeddings",
                    *original_max_position_embeddings,
                )
            }
        }
    }
}

impl ModelConfig {
    /// The sliding window of block `layer`'s self-attention: `sliding_window` when the layer's
    /// span is [`AttentionSpan::SlidingAttention`] (every layer when `layer_types` is empty).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let slides = self.layer_types.is_empty()
            || self.layer_types.get(layer) == Some(&AttentionSpan::SlidingAttention);
        self.sliding_window.filter(|_| slides)
    }

    /// The longest sequence the model accepts: `max_position_embeddings`, or more with
    /// dynamic-NTK RoPE scaling (see [`dynamic_limit`]).
    pub fn position_limit(&self) -> usize {
        match &self.rope_scaling {
            Some(s) => dynamic_limit(s, self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    /// Checks `rope_scaling`, `sliding_window` and `layer_types`.
    pub(super) fn validate_positions(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Some(s) = &self.rope_scaling {
            s.validate()?;
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be > 0 (or null for no window)".into());
        }
        if !self.layer_types.is_empty() {
            let layers = self.num_layers.max(self.num_decoder_layers);
            if self.layer_types.len() != layers {
                return bad(format!(
                    "layer_types lists {} layers but the model has {layers}",
                    self.layer_types.len()
                ));
            }
            let slides = self.layer_types.contains(&AttentionSpan::SlidingAttention);
            if slides && self.sliding_window.is_none() {
                return bad(
                    "layer_types has sliding_attention layers but sliding_window is not set".into(),
                );
            }
        }
        Ok(())
    }
}
