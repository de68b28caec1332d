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
