//! Training guards and the whole user journey: train → save → kill → resume → generate →
//! evaluate → load the directory from a fresh process.

use candle_core::{DType, Device, Tensor};
use candle_moe::data::{self, shakespeare};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::tasks::language_model as lm;
use candle_moe::tokenizer;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig, SamplingConfig};
use candle_nn::{VarBuilder, VarMap};

fn tiny(vocab: usize) -> ModelConfig {
    let mut c = ModelConfig::tiny(vocab);
    c.hidden_size = 32;
    c.moe.hidden_size = 32;
    c.moe.intermediate_size = 32;
    c.num_layers = 2;
    c.max_position_embeddings = 64;
    c
}

#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run_with_the_checkpoint_intact() {
    let cfg = tiny(50);
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tcfg = TrainConfig {
        steps: 20,
        lr: 1e-2,
        warmup_steps: 1,
        checkpoint_every: 2,
        max_nonfinite_in_row: 3,
        progress: false,
        ..Default::default()
    };
    let mut tr = Trainer::new(&vm, tcfg).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[2u32, 3, 4, 5, 6, 7, 8, 9], &Device::Cpu).unwrap();
    let mut calls = 0usize;
    let mut saved_at = vec![];
    let res = tr.run(
        |_| {
            calls += 1;
            let mut p = lm::loss_parts(&m, &x, &y, true)?;
            // Call 3 is NaN (skipped, the run goes on); from call 6 on every loss is NaN.
            if calls == 3 || calls >= 6 {
                p.task = (p.task * f64::NAN)?;
            }
            Ok(p)
        },
        || Ok(0.0),
        |t| {
            saved_at.push(t.state.step);
            checkpoint::save(dir.path(), &cfg, &vm, None)?;
            t.save_state(dir.path())
        },
    );
    let err = res.unwrap_err().to_string();
    assert!(err.contains("3 non-finite steps in a row"), "{err}");
    // Calls 1, 2, 4, 5 updated; 3, 6, 7, 8 were skipped.
    assert_eq!(tr.state.step, 4);
    assert_eq!(tr.state.skipped_total, 4);
    assert_eq!(tr.state.history.iter().filter(|s| s.skipped).count(), 4);
    assert_eq!(saved_at, vec![2, 4]);
    // The last good checkpoint (step 4) loads and equals the weights the run stopped with.
    let (m2, _) = CausalLm::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let a = m.forward(&x).unwrap().logits;
    let b = m2.forward(&x).unwrap().logits;
    assert_eq!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let mut tr2 = Trainer::new(
        &vm,
        TrainConfig {
            steps: 20,
            progress: false,
            ..Default::default()
        },
    )
    .unwrap();
    tr2.load_state(dir.path()).unwrap();
    assert_eq!(tr2.state.step, 4);
}

#[test]
fn user_journey_train_save_kill_resume_generate_evaluate_reload() {
    let works = shakespeare::load(&data::data_dir().join("shakespeare.txt.gz")).unwrap();
    let text: String = works[0].text.chars().take(30_000).collect();
    let tok = tokenizer::train_bpe(std::iter::once(text.as_str()), 300).unwrap();
    let ids = tokenizer::encode(&tok, &text).unwrap();
    let (train, valid) = ids.split_at(ids.len() * 9 / 10);
    let cfg = tiny(300);
    let dir = tempfile::tempdir().unwrap();
    let tj = tokenizer::to_json(&tok).unwrap();
    let tcfg = TrainConfig {
        steps: 8,
        lr: 3e-3,
        warmup_steps: 1,
        checkpoint_every: 4,
        progress: false,
        seed: 5,
        ..Default::default()
    };
    let dev = Device::Cpu;

    // Session 1: train, checkpoint at step 4, then "killed" at step 6 (the closure fails).
    {
        let vm = VarMap::new();
        let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        candle_moe::train::init::reseed_varmap(&vm, 1).unwrap();
        let mut tr = Trainer::new(&vm, tcfg.clone()).unwrap();
        let res = tr.run(
            |rng| {
                Ok(lm::batch(train, 4, 16, rng, &dev)
                    .and_then(|(x, y)| lm::loss_parts(&m, &x, &y, true))?)
            },
            || Ok(0.0),
            |t| {
                checkpoint::save(dir.path(), &cfg, &vm, Some(&tj))?;
                t.save_state(dir.path())?;
                if t.state.step >= 4 {
                    return Err(candle_moe::Error::Config(
                        "simulated kill after the checkpoint".into(),
                    ));
                }
                Ok(())
            },
        );
        assert!(res.unwrap_err().to_string().contains("simulated kill"));
    }
    // Session 2: resume from the directory and finish.
    let (m, vm) = CausalLm::load(dir.path(), DType::F32, &dev).unwrap();
    let mut tr = Trainer::new(&vm, tcfg).unwrap();
    tr.load_state(dir.path()).unwrap();
    assert_eq!(tr.state.step, 4);
    tr.run(
        |rng| {
            Ok(lm::batch(train, 4, 16, rng, &dev)
                .and_then(|(x, y)| lm::loss_parts(&m, &x, &y, true))?)
        },
        || Ok(lm::evaluate(&m, valid, 16, 4, 8, &dev)?.nll),
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(tr.state.step, 8);
    checkpoint::save(dir.path(), &cfg, &vm, Some(&tj)).unwrap();
    // Generate and evaluate.
    let tok2 = tokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
    let prompt = tokenizer::encode(&tok2, "ROMEO:").unwrap();
    let gen = m
        .generate(
            &prompt,
            &SamplingConfig {
                temperature: 0.8,
                top_k: Some(20),
                seed: 3,
                max_new_tokens: 10,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(gen.len(), 10);
    let ev = lm::evaluate(&m, valid, 16, 4, 8, &dev).unwrap();
    assert!(
        ev.nll.is_finite() && ev.nll < (300f64).ln() + 1.0,
        "nll {}",
        ev.nll
    );
    // A fresh process loads the directory and samples from it.
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/language_model");
    let out = std::process::Command::new(exe)
        .args([
            "--generate",
            "ROMEO:",
            "--out",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("ROMEO:") && s.len() > "ROMEO:".len() + 5,
        "{s}"
    );
}
