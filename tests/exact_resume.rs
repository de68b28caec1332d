//! Exact resume with every random stream on: dropout 0.1, noisy top-k gating and router jitter.
//! A run stopped at step N, checkpointed and resumed in a fresh model and trainer equals the
//! uninterrupted run bit for bit at step 2N, when the loop reseeds the model's generators from
//! the step's generator (`CausalLm::reseed`); without the reseed it does not.

use candle_core::{DType, Device, Tensor};
use candle_moe::io::model_dir::{model_files, CONFIG};
use candle_moe::io::safetensors::varmap_tensors;
use candle_moe::losses::cross_entropy;
use candle_moe::train::{checkpoint, init::reseed_varmap, LossParts};
use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;

const N: usize = 4;
const VOCAB: usize = 32;

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::tiny(VOCAB);
    (c.hidden_size, c.moe.hidden_size, c.moe.intermediate_size) = (16, 16, 16);
    c.dense_intermediate_size = 16;
    c.hidden_dropout = 0.1;
    c.moe.noisy_gating = true;
    c.moe.router_jitter_noise = 0.05;
    c
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        steps: 2 * N,
        lr: 1e-2,
        warmup_steps: 1,
        seed: 5,
        progress: false,
        ..Default::default()
    }
}

/// Trains until `until` steps; `reseed` makes the model's noise a function of the step.
fn train(model: &CausalLm, trainer: &mut Trainer, until: usize, reseed: bool) {
    while trainer.state.step < until {
        let mut rng = trainer.step_rng();
        if reseed {
            model.reseed(rng.random());
        }
        let ids: Vec<u32> = (0..2 * 9)
            .map(|_| rng.random_range(0..VOCAB as u32))
            .collect();
        let ids = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
        let (inp, tgt) = (
            ids.narrow(1, 0, 8).unwrap(),
            ids.narrow(1, 1, 8).unwrap().flatten_all().unwrap(),
        );
        let out = model.forward_t(&inp, None, true).unwrap();
        let parts = LossParts::from_output(
            cross_entropy(&out.logits.reshape((16, VOCAB)).unwrap(), &tgt, None).unwrap(),
            &out,
        );
        trainer.step(&parts).unwrap();
    }
}

fn fresh() -> (CausalLm, VarMap, Trainer) {
    let c = cfg();
    let vm = VarMap::new();
    let model = CausalLm::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed_varmap(&vm, 1).unwrap();
    let trainer = Trainer::for_model(&vm, train_cfg(), &c.moe).unwrap();
    (model, vm, trainer)
}

fn weights(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = varmap_tensors(vm)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Runs N steps, checkpoints, resumes in a fresh model and trainer, runs to 2N.
fn resumed(reseed: bool) -> (Vec<(String, Vec<f32>)>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let (model, vm, mut trainer) = fresh();
    train(&model, &mut trainer, N, reseed);
    let files = model_files(&cfg(), &varmap_tensors(&vm).unwrap(), None, dir.path()).unwrap();
    checkpoint::save(dir.path(), files, &trainer).unwrap();
    drop((model, vm, trainer));
    assert!(dir.path().join(CONFIG).exists());
    let (model, vm) = CausalLm::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut trainer = Trainer::for_model(&vm, train_cfg(), &cfg().moe).unwrap();
    checkpoint::resume(&mut trainer, dir.path()).unwrap();
    assert_eq!(trainer.state.step, N);
    train(&model, &mut trainer, 2 * N, reseed);
    let losses = trainer.state.history.iter().map(|s| s.loss).collect();
    (weights(&vm), losses)
}

#[test]
fn resume_is_bit_exact_with_dropout_noise_and_jitter() {
    let (model, vm, mut trainer) = fresh();
    train(&model, &mut trainer, 2 * N, true);
    let straight = weights(&vm);
    let straight_losses: Vec<f64> = trainer.state.history.iter().map(|s| s.loss).collect();
    let (w, losses) = resumed(true);
    assert_eq!(losses, straight_losses, "losses of steps 0..2N");
    assert_eq!(w, straight, "weights at step 2N");
    // The test can see a difference: without reseeding, the resumed run's noise restarts from
    // the generators' initial state and the runs part.
    let (w, _) = resumed(false);
    let (model, vm, mut trainer) = fresh();
    train(&model, &mut trainer, 2 * N, false);
    assert_ne!(
        w,
        weights(&vm),
        "without reseeding, the resumed run should differ"
    );
}

/// A checkpoint set with one file from an older step (a crash between writes, a hand copy) is
/// detected: `verify` names the file and `resume` refuses it, for the model weights and for each
/// file of the trainer's state.
#[test]
fn a_file_from_an_older_checkpoint_is_detected() {
    let (model, vm, mut trainer) = fresh();
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let save = |dir: &std::path::Path, trainer: &Trainer| {
        let files = model_files(&cfg(), &varmap_tensors(&vm).unwrap(), None, dir).unwrap();
        checkpoint::save(dir, files, trainer).unwrap();
    };
    train(&model, &mut trainer, 1, true);
    save(old.path(), &trainer);
    train(&model, &mut trainer, 2, true);
    save(new.path(), &trainer);
    assert_eq!(checkpoint::verify(new.path()).unwrap().unwrap().step, 2);
    let names: Vec<String> = checkpoint::verify(new.path())
        .unwrap()
        .unwrap()
        .files
        .keys()
        .filter(|n| n.ends_with(".safetensors") || n.ends_with("trainer_state.json"))
        .cloned()
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    for name in names {
        let mixed = tempfile::tempdir().unwrap();
        for entry in walk(new.path()) {
            let rel = entry.strip_prefix(new.path()).unwrap();
            let dst = mixed.path().join(rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            let src = if rel.to_str() == Some(name.as_str()) {
                old.path().join(rel)
            } else {
                entry.clone()
            };
            std::fs::copy(src, dst).unwrap();
        }
        let err = checkpoint::verify(mixed.path()).unwrap_err().to_string();
        assert!(err.contains(&name), "{name}: {err}");
        let mut t = Trainer::for_model(&vm, train_cfg(), &cfg().moe).unwrap();
        assert!(checkpoint::resume(&mut t, mixed.path()).is_err(), "{name}");
        assert_eq!(
            t.state.step, 0,
            "{name}: a refused resume changed the trainer"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
