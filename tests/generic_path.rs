//! The generic expert path (the per-expert loop that CUDA and half precision take) against the
//! plain per-token reference, on CPU, in f64, f32, bf16 and f16: outputs, and gradients with
//! respect to the input, the router and the experts, for every routing configuration the
//! layer has (experts 1-8, top-1/2/all, renormalised or not, capacity on or off, shared expert).
//!
//! Tolerances (relative to the largest reference value): f64 1e-10, f32 1e-5, f16 1e-2,
//! bf16 6e-2 (8-bit mantissa) for outputs; gradients twice that. The reference runs in f64 on
//! the weights and inputs rounded to the tested dtype, so only the arithmetic differs. The
//! router computes in f32 whatever the dtype, so tokens whose k-th and (k+1)-th router
//! probabilities are within 1e-4 (where f32 and f64 may choose differently) are left out; at
//! least 80% of tokens are checked.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::moe::ExpertBackend;
use candle_moe::{MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use common::moe_ref::reference;
use common::{mat, matvec, randomize, Rng};

const H: usize = 8;

fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 => 1e-2,
        _ => 6e-2,
    }
}

/// Router probability resolution of a dtype (ties closer than this are skipped).
fn resolution(dt: DType) -> f64 {
    match dt {
        DType::F64 => 0.0,
        // The router computes in f32 from the rounded weights and inputs.
        _ => 1e-4,
    }
}

fn configs() -> Vec<MoeConfig> {
    let mut out = vec![];
    for e in [1usize, 4, 8] {
        let mut ks = vec![1, 2, e];
        ks.retain(|&k| k <= e);
        ks.dedup();
        for k in ks {
            for renorm in [true, false] {
                for cap in [None, Some(1.0)] {
                    for shared in [0usize, 6] {
                        out.push(MoeConfig {
                            hidden_size: H,
                            intermediate_size: 12,
                            num_experts: e,
                            top_k: k,
                            norm_topk_prob: renorm,
                            capacity_factor: cap,
                            shared_expert_intermediate_size: shared,
                            ..Default::default()
                        });
                    }
                }
            }
        }
    }
    out
}

/// An f64 layer with random weights rounded to `dt`, and the same layer in `dt` on the loop.
fn layers(cfg: &MoeConfig, seed: u64, dt: DType) -> (VarMap, VarMap, SparseMoe) {
    let vm64 = VarMap::new();
    SparseMoe::new(
        cfg,
        VarBuilder::from_varmap(&vm64, DType::F64, &Device::Cpu),
    )
    .unwrap();
    randomize(&vm64, &mut Rng::new(seed), 0.5);
    let vm = VarMap::new();
    let mut moe = SparseMoe::new(cfg, VarBuilder::from_varmap(&vm, dt, &Device::Cpu)).unwrap();
    moe.set_backend(ExpertBackend::Loop);
    for (name, v64) in vm64.data().lock().unwrap().iter() {
        let rounded = v64.as_tensor().to_dtype(dt).unwrap().copy().unwrap();
        v64.set(&rounded.to_dtype(DType::F64).unwrap().copy().unwrap())
            .unwrap();
        vm.data().lock().unwrap()[name].set(&rounded).unwrap();
    }
    (vm64, vm, moe)
}

/// Whether token `x`'s top-k choice is clear at resolution `res` (the k-th and (k+1)-th
/// router probabilities differ by more than `res`).
fn clear_choice(cfg: &MoeConfig, vm64: &VarMap, x: &[f64], res: f64) -> bool {
    if cfg.top_k == cfg.num_experts {
        return true;
    }
    let logits = matvec(&mat(vm64, "gate.weight"), x);
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f64 = ex.iter().sum();
    let mut p: Vec<f64> = ex.iter().map(|v| v / s).collect();
    p.sort_by(|a, b| b.partial_cmp(a).unwrap());
    p[cfg.top_k - 1] - p[cfg.top_k] > res
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

#[test]
fn generic_path_forward_matches_the_reference_in_every_dtype() {
    for dt in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let (mut checked, mut tokens) = (0usize, 0usize);
        for (ci, cfg) in configs().iter().enumerate() {
            let (vm64, _vm, moe) = layers(cfg, 100 + ci as u64, dt);
            let xs = Rng::new(7 + ci as u64)
                .tensor(&[13, H], 1.0, DType::F64)
                .to_dtype(dt)
                .unwrap();
            let x64 = rows(&xs);
            let out = moe.forward(&xs).unwrap();
            assert_eq!(out.hidden_states.dtype(), dt);
            let got = rows(&out.hidden_states);
            let clear: Vec<bool> = x64
                .iter()
                .map(|x| clear_choice(cfg, &vm64, x, resolution(dt)))
                .collect();
            if cfg.capacity_factor.is_some() && clear.iter().any(|c| !c) {
                // A tie changes which later tokens a full expert drops: skip the whole batch.
                tokens += x64.len();
                continue;
            }
            let r = reference(cfg, &vm64, &x64);
            let scale = r.y.iter().flatten().fold(1.0f64, |m, v| m.max(v.abs()));
            for ((g, rr), ok) in got.iter().zip(&r.y).zip(&clear) {
                tokens += 1;
                if !ok {
                    continue;
                }
                checked += 1;
                for (a, b) in g.iter().zip(rr) {
                    assert!(
                        (a - b).abs() <= tolerance(dt) * scale,
                        "{dt:?} {cfg:?}: {a} vs {b}"
                    );
                }
            }
            if clear.iter().all(|c| *c) {
                assert_eq!(out.expert_counts, r.counts, "{dt:?} {cfg:?}");
                assert_eq!(out.dropped, r.dropped, "{dt:?} {cfg:?}");
            }
        }
        assert!(
            checked * 10 >= tokens * 8,
            "{dt:?}: only {checked} of {tokens} tokens checked"
        );
    }
}

/// `sum(probe · y)` for a fixed probe: its gradients exercise every weight that was used.
fn probe_loss(moe: &SparseMoe, x: &Tensor, probe: &Tensor) -> Tensor {
    let y = moe.forward_t(x, true).unwrap().hidden_states;
    (y.to_dtype(DType::F64).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Gradients of the loop in each dtype equal the f64 loop's (same rounded weights), and the f64
/// loop's equal central finite differences of the f64 per-token reference.
#[test]
fn generic_path_gradients_match_f64_and_finite_differences() {
    let picks = [0usize, 5, 17, 30, 44];
    for (ci, cfg) in configs()
        .iter()
        .enumerate()
        .filter(|(i, _)| picks.contains(i))
    {
        let seed = 300 + ci as u64;
        let x0 = Rng::new(seed).tensor(&[6, H], 1.0, DType::F64);
        let probe = Rng::new(seed + 1).tensor(&[6, H], 1.0, DType::F64);
        let grads = |dt: DType| {
            let (vm64, vm, moe) = layers(cfg, seed, dt);
            let x = Var::from_tensor(&x0.to_dtype(dt).unwrap()).unwrap();
            let g = probe_loss(&moe, x.as_tensor(), &probe).backward().unwrap();
            let mut out = vec![(
                "x".to_string(),
                g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap(),
            )];
            for (n, v) in vm.data().lock().unwrap().iter() {
                if let Some(gv) = g.get(v.as_tensor()) {
                    out.push((n.clone(), gv.to_dtype(DType::F64).unwrap()));
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            (out, vm64)
        };
        let (g64, vm64) = grads(DType::F64);
        assert!(g64.iter().any(|(n, _)| n == "gate.weight") || cfg.num_experts == 1);
        // f64 against finite differences of the reference, on a few weights of each gradient.
        let x_rows = rows(&x0);
        let p_rows = rows(&probe);
        let loss = |vm: &VarMap, xr: &[Vec<f64>]| -> f64 {
            let r = reference(cfg, vm, xr);
            r.y.iter()
                .flatten()
                .zip(p_rows.iter().flatten())
                .map(|(a, b)| a * b)
                .sum()
        };
        for (name, g) in &g64 {
            let flat = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0, flat.len() / 2, flat.len() - 1] {
                let eps = 1e-6;
                let fd = if name == "x" {
                    let (r, c) = (idx / H, idx % H);
                    let mut xp = x_rows.clone();
                    let mut xm = x_rows.clone();
                    xp[r][c] += eps;
                    xm[r][c] -= eps;
                    (loss(&vm64, &xp) - loss(&vm64, &xm)) / (2.0 * eps)
                } else {
                    let var = vm64.data().lock().unwrap()[name].clone();
                    let base = var
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap();
                    let at = |d: f64| {
                        let mut v = base.clone();
                        v[idx] += d;
                        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss(&vm64, &x_rows)
                    };
                    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                    at(0.0);
                    fd
                };
                assert!(
                    (flat[idx] - fd).abs() <= 1e-6 * fd.abs().max(1.0),
                    "{cfg:?} {name}[{idx}]: {} vs {fd}",
                    flat[idx]
                );
            }
        }
        for dt in [DType::F32, DType::F16, DType::BF16] {
            if cfg.top_k < cfg.num_experts && dt != DType::F32 {
                // Low-precision routers may break near ties differently; compare only clear cases.
                let (vm64, _, _) = layers(cfg, seed, dt);
                if !x_rows
                    .iter()
                    .all(|x| clear_choice(cfg, &vm64, x, resolution(dt)))
                {
                    continue;
                }
            }
            let (g, _) = grads(dt);
            assert_eq!(g.len(), g64.len(), "{dt:?} {cfg:?}");
            for ((n, a), (_, b)) in g.iter().zip(&g64) {
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    .max(1.0);
                let d = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    d <= 2.0 * tolerance(dt) * scale,
                    "{dt:?} {cfg:?} {n}: max diff {d} (scale {scale})"
                );
            }
        }
    }
}
