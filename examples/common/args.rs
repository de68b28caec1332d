//! The command-line flags the NLP examples share (also parsed by the `example_args` fuzz
//! target, which includes this file).

use candle_moe::ModelConfig;

/// Options every training example takes.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// cpu or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed (init, batches, sampling).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory (model directory and plots).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Train the dense baseline with the same active parameters instead of the MoE.
    #[arg(long)]
    pub dense: bool,
    /// Resume training from this model directory.
    #[arg(long)]
    pub resume: Option<std::path::PathBuf>,
    /// Use this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Corpus file (default: the one the repo ships in data/).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Weights and compute in f32, bf16 or f16; bf16 and f16 train with f32 master weights and
    /// moments in the optimizer, f16 also with dynamic loss scaling (initial scale 65536).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: candle_core::DType,
}

/// `f32`, `bf16` or `f16` (`--dtype`).
pub fn parse_dtype(s: &str) -> Result<candle_core::DType, String> {
    match s {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(format!("--dtype must be f32, bf16 or f16, got `{other}`")),
    }
}

/// The model size flags of the NLP examples (an example changes a default with
/// `#[command(mut_arg("layers", |a| a.default_value("3")))]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct MoeShape {
    /// Model width.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Blocks.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Experts per sparse layer.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Hidden size of each expert.
    #[arg(long, default_value_t = 128)]
    pub expert_ffn: usize,
}

impl MoeShape {
    /// A tiny config of this shape with 4 attention heads: `experts` experts of width
    /// `expert_ffn`, top-`top_k`, in every layer, or with `dense` a dense FFN of width
    /// `expert_ffn · top_k` (the same active parameters).
    pub fn config(&self, vocab: usize, dense: bool) -> ModelConfig {
        let mut c = ModelConfig::tiny(vocab);
        c.hidden_size = self.hidden;
        c.num_layers = self.layers;
        c.num_heads = 4;
        c.num_kv_heads = 4;
        c.moe.hidden_size = self.hidden;
        c.moe.num_experts = self.experts;
        c.moe.top_k = self.top_k;
        c.moe.intermediate_size = self.expert_ffn;
        c.dense_intermediate_size = self.expert_ffn * self.top_k;
        c.sparse_step = if dense { 0 } else { 1 };
        c
    }
}

/// One load-balancing method of `--balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The Hugging Face (Switch) load-balancing loss with `--aux-loss-coef`.
    AuxLoss,
    /// DeepSeek-V3's auxiliary-loss-free balancing: a selection bias updated by `--bias-rate`.
    AuxFree,
    /// The load-balancing loss with `F_e` counted over the whole (accumulated) batch.
    GlobalBatch,
    /// DeepSeek-V3's sequence-wise balance loss with `--seq-aux-coef`.
    Sequence,
}

impl Balance {
    /// The names `--balance` takes.
    pub const NAMES: [&'static str; 4] = ["aux-loss", "aux-free", "global-batch", "sequence"];

    /// Parses a comma-separated list such as `aux-free,sequence` (at least one name).
    pub fn parse_list(list: &str) -> Result<Vec<Balance>, String> {
        let mut out = vec![];
        for name in list.split(',').map(str::trim) {
            out.push(match name {
                "aux-loss" => Balance::AuxLoss,
                "aux-free" => Balance::AuxFree,
                "global-batch" => Balance::GlobalBatch,
                "sequence" => Balance::Sequence,
                _ => {
                    return Err(format!(
                    "--balance: unknown method `{name}` (expected a comma-separated list of {})",
                    Balance::NAMES.join(", ")
                ))
                }
            });
        }
        Ok(out)
    }
}

/// The routing and load-balancing flags of the NLP examples. They set the configuration of a
/// fresh model (a resumed one keeps its saved configuration) and of the trainer.
#[derive(clap::Args, Debug, Clone)]
pub struct RouterArgs {
    /// Load balancing, a comma-separated list of: aux-loss (the Hugging Face loss with
    /// --aux-loss-coef), aux-free (DeepSeek-V3 selection bias, updated at --bias-rate),
    /// global-batch (the aux loss with expert loads counted over the whole batch), sequence
    /// (DeepSeek-V3's sequence-wise loss with --seq-aux-coef). Without aux-loss or global-batch
    /// the Hugging Face loss coefficient is 0.
    #[arg(long, default_value = "aux-loss")]
    pub balance: String,
    /// Update rate γ of the aux-free selection bias.
    #[arg(long, default_value_t = 1e-3)]
    pub bias_rate: f64,
    /// Coefficient α of the sequence-wise balance loss (DeepSeek-V3 used 0.0001).
    #[arg(long, default_value_t = 1e-4)]
    pub seq_aux_coef: f64,
    /// Router scoring: softmax or sigmoid (DeepSeek-V3).
    #[arg(long, default_value = "softmax")]
    pub scoring: String,
    /// Coefficient of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    pub aux_loss_coef: f64,
    /// Coefficient of the router z-loss.
    #[arg(long, default_value_t = 0.001)]
    pub z_loss_coef: f64,
    /// Scale of the routers' initial weights (1 = the same init as other linear layers; smaller
    /// starts from flatter routing, as Switch Transformer recommends).
    #[arg(long, default_value_t = 1.0)]
    pub router_init_scale: f64,
}

impl RouterArgs {
    /// The `--balance` methods, with every number checked (one-line errors naming the flag).
    pub fn balance(&self) -> Result<Vec<Balance>, String> {
        let list = Balance::parse_list(&self.balance)?;
        for (flag, v) in [
            ("--bias-rate", self.bias_rate),
            ("--seq-aux-coef", self.seq_aux_coef),
            ("--aux-loss-coef", self.aux_loss_coef),
            ("--z-loss-coef", self.z_loss_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{flag} must be finite and >= 0, got {v}"));
            }
        }
        if !(self.router_init_scale.is_finite() && self.router_init_scale > 0.0) {
            return Err(format!(
                "--router-init-scale must be finite and > 0, got {}",
                self.router_init_scale
            ));
        }
        self.scoring()?;
        Ok(list)
    }

    /// The `--scoring` value.
    pub fn scoring(&self) -> Result<candle_moe::RouterScoring, String> {
        match self.scoring.as_str() {
            "softmax" => Ok(candle_moe::RouterScoring::Softmax),
            "sigmoid" => Ok(candle_moe::RouterScoring::Sigmoid),
            s => Err(format!(
                "--scoring: unknown scoring `{s}` (expected softmax or sigmoid)"
            )),
        }
    }

    /// Sets a fresh model's routing: scoring, the aux and z-loss coefficients, the selection
    /// bias (aux-free) and the sequence-wise coefficient.
    pub fn apply_model(&self, c: &mut ModelConfig) -> Result<(), String> {
        let list = self.balance()?;
        let has = |b| list.contains(&b);
        c.moe.scoring = self.scoring()?;
        c.moe.router_aux_loss_coef = if has(Balance::AuxLoss) || has(Balance::GlobalBatch) {
            self.aux_loss_coef
        } else {
            0.0
        };
        c.moe.router_z_loss_coef = self.z_loss_coef;
        c.moe.selection_bias = has(Balance::AuxFree);
        c.moe.seq_aux_loss_coef = if has(Balance::Sequence) {
            self.seq_aux_coef
        } else {
            0.0
        };
        Ok(())
    }

    /// Sets the trainer's side: the bias update rate (aux-free) and global-batch balancing.
    pub fn apply_train(&self, t: &mut candle_moe::TrainConfig) -> Result<(), String> {
        let list = self.balance()?;
        t.bias_update_rate = if list.contains(&Balance::AuxFree) {
            self.bias_rate
        } else {
            0.0
        };
        t.global_batch_balance = list.contains(&Balance::GlobalBatch);
        Ok(())
    }
}

/// `--routing` of the sentiment example: `token-choice` or `expert-choice`.
pub fn parse_routing(s: &str) -> Result<candle_moe::RoutingKind, String> {
    match s {
        "token-choice" => Ok(candle_moe::RoutingKind::TokenChoice),
        "expert-choice" => Ok(candle_moe::RoutingKind::ExpertChoice),
        _ => Err(format!(
            "--routing: unknown routing `{s}` (expected token-choice or expert-choice)"
        )),
    }
}
