//! `save_pretrained`: a model written in the Hugging Face layout of its family (`config.json`
//! with `model_type`, safetensors under the family's tensor names, sharded with an index above a
//! size limit, `generation_config.json` and `tokenizer.json` when known), as one atomic
//! directory write.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::{config::family_of, hf_name, Family};
use crate::config::{ExpertKind, ModelConfig, NormKind, PositionKind};
use crate::error::{Error, Result};
use crate::io::atomic::write_dir_atomic;
use crate::io::safetensors::to_safetensors_bytes;
use crate::models::CausalLm;

/// How [`CausalLm::save_pretrained_with`] writes.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Largest safetensors file; above it the weights are sharded with an index (as
    /// transformers' `max_shard_size`). Default 5 GB.
    pub max_shard_bytes: usize,
    /// Fault injection for tests: fail after writing this many files.
    #[doc(hidden)]
    pub fail_after_files: Option<usize>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: 5_000_000_000,
            fail_after_files: None,
        }
    }
}

/// How [`CausalLm::save_pretrained_experts`] writes the routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertsOnDisk {
    /// One tensor per expert and projection (`experts.{e}.gate_proj.weight`, ...), as
    /// transformers' default `save_pretrained` writes (GraniteMoE and gpt-oss, which have no
    /// per-expert names, are written in their own fused layout).
    #[default]
    PerExpert,
    /// Fused per layer: transformers 5's `mlp.experts.gate_up_proj` `[E, 2I, H]` +
    /// `mlp.experts.down_proj` `[E, H, I]`, as its `save_pretrained(...,
    /// save_original_format=False)` writes (GraniteMoE and gpt-oss: their own fused layout).
    Fused,
}

/// The key of `config.json` under which a crate-built model keeps its [`ModelConfig`].
pub const CRATE_CONFIG_KEY: &str = "candle_moe_config";

/// transformers' name of a dtype.
fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The first setting of `cfg` a transformers `MixtralConfig` cannot express, if any.
fn not_mixtral(cfg: &ModelConfig) -> Option<String> {
    if let Some(what) = super::deepseek::not_mixtral(cfg) {
        return Some(what);
    }
    let m = &cfg.moe;
    if let Some(what) = super::rope::not_mixtral_positions(cfg) {
        return Some(what);
    }
    let checks: [(bool, &str); 14] = [
        (m.noisy_gating, "noisy gating (`moe.noisy_gating`)"),
        (
            m.expert_kind != ExpertKind::Swiglu,
            "non-SwiGLU experts (`moe.expert_kind`)",
        ),
        (m.expert_bias, "expert biases (`moe.expert_bias`)"),
        (
            m.capacity_factor.is_some(),
            "a capacity factor (`moe.capacity_factor`)",
        ),
        (
            !m.norm_topk_prob,
            "un-renormalised top-k weights (`moe.norm_topk_prob = false`)",
        ),
        (m.shared_expert_intermediate_size > 0, "a shared expert"),
        (cfg.norm != NormKind::Rmsnorm, "LayerNorm (`norm`)"),
        (cfg.post_norm, "post-norm blocks (`post_norm`)"),
        (
            cfg.position != PositionKind::Rope,
            "learned positions (`position`)",
        ),
        (cfg.qk_norm, "q/k norms (`qk_norm`)"),
        (cfg.attention_bias, "attention biases (`attention_bias`)"),
        (cfg.type_vocab_size > 0, "token types (`type_vocab_size`)"),
        (
            cfg.sparse_step != 1 || !cfg.mlp_only_layers.is_empty(),
            "dense layers (`sparse_step`, `mlp_only_layers`)",
        ),
        (
            cfg.embedding_multiplier != 1.0
                || cfg.residual_multiplier != 1.0
                || cfg.attention_multiplier.is_some()
                || cfg.logits_scaling != 1.0,
            "GraniteMoE multipliers (`embedding_multiplier`, `residual_multiplier`, `attention_multiplier`, `logits_scaling`)",
        ),
    ];
    checks.iter().find(|c| c.0).map(|c| c.1.to_string())
}

/// A transformers `MixtralConfig` for a crate-built model.
fn mixtral_config(cfg: &ModelConfig, dtype: DType) -> Result<Value> {
    if let Some(what) = not_mixtral(cfg) {
        return Err(Error::Config(format!(
            "save_pretrained: the model uses {what}, which transformers' Mixtral cannot express"
        )));
    }
    let m = &cfg.moe;
    Ok(json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.router_aux_loss_coef,
        "router_jitter_noise": m.router_jitter_noise,
        "output_router_logits": false,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "sliding_window": cfg.sliding_window,
        "rope_scaling": super::rope::hf_rope_scaling(cfg.rope_scaling.as_ref())?,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype_name(dtype),
        // The crate's whole configuration (dropout, z-loss, ...), which transformers ignores
        // and this crate's loader prefers.
        "candle_moe_config": cfg,
    }))
}

/// The family and `config.json` to write for `model`.
fn hf_config_for(model: &CausalLm, dtype: DType, path: &Path) -> Result<(Family, Value)> {
    match &model.origin().hf_config {
        Some(v) => {
            let family = family_of(v, path)?;
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                let key = if o.contains_key("dtype") {
                    "dtype"
                } else {
                    "torch_dtype"
                };
                o.insert(key.into(), json!(dtype_name(dtype)));
                // Quantised checkpoints (FP8, MXFP4) are dequantised at load and saved as floats.
                o.remove("quantization_config");
            }
            Ok((family, v))
        }
        None => Ok((Family::Mixtral, mixtral_config(model.config(), dtype)?)),
    }
}

/// Serialises `tensors` into one file or shards of at most `max` bytes (plus the index).
fn shard(
    tensors: BTreeMap<String, Tensor>,
    max: usize,
    dir: &Path,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut groups: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut size = 0usize;
    for (n, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size > 0 && size + bytes > max {
            groups.push(vec![]);
            size = 0;
        }
        size += bytes;
        if let Some(g) = groups.last_mut() {
            g.push((n, t));
        }
    }
    let total: usize = groups.len();
    let mut files = vec![];
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (i, g) in groups.into_iter().enumerate() {
        let name = if total == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{total:05}.safetensors", i + 1)
        };
        let map: HashMap<String, Tensor> = g.into_iter().collect();
        for (n, t) in &map {
            weight_map.insert(n.clone(), name.clone());
            total_size += t.elem_count() * t.dtype().size_in_bytes();
        }
        files.push((name.clone(), to_safetensors_bytes(&map, &dir.join(&name))?));
    }
    if total > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        files.push((
            "model.safetensors.index.json".into(),
            serde_json::to_vec_pretty(&index).map_err(|source| Error::Json {
                path: dir.join("model.safetensors.index.json"),
                source,
            })?,
        ));
    }
    Ok(files)
}

impl CausalLm {
    /// Writes the model in the Hugging Face layout of its family (a model built by the crate
    /// is written as `mixtral`, or refused with the setting Mixtral cannot express), so that
    /// transformers' `AutoModelForCausalLM.from_pretrained(dir)` and this crate's
    /// [`CausalLm::from_pretrained`] load it. The directory is replaced as a whole: after a
    /// failure it still holds the previous checkpoint.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_with(dir, &SaveOptions::default())
    }

    /// [`Self::save_pretrained`] with options (shard size).
    pub fn save_pretrained_with(&self, dir: impl AsRef<Path>, opts: &SaveOptions) -> Result<()> {
        self.save_pretrained_experts(dir, opts, ExpertsOnDisk::PerExpert)
    }

    /// [`Self::save_pretrained_with`], choosing how the routed experts are written (per expert
    /// or fused, see [`ExpertsOnDisk`]).
    pub fn save_pretrained_experts(
        &self,
        dir: impl AsRef<Path>,
        opts: &SaveOptions,
        experts: ExpertsOnDisk,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let files = self.pretrained_files(opts, experts, dir)?;
        write_dir_atomic(dir, &files, opts.fail_after_files)
    }

    /// Whether [`Self::save_pretrained`] can write this model (loaded from a Hugging Face
    /// checkpoint, or built with a configuration transformers' Mixtral expresses).
    pub fn is_hf_expressible(&self) -> bool {
        self.origin().hf_config.is_some() || not_mixtral(self.config()).is_none()
    }

    /// The files of a model directory for this model: the Hugging Face layout when
    /// [`Self::is_hf_expressible`], else the crate's layout
    /// ([`model_files`](crate::io::model_dir::model_files)); `tokenizer_json` overrides the
    /// tokenizer the model was loaded with.
    pub fn checkpoint_files(
        &self,
        tokenizer_json: Option<&str>,
        dir: &Path,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.refuse_expert_parallel(dir)?;
        if self.is_hf_expressible() {
            let mut files =
                self.pretrained_files(&SaveOptions::default(), ExpertsOnDisk::PerExpert, dir)?;
            if let Some(t) = tokenizer_json {
                files.retain(|(n, _)| n != "tokenizer.json");
                files.push(("tokenizer.json".into(), t.as_bytes().to_vec()));
            }
            return Ok(files);
        }
        let tensors: HashMap<String, Tensor> = self
            .parameters()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        let tok = tokenizer_json.or(self.origin().tokenizer_json.as_deref());
        crate::io::model_dir::model_files(self.config(), &tensors, tok, dir)
    }

    /// An expert-parallel model holds only its rank's experts: it is saved through
    /// [`CausalLm::gathered`] (rank 0), never directly.
    fn refuse_expert_parallel(&self, dir: &Path) -> Result<()> {
        if self.is_expert_parallel() {
            return Err(Error::Config(format!(
                "cannot save {}: an expert-parallel model holds only this rank's experts; save the model `gathered()` returns on rank 0",
                dir.display()
            )));
        }
        Ok(())
    }

    /// The files [`Self::save_pretrained_with`] writes.
    fn pretrained_files(
        &self,
        opts: &SaveOptions,
        experts: ExpertsOnDisk,
        dir: &Path,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.refuse_expert_parallel(dir)?;
        let dtype = self
            .parameters()
            .first()
            .map(|(_, t)| t.dtype())
            .unwrap_or(DType::F32);
        let (family, config) = hf_config_for(self, dtype, &dir.join("config.json"))?;
        let mut tensors = BTreeMap::new();
        for (name, t) in self.parameters() {
            let t = t.detach().to_dtype(dtype)?.contiguous()?;
            tensors.insert(hf_name(family, name), t);
        }
        if experts == ExpertsOnDisk::Fused || matches!(family, Family::GraniteMoe | Family::GptOss)
        {
            super::fuse::fuse_for_save(family, self.config(), &mut tensors)?;
        }
        let mut files = shard(tensors, opts.max_shard_bytes, dir)?;
        let json_bytes = |v: &Value, name: &str| {
            serde_json::to_vec_pretty(v).map_err(|source| Error::Json {
                path: dir.join(name),
                source,
            })
        };
        files.push(("config.json".into(), json_bytes(&config, "config.json")?));
        let gen = match &self.origin().generation_config {
            Some(g) => g.clone(),
            None => json!({"_from_model_config": true, "pad_token_id": config.get("pad_token_id")}),
        };
        files.push((
            "generation_config.json".into(),
            json_bytes(&gen, "generation_config.json")?,
        ));
        if let Some(t) = &self.origin().tokenizer_json {
            files.push(("tokenizer.json".into(), t.as_bytes().to_vec()));
        }
        Ok(files)
    }
}
