//! Routing replay (R3) and router freezing: a forward records the expert ids of every sparse
//! layer; a replayed forward forces them, with gate weights from the current router. Checked
//! bit for bit against the forward that chose them, against a per-token f64 reference after
//! the router changed, and by finite differences through the replayed gate weights; bad
//! records are refused by name. Freezing: training the variables that are not
//! `is_router_param` leaves the routers bit-identical while the experts move.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::config::RoutingKind;
use candle_moe::moe::replay::{RecordedLayer, RoutingRecord};
use candle_moe::moe::{is_router_param, ExpertBackend};
use candle_moe::{CausalLm, ModelConfig, MoeConfig, SparseMoe};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::moe_ref::swiglu_ref;
use common::{mat, matvec, randomize, Rng};

const H: usize = 6;
const E: usize = 4;
const N: usize = 9;

fn cfg(cf: Option<f64>) -> MoeConfig {
    MoeConfig {
        hidden_size: H,
        intermediate_size: 5,
        num_experts: E,
        top_k: 2,
        norm_topk_prob: true,
        capacity_factor: cf,
        ..Default::default()
    }
}

fn layer(c: &MoeConfig, dtype: DType, seed: u64) -> (SparseMoe, VarMap) {
    let vm = VarMap::new();
    let m = SparseMoe::new(c, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(seed), 0.6);
    (m, vm)
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    a.to_vec1::<f64>().unwrap() == b.to_vec1::<f64>().unwrap()
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<u32>().unwrap()
}

#[test]
fn replaying_the_chosen_ids_reproduces_the_forward_bit_for_bit() {
    for (dtype, backend, cf) in [
        (DType::F64, ExpertBackend::Loop, None),
        (DType::F64, ExpertBackend::Loop, Some(0.6)),
        (DType::F32, ExpertBackend::Grouped, None),
        (DType::F32, ExpertBackend::Loop, Some(0.6)),
    ] {
        let (mut m, _) = layer(&cfg(cf), dtype, 1);
        m.set_backend(backend);
        let x = Rng::new(2).tensor(&[N, H], 1.0, dtype);
        let out = m.forward(&x).unwrap();
        let ids = out.expert_ids.clone().unwrap();
        assert_eq!(ids.dims(), &[N, 2]);
        let rep = m.forward_replay(&x, &ids, false).unwrap();
        assert!(
            bits_equal(&out.hidden_states, &rep.hidden_states),
            "{dtype:?} {backend:?} cf={cf:?}: replay differs"
        );
        assert_eq!(ids_of(&ids), ids_of(rep.expert_ids.as_ref().unwrap()));
        assert_eq!(
            (out.expert_counts, out.dropped),
            (rep.expert_counts, rep.dropped)
        );
        assert!(bits_equal(
            &out.load_balancing_loss,
            &rep.load_balancing_loss
        ));
    }

    // A whole model: the record of one forward replayed in another.
    let mc = ModelConfig::tiny(32);
    let vm = VarMap::new();
    let lm = CausalLm::new(&mc, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(4), 0.2);
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 32).collect();
    let ids = Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap();
    let out = lm.forward_t(&ids, None, false).unwrap();
    assert_eq!(out.routing_record.len(), out.routing.len());
    let rep = lm
        .forward_replay(&ids, None, &out.routing_record, false)
        .unwrap();
    assert!(bits_equal(&out.logits, &rep.logits), "model replay differs");
}

/// Per-token reference with forced ids: the softmax of the current gate at those ids,
/// renormalised, weighting the experts' outputs.
fn forced_reference(vm: &VarMap, xs: &[Vec<f64>], ids: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let gate = mat(vm, "gate.weight");
    xs.iter()
        .zip(ids)
        .map(|(x, row)| {
            let l = matvec(&gate, x);
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
            let p: Vec<f64> = l.iter().map(|v| (v - m).exp() / z).collect();
            let norm: f64 = row.iter().map(|&e| p[e as usize]).sum();
            let mut y = vec![0.0; H];
            for &e in row {
                let out = swiglu_ref(vm, &format!("experts.{e}"), x);
                for (yy, o) in y.iter_mut().zip(out) {
                    *yy += p[e as usize] / norm * o;
                }
            }
            y
        })
        .collect()
}

#[test]
fn replay_after_the_router_changed_keeps_the_recorded_experts() {
    let c = cfg(None);
    let (m, vm) = layer(&c, DType::F64, 5);
    let mut rng = Rng::new(6);
    let xs: Vec<Vec<f64>> = (0..N).map(|_| rng.normals(H, 1.0)).collect();
    let x = Tensor::from_vec(xs.concat(), (N, H), &Device::Cpu).unwrap();
    let recorded = m.forward(&x).unwrap().expert_ids.unwrap();
    // A different router.
    let gate = var(&vm, "gate.weight");
    gate.set(&Rng::new(7).tensor(&[E, H], 0.8, DType::F64))
        .unwrap();
    let fresh = m.forward(&x).unwrap().expert_ids.unwrap();
    assert_ne!(
        ids_of(&recorded),
        ids_of(&fresh),
        "the new router should choose differently"
    );
    let rep = m.forward_replay(&x, &recorded, false).unwrap();
    assert_eq!(ids_of(rep.expert_ids.as_ref().unwrap()), ids_of(&recorded));
    let want = forced_reference(&vm, &xs, &ids_of(&recorded));
    let got = rep.hidden_states.to_vec2::<f64>().unwrap();
    let d = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-12, "replay vs reference: {d}");
}

#[test]
fn router_gradient_flows_through_the_replayed_gate_weights() {
    let c = cfg(None);
    let (m, vm) = layer(&c, DType::F64, 8);
    let x = Rng::new(9).tensor(&[N, H], 1.0, DType::F64);
    let recorded = m.forward(&x).unwrap().expert_ids.unwrap();
    let gate = var(&vm, "gate.weight");
    gate.set(&Rng::new(10).tensor(&[E, H], 0.8, DType::F64))
        .unwrap();
    let r = Rng::new(11).tensor(&[N, H], 1.0, DType::F64);
    let objective = || {
        (m.forward_replay(&x, &recorded, true).unwrap().hidden_states * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = objective().backward().unwrap();
    let g = grads
        .get(gate.as_tensor())
        .expect("gradient reaches the router")
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(g.iter().any(|v| v.abs() > 1e-6), "zero router gradient");
    let base = gate
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut p = base.clone();
            p[i] += delta;
            gate.set(&Tensor::from_vec(p, (E, H), &Device::Cpu).unwrap())
                .unwrap();
            objective().to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
    }
    assert!(
        worst < 1e-6,
        "router gradient vs finite differences: {worst}"
    );
}

#[test]
fn bad_replay_inputs_are_refused_by_name() {
    let (m, _) = layer(&cfg(None), DType::F32, 12);
    let x = Rng::new(13).tensor(&[N, H], 1.0, DType::F32);
    let ok = m.forward(&x).unwrap().expert_ids.unwrap();
    let dev = Device::Cpu;
    let err = |ids: &Tensor| m.forward_replay(&x, ids, false).unwrap_err().to_string();
    let e = err(&Tensor::zeros((N, 3), DType::U32, &dev).unwrap());
    assert!(e.contains("(tokens, top_k)") && e.contains("[9, 3]"), "{e}");
    let e = err(&ok.narrow(0, 0, N - 1).unwrap());
    assert!(e.contains("(tokens, top_k)"), "{e}");
    let mut v = ids_of(&ok);
    v[2][1] = E as u32;
    let e = err(&Tensor::from_vec(v.concat(), (N, 2), &dev).unwrap());
    assert!(e.contains("out of range") && e.contains("token 2"), "{e}");
    let e = err(&Tensor::from_vec(vec![1u32; 2 * N], (N, 2), &dev).unwrap());
    assert!(e.contains("twice"), "{e}");
    let e = err(&ok.to_dtype(DType::F32).unwrap());
    assert!(e.contains("integers"), "{e}");

    // Expert choice records nothing and refuses replay.
    let mut ec = cfg(None);
    ec.routing = RoutingKind::ExpertChoice;
    let (mec, _) = layer(&ec, DType::F32, 12);
    let e = mec.forward_replay(&x, &ok, false).unwrap_err().to_string();
    assert!(e.contains("routing"), "{e}");

    // A model record must cover exactly the sparse layers.
    let mc = ModelConfig::tiny(32);
    let vm = VarMap::new();
    let lm = CausalLm::new(&mc, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let ids = Tensor::from_vec((0..8u32).collect(), (1, 8), &dev).unwrap();
    let rec = lm.forward(&ids).unwrap().routing_record;
    let first = rec.layers()[0].clone();
    let partial = RoutingRecord::new(vec![first.clone()]).unwrap();
    let e = lm
        .forward_replay(&ids, None, &partial, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no expert ids for sparse layer 1"), "{e}");
    let mut extra = rec.layers().to_vec();
    extra.push(RecordedLayer {
        layer: 7,
        expert_ids: first.expert_ids.clone(),
    });
    let e = lm
        .forward_replay(&ids, None, &RoutingRecord::new(extra).unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 7"), "{e}");
    let dup = RoutingRecord::new(vec![first.clone(), first]).unwrap_err();
    assert!(dup.to_string().contains("twice"), "{dup}");
    // A record of another batch size.
    let longer = Tensor::from_vec((0..10u32).collect(), (1, 10), &dev).unwrap();
    let e = lm
        .forward_replay(&longer, None, &rec, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(tokens, top_k)"), "{e}");
}

/// Trains `vars` of a tiny LM for a few steps (task + load-balancing loss, so the routers
/// would move); returns the model's varmap.
fn train_lm(freeze_router: bool) -> (VarMap, Vec<(String, Tensor)>) {
    let mc = ModelConfig::tiny(32);
    let vm = VarMap::new();
    let lm = CausalLm::new(&mc, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 3).unwrap();
    let before: Vec<(String, Tensor)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let trained = if freeze_router {
        candle_moe::train::select_vars(&vm, |n| !is_router_param(n))
    } else {
        vm.clone()
    };
    let mut opt = candle_nn::AdamW::new(trained.all_vars(), Default::default()).unwrap();
    let seq: Vec<u32> = (0..26u32).map(|i| (i * 5 + 1) % 32).collect();
    let t = Tensor::from_vec(seq, (2, 13), &Device::Cpu).unwrap();
    let (x, y) = (
        t.narrow(1, 0, 12).unwrap(),
        t.narrow(1, 1, 12).unwrap().flatten_all().unwrap(),
    );
    for _ in 0..3 {
        let out = lm.forward_t(&x, None, true).unwrap();
        let logits = out.logits.flatten_to(1).unwrap();
        let ce = candle_moe::losses::cross_entropy(&logits, &y, None).unwrap();
        let loss = (ce + out.load_balancing_loss).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    (vm, before)
}

#[test]
fn frozen_routers_stay_bit_identical_while_experts_train() {
    for freeze in [true, false] {
        let (vm, before) = train_lm(freeze);
        let data = vm.data().lock().unwrap();
        let (mut routers, mut experts_moved) = (0, 0);
        for (name, old) in &before {
            let same = bits_equal(old, data[name].as_tensor());
            if is_router_param(name) {
                routers += 1;
                assert_eq!(
                    same, freeze,
                    "{name}: frozen = {freeze}, unchanged = {same}"
                );
            } else if name.contains(".experts.") && !same {
                experts_moved += 1;
            }
        }
        assert_eq!(routers, 2, "one router per sparse layer of the tiny model");
        assert!(experts_moved > 0, "no expert weight changed");
    }
}
