//! The NLP examples' command lines: the input is split into arguments (at NUL and newline
//! bytes) and parsed with the examples' shared flags (`examples/common/args.rs`: `RunArgs`,
//! `MoeShape`, `RouterArgs`, sentiment's `--routing`) plus the training flags every NLP example
//! has (`--steps`, `--batch`, `--seq-len`, `--vocab`, `--lr`, ...), exactly as clap parses them
//! there. A command line that
//! parses is turned into the model and training configuration the examples build and
//! validated; when both are valid and small, the model is built and run on a few tokens.
//! Errors (clap's or the crate's) are fine; panics are bugs.
#![no_main]

use candle_core::{DType, Device};
use candle_moe::{CausalLm, TrainConfig};
use candle_nn::VarBuilder;
use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../examples/common/args.rs"]
mod args;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    run: args::RunArgs,
    #[command(flatten)]
    shape: args::MoeShape,
    #[arg(long, default_value_t = 800)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 1024)]
    vocab: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[command(flatten)]
    router: args::RouterArgs,
    #[arg(long, default_value = "token-choice")]
    routing: String,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv = std::iter::once("example").chain(text.split(['\0', '\n']).filter(|a| !a.is_empty()));
    let Ok(cli) = Cli::try_parse_from(argv) else {
        return;
    };
    let mut cfg = cli.shape.config(cli.vocab, cli.run.dense);
    cfg.max_position_embeddings = cli.seq_len.max(256);
    let Ok(routing) = args::parse_routing(&cli.routing) else {
        return;
    };
    cfg.moe.routing = routing;
    let mut train = TrainConfig {
        steps: cli.steps,
        lr: cli.lr,
        seed: cli.run.seed,
        ..Default::default()
    };
    if cli.router.apply_model(&mut cfg).is_err() || cli.router.apply_train(&mut train).is_err() {
        return;
    }
    if cfg.validate().is_err() || train.validate().is_err() {
        return;
    }
    if candle_moe_fuzz::param_estimate(&cfg) < 200_000 {
        if let Ok(model) = CausalLm::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)) {
            candle_moe_fuzz::tiny_forward(&model, &cfg);
        }
    }
});
