//! Model directories: `config.json` (the crate's [`ModelConfig`]), `model.safetensors`, and
//! `tokenizer.json` when there is one; training state beside them (`optimizer.safetensors`,
//! `trainer_state.json`).
//!
//! Every file is written to a temporary name in the same directory, synced, and renamed over
//! the old one, so an interrupted save never leaves a broken checkpoint. Loading checks every
//! tensor's presence, shape and dtype against the model built from the config, and names the
//! offending tensor and file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::{
    fill_varmap, parse_safetensors, read_file, to_safetensors_bytes, varmap_tensors, write_atomic,
};

/// File name of the weights inside a model directory.
pub const WEIGHTS: &str = "model.safetensors";
/// File name of the config inside a model directory.
pub const CONFIG: &str = "config.json";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER: &str = "tokenizer.json";

/// Saves a model directory: `config.json`, `model.safetensors` and, when given, `tokenizer.json`.
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    varmap: &VarMap,
    tokenizer_json: Option<&str>,
) -> Result<()> {
    cfg.validate()?;
    let weights = dir.join(WEIGHTS);
    let bytes = to_safetensors_bytes(&varmap_tensors(varmap)?, &weights)?;
    write_atomic(&weights, &bytes)?;
    let json = serde_json::to_string_pretty(cfg).map_err(|source| Error::Json {
        path: dir.join(CONFIG),
        source,
    })?;
    write_atomic(&dir.join(CONFIG), json.as_bytes())?;
    if let Some(t) = tokenizer_json {
        write_atomic(&dir.join(TOKENIZER), t.as_bytes())?;
    }
    Ok(())
}

/// Builds a model from `dir/config.json` with `build`, then loads `dir/model.safetensors` into
/// it with every tensor checked. Returns the model, its `VarMap` (for further training) and the
/// config.
pub fn load_with<M>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(&ModelConfig, candle_nn::VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, VarMap, ModelConfig)> {
    let cfg = ModelConfig::from_file(dir.join(CONFIG))?;
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, device);
    let model = build(&cfg, vb)?;
    let weights: PathBuf = dir.join(WEIGHTS);
    let bytes = read_file(&weights)?;
    let tensors = parse_safetensors(&bytes, &weights, dtype, device)?;
    fill_varmap(&varmap, &tensors, &weights)?;
    Ok((model, varmap, cfg))
}

/// Reads `dir/tokenizer.json` if present.
pub fn read_tokenizer_json(dir: &Path) -> Result<Option<String>> {
    let p = dir.join(TOKENIZER);
    if !p.exists() {
        return Ok(None);
    }
    std::fs::read_to_string(&p)
        .map(Some)
        .map_err(|e| Error::io(p, e))
}

macro_rules! impl_dir_io {
    ($ty:ty) => {
        impl $ty {
            /// Loads a model directory written by [`model_dir::save`](crate::io::model_dir::save),
            /// checking every tensor; returns the model and its `VarMap`.
            pub fn load(
                dir: impl AsRef<Path>,
                dtype: DType,
                device: &Device,
            ) -> Result<(Self, VarMap)> {
                let (m, vm, _) = load_with(dir.as_ref(), dtype, device, |c, vb| <$ty>::new_validated(c, vb))?;
                Ok((m, vm))
            }
        }
    };
}

impl_dir_io!(crate::models::CausalLm);
impl_dir_io!(crate::models::Seq2Seq);
impl_dir_io!(crate::models::SequenceClassifier);
