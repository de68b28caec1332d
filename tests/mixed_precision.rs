//! Mixed-precision training: bf16 / f16 variables with f32 master weights and moments in
//! AdamW, and dynamic loss scaling for f16.
//!
//! Oracles: the master update equals the f32 AdamW update on the same (widened) gradient bit for
//! bit; loss scaling by a power of two leaves an f32 run bit-identical; a bf16 / f16 tiny
//! language model follows the f32 run's losses closely; masters survive a checkpoint round trip.

use candle_core::{DType, Device, Tensor};
use candle_moe::losses::cross_entropy;
use candle_moe::train::{init::reseed_varmap, AdamW, LossParts};
use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;

const VOCAB: usize = 32;

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::tiny(VOCAB);
    (c.hidden_size, c.moe.hidden_size, c.moe.intermediate_size) = (16, 16, 16);
    c.dense_intermediate_size = 16;
    c
}

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-2,
        warmup_steps: 1,
        seed: 5,
        progress: false,
        ..Default::default()
    }
}

/// A tiny LM in `dtype` whose initial weights are the f32 seed-3 weights rounded to `round`
/// (so runs in different dtypes start from the same values).
fn model(dtype: DType, round: DType) -> (CausalLm, VarMap) {
    let c = cfg();
    let vm = VarMap::new();
    let m = CausalLm::new(&c, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    reseed_varmap(&vm, 3).unwrap();
    for v in vm.all_vars() {
        let r = v.as_tensor().to_dtype(round).unwrap();
        let r = r.to_dtype(dtype).unwrap().copy().unwrap();
        v.set(&r).unwrap();
    }
    (m, vm)
}

/// One training step on a seeded batch; returns its task loss.
fn step_once(m: &CausalLm, trainer: &mut Trainer) -> f64 {
    let mut rng = trainer.step_rng();
    let ids: Vec<u32> = (0..4 * 9)
        .map(|i| (i as u32 * 7 + rng.random_range(0..3)) % VOCAB as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (4, 9), &Device::Cpu).unwrap();
    let (inp, tgt) = (
        ids.narrow(1, 0, 8).unwrap(),
        ids.narrow(1, 1, 8).unwrap().flatten_all().unwrap(),
    );
    let out = m.forward_t(&inp, None, true).unwrap();
    let parts = LossParts::from_output(
        cross_entropy(&out.logits.reshape((32, VOCAB)).unwrap(), &tgt, None).unwrap(),
        &out,
    );
    trainer.step(&parts).unwrap().task
}

/// Trains until step `steps`; returns the task losses.
fn train(m: &CausalLm, trainer: &mut Trainer, steps: usize) -> Vec<f64> {
    let mut losses = vec![];
    while trainer.state.step < steps {
        losses.push(step_once(m, trainer));
    }
    losses
}

/// Every variable's values, in name order.
fn weights(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = vm.data().lock().unwrap();
    let mut w: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(n, v)| (n.clone(), f32_values(v.as_tensor())))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn master_update_equals_the_f32_update_and_keeps_small_steps() {
    for dtype in [DType::BF16, DType::F16] {
        let w0 = Tensor::new(&[1.0f32, -0.5, 0.25, 2.0], &Device::Cpu).unwrap();
        let w0 = w0.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let g = Tensor::new(&[0.3f32, -1.0, 1e-3, 0.0], &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            lr: 1e-4,
            weight_decay: 0.0,
            ..Default::default()
        };
        // Half-precision variable with a master, against an f32 variable.
        let (vm_h, vm_f) = (VarMap::new(), VarMap::new());
        let vh = vm_h
            .get(4, "w", candle_nn::Init::Const(0.), dtype, &Device::Cpu)
            .unwrap();
        let vf = vm_f
            .get(4, "w", candle_nn::Init::Const(0.), DType::F32, &Device::Cpu)
            .unwrap();
        let var_h = vm_h.all_vars().remove(0);
        let var_f = vm_f.all_vars().remove(0);
        var_h.set(&w0.to_dtype(dtype).unwrap()).unwrap();
        var_f.set(&w0).unwrap();
        let (mut oh, mut of) = (
            AdamW::new(&vm_h, &cfg).unwrap(),
            AdamW::new(&vm_f, &cfg).unwrap(),
        );
        assert!(oh.has_masters() && !of.has_masters());
        assert_eq!(oh.state_dtype(), DType::F32);
        for _ in 0..100 {
            // The gradient as a half-precision backward pass would give it, and widened.
            let gh = g.to_dtype(dtype).unwrap();
            let mut sh = (vh.clone() * 0.0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            sh.insert(&vh, gh.clone());
            let mut sf = (vf.clone() * 0.0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            sf.insert(&vf, gh.to_dtype(DType::F32).unwrap());
            oh.step(&sh).unwrap();
            of.step(&sf).unwrap();
        }
        let master = oh.master(&var_h).expect("a master for the half variable");
        assert_eq!(master.dtype(), DType::F32);
        // The master follows the f32 update exactly.
        assert_eq!(
            f32_values(master.as_tensor()),
            f32_values(var_f.as_tensor())
        );
        // The variable is the master rounded to its dtype.
        let rounded = master.as_tensor().to_dtype(dtype).unwrap();
        assert_eq!(f32_values(var_h.as_tensor()), f32_values(&rounded));
        // 100 steps of lr 1e-4 moved w[0] = 1.0 by about 0.01: more than the bf16 spacing at
        // 1.0 (2^-7), though each step alone (1e-4) is far below it and would round away.
        let moved = (f32_values(var_h.as_tensor())[0] - 1.0).abs();
        assert!(moved > 0.005, "{dtype:?}: moved {moved}");
    }
}

#[test]
fn half_precision_language_model_follows_the_f32_run() {
    let steps = 30;
    let (mf, vf) = model(DType::F32, DType::BF16);
    let mut tf = Trainer::for_model(&vf, train_cfg(steps), &cfg().moe).unwrap();
    let lf = train(&mf, &mut tf, steps);
    for (dtype, scale) in [(DType::BF16, None), (DType::F16, Some(1024.0))] {
        let (mh, vh) = model(dtype, DType::BF16);
        let tc = TrainConfig {
            loss_scale: scale,
            ..train_cfg(steps)
        };
        let mut th = Trainer::for_model(&vh, tc, &cfg().moe).unwrap();
        let lh = train(&mh, &mut th, steps);
        eprintln!(
            "f32 {lf:.4?}\n{dtype:?} {lh:.4?} (final scale {:?})",
            th.state.loss_scale
        );
        assert_eq!(th.state.skipped_total, 0, "{dtype:?}");
        // Learned: the last losses well under the first.
        let (first, last) = (lh[0], lh[steps - 1]);
        assert!(last < 0.92 * first, "{dtype:?}: {first} -> {last}");
        // Close to the f32 run all along (rounding of activations only).
        for (i, (a, b)) in lf.iter().zip(&lh).enumerate() {
            assert!(
                (a - b).abs() < 0.02 * a,
                "{dtype:?} step {i}: f32 {a}, half {b}"
            );
        }
        // The weights stay in their dtype; the optimizer holds f32 masters.
        assert!(vh.all_vars().iter().all(|v| v.dtype() == dtype));
        assert!(th.optimizer().has_masters());
    }
}

#[test]
fn power_of_two_loss_scale_leaves_an_f32_run_bit_identical() {
    let steps = 6;
    let run = |scale: Option<f64>| {
        let (m, vm) = model(DType::F32, DType::F32);
        let tc = TrainConfig {
            loss_scale: scale,
            ..train_cfg(steps)
        };
        let mut t = Trainer::for_model(&vm, tc, &cfg().moe).unwrap();
        let losses = train(&m, &mut t, steps);
        let norms: Vec<f64> = t.state.history.iter().map(|s| s.grad_norm).collect();
        (losses, norms, weights(&vm))
    };
    let (a, b) = (run(None), run(Some(1024.0)));
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
    assert!(a.2 == b.2, "the weights differ");
}

#[test]
fn f16_overflow_skips_the_step_and_halves_the_scale() {
    let steps = 5;
    let (m, vm) = model(DType::F16, DType::BF16);
    // 2^40 makes the f16 gradients overflow; the scale halves until they fit.
    let tc = TrainConfig {
        loss_scale: Some(2f64.powi(40)),
        loss_scale_window: 2,
        max_nonfinite_in_row: 2,
        ..train_cfg(steps)
    };
    let mut t = Trainer::for_model(&vm, tc, &cfg().moe).unwrap();
    let before = weights(&vm);
    let (mut first_applied, mut in_row, mut doubled) = (None, 0, 0);
    while t.state.step < steps {
        let scale_before = t.state.loss_scale.unwrap();
        step_once(&m, &mut t);
        let scale_after = t.state.loss_scale.unwrap();
        if t.state.history.last().unwrap().skipped {
            in_row = 0;
            assert_eq!(scale_after, scale_before / 2.0);
            if first_applied.is_none() {
                assert!(weights(&vm) == before, "a skipped step changed a weight");
            }
        } else {
            first_applied.get_or_insert(scale_before);
            in_row += 1;
            // After 2 applied steps in a row (window 2) the scale doubles.
            if in_row == 2 {
                assert_eq!(scale_after, 2.0 * scale_before);
                (in_row, doubled) = (0, doubled + 1);
            } else {
                assert_eq!(scale_after, scale_before);
            }
        }
        assert!(t.state.history.len() < 200, "no progress");
    }
    let first = first_applied.expect("some step applied");
    assert!(t.state.skipped_total >= 1 && first < 2f64.powi(40));
    assert!(doubled >= 1);
}

#[test]
fn masters_and_scale_survive_a_checkpoint() {
    let steps = 4;
    let dir = tempfile::tempdir().unwrap();
    let (m, vm) = model(DType::BF16, DType::BF16);
    let tc = TrainConfig {
        loss_scale: Some(256.0),
        ..train_cfg(steps)
    };
    let mut t = Trainer::for_model(&vm, tc.clone(), &cfg().moe).unwrap();
    train(&m, &mut t, steps);
    t.save_state(dir.path()).unwrap();
    // A fresh trainer over the same (bf16) weights gets the masters back exactly, which
    // differ from the bf16 weights widened.
    let mut t2 = Trainer::for_model(&vm, tc, &cfg().moe).unwrap();
    t2.load_state(dir.path()).unwrap();
    let mut differs = false;
    for v in vm.all_vars() {
        let (Some(a), Some(b)) = (t.optimizer().master(&v), t2.optimizer().master(&v)) else {
            continue;
        };
        assert_eq!(f32_values(a.as_tensor()), f32_values(b.as_tensor()));
        differs |= f32_values(a.as_tensor()) != f32_values(v.as_tensor());
    }
    assert!(differs, "the masters carry more than the bf16 weights");
    assert_eq!(t2.state.loss_scale, t.state.loss_scale);
}

#[test]
fn a_checkpoint_loaded_trainable_in_bf16_fine_tunes_with_masters() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/mixtral");
    let opts = candle_moe::LoadOptions {
        trainable: true,
        dtype: DType::BF16,
        ..Default::default()
    };
    let m = CausalLm::from_pretrained(dir.to_str().unwrap(), &opts).unwrap();
    let vm = m.varmap().expect("trainable").clone();
    assert!(vm.all_vars().iter().all(|v| v.dtype() == DType::BF16));
    let mut t = Trainer::for_model(&vm, train_cfg(3), &m.config().moe).unwrap();
    assert!(t.optimizer().has_masters());
    let vocab = m.config().vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 5 + 1) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
    let (inp, tgt) = (
        ids.narrow(1, 0, 8).unwrap(),
        ids.narrow(1, 1, 8).unwrap().flatten_all().unwrap(),
    );
    let mut losses = vec![];
    for _ in 0..3 {
        let out = m.forward_t(&inp, None, true).unwrap();
        let logits = out.logits.reshape((16, vocab as usize)).unwrap();
        let parts = LossParts::from_output(cross_entropy(&logits, &tgt, None).unwrap(), &out);
        losses.push(t.step(&parts).unwrap().task);
    }
    assert!(losses[2] < losses[0], "{losses:?}");
    assert!(vm.all_vars().iter().all(|v| v.dtype() == DType::BF16));
}
