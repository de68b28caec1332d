//! A SparseMoe trained with AdamW on a piecewise-linear regression beats a dense expert of the
//! same active size, and the load-balancing loss keeps the experts' loads even.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_moe::moe::experts::Expert;
use candle_moe::{ExpertKind, MoeConfig, SparseMoe};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::Rng;

const D: usize = 8;

/// Four input regions (Gaussian clusters around the first four corners of the cube
/// `±2` on `(x0, x1)`), each with its own random linear map.
fn data(rng: &mut Rng, maps: &[Vec<f64>], n: usize) -> (Tensor, Tensor) {
    let mut xs = Vec::with_capacity(n * D);
    let mut ys = Vec::with_capacity(n * D);
    for _ in 0..n {
        let r = (rng.next_u64() % 4) as usize;
        let mut x = rng.normals(D, 0.5);
        x[0] += if r & 1 == 1 { 2.0 } else { -2.0 };
        x[1] += if r & 2 == 2 { 2.0 } else { -2.0 };
        for o in 0..D {
            ys.push((0..D).map(|i| maps[r][o * D + i] * x[i]).sum::<f64>());
        }
        xs.extend(x);
    }
    let dev = Device::Cpu;
    (
        Tensor::from_vec(xs, (n, D), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
        Tensor::from_vec(ys, (n, D), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
}

fn mse(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

struct Run {
    test_mse: f32,
    load_ratio: f64,
}

fn train_moe(aux_coef: f64, steps: usize) -> Run {
    let cfg = MoeConfig {
        hidden_size: D,
        intermediate_size: 16,
        num_experts: 4,
        top_k: 1,
        norm_topk_prob: false,
        router_aux_loss_coef: aux_coef,
        ..Default::default()
    };
    let vm = VarMap::new();
    let moe = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 1).unwrap();
    let mut rng = Rng::new(2);
    let maps: Vec<Vec<f64>> = (0..4).map(|_| rng.normals(D * D, 0.5)).collect();
    let (xt, yt) = data(&mut rng, &maps, 2048);
    let (xv, yv) = data(&mut rng, &maps, 1024);
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for step in 0..steps {
        let i = (step * 256) % 2048;
        let (x, y) = (xt.narrow(0, i, 256).unwrap(), yt.narrow(0, i, 256).unwrap());
        let out = moe.forward_t(&x, true).unwrap();
        let loss = (mse_t(&out.hidden_states, &y) + (out.load_balancing_loss * aux_coef).unwrap())
            .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let out = moe.forward(&xv).unwrap();
    let max = *out.expert_counts.iter().max().unwrap() as f64;
    let min = *out.expert_counts.iter().min().unwrap() as f64;
    Run {
        test_mse: mse(&out.hidden_states, &yv),
        load_ratio: max / min.max(1.0),
    }
}

fn mse_t(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn train_dense(steps: usize) -> f32 {
    let vm = VarMap::new();
    let dense = Expert::new(
        D,
        16,
        ExpertKind::Swiglu,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 1).unwrap();
    let mut rng = Rng::new(2);
    let maps: Vec<Vec<f64>> = (0..4).map(|_| rng.normals(D * D, 0.5)).collect();
    let (xt, yt) = data(&mut rng, &maps, 2048);
    let (xv, yv) = data(&mut rng, &maps, 1024);
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for step in 0..steps {
        let i = (step * 256) % 2048;
        let (x, y) = (xt.narrow(0, i, 256).unwrap(), yt.narrow(0, i, 256).unwrap());
        opt.backward_step(&mse_t(&dense.forward(&x).unwrap(), &y))
            .unwrap();
    }
    mse(&dense.forward(&xv).unwrap(), &yv)
}

#[test]
fn moe_beats_dense_expert_of_same_active_size_and_stays_balanced() {
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let dense = train_dense(steps);
    let balanced = train_moe(0.01, steps);
    let free = train_moe(0.0, steps);
    println!(
        "held-out MSE: dense {dense:.4}, MoE aux=0.01 {:.4} (load max/min {:.2}), MoE aux=0 {:.4} (load max/min {:.2})",
        balanced.test_mse, balanced.load_ratio, free.test_mse, free.load_ratio
    );
    assert!(
        balanced.test_mse < 0.7 * dense,
        "MoE {} vs dense {dense}",
        balanced.test_mse
    );
    assert!(
        balanced.load_ratio < 2.0,
        "load ratio {}",
        balanced.load_ratio
    );
}
