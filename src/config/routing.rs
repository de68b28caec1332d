//! Router variants of the sparse layer (DeepSeek-V2/V3 routing) and the multi-head latent
//! attention geometry (DeepSeek-V2, Liu et al. 2024, §2.1), as configuration.
//!
//! - Scoring: `softmax` over the router logits (Mixtral, DeepSeek-V2) or an independent
//!   `sigmoid` per expert (DeepSeek-V3).
//! - Selection bias (DeepSeek-V3 `e_score_correction_bias`, auxiliary-loss-free balancing):
//!   added to the scores for choosing the experts only; the gate weights come from the
//!   unbiased scores.
//! - Group-limited selection (DeepSeek-V2 `group_limited_greedy`, V3 `noaux_tc`): the experts
//!   are split into `n_group` groups, each scored by its best expert (`max`) or the sum of its
//!   two best (`top2_sum`); only the `topk_group` best groups compete for the top-k.
//! - `routed_scaling_factor`: the final weights (after the optional renormalisation) times a
//!   constant.

use serde::{Deserialize, Serialize};

use super::MoeConfig;
use crate::error::{Error, Result};

/// How router logits become per-expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouterScoring {
    /// `softmax(logits)` over the experts (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2).
    #[default]
    Softmax,
    /// `sigmoid(logits)` per expert (DeepSeek-V3).
    Sigmoid,
}

/// Who chooses in a sparse layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingKind {
    /// Each token picks its top-k experts.
    #[default]
    TokenChoice,
    /// Each expert picks its top-C tokens (Zhou et al. 2022; [`crate::moe::expert_choice`]):
    /// `C = ceil(tokens · c / E)` clamped to the token count, with `c = capacity_factor` when
    /// set (the average number of experts per token) and `top_k` otherwise. Needs softmax
    /// scoring without noisy gating, selection bias or expert groups; `norm_topk_prob` does not
    /// apply (the gates are the softmax scores). It looks at every token of the batch at once,
    /// future positions included, so causal stacks refuse it: [`crate::CausalLm`] and
    /// [`crate::Seq2Seq`] (whose decoder shares the configuration) do, the
    /// [`crate::SequenceClassifier`] allows it.
    ExpertChoice,
}

/// How group-limited selection scores a group of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The group's best expert score (DeepSeek-V2 `group_limited_greedy`).
    #[default]
    Max,
    /// The sum of the group's two best (bias-corrected) scores (DeepSeek-V3 `noaux_tc`).
    Top2Sum,
}

/// Multi-head latent attention (DeepSeek-V2 §2.1): queries optionally through a low-rank
/// bottleneck, keys and values through a shared compressed latent plus one decoupled RoPE key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MlaConfig {
    /// Rank of the query bottleneck (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without position encoding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with RoPE (the shared RoPE key's width).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// The RoPE dimensions are stored as interleaved pairs `(x0, x1), (x2, x3), ...`
    /// (DeepSeek-V2 always; V3 `rope_interleave`).
    pub rope_interleave: bool,
    /// Epsilon of `q_a_layernorm` and `kv_a_layernorm` (transformers: 1e-6 whatever
    /// `rms_norm_eps` says).
    pub latent_norm_eps: f64,
}

impl Default for MlaConfig {
    fn default() -> Self {
        Self {
            q_lora_rank: None,
            kv_lora_rank: 16,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            rope_interleave: true,
            latent_norm_eps: 1e-6,
        }
    }
}

impl MlaConfig {
    /// Per-head query/key width (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Checks the geometry; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("mla.kv_lora_rank", self.kv_lora_rank),
            ("mla.qk_rope_head_dim", self.qk_rope_head_dim),
            ("mla.v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return bad("mla.q_lora_rank must be > 0 (or null for a plain q_proj)".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return bad(format!(
                "mla.qk_rope_head_dim ({}) must be even for RoPE",
                self.qk_rope_head_dim
            ));
        }
        if !(self.latent_norm_eps > 0.0 && self.latent_norm_eps.is_finite()) {
            return bad(format!(
                "mla.latent_norm_eps must be > 0, got {}",
                self.latent_norm_eps
            ));
        }
        Ok(())
    }
}

impl MoeConfig {
    /// Refuses `routing = expert_choice` for a causal model (`model` names it in the error):
    /// each expert choosing among all the tokens of a batch looks at future positions.
    pub fn check_causal_routing(&self, model: &str) -> Result<()> {
        if self.routing == RoutingKind::ExpertChoice {
            return Err(Error::Config(format!(
                "routing = expert_choice cannot be used in {model}: each expert picks its tokens \
                 among the whole batch, future positions included, which breaks causality \
                 (use token_choice, or expert choice in a bidirectional encoder such as \
                 SequenceClassifier)"
            )));
        }
        Ok(())
    }
}

/// Checks the router-variant fields of `cfg`; the error names the field.
pub(super) fn validate_routing(cfg: &MoeConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if cfg.routing == RoutingKind::ExpertChoice {
        let clash = [
            (cfg.scoring != RouterScoring::Softmax, "scoring = sigmoid"),
            (cfg.noisy_gating, "noisy_gating"),
            (cfg.selection_bias, "selection_bias"),
            (cfg.n_group > 1, "n_group > 1"),
        ];
        if let Some((_, what)) = clash.iter().find(|(on, _)| *on) {
            return bad(format!(
                "routing = expert_choice needs plain softmax scores; it cannot be combined with {what}"
            ));
        }
    }
    let f = cfg.routed_scaling_factor;
    if !(f > 0.0 && f.is_finite()) {
        return bad(format!("routed_scaling_factor must be > 0, got {f}"));
    }
    if cfg.noisy_gating && cfg.scoring != RouterScoring::Softmax {
        return bad("noisy_gating needs softmax scoring (`scoring`)".into());
    }
    if cfg.n_group <= 1 {
        return Ok(());
    }
    let (e, g, tg) = (cfg.num_experts, cfg.n_group, cfg.topk_group);
    if !e.is_multiple_of(g) {
        return bad(format!(
            "n_group ({g}) must divide the number of experts ({e})"
        ));
    }
    if tg == 0 || tg > g {
        return bad(format!(
            "topk_group ({tg}) must be between 1 and n_group ({g})"
        ));
    }
    if cfg.group_score == GroupScore::Top2Sum && e / g < 2 {
        return bad(format!(
            "group_score top2_sum needs at least 2 experts per group, got {}",
            e / g
        ));
    }
    if cfg.top_k > tg * (e / g) {
        return bad(format!(
            "top_k ({}) must be <= topk_group ({tg}) × experts per group ({})",
            cfg.top_k,
            e / g
        ));
    }
    Ok(())
}
