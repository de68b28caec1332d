//! gpt-oss (`gpt_oss`): `config.json` mapping and tensor names.
//!
//! transformers 5.24 `modeling_gpt_oss.py`: the router `mlp.router` has a bias and takes the
//! top-k of the logits, then a softmax over the k (the same as the renormalised top-k of the
//! softmax); the experts are stored fused with gate and up interleaved by columns
//! (`mlp.experts.gate_up_proj` `[E, H, 2I]`, `gate_up_proj_bias`, `down_proj` `[E, I, H]`,
//! `down_proj_bias`; or MXFP4 `*_blocks` + `*_scales`), served per expert by
//! [`super::layout`]; each computes the clamped SwiGLU `(clamp(u, ±limit) + 1) · g' ·
//! sigmoid(α g')`, `g' = min(g, limit)`. Attention: q/k/v/o biases (`attention_bias`), a learned
//! sink logit per head (`self_attn.sinks`), `layer_types` alternating `sliding_attention`
//! (window `sliding_window`) and `full_attention`, and YaRN RoPE.

use std::path::Path;

use serde_json::Value;

use super::config::{
    as_usize, bool_field, cfg_err, f64_field, field, rope_theta, spelled, usize_of,
};
use crate::config::{AttentionSpan, ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
use crate::error::Result;

/// Maps the family's `config.json` onto a [`ModelConfig`] (the defaults of `GptOssConfig`,
/// 5.24).
pub(super) fn config(v: &Value, path: &Path) -> Result<ModelConfig> {
    let hidden = usize_of(v, &["hidden_size"], 2880, path)?;
    let heads = usize_of(v, &["num_attention_heads"], 64, path)?;
    let kv_heads = match spelled(v, &["num_key_value_heads"], path)? {
        Some((x, k)) => as_usize(x, &k, path)?,
        None if v.get("num_key_value_heads").is_some() => heads,
        None => 8,
    };
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(cfg_err(
            path,
            format!("`num_key_value_heads` ({kv_heads}) must be > 0 and divide `num_attention_heads` ({heads})"),
        ));
    }
    let layers = usize_of(v, &["num_hidden_layers"], 36, path)?;
    let experts = usize_of(v, &["num_local_experts"], 128, path)?;
    let top_k = super::config::top_k_of(v, experts, 4, path)?;
    if let Some(q) = field(v, "quantization_config") {
        let method = q.get("quant_method").and_then(|m| m.as_str());
        if method != Some("mxfp4") {
            return Err(cfg_err(
                path,
                format!("`quantization_config.quant_method` {method:?} is not supported for gpt_oss (only \"mxfp4\")"),
            ));
        }
    }
    let inter = usize_of(v, &["intermediate_size"], 2880, path)?;
    let bias = bool_field(v, "attention_bias", true, path)?;
    let moe = MoeConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_experts: experts,
        top_k,
        norm_topk_prob: true,
        router_jitter_noise: 0.0,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", 0.001, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: true,
        shared_expert_intermediate_size: 0,
        router_bias: true,
        swiglu_limit: Some(f64_field(v, "swiglu_limit", 7.0, path)?),
        swiglu_alpha: f64_field(v, "swiglu_alpha", 1.702, path)?,
        ..MoeConfig::default()
    };
    let max_pos = usize_of(v, &["max_position_embeddings"], 131_072, path)?;
    let cfg = ModelConfig {
        vocab_size: usize_of(v, &["vocab_size"], 201_088, path)?,
        hidden_size: hidden,
        num_layers: layers,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: Some(usize_of(v, &["head_dim"], 64, path)?),
        max_position_embeddings: max_pos,
        rope_theta: rope_theta(v, 150_000.0, path)?,
        rope_scaling: super::rope::rope_scaling_with(v, Some(max_pos), path)?,
        sliding_window: Some(usize_of(v, &["sliding_window"], 128, path)?),
        layer_types: layer_types(v, layers, path)?,
        attention_sinks: true,
        attention_out_bias: bias,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", 1e-5, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias: bias,
        qk_norm: false,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        type_vocab_size: 0,
        dense_intermediate_size: inter,
        sparse_step: 1,
        mlp_only_layers: vec![],
        moe,
        num_labels: 0,
        pad_token_id: None,
        hidden_dropout: 0.0,
        ..ModelConfig::default()
    };
    cfg.validate().map_err(|e| cfg_err(path, e))?;
    Ok(cfg)
}

/// `layer_types` (default: sliding, full, sliding, ... as `GptOssConfig.__post_init__`).
fn layer_types(v: &Value, layers: usize, path: &Path) -> Result<Vec<AttentionSpan>> {
    if field(v, "layer_types").is_some() {
        return super::window::layer_types(v, layers, path);
    }
    Ok((0..layers)
        .map(|i| {
            if i % 2 == 0 {
                AttentionSpan::SlidingAttention
            } else {
                AttentionSpan::FullAttention
            }
        })
        .collect())
}

/// The crate's (Mixtral) weight name -> the family's weight name: `block_sparse_moe.gate` is
/// `mlp.router`, the rest of `block_sparse_moe.` is `mlp.` (the per-expert names are served from
/// the fused tensors and fused back by `save_pretrained`).
pub(super) fn hf_name(ours: &str) -> String {
    ours.replace(".block_sparse_moe.gate.", ".mlp.router.")
        .replace(".block_sparse_moe.", ".mlp.")
}
