//! Model directories: `config.json` (the crate's [`ModelConfig`]), `model.safetensors`, and
//! `tokenizer.json` when there is one; training state beside them (`optimizer.safetensors`,
//! `trainer_state.json`).
//!
//! Every file is written to a temporary name in the same directory, synced, and renamed over
//! the old one, so an interrupted save never leaves a broken checkpoint. Loading checks every
//! tensor's presence, shape and dtype against the model built from the config, and names the
//! offending tensor and file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// File name of the weights inside a model directory.
pub const WEIGHTS: &str = "model.safetensors";
/// File name of the config inside a model directory.
pub const CONFIG: &str = "config.json";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER: &str = "tokenizer.json";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Serialises named tensors to safetensors bytes (sorted by name).
pub fn to_safetensors_bytes(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(&String, &Tensor)> = names.into_iter().map(|n| (n, &tensors[n])).collect();
    safetensors::serialize(data, None)
        .map_err(|e| Error::checkpoint(path, format!("serialising: {e}")))
}

/// The variables of a `VarMap` as a name -> tensor map.
pub fn varmap_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = lock(varmap)?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

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

/// Locks a `VarMap`'s variables.
pub fn lock(
    varmap: &VarMap,
) -> Result<std::sync::MutexGuard<'_, HashMap<String, candle_core::Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("varmap lock poisoned".into()))
}

/// Sets `var` from `t` after checking the shape; the error names `what` (the tensor) and `path`.
pub fn set_checked(var: &candle_core::Var, t: &Tensor, what: &str, path: &Path) -> Result<()> {
    if t.dims() != var.dims() {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor `{what}` has shape {:?}, expected {:?} from the config",
                t.dims(),
                var.dims()
            ),
        ));
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// Reads a whole file, naming it on error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

/// Parses safetensors bytes into tensors on `device`, converting floats to `dtype`, with errors
/// naming `path` and the tensor. Non-float tensors are kept as they are.
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dt = st_dtype(view.dtype()).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu)
            .map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))?;
        let t = if dt.is_float() { t.to_dtype(dtype)? } else { t };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// Fills every variable of `varmap` from `tensors` (read from `path`), checking presence,
/// shape and float dtype; unexpected extra tensors are an error too (the config disagrees with
/// the weights).
pub fn fill_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let data = lock(varmap)?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = tensors.get(name).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("missing tensor `{name}` (expected shape {:?})", var.dims()),
            )
        })?;
        if !t.dtype().is_float() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}, expected a float dtype",
                    t.dtype()
                ),
            ));
        }
        set_checked(var, t, name, path)?;
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
    extra.sort();
    if let Some(x) = extra.first() {
        return Err(Error::checkpoint(
            path,
            format!(
                "unexpected tensor `{x}` ({} unexpected in all): the config does not match the weights",
                extra.len()
            ),
        ));
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
            /// Loads a model directory written by [`checkpoint::save`](crate::checkpoint::save),
            /// checking every tensor; returns the model and its `VarMap`.
            pub fn load(
                dir: impl AsRef<Path>,
                dtype: DType,
                device: &Device,
            ) -> Result<(Self, VarMap)> {
                let (m, vm, _) = load_with(dir.as_ref(), dtype, device, |c, vb| <$ty>::new(c, vb))?;
                Ok((m, vm))
            }
        }
    };
}

impl_dir_io!(crate::models::CausalLm);
impl_dir_io!(crate::models::Seq2Seq);
impl_dir_io!(crate::models::SequenceClassifier);
