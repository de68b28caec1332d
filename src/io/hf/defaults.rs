//! The defaults of each family's transformers config class, for keys a `config.json` omits.

use super::Family;

/// The defaults of a family's transformers config class (5.24; 4.x has the same values).
pub(super) struct Defaults {
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) intermediate_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    /// `None`: the number of attention heads.
    pub(super) num_key_value_heads: Option<usize>,
    pub(super) max_position_embeddings: usize,
    pub(super) rms_norm_eps: f64,
    pub(super) rope_theta: f64,
    pub(super) num_experts_per_tok: usize,
    pub(super) num_experts: usize,
    pub(super) router_aux_loss_coef: f64,
    pub(super) norm_topk_prob: bool,
    /// Qwen2-MoE's expert width and shared-expert width.
    pub(super) moe_intermediate_size: usize,
    pub(super) shared_expert_intermediate_size: usize,
}

pub(super) fn defaults(family: Family) -> Defaults {
    match family {
        // MixtralConfig: default_theta 1e6, max_position_embeddings 4096 * 32. (The other
        // families map their configs in their own modules and do not come here.)
        Family::Mixtral
        | Family::Qwen3Moe
        | Family::DeepseekV2
        | Family::DeepseekV3
        | Family::GptOss
        | Family::GraniteMoe => Defaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            num_experts_per_tok: 2,
            num_experts: 8,
            router_aux_loss_coef: 0.001,
            norm_topk_prob: true,
            moe_intermediate_size: 0,
            shared_expert_intermediate_size: 0,
        },
        Family::Qwen2Moe => Defaults {
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            num_experts_per_tok: 4,
            num_experts: 60,
            router_aux_loss_coef: 0.001,
            norm_topk_prob: false,
            moe_intermediate_size: 1408,
            shared_expert_intermediate_size: 5632,
        },
        Family::Olmoe => Defaults {
            vocab_size: 50304,
            hidden_size: 2048,
            intermediate_size: 2048,
            num_hidden_layers: 16,
            num_attention_heads: 16,
            num_key_value_heads: None,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            num_experts_per_tok: 8,
            num_experts: 64,
            router_aux_loss_coef: 0.01,
            norm_topk_prob: false,
            moe_intermediate_size: 0,
            shared_expert_intermediate_size: 0,
        },
    }
}
