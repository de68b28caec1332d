//! Qwen3-MoE (`qwen3_moe`): `config.json` mapping and tensor names.
//!
//! transformers 5.24 `configuration_qwen3_moe.py` / `modeling_qwen3_moe.py`: per-head q/k
//! RMSNorm (`q_norm` / `k_norm` of size `head_dim`, before RoPE), an explicit `head_dim`
//! (`hidden_size / num_attention_heads` when absent), `attention_bias` on q/k/v *and* o,
//! `decoder_sparse_step` and `mlp_only_layers` (dense layers of width `intermediate_size`), no
//! shared expert, experts of width `moe_intermediate_size`, softmax top-k routing renormalised
//! with `norm_topk_prob`, and `sliding_window` on every layer when `use_sliding_window`.
//! Tensor names are Qwen2-MoE's (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`).

use std::path::Path;

use serde_json::Value;

use super::config::{
    as_usize, bool_field, cfg_err, f64_field, field, reject_unsupported, rope_theta, spelled,
    usize_of,
};
use super::Family;
use crate::config::{ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
use crate::error::Result;

/// `Qwen3MoeConfig`'s defaults (5.24).
mod default {
    pub const VOCAB: usize = 151936;
    pub const HIDDEN: usize = 2048;
    pub const INTERMEDIATE: usize = 6144;
    pub const LAYERS: usize = 24;
    pub const HEADS: usize = 32;
    pub const KV_HEADS: usize = 4;
    pub const MAX_POS: usize = 32768;
    pub const EPS: f64 = 1e-6;
    pub const THETA: f64 = 10_000.0;
    pub const MOE_INTERMEDIATE: usize = 768;
    pub const TOP_K: usize = 8;
    pub const EXPERTS: usize = 128;
    pub const AUX_COEF: f64 = 0.001;
}

/// The attention geometry: hidden size, heads, KV heads, head width.
fn geometry(v: &Value, path: &Path) -> Result<(usize, usize, usize, Option<usize>)> {
    let hidden = usize_of(v, &["hidden_size"], default::HIDDEN, path)?;
    let heads = usize_of(v, &["num_attention_heads"], default::HEADS, path)?;
    let kv_heads = match spelled(v, &["num_key_value_heads"], path)? {
        Some((x, k)) => as_usize(x, &k, path)?,
        None if v.get("num_key_value_heads").is_some() => heads,
        None => default::KV_HEADS,
    };
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(cfg_err(
            path,
            format!("`num_key_value_heads` ({kv_heads}) must be > 0 and divide `num_attention_heads` ({heads})"),
        ));
    }
    let head_dim = match spelled(v, &["head_dim"], path)? {
        Some((x, k)) => match as_usize(x, &k, path)? {
            0 => return Err(cfg_err(path, "`head_dim` must be > 0")),
            hd => Some(hd),
        },
        None if !hidden.is_multiple_of(heads) => {
            return Err(cfg_err(
                path,
                format!("`hidden_size` ({hidden}) must be divisible by `num_attention_heads` ({heads}) when `head_dim` is not set"),
            ))
        }
        None => None,
    };
    Ok((hidden, heads, kv_heads, head_dim))
}

/// `decoder_sparse_step` and `mlp_only_layers`.
fn sparsity(v: &Value, path: &Path) -> Result<(usize, Vec<usize>)> {
    let mlp_only = match field(v, "mlp_only_layers") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| as_usize(x, "mlp_only_layers", path))
            .collect::<Result<_>>()?,
        Some(x) => {
            return Err(cfg_err(
                path,
                format!("`mlp_only_layers` must be a list of layer indices, got {x}"),
            ))
        }
    };
    let step = usize_of(v, &["decoder_sparse_step"], 1, path)?;
    if step == 0 {
        return Err(cfg_err(path, "`decoder_sparse_step` must be >= 1"));
    }
    Ok((step, mlp_only))
}

/// The sliding window: `sliding_window` on every layer when `use_sliding_window`.
fn window(v: &Value, layers: usize, path: &Path) -> Result<Option<usize>> {
    let types = super::window::layer_types(v, layers, path)?;
    if types.contains(&crate::config::AttentionSpan::SlidingAttention) {
        return Err(cfg_err(
            path,
            "`layer_types` with sliding_attention is not read by Qwen3-MoE (use `use_sliding_window`)",
        ));
    }
    if !bool_field(v, "use_sliding_window", false, path)? {
        return Ok(None);
    }
    super::window::sliding_window(v, path)?
        .map(Some)
        .ok_or_else(|| {
            cfg_err(
                path,
                "`use_sliding_window` is true but `sliding_window` is null",
            )
        })
}

/// The sparse layers' configuration.
fn moe(v: &Value, hidden: usize, path: &Path) -> Result<MoeConfig> {
    let experts = usize_of(
        v,
        &["num_experts", "num_local_experts"],
        default::EXPERTS,
        path,
    )?;
    let top_k = super::config::top_k_of(v, experts, default::TOP_K, path)?;
    Ok(MoeConfig {
        hidden_size: hidden,
        intermediate_size: usize_of(
            v,
            &["moe_intermediate_size"],
            default::MOE_INTERMEDIATE,
            path,
        )?,
        num_experts: experts,
        top_k,
        norm_topk_prob: bool_field(v, "norm_topk_prob", false, path)?,
        capacity_factor: None,
        router_jitter_noise: 0.0,
        noisy_gating: false,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", default::AUX_COEF, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: false,
        shared_expert_intermediate_size: 0,
        shared_expert_gate: false,
        ..MoeConfig::default()
    })
}

/// Maps the family's `config.json` onto a [`ModelConfig`].
pub(super) fn config(v: &Value, path: &Path) -> Result<ModelConfig> {
    reject_unsupported(v, Family::Qwen3Moe, path)?;
    let (hidden, heads, kv_heads, head_dim) = geometry(v, path)?;
    let layers = usize_of(v, &["num_hidden_layers"], default::LAYERS, path)?;
    let (sparse_step, mlp_only_layers) = sparsity(v, path)?;
    let max_pos = usize_of(v, &["max_position_embeddings"], default::MAX_POS, path)?;
    let bias = bool_field(v, "attention_bias", false, path)?;
    let cfg = ModelConfig {
        vocab_size: usize_of(v, &["vocab_size"], default::VOCAB, path)?,
        hidden_size: hidden,
        num_layers: layers,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        max_position_embeddings: max_pos,
        rope_theta: rope_theta(v, default::THETA, path)?,
        rope_scaling: super::rope::rope_scaling_with(v, Some(max_pos), path)?,
        sliding_window: window(v, layers, path)?,
        layer_types: vec![],
        attention_sinks: false,
        attention_out_bias: bias,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", default::EPS, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias: bias,
        qk_norm: false,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        type_vocab_size: 0,
        dense_intermediate_size: usize_of(v, &["intermediate_size"], default::INTERMEDIATE, path)?,
        sparse_step,
        mlp_only_layers,
        moe: moe(v, hidden, path)?,
        num_labels: 0,
        pooling: Default::default(),
        pad_token_id: None,
        hidden_dropout: 0.0,
        qk_norm_per_head: true,
        mla: None,
        ..ModelConfig::default()
    };
    cfg.validate().map_err(|e| cfg_err(path, e))?;
    Ok(cfg)
}

/// The crate's (Mixtral) weight name -> the family's weight name (Qwen2-MoE's).
pub(super) fn hf_name(ours: &str) -> String {
    ours.replace(".block_sparse_moe.", ".mlp.")
        .replace(".w1.", ".gate_proj.")
        .replace(".w3.", ".up_proj.")
        .replace(".w2.", ".down_proj.")
}
