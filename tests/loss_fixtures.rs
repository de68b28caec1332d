//! The aux losses against numbers produced by Hugging Face transformers
//! (`tests/fixtures/gen_losses.py` wrote `tests/fixtures/losses.json`).

use candle_core::{Device, Tensor};
use candle_moe::losses::{load_balancing_loss, router_z_loss};
use serde_json::Value;

fn tensor2(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

#[test]
fn load_balancing_and_z_loss_match_transformers() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/losses.json"
    ))
    .unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 6);
    let (mut masked, mut pooled, mut top1, mut top2) = (0, 0, 0, 0);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let e = c["num_experts"].as_u64().unwrap() as usize;
        let k = c["top_k"].as_u64().unwrap() as usize;
        let layers: Vec<Tensor> = c["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor2)
            .collect();
        let mask = match &c["attention_mask"] {
            Value::Null => None,
            m => Some(tensor2(m)),
        };
        masked += mask.is_some() as usize;
        pooled += (layers.len() > 1) as usize;
        top1 += (k == 1) as usize;
        top2 += (k == 2) as usize;
        let lb = load_balancing_loss(&layers, e, k, mask.as_ref())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = c["load_balancing_loss"].as_f64().unwrap();
        assert!(
            (lb - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name}: load balancing {lb} vs transformers {want}"
        );
        let z = router_z_loss(&layers).unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = c["z_loss"].as_f64().unwrap();
        assert!(
            (z - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name}: z-loss {z} vs transformers {want}"
        );
        for (l, w) in layers.iter().zip(c["z_loss_per_layer"].as_array().unwrap()) {
            let z = router_z_loss(std::slice::from_ref(l))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let w = w.as_f64().unwrap();
            assert!(
                (z - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}: per-layer z-loss {z} vs {w}"
            );
        }
    }
    assert!(masked >= 1 && pooled >= 1 && top1 >= 1 && top2 >= 1);
}
