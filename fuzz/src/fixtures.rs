//! On-disk fixtures of the `shard_index` and `trainer_state` targets, built once per process.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_moe::io::hf::SaveOptions;
use candle_moe::losses::cross_entropy;
use candle_moe::train::{checkpoint, LossParts};
use candle_moe::{CausalLm, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};

fn temp_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle-moe-fuzz-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn tiny_model() -> (CausalLm, VarMap) {
    let vm = VarMap::new();
    let model = CausalLm::new(&crate::tiny_config(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .expect("tiny model");
    (model, vm)
}

/// A directory `<tmp>/ckpt` holding the tiny model saved by `save_pretrained` in shards of at
/// most 2 KB (`config.json`, `model-0000i-of-0000n.safetensors`, the index), and next to it,
/// outside the checkpoint, `<tmp>/outside.safetensors`: a copy of the first shard, which a
/// loader that let shard names escape the directory would read.
pub fn sharded_tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = temp_dir("shards");
        let dir = root.join("ckpt");
        let (model, _vm) = tiny_model();
        let opts = SaveOptions { max_shard_bytes: 2048, ..Default::default() };
        model.save_pretrained_with(&dir, &opts).expect("save_pretrained");
        let first = std::fs::read_dir(&dir)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .min()
            .expect("a shard");
        std::fs::copy(first, root.join("outside.safetensors")).expect("copy");
        dir
    })
}

/// The index the tiny sharded checkpoint was saved with (the `shard_index` seed).
pub fn seed_shard_index() -> Vec<u8> {
    std::fs::read(sharded_tiny_dir().join("model.safetensors.index.json")).expect("index")
}

/// A training checkpoint of the tiny model after two optimizer steps (`checkpoint`: model files,
/// `trainer/`, manifest), the same state saved by `Trainer::save_state` alone (`state_dir`), and
/// the trainer they were written from.
pub struct TrainerFixture {
    /// The checkpoint directory (`checkpoint::save`).
    pub checkpoint: PathBuf,
    /// A directory with `trainer_state.json` and `optimizer.safetensors` (`save_state`).
    pub state_dir: PathBuf,
    /// The trainer, restored to the saved state by [`TrainerFixture::reset`].
    pub trainer: Trainer,
    model: CausalLm,
    files: Vec<(PathBuf, Vec<u8>)>,
    pristine: PathBuf,
}

impl TrainerFixture {
    fn new() -> Self {
        let root = temp_dir("trainer");
        let (model, vm) = tiny_model();
        let cfg = TrainConfig { steps: 10, lr: 1e-2, warmup_steps: 2, progress: false, ..Default::default() };
        let mut trainer = Trainer::for_model(&vm, cfg, &model.config().moe).expect("trainer");
        let mut fx_model = Some(model);
        let model = fx_model.take().expect("model");
        for _ in 0..2 {
            let parts = loss(&model).expect("loss");
            trainer.step(&parts).expect("step");
        }
        let checkpoint_dir = root.join("checkpoint");
        let files = model.checkpoint_files(None, &checkpoint_dir).expect("files");
        checkpoint::save(&checkpoint_dir, files, &trainer).expect("checkpoint");
        let state_dir = root.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        trainer.save_state(&state_dir).expect("save_state");
        let pristine = root.join("pristine");
        std::fs::create_dir_all(&pristine).expect("pristine dir");
        trainer.save_state(&pristine).expect("save_state");
        let mut files = vec![];
        for d in [&checkpoint_dir, &checkpoint_dir.join("trainer"), &state_dir] {
            for e in std::fs::read_dir(d).expect("read_dir").filter_map(|e| e.ok()) {
                if e.path().is_file() {
                    files.push((e.path(), std::fs::read(e.path()).expect("read")));
                }
            }
        }
        Self { checkpoint: checkpoint_dir, state_dir, trainer, model, files, pristine }
    }

    /// Writes every fixture file back as it was saved.
    pub fn restore_files(&self) -> std::io::Result<()> {
        for (p, b) in &self.files {
            std::fs::write(p, b)?;
        }
        Ok(())
    }

    /// One optimizer step from the trainer's current state (errors are fine).
    pub fn one_step(&mut self) {
        if let Ok(parts) = loss(&self.model) {
            let _ = self.trainer.step(&parts);
        }
    }

    /// Puts the trainer back into the saved state.
    pub fn reset(&mut self) {
        self.trainer.load_state(&self.pristine).expect("the pristine state loads");
    }
}

fn loss(model: &CausalLm) -> candle_moe::Result<LossParts> {
    let ids = Tensor::arange(0u32, 8, &Device::Cpu)?.reshape((2, 4))?;
    let (inp, tgt) = (ids.narrow(1, 0, 3)?, ids.narrow(1, 1, 3)?.flatten_all()?);
    let out = model.forward_t(&inp, None, true)?;
    Ok(LossParts::from_output(cross_entropy(&out.logits.reshape((6, 16))?, &tgt, None)?, &out))
}

/// Runs `f` on the process's trainer fixture (built on first use).
pub fn with_trainer_fixture(f: impl FnOnce(&mut TrainerFixture)) {
    static FX: OnceLock<Mutex<TrainerFixture>> = OnceLock::new();
    let m = FX.get_or_init(|| Mutex::new(TrainerFixture::new()));
    let mut g = match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    f(&mut g);
}
