//! Fused expert layouts: the transformers 5 fixtures saved fused by transformers
//! (`save_pretrained(..., save_original_format=False)`, `tests/fixtures/gen_hf_fused.py`) and a
//! transposed copy load and compute what the per-expert originals computed (their
//! `expected.json`), under the v5 and the v4 spelling of config.json; `save_pretrained` writes
//! fused experts on request and reads them back; a fused tensor of the wrong shape and an
//! ambiguous layout are errors naming the tensor.

mod common;

use common::json::ids;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_moe::error::CheckpointErrorKind;
use candle_moe::io::hf::{ExpertsOnDisk, SaveOptions};
use candle_moe::{CausalLm, Error, LoadOptions, ModelConfig};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(family: &str) -> Value {
    let p = fixtures().join("hf_v5").join(family).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn load(dir: &Path, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..Default::default()
    };
    CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap()
}

/// Logits (1e-4) and aux losses with and without the padding mask (1e-5) against `exp`.
fn check(model: &CausalLm, exp: &Value, what: &str) {
    let input = ids(&exp["input_ids"]);
    let out = model.forward(&input).unwrap();
    let got = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want = vec![];
    flat(&exp["logits"], &mut want);
    assert_eq!(got.len(), want.len(), "{what}");
    let max = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(max <= 1e-4, "{what}: logits differ by {max}");
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want_aux = exp["aux_loss"].as_f64().unwrap();
    assert!(
        (aux - want_aux).abs() <= 1e-5,
        "{what}: aux {aux} vs {want_aux}"
    );
    let mask = ids(&exp["attention_mask"]);
    let out = model.forward_t(&input, Some(&mask), false).unwrap();
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want_aux = exp["aux_loss_masked"].as_f64().unwrap();
    assert!(
        (aux - want_aux).abs() <= 1e-5,
        "{what}: masked aux {aux} vs {want_aux}"
    );
}

/// A copy of fixture directory `src` with `config` as its config.json.
fn with_config(src: &Path, config: &str, tmp: &Path) -> PathBuf {
    let dst = tmp.join(src.file_name().unwrap());
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let p = f.unwrap().path();
        let n = p.file_name().unwrap().to_str().unwrap().to_string();
        if n.starts_with("config") {
            continue;
        }
        std::fs::copy(&p, dst.join(&n)).unwrap();
    }
    std::fs::copy(src.join(config), dst.join("config.json")).unwrap();
    dst
}

fn check_fused(dir: &str, family: &str) {
    let exp = expected(family);
    let src = fixtures().join("hf_v5_fused").join(dir);
    check(&load(&src, false), &exp, dir);
    // Trainable: every expert a variable of its own, the same numbers.
    check(&load(&src, true), &exp, &format!("{dir} (trainable)"));
    let tmp = tempfile::tempdir().unwrap();
    let v4 = with_config(&src, "config.v4.json", tmp.path());
    check(&load(&v4, false), &exp, &format!("{dir} (v4 config)"));
}

#[test]
fn fused_mixtral_matches_per_expert_original() {
    check_fused("mixtral", "mixtral");
}

#[test]
fn fused_mixtral_transposed_matches_per_expert_original() {
    check_fused("mixtral_transposed", "mixtral");
}

#[test]
fn fused_qwen2_moe_sharded_matches_per_expert_original() {
    check_fused("qwen2_moe", "qwen2_moe");
}

#[test]
fn fused_olmoe_matches_per_expert_original() {
    check_fused("olmoe", "olmoe");
}

#[test]
fn fused_qwen3_moe_matches_per_expert_original() {
    check_fused("qwen3_moe", "qwen3_moe");
}

/// The per-expert weights served from a fused checkpoint are exactly the original ones.
#[test]
fn fused_experts_slice_to_the_original_weights() {
    for (dir, fam) in [
        ("mixtral", "mixtral"),
        ("mixtral_transposed", "mixtral"),
        ("qwen2_moe", "qwen2_moe"),
    ] {
        let a = load(&fixtures().join("hf_v5").join(fam), false);
        let b = load(&fixtures().join("hf_v5_fused").join(dir), false);
        let pa = a.parameters();
        let pb: HashMap<String, Tensor> = b.parameters().iter().cloned().collect();
        assert_eq!(pa.len(), pb.len(), "{dir}");
        for (n, t) in pa {
            let u = &pb[n];
            assert_eq!(t.dims(), u.dims(), "{dir} {n}");
            let d = (t - u).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{dir} {n}");
        }
    }
}

fn st_names(dir: &Path) -> HashMap<String, Vec<usize>> {
    let mut out = HashMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            for (n, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                out.insert(n, t.dims().to_vec());
            }
        }
    }
    out
}

/// `save_pretrained` writes per-expert names by default and transformers 5's fused layout on
/// request; both read back to the same model.
#[test]
fn save_pretrained_writes_fused_experts_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    for fam in ["mixtral", "qwen2_moe"] {
        let exp = expected(fam);
        let m = load(&fixtures().join("hf_v5").join(fam), false);
        let per = tmp.path().join(format!("{fam}_per_expert"));
        m.save_pretrained(&per).unwrap();
        let names = st_names(&per);
        assert!(!names.keys().any(|n| n.contains("gate_up_proj")), "{fam}");
        let fused = tmp.path().join(format!("{fam}_fused"));
        m.save_pretrained_experts(&fused, &SaveOptions::default(), ExpertsOnDisk::Fused)
            .unwrap();
        let names = st_names(&fused);
        let i = if fam == "mixtral" { 64 } else { 48 };
        assert_eq!(
            names["model.layers.1.mlp.experts.gate_up_proj"],
            vec![4, 2 * i, 32]
        );
        assert_eq!(
            names["model.layers.1.mlp.experts.down_proj"],
            vec![4, 32, i]
        );
        assert!(
            names.contains_key("model.layers.0.mlp.gate.weight"),
            "{fam}"
        );
        assert!(!names.keys().any(|n| n.contains(".experts.0.")), "{fam}");
        assert!(
            !names.keys().any(|n| n.contains("block_sparse_moe")),
            "{fam}"
        );
        check(&load(&fused, false), &exp, &format!("{fam} saved fused"));
        check(&load(&per, false), &exp, &format!("{fam} saved per expert"));
    }
}

/// A fixture copy with one tensor replaced (`None`: removed) and others added.
fn edit_fixture(src: &Path, tmp: &Path, edit: impl Fn(&mut HashMap<String, Tensor>)) -> PathBuf {
    let dst = tmp.join("edited");
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let p = f.unwrap().path();
        let n = p.file_name().unwrap().to_str().unwrap().to_string();
        if n == "model.safetensors" {
            let mut ts = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
            edit(&mut ts);
            candle_core::safetensors::save(&ts, dst.join(&n)).unwrap();
        } else {
            std::fs::copy(&p, dst.join(&n)).unwrap();
        }
    }
    dst
}

fn load_err(dir: &Path) -> Error {
    match CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

fn tensor_of(e: &Error) -> Option<&str> {
    match e {
        Error::Checkpoint { tensor, .. } => tensor.as_deref(),
        _ => None,
    }
}

#[test]
fn fused_tensor_of_the_wrong_shape_names_it_and_the_expected_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf_v5_fused/mixtral");
    // Layer 1 disagrees with the layout detected on layer 0.
    let bad = edit_fixture(&src, tmp.path(), |ts| {
        let k = "model.layers.1.mlp.experts.gate_up_proj";
        let t = ts[k].narrow(1, 0, 126).unwrap();
        ts.insert(k.into(), t);
    });
    let e = load_err(&bad);
    assert_eq!(
        tensor_of(&e),
        Some("model.layers.1.mlp.experts.gate_up_proj"),
        "{e}"
    );
    match e.checkpoint_kind() {
        Some(CheckpointErrorKind::Shape { expected, found }) => {
            assert_eq!(expected, &vec![4, 128, 32]);
            assert_eq!(found, &vec![4, 126, 32]);
        }
        k => panic!("{k:?}: {e}"),
    }
    // On the first layer nothing fits: both readings' shapes are named.
    let bad = edit_fixture(&src, tmp.path(), |ts| {
        let k = "model.layers.0.mlp.experts.down_proj";
        let t = ts[k].narrow(0, 0, 3).unwrap();
        ts.insert(k.into(), t);
    });
    let e = load_err(&bad);
    assert_eq!(
        tensor_of(&e),
        Some("model.layers.0.mlp.experts.down_proj"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("[4, 32, 64] or [4, 64, 32]"), "{msg}");
    assert!(matches!(
        e.checkpoint_kind(),
        Some(CheckpointErrorKind::Shape { .. })
    ));
}

/// A crate-built Mixtral with hidden size 2 × expert size, saved fused.
fn square_model(tmp: &Path) -> PathBuf {
    let mut cfg = ModelConfig::tiny(64);
    cfg.moe.intermediate_size = 32; // hidden 64 = 2I: gate_up [E, 64, 64] is square
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let dir = tmp.join("square");
    m.save_pretrained_experts(&dir, &SaveOptions::default(), ExpertsOnDisk::Fused)
        .unwrap();
    dir
}

#[test]
fn ambiguous_fused_layout_is_refused_naming_both_readings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = square_model(tmp.path());
    // gate_up and down together fix the layout even when gate_up is square.
    let ok = load(&dir, false);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    assert!(ok.forward(&ids).is_ok());
    // gate_up alone (down stored per expert) fits rows and columns: refused, not guessed.
    let bad = edit_fixture(&dir, tmp.path(), |ts| {
        for l in 0..2 {
            let k = format!("model.layers.{l}.mlp.experts.down_proj");
            let down = ts.remove(&k).unwrap();
            for e in 0..4 {
                let w = down.get(e).unwrap();
                ts.insert(format!("model.layers.{l}.mlp.experts.{e}.w2.weight"), w);
            }
        }
    });
    let e = load_err(&bad);
    assert_eq!(
        tensor_of(&e),
        Some("model.layers.0.mlp.experts.gate_up_proj"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("ambiguous"), "{msg}");
    assert!(msg.contains("by rows [E, 2I, H]"), "{msg}");
    assert!(msg.contains("by columns [E, H, 2I]"), "{msg}");
}

#[test]
fn fused_and_per_expert_copies_of_one_layer_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf_v5_fused/mixtral");
    let per = fixtures().join("hf_v5/mixtral/model.safetensors");
    let extra = candle_core::safetensors::load(per, &Device::Cpu).unwrap();
    let bad = edit_fixture(&src, tmp.path(), |ts| {
        let k = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
        ts.insert(k.into(), extra[k].clone());
    });
    let e = load_err(&bad);
    assert_eq!(
        tensor_of(&e),
        Some("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("model.layers.0.mlp.experts.gate_up_proj"),
        "{e}"
    );
}
