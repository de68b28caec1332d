//! Where a checkpoint's files are: a local directory, or a hub model id resolved through the
//! `hf-hub` crate's cache and API (which honour `HF_HOME`; with `HF_HUB_OFFLINE=1` only the
//! cache is used). Single `model.safetensors` or shards listed in `model.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use crate::error::{Error, Result};

/// How to load a pretrained checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Floating dtype of the weights in memory (f32, bf16, f16).
    pub dtype: DType,
    /// Device to load onto.
    pub device: Device,
    /// Hub revision (branch, tag or commit); `None` = `main`.
    pub revision: Option<String>,
    /// Load the weights as trainable variables (a `VarMap` the model exposes through
    /// `CausalLm::varmap`); `false` (the default) loads plain tensors for inference.
    pub trainable: bool,
}

impl Default for LoadOptions {
    /// f32 on CPU, revision `main`, frozen.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            revision: None,
            trainable: false,
        }
    }
}

/// Where a checkpoint's files are.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors files (one, or the shards in index order).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, when the checkpoint has one.
    pub tokenizer: Option<PathBuf>,
}

fn resolve_local(dir: &Path) -> Result<Resolved> {
    let config = dir.join("config.json");
    if !config.exists() {
        return Err(Error::io(
            &config,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json"),
        ));
    }
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.exists() {
        vec![single]
    } else if index.exists() {
        shards_from_index(&index)?
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if p.exists() {
                    Ok(p)
                } else {
                    Err(Error::checkpoint(
                        &index,
                        format!("missing shard `{f}` listed in the index"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        return Err(Error::checkpoint(
            dir,
            "no model.safetensors nor model.safetensors.index.json",
        ));
    };
    let tok = dir.join("tokenizer.json");
    Ok(Resolved {
        config,
        weights,
        tokenizer: tok.exists().then_some(tok),
    })
}

/// The shard file names of a `model.safetensors.index.json`, in first-appearance order.
pub fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(index, "no `weight_map` object"))?;
    let mut files: Vec<String> = vec![];
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| {
            Error::checkpoint(
                index,
                format!("weight_map entry for `{name}` is not a file name"),
            )
        })?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// Finds a checkpoint: a local directory, or a hub model id (through the hf-hub cache; offline
/// when `HF_HUB_OFFLINE` is set).
pub fn resolve(source: &str, opts: &LoadOptions) -> Result<Resolved> {
    let p = Path::new(source);
    if p.is_dir() {
        return resolve_local(p);
    }
    resolve_hub(source, opts)
}

#[cfg(feature = "hub")]
type Fetch = dyn Fn(&str) -> Result<Option<PathBuf>>;

#[cfg(feature = "hub")]
fn resolve_hub(id: &str, opts: &LoadOptions) -> Result<Resolved> {
    use hf_hub::{Repo, RepoType};
    let rev = opts.revision.clone().unwrap_or_else(|| "main".to_string());
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let fetch: Box<Fetch> = if offline {
        let cache = hf_hub::Cache::from_env().repo(repo);
        Box::new(move |f: &str| Ok(cache.get(f)))
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::Hub(format!("{id}: {e}")))?
            .repo(repo);
        Box::new(move |f: &str| match api.get(f) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(Error::Hub(format!("{f}: {e}"))),
        })
    };
    let where_ = if offline {
        "the hf-hub cache (HF_HUB_OFFLINE is set)"
    } else {
        "the hub"
    };
    let config = fetch("config.json")?.ok_or_else(|| {
        Error::Hub(format!(
            "`{id}` (revision {rev}): config.json not found in {where_}"
        ))
    })?;
    let weights = match fetch("model.safetensors")? {
        Some(p) => vec![p],
        None => {
            let index = fetch("model.safetensors.index.json")?.ok_or_else(|| {
                Error::Hub(format!("`{id}`: neither model.safetensors nor model.safetensors.index.json in {where_}"))
            })?;
            shards_from_index(&index)?
                .into_iter()
                .map(|f| {
                    fetch(&f)?.ok_or_else(|| {
                        Error::Hub(format!("`{id}`: missing shard `{f}` in {where_}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    let tokenizer = fetch("tokenizer.json").ok().flatten();
    Ok(Resolved {
        config,
        weights,
        tokenizer,
    })
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(id: &str, _opts: &LoadOptions) -> Result<Resolved> {
    Err(Error::Hub(format!(
        "`{id}` is not a local directory and this build has no `hub` feature"
    )))
}
