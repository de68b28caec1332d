//! Hugging Face checkpoints: Mixtral, Qwen2-MoE and OLMoE `config.json` + safetensors (single
//! file or sharded with `model.safetensors.index.json`), from a local folder or a hub id through
//! the `hf-hub` crate (which honours `HF_HOME`; with `HF_HUB_OFFLINE=1` only the cache is used).
//!
//! Their weight names are mapped onto the crate's Mixtral-named modules
//! (`mlp.` ↔ `block_sparse_moe.`, `gate_proj/up_proj/down_proj` ↔ `w1/w3/w2`), every tensor's
//! presence, shape and dtype is checked against the config before it is used, and errors name
//! the file and the tensor.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::config::{ExpertKind, ModelConfig, MoeConfig, NormKind, PositionKind};
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
}

impl Default for LoadOptions {
    /// f32 on CPU, revision `main`.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            revision: None,
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

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    let x = field(v, key)
        .ok_or_else(|| Error::Config(format!("{}: missing `{key}`", path.display())))?;
    x.as_u64().map(|u| u as usize).ok_or_else(|| {
        Error::Config(format!(
            "{}: `{key}` must be a non-negative integer, got {x}",
            path.display()
        ))
    })
}

fn opt_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match field(v, key) {
        None => Ok(None),
        Some(_) => usize_field(v, key, path).map(Some),
    }
}

fn f64_field(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| {
            Error::Config(format!(
                "{}: `{key}` must be a number, got {x}",
                path.display()
            ))
        }),
    }
}

fn bool_field(v: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x.as_bool().ok_or_else(|| {
            Error::Config(format!(
                "{}: `{key}` must be true or false, got {x}",
                path.display()
            ))
        }),
    }
}

/// The Hugging Face model families this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type: "mixtral"`.
    Mixtral,
    /// `model_type: "qwen2_moe"`.
    Qwen2Moe,
    /// `model_type: "olmoe"`.
    Olmoe,
}

/// Maps a Hugging Face `config.json` (already parsed) onto a [`ModelConfig`].
pub fn config_from_hf(v: &Value, path: &Path) -> Result<(Family, ModelConfig)> {
    let mt = field(v, "model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| Error::Config(format!("{}: missing `model_type`", path.display())))?;
    let family = match mt {
        "mixtral" => Family::Mixtral,
        "qwen2_moe" => Family::Qwen2Moe,
        "olmoe" => Family::Olmoe,
        other => {
            return Err(Error::Config(format!(
                "{}: unknown model_type `{other}` (supported: mixtral, qwen2_moe, olmoe)",
                path.display()
            )))
        }
    };
    let hidden = usize_field(v, "hidden_size", path)?;
    let heads = usize_field(v, "num_attention_heads", path)?;
    let (experts, expert_ffn) = match family {
        Family::Mixtral => (
            usize_field(v, "num_local_experts", path)?,
            usize_field(v, "intermediate_size", path)?,
        ),
        Family::Qwen2Moe => (
            usize_field(v, "num_experts", path)?,
            usize_field(v, "moe_intermediate_size", path)?,
        ),
        Family::Olmoe => (
            usize_field(v, "num_experts", path)?,
            usize_field(v, "intermediate_size", path)?,
        ),
    };
    if family == Family::Olmoe && field(v, "clip_qkv").is_some() {
        return Err(Error::Config(format!(
            "{}: `clip_qkv` is not supported",
            path.display()
        )));
    }
    let moe = MoeConfig {
        hidden_size: hidden,
        intermediate_size: expert_ffn,
        num_experts: experts,
        top_k: usize_field(v, "num_experts_per_tok", path)?,
        norm_topk_prob: bool_field(v, "norm_topk_prob", family == Family::Mixtral, path)?,
        capacity_factor: None,
        router_jitter_noise: f64_field(v, "router_jitter_noise", 0.0, path)?,
        noisy_gating: false,
        router_aux_loss_coef: f64_field(v, "router_aux_loss_coef", 0.01, path)?,
        router_z_loss_coef: 0.0,
        expert_kind: ExpertKind::Swiglu,
        expert_bias: false,
        shared_expert_intermediate_size: if family == Family::Qwen2Moe {
            opt_usize(v, "shared_expert_intermediate_size", path)?.unwrap_or(0)
        } else {
            0
        },
        shared_expert_gate: true,
    };
    let mlp_only: Vec<usize> = match field(v, "mlp_only_layers") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|u| u as usize))
            .collect(),
        _ => vec![],
    };
    let cfg = ModelConfig {
        vocab_size: usize_field(v, "vocab_size", path)?,
        hidden_size: hidden,
        num_layers: usize_field(v, "num_hidden_layers", path)?,
        num_decoder_layers: 0,
        num_heads: heads,
        num_kv_heads: opt_usize(v, "num_key_value_heads", path)?.unwrap_or(heads),
        head_dim: opt_usize(v, "head_dim", path)?,
        max_position_embeddings: opt_usize(v, "max_position_embeddings", path)?.unwrap_or(4096),
        rope_theta: f64_field(v, "rope_theta", 10_000.0, path)?,
        position: PositionKind::Rope,
        norm_eps: f64_field(v, "rms_norm_eps", 1e-6, path)?,
        norm: NormKind::Rmsnorm,
        post_norm: false,
        attention_bias: match family {
            Family::Qwen2Moe => true,
            _ => bool_field(v, "attention_bias", false, path)?,
        },
        qk_norm: family == Family::Olmoe,
        tie_word_embeddings: bool_field(v, "tie_word_embeddings", false, path)?,
        type_vocab_size: 0,
        dense_intermediate_size: opt_usize(v, "intermediate_size", path)?.unwrap_or(expert_ffn),
        sparse_step: if family == Family::Qwen2Moe {
            opt_usize(v, "decoder_sparse_step", path)?.unwrap_or(1)
        } else {
            1
        },
        mlp_only_layers: mlp_only,
        moe,
        num_labels: 0,
        pooling: Default::default(),
        pad_token_id: None,
        hidden_dropout: 0.0,
    };
    cfg.validate()
        .map_err(|e| Error::Config(format!("{}: {}", path.display(), e)))?;
    Ok((family, cfg))
}

/// Reads and maps a Hugging Face `config.json`.
pub fn read_hf_config(path: &Path) -> Result<(Family, ModelConfig)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    config_from_hf(&v, path)
}

/// The crate's (Mixtral) weight name -> the family's weight name.
pub fn hf_name(family: Family, ours: &str) -> String {
    match family {
        Family::Mixtral => ours.to_string(),
        Family::Qwen2Moe | Family::Olmoe => ours
            .replace(".block_sparse_moe.", ".mlp.")
            .replace(".w1.", ".gate_proj.")
            .replace(".w3.", ".up_proj.")
            .replace(".w2.", ".down_proj."),
    }
}

#[derive(Debug, Clone)]
struct HeaderEntry {
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
}

/// Reads a safetensors header (without the tensor data) and checks that the file is long
/// enough for every tensor it declares.
fn read_header(path: &Path) -> Result<HashMap<String, HeaderEntry>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::checkpoint(path, "truncated: shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > size {
        return Err(Error::checkpoint(
            path,
            format!("corrupt or truncated: header of {n} bytes in a file of {size}"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_slice(&buf)
        .map_err(|e| Error::checkpoint(path, format!("corrupt header: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::checkpoint(path, "corrupt header: not a JSON object"))?;
    let mut out = HashMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |m: &str| Error::checkpoint(path, format!("tensor `{name}`: {m}"));
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no dtype"))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|u| u as usize)
                    .ok_or_else(|| bad("bad shape"))
            })
            .collect::<Result<_>>()?;
        let end = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad("no data_offsets"))?;
        if 8 + n + end > size {
            return Err(bad(&format!(
                "data ends at byte {} but the file has {size}: truncated",
                8 + n + end
            )));
        }
        out.insert(
            name.clone(),
            HeaderEntry {
                file: path.to_path_buf(),
                dtype: dtype.to_string(),
                shape,
            },
        );
    }
    Ok(out)
}

/// A VarBuilder backend over memory-mapped safetensors that checks every tensor against the
/// headers and names the file and tensor in its errors.
struct Checked {
    st: candle_core::safetensors::MmapedSafetensors,
    headers: HashMap<String, HeaderEntry>,
    files: String,
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(h) = self.headers.get(name) {
            if h.shape != s.dims() {
                candle_core::bail!(
                    "checkpoint {}: tensor `{name}` has shape {:?}, the config expects {:?}",
                    h.file.display(),
                    h.shape,
                    s.dims()
                )
            }
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(h) = self.headers.get(name) else {
            candle_core::bail!("checkpoint {}: missing tensor `{name}`", self.files)
        };
        if !matches!(h.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            candle_core::bail!(
                "checkpoint {}: tensor `{name}` has dtype {}, expected a float dtype",
                h.file.display(),
                h.dtype
            )
        }
        self.st
            .load(name, dev)
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "checkpoint {}: tensor `{name}`: {e}",
                    h.file.display()
                ))
            })?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.headers.contains_key(name)
    }
}

/// A checked VarBuilder over `files` with the family's names.
pub fn var_builder(
    files: &[PathBuf],
    family: Option<Family>,
    opts: &LoadOptions,
) -> Result<VarBuilder<'static>> {
    let mut headers = HashMap::new();
    for f in files {
        headers.extend(read_header(f)?);
    }
    // SAFETY: the files are memory-mapped read-only; as with every mmap-based loader (candle's
    // own `from_mmaped_safetensors`), they must not be modified while the model is alive.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(|e| {
        Error::checkpoint(
            files.first().cloned().unwrap_or_default(),
            format!("cannot map: {e}"),
        )
    })?;
    let files_s = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let backend: Box<dyn SimpleBackend> = Box::new(Checked {
        st,
        headers,
        files: files_s,
    });
    let vb = VarBuilder::from_backend(backend, opts.dtype, opts.device.clone());
    Ok(match family {
        Some(f) if f != Family::Mixtral => vb.rename_f(move |n: &str| hf_name(f, n)),
        _ => vb,
    })
}

/// Checks that the checkpoint has no decoder layers beyond the config's (a config that
/// disagrees with the weights).
fn check_layer_count(files: &[PathBuf], num_layers: usize) -> Result<()> {
    for f in files {
        for name in read_header(f)?.keys() {
            if let Some(rest) = name.strip_prefix("model.layers.") {
                if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                    if i >= num_layers {
                        return Err(Error::checkpoint(
                            f,
                            format!("tensor `{name}` belongs to layer {i}, but config.json has num_hidden_layers = {num_layers}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

impl crate::models::CausalLm {
    /// Loads a Mixtral, Qwen2-MoE or OLMoE checkpoint from a local directory or a hub id.
    pub fn from_pretrained(source: &str, opts: &LoadOptions) -> Result<Self> {
        Ok(Self::from_pretrained_with_tokenizer(source, opts)?.0)
    }

    /// As [`Self::from_pretrained`], also returning the checkpoint's tokenizer when it has one.
    pub fn from_pretrained_with_tokenizer(
        source: &str,
        opts: &LoadOptions,
    ) -> Result<(Self, Option<tokenizers::Tokenizer>)> {
        let r = resolve(source, opts)?;
        let (family, cfg) = read_hf_config(&r.config)?;
        check_layer_count(&r.weights, cfg.num_layers)?;
        let vb = var_builder(&r.weights, Some(family), opts)?;
        let model = Self::new(&cfg, vb).map_err(|e| Error::Checkpoint {
            path: r.weights.first().cloned().unwrap_or_default(),
            msg: e.to_string(),
        })?;
        let tok = match &r.tokenizer {
            Some(p) => Some(crate::data::tokenizer::load(p)?),
            None => None,
        };
        Ok((model, tok))
    }
}
