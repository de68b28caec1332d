//! Hardening, round two: bad sizes at the task entry points, the sampler's rules for
//! NaN / ±inf logits and invalid configs, cross-entropy and token-id range checks in the ids'
//! own dtype, `TrainConfig::validate`, updates that would make parameters non-finite,
//! all-or-nothing `Trainer::load_state`, lossless NaN / ±inf in `trainer_state.json`, and the
//! `language_model` CLI with zero sizes.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::error::CheckpointErrorKind;
use candle_moe::losses::cross_entropy;
use candle_moe::tasks::{language_model as lm, sentiment, translation};
use candle_moe::train::{LossParts, StepStats, TrainConfig, Trainer};
use candle_moe::{CausalLm, Error, ModelConfig, Sampler, SamplingConfig, SequenceClassifier};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::tiny(40);
    c.hidden_size = 16;
    c.moe.hidden_size = 16;
    c.moe.intermediate_size = 16;
    c.dense_intermediate_size = 16;
    c.num_layers = 1;
    c.max_position_embeddings = 16;
    c
}

fn lm_model() -> CausalLm {
    let vm = VarMap::new();
    CausalLm::new(
        &tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(0)
}

fn err_msg<T>(r: candle_core::Result<T>) -> String {
    match r {
        Ok(_) => "no error".into(),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// A1. Task entry points: zero sizes are errors, not panics.

#[test]
fn task_functions_reject_zero_sizes() {
    let dev = Device::Cpu;
    let model = lm_model();
    let stream: Vec<u32> = (0..200).map(|i| i % 40).collect();
    let mut cls_cfg = tiny();
    cls_cfg.num_labels = 2;
    let vm = VarMap::new();
    let cls =
        SequenceClassifier::new(&cls_cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let examples = vec![(vec![1u32, 2, 3], 1u32), (vec![4, 5], 0)];
    let rows: Vec<Vec<u32>> = examples.iter().map(|e| e.0.clone()).collect();
    let pairs = vec![(vec![1u32, 2, 3], vec![4u32, 5])];
    let sp = translation::Specials {
        pad: 0,
        bos: 1,
        eos: 2,
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "lm batch b=0",
            err_msg(lm::batch(&stream, 0, 8, &mut rng(), &dev)),
            "batch size must be at least 1",
        ),
        (
            "lm batch t=0",
            err_msg(lm::batch(&stream, 2, 0, &mut rng(), &dev)),
            "window (sequence length) must be at least 1",
        ),
        (
            "lm batch t=usize::MAX",
            err_msg(lm::batch(&stream, 2, usize::MAX, &mut rng(), &dev)),
            "shorter than a window",
        ),
        (
            "lm evaluate t=0",
            err_msg(lm::evaluate(&model, &stream, 0, 4, 4, &dev)),
            "window (sequence length) must be at least 1",
        ),
        (
            "lm evaluate b=0",
            err_msg(lm::evaluate(&model, &stream, 8, 0, 4, &dev)),
            "batch size must be at least 1",
        ),
        (
            "lm evaluate max_windows=0",
            err_msg(lm::evaluate(&model, &stream, 8, 4, 0, &dev)),
            "max_windows must be at least 1",
        ),
        (
            "sentiment batch b=0",
            err_msg(sentiment::batch(&examples, 0, 8, 0, &mut rng(), &dev)),
            "batch size must be at least 1",
        ),
        (
            "sentiment batch max_len=0",
            err_msg(sentiment::batch(&examples, 2, 0, 0, &mut rng(), &dev)),
            "max_len must be at least 1",
        ),
        (
            "sentiment batch no data",
            err_msg(sentiment::batch(&[], 2, 8, 0, &mut rng(), &dev)),
            "no training examples",
        ),
        (
            "sentiment predict b=0",
            err_msg(sentiment::predict(&cls, &rows, 0, 8, 0, &dev)),
            "batch size must be at least 1",
        ),
        (
            "sentiment predict max_len=0",
            err_msg(sentiment::predict(&cls, &rows, 2, 0, 0, &dev)),
            "max_len must be at least 1",
        ),
        (
            "translation batch b=0",
            err_msg(translation::batch(&pairs, 0, 8, sp, &mut rng(), &dev)),
            "batch size must be at least 1",
        ),
        (
            "translation batch max_len=0",
            err_msg(translation::batch(&pairs, 2, 0, sp, &mut rng(), &dev)),
            "max_len must be at least 1",
        ),
    ];
    for (name, msg, needle) in &cases {
        assert!(
            msg.contains(needle),
            "case `{name}`: error `{msg}` should contain `{needle}`"
        );
    }
    // The valid calls still work.
    assert!(lm::evaluate(&model, &stream, 8, 4, 4, &dev).is_ok());
    assert_eq!(
        sentiment::predict(&cls, &rows, 1, 8, 0, &dev)
            .unwrap()
            .len(),
        2
    );
    let b = translation::batch(&pairs, 2, 1, sp, &mut rng(), &dev).unwrap();
    assert_eq!(b[2].dims(), &[2, 1]);
    assert!(lm::unigram_nll(&stream, &[], 40).is_nan());
}

// ---------------------------------------------------------------------------------------------
// A2. The sampler.

#[test]
fn sampling_config_validate_names_the_field() {
    let base = SamplingConfig {
        temperature: 1.0,
        ..Default::default()
    };
    let cases: Vec<(&str, SamplingConfig, &str)> = vec![
        (
            "NaN temperature",
            SamplingConfig {
                temperature: f64::NAN,
                ..base.clone()
            },
            "temperature",
        ),
        (
            "negative temperature",
            SamplingConfig {
                temperature: -0.5,
                ..base.clone()
            },
            "temperature",
        ),
        (
            "infinite temperature",
            SamplingConfig {
                temperature: f64::INFINITY,
                ..base.clone()
            },
            "temperature",
        ),
        (
            "top_k 0",
            SamplingConfig {
                top_k: Some(0),
                ..base.clone()
            },
            "top_k",
        ),
        (
            "top_p 0",
            SamplingConfig {
                top_p: Some(0.0),
                ..base.clone()
            },
            "top_p",
        ),
        (
            "top_p above 1",
            SamplingConfig {
                top_p: Some(1.5),
                ..base.clone()
            },
            "top_p",
        ),
        (
            "top_p NaN",
            SamplingConfig {
                top_p: Some(f64::NAN),
                ..base.clone()
            },
            "top_p",
        ),
    ];
    let logits = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap();
    for (name, cfg, field) in cases {
        match cfg.validate() {
            Err(Error::Config(m)) => assert!(m.contains(field), "{name}: `{m}`"),
            other => panic!("{name}: expected Error::Config naming {field}, got {other:?}"),
        }
        let m = err_msg(Sampler::new(cfg).sample(&logits));
        assert!(m.contains(field), "{name}: sample error `{m}`");
    }
    for ok in [
        base.clone(),
        SamplingConfig::default(),
        SamplingConfig {
            top_k: Some(1),
            top_p: Some(1.0),
            ..base.clone()
        },
    ] {
        ok.validate().unwrap();
    }
}

#[test]
fn sampler_handles_nan_and_infinite_logits() {
    let dev = Device::Cpu;
    let inf = f32::INFINITY;
    let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
    let greedy = SamplingConfig::default();
    let hot = SamplingConfig {
        temperature: 1.0,
        ..Default::default()
    };
    // NaN anywhere: an error.
    for cfg in [&greedy, &hot] {
        let m = err_msg(Sampler::new(cfg.clone()).sample(&t(&[0.0, f32::NAN, 1.0])));
        assert!(m.contains("NaN"), "{m}");
        let m = err_msg(Sampler::new(cfg.clone()).sample(&t(&[f32::NEG_INFINITY; 3])));
        assert!(m.contains("-inf"), "{m}");
    }
    // +inf: greedy takes the first +inf one; sampling picks uniformly among the +inf ones.
    let logits = t(&[5.0, inf, 1.0, inf, -inf]);
    assert_eq!(Sampler::new(greedy.clone()).sample(&logits).unwrap(), 1);
    let mut seen = [0usize; 5];
    let mut s = Sampler::new(hot.clone());
    for _ in 0..400 {
        seen[s.sample(&logits).unwrap() as usize] += 1;
    }
    assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
    assert!(seen[1] > 120 && seen[3] > 120, "not uniform: {seen:?}");
    // With top-k 1 only the first +inf token survives.
    let mut s = Sampler::new(SamplingConfig {
        top_k: Some(1),
        ..hot.clone()
    });
    for _ in 0..20 {
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
    // -inf tokens are never sampled; a tiny temperature is (almost) greedy, never NaN.
    let mut s = Sampler::new(hot.clone());
    for _ in 0..200 {
        assert_ne!(s.sample(&t(&[0.0, -inf, 0.0])).unwrap(), 1);
    }
    let mut s = Sampler::new(SamplingConfig {
        temperature: 1e-300,
        ..Default::default()
    });
    for _ in 0..20 {
        assert_eq!(s.sample(&t(&[0.0, 3.0, 1.0])).unwrap(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// A3. cross_entropy: targets checked against the class count before the ignore filter.

#[test]
fn cross_entropy_checks_targets_before_the_ignore_filter() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((3, 10), DType::F32, &dev).unwrap();
    let u = |v: &[u32]| Tensor::new(v, &dev).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "target past C with a sentinel ignore index",
            err_msg(cross_entropy(&logits, &u(&[1, 50, 100]), Some(100))),
            "target id 50 is out of range for 10 classes",
        ),
        (
            "target past C without ignore index",
            err_msg(cross_entropy(&logits, &u(&[1, 2, 10]), None)),
            "target id 10 is out of range for 10 classes",
        ),
        (
            "target past C with an in-range ignore index",
            err_msg(cross_entropy(&logits, &u(&[0, 0, 11]), Some(0))),
            "target id 11 is out of range",
        ),
        (
            "negative i64 target",
            err_msg(cross_entropy(
                &logits,
                &Tensor::new(&[1i64, -1, 2], &dev).unwrap(),
                None,
            )),
            "target id -1 is negative",
        ),
        (
            "i64 target that would wrap to a valid u32",
            err_msg(cross_entropy(
                &logits,
                &Tensor::new(&[1i64, (1i64 << 32) + 1, 2], &dev).unwrap(),
                None,
            )),
            "do not fit in u32",
        ),
        (
            "every target ignored",
            err_msg(cross_entropy(&logits, &u(&[100, 100, 100]), Some(100))),
            "every target is the ignore index",
        ),
        (
            "no rows",
            err_msg(cross_entropy(
                &Tensor::zeros((0, 10), DType::F32, &dev).unwrap(),
                &u(&[]),
                None,
            )),
            "no targets",
        ),
    ];
    for (name, msg, needle) in &cases {
        assert!(
            msg.contains(needle),
            "case `{name}`: error `{msg}` should contain `{needle}`"
        );
    }
    // A sentinel ignore index >= C is fine; the loss is over the kept rows: ln 10 each.
    let l = cross_entropy(&logits, &u(&[1, 100, 9]), Some(100))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l - 10f32.ln()).abs() < 1e-5, "{l}");
    let l64 = cross_entropy(&logits, &Tensor::new(&[1i64, 2, 9], &dev).unwrap(), None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l64 - 10f32.ln()).abs() < 1e-5, "{l64}");
}

// ---------------------------------------------------------------------------------------------
// A4. Token ids are range-checked in their own dtype.

#[test]
fn token_ids_are_checked_before_any_cast() {
    let dev = Device::Cpu;
    let model = lm_model();
    let ids = |v: &[i64]| Tensor::new(v, &dev).unwrap().unsqueeze(0).unwrap();
    let cases: Vec<(&str, Tensor, &str)> = vec![
        (
            "negative i64 id",
            ids(&[1, -1, 2]),
            "token id -1 is negative",
        ),
        (
            "i64 id that wraps to a valid u32",
            ids(&[1, (1i64 << 32) + 3, 2]),
            "token id 4294967299 is out of range for vocab_size 40",
        ),
        ("i64 id = vocab", ids(&[40]), "token id 40 is out of range"),
        (
            "u32 id = vocab",
            Tensor::new(&[[3u32, 40]], &dev).unwrap(),
            "token id 40 is out of range",
        ),
        (
            "float ids",
            Tensor::new(&[[1f32, 2.0]], &dev).unwrap(),
            "integer token ids",
        ),
    ];
    for (name, x, needle) in cases {
        let m = match model.forward(&x) {
            Ok(_) => "no error".into(),
            Err(e) => e.to_string(),
        };
        assert!(
            m.contains(needle),
            "case `{name}`: `{m}` should contain `{needle}`"
        );
    }
    // Valid ids in every integer dtype give the same logits.
    let want = model
        .forward(&Tensor::new(&[[1u32, 39, 0]], &dev).unwrap())
        .unwrap()
        .logits;
    for x in [
        ids(&[1, 39, 0]),
        Tensor::new(&[[1u8, 39, 0]], &dev).unwrap(),
    ] {
        let got = model.forward(&x).unwrap().logits;
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// B5. TrainConfig::validate.

#[test]
fn train_config_validate_names_the_field() {
    let base = TrainConfig {
        steps: 10,
        warmup_steps: 2,
        progress: false,
        ..Default::default()
    };
    base.validate().unwrap();
    let cases: Vec<(&str, TrainConfig)> = vec![
        (
            "steps",
            TrainConfig {
                steps: 0,
                warmup_steps: 0,
                ..base.clone()
            },
        ),
        (
            "lr",
            TrainConfig {
                lr: 0.0,
                ..base.clone()
            },
        ),
        (
            "lr",
            TrainConfig {
                lr: -1e-3,
                ..base.clone()
            },
        ),
        (
            "lr",
            TrainConfig {
                lr: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "lr",
            TrainConfig {
                lr: f64::INFINITY,
                ..base.clone()
            },
        ),
        (
            "eps",
            TrainConfig {
                eps: 0.0,
                ..base.clone()
            },
        ),
        (
            "eps",
            TrainConfig {
                eps: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "beta1",
            TrainConfig {
                beta1: 1.0,
                ..base.clone()
            },
        ),
        (
            "beta1",
            TrainConfig {
                beta1: -0.1,
                ..base.clone()
            },
        ),
        (
            "beta2",
            TrainConfig {
                beta2: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "weight_decay",
            TrainConfig {
                weight_decay: -0.1,
                ..base.clone()
            },
        ),
        (
            "weight_decay",
            TrainConfig {
                weight_decay: f64::INFINITY,
                ..base.clone()
            },
        ),
        (
            "grad_clip",
            TrainConfig {
                grad_clip: Some(0.0),
                ..base.clone()
            },
        ),
        (
            "grad_clip",
            TrainConfig {
                grad_clip: Some(f64::NAN),
                ..base.clone()
            },
        ),
        (
            "max_nonfinite_in_row",
            TrainConfig {
                max_nonfinite_in_row: 0,
                ..base.clone()
            },
        ),
        (
            "min_lr_ratio",
            TrainConfig {
                min_lr_ratio: 1.5,
                ..base.clone()
            },
        ),
        (
            "min_lr_ratio",
            TrainConfig {
                min_lr_ratio: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "aux_loss_coef",
            TrainConfig {
                aux_loss_coef: Some(-1.0),
                ..base.clone()
            },
        ),
        (
            "z_loss_coef",
            TrainConfig {
                z_loss_coef: Some(f64::NAN),
                ..base.clone()
            },
        ),
    ];
    let vm = VarMap::new();
    for (field, cfg) in cases {
        match cfg.validate() {
            Err(Error::Config(m)) => assert!(m.contains(field), "{field}: `{m}`"),
            other => panic!("{field}: expected Error::Config, got {other:?}"),
        }
        match Trainer::new(&vm, cfg) {
            Err(Error::Config(m)) => assert!(m.contains(field), "{field}: `{m}`"),
            other => panic!("{field}: Trainer::new should refuse, got {other:?}"),
        }
    }
    // Boundary values that are allowed (a warmup longer than the run included).
    TrainConfig {
        warmup_steps: 11,
        beta1: 0.0,
        weight_decay: 0.0,
        grad_clip: None,
        min_lr_ratio: 1.0,
        aux_loss_coef: Some(0.0),
        z_loss_coef: Some(0.0),
        ..base.clone()
    }
    .validate()
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// B6. An update that would make a parameter non-finite is skipped.

/// A VarMap with one variable `w` = [1, 2, 3] and the loss sum(w²).
fn quadratic() -> (VarMap, candle_core::Var) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    vb.get_with_hints(3, "w", Init::Const(0.0)).unwrap();
    let w = vm.data().lock().unwrap()["w"].clone();
    w.set(&Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap())
        .unwrap();
    (vm, w)
}

fn parts(w: &candle_core::Var) -> LossParts {
    let z = Tensor::new(0f32, &Device::Cpu).unwrap();
    LossParts::new(
        w.as_tensor().sqr().unwrap().sum_all().unwrap(),
        z.clone(),
        z,
        vec![],
    )
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn an_update_that_overflows_is_skipped_and_never_saved() {
    for (name, cfg) in [
        (
            "lr overflows f32",
            TrainConfig {
                lr: 1e300,
                ..Default::default()
            },
        ),
        (
            "weight decay overflows f32",
            TrainConfig {
                lr: 1.0,
                weight_decay: 1e300,
                ..Default::default()
            },
        ),
    ] {
        let (vm, w) = quadratic();
        let mut tr = Trainer::new(
            &vm,
            TrainConfig {
                steps: 10,
                warmup_steps: 0,
                grad_clip: None,
                max_nonfinite_in_row: 2,
                progress: false,
                ..cfg
            },
        )
        .unwrap();
        let s = tr.step(&parts(&w)).unwrap();
        assert!(s.skipped, "{name}: {s:?}");
        assert!(s.loss.is_finite() && s.grad_norm.is_finite(), "{name}");
        assert_eq!(values(w.as_tensor()), vec![1.0, 2.0, 3.0], "{name}");
        assert_eq!(tr.state.step, 0, "{name}");
        assert_eq!(tr.state.skipped_total, 1, "{name}");
        assert_eq!(tr.optimizer().step_count(), 0, "{name}");
        for (k, m) in tr.optimizer().state_tensors() {
            assert!(values(&m).iter().all(|x| *x == 0.0), "{name}: moment {k}");
        }
        // A checkpoint written now holds the old, finite parameters and moments.
        let d = tempfile::tempdir().unwrap();
        tr.save_state(d.path()).unwrap();
        let saved =
            candle_core::safetensors::load(d.path().join("optimizer.safetensors"), &Device::Cpu)
                .unwrap();
        for (k, t) in saved {
            assert!(values(&t).iter().all(|x| x.is_finite()), "{name}: {k}");
        }
        // Counted like a non-finite loss: the second in a row stops training.
        match tr.step(&parts(&w)) {
            Err(Error::Training(m)) => {
                assert!(m.contains("non-finite"), "{name}: {m}");
                assert!(m.contains("parameter"), "{name}: {m}");
            }
            other => panic!("{name}: expected Error::Training, got {other:?}"),
        }
        assert_eq!(values(w.as_tensor()), vec![1.0, 2.0, 3.0], "{name}");
    }

    // A non-finite gradient (finite loss) is skipped too; then a good step goes through.
    let (vm, w) = quadratic();
    let mut tr = Trainer::new(
        &vm,
        TrainConfig {
            steps: 10,
            warmup_steps: 0,
            lr: 0.1,
            progress: false,
            ..Default::default()
        },
    )
    .unwrap();
    // sqrt(w - 1) at w = [1, 2, 3]: a finite loss whose gradient is +inf at w[0].
    let nan_grad = LossParts {
        task: w
            .as_tensor()
            .affine(1.0, -1.0)
            .unwrap()
            .sqrt()
            .unwrap()
            .sum_all()
            .unwrap(),
        ..parts(&w)
    };
    let s = tr.step(&nan_grad).unwrap();
    assert!(s.skipped && !s.grad_norm.is_finite(), "{s:?}");
    assert_eq!(values(w.as_tensor()), vec![1.0, 2.0, 3.0]);
    let s = tr.step(&parts(&w)).unwrap();
    assert!(!s.skipped);
    assert_eq!(tr.state.step, 1);
    assert!(values(w.as_tensor())
        .iter()
        .zip([1.0, 2.0, 3.0])
        .all(|(a, b)| *a < b));

    // AdamW::step itself refuses such an update and says so.
    let (vm, w) = quadratic();
    let mut opt = candle_moe::train::AdamW::new(
        &vm,
        &TrainConfig {
            lr: 1e300,
            ..Default::default()
        },
    )
    .unwrap();
    let g = parts(&w).task.backward().unwrap();
    let m = err_msg(opt.step(&g));
    assert!(m.contains("non-finite"), "{m}");
    assert_eq!(opt.step_count(), 0);
    assert_eq!(values(w.as_tensor()), vec![1.0, 2.0, 3.0]);
}

// ---------------------------------------------------------------------------------------------
// B7. load_state is all or nothing.

fn trained(seed: u64) -> (VarMap, candle_core::Var, Trainer) {
    let (vm, w) = quadratic();
    let mut tr = Trainer::new(
        &vm,
        TrainConfig {
            steps: 10,
            warmup_steps: 0,
            lr: 0.1,
            seed,
            progress: false,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..2 {
        tr.step(&parts(&w)).unwrap();
    }
    tr.state.evals.push((2, 0.5));
    (vm, w, tr)
}

/// Everything `load_state` may touch, to compare before and after.
fn snapshot(tr: &Trainer) -> (String, usize, Vec<(String, Vec<f32>)>) {
    let mut moments: Vec<(String, Vec<f32>)> = tr
        .optimizer()
        .state_tensors()
        .into_iter()
        .map(|(k, t)| (k, values(&t)))
        .collect();
    moments.sort_by(|a, b| a.0.cmp(&b.0));
    (
        format!("{:?}", tr.state),
        tr.optimizer().step_count(),
        moments,
    )
}

#[test]
fn a_failed_load_state_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (_vm, _w, src) = trained(7);
    src.save_state(d.path()).unwrap();
    let opt_file = d.path().join("optimizer.safetensors");
    let good = candle_core::safetensors::load(&opt_file, &Device::Cpu).unwrap();

    // The target: a trainer with a step of its own (non-zero moments) and two variables, so a
    // missing moment sorted last would have let the first variable's moments through before.
    let fresh = |seed: u64| {
        let (vm, w) = quadratic();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        vb.get_with_hints(2, "x", Init::Const(1.0)).unwrap();
        let mut tr = Trainer::new(
            &vm,
            TrainConfig {
                steps: 10,
                warmup_steps: 0,
                seed,
                progress: false,
                ..Default::default()
            },
        )
        .unwrap();
        tr.step(&parts(&w)).unwrap();
        tr
    };
    let write = |edit: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| {
        let mut t = good.clone();
        t.insert(
            "x.m".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "x.v".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        edit(&mut t);
        candle_core::safetensors::save(&t, &opt_file).unwrap();
    };

    // Wrong seed.
    write(&|_| {});
    let mut tr = fresh(8);
    let before = snapshot(&tr);
    match tr.load_state(d.path()) {
        Err(Error::Config(m)) => assert!(m.contains("seed 7") && m.contains("seed 8"), "{m}"),
        other => panic!("wrong seed: expected Error::Config, got {other:?}"),
    }
    assert_eq!(snapshot(&tr), before, "wrong seed changed the trainer");

    // A missing moment (the last one in name order).
    write(&|t| {
        t.remove("x.v");
    });
    let mut tr = fresh(7);
    let before = snapshot(&tr);
    match tr.load_state(d.path()) {
        Err(e @ Error::Checkpoint { .. }) => {
            assert_eq!(e.checkpoint_kind(), Some(&CheckpointErrorKind::Missing));
            assert!(e.to_string().contains("`x.v`"), "{e}");
        }
        other => panic!("missing moment: expected Error::Checkpoint, got {other:?}"),
    }
    assert_eq!(
        snapshot(&tr),
        before,
        "a missing moment changed the trainer"
    );

    // A moment of the wrong shape.
    write(&|t| {
        t.insert(
            "x.v".into(),
            Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let mut tr = fresh(7);
    let before = snapshot(&tr);
    match tr.load_state(d.path()) {
        Err(e @ Error::Checkpoint { .. }) => {
            assert!(
                matches!(e.checkpoint_kind(), Some(CheckpointErrorKind::Shape { .. })),
                "{e}"
            );
            assert!(e.to_string().contains("`x.v`"), "{e}");
        }
        other => panic!("wrong shape: expected Error::Checkpoint, got {other:?}"),
    }
    assert_eq!(snapshot(&tr), before, "a wrong shape changed the trainer");

    // A corrupt state file.
    write(&|_| {});
    let state_file = d.path().join("trainer_state.json");
    let good_state = std::fs::read_to_string(&state_file).unwrap();
    std::fs::write(&state_file, "{\"step\": ").unwrap();
    let mut tr = fresh(7);
    let before = snapshot(&tr);
    assert!(matches!(tr.load_state(d.path()), Err(Error::Json { .. })));
    assert_eq!(snapshot(&tr), before);

    // And the good one loads.
    std::fs::write(&state_file, good_state).unwrap();
    let mut tr = fresh(7);
    tr.load_state(d.path()).unwrap();
    assert_eq!(
        (tr.state.step, tr.state.seed, tr.state.history.len()),
        (src.state.step, src.state.seed, src.state.history.len())
    );
    for (a, b) in tr.state.history.iter().zip(&src.state.history) {
        assert!(close(a.loss, b.loss) && close(a.lr, b.lr) && close(a.grad_norm, b.grad_norm));
    }
    assert_eq!(tr.optimizer().step_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// B8. NaN and ±inf round-trip through trainer_state.json.

fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Equal up to the last bit or so: serde_json's default float parser (without its
/// `float_roundtrip` feature) may be one ulp off on 17-digit decimals.
fn close(a: f64, b: f64) -> bool {
    same(a, b) || (a.is_finite() && b.is_finite() && (a - b).abs() <= 4e-16 * a.abs().max(b.abs()))
}

#[test]
fn non_finite_floats_round_trip_through_the_state_file() {
    let d = tempfile::tempdir().unwrap();
    let (_vm, _w, mut tr) = trained(3);
    let weird = StepStats {
        step: 2,
        loss: f64::NAN,
        task: f64::INFINITY,
        load_balancing: f64::NEG_INFINITY,
        z_loss: -0.0,
        lr: 1e-300,
        grad_norm: f64::NAN,
        imbalance: f64::MAX,
        skipped: true,
        layers: vec![],
        ..Default::default()
    };
    tr.state.history.push(weird.clone());
    tr.state.evals = vec![
        (1, f64::NAN),
        (2, f64::INFINITY),
        (2, f64::NEG_INFINITY),
        (2, 1.25),
    ];
    tr.save_state(d.path()).unwrap();
    let text = std::fs::read_to_string(d.path().join("trainer_state.json")).unwrap();
    assert!(!text.contains("null"), "{text}");
    assert!(
        text.contains("\"NaN\"") && text.contains("\"Infinity\"") && text.contains("\"-Infinity\""),
        "{text}"
    );

    let (_vm2, _w2, mut back) = trained(3);
    back.load_state(d.path()).unwrap();
    let h = back.state.history.last().unwrap();
    for (a, b) in [
        (h.loss, weird.loss),
        (h.task, weird.task),
        (h.load_balancing, weird.load_balancing),
        (h.z_loss, weird.z_loss),
        (h.lr, weird.lr),
        (h.grad_norm, weird.grad_norm),
        (h.imbalance, weird.imbalance),
    ] {
        assert!(close(a, b), "{a} != {b}");
    }
    assert_eq!(back.state.evals.len(), 4);
    for (x, y) in back.state.evals.iter().zip(&tr.state.evals) {
        assert_eq!(x.0, y.0);
        assert!(close(x.1, y.1), "{} != {}", x.1, y.1);
    }
    // Resaving keeps the non-finite values.
    let d2 = tempfile::tempdir().unwrap();
    back.save_state(d2.path()).unwrap();
    let again = std::fs::read_to_string(d2.path().join("trainer_state.json")).unwrap();
    for marker in ["\"NaN\"", "\"Infinity\"", "\"-Infinity\""] {
        assert_eq!(
            again.matches(marker).count(),
            text.matches(marker).count(),
            "{again}"
        );
    }

    // Files from before the rule wrote NaN as null: read as NaN (history and evals).
    let old = text
        .replace("\"NaN\"", "null")
        .replace("\"Infinity\"", "1.0")
        .replace("\"-Infinity\"", "1.0");
    std::fs::write(d.path().join("trainer_state.json"), old).unwrap();
    let (_vm3, _w3, mut old_tr) = trained(3);
    old_tr.load_state(d.path()).unwrap();
    assert!(old_tr.state.history.last().unwrap().loss.is_nan());
    assert!(old_tr.state.evals[0].1.is_nan());

    // A string that is not a float is a JSON error naming the file.
    let bad = text.replacen("\"NaN\"", "\"lots\"", 1);
    std::fs::write(d.path().join("trainer_state.json"), bad).unwrap();
    let (_vm4, _w4, mut bad_tr) = trained(3);
    match bad_tr.load_state(d.path()) {
        Err(e @ Error::Json { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("trainer_state.json") && m.contains("lots"),
                "{m}"
            );
        }
        other => panic!("expected Error::Json, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The language_model CLI with zero sizes: one `error:` line, non-zero exit, no panic.

#[test]
fn language_model_cli_rejects_zero_sizes() {
    let exe = common::example_path("language_model");
    assert!(
        exe.exists(),
        "example binary {} not built (run cargo test, which builds examples)",
        exe.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = |n: &str| tmp.path().join(n).display().to_string();
    let small = |o: String, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--out",
            &o,
            "--vocab",
            "300",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--experts",
            "2",
            "--expert-ffn",
            "16",
            "--eval-windows",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let runs = [
        (
            small(out("a"), &["--steps", "2", "--seq-len", "0"]),
            "sequence length",
        ),
        (
            small(out("b"), &["--steps", "2", "--batch", "0"]),
            "batch size",
        ),
        (small(out("c"), &["--steps", "0"]), "steps"),
    ];
    for (args, needle) in runs {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (code, stderr) = common::example_cli("language_model", &args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: `{}` should contain `{needle}`",
            lines[0]
        );
    }
}
