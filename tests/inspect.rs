//! `io::inspect`: the parameter inventory built from `config.json` alone is exactly the set of
//! tensors of real checkpoints, and the counts of published models agree with their model cards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_moe::io::hf::hf_name;
use candle_moe::io::hub::LoadOptions;
use candle_moe::io::inspect::inspect;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Names and shapes of every tensor in a checkpoint directory's safetensors files.
fn checkpoint_shapes(dir: &Path) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            for (n, info) in meta.tensors() {
                out.insert(n.clone(), info.shape.clone());
            }
        }
    }
    out
}

/// Every Hugging Face fixture: the inventory, under the family's names, is the checkpoint (for
/// fused layouts: the same number of weights).
#[test]
fn inventory_is_the_checkpoint() {
    let mut checked = 0;
    for set in ["hf", "hf_v5", "hf_v5_fused"] {
        for e in std::fs::read_dir(fixtures().join(set)).unwrap() {
            let dir = e.unwrap().path();
            // FP8 and MXFP4 copies store quantised blocks and scales (checked by their tests).
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            if !dir.join("config.json").exists() || name.contains("fp8") || name.contains("mxfp4") {
                continue;
            }
            // Variants that reuse another fixture's weights hold only a config.
            let shapes = checkpoint_shapes(&dir);
            if shapes.is_empty() {
                continue;
            }
            let inv = inspect(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
            let family = inv.family.unwrap();
            let ours: BTreeMap<String, Vec<usize>> = inv
                .params
                .iter()
                .map(|(n, s)| (hf_name(family, n), s.clone()))
                .collect();
            let numel = |m: &BTreeMap<String, Vec<usize>>| -> u128 {
                m.values()
                    .map(|s| s.iter().map(|&d| d as u128).product::<u128>())
                    .sum()
            };
            // Fused layouts (gpt-oss, GraniteMoE, transformers 5 fused copies) serve the same
            // per-expert parameters from fewer tensors: the same number of weights.
            let fused = shapes
                .keys()
                .any(|k| k.contains("gate_up_proj") || k.contains("input_linear"));
            if !fused {
                assert_eq!(ours, shapes, "{}", dir.display());
            }
            assert_eq!(inv.total(), numel(&shapes), "{}", dir.display());
            assert_eq!(inv.total(), numel(&ours));
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} fixtures");
}

/// Whether `n` parameters print as `published` billions with one decimal, rounded or truncated
/// (model cards do both: Mixtral's 12.88B active is "12.9B", Qwen3-30B-A3B's 3.353B is "3.3B").
fn agrees(n: u128, published: f64) -> bool {
    let tenths = n as f64 / 1e8;
    let p = (published * 10.0).round();
    tenths.round() == p || tenths.floor() == p
}

/// Total and active parameters of published checkpoints (their `config.json` in
/// `tests/fixtures/real_configs/`) against the figures their model cards publish, which are
/// given to 0.1B: our exact counts must print as them.
#[test]
fn published_parameter_counts() {
    // (dir, total, active, active counts the input embedding)
    let cases = [
        ("mixtral-8x7b", 46.7, 12.9, true),
        ("olmoe-1b-7b", 6.9, 1.3, true),
        ("qwen3-30b-a3b", 30.5, 3.3, true),
        ("deepseek-v2-lite", 15.7, 2.4, false),
        ("gpt-oss-20b", 20.9, 3.6, false),
    ];
    for (name, total, active, with_embedding) in cases {
        let dir = fixtures().join("real_configs").join(name);
        let inv = inspect(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let a = if with_embedding {
            inv.active()
        } else {
            inv.active_without_input_embedding()
        };
        assert!(agrees(inv.total(), total), "{name}: total {}", inv.total());
        assert!(agrees(a, active), "{name}: active {a}");
        assert!(inv.active() < inv.total());
    }
    // gpt-oss-20b's model card gives two decimals: 20.91B total, 3.61B active; its experts are
    // stored in MXFP4 (4.25 bits per weight), the rest in bf16: about 12.8 GiB of weights.
    let dir = fixtures().join("real_configs/gpt-oss-20b");
    let inv = inspect(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(
        (
            inv.total() / 10_000_000,
            inv.active_without_input_embedding() / 10_000_000
        ),
        (2091, 360)
    );
    let gib = inv.stored_bytes() / (1u64 << 30) as f64;
    assert!((12.5..13.0).contains(&gib), "{gib} GiB");
}

#[test]
fn a_bare_config_file_and_bad_configs() {
    let cfg = fixtures().join("real_configs/mixtral-8x7b/config.json");
    let inv = inspect(cfg.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(inv.config.num_layers, 32);
    assert_eq!(inv.stored_dtype.as_deref(), Some("bfloat16"));
    // 46.7B parameters at bf16: the memory figure follows from the count.
    assert_eq!(inv.bytes_at(2.0), inv.total() as f64 * 2.0);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, r#"{"model_type": "llama4_moe"}"#).unwrap();
    let e = inspect(p.to_str().unwrap(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown model_type `llama4_moe`"), "{e}");
}
