//! Balancing that trains (#16): DeepSeek-V3's selection-bias update, global-batch load
//! balancing, the sequence-wise balance loss, Shazeer et al.'s importance and load (CV²)
//! losses and noisy top-k gating, each against a reference written here (per-token f64 loops)
//! and, for the losses, finite-difference gradients (f64).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::config::RouterScoring;
use candle_moe::losses::balance::{global_batch_load_balancing, sequence_balance_loss};
use candle_moe::losses::RouterAux;
use candle_moe::train::LossParts;
use candle_moe::{CausalLm, LayerRouting, ModelConfig, MoeConfig, Router, SparseMoe};
use candle_moe::{TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use common::Rng;

const H: usize = 6;
const E: usize = 8;

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .clone()
}

fn set(v: &Var, vals: Vec<f64>) {
    let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap();
    v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// A routing record of a real forward, so the test does not depend on `LayerRouting`'s fields.
fn routing_template() -> LayerRouting {
    let (m, _) = tiny_lm(|_| {});
    let x = Tensor::arange(0u32, 8, &Device::Cpu)
        .unwrap()
        .reshape((1, 8))
        .unwrap();
    m.forward(&x).unwrap().routing[0].clone()
}

fn tiny_lm(f: impl FnOnce(&mut ModelConfig)) -> (CausalLm, VarMap) {
    let mut cfg = ModelConfig::tiny(32);
    (cfg.hidden_size, cfg.moe.hidden_size, cfg.num_layers) = (16, 16, 1);
    (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
    f(&mut cfg);
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    // A seeded initialisation: the runs below are deterministic.
    candle_moe::train::init::reseed_varmap(&vm, 11).unwrap();
    (m, vm)
}

#[test]
fn bias_update_is_the_v3_rule_over_all_micro_batches_and_untouched_by_adamw() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let w = vb
        .get_with_hints(3, "w", candle_nn::Init::Const(1.0))
        .unwrap();
    let name = "layers.0.mlp.gate.e_score_correction_bias";
    let b0 = [0.3f64, -0.1, 0.05, 0.0];
    let bias = vb
        .get_with_hints(4, name, candle_nn::Init::Const(0.0))
        .unwrap();
    set(&var(&vm, name), b0.to_vec());
    let gamma = 0.01;
    let cfg = TrainConfig {
        steps: 10,
        lr: 1e-2,
        warmup_steps: 0,
        weight_decay: 0.5,
        no_decay: vec![],
        bias_update_rate: gamma,
        progress: false,
        ..Default::default()
    };
    let mut tr = Trainer::new(&vm, cfg.clone()).unwrap();
    assert!(
        tr.optimizer()
            .vars()
            .all(|v| v.as_tensor().id() != bias.id()),
        "AdamW must not hold the selection bias"
    );
    // Without tracking, a positive rate is an error that names the fix.
    let template = routing_template();
    let routing = |layer: usize, counts: &[usize]| {
        let mut r = template.clone();
        r.layer = layer;
        r.expert_counts = counts.to_vec();
        r
    };
    let zero = Tensor::new(0f32, &dev).unwrap();
    let part = |counts: &[usize]| {
        LossParts::new(
            w.sqr().unwrap().sum_all().unwrap(),
            zero.clone(),
            zero.clone(),
            // Layer 1 has no bias: its counts are ignored.
            vec![routing(0, counts), routing(1, &[9, 0, 0, 0])],
        )
    };
    let micro = [
        part(&[5, 1, 2, 0]),
        part(&[1, 1, 4, 2]),
        part(&[2, 0, 2, 4]),
    ];
    let err = tr.step_accumulated(&micro).unwrap_err().to_string();
    assert!(err.contains("track_selection_biases"), "{err}");
    tr.track_selection_biases(&[(0, bias.clone())]).unwrap();
    tr.step_accumulated(&micro).unwrap();
    // The rule by hand: loads summed over the three micro-batches, then mean-centred.
    let load = [8.0, 2.0, 8.0, 6.0];
    let mean = load.iter().sum::<f64>() / 4.0;
    let moved: Vec<f64> = (0..4)
        .map(|e| b0[e] + gamma * sign(mean - load[e]))
        .collect();
    let c = moved.iter().sum::<f64>() / 4.0;
    let want: Vec<f64> = moved.iter().map(|b| b - c).collect();
    let got = host(&bias);
    for e in 0..4 {
        assert!((got[e] - want[e]).abs() < 1e-6, "e{e}: {got:?} vs {want:?}");
    }
    assert!(got.iter().sum::<f64>().abs() < 1e-6);
    // From `bias_update_until` on, γ is 0.
    let mut tr2 = Trainer::new(
        &vm,
        TrainConfig {
            bias_update_until: Some(0),
            ..cfg.clone()
        },
    )
    .unwrap();
    tr2.track_selection_biases(&[(0, bias.clone())]).unwrap();
    let before = host(&bias);
    tr2.step_accumulated(&micro).unwrap();
    assert_eq!(host(&bias), before);
    // γ = 0 with weight decay > 0: bit-identical after steps, while `w` decays and moves.
    let mut tr0 = Trainer::new(
        &vm,
        TrainConfig {
            bias_update_rate: 0.0,
            ..cfg
        },
    )
    .unwrap();
    let (bits, w_before) = (bias.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
    for _ in 0..3 {
        tr0.step(&part(&[8, 0, 0, 0])).unwrap();
    }
    assert_eq!(bias.to_vec1::<f32>().unwrap(), bits);
    assert_ne!(w.to_vec1::<f32>().unwrap(), w_before);
}

/// Trains a 1-layer LM whose router bias sends (nearly) every token to experts 0 and 1;
/// returns the late imbalance (max / mean load) and the selection bias.
fn train_imbalanced(gamma: f64, scoring: RouterScoring) -> (f64, Vec<f64>) {
    let (m, vm) = tiny_lm(|c| {
        c.moe.scoring = scoring;
        c.moe.selection_bias = true;
        c.moe.router_bias = true;
        c.moe.norm_topk_prob = true;
    });
    let gb = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .find(|(n, _)| n.ends_with("gate.bias"))
        .map(|(_, v)| v.clone())
        .unwrap();
    // Sigmoid scores saturate: a larger logit gap keeps experts 0 and 1 on top.
    let gap = match scoring {
        RouterScoring::Sigmoid => vec![3.0, 2.0, 0.0, 0.0],
        RouterScoring::Softmax => vec![1.5, 1.0, 0.0, 0.0],
    };
    set(&gb, gap);
    let cfg = TrainConfig {
        steps: 40,
        lr: 1e-3,
        warmup_steps: 0,
        bias_update_rate: gamma,
        progress: false,
        ..Default::default()
    };
    let mut tr = Trainer::for_model(&vm, cfg, &m.config().moe).unwrap();
    tr.track_selection_biases(&m.selection_biases()).unwrap();
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 7 + 3) % 32).collect();
    let ids = Tensor::from_vec(ids, (4, 16), &Device::Cpu).unwrap();
    let (x, y) = (
        ids.narrow(1, 0, 15).unwrap(),
        ids.narrow(1, 1, 15).unwrap().flatten_all().unwrap(),
    );
    let lm = |train| candle_moe::tasks::language_model::loss_parts(&m, &x, &y, train).unwrap();
    for _ in 0..40 {
        tr.step(&lm(true)).unwrap();
    }
    let bias = host(&m.selection_biases()[0].1);
    // Mean over the last 10 steps (the sign rule oscillates around balance by about γ).
    let h = &tr.state.history;
    let late = h[h.len() - 10..].iter().map(|s| s.imbalance).sum::<f64>() / 10.0;
    (late, bias)
}

#[test]
fn bias_update_balances_a_crafted_imbalanced_causal_lm() {
    for scoring in [RouterScoring::Sigmoid, RouterScoring::Softmax] {
        let (fixed, b0) = train_imbalanced(0.0, scoring);
        let gamma = match scoring {
            RouterScoring::Sigmoid => 0.02,
            RouterScoring::Softmax => 0.01,
        };
        let (balanced, b1) = train_imbalanced(gamma, scoring);
        eprintln!("{scoring:?}: {fixed} -> {balanced}, bias {b1:?}");
        assert!(b0.iter().all(|&b| b == 0.0), "γ = 0 keeps the bias at 0");
        assert!(
            b1[0] < 0.0 && b1[2] > 0.0,
            "{scoring:?}: bias moved against the load: {b1:?}"
        );
        assert!(
            balanced < fixed - 0.3,
            "{scoring:?}: imbalance with the bias update {balanced} vs without {fixed}"
        );
    }
}

fn moe_cfg(f: impl FnOnce(&mut MoeConfig)) -> MoeConfig {
    let mut c = MoeConfig {
        hidden_size: H,
        intermediate_size: 4,
        num_experts: E,
        top_k: 2,
        ..Default::default()
    };
    f(&mut c);
    c
}

fn logits_of(w: &[f64], x: &[f64]) -> Vec<f64> {
    (0..E)
        .map(|e| (0..H).map(|j| w[e * H + j] * x[j]).sum())
        .collect()
}

fn top_k_of(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
    idx.truncate(k);
    idx
}

/// V3 eq. 17-20 per token: affinities (softmax, or sigmoid normalised), chosen top-k of the
/// (biased) scores, `Σ_i f_i P_i` per sequence, averaged over sequences with a real token.
fn seq_loss_reference(
    c: &MoeConfig,
    w: &[f64],
    bias: &[f64],
    x: &[Vec<f64>],
    batch: usize,
    mask: &[f64],
) -> f64 {
    let t = x.len() / batch;
    let (mut total, mut seqs) = (0.0, 0.0);
    for s in 0..batch {
        let (mut f, mut p, mut real) = (vec![0.0; E], vec![0.0; E], 0.0);
        for r in s * t..(s + 1) * t {
            if mask[r] == 0.0 {
                continue;
            }
            real += 1.0;
            let l = logits_of(w, &x[r]);
            let scores: Vec<f64> = match c.scoring {
                RouterScoring::Softmax => {
                    let z: f64 = l.iter().map(|v| v.exp()).sum();
                    l.iter().map(|v| v.exp() / z).collect()
                }
                RouterScoring::Sigmoid => l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
            };
            let sum: f64 = scores.iter().sum();
            let choice: Vec<f64> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
            for i in top_k_of(&choice, c.top_k) {
                f[i] += 1.0;
            }
            for i in 0..E {
                p[i] += scores[i] / sum;
            }
        }
        if real == 0.0 {
            continue;
        }
        seqs += 1.0;
        total += (0..E)
            .map(|i| f[i] * E as f64 / (c.top_k as f64 * real) * p[i] / real)
            .sum::<f64>();
    }
    total / seqs
}

/// A sparse layer over f64 variables with random gate (and bias, noise projection).
fn layer(c: &MoeConfig, seed: u64) -> (SparseMoe, VarMap) {
    let vm = VarMap::new();
    let m = SparseMoe::new(c, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    common::randomize(&vm, &mut Rng::new(seed), 0.6);
    (m, vm)
}

/// Central differences of `loss` w.r.t. every entry of `v` against `grad`.
fn check_fd(v: &Var, grad: &Tensor, loss: &dyn Fn() -> f64, what: &str) {
    let g = host(grad);
    let w0 = host(v.as_tensor());
    let eps = 1e-6;
    for i in 0..w0.len() {
        let at = |d: f64| {
            let mut w = w0.clone();
            w[i] += d;
            set(v, w);
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "{what}[{i}]: finite difference {fd} vs backward {}",
            g[i]
        );
    }
    set(v, w0);
}

#[test]
fn sequence_wise_loss_matches_the_reference_and_its_gradient() {
    for (seed, c) in [
        (1, moe_cfg(|c| c.seq_aux_loss_coef = 1e-3)),
        (
            2,
            moe_cfg(|c| {
                c.seq_aux_loss_coef = 1e-3;
                c.scoring = RouterScoring::Sigmoid;
                c.selection_bias = true;
                c.norm_topk_prob = true;
            }),
        ),
    ] {
        let (m, vm) = layer(&c, seed);
        let (b, t) = (3, 5);
        let xs = Rng::new(seed + 10).tensor(&[b, t, H], 1.0, DType::F64);
        let rows: Vec<Vec<f64>> = host(&xs).chunks(H).map(|r| r.to_vec()).collect();
        let w = host(var(&vm, "gate.weight").as_tensor());
        let bias = match c.selection_bias {
            true => host(var(&vm, "gate.e_score_correction_bias").as_tensor()),
            false => vec![0.0; E],
        };
        let out = m.forward_t(&xs, true).unwrap();
        let got = scalar(out.balance.seq_aux.as_ref().unwrap());
        let want = seq_loss_reference(&c, &w, &bias, &rows, b, &[1.0; 15]);
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        // A padding mask: the loss function with the layer's own affinities and choices.
        let mask = [1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 0., 0., 0.];
        let mf: Vec<f32> = mask.iter().map(|&v| v as f32).collect();
        let aux = &out.aux;
        let masked = sequence_balance_loss(
            aux.affinity.as_ref().unwrap(),
            &aux.top_k_ids,
            aux.top_k,
            Some(&mf),
            b,
            E,
        )
        .unwrap();
        let want = seq_loss_reference(&c, &w, &bias, &rows, b, &mask);
        assert!((scalar(&masked) - want).abs() < 1e-10);
        // Gradient w.r.t. the gate weight (the choices stay fixed under small steps).
        let gate = var(&vm, "gate.weight");
        let loss = || {
            scalar(
                m.forward_t(&xs, true)
                    .unwrap()
                    .balance
                    .seq_aux
                    .as_ref()
                    .unwrap(),
            )
        };
        let l = m.forward_t(&xs, true).unwrap().balance.seq_aux.unwrap();
        let grads = l.backward().unwrap();
        check_fd(&gate, grads.get(gate.as_tensor()).unwrap(), &loss, "gate");
    }
}

/// `Φ(z)` from an `erf` accurate to ~1e-13 (series below 3, continued fraction above).
fn phi(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let erf = if x.abs() < 3.0 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x²)/(x√π) · 1/(1 + 1/(2x²)/(1 + 2/(2x²)/(1 + …))) (Lentz-free, 60 terms)
        let a = x.abs();
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = (n as f64 / 2.0) / (a * a) / (1.0 + f);
        }
        let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) / (1.0 + f);
        (1.0 - erfc) * x.signum()
    };
    0.5 * (1.0 + erf)
}

fn cv2(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    var / (mean * mean + 1e-10)
}

/// Shazeer et al. eq. 6-10 per token, from the clean logits, the noise scales and the noisy
/// logits `H` the router drew: `(L_importance, L_load)`.
fn cv_reference(c: &MoeConfig, w: &[f64], wn: &[f64], x: &[Vec<f64>], h: &[f64]) -> (f64, f64) {
    let (mut imp, mut load) = (vec![0.0; E], vec![0.0; E]);
    for (r, xr) in x.iter().enumerate() {
        let clean = logits_of(w, xr);
        let std: Vec<f64> = logits_of(wn, xr)
            .iter()
            .map(|v| (1.0 + v.exp()).ln())
            .collect();
        let hr = &h[r * E..(r + 1) * E];
        let kept = top_k_of(hr, c.top_k);
        let z: f64 = kept.iter().map(|&i| hr[i].exp()).sum();
        for &i in &kept {
            imp[i] += hr[i].exp() / z;
        }
        for i in 0..E {
            let mut others: Vec<f64> = (0..E).filter(|&j| j != i).map(|j| hr[j]).collect();
            others.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let kth = others[c.top_k - 1];
            load[i] += phi((clean[i] - kth) / std[i]);
        }
    }
    (cv2(&imp), cv2(&load))
}

fn noisy_router(c: &MoeConfig, seed: u64) -> (Router, VarMap) {
    let vm = VarMap::new();
    let r = Router::new(c, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    common::randomize(&vm, &mut Rng::new(seed), 0.6);
    (r, vm)
}

#[test]
fn cv_losses_match_the_reference_and_their_gradients() {
    let c = moe_cfg(|c| {
        c.noisy_gating = true;
        c.cv_loss_coef = 1e-2;
        c.top_k = 3;
    });
    let (r, vm) = noisy_router(&c, 5);
    let n = 20;
    let xs = Rng::new(6).tensor(&[n, H], 1.0, DType::F64);
    let rows: Vec<Vec<f64>> = host(&xs).chunks(H).map(|r| r.to_vec()).collect();
    let (gate, noise) = (var(&vm, "gate.weight"), var(&vm, "gate_noise.weight"));
    r.set_seed(17);
    let out = r.forward_t(&xs, true).unwrap();
    let h = host(out.noisy_logits.as_ref().unwrap());
    let (imp, load) = out.cv.clone().unwrap();
    let (wi, wl) = cv_reference(
        &c,
        &host(gate.as_tensor()),
        &host(noise.as_tensor()),
        &rows,
        &h,
    );
    assert!(
        (scalar(&imp) - wi).abs() < 1e-10,
        "importance {} vs {wi}",
        scalar(&imp)
    );
    assert!(
        (scalar(&load) - wl).abs() < 1e-9,
        "load {} vs {wl}",
        scalar(&load)
    );
    assert!(wl > 0.0 && wi > 0.0);
    // Same noise on every evaluation: reseed before each forward.
    for pick in [0usize, 1] {
        let loss = || {
            r.set_seed(17);
            let (i, l) = r.forward_t(&xs, true).unwrap().cv.unwrap();
            scalar(&[i, l][pick])
        };
        r.set_seed(17);
        let (i, l) = r.forward_t(&xs, true).unwrap().cv.unwrap();
        let grads = [i, l][pick].backward().unwrap();
        for v in [&gate, &noise] {
            let g = grads.get(v.as_tensor()).unwrap();
            check_fd(v, g, &loss, if pick == 0 { "importance" } else { "load" });
        }
    }
}

#[test]
fn noisy_top_k_is_a_softmax_over_the_kept_noisy_logits() {
    for norm in [false, true] {
        let c = moe_cfg(|c| {
            c.noisy_gating = true;
            c.norm_topk_prob = norm;
        });
        let (r, _vm) = noisy_router(&c, 8);
        let n = 12;
        let xs = Rng::new(9).tensor(&[n, H], 1.0, DType::F64);
        for train in [true, false] {
            let out = r.forward_t(&xs, train).unwrap();
            // In inference H is the clean logits.
            let h = match (&out.noisy_logits, train) {
                (Some(h), true) => host(h),
                (None, false) => host(&out.logits),
                _ => panic!("noisy logits exactly in training"),
            };
            let (w, ids) = (host(&out.weights), host(&out.experts));
            for t in 0..n {
                let hr = &h[t * E..(t + 1) * E];
                let kept = top_k_of(hr, c.top_k);
                let z: f64 = kept.iter().map(|&i| hr[i].exp()).sum();
                for (s, &i) in kept.iter().enumerate() {
                    assert_eq!(ids[t * c.top_k + s] as usize, i);
                    let want = hr[i].exp() / z;
                    assert!(
                        (w[t * c.top_k + s] - want).abs() < 1e-12,
                        "norm {norm} train {train}"
                    );
                }
            }
        }
    }
}

/// Hand-made router outputs: `rows` tokens whose logits favour expert `fav`.
fn aux(rows: usize, fav: usize, vm: &VarMap, name: &str) -> RouterAux {
    let mut rng = Rng::new(rows as u64 + fav as u64);
    let mut l = rng.normals(rows * 4, 0.3);
    for r in 0..rows {
        l[r * 4 + fav] += 2.0;
        l[r * 4 + (r % 4)] += 0.5;
    }
    let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
    let logits = vb
        .get_with_hints((rows, 4), name, candle_nn::Init::Const(0.0))
        .unwrap();
    set(&var(vm, name), l.clone());
    let probs = candle_moe::ops::softmax_last_dim(&logits).unwrap();
    let ids: Vec<u32> = l
        .chunks(4)
        .flat_map(|r| top_k_of(r, 2).into_iter().map(|i| i as u32))
        .collect();
    RouterAux::new(&logits, probs, ids, 2).unwrap()
}

#[test]
fn global_batch_balance_counts_frequencies_over_the_whole_step() {
    let vm = VarMap::new();
    let (a, b) = (aux(6, 0, &vm, "a"), aux(6, 1, &vm, "b"));
    // Reference: F from both micro-batches, P per micro-batch, mean of E · Σ F P.
    let mut f = [0.0; 4];
    for x in [&a, &b] {
        for &i in &x.top_k_ids {
            f[i as usize] += 1.0 / 12.0;
        }
    }
    let p_mean = |x: &RouterAux| {
        let p = host(&x.probs);
        (0..4)
            .map(|e| (0..6).map(|r| p[r * 4 + e]).sum::<f64>() / 6.0)
            .collect::<Vec<f64>>()
    };
    let global_ref: Vec<f64> = [&a, &b]
        .iter()
        .map(|x| 4.0 * (0..4).map(|e| f[e] * p_mean(x)[e]).sum::<f64>())
        .collect();
    let got = global_batch_load_balancing(&[std::slice::from_ref(&a), std::slice::from_ref(&b)], 4)
        .unwrap();
    for (g, w) in got.iter().zip(&global_ref) {
        assert!((scalar(g) - w).abs() < 1e-12);
    }
    // Through the trainer: the recorded load-balancing loss is the global one, and differs
    // from per-micro-batch balancing, whose micro-batches are each imbalanced.
    let per_micro = |x: &RouterAux| {
        candle_moe::losses::pooled_aux_losses(&[x], None, 4, &Device::Cpu)
            .unwrap()
            .0
    };
    let part = |x: &RouterAux| {
        let z = Tensor::new(0f64, &Device::Cpu).unwrap();
        let mut p = LossParts::new(z.clone(), per_micro(x), z, vec![]);
        p.balance.router_aux = vec![x.clone()];
        p
    };
    let stats = |global: bool| {
        let cfg = TrainConfig {
            lr: 1e-3,
            aux_loss_coef: Some(1.0),
            global_batch_balance: global,
            progress: false,
            ..Default::default()
        };
        let mut tr = Trainer::new(&vm, cfg).unwrap();
        tr.step_accumulated(&[part(&a), part(&b)]).unwrap()
    };
    let g = stats(true).load_balancing;
    let want = (global_ref[0] + global_ref[1]) / 2.0;
    assert!((g - want).abs() < 1e-9, "{g} vs {want}");
    let p = stats(false).load_balancing;
    let per_ref = (scalar(&per_micro(&a)) + scalar(&per_micro(&b))) / 2.0;
    assert!((p - per_ref).abs() < 1e-9);
    assert!(p > g + 0.1, "per-micro {p} vs global {g}");
    // One micro-batch: global is the usual pooled loss.
    let one = global_batch_load_balancing(&[std::slice::from_ref(&a)], 4).unwrap();
    // (the pooled loss forms F in f32)
    assert!((scalar(&one[0]) - scalar(&per_micro(&a))).abs() < 1e-6);
}

#[test]
fn a_fine_tuned_deepseek_v3_saves_its_updated_bias() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_v5/deepseek_v3");
    let opts = candle_moe::LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let mut m = CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap();
    let vm = m.varmap().unwrap().clone();
    let cfg = TrainConfig {
        steps: 3,
        lr: 1e-3,
        warmup_steps: 0,
        bias_update_rate: 0.05,
        progress: false,
        ..Default::default()
    };
    let mut tr = Trainer::for_model(&vm, cfg, &m.config().moe).unwrap();
    let biases = m.selection_biases();
    assert!(!biases.is_empty());
    let before: Vec<Vec<f64>> = biases.iter().map(|(_, b)| host(b)).collect();
    tr.track_selection_biases(&biases).unwrap();
    let (x, y) = common::fixed_lm_batch();
    for _ in 0..3 {
        tr.step(&candle_moe::tasks::language_model::loss_parts(&m, &x, &y, true).unwrap())
            .unwrap();
    }
    let after: Vec<Vec<f64>> = m.selection_biases().iter().map(|(_, b)| host(b)).collect();
    assert_ne!(before, after, "the update moved the biases");
    m.freeze().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_pretrained(tmp.path().join("out")).unwrap();
    let mut saved = std::collections::HashMap::new();
    for f in std::fs::read_dir(tmp.path().join("out")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            saved.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    for ((layer, _), want) in biases.iter().zip(&after) {
        let key = format!("model.layers.{layer}.mlp.gate.e_score_correction_bias");
        let got = host(saved.get(&key).unwrap_or_else(|| panic!("no {key}")));
        assert_eq!(&got, want, "{key}");
    }
}

#[test]
fn the_trainer_adds_every_balance_loss_with_the_model_coefficients() {
    let (m, vm) = tiny_lm(|c| {
        c.moe.noisy_gating = true;
        c.moe.seq_aux_loss_coef = 0.3;
        c.moe.cv_loss_coef = 0.2;
        c.moe.router_aux_loss_coef = 0.1;
        c.moe.router_z_loss_coef = 0.01;
    });
    let cfg = TrainConfig {
        lr: 1e-3,
        progress: false,
        ..Default::default()
    };
    let mut tr = Trainer::for_model(&vm, cfg, &m.config().moe).unwrap();
    assert_eq!(tr.balance_coefs(), (0.3, 0.2));
    let ids = Tensor::arange(0u32, 32, &Device::Cpu)
        .unwrap()
        .reshape((2, 16))
        .unwrap();
    let (x, y) = (
        ids.narrow(1, 0, 15).unwrap(),
        ids.narrow(1, 1, 15).unwrap().flatten_all().unwrap(),
    );
    let parts = candle_moe::tasks::language_model::loss_parts(&m, &x, &y, true).unwrap();
    let b = &parts.balance;
    let (seq, imp, load) = (
        scalar(b.seq_aux.as_ref().unwrap()),
        scalar(b.importance.as_ref().unwrap()),
        scalar(b.load.as_ref().unwrap()),
    );
    let s = tr.step(&parts).unwrap();
    assert_eq!((s.seq_aux, s.importance, s.load), (seq, imp, load));
    let want = s.task + 0.1 * s.load_balancing + 0.01 * s.z_loss + 0.3 * seq + 0.2 * (imp + load);
    assert!((s.loss - want).abs() < 1e-5, "{} vs {want}", s.loss);
    assert!(seq > 0.0 && imp > 0.0 && load > 0.0);
}

#[test]
fn seq2seq_and_classifier_return_the_sequence_wise_loss_with_padding() {
    let mut cfg = ModelConfig::tiny(32);
    (cfg.hidden_size, cfg.moe.hidden_size) = (16, 16);
    (cfg.num_layers, cfg.num_decoder_layers) = (1, 1);
    (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
    cfg.moe.seq_aux_loss_coef = 1e-3;
    cfg.moe.selection_bias = true;
    cfg.moe.scoring = RouterScoring::Sigmoid;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let s2s =
        candle_moe::Seq2Seq::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let ids = Tensor::arange(0u32, 12, &dev)
        .unwrap()
        .reshape((2, 6))
        .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let out = s2s
        .forward_t(&ids, Some(&mask), &ids, Some(&mask), true)
        .unwrap();
    let seq = scalar(out.balance.seq_aux.as_ref().unwrap());
    assert!(seq.is_finite() && seq > 0.0);
    assert_eq!(out.balance.router_aux.len(), 2);
    assert_eq!(
        s2s.selection_biases()
            .iter()
            .map(|b| b.0)
            .collect::<Vec<_>>(),
        out.routing.iter().map(|r| r.layer).collect::<Vec<_>>()
    );
    // The padding rows carry their mask, so they change nothing.
    let a = &out.balance.router_aux[0];
    let m = a.row_mask.as_ref().unwrap();
    assert_eq!(m, &[1.0f32, 1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 1.]);
    let mut c2 = cfg.clone();
    c2.num_labels = 2;
    let vm = VarMap::new();
    let cls =
        candle_moe::SequenceClassifier::new(&c2, VarBuilder::from_varmap(&vm, DType::F32, &dev))
            .unwrap();
    let out = cls.forward_t(&ids, None, Some(&mask), true).unwrap();
    let a = &out.balance.router_aux[0];
    let want = sequence_balance_loss(
        a.affinity.as_ref().unwrap(),
        &a.top_k_ids,
        a.top_k,
        a.row_mask.as_deref(),
        2,
        cfg.moe.num_experts,
    )
    .unwrap();
    assert_eq!(scalar(out.balance.seq_aux.as_ref().unwrap()), scalar(&want));
}

#[test]
fn step_stats_written_before_the_balance_losses_still_load() {
    let old = r#"{"step":3,"loss":1.5,"task":1.25,"load_balancing":2.0,"z_loss":0.5,"lr":0.001,
        "grad_norm":"NaN","imbalance":1.5,"skipped":false}"#;
    let s: candle_moe::train::StepStats = serde_json::from_str(old).unwrap();
    assert_eq!((s.step, s.task, s.load_balancing), (3, 1.25, 2.0));
    assert_eq!((s.seq_aux, s.importance, s.load), (0.0, 0.0, 0.0));
    let back: candle_moe::train::StepStats =
        serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!((back.seq_aux, back.task), (0.0, 1.25));
}
