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

use crate::files::{check_regular, read_json_text};

/// Checks that a file name taken from an index or a config is a plain file name: not empty, no
/// `/` or `\`, not `.` or `..`, not absolute, no NUL or other control character. The error
/// (corrupt checkpoint) names `source` (the index) and the entry; nothing is opened.
pub(crate) fn check_file_name(name: &str, source: &Path) -> Result<()> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is a directory reference")
    } else if Path::new(name).is_absolute()
        || name.starts_with('/')
        || name.starts_with('\\')
        || name.as_bytes().get(1) == Some(&b':')
    {
        Some("is an absolute path")
    } else if name.contains('/') || name.contains('\\') {
        Some("contains a path separator")
    } else if name.chars().any(|c| c == '\0' || c.is_control()) {
        Some("contains a NUL or control character")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::checkpoint(
            source,
            format!("file name {name:?} listed there {why}: only plain file names inside the checkpoint directory are allowed"),
        )),
    }
}

/// The directory a checkpoint's files must resolve into: `dir` itself, or, when `dir` is a
/// snapshot of the hf-hub cache (`models--org--name/snapshots/<rev>`), the repository's cache
/// folder (snapshot files are links into its `blobs/`).
pub(crate) fn containment_root(dir: &Path) -> PathBuf {
    let snapshot = dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"));
    match snapshot.and_then(|s| s.parent()) {
        Some(repo)
            if repo
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("models--")) =>
        {
            repo.to_path_buf()
        }
        _ => dir.to_path_buf(),
    }
}

/// Checks that `path` (a file of the checkpoint) resolves, links followed, inside `root`, and is
/// a regular file; `source` is the file that named it (the index, or `path` itself). The error
/// never says anything about the target (its size or contents).
pub(crate) fn check_contained(path: &Path, root: &Path, source: &Path) -> Result<()> {
    let root_c = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    if !real.starts_with(&root_c) {
        return Err(Error::checkpoint(
            source,
            format!(
                "`{}` resolves outside the checkpoint directory {} (a link out of it): refused",
                path.display(),
                root.display()
            ),
        ));
    }
    check_regular(path, "a checkpoint file").map(|_| ())
}

fn resolve_local(dir: &Path) -> Result<Resolved> {
    let root = containment_root(dir);
    let config = dir.join("config.json");
    if !config.exists() {
        return Err(Error::io(
            &config,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json"),
        ));
    }
    check_contained(&config, &root, &config)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.exists() {
        check_contained(&single, &root, &single)?;
        vec![single]
    } else if index.exists() {
        check_contained(&index, &root, &index)?;
        shards_from_index(&index)?
            .into_iter()
            .map(|f| {
                // The name was checked by `shards_from_index`; the path is checked again here,
                // links followed, before anything reads it.
                let p = dir.join(&f);
                if p.exists() {
                    check_contained(&p, &root, &index)?;
                    Ok(p)
                } else if p.symlink_metadata().is_ok() {
                    Err(Error::checkpoint(
                        &index,
                        format!("shard `{f}` listed in the index is a dangling link"),
                    ))
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
    let tokenizer = if tok.exists() {
        check_contained(&tok, &root, &tok)?;
        Some(tok)
    } else {
        None
    };
    Ok(Resolved {
        config,
        weights,
        tokenizer,
    })
}

/// The shard file names of a `model.safetensors.index.json`, sorted and deduplicated. Every
/// name must be a plain file name (no directories, no `..`, not absolute); the index is read
/// only when it is a regular file of at most 64 MiB.
pub fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    let text = read_json_text(index, "the safetensors index")?;
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
        check_file_name(f, index)?;
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

/// Checks a hub revision before it goes into a URL or a cache path: a branch, tag or commit
/// name, without `..` components, backslashes, control characters or a leading `/`.
#[cfg(feature = "hub")]
fn check_revision(id: &str, rev: &str) -> Result<()> {
    let bad = rev.is_empty()
        || rev.starts_with('/')
        || rev.contains('\\')
        || rev.chars().any(|c| c.is_control())
        || rev
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Error::Hub(format!(
            "`{id}`: revision {rev:?} is not a branch, tag or commit name"
        )));
    }
    Ok(())
}

#[cfg(feature = "hub")]
fn resolve_hub(id: &str, opts: &LoadOptions) -> Result<Resolved> {
    use hf_hub::{Repo, RepoType};
    let rev = opts.revision.clone().unwrap_or_else(|| "main".to_string());
    check_revision(id, &rev)?;
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
    // Every file must resolve inside this repository's cache folder (snapshot files are links
    // into its `blobs/`).
    let root = containment_root(config.parent().unwrap_or_else(|| Path::new(".")));
    check_contained(&config, &root, &config)?;
    let weights = match fetch("model.safetensors")? {
        Some(p) => {
            check_contained(&p, &root, &p)?;
            vec![p]
        }
        None => {
            let index = fetch("model.safetensors.index.json")?.ok_or_else(|| {
                Error::Hub(format!("`{id}`: neither model.safetensors nor model.safetensors.index.json in {where_}"))
            })?;
            check_contained(&index, &root, &index)?;
            // The names are checked (plain file names) before any goes into a URL or a path.
            shards_from_index(&index)?
                .into_iter()
                .map(|f| {
                    let p = fetch(&f)?.ok_or_else(|| {
                        Error::Hub(format!("`{id}`: missing shard `{f}` in {where_}"))
                    })?;
                    check_contained(&p, &root, &index)?;
                    Ok(p)
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    let tokenizer = match fetch("tokenizer.json").ok().flatten() {
        Some(p) => {
            check_contained(&p, &root, &p)?;
            Some(p)
        }
        None => None,
    };
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
