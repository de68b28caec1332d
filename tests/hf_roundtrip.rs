//! The Hugging Face round trip: checkpoints load trainable (a `VarMap` the `Trainer` trains),
//! train, freeze, and save back in their family's layout (`save_pretrained`), bit for bit;
//! saves are atomic; what the crate saves is what transformers loaded
//! (`tests/fixtures/roundtrip/expected.json`, written by `tests/fixtures/gen_roundtrip.py`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_moe::io::hf::SaveOptions;
use candle_moe::train::init::reseed_varmap;
use candle_moe::{CausalLm, LoadOptions, ModelConfig, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

const FAMILIES: [&str; 3] = ["mixtral", "qwen2_moe", "olmoe"];

fn load(dir: &Path, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..Default::default()
    };
    CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap()
}

fn loss_parts(
    m: &CausalLm,
    x: &Tensor,
    y: &Tensor,
) -> candle_core::Result<candle_moe::train::LossParts> {
    let y = y.flatten_all()?;
    candle_moe::tasks::language_model::loss_parts(m, x, &y, true)
}

fn params(m: &CausalLm) -> HashMap<String, Vec<f32>> {
    m.parameters()
        .iter()
        .map(|(n, t)| {
            let v = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), v)
        })
        .collect()
}

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 3e-3,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    }
}

#[test]
fn trainable_load_trains_every_part_and_matches_frozen() {
    let (x, y) = common::fixed_lm_batch();
    for fam in FAMILIES {
        let frozen = load(&common::hf_fixture(fam), false);
        assert!(
            frozen.varmap().is_none(),
            "{fam}: frozen load has no VarMap"
        );
        let mut model = load(&common::hf_fixture(fam), true);
        let vm = model.varmap().expect("trainable load has a VarMap").clone();
        let d = common::max_abs_diff(
            &frozen.forward(&x).unwrap().logits,
            &model.forward(&x).unwrap().logits,
        );
        assert!(d < 1e-5, "{fam}: frozen vs trainable logits differ by {d}");

        // Gradients reach embeddings, attention, router and experts.
        let parts = loss_parts(&model, &x, &y).unwrap();
        let total = (&parts.task + (&parts.load_balancing * 0.01).unwrap()).unwrap();
        let grads = total.backward().unwrap();
        let data = vm.data().lock().unwrap();
        for needle in [
            "embed_tokens",
            "self_attn.q_proj",
            ".gate.weight",
            "experts.0.",
        ] {
            let hit = data.iter().any(|(n, v)| {
                n.contains(needle)
                    && grads
                        .get(v.as_tensor())
                        .map(|g| {
                            g.abs()
                                .unwrap()
                                .sum_all()
                                .unwrap()
                                .to_scalar::<f32>()
                                .unwrap()
                                > 0.0
                        })
                        .unwrap_or(false)
            });
            assert!(hit, "{fam}: no gradient reaches `{needle}`");
        }
        drop(data);

        // 20 AdamW steps on the fixed batch lower the loss.
        let mut trainer = Trainer::new(&vm, train_cfg(20)).unwrap();
        let first = trainer
            .step(&loss_parts(&model, &x, &y).unwrap())
            .unwrap()
            .task;
        for _ in 1..20 {
            trainer.step(&loss_parts(&model, &x, &y).unwrap()).unwrap();
        }
        let last = loss_parts(&model, &x, &y)
            .unwrap()
            .task
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(last < first * 0.8, "{fam}: loss {first} -> {last}");

        // Freezing keeps the trained weights and takes the inference path.
        let trained = model.forward(&x).unwrap().logits;
        model.freeze().unwrap();
        assert!(model.varmap().is_none() && !model.is_trainable());
        let d = common::max_abs_diff(&trained, &model.forward(&x).unwrap().logits);
        assert!(d < 1e-5, "{fam}: frozen copy differs by {d}");
    }
}

fn crate_model(seed: u64) -> CausalLm {
    let mut cfg = ModelConfig::tiny(96);
    cfg.moe.norm_topk_prob = true;
    cfg.moe.shared_expert_intermediate_size = 0;
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed_varmap(&vm, seed).unwrap();
    m
}

fn assert_same_params(a: &CausalLm, b: &CausalLm, what: &str) {
    let (pa, pb) = (params(a), params(b));
    assert_eq!(pa.len(), pb.len(), "{what}: parameter count");
    for (n, v) in &pa {
        let w = pb
            .get(n)
            .unwrap_or_else(|| panic!("{what}: `{n}` missing after reload"));
        assert!(
            v.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: `{n}` differs after the round trip"
        );
    }
}

#[test]
fn save_pretrained_round_trips_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (x, _) = common::fixed_lm_batch();
    for fam in FAMILIES {
        let m = load(&common::hf_fixture(fam), false);
        let out = tmp.path().join(fam);
        m.save_pretrained(&out).unwrap();
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], fam);
        let back = load(&out, false);
        assert_same_params(&m, &back, fam);
        assert_eq!(
            common::max_abs_diff(
                &m.forward(&x).unwrap().logits,
                &back.forward(&x).unwrap().logits
            ),
            0.0,
            "{fam}: logits after the round trip"
        );
    }
    // A crate-built model is written as Mixtral, sharded when asked.
    let m = crate_model(3);
    let out = tmp.path().join("crate");
    let opts = SaveOptions {
        max_shard_bytes: 20_000,
        ..Default::default()
    };
    m.save_pretrained_with(&out, &opts).unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    let back = load(&out, true);
    assert_same_params(&m, &back, "crate-built");
}

#[test]
fn save_pretrained_refuses_what_mixtral_cannot_express() {
    let mut cfg = ModelConfig::tiny(64);
    cfg.moe.noisy_gating = true;
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = m
        .save_pretrained(tmp.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("noisy gating"), "{e}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn failed_save_leaves_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    let old = crate_model(1);
    old.save_pretrained(&out).unwrap();
    let new = crate_model(2);
    for fail_after in 0..4 {
        let opts = SaveOptions {
            max_shard_bytes: 20_000,
            fail_after_files: Some(fail_after),
        };
        assert!(new.save_pretrained_with(&out, &opts).is_err());
        let back = load(&out, false);
        assert_same_params(&old, &back, "after a failed save");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "ckpt")
            .collect();
        assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
    }
    new.save_pretrained(&out).unwrap();
    assert_same_params(&new, &load(&out, false), "after a good save");
    // Other files of the directory are kept; a foreign sub-directory is refused, not deleted.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    new.save_pretrained(&out).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::create_dir(out.join("runs")).unwrap();
    assert!(new.save_pretrained(&out).is_err());
    assert!(out.join("runs").exists() && out.join("config.json").exists());
}

/// What transformers computed on the directories `gen_roundtrip.py` made the crate save:
/// rebuilding the same models here and saving them gives the same logits.
#[test]
fn transformers_loads_what_we_save() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roundtrip/expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in exp["cases"].as_object().unwrap() {
        let model = export_model(name);
        let out = tmp.path().join(name);
        model.save_pretrained(&out).unwrap();
        let back = load(&out, false);
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let x = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let got = back
            .forward(&x)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f64> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let d = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-4, "{name}: transformers' logits differ by {d}");
        assert_eq!(
            case["missing_keys"].as_array().map(|a| a.len()),
            Some(0),
            "{name}"
        );
        assert_eq!(
            case["unexpected_keys"].as_array().map(|a| a.len()),
            Some(0),
            "{name}"
        );
        assert_eq!(
            case["mismatched_keys"].as_array().map(|a| a.len()),
            Some(0),
            "{name}"
        );
    }
}

/// The models the export writes: a crate-built Mixtral, and each family fixture fine-tuned
/// for 5 AdamW steps on the fixed batch.
fn export_model(name: &str) -> CausalLm {
    if name == "crate_mixtral" {
        return crate_model(7);
    }
    if let Some(fam) = name.strip_prefix("lora_merged_") {
        let mut m = load(&common::hf_fixture(fam), false);
        let vm = m
            .add_lora(&candle_moe::layers::LoraConfig {
                rank: 4,
                seed: 9,
                ..Default::default()
            })
            .unwrap();
        let (x, y) = common::fixed_lm_batch();
        let mut trainer = Trainer::new(&vm, train_cfg(5)).unwrap();
        for _ in 0..5 {
            trainer.step(&loss_parts(&m, &x, &y).unwrap()).unwrap();
        }
        m.merge_lora().unwrap();
        return m;
    }
    let fam = name.strip_prefix("finetuned_").unwrap_or(name);
    let mut m = load(&common::hf_fixture(fam), true);
    let vm = m.varmap().unwrap().clone();
    let (x, y) = common::fixed_lm_batch();
    let mut trainer = Trainer::new(&vm, train_cfg(5)).unwrap();
    for _ in 0..5 {
        trainer.step(&loss_parts(&m, &x, &y).unwrap()).unwrap();
    }
    m.freeze().unwrap();
    m
}

/// Writes the export directories for the Python check: run with
/// `CANDLE_MOE_EXPORT=DIR cargo test --release --test hf_roundtrip export -- --ignored`.
#[test]
#[ignore]
fn export() {
    let dir = PathBuf::from(std::env::var("CANDLE_MOE_EXPORT").expect("set CANDLE_MOE_EXPORT"));
    for name in [
        "lora_merged_qwen2_moe",
        "crate_mixtral",
        "finetuned_mixtral",
        "finetuned_qwen2_moe",
        "finetuned_olmoe",
    ] {
        export_model(name).save_pretrained(dir.join(name)).unwrap();
    }
}

/// Resident memory of this process in bytes (Linux `/proc/self/statm`).
fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn frozen_model_takes_the_fused_path_with_one_copy_of_the_experts() {
    let mut cfg = ModelConfig::tiny(96);
    cfg.hidden_size = 256;
    cfg.moe.hidden_size = 256;
    cfg.moe.intermediate_size = 512;
    cfg.moe.num_experts = 8;
    cfg.num_layers = 2;
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_pretrained(tmp.path().join("m")).unwrap();
    drop(m);
    drop(vm);
    let mut m = load(&tmp.path().join("m"), true);
    let x = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let moe = |m: &CausalLm| match m.layers()[0].feed_forward() {
        candle_moe::block::FeedForward::Sparse(s) => (**s).chosen_backend(
            &Tensor::zeros((4, 256), DType::F32, &Device::Cpu).unwrap(),
            false,
        ),
        _ => panic!("sparse layer expected"),
    };
    assert_ne!(moe(&m).unwrap(), candle_moe::moe::ExpertBackend::Fused);
    m.freeze().unwrap();
    assert_eq!(moe(&m).unwrap(), candle_moe::moe::ExpertBackend::Fused);
    let expert_bytes = 2 * 8 * 3 * 256 * 512 * 4;
    let before = rss();
    m.forward(&x).unwrap();
    let grown = rss().saturating_sub(before);
    eprintln!(
        "expert weights {expert_bytes} B; resident growth on the first fused forward {grown} B"
    );
    assert!(
        grown < expert_bytes / 4,
        "the fused path grew the process by {grown} B for {expert_bytes} B of experts"
    );
}
