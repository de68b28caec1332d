//! The trainer's learning-rate schedule, gradient clipping and AdamW against torch +
//! transformers (`tests/fixtures/train_oracle.json`, written by `gen_train_oracle.py`).

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::train::LossParts;
use candle_moe::{TrainConfig, Trainer};
use candle_nn::VarMap;
use serde_json::Value;

fn oracle() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/train_oracle.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `TrainConfig::lr_at(s)` is the learning rate of optimizer step `s`. transformers' scheduler
/// gives step `s` the rate after `s` scheduler steps, which is 0 for the first warmup step; our
/// warmup is one step ahead (`(s + 1) / warmup`, so no step is wasted at lr 0) and equal after it.
#[test]
fn schedule_matches_transformers() {
    for case in oracle()["schedule"].as_array().unwrap() {
        let lrs = floats(&case["lrs"]);
        let cfg = TrainConfig {
            lr: case["lr"].as_f64().unwrap(),
            steps: case["steps"].as_u64().unwrap() as usize,
            warmup_steps: case["warmup"].as_u64().unwrap() as usize,
            min_lr_ratio: case["min_ratio"].as_f64().unwrap(),
            ..Default::default()
        };
        for s in 0..cfg.steps {
            let theirs = if s < cfg.warmup_steps {
                lrs[s + 1]
            } else {
                lrs[s]
            };
            let ours = cfg.lr_at(s);
            assert!(
                (ours - theirs).abs() <= 1e-15 + 1e-12 * theirs,
                "step {s}: {ours} vs {theirs} ({case})"
            );
        }
    }
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap().get(name).unwrap().clone()
}

/// Three AdamW steps with global-norm clipping (norms 5, 0.3, 2 against max 1) and decay on the
/// weight only: the norms and learning rates equal torch's to 1e-12; the parameters after the
/// first step to 1e-12, after the later ones to 1e-7 (the effect of `clip_grad_norm_`'s
/// `+ 1e-6` on the norm, which ours leaves out).
#[test]
fn adamw_with_clipping_matches_torch() {
    let o = oracle()["adamw_clip"].clone();
    let c = &o["config"];
    let dev = Device::Cpu;
    let vm = VarMap::new();
    for (name, shape) in [("a.weight", vec![3, 4]), ("b.bias", vec![5])] {
        let init = Tensor::from_vec(floats(&o["init"][name]), shape, &dev).unwrap();
        vm.data()
            .lock()
            .unwrap()
            .insert(name.into(), Var::from_tensor(&init).unwrap());
    }
    let cfg = TrainConfig {
        lr: c["lr"].as_f64().unwrap(),
        steps: c["steps"].as_u64().unwrap() as usize,
        warmup_steps: 0,
        min_lr_ratio: c["min_ratio"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        grad_clip: Some(c["max_norm"].as_f64().unwrap()),
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vm, cfg).unwrap();
    let zero = Tensor::zeros((), DType::F64, &dev).unwrap();
    for (i, step) in o["steps"].as_array().unwrap().iter().enumerate() {
        // loss = <a, g_a> + <b, g_b>: its gradients are the recorded ones.
        let mut task = zero.clone();
        for (name, shape) in [("a.weight", vec![3, 4]), ("b.bias", vec![5])] {
            let g = Tensor::from_vec(floats(&step["grad"][name]), shape, &dev).unwrap();
            task = (task + (var(&vm, name).as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        let parts = LossParts::new(task, zero.clone(), zero.clone(), vec![]);
        let stats = trainer.step(&parts).unwrap();
        let norm = step["total_norm"].as_f64().unwrap();
        assert!(
            (stats.grad_norm - norm).abs() < 1e-12 * norm,
            "step {i}: norm {} vs {norm}",
            stats.grad_norm
        );
        assert!(
            (stats.lr - step["lr"].as_f64().unwrap()).abs() < 1e-15,
            "step {i}: lr {}",
            stats.lr
        );
        for name in ["a.weight", "b.bias"] {
            let ours = var(&vm, name)
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            // Step 0 is clipped by both, and Adam's first update does not depend on the
            // gradients' scale: equal to 1e-12 there.
            let tol = if i == 0 { 1e-12 } else { 1e-7 };
            for (x, y) in ours.iter().zip(floats(&step["after"][name])) {
                assert!((x - y).abs() < tol, "step {i} {name}: {x} vs {y}");
            }
        }
    }
}
