//! Model directories: `config.json` (the crate's [`ModelConfig`]), `model.safetensors`, and
//! `tokenizer.json` when there is one; training state beside them (`optimizer.safetensors`,
//! `trainer_state.json`).
//!
//! The directory is written as a whole (a fresh temporary directory, fsynced, swapped in), so an
//! interrupted save never leaves a broken or mixed checkpoint. Loading checks every tensor's
//! presence, shape and dtype against the model built from the config before reading it, and
//! names the offending tensor and file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::atomic::write_dir_atomic;
use crate::io::hub::LoadOptions;
use crate::io::safetensors::{
    build_error, check_unused, to_safetensors_bytes, var_builder, varmap_tensors,
};

/// File name of the weights inside a model directory.
pub const WEIGHTS: &str = "model.safetensors";
/// File name of the config inside a model directory.
pub const CONFIG: &str = "config.json";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER: &str = "tokenizer.json";

/// The files of a model directory in the crate's layout: `config.json` (the crate's
/// [`ModelConfig`]), `model.safetensors` and, when given, `tokenizer.json`.
pub fn model_files(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer_json: Option<&str>,
    dir: &Path,
) -> Result<Vec<(String, Vec<u8>)>> {
    cfg.validate()?;
    let mut files = vec![(
        WEIGHTS.to_string(),
        to_safetensors_bytes(tensors, &dir.join(WEIGHTS))?,
    )];
    let json = serde_json::to_vec_pretty(cfg).map_err(|source| Error::Json {
        path: dir.join(CONFIG),
        source,
    })?;
    files.push((CONFIG.to_string(), json));
    if let Some(t) = tokenizer_json {
        files.push((TOKENIZER.to_string(), t.as_bytes().to_vec()));
    }
    Ok(files)
}

/// Saves a model directory in the crate's layout ([`model_files`]), replacing `dir` as a
/// whole: after a failure or a kill it holds the old checkpoint or the new one, never a mix.
/// (A [`CausalLm`](crate::CausalLm) whose configuration transformers can express is better
/// saved with `save_pretrained`, which transformers also reads.)
///
/// A round trip through [`CausalLm::load`](crate::CausalLm::load):
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_moe::io::model_dir;
/// use candle_moe::{CausalLm, ModelConfig};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_moe::Result<()> {
/// let dev = Device::Cpu;
/// let mut cfg = ModelConfig::tiny(32);
/// (cfg.hidden_size, cfg.moe.hidden_size, cfg.num_layers) = (16, 16, 1);
/// (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
/// let varmap = VarMap::new();
/// let model = CausalLm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
///
/// let dir = std::env::temp_dir().join(format!("candle_moe_doc_save_{}", std::process::id()));
/// model_dir::save(&dir, &cfg, &varmap, None)?;
/// let (loaded, _varmap) = CausalLm::load(&dir, DType::F32, &dev)?;
/// assert_eq!(loaded.config(), &cfg);
///
/// let ids = Tensor::new(&[[1u32, 2, 3]], &dev)?;
/// let before = model.forward(&ids)?.logits.to_vec3::<f32>()?;
/// let after = loaded.forward(&ids)?.logits.to_vec3::<f32>()?;
/// assert_eq!(before, after);
/// std::fs::remove_dir_all(&dir).map_err(|e| candle_moe::Error::io(&dir, e))?;
/// # Ok(())
/// # }
/// ```
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    varmap: &VarMap,
    tokenizer_json: Option<&str>,
) -> Result<()> {
    let files = model_files(cfg, &varmap_tensors(varmap)?, tokenizer_json, dir)?;
    write_dir_atomic(dir, &files, None)
}

/// Builds a model from `dir/config.json` with `build` over the checked weights of
/// `dir/model.safetensors` as trainable variables: every tensor's shape is checked against the
/// file's header before anything is read or allocated, nothing is randomly initialised, and a
/// tensor the model does not use is an error. Returns the model, its `VarMap` and the config.
pub fn load_with<M>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(&ModelConfig, candle_nn::VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, VarMap, ModelConfig)> {
    let cfg = ModelConfig::from_file(dir.join(CONFIG))?;
    let weights: PathBuf = dir.join(WEIGHTS);
    let varmap = VarMap::new();
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        revision: None,
        trainable: true,
    };
    let (vb, log, names) =
        var_builder(std::slice::from_ref(&weights), &opts, Some(varmap.clone()))?;
    let model = build(&cfg, vb).map_err(|e| build_error(&log, e, &weights))?;
    check_unused(&log, &names, &weights)?;
    Ok((model, varmap, cfg))
}

/// Reads `dir/tokenizer.json` if present.
pub fn read_tokenizer_json(dir: &Path) -> Result<Option<String>> {
    let p = dir.join(TOKENIZER);
    if !p.exists() {
        return Ok(None);
    }
    crate::files::read_json_text(&p, "tokenizer.json").map(Some)
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
                let (m, vm, _) = load_with(dir.as_ref(), dtype, device, |c, vb| {
                    <$ty>::new_validated(c, vb)
                })?;
                Ok((m, vm))
            }
        }
    };
}

impl crate::models::CausalLm {
    /// Loads a model directory for further training: the Hugging Face layout written by
    /// `save_pretrained` (any supported family) or the crate's layout written by [`save`];
    /// every tensor checked. Returns the model and its `VarMap`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<(Self, VarMap)> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG);
        let v = crate::io::hf::read_json(&cfg_path)?;
        if v.get("model_type").is_some() {
            let opts = LoadOptions {
                dtype,
                device: device.clone(),
                revision: None,
                trainable: true,
            };
            let m = Self::from_pretrained(&dir.to_string_lossy(), &opts)?;
            let vm = m
                .varmap()
                .cloned()
                .ok_or_else(|| Error::checkpoint(&cfg_path, "trainable load without variables"))?;
            return Ok((m, vm));
        }
        let (m, vm, _) = load_with(dir, dtype, device, |c, vb| Self::new_validated(c, vb))?;
        Ok((m, vm))
    }
}

impl_dir_io!(crate::models::Seq2Seq);
impl_dir_io!(crate::models::SequenceClassifier);
