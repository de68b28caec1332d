//! The plain per-token reference of the sparse layer (f64 loops over tokens and experts).

use candle_moe::MoeConfig;
use candle_nn::VarMap;

use super::{mat, matvec};

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu_ref(vm: &VarMap, prefix: &str, x: &[f64]) -> Vec<f64> {
    let a = matvec(&mat(vm, &format!("{prefix}.w1.weight")), x);
    let b = matvec(&mat(vm, &format!("{prefix}.w3.weight")), x);
    let h: Vec<f64> = a.iter().zip(&b).map(|(a, b)| silu(*a) * b).collect();
    matvec(&mat(vm, &format!("{prefix}.w2.weight")), &h)
}

pub struct RefOut {
    /// Outputs, one row per token.
    pub y: Vec<Vec<f64>>,
    /// Assignments each expert kept.
    pub counts: Vec<usize>,
    /// Assignments dropped by the capacity.
    pub dropped: usize,
}

/// The plain per-token reference: softmax router, top-k, optional renormalisation, capacity in
/// token order, weighted sum of experts, shared expert with sigmoid gate.
pub fn reference(cfg: &MoeConfig, vm: &VarMap, xs: &[Vec<f64>]) -> RefOut {
    let e = cfg.num_experts;
    let gate = mat(vm, "gate.weight");
    let cap = cfg
        .capacity_factor
        .map(|cf| (cf * (xs.len() * cfg.top_k) as f64 / e as f64).ceil() as usize);
    let mut counts = vec![0usize; e];
    let mut dropped = 0;
    let mut ys = Vec::new();
    for x in xs {
        let logits = matvec(&gate, x);
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = ex.iter().sum();
        let p: Vec<f64> = ex.iter().map(|v| v / s).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|a, b| p[*b].partial_cmp(&p[*a]).unwrap());
        let sel = &order[..cfg.top_k];
        let norm: f64 = if cfg.norm_topk_prob {
            sel.iter().map(|&i| p[i]).sum()
        } else {
            1.0
        };
        let mut y = vec![0.0; x.len()];
        for &i in sel {
            if cap.is_some_and(|c| counts[i] >= c) {
                dropped += 1;
                continue;
            }
            counts[i] += 1;
            let out = swiglu_ref(vm, &format!("experts.{i}"), x);
            for (yy, o) in y.iter_mut().zip(out) {
                *yy += p[i] / norm * o;
            }
        }
        if cfg.shared_expert_intermediate_size > 0 {
            let out = swiglu_ref(vm, "shared_expert", x);
            let g = sigmoid(matvec(&mat(vm, "shared_expert_gate.weight"), x)[0]);
            for (yy, o) in y.iter_mut().zip(out) {
                *yy += g * o;
            }
        }
        ys.push(y);
    }
    RefOut {
        y: ys,
        counts,
        dropped,
    }
}
