//! Hugging Face `config.json` -> [`ModelConfig`]: the keys each family's transformers config
//! class defines, with that class's defaults.

use std::path::Path;

use serde_json::Value;

use super::Family;
use crate::config::{ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
use crate::error::{Error, Result};

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    let x = field(v, key)
        .ok_or_else(|| Error::Config(format!("{}: missing `{key}`", path.display())))?;
    x.as_u64().map(|u| u as usize).ok_or_else(|| {
        Error::Config(format!(
            "{}: `{key}` must be a non-negative integer, got {x}",
            path.display()
        ))
    })
}

fn opt_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match field(v, key) {
        None => Ok(None),
        Some(_) => usize_field(v, key, path).map(Some),
    }
}

fn f64_field(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| {
            Error::Config(format!(
                "{}: `{key}` must be a number, got {x}",
                path.display()
            ))
        }),
    }
}

fn bool_field(v: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x.as_bool().ok_or_else(|| {
            Error::Config(format!(
                "{}: `{key}` must be true or false, got {x}",
                path.display()
            ))
        }),
    }
}

/// The family named by a config's `model_type`.
pub(crate) fn family_of(v: &Value, path: &Path) -> Result<Family> {
    let mt = field(v, "model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| Error::Config(format!("{}: missing `model_type`", path.display())))?;
    match mt {
        "mixtral" => Ok(Family::Mixtral),
        "qwen2_moe" => Ok(Family::Qwen2Moe),
        "olmoe" => Ok(Family::Olmoe),
        other => Err(Error::Config(format!(
            "{}: unknown model_type `{other}` (supported: mixtral, qwen2_moe, olmoe)",
            path.display()
        ))),
    }
}

/// The RoPE base: top-level `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta`
/// (5.x); both present must agree; missing, the family's default (Mixtral 1e6, others 1e4).
fn rope_theta(v: &Value, family: Family, path: &Path) -> Result<f64> {
    let default = match family {
        Family::Mixtral => 1e6,
        _ => 10_000.0,
    };
    let top = field(v, "rope_theta").map(|_| f64_field(v, "rope_theta", default, path));
    let nested = field(v, "rope_parameters")
        .and_then(|p| field(p, "rope_theta"))
        .map(|x| {
            x.as_f64().ok_or_else(|| {
                Error::Config(format!(
                    "{}: `rope_parameters.rope_theta` must be a number, got {x}",
                    path.display()
                ))
            })
        });
    match (top.transpose()?, nested.transpose()?) {
        (Some(a), Some(b)) if (a - b).abs() > 1e-9 * a.abs().max(1.0) => {
            Err(Error::Config(format!(
                "{}: `rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree",
                path.display()
            )))
        }
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(default),
    }
}

/// Settings the loader does not implement are refused with the key named, never ignored:
/// RoPE scaling other than the default, and sliding-window attention.
fn reject_unsupported(v: &Value, family: Family, path: &Path) -> Result<()> {
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(p) = field(v, key) {
            let kind = field(p, "rope_type")
                .or_else(|| field(p, "type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::Config(format!(
                    "{}: `{key}` of type `{kind}` is not supported (only the default RoPE)",
                    path.display()
                )));
            }
        }
    }
    let sliding = match family {
        Family::Qwen2Moe => bool_field(v, "use_sliding_window", false, path)?,
        _ => field(v, "sliding_window").is_some(),
    };
    if sliding {
        return Err(Error::Config(format!(
            "{}: `sliding_window` attention is not supported (set it to null)",
            path.display()
        )));
    }
    Ok(())
}

/// Maps a Hugging Face `config.json` (already parsed) onto a [`ModelConfig`].
pub fn config_from_hf(v: &Value, path: &Path) -> Result<(Family, ModelConfig)> {
    let family = family_of(v, path)?;
    reject_unsupported(v, family, path)?;
    let hidden = usize_field(v, "hidden_size", path)?;
    let heads = usize_field(v, "num_attention_heads", path)?;
    let (experts, expert_ffn) = match family {
        Family::Mixtral => (
            usize_field(v, "num_local_experts", path)?,
            usize_field(v, "intermediate_size", path)?,
        ),
        Family::Qwen2Moe => (
            usize_field(v, "num_experts", path)?,
            usize_field(v, "moe_intermediate_size", path)?,
        ),
        Family::Olmoe => (
            usize_field(v, "num_experts", path)?,
            usize_field(v, "intermediate_size", path)?,
        ),
    };
    if family == Family::Olmoe && field(v, "clip_qkv").is_some() {
        return Err(Error::Config(format!(
            "{}: `clip_qkv` is not supported",
            path.display()
        )));
    }
    let moe = MoeConfig {
        hidden_size: hidden,
        intermediate_size: expert_ffn,
        num_experts: experts,
        top_k: usize_field(v, "num_experts_per_tok", path)?,
        norm_topk_prob: bool_field(v, "norm_topk_prob", family == Family::Mixtral, path)?,
        capacity_factor: None,
        router_jitter_noise: f64_field(v, "router_jitter_noise", 0.0, path)?,
        noisy_gating: false,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", 0.01, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: false,
        shared_expert_intermediate_size: if family == Family::Qwen2Moe {
            opt_usize(v, "shared_expert_intermediate_size", path)?.unwrap_or(0)
        } else {
            0
        },
        shared_expert_gate: true,
    };
    let mlp_only: Vec<usize> = match field(v, "mlp_only_layers") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|u| u as usize))
            .collect(),
        _ => vec![],
    };
    let cfg = ModelConfig {
        vocab_size: usize_field(v, "vocab_size", path)?,
        hidden_size: hidden,
        num_layers: usize_field(v, "num_hidden_layers", path)?,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: opt_usize(v, "num_key_value_heads", path)?.unwrap_or(heads),
        head_dim: opt_usize(v, "head_dim", path)?,
        max_position_embeddings: opt_usize(v, "max_position_embeddings", path)?.unwrap_or(4096),
        rope_theta: rope_theta(v, family, path)?,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", 1e-6, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias: match family {
            Family::Qwen2Moe => true,
            _ => bool_field(v, "attention_bias", false, path)?,
        },
        qk_norm: family == Family::Olmoe,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        type_vocab_size: 0,
        dense_intermediate_size: opt_usize(v, "intermediate_size", path)?.unwrap_or(expert_ffn),
        sparse_step: if family == Family::Qwen2Moe {
            opt_usize(v, "decoder_sparse_step", path)?.unwrap_or(1)
        } else {
            1
        },
        mlp_only_layers: mlp_only,
        moe,
        num_labels: 0,
        pooling: Default::default(),
        pad_token_id: None,
        hidden_dropout: 0.0,
    };
    cfg.validate()
        .map_err(|e| Error::Config(format!("{}: {}", path.display(), e)))?;
    Ok((family, cfg))
}

/// Reads and maps a Hugging Face `config.json`.
pub fn read_hf_config(path: &Path) -> Result<(Family, ModelConfig)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    config_from_hf(&v, path)
}
