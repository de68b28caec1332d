//! The layer and the language model on a CUDA device against the CPU: built only with
//! `--features cuda`, run by `scripts/gpu_check.sh` on a machine with an NVIDIA GPU (CI compiles
//! it with `cargo check --features cuda,nccl --all-targets` and does not run it: it has no GPU). On a
//! machine without one these tests fail at `Device::new_cuda(0)`, on purpose: a CUDA test that
//! passes without a GPU would assert nothing.
//!
//! - The sparse layer on CUDA (the generic path: per-expert loop, device-side gather / combine)
//!   against the f64 per-token reference on the same weights rounded to the tested dtype, in f32
//!   (1e-5 of the largest reference value) and bf16 (6e-2), for top-1, top-2, capacity on and
//!   a shared expert; gradients in f32 against the CPU f32 layer's (1e-4).
//! - A tiny `CausalLm` on CUDA: logits equal the CPU's to 1e-4 (f32), and ten training steps
//!   lower the loss.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::{MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use common::moe_ref::reference;
use common::Rng;

const H: usize = 16;

fn gpu() -> Device {
    Device::new_cuda(0).expect("no CUDA device: run this test on a machine with an NVIDIA GPU")
}

fn configs() -> Vec<MoeConfig> {
    let base = MoeConfig {
        hidden_size: H,
        intermediate_size: 24,
        num_experts: 8,
        top_k: 2,
        ..Default::default()
    };
    vec![
        base.clone(),
        MoeConfig {
            top_k: 1,
            norm_topk_prob: false,
            ..base.clone()
        },
        MoeConfig {
            capacity_factor: Some(1.0),
            ..base.clone()
        },
        MoeConfig {
            shared_expert_intermediate_size: 12,
            ..base
        },
    ]
}

/// The f64 CPU varmap (weights rounded to `dt`) and the layer in `dt` on `dev`.
fn layer_on(cfg: &MoeConfig, seed: u64, dt: DType, dev: &Device) -> (VarMap, VarMap, SparseMoe) {
    let (vm64, rounded) = common::rounded_moe_weights(cfg, seed, 0.5, dt);
    let vm = VarMap::new();
    let moe = SparseMoe::new(cfg, VarBuilder::from_varmap(&vm, dt, dev)).unwrap();
    for (name, r) in rounded {
        vm.data().lock().unwrap()[&name]
            .set(&r.to_device(dev).unwrap())
            .unwrap();
    }
    (vm64, vm, moe)
}

#[test]
fn cuda_layer_matches_the_reference_in_f32_and_bf16() {
    let dev = gpu();
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 6e-2)] {
        for (ci, cfg) in configs().iter().enumerate() {
            let (vm64, _vm, moe) = layer_on(cfg, 10 + ci as u64, dt, &dev);
            let xs = Rng::new(20 + ci as u64).tensor(&[64, H], 1.0, DType::F64);
            let xs_dt = xs.to_dtype(dt).unwrap();
            let x64: Vec<Vec<f64>> = xs_dt.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
            let out = moe.forward(&xs_dt.to_device(&dev).unwrap()).unwrap();
            let got: Vec<Vec<f64>> = out
                .hidden_states
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2()
                .unwrap();
            let r = reference(cfg, &vm64, &x64);
            let scale = r.y.iter().flatten().fold(1.0f64, |m, v| m.max(v.abs()));
            let mut bad = 0;
            for (g, rr) in got.iter().zip(&r.y) {
                if g.iter().zip(rr).any(|(a, b)| (a - b).abs() > tol * scale) {
                    bad += 1;
                }
            }
            // bf16 routers may break near-ties differently from the f64 reference.
            let allowed = if dt == DType::F32 { 0 } else { 64 / 10 };
            assert!(bad <= allowed, "{dt:?} {cfg:?}: {bad} of 64 tokens differ");
        }
    }
}

#[test]
fn cuda_layer_gradients_match_the_cpu() {
    let dev = gpu();
    for (ci, cfg) in configs().iter().enumerate() {
        let grads = |d: &Device| {
            let (_, vm, moe) = layer_on(cfg, 40 + ci as u64, DType::F32, d);
            let x0 = Rng::new(50 + ci as u64).tensor(&[32, H], 1.0, DType::F32);
            let x = Var::from_tensor(&x0.to_device(d).unwrap()).unwrap();
            let y = moe.forward_t(x.as_tensor(), true).unwrap();
            let loss = (y.hidden_states.sqr().unwrap().sum_all().unwrap()
                + (y.load_balancing_loss * 0.1).unwrap())
            .unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![];
            for (n, v) in vm.data().lock().unwrap().iter() {
                if let Some(gv) = g.get(v.as_tensor()) {
                    out.push((n.clone(), gv.to_device(&Device::Cpu).unwrap()));
                }
            }
            out.push((
                "x".into(),
                g.get(x.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap(),
            ));
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        };
        let (gc, gg) = (grads(&Device::Cpu), grads(&dev));
        assert_eq!(gc.len(), gg.len(), "{cfg:?}");
        for ((n, a), (_, b)) in gc.iter().zip(&gg) {
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            let d = common::max_abs_diff(a, b);
            assert!(d <= 1e-4 * scale as f64, "{cfg:?} {n}: {d}");
        }
    }
}

#[test]
fn cuda_language_model_matches_the_cpu_and_trains() {
    use candle_moe::losses::cross_entropy;
    use candle_moe::train::LossParts;
    use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
    let dev = gpu();
    let mut cfg = ModelConfig::tiny(64);
    (cfg.hidden_size, cfg.moe.hidden_size, cfg.num_layers) = (32, 32, 2);
    (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (32, 64);
    let vm_cpu = VarMap::new();
    let cpu = CausalLm::new(
        &cfg,
        VarBuilder::from_varmap(&vm_cpu, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vm = VarMap::new();
    let model = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    for (name, v) in vm_cpu.data().lock().unwrap().iter() {
        vm.data().lock().unwrap()[name]
            .set(&v.as_tensor().to_device(&dev).unwrap())
            .unwrap();
    }
    let ids = Tensor::arange(0u32, 64, &Device::Cpu)
        .unwrap()
        .reshape((4, 16))
        .unwrap();
    let a = cpu.forward_t(&ids, None, false).unwrap().logits;
    let b = model
        .forward_t(&ids.to_device(&dev).unwrap(), None, false)
        .unwrap()
        .logits
        .to_device(&Device::Cpu)
        .unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-4);

    let ids = ids.to_device(&dev).unwrap();
    let (inp, tgt) = (
        ids.narrow(1, 0, 15).unwrap(),
        ids.narrow(1, 1, 15).unwrap().flatten_all().unwrap(),
    );
    let train = TrainConfig {
        steps: 10,
        lr: 1e-2,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vm, train).unwrap();
    trainer
        .run(
            |_| {
                let out = model.forward_t(&inp, None, true)?;
                let task = cross_entropy(&out.logits.reshape((60, 64))?, &tgt, None)?;
                Ok(LossParts::from_output(task, &out))
            },
            || Ok(0.0),
            |_| Ok(()),
        )
        .unwrap();
    let h = &trainer.state.history;
    assert!(h[9].task < h[0].task, "{} -> {}", h[0].task, h[9].task);
}
