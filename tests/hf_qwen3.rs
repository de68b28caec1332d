//! Qwen3-MoE and sliding-window checkpoints written by transformers 5.x
//! (`tests/fixtures/gen_hf_qwen3_moe.py`, in `tests/fixtures/hf_v5/`): they load through
//! `from_pretrained` under the 5.x and the 4.x spelling of `config.json` and reproduce
//! transformers' logits (1e-4) and `aux_loss` (1e-5), with and without a padding mask; YaRN
//! and sliding windows at a sequence longer than the original length / the window; KV-cache
//! decoding equals the full forward; `save_pretrained` writes what transformers loads
//! (`tests/fixtures/roundtrip_qwen3/expected.json`, `tests/fixtures/gen_roundtrip_qwen3.py`).

mod common;

use common::json::ids;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_moe::{CausalLm, LoadOptions, TrainConfig, Trainer};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_v5")
        .join(name)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Weights of the variants (`qwen3_moe_{yarn,swa,dynamic}`) are the base fixture's.
fn weights_dir(name: &str) -> PathBuf {
    if name.starts_with("qwen3_moe_") {
        fixture("qwen3_moe")
    } else {
        fixture(name)
    }
}

/// A temporary model directory: the fixture's weights with `config_file` as `config.json`.
fn assemble(name: &str, config_file: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        weights_dir(name).join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture(name).join(config_file),
        tmp.path().join("config.json"),
    )
    .unwrap();
    tmp
}

fn load(dir: &Path, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..Default::default()
    };
    CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn max_diff(got: &Tensor, want: &Value) -> f64 {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut w = vec![];
    flat(want, &mut w);
    assert_eq!(got.len(), w.len());
    got.iter()
        .zip(&w)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// Logits and aux loss against transformers, with and without the padding mask, for both
/// config spellings; returns the v5-loaded model.
fn check(name: &str) -> CausalLm {
    let exp = read_json(&fixture(name).join("expected.json"));
    let input = ids(&exp["input_ids"]);
    let mask = ids(&exp["attention_mask"]);
    let mut logits_by_spelling = vec![];
    let mut first = None;
    for config in ["config.json", "config.v4.json"] {
        let dir = assemble(name, config);
        let model = load(dir.path(), false);
        let out = model.forward(&input).unwrap();
        let d = max_diff(&out.logits, &exp["logits"]);
        assert!(d <= 1e-4, "{name} ({config}): logits differ by {d}");
        let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
        let want = exp["aux_loss"].as_f64().unwrap();
        assert!((aux - want).abs() <= 1e-5, "{name}: aux {aux} vs {want}");
        let out_m = model.forward_t(&input, Some(&mask), false).unwrap();
        let d = max_diff(&out_m.logits, &exp["logits_masked"]);
        assert!(d <= 1e-4, "{name} ({config}): masked logits differ by {d}");
        let aux = out_m.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
        let want = exp["aux_loss_masked"].as_f64().unwrap();
        assert!(
            (aux - want).abs() <= 1e-5,
            "{name}: masked aux {aux} vs {want}"
        );
        logits_by_spelling.push(out.logits);
        first.get_or_insert(model);
    }
    assert_eq!(
        common::max_abs_diff(&logits_by_spelling[0], &logits_by_spelling[1]),
        0.0,
        "{name}: the v4 and v5 configs give different logits"
    );
    first.unwrap()
}

/// Prefill of 5 positions, then one position at a time, equals the full forward.
fn check_decode(name: &str, model: &CausalLm) {
    let exp = read_json(&fixture(name).join("expected.json"));
    let input = ids(&exp["input_ids"]);
    let t = input.dim(1).unwrap();
    let full = model.forward(&input).unwrap().logits;
    let mut cache = model.new_cache();
    let mut outs = vec![
        model
            .forward_cached(&input.narrow(1, 0, 5).unwrap(), &mut cache)
            .unwrap()
            .logits,
    ];
    for p in 5..t {
        let step = input.narrow(1, p, 1).unwrap();
        outs.push(model.forward_cached(&step, &mut cache).unwrap().logits);
    }
    let dec = Tensor::cat(&outs, 1).unwrap();
    let d = common::max_abs_diff(&dec, &full);
    assert!(
        d < 1e-4,
        "{name}: decode differs from the full forward by {d}"
    );
}

#[test]
fn qwen3_moe_matches_transformers() {
    let m = check("qwen3_moe");
    check_decode("qwen3_moe", &m);
    let cfg = m.config();
    assert_eq!((cfg.head_dim(), cfg.hidden_size / cfg.num_heads), (12, 8));
    assert!(cfg.qk_norm_per_head && !cfg.qk_norm && !cfg.attention_bias);
    assert_eq!(cfg.mlp_only_layers, vec![1]);
    assert!(!cfg.is_sparse_layer(1) && cfg.is_sparse_layer(0) && cfg.is_sparse_layer(2));
    assert!(cfg.moe.norm_topk_prob && cfg.moe.top_k == 2);
    assert_eq!(cfg.moe.shared_expert_intermediate_size, 0);
    assert_eq!(cfg.moe.router_aux_loss_coef, 0.01);
}

#[test]
fn qwen3_moe_yarn_matches_transformers_past_the_original_length() {
    let m = check("qwen3_moe_yarn");
    check_decode("qwen3_moe_yarn", &m);
    assert!(matches!(
        m.config().rope_scaling,
        Some(candle_moe::config::RopeScaling::Yarn {
            original_max_position_embeddings: 6,
            ..
        })
    ));
}

/// Dynamic NTK past `max_position_embeddings` (8 < 12 positions): the full forward, and a
/// KV-cache decode against transformers' own decode (each new position rotated with the
/// frequencies of the length seen so far; cached keys keep theirs).
#[test]
fn qwen3_moe_dynamic_ntk_matches_transformers_full_and_decoding() {
    let m = check("qwen3_moe_dynamic");
    assert_eq!(m.config().position_limit(), 16);
    let exp = read_json(&fixture("qwen3_moe_dynamic").join("expected.json"));
    let input = ids(&exp["input_ids"]);
    let t = input.dim(1).unwrap();
    let mut cache = m.new_cache();
    let mut outs = vec![
        m.forward_cached(&input.narrow(1, 0, 5).unwrap(), &mut cache)
            .unwrap()
            .logits,
    ];
    for p in 5..t {
        let step = input.narrow(1, p, 1).unwrap();
        outs.push(m.forward_cached(&step, &mut cache).unwrap().logits);
    }
    let dec = Tensor::cat(&outs, 1).unwrap();
    let d = max_diff(&dec, &exp["decode_logits"]);
    assert!(
        d <= 1e-4,
        "dynamic decode differs from transformers' by {d}"
    );
    // And it is not the full forward (the point of recording transformers' decode).
    assert!(max_diff(&dec, &exp["logits"]) > 1e-3);
}

#[test]
fn qwen3_moe_sliding_window_matches_transformers_past_the_window() {
    let m = check("qwen3_moe_swa");
    check_decode("qwen3_moe_swa", &m);
    assert_eq!(m.config().layer_window(2), Some(5));
}

#[test]
fn mixtral_sliding_window_matches_transformers_past_the_window() {
    let m = check("mixtral_swa");
    check_decode("mixtral_swa", &m);
    assert_eq!(m.config().sliding_window, Some(5));
}

#[test]
fn qwen3_moe_bad_configs_name_the_key() {
    let base = read_json(&fixture("qwen3_moe").join("config.json"));
    let err = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        f(&mut v);
        candle_moe::io::hf::config_from_hf(&v, Path::new("config.json"))
            .unwrap_err()
            .to_string()
    };
    let e = err(&|v| {
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 0.into();
    });
    assert!(e.contains("sliding_window"), "{e}");
    let e = err(&|v| v["rope_parameters"]["rope_type"] = "longrope".into());
    assert!(
        e.contains("rope_parameters.rope_type") && e.contains("longrope"),
        "{e}"
    );
    let e = err(&|v| v["head_dim"] = 0.into());
    assert!(e.contains("head_dim"), "{e}");
    let e = err(&|v| v["mlp_only_layers"] = "all".into());
    assert!(e.contains("mlp_only_layers"), "{e}");
    let e = err(&|v| v["decoder_sparse_step"] = 0.into());
    assert!(e.contains("decoder_sparse_step"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Round trip.

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 3e-3,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    }
}

/// A crate-built model with YaRN (original length 8) and a window of 4 on every layer, which
/// `save_pretrained` writes as a Mixtral with `rope_scaling` and `sliding_window`.
fn crate_swa_yarn(seed: u64) -> CausalLm {
    let mut cfg = candle_moe::ModelConfig::tiny(96);
    cfg.moe.norm_topk_prob = true;
    cfg.sliding_window = Some(4);
    cfg.rope_scaling = Some(candle_moe::config::RopeScaling::Yarn {
        factor: 2.0,
        original_max_position_embeddings: 8,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
        truncate: true,
    });
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
    let m = CausalLm::new(&cfg, vb).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, seed).unwrap();
    m
}

/// The models the export writes: each fixture fine-tuned for 5 AdamW steps on the fixed batch,
/// and a crate-built Mixtral with YaRN and a sliding window.
fn export_model(name: &str) -> CausalLm {
    if name == "crate_mixtral_swa_yarn" {
        return crate_swa_yarn(7);
    }
    let fam = name.strip_prefix("finetuned_").unwrap();
    let dir = assemble(fam, "config.json");
    let mut m = load(dir.path(), true);
    let vm = m.varmap().unwrap().clone();
    let (x, y) = common::fixed_lm_batch();
    let y = y.flatten_all().unwrap();
    let mut trainer = Trainer::new(&vm, train_cfg(5)).unwrap();
    for _ in 0..5 {
        let parts = candle_moe::tasks::language_model::loss_parts(&m, &x, &y, true).unwrap();
        trainer.step(&parts).unwrap();
    }
    m.freeze().unwrap();
    m
}

const EXPORTS: [&str; 4] = [
    "crate_mixtral_swa_yarn",
    "finetuned_qwen3_moe",
    "finetuned_qwen3_moe_swa",
    "finetuned_mixtral_swa",
];

/// Writes the export directories for the Python check: run with
/// `CANDLE_MOE_EXPORT=DIR cargo test --release --test hf_qwen3 export -- --ignored`.
#[test]
#[ignore]
fn export() {
    let dir = PathBuf::from(std::env::var("CANDLE_MOE_EXPORT").expect("set CANDLE_MOE_EXPORT"));
    for name in EXPORTS {
        export_model(name).save_pretrained(dir.join(name)).unwrap();
    }
}

/// What transformers computed on the directories `gen_roundtrip_qwen3.py` made the crate save:
/// rebuilding the same models here, saving and reloading them gives the same logits, and
/// transformers reported no missing, unexpected or mismatched key.
#[test]
fn transformers_loads_what_we_save() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roundtrip_qwen3/expected.json");
    let exp = read_json(&path);
    let cases = exp["cases"].as_object().unwrap();
    assert_eq!(cases.len(), EXPORTS.len());
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases {
        let model = export_model(name);
        let out = tmp.path().join(name);
        model.save_pretrained(&out).unwrap();
        let saved = read_json(&out.join("config.json"));
        assert_eq!(saved["model_type"], case["model_type"], "{name}");
        let back = load(&out, false);
        let input: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = input.len();
        let x = Tensor::from_vec(input, (1, n), &Device::Cpu).unwrap();
        let d = max_diff(&back.forward(&x).unwrap().logits, &case["logits"]);
        assert!(d < 1e-4, "{name}: transformers' logits differ by {d}");
        for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert_eq!(case[k].as_array().map(|a| a.len()), Some(0), "{name}: {k}");
        }
    }
}

/// A crate-built model whose attention transformers' Mixtral cannot express is refused by
/// `save_pretrained`, naming the setting.
#[test]
fn save_pretrained_refuses_positions_mixtral_cannot_express() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, edit) in [
        (
            "attention_sinks",
            (|c: &mut candle_moe::ModelConfig| c.attention_sinks = true)
                as fn(&mut candle_moe::ModelConfig),
        ),
        ("qk_norm_per_head", |c| c.qk_norm_per_head = true),
        ("layer_types", |c| {
            c.sliding_window = Some(4);
            c.layer_types = vec![
                candle_moe::config::AttentionSpan::SlidingAttention,
                candle_moe::config::AttentionSpan::FullAttention,
            ];
        }),
    ] {
        let mut cfg = candle_moe::ModelConfig::tiny(96);
        cfg.moe.norm_topk_prob = true;
        edit(&mut cfg);
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
        let m = CausalLm::new(&cfg, vb).unwrap();
        let e = m
            .save_pretrained(tmp.path().join(what))
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    // YaRN and a window on every layer are written and read back.
    let m = crate_swa_yarn(1);
    m.save_pretrained(tmp.path().join("ok")).unwrap();
    let saved = read_json(&tmp.path().join("ok/config.json"));
    assert_eq!(saved["sliding_window"], 4);
    assert_eq!(saved["rope_scaling"]["rope_type"], "yarn");
    let back = load(&tmp.path().join("ok"), false);
    assert_eq!(back.config().rope_scaling, m.config().rope_scaling);
    let (x, _) = common::fixed_lm_batch();
    let d = common::max_abs_diff(
        &m.forward(&x).unwrap().logits,
        &back.forward(&x).unwrap().logits,
    );
    // (The crate-built model runs the training path, the reload the fused inference path.)
    assert!(d < 1e-5, "reloaded logits differ by {d}");
}
