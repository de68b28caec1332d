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
