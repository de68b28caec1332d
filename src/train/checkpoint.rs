//! Training checkpoints written as one consistent set: the model directory (the Hugging Face
//! layout for a [`CausalLm`](crate::CausalLm) transformers can express, else the crate's
//! layout) plus the trainer's state under `trainer/` (`optimizer.safetensors`,
//! `trainer_state.json`) and a manifest, `checkpoint.json`, naming the step and the SHA-256 of
//! every file. The directory is replaced as a whole, so after a failure or a kill at any point it
//! holds the previous checkpoint or the new one; [`verify`] refuses a directory whose files do
//! not match their manifest (a file from another step, a truncated file), and resume checks that
//! the trainer state is the manifest's step.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Trainer;
use crate::error::{Error, Result};
use crate::io::atomic::write_dir_atomic;
use crate::io::safetensors::to_safetensors_bytes;

/// The manifest's file name.
pub const MANIFEST: &str = "checkpoint.json";
/// The sub-directory of the trainer's state.
pub const TRAINER_DIR: &str = "trainer";

/// What `checkpoint.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Optimizer steps taken when the checkpoint was written.
    pub step: usize,
    /// SHA-256 (hex) of every file of the checkpoint, by relative path.
    pub files: BTreeMap<String, String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The trainer's state files, `(relative path, bytes)`.
pub fn trainer_files(trainer: &Trainer, dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    trainer_files_from(trainer, &trainer.optimizer().state_tensors(), dir)
}

/// [`trainer_files`] with the optimizer moments given.
fn trainer_files_from(
    trainer: &Trainer,
    moments: &std::collections::HashMap<String, candle_core::Tensor>,
    dir: &Path,
) -> Result<Vec<(String, Vec<u8>)>> {
    let opt = format!("{TRAINER_DIR}/optimizer.safetensors");
    let state = format!("{TRAINER_DIR}/trainer_state.json");
    let opt_bytes = to_safetensors_bytes(moments, &dir.join(&opt))?;
    let state_bytes = serde_json::to_vec(&trainer.state).map_err(|source| Error::Json {
        path: dir.join(&state),
        source,
    })?;
    Ok(vec![(opt, opt_bytes), (state, state_bytes)])
}

/// Writes a training checkpoint: `model_files` (from `CausalLm::checkpoint_files` or
/// [`model_files`](crate::io::model_dir::model_files)), the trainer's state and the manifest,
/// as one atomic directory replacement.
///
/// Over several ranks ([`Trainer::set_comm`]) it is a collective: every rank calls it, the
/// expert-parallel optimizer moments are gathered to rank 0
/// ([`Trainer::checkpoint_state_tensors`]), rank 0 alone writes (its `model_files`, e.g. from
/// [`CausalLm::gathered`](crate::CausalLm::gathered); the other ranks' are ignored), and every
/// rank returns once the checkpoint is written (a barrier).
pub fn save(dir: &Path, model_files: Vec<(String, Vec<u8>)>, trainer: &Trainer) -> Result<()> {
    let comm = trainer.comm().clone();
    let moments = trainer.checkpoint_state_tensors()?;
    let written = match moments {
        Some(m) => write(dir, model_files, trainer, &m),
        None => Ok(()),
    };
    comm.barrier()?;
    written
}

fn write(
    dir: &Path,
    model_files: Vec<(String, Vec<u8>)>,
    trainer: &Trainer,
    moments: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let mut files = model_files;
    files.extend(trainer_files_from(trainer, moments, dir)?);
    let manifest = Manifest {
        step: trainer.state.step,
        files: files
            .iter()
            .map(|(n, b)| (n.clone(), sha256_hex(b)))
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Json {
        path: dir.join(MANIFEST),
        source,
    })?;
    files.push((MANIFEST.to_string(), bytes));
    write_dir_atomic(dir, &files, None)
}

/// Checks a checkpoint directory against its manifest (every listed file present with its
/// recorded hash); returns the manifest, or `None` for a directory without one (written before
/// manifests existed, or a plain model directory).
pub fn verify(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::files::read_json_text(&path, "the checkpoint manifest")?;
    let m: Manifest = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    for (name, hash) in &m.files {
        if name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            || name.starts_with('/')
        {
            return Err(Error::checkpoint(
                &path,
                format!("bad file name `{name}` in the manifest"),
            ));
        }
        let f = dir.join(name);
        // A regular file, read up to the size it had when checked.
        let len = crate::files::check_regular(&f, "a checkpoint file")?.len();
        let bytes = crate::files::read_capped(&f, len, "a checkpoint file")?;
        if sha256_hex(&bytes) != *hash {
            return Err(Error::checkpoint(
                &f,
                format!(
                    "does not match the checkpoint manifest of step {} (a file from another save): refusing a mixed checkpoint",
                    m.step
                ),
            ));
        }
    }
    Ok(Some(m))
}

/// Resumes `trainer` from a checkpoint directory: verifies the manifest, then loads the trainer
/// state (from `trainer/`, or from the directory itself for checkpoints written before that
/// layout) and checks that its step is the manifest's.
pub fn resume(trainer: &mut Trainer, dir: &Path) -> Result<()> {
    let manifest = verify(dir)?;
    let sub = dir.join(TRAINER_DIR);
    let state_dir = if sub.is_dir() { sub } else { dir.to_path_buf() };
    if let Some(m) = &manifest {
        let p = state_dir.join("trainer_state.json");
        let text = crate::files::read_json_text(&p, "trainer_state.json")?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: p.clone(),
            source,
        })?;
        if v.get("step").and_then(|s| s.as_u64()) != Some(m.step as u64) {
            return Err(Error::checkpoint(
                &p,
                format!("trainer state is not of the manifest's step {}", m.step),
            ));
        }
    }
    trainer.load_state(&state_dir)
}
