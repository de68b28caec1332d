//! Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens by softmax
//! score. Checked against a per-token f64 reference loop written here (scores, per-expert
//! top-C, per-token weighted sum), on f64 and f32 and every expert backend, with and without a
//! shared expert; finite-difference gradients (f64) for the router, an expert and the input;
//! the causal models' refusal; padding never picked; a classifier with expert choice that
//! trains.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::config::RoutingKind;
use candle_moe::moe::expert_choice::expert_capacity;
use candle_moe::moe::ExpertBackend;
use candle_moe::{CausalLm, ModelConfig, MoeConfig, Seq2Seq, SequenceClassifier, SparseMoe};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::moe_ref::{sigmoid, swiglu_ref};
use common::{mat, matvec, randomize, Rng};

const H: usize = 6;
const E: usize = 4;
const N: usize = 10;

fn cfg(shared: bool, cf: Option<f64>) -> MoeConfig {
    MoeConfig {
        hidden_size: H,
        intermediate_size: 5,
        num_experts: E,
        top_k: 2,
        capacity_factor: cf,
        shared_expert_intermediate_size: if shared { 3 } else { 0 },
        shared_expert_gate: shared,
        routing: RoutingKind::ExpertChoice,
        ..Default::default()
    }
}

fn layer(c: &MoeConfig, dtype: DType, seed: u64) -> (SparseMoe, VarMap) {
    let vm = VarMap::new();
    let m = SparseMoe::new(c, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(seed), 0.6);
    (m, vm)
}

fn inputs(seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::new(seed);
    (0..N).map(|_| rng.normals(H, 1.0)).collect()
}

fn to_tensor(xs: &[Vec<f64>], dtype: DType) -> Tensor {
    let flat: Vec<f64> = xs.concat();
    Tensor::from_vec(flat, (xs.len(), H), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The reference: outputs per token and how many experts picked each token.
#[allow(clippy::needless_range_loop)] // an expert's column of the scores, by index
fn reference(c: &MoeConfig, vm: &VarMap, xs: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<usize>) {
    let n = xs.len();
    let cf = c.capacity_factor.unwrap_or(c.top_k as f64);
    let cap = ((n as f64 * cf / E as f64).ceil() as usize).clamp(1, n);
    let gate = mat(vm, "gate.weight");
    let scores: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| {
            let l = matvec(&gate, x);
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
            l.iter().map(|v| (v - m).exp() / z).collect()
        })
        .collect();
    let mut ys = vec![vec![0.0; H]; n];
    let mut picks = vec![0usize; n];
    for e in 0..E {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| scores[*b][e].partial_cmp(&scores[*a][e]).unwrap());
        for &t in &order[..cap] {
            picks[t] += 1;
            let out = swiglu_ref(vm, &format!("experts.{e}"), &xs[t]);
            for (y, o) in ys[t].iter_mut().zip(out) {
                *y += scores[t][e] * o;
            }
        }
    }
    if c.shared_expert_intermediate_size > 0 {
        let g = mat(vm, "shared_expert_gate.weight");
        for (t, x) in xs.iter().enumerate() {
            let out = swiglu_ref(vm, "shared_expert", x);
            let s = sigmoid(matvec(&g, x)[0]);
            for (y, o) in ys[t].iter_mut().zip(out) {
                *y += s * o;
            }
        }
    }
    (ys, picks)
}

fn max_diff(got: &Tensor, want: &[Vec<f64>]) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    got.iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

#[test]
fn capacity_defaults_to_top_k_tokens_per_token_on_average() {
    assert_eq!(expert_capacity(None, N, 2, E), 5);
    assert_eq!(expert_capacity(Some(1.2), N, 2, E), 3);
    assert_eq!(expert_capacity(Some(100.0), N, 2, E), N);
}

#[test]
fn expert_choice_matches_the_per_token_reference() {
    let xs = inputs(11);
    for shared in [false, true] {
        for cf in [None, Some(1.2)] {
            let c = cfg(shared, cf);
            let (m, vm) = layer(&c, DType::F64, 3);
            let (want, picks) = reference(&c, &vm, &xs);
            if cf.is_some() {
                // The case the test is for: some tokens unpicked, some picked several times.
                assert!(picks.contains(&0), "no unpicked token: {picks:?}");
                assert!(
                    picks.iter().any(|&p| p >= 2),
                    "no token picked twice: {picks:?}"
                );
            }
            let cap = expert_capacity(cf, N, 2, E);
            let out = m.forward(&to_tensor(&xs, DType::F64)).unwrap();
            let d = max_diff(&out.hidden_states, &want);
            assert!(d < 1e-12, "f64 shared={shared} cf={cf:?}: {d}");
            assert_eq!(out.expert_counts, vec![cap; E]);
            assert_eq!(out.dropped, picks.iter().filter(|&&p| p == 0).count());
            assert!(out.expert_ids.is_none());
            let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let (z, lb) = (scalar(&out.z_loss), scalar(&out.load_balancing_loss));
            assert!(z.is_finite() && z > 0.0 && lb.is_finite() && lb > 0.0);

            // f32 weights (the same values, rounded), every backend, against the reference on
            // the rounded weights.
            let (m32, vm32) = layer(&c, DType::F32, 3);
            let (want32, _) = reference(&c, &vm32, &xs);
            let x32 = to_tensor(&xs, DType::F32);
            let mut m32 = m32;
            for b in [ExpertBackend::Loop, ExpertBackend::Grouped] {
                m32.set_backend(b);
                assert_eq!(m32.chosen_backend(&x32, false).unwrap(), b);
                let d = max_diff(&m32.forward(&x32).unwrap().hidden_states, &want32);
                assert!(d < 1e-5, "f32 {b:?} shared={shared} cf={cf:?}: {d}");
            }
            // Frozen weights: the fused inference path.
            let frozen: HashMap<String, Tensor> = vm32
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect();
            let mf = SparseMoe::new(
                &c,
                VarBuilder::from_tensors(frozen, DType::F32, &Device::Cpu),
            )
            .unwrap();
            assert_eq!(
                mf.chosen_backend(&x32, false).unwrap(),
                ExpertBackend::Fused
            );
            let d = max_diff(&mf.forward(&x32).unwrap().hidden_states, &want32);
            assert!(d < 1e-5, "f32 fused shared={shared} cf={cf:?}: {d}");
        }
    }
}

/// `Σ y ⊙ r` for a fixed `r`.
fn objective(m: &SparseMoe, x: &Tensor, r: &Tensor) -> Tensor {
    (m.forward_t(x, false).unwrap().hidden_states * r)
        .unwrap()
        .sum_all()
        .unwrap()
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// Central differences of the objective in every entry of `v` against its gradient.
fn check_fd(what: &str, v: &Var, grad: &Tensor, f: &dyn Fn() -> f64) {
    let base = v
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let g = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        v.set(&Tensor::from_vec(p.clone(), v.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let up = f();
        p[i] -= 2.0 * eps;
        v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let down = f();
        let fd = (up - down) / (2.0 * eps);
        worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
    }
    v.set(&Tensor::from_vec(base, v.shape(), &Device::Cpu).unwrap())
        .unwrap();
    assert!(worst < 1e-6, "{what}: finite differences off by {worst}");
}

#[test]
fn expert_choice_gradients_match_finite_differences() {
    let c = cfg(true, Some(1.2));
    let (m, vm) = layer(&c, DType::F64, 5);
    let x = Var::from_tensor(&to_tensor(&inputs(12), DType::F64)).unwrap();
    let r = Rng::new(13).tensor(&[N, H], 1.0, DType::F64);
    let loss = objective(&m, x.as_tensor(), &r);
    let grads = loss.backward().unwrap();
    let f = || objective(&m, x.as_tensor(), &r).to_scalar::<f64>().unwrap();
    for name in ["gate.weight", "experts.1.w1.weight", "experts.2.w2.weight"] {
        let v = var(&vm, name);
        let g = grads
            .get(v.as_tensor())
            .expect("gradient reaches the variable");
        check_fd(name, &v, g, &f);
    }
    let g = grads
        .get(x.as_tensor())
        .expect("gradient reaches the input");
    check_fd("input", &x, g, &f);
}

#[test]
fn causal_models_refuse_expert_choice() {
    let mut mc = ModelConfig::tiny(32);
    mc.moe.routing = RoutingKind::ExpertChoice;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let err = CausalLm::new(&mc, vb.clone()).unwrap_err().to_string();
    assert!(
        err.contains("routing") && err.contains("future"),
        "unclear error: {err}"
    );
    let err = Seq2Seq::new(&mc, vb.clone()).unwrap_err().to_string();
    assert!(
        err.contains("routing") && err.contains("decoder"),
        "unclear error: {err}"
    );
    // A bidirectional encoder accepts it.
    let mut cc = mc.clone();
    cc.num_labels = 2;
    assert!(SequenceClassifier::new(&cc, vb).is_ok());
    // Combinations that need token-choice scores are refused by name.
    let mut bad = cfg(false, None);
    bad.noisy_gating = true;
    let vm = VarMap::new();
    let err = SparseMoe::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expert_choice") && err.contains("noisy_gating"),
        "{err}"
    );
}

#[test]
fn classifier_with_expert_choice_trains() {
    let mut mc = ModelConfig::tiny(32);
    mc.hidden_size = 32;
    mc.dense_intermediate_size = 32;
    mc.moe.hidden_size = 32;
    mc.moe.intermediate_size = 32;
    mc.moe.routing = RoutingKind::ExpertChoice;
    mc.num_labels = 2;
    let vm = VarMap::new();
    let m = SequenceClassifier::new(&mc, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 7).unwrap();
    // Label: whether token 1 occurs in the sequence.
    let mut rng = Rng::new(21);
    let (b, t) = (16, 8);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| 2 + (rng.next_u64() % 30) as u32)
        .collect();
    let mut ids = ids;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % 2).collect();
    for (i, &l) in labels.iter().enumerate() {
        if l == 1 {
            ids[i * t + (i % t)] = 1;
        }
    }
    let x = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(labels, b, &Device::Cpu).unwrap();
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = vec![];
    for _ in 0..12 {
        let out = m.forward_t(&x, None, None, true).unwrap();
        let r = &out.routing[0];
        assert_eq!(r.expert_counts, vec![expert_capacity(None, b * t, 2, 4); 4]);
        let loss = candle_moe::losses::cross_entropy(&out.logits, &y, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let total = (loss + (out.load_balancing_loss * 0.01).unwrap()).unwrap();
        opt.backward_step(&total).unwrap();
    }
    println!("losses: {losses:?}");
    assert!(
        losses[losses.len() - 1] < 0.7 * losses[0],
        "loss did not decrease: {losses:?}"
    );
}

#[test]
fn padding_is_never_picked_and_does_not_count_for_capacity() {
    let c = cfg(true, Some(1.2));
    let (m, vm) = layer(&c, DType::F64, 9);
    let xs = inputs(14); // 10 tokens: a (2, 5) batch, the last two of the second row padding
    let mask =
        Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0], (2, 5), &Device::Cpu).unwrap();
    let x = to_tensor(&xs, DType::F64).reshape((2, 5, H)).unwrap();
    let out = m.forward_masked(&x, Some(&mask), false).unwrap();
    let (want, picks) = reference(&c, &vm, &xs[..8]);
    let got = out.hidden_states.reshape((N, H)).unwrap();
    let d = max_diff(&got.narrow(0, 0, 8).unwrap(), &want);
    assert!(
        d < 1e-12,
        "real tokens vs the reference without padding: {d}"
    );
    assert_eq!(
        out.expert_counts,
        vec![expert_capacity(Some(1.2), 8, 2, E); E]
    );
    assert_eq!(out.dropped, picks.iter().filter(|&&p| p == 0).count());
    // The padding rows get the shared expert only.
    let pad = got.narrow(0, 8, 2).unwrap().to_vec2::<f64>().unwrap();
    for (t, row) in pad.iter().enumerate() {
        let shared: Vec<f64> = {
            let g = mat(&vm, "shared_expert_gate.weight");
            let s = sigmoid(matvec(&g, &xs[8 + t])[0]);
            swiglu_ref(&vm, "shared_expert", &xs[8 + t])
                .iter()
                .map(|o| s * o)
                .collect()
        };
        let d = row
            .iter()
            .zip(&shared)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-12, "padding row {t} got routed experts: {d}");
    }
    let bad = Tensor::ones((2, 4), DType::U32, &Device::Cpu).unwrap();
    let err = m
        .forward_masked(&x, Some(&bad), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token mask has 8 entries for 10 tokens"),
        "{err}"
    );
}
