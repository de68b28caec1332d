//! transformers loads what `save_pretrained` writes in fused layouts: GraniteMoE in its native
//! `input_linear` / `output_linear` and gpt-oss in its interleaved layout with biases (both after
//! fine-tuning), and Mixtral / Qwen2-MoE with
//! `ExpertsOnDisk::Fused` (transformers 5's `mlp.experts.gate_up_proj` / `down_proj`).
//! `tests/fixtures/gen_roundtrip_fused.py` runs the ignored `export_fused` test, loads every
//! directory with transformers (`output_loading_info=True`) and records the key lists and the
//! logits in `tests/fixtures/roundtrip_fused/expected.json`; the CI test rebuilds the same
//! models, saves, reloads and compares.

mod common;

use common::json::{flat, max_diff};

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_moe::io::hf::{ExpertsOnDisk, SaveOptions};
use candle_moe::{CausalLm, LoadOptions, TrainConfig, Trainer};
use serde_json::Value;

const CASES: [&str; 4] = [
    "finetuned_granitemoe",
    "fused_mixtral",
    "fused_finetuned_qwen2_moe",
    "finetuned_gpt_oss",
];

fn fixture(fam: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_v5")
        .join(fam)
}

fn load(dir: &Path, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..Default::default()
    };
    CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap()
}

/// `fam` fine-tuned for 5 AdamW steps on the fixed batch, then frozen.
fn finetuned(fam: &str) -> CausalLm {
    let mut m = load(&fixture(fam), true);
    let vm = m.varmap().unwrap().clone();
    let (x, y) = common::fixed_lm_batch();
    let cfg = TrainConfig {
        steps: 5,
        lr: 3e-3,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vm, cfg).unwrap();
    for _ in 0..5 {
        let parts = candle_moe::tasks::language_model::loss_parts(&m, &x, &y, true).unwrap();
        trainer.step(&parts).unwrap();
    }
    m.freeze().unwrap();
    m
}

/// Builds case `name` and saves it to `dir` the way the case says.
fn save_case(name: &str, dir: &Path) {
    let (model, experts) = match name {
        "finetuned_granitemoe" => (finetuned("granitemoe"), ExpertsOnDisk::PerExpert),
        "fused_mixtral" => (load(&fixture("mixtral"), false), ExpertsOnDisk::Fused),
        "fused_finetuned_qwen2_moe" => (finetuned("qwen2_moe"), ExpertsOnDisk::Fused),
        // gpt-oss is always written in its own interleaved layout with biases.
        "finetuned_gpt_oss" => (finetuned("gpt_oss"), ExpertsOnDisk::PerExpert),
        other => panic!("unknown case {other}"),
    };
    model
        .save_pretrained_experts(dir, &SaveOptions::default(), experts)
        .unwrap();
}

/// Writes the export directories for the Python check: run with
/// `CANDLE_MOE_EXPORT=DIR cargo test --release --test hf_roundtrip_fused export_fused -- --ignored`.
#[test]
#[ignore]
fn export_fused() {
    let dir = PathBuf::from(std::env::var("CANDLE_MOE_EXPORT").expect("set CANDLE_MOE_EXPORT"));
    for name in CASES {
        save_case(name, &dir.join(name));
    }
}

#[test]
fn transformers_loads_what_we_save_fused() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roundtrip_fused/expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = exp["cases"].as_object().unwrap();
    assert_eq!(cases.len(), CASES.len());
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases {
        let out = tmp.path().join(name);
        save_case(name, &out);
        let back = load(&out, false);
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let x = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let got = back.forward(&x).unwrap().logits;
        let d = max_diff(&got, &flat(&case["logits"]), None);
        assert!(d < 1e-4, "{name}: transformers' logits differ by {d}");
        for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert_eq!(case[k].as_array().map(|a| a.len()), Some(0), "{name}: {k}");
        }
        // The fused names are what was written (not per-expert ones).
        let fused = case["fused_keys"].as_array().unwrap();
        assert!(!fused.is_empty(), "{name}: no fused expert tensor written");
        assert_eq!(case["per_expert_keys"].as_u64(), Some(0), "{name}");
    }
}
