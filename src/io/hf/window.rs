//! Sliding-window attention in a Hugging Face `config.json`: `sliding_window` (a positive
//! window, or null for none) and `layer_types` (`"full_attention"` / `"sliding_attention"` per
//! layer), as [`ModelConfig::sliding_window`](crate::config::ModelConfig) and
//! [`AttentionSpan`]s.
//!
//! Mixtral (and Qwen3-MoE with `use_sliding_window`): a set `sliding_window` slides every layer
//! (transformers builds one sliding mask for all layers). Qwen2-MoE: only with
//! `use_sliding_window`, on the layers `layer_types` names, or when it is absent, on layer `i`
//! iff `i` is even and `i < max_window_layers` (`Qwen2MoeConfig.__post_init__`, 5.24).

use std::path::Path;

use serde_json::Value;

use super::config::{as_usize, bool_field, cfg_err, field, usize_of};
use super::Family;
use crate::config::AttentionSpan;
use crate::error::Result;

/// `sliding_window` as a window: null or absent is none; 0 is refused (it would hide every key).
pub(super) fn sliding_window(v: &Value, path: &Path) -> Result<Option<usize>> {
    match field(v, "sliding_window") {
        None => Ok(None),
        Some(x) => match as_usize(x, "sliding_window", path)? {
            0 => Err(cfg_err(
                path,
                "`sliding_window` must be > 0 (or null for no window)",
            )),
            w => Ok(Some(w)),
        },
    }
}

/// `layer_types` (empty when absent): one known entry per layer.
pub(super) fn layer_types(v: &Value, layers: usize, path: &Path) -> Result<Vec<AttentionSpan>> {
    let Some(t) = field(v, "layer_types") else {
        return Ok(vec![]);
    };
    let kinds = t
        .as_array()
        .ok_or_else(|| cfg_err(path, format!("`layer_types` must be a list, got {t}")))?;
    if kinds.len() != layers {
        return Err(cfg_err(
            path,
            format!(
                "`layer_types` lists {} layers but `num_hidden_layers` is {layers}",
                kinds.len()
            ),
        ));
    }
    kinds
        .iter()
        .map(|k| match k.as_str() {
            Some("full_attention") => Ok(AttentionSpan::FullAttention),
            Some("sliding_attention") => Ok(AttentionSpan::SlidingAttention),
            _ => Err(cfg_err(
                path,
                format!("`layer_types` entry {k} is not supported (\"full_attention\" or \"sliding_attention\")"),
            )),
        })
        .collect()
}

/// The window and per-layer spans of a Mixtral / Qwen2-MoE / OLMoE config.
pub(super) fn spans(
    v: &Value,
    family: Family,
    layers: usize,
    path: &Path,
) -> Result<(Option<usize>, Vec<AttentionSpan>)> {
    let types = layer_types(v, layers, path)?;
    let slides = types.contains(&AttentionSpan::SlidingAttention);
    match family {
        Family::Qwen2Moe => {
            if !bool_field(v, "use_sliding_window", false, path)? {
                if slides {
                    // transformers would use a window of 0 on those layers (no key visible).
                    return Err(cfg_err(
                        path,
                        "`layer_types` has sliding_attention layers but `use_sliding_window` is false",
                    ));
                }
                return Ok((None, types));
            }
            let window = sliding_window(v, path)?.ok_or_else(|| {
                cfg_err(
                    path,
                    "`use_sliding_window` is true but `sliding_window` is null",
                )
            })?;
            if types.is_empty() {
                let max_window = usize_of(v, &["max_window_layers"], 28, path)?;
                let types = (0..layers)
                    .map(|i| {
                        if i % 2 == 0 && i < max_window {
                            AttentionSpan::SlidingAttention
                        } else {
                            AttentionSpan::FullAttention
                        }
                    })
                    .collect();
                return Ok((Some(window), types));
            }
            Ok((Some(window), types))
        }
        Family::Olmoe if field(v, "sliding_window").is_some() => Err(cfg_err(
            path,
            "`sliding_window` is not supported for OLMoE (set it to null)",
        )),
        _ => {
            if slides {
                return Err(cfg_err(
                    path,
                    "`layer_types` with sliding_attention is not supported for this model_type (only \"full_attention\"; use `sliding_window`)",
                ));
            }
            Ok((sliding_window(v, path)?, vec![]))
        }
    }
}
