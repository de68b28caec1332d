//! Router variants (DeepSeek-V2/V3 routing as options of the one router): sigmoid scoring, a
//! selection bias used for choosing only, group-limited selection (group score = max or sum of
//! the top two), renormalisation and `routed_scaling_factor`. Each is checked against a
//! per-token f64 reference written here (experts picked by hand), and its gate-weight gradient
//! against finite differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::config::{GroupScore, RouterScoring};
use candle_moe::{MoeConfig, Router};
use candle_nn::{VarBuilder, VarMap};
use common::Rng;

const H: usize = 6;
const E: usize = 8;

fn cfg(f: impl FnOnce(&mut MoeConfig)) -> MoeConfig {
    let mut c = MoeConfig {
        hidden_size: H,
        intermediate_size: 4,
        num_experts: E,
        top_k: 2,
        norm_topk_prob: false,
        ..Default::default()
    };
    f(&mut c);
    c
}

/// A router over f64 variables: gate `(E, H)` and (when configured) the selection bias.
fn router(c: &MoeConfig, seed: u64) -> (Router, VarMap, Vec<f64>, Vec<f64>) {
    let vm = VarMap::new();
    let r = Router::new(c, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    let mut rng = Rng::new(seed);
    let w = rng.normals(E * H, 0.7);
    let b = rng.normals(E, 0.3);
    let data = vm.data().lock().unwrap();
    data["gate.weight"]
        .set(&Tensor::from_vec(w.clone(), (E, H), &Device::Cpu).unwrap())
        .unwrap();
    if let Some(v) = data.get("gate.e_score_correction_bias") {
        v.set(&Tensor::from_vec(b.clone(), E, &Device::Cpu).unwrap())
            .unwrap();
    }
    drop(data);
    let b = if c.selection_bias { b } else { vec![0.0; E] };
    (r, vm, w, b)
}

/// Hand-written routing of one token: `(expert, weight)` sorted by expert id.
fn reference(c: &MoeConfig, w: &[f64], bias: &[f64], x: &[f64]) -> Vec<(usize, f64)> {
    let logits: Vec<f64> = (0..E)
        .map(|e| (0..H).map(|j| w[e * H + j] * x[j]).sum())
        .collect();
    let scores: Vec<f64> = match c.scoring {
        RouterScoring::Softmax => {
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            logits.iter().map(|l| (l - m).exp() / z).collect()
        }
        RouterScoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
    };
    let choice: Vec<f64> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let mut allowed = [true; E];
    if c.n_group > 1 {
        let per = E / c.n_group;
        let mut groups: Vec<(usize, f64)> = (0..c.n_group)
            .map(|g| {
                let mut s: Vec<f64> = choice[g * per..(g + 1) * per].to_vec();
                s.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let score = match c.group_score {
                    GroupScore::Max => s[0],
                    GroupScore::Top2Sum => s[0] + s[1],
                };
                (g, score)
            })
            .collect();
        groups.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        let kept: Vec<usize> = groups[..c.topk_group].iter().map(|g| g.0).collect();
        for (e, a) in allowed.iter_mut().enumerate() {
            *a = kept.contains(&(e / per));
        }
    }
    let mut order: Vec<usize> = (0..E).filter(|&e| allowed[e]).collect();
    order.sort_by(|&a, &b| choice[b].partial_cmp(&choice[a]).unwrap());
    let mut picked: Vec<(usize, f64)> = order[..c.top_k].iter().map(|&e| (e, scores[e])).collect();
    if c.norm_topk_prob {
        let s: f64 = picked.iter().map(|p| p.1).sum::<f64>() + 1e-20;
        picked.iter_mut().for_each(|p| p.1 /= s);
    }
    picked
        .iter_mut()
        .for_each(|p| p.1 *= c.routed_scaling_factor);
    picked.sort_by_key(|p| p.0);
    picked
}

/// Flat top-k (no groups, no bias) of one token's scores: to show the variant matters.
fn flat_top_k(c: &MoeConfig, w: &[f64], x: &[f64]) -> Vec<usize> {
    let flat = MoeConfig {
        n_group: 0,
        selection_bias: false,
        ..c.clone()
    };
    reference(&flat, w, &[0.0; E], x)
        .iter()
        .map(|p| p.0)
        .collect()
}

/// Routes `n` random tokens and compares every token with the reference; returns how many
/// tokens chose other experts than flat top-k would.
fn check_against_reference(c: &MoeConfig, seed: u64) -> usize {
    let (r, _vm, w, b) = router(c, seed);
    let n = 200;
    let mut rng = Rng::new(seed + 1);
    let xs = rng.normals(n * H, 1.0);
    let out = r
        .forward_t(
            &Tensor::from_vec(xs.clone(), (n, H), &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
    let ids = out.experts.to_vec2::<u32>().unwrap();
    let ws = out.weights.to_vec2::<f64>().unwrap();
    let mut differs = 0;
    for i in 0..n {
        let x = &xs[i * H..(i + 1) * H];
        let want = reference(c, &w, &b, x);
        let mut got: Vec<(usize, f64)> = ids[i]
            .iter()
            .map(|&e| e as usize)
            .zip(ws[i].iter().copied())
            .collect();
        got.sort_by_key(|p| p.0);
        let got_ids: Vec<usize> = got.iter().map(|p| p.0).collect();
        let want_ids: Vec<usize> = want.iter().map(|p| p.0).collect();
        assert_eq!(got_ids, want_ids, "token {i}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g.1 - w.1).abs() < 1e-12, "token {i}: {} vs {}", g.1, w.1);
        }
        if flat_top_k(c, &w, x) != want_ids {
            differs += 1;
        }
    }
    differs
}

#[test]
fn softmax_with_routed_scaling_matches_the_reference() {
    // DeepSeek-V2 `greedy` as transformers computes it: softmax top-k times the factor.
    let c = cfg(|c| c.routed_scaling_factor = 1.5);
    check_against_reference(&c, 1);
    let c = cfg(|c| {
        c.routed_scaling_factor = 0.5;
        c.norm_topk_prob = true;
    });
    check_against_reference(&c, 2);
}

#[test]
fn group_limited_greedy_matches_the_reference() {
    // DeepSeek-V2: groups scored by their best expert; top-3 so that the group limit matters.
    let c = cfg(|c| {
        c.top_k = 3;
        c.n_group = 4;
        c.topk_group = 2;
        c.group_score = GroupScore::Max;
    });
    let differs = check_against_reference(&c, 3);
    assert!(differs > 10, "only {differs} tokens differ from flat top-k");
}

#[test]
fn noaux_tc_matches_the_reference() {
    // DeepSeek-V3: sigmoid, selection bias, group score = sum of the top two, renormalised,
    // scaled.
    let c = cfg(|c| {
        c.scoring = RouterScoring::Sigmoid;
        c.selection_bias = true;
        c.n_group = 4;
        c.topk_group = 2;
        c.group_score = GroupScore::Top2Sum;
        c.norm_topk_prob = true;
        c.routed_scaling_factor = 2.5;
    });
    let differs = check_against_reference(&c, 4);
    assert!(differs > 10, "only {differs} tokens differ from flat top-k");
}

#[test]
fn sigmoid_with_selection_bias_only_matches_the_reference() {
    let c = cfg(|c| {
        c.scoring = RouterScoring::Sigmoid;
        c.selection_bias = true;
    });
    let differs = check_against_reference(&c, 5);
    assert!(differs > 10, "the bias changed only {differs} choices");
    let c = cfg(|c| c.scoring = RouterScoring::Sigmoid);
    assert_eq!(check_against_reference(&c, 6), 0);
}

/// `Σ c ⊙ weights` for fixed coefficients; the analytic gradient wrt the gate weight against
/// central differences (the selection does not change under the small steps).
fn check_gradient(c: &MoeConfig, seed: u64) {
    let (r, vm, _, _) = router(c, seed);
    let n = 16;
    let mut rng = Rng::new(seed + 7);
    let x = Tensor::from_vec(rng.normals(n * H, 1.0), (n, H), &Device::Cpu).unwrap();
    let coef = Tensor::from_vec(rng.normals(n * c.top_k, 1.0), (n, c.top_k), &Device::Cpu).unwrap();
    let loss = |r: &Router| {
        let out = r.forward_t(&x, false).unwrap();
        (out.weights * &coef).unwrap().sum_all().unwrap()
    };
    let gate: Var = vm.data().lock().unwrap()["gate.weight"].clone();
    let l = loss(&r);
    let grads = l.backward().unwrap();
    let g = grads
        .get(gate.as_tensor())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    if let Some(b) = r.selection_bias() {
        assert!(
            grads.get(b).is_none(),
            "the selection bias must get no gradient"
        );
    }
    let w0 = gate.as_tensor().to_vec2::<f64>().unwrap();
    let eps = 1e-6;
    for (e, row) in w0.iter().enumerate() {
        for j in 0..row.len() {
            let at = |d: f64| {
                let mut w = w0.clone();
                w[e][j] += d;
                gate.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
                loss(&r).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[e][j]).abs() < 1e-6 * (1.0 + fd.abs()),
                "d/dW[{e},{j}]: finite difference {fd} vs backward {}",
                g[e][j]
            );
        }
    }
    gate.set(&Tensor::new(w0, &Device::Cpu).unwrap()).unwrap();
}

#[test]
fn router_variants_have_finite_difference_gradients() {
    check_gradient(&cfg(|c| c.routed_scaling_factor = 1.5), 11);
    // Each DeepSeek option on its own.
    check_gradient(&cfg(|c| c.scoring = RouterScoring::Sigmoid), 14);
    check_gradient(&cfg(|c| c.selection_bias = true), 15);
    check_gradient(
        &cfg(|c| {
            c.n_group = 4;
            c.topk_group = 2;
            c.group_score = GroupScore::Top2Sum;
        }),
        16,
    );
    check_gradient(
        &cfg(|c| {
            c.top_k = 3;
            c.n_group = 4;
            c.topk_group = 2;
        }),
        12,
    );
    check_gradient(
        &cfg(|c| {
            c.scoring = RouterScoring::Sigmoid;
            c.selection_bias = true;
            c.n_group = 4;
            c.topk_group = 2;
            c.group_score = GroupScore::Top2Sum;
            c.norm_topk_prob = true;
            c.routed_scaling_factor = 2.5;
        }),
        13,
    );
}

#[test]
fn bad_group_configs_name_the_field() {
    let cases: Vec<(MoeConfig, &str)> = vec![
        (
            cfg(|c| {
                c.n_group = 3;
                c.topk_group = 1;
            }),
            "n_group",
        ),
        (
            cfg(|c| {
                c.n_group = 4;
                c.topk_group = 5;
            }),
            "topk_group",
        ),
        (
            cfg(|c| {
                c.n_group = 4;
                c.topk_group = 0;
            }),
            "topk_group",
        ),
        (
            cfg(|c| {
                c.top_k = 3;
                c.n_group = 4;
                c.topk_group = 1;
            }),
            "top_k",
        ),
        (
            cfg(|c| {
                c.n_group = 8;
                c.topk_group = 2;
                c.group_score = GroupScore::Top2Sum;
            }),
            "top2_sum",
        ),
        (
            cfg(|c| c.routed_scaling_factor = 0.0),
            "routed_scaling_factor",
        ),
        (
            cfg(|c| {
                c.noisy_gating = true;
                c.scoring = RouterScoring::Sigmoid;
            }),
            "noisy_gating",
        ),
    ];
    for (c, needle) in cases {
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
        let vm = VarMap::new();
        assert!(Router::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).is_err());
    }
}

#[test]
fn old_configs_without_the_new_fields_keep_their_routing() {
    let c: MoeConfig =
        serde_json::from_str(r#"{"hidden_size": 6, "num_experts": 8, "top_k": 2}"#).unwrap();
    assert_eq!(c.scoring, RouterScoring::Softmax);
    assert!(!c.selection_bias);
    assert_eq!((c.n_group, c.routed_scaling_factor), (0, 1.0));
    let c = cfg(|c| c.norm_topk_prob = true);
    check_against_reference(&c, 21);
}
