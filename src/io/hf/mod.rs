//! Hugging Face checkpoints: Mixtral, Qwen2-MoE and OLMoE `config.json` + safetensors (single
//! file or sharded with `model.safetensors.index.json`), from a local folder or a hub id.
//!
//! Their weight names are mapped onto the crate's Mixtral-named modules
//! (`mlp.` ↔ `block_sparse_moe.`, `gate_proj/up_proj/down_proj` ↔ `w1/w3/w2`), every tensor's
//! presence, shape and dtype is checked against the config before it is used, and errors name
//! the file and the tensor.

mod config;
mod deepseek;
mod defaults;
mod fuse;
mod gpt_oss;
mod granite;
pub(crate) mod layout;
mod qwen3;
mod rope;
mod save;
mod window;

pub use crate::io::quant::mxfp4::dequantize_mxfp4;
pub use save::{ExpertsOnDisk, SaveOptions, CRATE_CONFIG_KEY};

use std::path::PathBuf;

use candle_nn::VarBuilder;

pub use config::{config_from_hf, read_hf_config};

use crate::error::{Error, Result};
use crate::io::backend::var_builder_mapped;
use crate::io::hub::{resolve, LoadOptions};
use crate::io::safetensors::{build_error, check_unused, read_header, SharedLog};

/// The Hugging Face model families this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type: "mixtral"`.
    Mixtral,
    /// `model_type: "qwen2_moe"`.
    Qwen2Moe,
    /// `model_type: "olmoe"`.
    Olmoe,
    /// `model_type: "qwen3_moe"`.
    Qwen3Moe,
    /// `model_type: "deepseek_v2"`.
    DeepseekV2,
    /// `model_type: "deepseek_v3"` (also Kimi-K2 and GLM-4.x MoE checkpoints of that architecture).
    DeepseekV3,
    /// `model_type: "gpt_oss"`.
    GptOss,
    /// `model_type: "granitemoe"`.
    GraniteMoe,
}

impl Family {
    /// The `model_type` values the loader knows, in [`Family`] order.
    pub const MODEL_TYPES: [&'static str; 8] = [
        "mixtral",
        "qwen2_moe",
        "olmoe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "granitemoe",
    ];
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
        Family::Qwen3Moe => qwen3::hf_name(ours),
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek::hf_name(ours),
        Family::GptOss => gpt_oss::hf_name(ours),
        Family::GraniteMoe => granite::hf_name(ours),
    }
}

/// A checked VarBuilder over `files` with the family's tensor names; fused expert tensors
/// (detected once for the checkpoint against `cfg`) are served per expert.
pub(crate) fn family_var_builder(
    files: &[PathBuf],
    family: Family,
    cfg: &crate::config::ModelConfig,
    opts: &LoadOptions,
    varmap: Option<candle_nn::VarMap>,
) -> Result<(VarBuilder<'static>, SharedLog, Vec<String>)> {
    let (vb, log, names) = var_builder_mapped(files, opts, varmap, |headers, first| {
        layout::detect(headers, family, cfg, first)
    })?;
    let vb = match family {
        Family::Mixtral => vb,
        f => vb.rename_f(move |n: &str| hf_name(f, n)),
    };
    Ok((vb, log, names))
}

/// The per-expert weights that a checkpoint's fused expert tensors serve, under the names the
/// model asks for (the family's spelling of `model.layers.N.block_sparse_moe.experts.E.w1.weight`,
/// ...), read as [`crate::models::CausalLm::from_pretrained`] reads them: the layout detected
/// once for the checkpoint, MXFP4 dequantised, in `opts.dtype`. Empty when the checkpoint stores
/// its experts per expert.
pub fn read_fused_experts(
    source: &str,
    opts: &LoadOptions,
) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let r = resolve(source, opts)?;
    let v = read_json(&r.config)?;
    let (family, cfg) = config_and_family(&v, &r.config)?;
    let mut names = vec![];
    let (vb, log, _) = var_builder_mapped(&r.weights, opts, None, |headers, first| {
        let map = layout::detect(headers, family, &cfg, first)?;
        names = map.slices.keys().cloned().collect();
        Ok(map)
    })?;
    let first = r.weights.first().cloned().unwrap_or_default();
    names
        .into_iter()
        .map(|n| {
            let t = vb
                .get_unchecked(&n)
                .map_err(|e| build_error(&log, e, &first))?;
            Ok((n, t))
        })
        .collect()
}

/// Checks that the checkpoint has no decoder layers beyond the config's (a config that
/// disagrees with the weights). DeepSeek-V3 checkpoints may carry their multi-token-prediction
/// layer at index `num_layers`: it is allowed there (and skipped, see [`skipped_tensor`]).
fn check_layer_count(files: &[PathBuf], num_layers: usize, family: Family) -> Result<()> {
    let allowed = num_layers + usize::from(family == Family::DeepseekV3);
    for f in files {
        for name in read_header(f)?.keys() {
            if let Some(rest) = name.strip_prefix("model.layers.") {
                if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                    if i >= allowed {
                        return Err(Error::tensor(
                            f,
                            name.as_str(),
                            crate::error::CheckpointErrorKind::Unexpected,
                            format!("tensor `{name}` belongs to layer {i}, but config.json has num_hidden_layers = {num_layers}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Tensors a family's checkpoints carry that the model does not use: DeepSeek-V3's
/// multi-token-prediction layer `model.layers.{num_layers}.*` (a speculative-decoding head that
/// transformers does not load either).
fn skipped_tensor(family: Family, num_layers: usize, name: &str) -> bool {
    family == Family::DeepseekV3
        && name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            == Some(num_layers)
}

/// The family and configuration of a Hugging Face `config.json`; a crate-built model's own
/// configuration (under [`save::CRATE_CONFIG_KEY`]) is used when present and consistent.
fn config_and_family(
    v: &serde_json::Value,
    path: &std::path::Path,
) -> Result<(Family, crate::config::ModelConfig)> {
    let (family, hf) = config_from_hf(v, path)?;
    let Some(own) = v.get(save::CRATE_CONFIG_KEY) else {
        return Ok((family, hf));
    };
    let own: crate::config::ModelConfig =
        serde_json::from_value(own.clone()).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    own.validate()?;
    let same = own.vocab_size == hf.vocab_size
        && own.hidden_size == hf.hidden_size
        && own.num_layers == hf.num_layers
        && own.num_heads == hf.num_heads
        && own.num_kv_heads == hf.num_kv_heads
        && own.moe.num_experts == hf.moe.num_experts
        && own.moe.top_k == hf.moe.top_k
        && own.moe.intermediate_size == hf.moe.intermediate_size
        && own.tie_word_embeddings == hf.tie_word_embeddings;
    if family != Family::Mixtral || !same {
        return Err(Error::Config(format!(
            "{}: `{}` contradicts the Hugging Face keys of the same file",
            path.display(),
            save::CRATE_CONFIG_KEY
        )));
    }
    Ok((family, own))
}

/// Reads a JSON file, naming it on error: a regular file (links followed) of at most 64 MiB.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = crate::files::read_json_text(path, "a JSON file")?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
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
        let v = read_json(&r.config)?;
        let (family, cfg) = config_and_family(&v, &r.config)?;
        check_layer_count(&r.weights, cfg.num_layers, family)?;
        let varmap = opts.trainable.then(candle_nn::VarMap::new);
        let (vb, log, names) = family_var_builder(&r.weights, family, &cfg, opts, varmap.clone())?;
        let first = r.weights.first().cloned().unwrap_or_default();
        let mut model = Self::new_validated(&cfg, vb).map_err(|e| build_error(&log, e, &first))?;
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| !skipped_tensor(family, cfg.num_layers, n))
            .collect();
        check_unused(&log, &names, &first)?;
        let (tok, tokenizer_json) = match &r.tokenizer {
            Some(p) => (
                Some(crate::tokenizer::load(p)?),
                Some(crate::files::read_json_text(p, "tokenizer.json")?),
            ),
            None => (None, None),
        };
        let generation_config = r
            .config
            .parent()
            .map(|d| d.join("generation_config.json"))
            .filter(|p| p.exists())
            .map(|p| crate::files::read_json_text(&p, "generation_config.json"))
            .transpose()?
            .and_then(|t| serde_json::from_str(&t).ok());
        model.set_origin(crate::models::Origin {
            hf_config: Some(v),
            tokenizer_json,
            generation_config,
            varmap,
        });
        Ok((model, tok))
    }
}
