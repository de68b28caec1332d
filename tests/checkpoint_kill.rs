//! Checkpoints survive kills: a child process trains a tiny model, resuming from its checkpoint
//! directory when there is one and writing a checkpoint after every step, and is killed
//! (SIGKILL) at random points. After every kill the directory verifies against its manifest,
//! loads, and holds exactly the weights, optimizer step and history of one step of an
//! uninterrupted run (never a mix of two), so resuming across kills is exact.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_moe::train::checkpoint;
use candle_moe::train::init::reseed_varmap;
use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::tiny(32);
    c.hidden_size = 16;
    c.moe.hidden_size = 16;
    c.moe.intermediate_size = 16;
    c.num_layers = 1;
    c.max_position_embeddings = 16;
    c
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        steps: 100_000,
        warmup_steps: 0,
        progress: false,
        seed: 5,
        ..Default::default()
    }
}

/// One training step on a batch drawn from the step's generator.
fn step(model: &CausalLm, trainer: &mut Trainer) {
    let mut rng = trainer.step_rng();
    let ids: Vec<u32> = (0..2 * 9).map(|_| rng.random_range(0..32u32)).collect();
    let t = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
    let (x, y) = (t.narrow(1, 0, 8).unwrap(), t.narrow(1, 1, 8).unwrap());
    let y = y.flatten_all().unwrap();
    let parts = candle_moe::tasks::language_model::loss_parts(model, &x, &y, true).unwrap();
    trainer.step(&parts).unwrap();
}

fn fresh() -> (CausalLm, VarMap) {
    let vm = VarMap::new();
    let m = CausalLm::new(
        &cfg(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    reseed_varmap(&vm, 11).unwrap();
    (m, vm)
}

fn weights(m: &CausalLm) -> Vec<u32> {
    let mut names: Vec<&(String, Tensor)> = m.parameters().iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names
        .iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(f32::to_bits)
        .collect()
}

/// The child: resume or start, then step and checkpoint forever.
#[test]
#[ignore]
fn kill_child() {
    let Some(dir) = std::env::var_os("CANDLE_MOE_KILL_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let (model, vm, mut trainer) = if dir.join("config.json").exists() {
        let (m, vm) = CausalLm::load(dir, DType::F32, &Device::Cpu).unwrap();
        let mut t = Trainer::new(&vm, train_cfg()).unwrap();
        checkpoint::resume(&mut t, dir).unwrap();
        (m, vm, t)
    } else {
        let (m, vm) = fresh();
        let t = Trainer::new(&vm, train_cfg()).unwrap();
        (m, vm, t)
    };
    let _ = &vm;
    loop {
        step(&model, &mut trainer);
        let files = model.checkpoint_files(None, dir).unwrap();
        checkpoint::save(dir, files, &trainer).unwrap();
    }
}

#[test]
fn checkpoints_survive_random_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let exe = std::env::current_exe().unwrap();
    // The uninterrupted run, extended as far as the checkpoints get.
    let (ref_model, ref_vm) = fresh();
    let mut ref_trainer = Trainer::new(&ref_vm, train_cfg()).unwrap();
    let mut reference = vec![weights(&ref_model)];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let start = Instant::now();
    let (mut kills, mut seen_steps) = (0, vec![]);
    while kills < 60 && start.elapsed() < Duration::from_secs(150) {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill_child", "--ignored", "--nocapture"])
            .env("CANDLE_MOE_KILL_DIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(20..150)));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if !dir.join("config.json").exists() {
            continue; // killed before its first checkpoint
        }
        let manifest = checkpoint::verify(&dir)
            .unwrap_or_else(|e| panic!("kill {kills}: {e}"))
            .expect("a manifest");
        let (m, vm) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let mut t = Trainer::new(&vm, train_cfg()).unwrap();
        checkpoint::resume(&mut t, &dir).unwrap();
        let s = manifest.step;
        assert_eq!(t.state.step, s);
        assert_eq!(t.state.history.len(), s, "history of step {s}");
        while reference.len() <= s {
            step(&ref_model, &mut ref_trainer);
            reference.push(weights(&ref_model));
        }
        assert!(
            weights(&m) == reference[s],
            "kill {kills}: the checkpoint of step {s} is not the uninterrupted run's step {s}"
        );
        seen_steps.push(s);
        // At most the killed child's own temporary is left; the next save removes it.
        let leftovers = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "ckpt")
            .count();
        assert!(leftovers <= 1, "kill {kills}: {leftovers} temporaries left");
    }
    eprintln!(
        "{kills} kills in {:.1} s; checkpoints seen at {} distinct steps, last {:?}",
        start.elapsed().as_secs_f64(),
        {
            let mut v = seen_steps.clone();
            v.dedup();
            v.len()
        },
        seen_steps.last()
    );
    assert!(kills >= 50, "only {kills} kills in the time bound");
    let distinct = {
        let mut v = seen_steps.clone();
        v.dedup();
        v.len()
    };
    assert!(
        distinct >= 10,
        "checkpoints advanced through only {distinct} steps: {seen_steps:?}"
    );
}
