//! DeepSeek-V2 / V3 (`deepseek_v2`, `deepseek_v3`; also Kimi-K2 and GLM-4.x MoE checkpoints of
//! the V3 architecture): `config.json` mapping and tensor names, as transformers 5.24's
//! `DeepseekV2Config` / `DeepseekV3Config` and their models read them.
//!
//! - Attention: multi-head latent attention ([`crate::config::MlaConfig`]); `head_dim` is set
//!   to `qk_rope_head_dim` (what the RoPE tables rotate, as transformers does).
//! - Routing: V2 softmax scores with `topk_method` `greedy` or `group_limited_greedy` (group
//!   score = max), weights times `routed_scaling_factor` and never renormalised (transformers'
//!   V2 router ignores `norm_topk_prob`); V3 `noaux_tc`: sigmoid scores, selection on scores +
//!   `e_score_correction_bias`, group score = sum of the top two, weights from the unbiased
//!   scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.
//! - Shared experts: `n_shared_experts × moe_intermediate_size` wide, ungated
//!   (`mlp.shared_experts.{gate,up,down}_proj`); the first `first_k_dense_replace` layers are
//!   dense (`intermediate_size` wide). transformers computes no `aux_loss` for these families
//!   (`aux_loss_alpha` / `seq_aux` are ignored), so the crate's load-balancing loss is its own.
//! - V3's multi-token-prediction layer (`model.layers.{num_hidden_layers}.*` in the released
//!   checkpoints) is skipped, as transformers skips it.
//! - `rope_scaling` / `rope_parameters` of type `yarn` map onto [`RopeScaling::Yarn`] (and
//!   MLA's softmax scale takes YaRN's `mscale_all_dim`); other scaling types are refused.

use std::path::Path;

use serde_json::Value;

use super::config::{
    as_usize, bool_field, cfg_err, f64_field, field, rope_theta, spelled, usize_of,
};
use super::Family;
use crate::config::{
    GroupScore, MlaConfig, ModelConfig, MoeConfig, NormKind, PositionKind, RouterScoring,
};
use crate::error::Result;

/// A string setting, or `default` when absent.
fn str_field(v: &Value, key: &str, default: &str, path: &Path) -> Result<String> {
    match field(v, key) {
        None => Ok(default.to_string()),
        Some(x) => x
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| cfg_err(path, format!("`{key}` must be a string, got {x}"))),
    }
}

/// The family's routing: scoring, selection bias, groups, renormalisation, scaling.
fn routing(v: &Value, family: Family, moe: &mut MoeConfig, path: &Path) -> Result<()> {
    let v3 = family == Family::DeepseekV3;
    let scoring = str_field(
        v,
        "scoring_func",
        if v3 { "sigmoid" } else { "softmax" },
        path,
    )?;
    match (v3, scoring.as_str()) {
        (false, "softmax") | (true, "sigmoid") => {}
        (_, other) => {
            return Err(cfg_err(
                path,
                format!(
                    "`scoring_func` `{other}` is not supported for {} (transformers uses {})",
                    if v3 { "deepseek_v3" } else { "deepseek_v2" },
                    if v3 { "sigmoid" } else { "softmax" }
                ),
            ))
        }
    }
    let method = str_field(
        v,
        "topk_method",
        if v3 { "noaux_tc" } else { "greedy" },
        path,
    )?;
    let grouped = match (v3, method.as_str()) {
        (false, "greedy") => false,
        (false, "group_limited_greedy") | (true, "noaux_tc") => true,
        (_, other) => {
            return Err(cfg_err(
                path,
                format!(
                    "`topk_method` `{other}` is not supported (deepseek_v2: greedy, group_limited_greedy; deepseek_v3: noaux_tc)"
                ),
            ))
        }
    };
    let (dg, dtg) = if v3 { (Some(8), Some(4)) } else { (None, None) };
    let opt = |key: &str, d: Option<usize>| -> Result<Option<usize>> {
        match field(v, key) {
            Some(x) => as_usize(x, key, path).map(Some),
            None if v.get(key).is_some() => Ok(None),
            None => Ok(d),
        }
    };
    if grouped {
        let (Some(g), Some(tg)) = (opt("n_group", dg)?, opt("topk_group", dtg)?) else {
            return Err(cfg_err(
                path,
                format!("`topk_method` `{method}` needs `n_group` and `topk_group`"),
            ));
        };
        if g == 0 || tg == 0 || tg > g || !moe.num_experts.is_multiple_of(g) {
            return Err(cfg_err(
                path,
                format!(
                    "`n_group` ({g}) must divide `n_routed_experts` ({}) and `topk_group` ({tg}) must be between 1 and `n_group`",
                    moe.num_experts
                ),
            ));
        }
        moe.n_group = g;
        moe.topk_group = tg;
    }
    moe.scoring = if v3 {
        RouterScoring::Sigmoid
    } else {
        RouterScoring::Softmax
    };
    moe.selection_bias = v3;
    moe.group_score = if v3 {
        GroupScore::Top2Sum
    } else {
        GroupScore::Max
    };
    moe.norm_topk_prob = v3 && bool_field(v, "norm_topk_prob", true, path)?;
    moe.routed_scaling_factor =
        f64_field(v, "routed_scaling_factor", if v3 { 2.5 } else { 1.0 }, path)?;
    Ok(())
}

/// Settings transformers' DeepSeek classes do not have or the crate does not implement.
fn reject_unsupported(v: &Value, family: Family, path: &Path) -> Result<()> {
    if let Some(act) = field(v, "hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(cfg_err(
                path,
                format!("`hidden_act` {act} is not supported (only \"silu\")"),
            ));
        }
    }
    if family == Family::DeepseekV2 && bool_field(v, "mlp_bias", false, path)? {
        return Err(cfg_err(path, "`mlp_bias` true is not supported"));
    }
    if usize_of(v, &["moe_layer_freq"], 1, path)? != 1 {
        return Err(cfg_err(
            path,
            "`moe_layer_freq` other than 1 is not supported (transformers' DeepSeek classes ignore it)",
        ));
    }
    if let Some((d, k)) = spelled(v, &["dtype", "torch_dtype"], path)? {
        if !d.is_string() {
            return Err(cfg_err(path, format!("`{k}` must be a string, got {d}")));
        }
    }
    Ok(())
}

/// The MLA geometry.
fn mla(v: &Value, v3: bool, path: &Path) -> Result<MlaConfig> {
    let q_lora_rank = match field(v, "q_lora_rank") {
        Some(x) => Some(as_usize(x, "q_lora_rank", path)?),
        None if v.get("q_lora_rank").is_some() => None,
        None => Some(1536),
    };
    Ok(MlaConfig {
        q_lora_rank,
        kv_lora_rank: usize_of(v, &["kv_lora_rank"], 512, path)?,
        qk_nope_head_dim: usize_of(v, &["qk_nope_head_dim"], 128, path)?,
        qk_rope_head_dim: usize_of(v, &["qk_rope_head_dim"], 64, path)?,
        v_head_dim: usize_of(v, &["v_head_dim"], 128, path)?,
        // V2 always rotates interleaved pairs (complex multiplication).
        rope_interleave: !v3 || bool_field(v, "rope_interleave", true, path)?,
        latent_norm_eps: 1e-6,
    })
}

/// Maps the family's `config.json` onto a [`ModelConfig`].
pub(super) fn config(v: &Value, family: Family, path: &Path) -> Result<ModelConfig> {
    reject_unsupported(v, family, path)?;
    let v3 = family == Family::DeepseekV3;
    let d = |v2: usize, v3v: usize| if v3 { v3v } else { v2 };
    let hidden = usize_of(v, &["hidden_size"], d(4096, 7168), path)?;
    let heads = usize_of(v, &["num_attention_heads"], d(32, 128), path)?;
    let kv_heads = usize_of(v, &["num_key_value_heads"], heads, path)?;
    if kv_heads != heads {
        return Err(cfg_err(
            path,
            format!("`num_key_value_heads` ({kv_heads}) must equal `num_attention_heads` ({heads}) for multi-head latent attention"),
        ));
    }
    let layers = usize_of(v, &["num_hidden_layers"], d(32, 61), path)?;
    let max_pos = usize_of(v, &["max_position_embeddings"], d(2048, 4096), path)?;
    let experts = usize_of(v, &["n_routed_experts"], d(64, 256), path)?;
    let top_k = match spelled(v, &["num_experts_per_tok"], path)? {
        Some((x, k)) => as_usize(x, &k, path)?,
        None if v3 => 8,
        None => return Err(cfg_err(path, "missing `num_experts_per_tok`")),
    };
    if top_k == 0 || top_k > experts {
        return Err(cfg_err(
            path,
            format!("`num_experts_per_tok` ({top_k}) must be between 1 and `n_routed_experts` ({experts})"),
        ));
    }
    let expert_ffn = usize_of(v, &["moe_intermediate_size"], d(1407, 2048), path)?;
    let shared = usize_of(v, &["n_shared_experts"], d(2, 1), path)?;
    let mut moe = MoeConfig {
        hidden_size: hidden,
        intermediate_size: expert_ffn,
        num_experts: experts,
        top_k,
        router_aux_loss_coef: 0.0,
        router_z_loss_coef: 0.0,
        shared_expert_intermediate_size: expert_ffn * shared,
        shared_expert_gate: false,
        ..MoeConfig::default()
    };
    routing(v, family, &mut moe, path)?;
    let mla = mla(v, v3, path)?;
    let first_dense = usize_of(v, &["first_k_dense_replace"], d(0, 3), path)?;
    let cfg = ModelConfig {
        vocab_size: usize_of(v, &["vocab_size"], d(102400, 129280), path)?,
        hidden_size: hidden,
        num_layers: layers,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: Some(mla.qk_rope_head_dim),
        max_position_embeddings: max_pos,
        rope_theta: rope_theta(v, 10_000.0, path)?,
        rope_scaling: super::rope::rope_scaling_with(v, Some(max_pos), path)?,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", 1e-6, path)?,
        norm: NormKind::Rmsnorm,
        attention_bias: bool_field(v, "attention_bias", false, path)?,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        dense_intermediate_size: usize_of(v, &["intermediate_size"], d(11008, 18432), path)?,
        sparse_step: 1,
        mlp_only_layers: (0..first_dense.min(layers)).collect(),
        moe,
        num_labels: 0,
        mla: Some(mla),
        ..ModelConfig::tiny(1)
    };
    cfg.validate().map_err(|e| cfg_err(path, e))?;
    Ok(cfg)
}

/// The first DeepSeek-only setting of a crate-built `cfg` (multi-head latent attention, router
/// variants) that transformers' Mixtral cannot express, if any.
pub(super) fn not_mixtral(cfg: &ModelConfig) -> Option<String> {
    let m = &cfg.moe;
    let checks = [
        (cfg.mla.is_some(), "multi-head latent attention (`mla`)"),
        (
            m.scoring != RouterScoring::Softmax,
            "sigmoid router scores (`moe.scoring`)",
        ),
        (
            m.selection_bias,
            "a router selection bias (`moe.selection_bias`)",
        ),
        (m.n_group > 1, "group-limited routing (`moe.n_group`)"),
        (
            m.routed_scaling_factor != 1.0,
            "a routed scaling factor (`moe.routed_scaling_factor`)",
        ),
    ];
    checks.iter().find(|c| c.0).map(|c| c.1.to_string())
}

/// The crate's (Mixtral) weight name -> the family's weight name.
pub(super) fn hf_name(ours: &str) -> String {
    ours.replace(".block_sparse_moe.", ".mlp.")
        .replace(".shared_expert.", ".shared_experts.")
        .replace(".w1.", ".gate_proj.")
        .replace(".w3.", ".up_proj.")
        .replace(".w2.", ".down_proj.")
}
