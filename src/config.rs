//! Configuration of the sparse layer ([`MoeConfig`]) and of whole models ([`ModelConfig`]).
//!
//! Both derive serde with `#[serde(default)]`, accept the Hugging Face key names as aliases
//! (`num_local_experts`, `num_experts_per_tok`, `num_hidden_layers`, ...), and have a
//! `validate()` that rejects nonsense with a message naming the field.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod positions;
pub use positions::{dynamic_limit, AttentionSpan, RopeScaling};
mod routing;
pub use routing::{GroupScore, MlaConfig, RouterScoring, RoutingKind};

/// The feed-forward used by each expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// SwiGLU (Mixtral): `w2(silu(w1 x) * w3 x)`.
    #[default]
    Swiglu,
    /// Two-layer GELU MLP: `w2(gelu(w1 x))`.
    Gelu,
}

/// Configuration of one sparse mixture-of-experts feed-forward layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoeConfig {
    /// Model width `h` (input and output size of every expert).
    pub hidden_size: usize,
    /// Hidden size `f` of each expert.
    #[serde(alias = "moe_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of routed experts `E`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    /// Experts per token `k`; `k == E` is dense softmax gating (the classic MoE).
    #[serde(alias = "num_experts_per_tok")]
    pub top_k: usize,
    /// Renormalise the top-k gate weights to sum to one (Mixtral: true; Qwen2-MoE/OLMoE: false).
    pub norm_topk_prob: bool,
    /// Expert capacity factor: each expert keeps at most `ceil(cf * tokens * k / E)` assignments
    /// (in token order); `None` is dropless. Under expert choice it is the average number of
    /// experts per token instead: each expert takes `ceil(cf * tokens / E)` tokens (`None`:
    /// `cf = top_k`).
    pub capacity_factor: Option<f64>,
    /// Multiplicative jitter on the router input in training (Switch Transformer), 0 = off.
    pub router_jitter_noise: f64,
    /// Noisy top-k gating (Shazeer et al. 2017): a learned noise projection, active in training.
    pub noisy_gating: bool,
    /// Coefficient of the load-balancing loss in the total loss.
    pub router_aux_loss_coef: f64,
    /// Coefficient of the router z-loss in the total loss.
    pub router_z_loss_coef: f64,
    /// The expert feed-forward.
    pub expert_kind: ExpertKind,
    /// Bias vectors on the experts' projections (BERT-style FFNs); Mixtral has none.
    pub expert_bias: bool,
    /// Hidden size of the always-on shared expert (Qwen2-MoE); 0 = no shared expert.
    pub shared_expert_intermediate_size: usize,
    /// Multiply the shared expert by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// How router logits become expert scores (softmax; DeepSeek-V3: sigmoid).
    pub scoring: RouterScoring,
    /// A per-expert selection bias (buffer `gate.e_score_correction_bias` `(E,)`, DeepSeek-V3)
    /// added to the scores to choose the experts only, never to the weights.
    pub selection_bias: bool,
    /// Expert groups of group-limited selection (0 or 1: no groups; DeepSeek `n_group`).
    pub n_group: usize,
    /// Groups a token may choose experts from (DeepSeek `topk_group`).
    pub topk_group: usize,
    /// How a group is scored in group-limited selection.
    pub group_score: GroupScore,
    /// Factor on the gate weights after the optional renormalisation (DeepSeek
    /// `routed_scaling_factor`; 1 = none).
    pub routed_scaling_factor: f64,
    /// A bias on the router projection, `gate.bias` `(E,)` (gpt-oss).
    pub router_bias: bool,
    /// gpt-oss's clamped SwiGLU limit: `(clamp(u, ±limit) + 1) · g' · σ(α g')`, `g' = min(g, limit)`.
    pub swiglu_limit: Option<f64>,
    /// The sigmoid slope α of the clamped SwiGLU (gpt-oss 1.702).
    pub swiglu_alpha: f64,
    /// Who chooses: tokens pick their top-k experts (default), or each expert picks its
    /// top-C tokens (expert choice, Zhou et al. 2022; encoders only).
    pub routing: RoutingKind,
    /// Coefficient of DeepSeek-V3's sequence-wise balance loss in the total loss (0 = off).
    pub seq_aux_loss_coef: f64,
    /// Coefficient of Shazeer et al.'s importance and load (CV²) losses of noisy top-k gating
    /// in the total loss (0 = off).
    pub cv_loss_coef: f64,
}

impl Default for MoeConfig {
    /// A Mixtral-like layer: 8 SwiGLU experts, top-2, renormalised, dropless.
    fn default() -> Self {
        Self {
            hidden_size: 4096,
            intermediate_size: 14336,
            num_experts: 8,
            top_k: 2,
            norm_topk_prob: true,
            capacity_factor: None,
            router_jitter_noise: 0.0,
            noisy_gating: false,
            router_aux_loss_coef: 0.02,
            router_z_loss_coef: 0.0,
            expert_kind: ExpertKind::Swiglu,
            expert_bias: false,
            shared_expert_intermediate_size: 0,
            shared_expert_gate: true,
            scoring: RouterScoring::Softmax,
            selection_bias: false,
            n_group: 0,
            topk_group: 0,
            group_score: GroupScore::Max,
            routed_scaling_factor: 1.0,
            router_bias: false,
            swiglu_limit: None,
            swiglu_alpha: 1.702,
            routing: RoutingKind::TokenChoice,
            seq_aux_loss_coef: 0.0,
            cv_loss_coef: 0.0,
        }
    }
}

impl MoeConfig {
    /// Checks the configuration; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden_size == 0 {
            return bad("hidden_size must be > 0".into());
        }
        if self.intermediate_size == 0 {
            return bad("intermediate_size must be > 0".into());
        }
        if self.num_experts == 0 {
            return bad("num_experts must be > 0".into());
        }
        if self.top_k == 0 {
            return bad("top_k must be >= 1".into());
        }
        if self.top_k > self.num_experts {
            return bad(format!(
                "top_k ({}) must be <= num_experts ({})",
                self.top_k, self.num_experts
            ));
        }
        if let Some(cf) = self.capacity_factor {
            if !(cf > 0.0 && cf.is_finite()) {
                return bad(format!("capacity_factor must be > 0, got {cf}"));
            }
        }
        if !(self.router_jitter_noise >= 0.0 && self.router_jitter_noise < 1.0) {
            return bad(format!(
                "router_jitter_noise must be in [0, 1), got {}",
                self.router_jitter_noise
            ));
        }
        for (name, v) in [
            ("router_aux_loss_coef", self.router_aux_loss_coef),
            ("router_z_loss_coef", self.router_z_loss_coef),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        if !self.swiglu_limit.is_none_or(|l| l > 0.0 && l.is_finite())
            || !self.swiglu_alpha.is_finite()
        {
            return bad(format!(
                "swiglu_limit ({:?}) must be > 0 and swiglu_alpha ({}) finite",
                self.swiglu_limit, self.swiglu_alpha
            ));
        }
        routing::validate_routing(self)
    }

    /// Whether every expert sees every token (dense softmax gating, the classic MoE).
    pub fn is_dense_gating(&self) -> bool {
        self.top_k == self.num_experts
    }
}

/// Normalisation layer used by transformer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// RMSNorm (Llama, Mixtral).
    #[default]
    Rmsnorm,
    /// LayerNorm with bias (BERT, GPT-2).
    Layernorm,
}

/// How positions are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PositionKind {
    /// Rotary position embeddings on queries and keys.
    #[default]
    Rope,
    /// Learned absolute position embeddings added to the token embeddings (BERT).
    Learned,
}

/// How a sequence classifier pools the encoder states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over non-padding positions.
    #[default]
    Mean,
    /// The first token (BERT's `[CLS]`).
    First,
}

/// Configuration of a whole model (causal LM, encoder-decoder or classifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of transformer blocks (the encoder's, for encoder-decoders).
    #[serde(alias = "num_hidden_layers")]
    pub num_layers: usize,
    /// Number of decoder blocks of an encoder-decoder.
    pub num_decoder_layers: usize,
    /// Attention heads.
    #[serde(alias = "num_attention_heads")]
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention); equal to `num_heads` for multi-head.
    #[serde(alias = "num_key_value_heads")]
    pub num_kv_heads: usize,
    /// Per-head width; `None` = `hidden_size / num_heads`.
    pub head_dim: Option<usize>,
    /// Longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE frequency scaling (`None`: plain RoPE).
    pub rope_scaling: Option<RopeScaling>,
    /// Window of sliding-window attention layers (`None`: no sliding window).
    pub sliding_window: Option<usize>,
    /// Per-layer attention span (empty: every layer slides when `sliding_window` is set).
    pub layer_types: Vec<AttentionSpan>,
    /// A learned per-head sink logit in every attention softmax (gpt-oss `self_attn.sinks`).
    pub attention_sinks: bool,
    /// Bias on the attention output projection independently of `post_norm` (gpt-oss).
    pub attention_out_bias: bool,
    /// Position encoding.
    pub position: PositionKind,
    /// Epsilon of the norms.
    #[serde(alias = "rms_norm_eps", alias = "layer_norm_eps")]
    pub norm_eps: f64,
    /// Norm layer kind.
    pub norm: NormKind,
    /// Post-norm residual blocks (BERT) instead of pre-norm.
    pub post_norm: bool,
    /// Bias on the q/k/v projections (Qwen2) and, with post-norm, on all linears (BERT).
    pub attention_bias: bool,
    /// RMSNorm over the projected queries and keys (OLMoE).
    pub qk_norm: bool,
    /// Tie the LM head to the token embeddings.
    pub tie_word_embeddings: bool,
    /// Token-type (segment) vocabulary size, 0 = none (BERT uses 2).
    pub type_vocab_size: usize,
    /// Hidden size of the dense feed-forward layers.
    pub dense_intermediate_size: usize,
    /// Which blocks are sparse: every `sparse_step`-th block (1 = all, 0 = none).
    pub sparse_step: usize,
    /// Blocks that stay dense whatever `sparse_step` says (Qwen2-MoE `mlp_only_layers`).
    pub mlp_only_layers: Vec<usize>,
    /// The sparse layer's configuration (its `hidden_size` must equal the model's).
    pub moe: MoeConfig,
    /// Number of classes of a sequence classifier.
    pub num_labels: usize,
    /// Pooling of a sequence classifier.
    pub pooling: Pooling,
    /// Padding token id, if any.
    pub pad_token_id: Option<u32>,
    /// Dropout probability on the embeddings and on every attention and feed-forward output
    /// before its residual add, in training only (BERT's `hidden_dropout_prob`); 0 = off.
    #[serde(alias = "hidden_dropout_prob")]
    pub hidden_dropout: f64,
    /// The q/k RMSNorms act on each head (`head_dim` wide, Qwen3) rather than on the whole
    /// projection (OLMoE's `qk_norm`); implies q/k norms.
    pub qk_norm_per_head: bool,
    /// Multi-head latent attention instead of MHA/GQA (DeepSeek-V2/V3; `None`: standard).
    pub mla: Option<MlaConfig>,
    /// Multiplier on the token embeddings (GraniteMoE `embedding_multiplier`; 1 = none).
    pub embedding_multiplier: f64,
    /// Multiplier on each sublayer output before its residual add (GraniteMoE; 1 = none).
    pub residual_multiplier: f64,
    /// The attention softmax scale (GraniteMoE `attention_multiplier`; `None`: 1/sqrt(head_dim)).
    pub attention_multiplier: Option<f64>,
    /// The LM logits are divided by this (GraniteMoE `logits_scaling`; 1 = none).
    pub logits_scaling: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::tiny(256)
    }
}

impl ModelConfig {
    /// A tiny model for tests and quick experiments: width 64, 2 layers, 4 experts top-2.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 64,
            num_layers: 2,
            num_decoder_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: None,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rope_scaling: None,
            sliding_window: None,
            layer_types: vec![],
            attention_sinks: false,
            attention_out_bias: false,
            position: PositionKind::Rope,
            norm_eps: 1e-5,
            norm: NormKind::Rmsnorm,
            post_norm: false,
            attention_bias: false,
            qk_norm: false,
            tie_word_embeddings: true,
            type_vocab_size: 0,
            dense_intermediate_size: 128,
            sparse_step: 1,
            mlp_only_layers: vec![],
            moe: MoeConfig {
                hidden_size: 64,
                intermediate_size: 64,
                num_experts: 4,
                top_k: 2,
                router_aux_loss_coef: 0.01,
                router_z_loss_coef: 0.001,
                ..MoeConfig::default()
            },
            num_labels: 2,
            pooling: Pooling::Mean,
            pad_token_id: None,
            hidden_dropout: 0.0,
            qk_norm_per_head: false,
            mla: None,
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            attention_multiplier: None,
            logits_scaling: 1.0,
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Whether block `layer` (0-based) has a sparse feed-forward.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        self.sparse_step > 0
            && (layer + 1).is_multiple_of(self.sparse_step)
            && !self.mlp_only_layers.contains(&layer)
    }

    /// Checks the configuration; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if !(0.0..1.0).contains(&self.hidden_dropout) {
            return bad(format!(
                "hidden_dropout must be in [0, 1), got {}",
                self.hidden_dropout
            ));
        }
        const MAX_LAYERS: usize = 4096;
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.num_decoder_layers),
        ] {
            if v > MAX_LAYERS {
                return bad(format!("{name} ({v}) is larger than {MAX_LAYERS}"));
            }
        }
        if self.mlp_only_layers.len() > MAX_LAYERS {
            return bad(format!(
                "mlp_only_layers lists {} layers, more than {MAX_LAYERS}",
                self.mlp_only_layers.len()
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size ({}) must be divisible by num_heads ({}) when head_dim is not set",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) && self.position == PositionKind::Rope {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm_eps must be > 0, got {}", self.norm_eps));
        }
        if let Some(m) = &self.mla {
            m.validate()?;
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta must be > 0, got {}", self.rope_theta));
        }
        self.validate_positions()?;
        let m = [
            self.embedding_multiplier,
            self.residual_multiplier,
            self.logits_scaling,
        ];
        let fin = m
            .iter()
            .chain(&self.attention_multiplier)
            .all(|v| v.is_finite());
        if !fin || m[2] == 0.0 {
            let a = self.attention_multiplier;
            return bad(format!(
                "multipliers {m:?}, {a:?}: finite, logits_scaling != 0"
            ));
        }
        let any_dense =
            (0..self.num_layers.max(self.num_decoder_layers)).any(|l| !self.is_sparse_layer(l));
        if any_dense && self.dense_intermediate_size == 0 {
            return bad("dense_intermediate_size must be > 0 when some layers are dense".into());
        }
        if (0..self.num_layers.max(self.num_decoder_layers)).any(|l| self.is_sparse_layer(l)) {
            if self.moe.hidden_size != self.hidden_size {
                return bad(format!(
                    "moe.hidden_size ({}) must equal hidden_size ({})",
                    self.moe.hidden_size, self.hidden_size
                ));
            }
            self.moe.validate().map_err(|e| {
                Error::Config(format!(
                    "moe.{}",
                    e.to_string().trim_start_matches("invalid config: ")
                ))
            })?;
        }
        Ok(())
    }

    /// Reads and validates a `config.json` written by this crate.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::files::read_json_text(path, "config.json")?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}
