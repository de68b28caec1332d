//! Hugging Face `config.json` -> [`ModelConfig`]: the keys each family's transformers config
//! class defines, under both their transformers 4.x and 5.x spellings, with that class's
//! defaults (transformers 5.24 `configuration_{mixtral,qwen2_moe,olmoe}.py`, the same values as
//! 4.x), and configs whose keys contradict each other refused with both keys named.
//!
//! Spellings read: `dtype` (5.x) / `torch_dtype` (4.x); `rope_parameters.rope_theta` (5.x) /
//! `rope_theta` (4.x); `rope_parameters.rope_type` (5.x) / `rope_scaling.{rope_type,type}`
//! (4.x); `num_local_experts` / `num_experts` (Mixtral and OLMoE map one onto the other);
//! Qwen2-MoE `qkv_bias` (5.x; 4.x always has the biases); `head_dim: null` (= hidden / heads);
//! `num_key_value_heads: null` (= heads). Both spellings present with different values is an
//! error.

use std::path::Path;

use serde_json::Value;

use super::defaults::{defaults, Defaults};
use super::Family;
use crate::config::{ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
use crate::error::{Error, Result};

pub(super) fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

pub(super) fn cfg_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{}: {msg}", path.display()))
}

pub(super) fn as_usize(x: &Value, key: &str, path: &Path) -> Result<usize> {
    x.as_u64()
        .and_then(|u| usize::try_from(u).ok())
        .ok_or_else(|| {
            cfg_err(
                path,
                format!("`{key}` must be a non-negative integer, got {x}"),
            )
        })
}

/// The value of the first of `keys` present (not null); when several are present (the 4.x and
/// 5.x spellings of one setting) they must agree.
pub(super) fn spelled<'a>(
    v: &'a Value,
    keys: &[&str],
    path: &Path,
) -> Result<Option<(&'a Value, String)>> {
    let mut found: Option<(&Value, String)> = None;
    for k in keys {
        if let Some(x) = field(v, k) {
            match &found {
                Some((y, k0)) if !same_value(x, y) => {
                    return Err(cfg_err(
                        path,
                        format!("`{k0}` ({y}) and `{k}` ({x}) are two spellings of one setting and disagree"),
                    ))
                }
                Some(_) => {}
                None => found = Some((x, k.to_string())),
            }
        }
    }
    Ok(found)
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

pub(super) fn usize_of(v: &Value, keys: &[&str], default: usize, path: &Path) -> Result<usize> {
    match spelled(v, keys, path)? {
        None => Ok(default),
        Some((x, k)) => as_usize(x, &k, path),
    }
}

pub(super) fn f64_field(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| cfg_err(path, format!("`{key}` must be a number, got {x}"))),
    }
}

pub(super) fn bool_field(v: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| cfg_err(path, format!("`{key}` must be true or false, got {x}"))),
    }
}

/// The family named by a config's `model_type`.
pub(crate) fn family_of(v: &Value, path: &Path) -> Result<Family> {
    let mt = field(v, "model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| cfg_err(path, "missing `model_type`"))?;
    match mt {
        "mixtral" => Ok(Family::Mixtral),
        "qwen2_moe" => Ok(Family::Qwen2Moe),
        "olmoe" => Ok(Family::Olmoe),
        "qwen3_moe" => Ok(Family::Qwen3Moe),
        "deepseek_v2" => Ok(Family::DeepseekV2),
        "deepseek_v3" => Ok(Family::DeepseekV3),
        "gpt_oss" => Ok(Family::GptOss),
        "granitemoe" => Ok(Family::GraniteMoe),
        other => Err(cfg_err(
            path,
            format!(
                "unknown model_type `{other}` (supported: {})",
                Family::MODEL_TYPES.join(", ")
            ),
        )),
    }
}

/// The RoPE base: top-level `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta`
/// (5.x); both present must agree; missing, the family's default (Mixtral 1e6, others 1e4).
pub(super) fn rope_theta(v: &Value, default: f64, path: &Path) -> Result<f64> {
    let top = field(v, "rope_theta").map(|_| f64_field(v, "rope_theta", default, path));
    let nested = field(v, "rope_parameters")
        .and_then(|p| field(p, "rope_theta"))
        .map(|x| {
            x.as_f64().ok_or_else(|| {
                cfg_err(
                    path,
                    format!("`rope_parameters.rope_theta` must be a number, got {x}"),
                )
            })
        });
    let theta = match (top.transpose()?, nested.transpose()?) {
        (Some(a), Some(b)) if (a - b).abs() > 1e-9 * a.abs().max(1.0) => {
            return Err(cfg_err(
                path,
                format!("`rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree"),
            ))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => default,
    };
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(cfg_err(
            path,
            format!("`rope_theta` must be a positive number, got {theta}"),
        ));
    }
    Ok(theta)
}

/// Settings the loader does not implement are refused with the key named, never ignored:
/// activations other than SiLU, OLMoE's `clip_qkv`. (RoPE scaling and sliding windows are
/// read by `rope.rs` and `window.rs`, which refuse what they do not implement.)
pub(super) fn reject_unsupported(v: &Value, family: Family, path: &Path) -> Result<()> {
    if let Some(act) = field(v, "hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(cfg_err(
                path,
                format!("`hidden_act` {act} is not supported (only \"silu\")"),
            ));
        }
    }
    if family == Family::Olmoe && field(v, "clip_qkv").is_some() {
        return Err(cfg_err(path, "`clip_qkv` is not supported"));
    }
    // The weights' dtype under either spelling (the loader converts to `LoadOptions::dtype`).
    if let Some((d, k)) = spelled(v, &["dtype", "torch_dtype"], path)? {
        if !d.is_string() {
            return Err(cfg_err(path, format!("`{k}` must be a string, got {d}")));
        }
    }
    Ok(())
}

/// Maps a Hugging Face `config.json` (already parsed) onto a [`ModelConfig`].
pub fn config_from_hf(v: &Value, path: &Path) -> Result<(Family, ModelConfig)> {
    if !v.is_object() {
        return Err(cfg_err(path, "not a JSON object"));
    }
    let family = family_of(v, path)?;
    match family {
        Family::Mixtral | Family::Qwen2Moe | Family::Olmoe => {}
        Family::Qwen3Moe => return super::qwen3::config(v, path).map(|c| (family, c)),
        Family::GraniteMoe => return super::granite::config(v, path).map(|c| (family, c)),
        Family::DeepseekV2 | Family::DeepseekV3 => {
            return super::deepseek::config(v, family, path).map(|c| (family, c))
        }
        Family::GptOss => return super::gpt_oss::config(v, path).map(|c| (family, c)),
    }
    reject_unsupported(v, family, path)?;
    let d = defaults(family);
    let att = attention_of(v, family, &d, path)?;
    let intermediate = usize_of(v, &["intermediate_size"], d.intermediate_size, path)?;
    let moe = moe_config(v, family, &d, att.hidden, intermediate, path)?;
    let layers = usize_of(v, &["num_hidden_layers"], d.num_hidden_layers, path)?;
    let (sparse_step, mlp_only_layers) = sparsity(v, family, layers, path)?;
    let (sliding_window, layer_types) = super::window::spans(v, family, layers, path)?;
    let max_pos = usize_of(
        v,
        &["max_position_embeddings"],
        d.max_position_embeddings,
        path,
    )?;
    let rope_scaling = super::rope::rope_scaling_with(v, Some(max_pos), path)?;
    let cfg = ModelConfig {
        vocab_size: usize_of(v, &["vocab_size"], d.vocab_size, path)?,
        hidden_size: att.hidden,
        num_layers: layers,
        num_decoder_layers: 0,
        num_heads: att.heads,
        num_kv_heads: att.kv_heads,
        head_dim: att.head_dim,
        max_position_embeddings: max_pos,
        rope_theta: rope_theta(v, d.rope_theta, path)?,
        rope_scaling,
        sliding_window,
        layer_types,
        attention_sinks: false,
        attention_out_bias: false,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", d.rms_norm_eps, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias: match family {
            // 4.x Qwen2-MoE always has q/k/v biases; 5.x names them `qkv_bias` (default true).
            Family::Qwen2Moe => bool_field(v, "qkv_bias", true, path)?,
            Family::Olmoe => bool_field(v, "attention_bias", false, path)?,
            // transformers' Mixtral has no attention biases (its config has no such key).
            _ => false,
        },
        qk_norm: family == Family::Olmoe,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        type_vocab_size: 0,
        dense_intermediate_size: intermediate,
        sparse_step,
        mlp_only_layers,
        moe,
        num_labels: 0,
        pooling: Default::default(),
        pad_token_id: None,
        hidden_dropout: 0.0,
        qk_norm_per_head: false,
        mla: None,
        ..ModelConfig::default()
    };
    cfg.validate().map_err(|e| cfg_err(path, e))?;
    Ok((family, cfg))
}

/// The attention geometry of a Hugging Face config.
pub(super) struct AttentionSizes {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: Option<usize>,
}

/// Reads `hidden_size`, the head counts and `head_dim`, checking that they fit together.
pub(super) fn attention_of(
    v: &Value,
    family: Family,
    d: &Defaults,
    path: &Path,
) -> Result<AttentionSizes> {
    let hidden = usize_of(v, &["hidden_size"], d.hidden_size, path)?;
    let heads = usize_of(v, &["num_attention_heads"], d.num_attention_heads, path)?;
    let kv_heads = match spelled(v, &["num_key_value_heads"], path)? {
        Some((x, k)) => as_usize(x, &k, path)?,
        // Absent: the class default; `null`: the number of heads (the classes' __post_init__).
        None if v.get("num_key_value_heads").is_some() => heads,
        None => d.num_key_value_heads.unwrap_or(heads),
    };
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(cfg_err(
            path,
            format!("`num_key_value_heads` ({kv_heads}) must be > 0 and divide `num_attention_heads` ({heads})"),
        ));
    }
    let head_dim = spelled(v, &["head_dim"], path)?
        .map(|(x, k)| as_usize(x, &k, path))
        .transpose()?;
    match head_dim {
        // OLMoE's q_norm / k_norm are sized hidden_size and (hidden / heads) * kv_heads.
        Some(hd) if family == Family::Olmoe && hd.checked_mul(heads) != Some(hidden) => {
            return Err(cfg_err(
                path,
                format!("`head_dim` ({hd}) × `num_attention_heads` ({heads}) must equal `hidden_size` ({hidden}) for OLMoE"),
            ))
        }
        Some(0) => return Err(cfg_err(path, "`head_dim` must be > 0")),
        None if !hidden.is_multiple_of(heads) => {
            return Err(cfg_err(
                path,
                format!("`hidden_size` ({hidden}) must be divisible by `num_attention_heads` ({heads}) when `head_dim` is not set"),
            ))
        }
        _ => {}
    }
    Ok(AttentionSizes {
        hidden,
        heads,
        kv_heads,
        head_dim,
    })
}

/// The sparse layers' [`MoeConfig`]: expert count and width, top-k, router settings and the
/// Qwen2-MoE shared expert, under each family's spellings and defaults.
pub(super) fn moe_config(
    v: &Value,
    family: Family,
    d: &Defaults,
    hidden: usize,
    intermediate: usize,
    path: &Path,
) -> Result<MoeConfig> {
    let experts_keys: &[&str] = match family {
        Family::Mixtral => &["num_local_experts", "num_experts"],
        Family::Olmoe => &["num_experts", "num_local_experts"],
        _ => &["num_experts"],
    };
    let experts = usize_of(v, experts_keys, d.num_experts, path)?;
    let expert_ffn = match family {
        Family::Qwen2Moe => usize_of(v, &["moe_intermediate_size"], d.moe_intermediate_size, path)?,
        _ => intermediate,
    };
    let top_k = top_k_of(v, experts, d.num_experts_per_tok, path)?;
    Ok(MoeConfig {
        hidden_size: hidden,
        intermediate_size: expert_ffn,
        num_experts: experts,
        top_k,
        // transformers' Mixtral always renormalises (its config has no such key).
        norm_topk_prob: match family {
            Family::Mixtral => true,
            _ => bool_field(v, "norm_topk_prob", d.norm_topk_prob, path)?,
        },
        capacity_factor: None,
        router_jitter_noise: match family {
            Family::Mixtral => f64_field(v, "router_jitter_noise", 0.0, path)?,
            _ => 0.0,
        },
        noisy_gating: false,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", d.router_aux_loss_coef, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: false,
        shared_expert_intermediate_size: match family {
            Family::Qwen2Moe => usize_of(
                v,
                &["shared_expert_intermediate_size"],
                d.shared_expert_intermediate_size,
                path,
            )?,
            _ => 0,
        },
        shared_expert_gate: true,
        ..MoeConfig::default()
    })
}

/// Which of the `layers` are sparse: Qwen2-MoE's `decoder_sparse_step` and `mlp_only_layers`, in
/// that order; also checks that `layer_types` lists every layer.
pub(super) fn sparsity(
    v: &Value,
    family: Family,
    layers: usize,
    path: &Path,
) -> Result<(usize, Vec<usize>)> {
    let mlp_only: Vec<usize> = match (family, field(v, "mlp_only_layers")) {
        (Family::Qwen2Moe, Some(Value::Array(a))) => a
            .iter()
            .map(|x| as_usize(x, "mlp_only_layers", path))
            .collect::<Result<_>>()?,
        (Family::Qwen2Moe, Some(x)) => {
            return Err(cfg_err(
                path,
                format!("`mlp_only_layers` must be a list of layer indices, got {x}"),
            ))
        }
        _ => vec![],
    };
    let sparse_step = match family {
        Family::Qwen2Moe => usize_of(v, &["decoder_sparse_step"], 1, path)?,
        _ => 1,
    };
    if sparse_step == 0 {
        // transformers computes `(layer + 1) % decoder_sparse_step`.
        return Err(cfg_err(path, "`decoder_sparse_step` must be >= 1"));
    }
    if let Some(t) = field(v, "layer_types").and_then(|t| t.as_array()) {
        if t.len() != layers {
            return Err(cfg_err(
                path,
                format!(
                    "`layer_types` lists {} layers but `num_hidden_layers` is {layers}",
                    t.len()
                ),
            ));
        }
    }
    Ok((sparse_step, mlp_only))
}

/// `num_experts_per_tok` (default `default`), checked to be between 1 and `experts`.
pub(super) fn top_k_of(v: &Value, experts: usize, default: usize, path: &Path) -> Result<usize> {
    let top_k = usize_of(v, &["num_experts_per_tok"], default, path)?;
    if top_k == 0 || top_k > experts {
        return Err(cfg_err(
            path,
            format!("`num_experts_per_tok` ({top_k}) must be between 1 and the number of experts ({experts})"),
        ));
    }
    Ok(top_k)
}

/// Reads and maps a Hugging Face `config.json` (a regular file of at most 64 MiB).
pub fn read_hf_config(path: &Path) -> Result<(Family, ModelConfig)> {
    let text = crate::files::read_json_text(path, "config.json")?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    config_from_hf(&v, path)
}
