//! GraniteMoE (`granitemoe`): `config.json` mapping and tensor names.
//!
//! transformers 5.24 `modeling_granitemoe.py`: Mixtral's block with fused experts
//! (`block_sparse_moe.input_linear.weight` `[E, 2I, H]`, gate rows then up rows, and
//! `output_linear.weight` `[E, H, I]`, served per expert by [`super::layout`]), the router under
//! `block_sparse_moe.router.layer.weight` (top-k of the logits, softmax over the k: the
//! renormalised top-k of the softmax), and four scalars: `embedding_multiplier` (on the token
//! embeddings), `residual_multiplier` (on each sublayer output before its residual add),
//! `attention_multiplier` (the softmax scale, replacing 1/sqrt(head_dim)) and `logits_scaling`
//! (the logits are divided by it).

use std::path::Path;

use serde_json::Value;

use super::config::{
    as_usize, bool_field, cfg_err, f64_field, reject_unsupported, rope_theta, spelled, usize_of,
};
use super::Family;
use crate::config::{ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
use crate::error::Result;

/// Maps the family's `config.json` onto a [`ModelConfig`] (the defaults of
/// `GraniteMoeConfig`, 5.24).
pub(super) fn config(v: &Value, path: &Path) -> Result<ModelConfig> {
    reject_unsupported(v, Family::GraniteMoe, path)?;
    let hidden = usize_of(v, &["hidden_size"], 4096, path)?;
    let heads = usize_of(v, &["num_attention_heads"], 32, path)?;
    let kv_heads = match spelled(v, &["num_key_value_heads"], path)? {
        Some((x, k)) => as_usize(x, &k, path)?,
        None => heads,
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
    let experts = usize_of(v, &["num_local_experts"], 8, path)?;
    let top_k = super::config::top_k_of(v, experts, 2, path)?;
    let inter = usize_of(v, &["intermediate_size"], 11008, path)?;
    let attention_bias = bool_field(v, "attention_bias", false, path)?;
    let moe = MoeConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_experts: experts,
        top_k,
        norm_topk_prob: true,
        capacity_factor: None,
        router_jitter_noise: 0.0,
        noisy_gating: false,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", 0.001, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: false,
        shared_expert_intermediate_size: 0,
        shared_expert_gate: false,
        ..MoeConfig::default()
    };
    let cfg = ModelConfig {
        vocab_size: usize_of(v, &["vocab_size"], 32000, path)?,
        hidden_size: hidden,
        num_layers: usize_of(v, &["num_hidden_layers"], 32, path)?,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        max_position_embeddings: usize_of(v, &["max_position_embeddings"], 2048, path)?,
        rope_theta: rope_theta(v, 10_000.0, path)?,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", 1e-6, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias,
        attention_out_bias: attention_bias,
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
        embedding_multiplier: f64_field(v, "embedding_multiplier", 1.0, path)?,
        residual_multiplier: f64_field(v, "residual_multiplier", 1.0, path)?,
        attention_multiplier: Some(f64_field(v, "attention_multiplier", 1.0, path)?),
        logits_scaling: f64_field(v, "logits_scaling", 1.0, path)?,
        ..ModelConfig::default()
    };
    cfg.validate().map_err(|e| cfg_err(path, e))?;
    Ok(cfg)
}

/// The crate's (Mixtral) weight name -> the family's weight name: the router is
/// `block_sparse_moe.router.layer`; the experts keep the crate's per-expert names, which the
/// loader serves from the fused `input_linear` / `output_linear` and `save_pretrained` fuses
/// back.
pub(super) fn hf_name(ours: &str) -> String {
    ours.replace(".block_sparse_moe.gate.", ".block_sparse_moe.router.layer.")
}
