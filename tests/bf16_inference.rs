//! bf16 inference on CPU: a frozen bf16 layer keeps its experts in bf16 (no f32 copy) and takes
//! the fused path, which converts one weight matrix at a time to f32 and accumulates in f32.
//!
//! Checked: the fused bf16 output against the f64 per-token reference on the same bf16-rounded
//! weights and input (2e-2 of the largest reference value: the input and output are rounded to
//! bf16, the arithmetic is f32) and against the generic loop in bf16; the routing statistics
//! equal; a bf16 `CausalLm` loaded from a transformers fixture keeps its experts in bf16 and its
//! logits stay within 5e-2 of the f32 model's.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::moe::ExpertBackend;
use candle_moe::{CausalLm, LoadOptions, MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use common::moe_ref::reference;
use common::Rng;

const H: usize = 32;

/// A frozen bf16 layer and the f64 varmap holding the same (rounded) weights.
fn frozen_bf16(cfg: &MoeConfig, seed: u64) -> (VarMap, SparseMoe) {
    let (vm64, tensors) = common::rounded_moe_weights(cfg, seed, 0.3, DType::BF16);
    let vb = VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu);
    (vm64, SparseMoe::new(cfg, vb).unwrap())
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

#[test]
fn bf16_fused_path_matches_the_reference_and_the_loop() {
    for (i, (e, k, shared)) in [(8usize, 2usize, 0usize), (4, 1, 16), (16, 4, 0)]
        .into_iter()
        .enumerate()
    {
        let cfg = MoeConfig {
            hidden_size: H,
            intermediate_size: 48,
            num_experts: e,
            top_k: k,
            shared_expert_intermediate_size: shared,
            ..Default::default()
        };
        let (vm64, mut moe) = frozen_bf16(&cfg, 7 + i as u64);
        // The experts stay bf16: no f32 copy is made.
        for ex in moe.experts().experts() {
            assert_eq!(ex.weights().0.dtype(), DType::BF16);
        }
        let xs = Rng::new(70 + i as u64)
            .tensor(&[96, H], 1.0, DType::F64)
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            moe.chosen_backend(&xs, false).unwrap(),
            ExpertBackend::Fused
        );
        let fused = moe.forward(&xs).unwrap();
        assert_eq!(fused.hidden_states.dtype(), DType::BF16);
        moe.set_backend(ExpertBackend::Loop);
        assert_eq!(moe.chosen_backend(&xs, false).unwrap(), ExpertBackend::Loop);
        let looped = moe.forward(&xs).unwrap();
        assert_eq!(fused.expert_counts, looped.expert_counts);

        let r = reference(&cfg, &vm64, &rows(&xs));
        let scale = r.y.iter().flatten().fold(1.0f64, |m, v| m.max(v.abs()));
        for (name, got) in [("fused", &fused), ("loop", &looped)] {
            let got = rows(&got.hidden_states);
            let worst = got
                .iter()
                .flatten()
                .zip(r.y.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 2e-2 * scale,
                "{name} E={e} k={k}: {worst} (scale {scale})"
            );
        }
        assert_eq!(fused.expert_counts, r.counts);
    }
}

#[test]
fn bf16_causal_lm_from_a_transformers_fixture_stays_bf16() {
    let dir = common::hf_fixture("mixtral");
    let load = |dtype| {
        CausalLm::from_pretrained(
            dir.to_str().unwrap(),
            &LoadOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (m32, m16) = (load(DType::F32), load(DType::BF16));
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3, 11, 4]], &Device::Cpu).unwrap();
    let a = m32.forward(&ids).unwrap().logits;
    let b = m16.forward(&ids).unwrap().logits;
    assert_eq!(b.dtype(), DType::BF16);
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let d = common::max_abs_diff(&a, &b.to_dtype(DType::F32).unwrap());
    assert!(d <= 5e-2 * scale.max(1.0), "bf16 vs f32 logits: {d}");
}
