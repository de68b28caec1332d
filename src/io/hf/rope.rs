//! RoPE scaling in a Hugging Face `config.json` -> [`RopeScaling`]: transformers 4.x's
//! `rope_scaling: {type | rope_type, factor, ...}` and 5.x's `rope_parameters: {rope_type,
//! rope_theta, factor, ...}`, with the defaults transformers' `standardize_rope_params` and
//! `modeling_rope_utils.py` give missing sub-keys (yarn: `beta_fast` 32, `beta_slow` 1,
//! `truncate` true, `factor` = `max_position_embeddings / original_max_position_embeddings`,
//! `original_max_position_embeddings` = the top-level key of that name, else
//! `max_position_embeddings`). Types other than `default`, `linear`, `dynamic`, `yarn` and
//! `llama3` (`longrope`, `su`, `mrope`, ...) are refused with the key and the value named.
//!
//! Dynamic NTK: transformers 5 reads only `factor` (its threshold is `max_position_embeddings`),
//! so an `original_max_position_embeddings` beside it is ignored here too.

use std::path::Path;

use serde_json::Value;

use super::config::{as_usize, cfg_err, field};
use crate::config::{AttentionSpan, ModelConfig, RopeScaling};
use crate::error::{Error, Result};

/// The RoPE types the crate implements (besides `default`).
const SUPPORTED: &str = "default, linear, dynamic, yarn, llama3";

/// The scaling of a config (`None`: plain RoPE), reading `max_position_embeddings` from `v`
/// where a default needs it. (The entry point for family modules whose configs carry the key.)
#[allow(dead_code)]
pub(super) fn rope_scaling(v: &Value, path: &Path) -> Result<Option<RopeScaling>> {
    rope_scaling_with(v, None, path)
}

/// [`rope_scaling`] with the family's default `max_position_embeddings` for configs that omit
/// the key.
pub(super) fn rope_scaling_with(
    v: &Value,
    default_max_pos: Option<usize>,
    path: &Path,
) -> Result<Option<RopeScaling>> {
    let mut found: Option<(RopeScaling, &str)> = None;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(p) = field(v, key) else { continue };
        let Some(s) = parse(v, p, key, default_max_pos, path)? else {
            continue;
        };
        match &found {
            Some((f, k0)) if *f != s => {
                return Err(cfg_err(
                    path,
                    format!("`{k0}` ({f:?}) and `{key}` ({s:?}) are two spellings of one setting and disagree"),
                ))
            }
            Some(_) => {}
            None => found = Some((s, key)),
        }
    }
    Ok(found.map(|(s, _)| s))
}

/// A number under `p.key` (`None`: absent or null).
fn num(p: &Value, dict: &str, key: &str, path: &Path) -> Result<Option<f64>> {
    match field(p, key) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| cfg_err(path, format!("`{dict}.{key}` must be a number, got {x}"))),
    }
}

fn required(p: &Value, dict: &str, key: &str, kind: &str, path: &Path) -> Result<f64> {
    num(p, dict, key, path)?.ok_or_else(|| {
        cfg_err(
            path,
            format!("`{dict}.{key}` is required for rope_type `{kind}`"),
        )
    })
}

/// `original_max_position_embeddings` as transformers standardises it for yarn and llama3.
fn original_len(
    v: &Value,
    p: &Value,
    dict: &str,
    default_max_pos: Option<usize>,
    path: &Path,
) -> Result<usize> {
    if let Some(x) = field(v, "original_max_position_embeddings") {
        return as_usize(x, "original_max_position_embeddings", path);
    }
    if let Some(x) = field(p, "original_max_position_embeddings") {
        return as_usize(x, &format!("{dict}.original_max_position_embeddings"), path);
    }
    match field(v, "max_position_embeddings") {
        Some(x) => as_usize(x, "max_position_embeddings", path),
        None => default_max_pos.ok_or_else(|| {
            cfg_err(
                path,
                format!("`{dict}.original_max_position_embeddings` is missing and so is `max_position_embeddings`"),
            )
        }),
    }
}

fn parse(
    v: &Value,
    p: &Value,
    dict: &str,
    default_max_pos: Option<usize>,
    path: &Path,
) -> Result<Option<RopeScaling>> {
    if !p.is_object() {
        return Err(cfg_err(
            path,
            format!("`{dict}` must be an object, got {p}"),
        ));
    }
    // Not implemented, and never silently dropped: RoPE parameters per layer type (5.x nested
    // dicts) and partial rotary dimensions.
    for layer_type in ["full_attention", "sliding_attention"] {
        if field(p, layer_type).is_some_and(Value::is_object) {
            return Err(cfg_err(
                path,
                format!("`{dict}.{layer_type}`: RoPE parameters per layer type are not supported"),
            ));
        }
    }
    for (src, key) in [
        (p, format!("{dict}.partial_rotary_factor")),
        (v, "partial_rotary_factor".into()),
    ] {
        if let Some(x) = field(src, "partial_rotary_factor") {
            if x.as_f64() != Some(1.0) {
                return Err(cfg_err(
                    path,
                    format!("`{key}` {x} is not supported (only 1.0: RoPE on the whole head)"),
                ));
            }
        }
    }
    let (kind, kind_key) = match super::config::spelled(p, &["rope_type", "type"], path)? {
        Some((t, k)) => (
            t.as_str()
                .map(str::to_string)
                .ok_or_else(|| cfg_err(path, format!("`{dict}.{k}` must be a string, got {t}")))?,
            k,
        ),
        None => ("default".to_string(), "rope_type".to_string()),
    };
    let factor = || required(p, dict, "factor", &kind, path);
    let scaling = match kind.as_str() {
        "default" => return Ok(None),
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max_position_embeddings: None,
        },
        "yarn" => {
            let orig = original_len(v, p, dict, default_max_pos, path)?;
            let factor = match num(p, dict, "factor", path)? {
                Some(f) => f,
                None => {
                    let max_pos = match field(v, "max_position_embeddings") {
                        Some(x) => as_usize(x, "max_position_embeddings", path)?,
                        None => default_max_pos.unwrap_or(orig),
                    };
                    max_pos as f64 / orig.max(1) as f64
                }
            };
            // transformers: `beta_fast or 32`, `beta_slow or 1` (0 and null take the default).
            let or = |key: &str, d: f64| -> Result<f64> {
                Ok(num(p, dict, key, path)?.filter(|x| *x != 0.0).unwrap_or(d))
            };
            let truncate = match field(p, "truncate") {
                None => true,
                Some(x) => x.as_bool().ok_or_else(|| {
                    cfg_err(
                        path,
                        format!("`{dict}.truncate` must be true or false, got {x}"),
                    )
                })?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast: or("beta_fast", 32.0)?,
                beta_slow: or("beta_slow", 1.0)?,
                mscale: num(p, dict, "mscale", path)?,
                mscale_all_dim: num(p, dict, "mscale_all_dim", path)?,
                attention_factor: num(p, dict, "attention_factor", path)?,
                truncate,
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: required(p, dict, "low_freq_factor", &kind, path)?,
            high_freq_factor: required(p, dict, "high_freq_factor", &kind, path)?,
            original_max_position_embeddings: original_len(v, p, dict, default_max_pos, path)?,
        },
        other => {
            return Err(cfg_err(
                path,
                format!("`{dict}.{kind_key}` `{other}` is not supported (supported: {SUPPORTED})"),
            ))
        }
    };
    scaling
        .validate()
        .map_err(|e| cfg_err(path, format!("`{dict}`: {e}")))?;
    Ok(Some(scaling))
}

/// `scaling` as a transformers `rope_scaling` dict (`rope_type` and the set parameters; null
/// when there is none), for a `config.json` this crate writes.
pub(super) fn hf_rope_scaling(scaling: Option<&RopeScaling>) -> Result<Value> {
    let Some(s) = scaling else {
        return Ok(Value::Null);
    };
    let mut v = serde_json::to_value(s).map_err(|e| Error::Config(format!("rope_scaling: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, x| !x.is_null());
    }
    Ok(v)
}

/// The first position setting of `cfg` transformers' Mixtral cannot express: attention sinks,
/// an output-projection bias, per-head q/k norms, a window on only some layers, or a dynamic
/// NTK threshold other than `max_position_embeddings` (transformers' dynamic NTK has none).
pub(super) fn not_mixtral_positions(cfg: &ModelConfig) -> Option<String> {
    let some_full = cfg.layer_types.contains(&AttentionSpan::FullAttention);
    let dynamic_threshold = matches!(
        cfg.rope_scaling,
        Some(RopeScaling::Dynamic {
            original_max_position_embeddings: Some(o),
            ..
        }) if o != cfg.max_position_embeddings
    );
    [
        (cfg.attention_sinks, "attention sinks (`attention_sinks`)"),
        (
            cfg.attention_out_bias,
            "an output-projection bias (`attention_out_bias`)",
        ),
        (
            cfg.qk_norm_per_head,
            "per-head q/k norms (`qk_norm_per_head`)",
        ),
        (
            cfg.sliding_window.is_some() && some_full,
            "a sliding window on only some layers (`layer_types`)",
        ),
        (
            dynamic_threshold,
            "a dynamic-NTK threshold other than max_position_embeddings",
        ),
    ]
    .iter()
    .find(|c| c.0)
    .map(|c| c.1.to_string())
}
