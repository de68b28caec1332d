//! Reading the JSON fixtures transformers wrote: token ids, nested float arrays.

use candle_core::{Device, Tensor};
use serde_json::Value;

/// Parses a JSON file.
pub fn read(path: impl AsRef<std::path::Path>) -> Value {
    let p = path.as_ref();
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A `(b, t)` u32 tensor from a JSON list of lists of ids.
pub fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

/// Every number of a nested JSON array, in order.
pub fn flat(v: &Value) -> Vec<f64> {
    fn go(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| go(x, out)),
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let mut out = vec![];
    go(v, &mut out);
    out
}

/// The largest difference between `got` and `want`, over the positions `keep` marks (all when
/// `None`; `keep` has one entry per position, `got` any number of values per position).
pub fn max_diff(got: &Tensor, want: &[f64], keep: Option<&[bool]>) -> f64 {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    let per_pos = got.len() / keep.map_or(got.len(), |k| k.len());
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(i, _)| keep.is_none_or(|k| k[i / per_pos]))
        .map(|(_, (g, w))| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// A model against transformers' fixture `exp`: logits to 1e-4 and `aux_loss` to 1e-5, without
/// and with the padding mask (`logits_masked` compared at the kept positions).
pub fn check_parity(model: &candle_moe::CausalLm, exp: &Value, what: &str) {
    let input = ids(&exp["input_ids"]);
    let out = model.forward(&input).unwrap();
    let d = max_diff(&out.logits, &flat(&exp["logits"]), None);
    assert!(d <= 1e-4, "{what}: logits differ from transformers by {d}");
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["aux_loss"].as_f64().unwrap();
    assert!((aux - want).abs() <= 1e-5, "{what}: aux {aux} vs {want}");
    // With the padding mask: the same logits at the kept positions, padding out of the loss.
    let mask = ids(&exp["attention_mask"]);
    let keep: Vec<bool> = flat(&exp["attention_mask"])
        .iter()
        .map(|m| *m > 0.5)
        .collect();
    let out = model.forward_t(&input, Some(&mask), false).unwrap();
    let d = max_diff(&out.logits, &flat(&exp["logits_masked"]), Some(&keep));
    assert!(d <= 1e-4, "{what}: masked logits differ by {d}");
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["aux_loss_masked"].as_f64().unwrap();
    assert!(
        (aux - want).abs() <= 1e-5,
        "{what}: masked aux {aux} vs {want}"
    );
}
