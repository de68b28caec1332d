//! Hugging Face checkpoints: tiny random Mixtral, Qwen2-MoE (sharded) and OLMoE models written
//! by transformers (`tests/fixtures/gen_hf_models.py`) load and compute what transformers
//! computed; the hub cache layout loads offline; bad checkpoints name the file and tensor.
//! The same for the transformers 5.x fixtures (`tests/fixtures/gen_hf_models_v5.py`, in
//! `tests/fixtures/hf_v5/`): v5-style config.json, top-1 routing, tied embeddings.

mod common;

use common::json::ids;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_moe::{CausalLm, LoadOptions};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    fixture_in("hf", name)
}

/// `tests/fixtures/<set>/<name>` (set: `hf` for transformers 4.x, `hf_v5` for 5.x).
fn fixture_in(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join(name)
}

fn expected(name: &str) -> Value {
    expected_in("hf", name)
}

fn expected_in(set: &str, name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture_in(set, name).join("expected.json")).unwrap(),
    )
    .unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn check_family(name: &str) {
    check_fixture("hf", name)
}

fn check_fixture(set: &str, name: &str) {
    check_dir(&fixture_in(set, name), &expected_in(set, name), name)
}

/// The model in `dir` against transformers' `exp`: logits, aux loss, masked aux loss.
fn check_dir(dir: &Path, exp: &Value, name: &str) {
    let model = CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let input = ids(&exp["input_ids"]);
    let out = model.forward(&input).unwrap();
    let got = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want = vec![];
    flat(&exp["logits"], &mut want);
    assert_eq!(got.len(), want.len());
    let max = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        max <= 1e-4,
        "{name}: logits differ from transformers by {max}"
    );
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want_aux = exp["aux_loss"].as_f64().unwrap();
    assert!(
        (aux - want_aux).abs() <= 1e-5,
        "{name}: aux loss {aux} vs {want_aux}"
    );
    // With a padding mask, padded rows leave the aux loss.
    let mask = ids(&exp["attention_mask"]);
    let out = model.forward_t(&input, Some(&mask), false).unwrap();
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want_aux = exp["aux_loss_masked"].as_f64().unwrap();
    assert!(
        (aux - want_aux).abs() <= 1e-5,
        "{name}: masked aux loss {aux} vs {want_aux}"
    );
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral");
}

#[test]
fn qwen2_moe_sharded_matches_transformers() {
    check_family("qwen2_moe");
}

#[test]
fn olmoe_matches_transformers() {
    check_family("olmoe");
}

#[test]
fn v5_mixtral_top1_tied_matches_transformers() {
    check_fixture("hf_v5", "mixtral");
}

#[test]
fn v5_qwen2_moe_sharded_matches_transformers() {
    check_fixture("hf_v5", "qwen2_moe");
}

#[test]
fn v5_olmoe_top1_matches_transformers() {
    check_fixture("hf_v5", "olmoe");
}

/// The v5 configs map as transformers 5 reads them: `rope_parameters`, `dtype`, `head_dim:
/// null`, top-1, tied embeddings, and a key left out taking the class default.
#[test]
fn v5_configs_map_as_transformers_reads_them() {
    let cfg = |name: &str| {
        candle_moe::io::hf::read_hf_config(&fixture_in("hf_v5", name).join("config.json"))
            .unwrap()
            .1
    };
    let m = cfg("mixtral");
    assert_eq!(m.rope_theta, 5e5);
    assert_eq!(m.moe.top_k, 1);
    assert!(m.tie_word_embeddings && m.moe.norm_topk_prob);
    assert_eq!(m.head_dim(), 8);
    assert_eq!(m.moe.router_aux_loss_coef, 0.02);
    let q = cfg("qwen2_moe");
    assert_eq!(q.rope_theta, 2e4);
    assert!(q.moe.norm_topk_prob && q.attention_bias);
    // Not in this config.json: Qwen2MoeConfig's default.
    assert_eq!(q.moe.router_aux_loss_coef, 0.001);
    let o = cfg("olmoe");
    assert_eq!(o.rope_theta, 5e4);
    assert_eq!(o.moe.top_k, 1);
    assert!(!o.moe.norm_topk_prob && o.qk_norm);
}

#[test]
fn half_precision_loads_and_stays_close() {
    let exp = expected("mixtral");
    for dtype in [DType::BF16, DType::F16] {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        let model = CausalLm::from_pretrained(fixture("mixtral").to_str().unwrap(), &opts).unwrap();
        let out = model.forward(&ids(&exp["input_ids"])).unwrap();
        assert_eq!(out.logits.dtype(), dtype);
        let got = out
            .logits
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut want = vec![];
        flat(&exp["logits"], &mut want);
        let max = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(max < 0.1, "{dtype:?}: logits off by {max}");
    }
}

#[test]
fn candle_transformers_mixtral_gives_the_same_last_logits() {
    let dir = fixture("mixtral");
    let exp = expected("mixtral");
    let mut cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg_json["sliding_window"] = Value::from(4096);
    cfg_json["use_flash_attn"] = Value::from(false);
    let cfg: candle_transformers::models::mixtral::Config =
        serde_json::from_value(cfg_json).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let ours = CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let input = ids(&exp["input_ids"]);
    for row in 0..2 {
        // A fresh model per sequence: candle-transformers keeps its KV cache inside the model.
        let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let mut theirs = candle_transformers::models::mixtral::Model::new(&cfg, vb).unwrap();
        let x = input.narrow(0, row, 1).unwrap();
        let t = x.dim(1).unwrap();
        let a = theirs.forward(&x, 0).unwrap().flatten_all().unwrap();
        let b = ours
            .forward(&x)
            .unwrap()
            .logits
            .narrow(1, t - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d < 1e-4,
            "row {row}: candle-transformers vs ours differ by {d}"
        );
    }
}

/// Every fixture of the three families, with the other spelling of its config
/// (`config.v5.json` next to a 4.x fixture, `config.v4.json` next to a 5.x one;
/// `gen_config_spellings.py`), reproduces the same numbers.
#[test]
fn both_config_spellings_reproduce_transformers() {
    for (set, alt) in [("hf", "config.v5.json"), ("hf_v5", "config.v4.json")] {
        for name in ["mixtral", "qwen2_moe", "olmoe"] {
            let tmp = tempfile::tempdir().unwrap();
            copy_dir(&fixture_in(set, name), tmp.path());
            std::fs::copy(tmp.path().join(alt), tmp.path().join("config.json")).unwrap();
            check_dir(
                tmp.path(),
                &expected_in(set, name),
                &format!("{set}/{name} with {alt}"),
            );
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn loads_by_hub_id_from_the_hf_hub_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--tiny-org--tiny-mixtral");
    copy_dir(&fixture("mixtral"), &repo.join("snapshots").join(rev));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let model =
        CausalLm::from_pretrained("tiny-org/tiny-mixtral", &LoadOptions::default()).unwrap();
    let exp = expected("mixtral");
    let out = model.forward(&ids(&exp["input_ids"])).unwrap();
    let mut want = vec![];
    flat(&exp["logits"], &mut want);
    let got = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!((got[0] as f64 - want[0]).abs() < 1e-4);
    // A model that is not in the cache fails clearly, without network.
    let e = match CausalLm::from_pretrained("tiny-org/absent", &LoadOptions::default()) {
        Ok(_) => panic!("absent model loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("tiny-org/absent") && e.contains("cache"), "{e}");
}

fn load_err(dir: &Path) -> String {
    match CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("bad checkpoint {} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_hf_checkpoints_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // Unknown model_type.
    let d = tmp.path().join("unknown");
    copy_dir(&fixture("mixtral"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"mixtral\"", "\"llama4\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("unknown model_type `llama4`") && e.contains("config.json"),
        "{e}"
    );
    // Missing shard.
    let d = tmp.path().join("shard");
    copy_dir(&fixture("qwen2_moe"), &d);
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("missing shard"),
        "{e}"
    );
    // Config that disagrees with the weights: wider experts than stored.
    let d = tmp.path().join("shape");
    copy_dir(&fixture("mixtral"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 80");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("w1.weight") && e.contains("[64, 32]"),
        "{e}"
    );
    // Fewer layers in the config than in the weights.
    let d = tmp.path().join("layers");
    copy_dir(&fixture("mixtral"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.1.") && e.contains("num_hidden_layers = 1"),
        "{e}"
    );
    // Truncated weights.
    let d = tmp.path().join("trunc");
    copy_dir(&fixture("mixtral"), &d);
    let w = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &w[..w.len() / 3]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}
