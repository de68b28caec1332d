//! What a checkpoint is, from its `config.json` alone: the family, the layer layout, every
//! parameter's name and shape, total and active parameter counts and the memory the weights
//! need — without reading or allocating the weights.
//!
//! The model is built as the loader would build it, over a backend that hands out zero-stride
//! placeholders (one scalar each) instead of weights, so the parameter list is exactly what
//! [`CausalLm::from_pretrained`](crate::CausalLm::from_pretrained) would ask the checkpoint for.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::hf::Family;
use crate::io::hub::LoadOptions;
use crate::models::CausalLm;

/// A `VarBuilder` backend that returns a broadcast scalar of the requested shape: building a
/// model over it allocates one scalar per parameter, whatever the model's size.
struct ShapeOnly;

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("inspect: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// How a layer's feed-forward is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FfnLayout {
    /// A dense feed-forward.
    Dense,
    /// A sparse mixture of experts.
    Sparse,
}

/// What [`inspect`] found.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Where the configuration came from.
    pub config_path: PathBuf,
    /// The Hugging Face family (`None` for a crate-format config).
    pub family: Option<Family>,
    /// The mapped configuration.
    pub config: ModelConfig,
    /// Every parameter (crate names) and its shape, in build order.
    pub params: Vec<(String, Vec<usize>)>,
    /// The checkpoint's stored dtype (`dtype` / `torch_dtype`), when the config says.
    pub stored_dtype: Option<String>,
    /// `quantization_config.quant_method` (e.g. `mxfp4`, `fp8`), when the checkpoint is
    /// quantised.
    pub quantization: Option<String>,
}

/// Whether a parameter belongs to a routed expert (a `.experts.` path segment; shared experts
/// are `shared_expert(s)` and always active).
pub fn is_routed_expert(name: &str) -> bool {
    name.split('.').any(|s| s == "experts")
}

impl Inventory {
    /// All parameters.
    pub fn total(&self) -> u128 {
        self.params.iter().map(|(_, s)| numel(s)).sum()
    }

    /// Parameters of the routed experts.
    pub fn routed_expert_params(&self) -> u128 {
        self.params
            .iter()
            .filter(|(n, _)| is_routed_expert(n))
            .map(|(_, s)| numel(s))
            .sum()
    }

    /// Parameters one token uses: everything except the routed experts, plus `top_k / E` of
    /// them (all embeddings counted).
    pub fn active(&self) -> u128 {
        let m = &self.config.moe;
        let experts = self.routed_expert_params();
        let active_experts = experts * m.top_k as u128 / m.num_experts.max(1) as u128;
        self.total() - experts + active_experts
    }

    /// [`Self::active`] without the input embedding (a lookup, no multiply-adds; some model
    /// cards count active parameters this way).
    pub fn active_without_input_embedding(&self) -> u128 {
        let emb: u128 = self
            .params
            .iter()
            .filter(|(n, _)| n.ends_with("embed_tokens.weight"))
            .map(|(_, s)| numel(s))
            .sum();
        self.active() - emb
    }

    /// Bytes of the weights at `bytes_per_param` each.
    pub fn bytes_at(&self, bytes_per_param: f64) -> f64 {
        self.total() as f64 * bytes_per_param
    }

    /// Bytes of the weights as the checkpoint stores them: MXFP4 routed-expert matrices at
    /// 4.25 bits (4-bit values + one E8M0 scale per 32), FP8 linear weights at 1 byte (+ one
    /// f32 scale per 128×128 block), everything else at the stored dtype (bf16 when unknown).
    pub fn stored_bytes(&self) -> f64 {
        let base = match self.stored_dtype.as_deref() {
            Some("float32") => 4.0,
            _ => 2.0,
        };
        let quant = self.quantization.as_deref();
        self.params
            .iter()
            .map(|(n, s)| {
                let count = numel(s) as f64;
                let matrix = s.len() >= 2 && n.ends_with(".weight");
                match quant {
                    Some("mxfp4") if matrix && is_routed_expert(n) => count * 4.25 / 8.0,
                    Some("fp8")
                        if matrix
                            && !n.contains("embed_tokens")
                            && !n.starts_with("lm_head")
                            && !n.ends_with(".gate.weight") =>
                    {
                        let blocks = s[s.len() - 2..]
                            .iter()
                            .map(|d| d.div_ceil(128) as f64)
                            .product::<f64>();
                        count + blocks * 4.0
                    }
                    _ => count * base,
                }
            })
            .sum()
    }

    /// One line per block: dense or sparse feed-forward.
    pub fn layer_layout(&self) -> Vec<FfnLayout> {
        (0..self.config.num_layers)
            .map(|l| {
                if self.config.is_sparse_layer(l) {
                    FfnLayout::Sparse
                } else {
                    FfnLayout::Dense
                }
            })
            .collect()
    }
}

fn numel(s: &[usize]) -> u128 {
    s.iter().map(|&d| d as u128).product()
}

/// The `config.json` of `source`: a path to a JSON file, a directory holding `config.json`, or
/// a hub model id (resolved through the hf-hub cache like the loader does).
fn config_path(source: &str, opts: &LoadOptions) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        return Ok(p.join("config.json"));
    }
    Ok(crate::io::hub::resolve(source, opts)?.config)
}

/// Inspects the checkpoint at `source` (a `config.json`, a checkpoint directory holding one, or a hub id resolved through the hf-hub cache) from its configuration alone.
pub fn inspect(source: &str, opts: &LoadOptions) -> Result<Inventory> {
    let path = config_path(source, opts)?;
    let text = crate::files::read_json_text(&path, "config.json")?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let (family, config) = if v.get("model_type").is_some() {
        let (f, c) = crate::io::hf::config_from_hf(&v, &path)?;
        (Some(f), c)
    } else {
        let c: ModelConfig = serde_json::from_value(v.clone()).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        c.validate()?;
        (None, c)
    };
    let params = parameter_shapes(&config)?;
    let stored_dtype = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|d| d.as_str()).map(str::to_string));
    let quantization = v
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(str::to_string);
    Ok(Inventory {
        config_path: path,
        family,
        config,
        params,
        stored_dtype,
        quantization,
    })
}

/// Every parameter a [`CausalLm`] of `cfg` has, with its shape, without allocating them.
pub fn parameter_shapes(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
    let model = CausalLm::new(cfg, vb)?;
    Ok(model
        .parameters()
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect())
}
