//! `config.json` parsing and validation: the crate's own `ModelConfig` and `MoeConfig`, the
//! Hugging Face MoE families (`hf::config_from_hf`: all eight `model_type`s) and BERT
//! (`upcycle::bert_config`). A config that validates and is small enough (estimate, then the exact
//! count from `io::inspect::parameter_shapes`) is built into a `CausalLm` on zero weights and run
//! on a few tokens. Errors are fine; panics are bugs.
#![no_main]

use std::path::Path;

use candle_core::{DType, Device};
use candle_moe::{CausalLm, ModelConfig, MoeConfig};
use candle_nn::VarBuilder;
use libfuzzer_sys::fuzz_target;

/// Largest model (in scalars, see `param_estimate`) that is built and run.
const MAX_PARAMS: u128 = 200_000;

fn build_and_run(cfg: &ModelConfig) {
    if candle_moe_fuzz::param_estimate(cfg) >= MAX_PARAMS {
        return;
    }
    // The exact count (the estimate does not know every family's layers, e.g. MLA), from a
    // model built over shape-only placeholders (nothing allocated).
    match candle_moe::io::inspect::parameter_shapes(cfg) {
        Ok(p) if p.iter().map(|(_, s)| s.iter().map(|&d| d as u128).product::<u128>()).sum::<u128>() < MAX_PARAMS => {}
        _ => return,
    }
    if let Ok(model) = CausalLm::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)) {
        candle_moe_fuzz::tiny_forward(&model, cfg);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<ModelConfig>(data) {
        if cfg.validate().is_ok() {
            build_and_run(&cfg);
        }
    }
    if let Ok(moe) = serde_json::from_slice::<MoeConfig>(data) {
        let _ = moe.validate();
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = Path::new("config.json");
    if let Ok((_family, cfg)) = candle_moe::io::hf::config_from_hf(&value, path) {
        build_and_run(&cfg);
    }
    if let Ok(cfg) = candle_moe::io::bert::bert_config(&value, path, 2) {
        build_and_run(&cfg);
    }
});
