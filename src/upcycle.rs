//! BERT-family encoders and sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling:
//! Training Mixture-of-Experts from Dense Checkpoints").
//!
//! A BERT checkpoint (post-norm LayerNorm, learned absolute positions, token-type embeddings,
//! GELU feed-forward with biases) maps onto the crate's [`SequenceClassifier`] trunk. Upcycling
//! turns each dense feed-forward into `E` experts that start as copies of it (plus optional
//! noise) with a freshly initialised router; with identical experts and renormalised gate
//! weights the upcycled model computes exactly what the dense one did.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::checkpoint::{parse_safetensors, read_file};
use crate::config::{ExpertKind, ModelConfig, NormKind, Pooling, PositionKind};
use crate::error::{Error, Result};
use crate::hf::{resolve, LoadOptions};
use crate::models::SequenceClassifier;

/// Maps a BERT `config.json` onto a dense, post-norm [`ModelConfig`].
pub fn bert_config(v: &Value, path: &Path, num_labels: usize) -> Result<ModelConfig> {
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::Config(format!("{}: missing or non-integer `{k}`", path.display()))
            })
    };
    let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    if !matches!(mt, "bert" | "roberta" | "") {
        return Err(Error::Config(format!(
            "{}: model_type `{mt}` is not a BERT-family encoder",
            path.display()
        )));
    }
    let act = v
        .get("hidden_act")
        .and_then(|a| a.as_str())
        .unwrap_or("gelu");
    if act != "gelu" {
        return Err(Error::Config(format!(
            "{}: hidden_act `{act}` is not supported (gelu only)",
            path.display()
        )));
    }
    if let Some(p) = v.get("position_embedding_type").and_then(|p| p.as_str()) {
        if p != "absolute" {
            return Err(Error::Config(format!(
                "{}: position_embedding_type `{p}` is not supported",
                path.display()
            )));
        }
    }
    let hidden = get("hidden_size")?;
    let inter = get("intermediate_size")?;
    let mut cfg = ModelConfig::tiny(get("vocab_size")?);
    cfg.hidden_size = hidden;
    cfg.num_layers = get("num_hidden_layers")?;
    cfg.num_heads = get("num_attention_heads")?;
    cfg.num_kv_heads = cfg.num_heads;
    cfg.head_dim = None;
    cfg.max_position_embeddings = get("max_position_embeddings")?;
    cfg.position = PositionKind::Learned;
    cfg.norm = NormKind::Layernorm;
    cfg.norm_eps = v
        .get("layer_norm_eps")
        .and_then(|e| e.as_f64())
        .unwrap_or(1e-12);
    cfg.post_norm = true;
    cfg.attention_bias = true;
    cfg.type_vocab_size = get("type_vocab_size")?;
    cfg.dense_intermediate_size = inter;
    cfg.sparse_step = 0;
    cfg.tie_word_embeddings = false;
    cfg.moe.hidden_size = hidden;
    cfg.moe.intermediate_size = inter;
    cfg.moe.expert_kind = ExpertKind::Gelu;
    cfg.moe.expert_bias = true;
    cfg.num_labels = num_labels;
    cfg.pooling = Pooling::Mean;
    cfg.pad_token_id = v
        .get("pad_token_id")
        .and_then(|p| p.as_u64())
        .map(|p| p as u32);
    cfg.validate()?;
    Ok(cfg)
}

/// The BERT checkpoint name of one of the classifier trunk's weights (`None` for weights BERT
/// does not have: the classification head, routers).
pub fn bert_name(ours: &str) -> Option<String> {
    let rest = ours.strip_prefix("model.")?;
    let fixed = match rest {
        "embed_tokens.weight" => Some("embeddings.word_embeddings.weight"),
        "embed_positions.weight" => Some("embeddings.position_embeddings.weight"),
        "token_type_embeddings.weight" => Some("embeddings.token_type_embeddings.weight"),
        "embed_norm.weight" => Some("embeddings.LayerNorm.weight"),
        "embed_norm.bias" => Some("embeddings.LayerNorm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = rest.strip_prefix("layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let mapped = match tail.rsplit_once('.') {
        Some((module, param)) => {
            let m = match module {
                "self_attn.q_proj" => "attention.self.query",
                "self_attn.k_proj" => "attention.self.key",
                "self_attn.v_proj" => "attention.self.value",
                "self_attn.o_proj" => "attention.output.dense",
                "input_layernorm" => "attention.output.LayerNorm",
                "post_attention_layernorm" => "output.LayerNorm",
                "mlp.w1" => "intermediate.dense",
                "mlp.w2" => "output.dense",
                _ => return None,
            };
            format!("encoder.layer.{i}.{m}.{param}")
        }
        None => return None,
    };
    Some(mapped)
}

/// A dense BERT-family checkpoint loaded as a trainable [`SequenceClassifier`].
pub struct DenseEncoder {
    /// The model (dense feed-forwards).
    pub model: SequenceClassifier,
    /// Its variables (BERT weights plus a fresh classification head).
    pub varmap: VarMap,
    /// Its configuration.
    pub config: ModelConfig,
    /// The checkpoint's tokenizer, when it has one (padding and truncation disabled).
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// The checkpoint's tensors under the crate's names.
    pub tensors: HashMap<String, Tensor>,
}

/// Loads a BERT-family checkpoint (local folder or hub id) as a dense classifier with a fresh
/// `num_labels` head; every trunk tensor is checked for presence and shape.
pub fn load_bert(source: &str, num_labels: usize, opts: &LoadOptions) -> Result<DenseEncoder> {
    let r = resolve(source, opts)?;
    let text = std::fs::read_to_string(&r.config).map_err(|e| Error::io(&r.config, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: r.config.clone(),
        source,
    })?;
    let cfg = bert_config(&v, &r.config, num_labels)?;
    let mut file_tensors = HashMap::new();
    for f in &r.weights {
        file_tensors.extend(parse_safetensors(
            &read_file(f)?,
            f,
            opts.dtype,
            &opts.device,
        )?);
    }
    let wpath = r.weights.first().cloned().unwrap_or_default();
    let varmap = VarMap::new();
    let model = SequenceClassifier::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, opts.dtype, &opts.device),
    )?;
    let mut tensors = HashMap::new();
    {
        let data = crate::checkpoint::lock(&varmap)?;
        for (name, var) in data.iter() {
            let Some(theirs) = bert_name(name) else {
                continue;
            };
            let t = file_tensors
                .get(&theirs)
                .or_else(|| file_tensors.get(&format!("bert.{theirs}")))
                .ok_or_else(|| {
                    Error::checkpoint(&wpath, format!("missing tensor `{theirs}` (for `{name}`)"))
                })?;
            crate::checkpoint::set_checked(var, t, &theirs, &wpath)?;
            tensors.insert(name.clone(), t.clone());
        }
    }
    let tokenizer = match &r.tokenizer {
        Some(p) => Some(crate::data::tokenizer::load(p)?),
        None => None,
    };
    Ok(DenseEncoder {
        model,
        varmap,
        config: cfg,
        tokenizer,
        tensors,
    })
}

/// Sparse upcycling: builds a [`SequenceClassifier`] whose every feed-forward is an MoE of
/// `num_experts` copies of the dense one (top-`top_k`, renormalised), with Gaussian noise of
/// relative scale `noise` added to each copy, a fresh router and the dense model's other
/// weights (including its classification head).
pub fn upcycle(
    dense: &DenseEncoder,
    num_experts: usize,
    top_k: usize,
    noise: f64,
    seed: u64,
) -> Result<(SequenceClassifier, VarMap, ModelConfig)> {
    let mut cfg = dense.config.clone();
    cfg.sparse_step = 1;
    cfg.moe.num_experts = num_experts;
    cfg.moe.top_k = top_k;
    cfg.moe.norm_topk_prob = true;
    cfg.moe.intermediate_size = dense.config.dense_intermediate_size;
    cfg.validate()?;
    let dev = dense
        .tensors
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let dtype = dense
        .tensors
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    let varmap = VarMap::new();
    let model = SequenceClassifier::new(&cfg, VarBuilder::from_varmap(&varmap, dtype, &dev))?;
    let src = crate::checkpoint::varmap_tensors(&dense.varmap)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    {
        let data = crate::checkpoint::lock(&varmap)?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if let Some(t) = src.get(name) {
                var.set(t)?;
                continue;
            }
            // `...block_sparse_moe.experts.{i}.{rest}` <- `...mlp.{rest}`
            if let Some((pre, post)) = name.split_once(".block_sparse_moe.experts.") {
                if let Some((_, rest)) = post.split_once('.') {
                    let dense_name = format!("{pre}.mlp.{rest}");
                    let t = src.get(&dense_name).ok_or_else(|| {
                        Error::Config(format!(
                            "upcycle: dense model has no `{dense_name}` for `{name}`"
                        ))
                    })?;
                    let t = if noise > 0.0 {
                        let std = t
                            .to_dtype(DType::F64)?
                            .sqr()?
                            .mean_all()?
                            .sqrt()?
                            .to_scalar::<f64>()?
                            * noise;
                        let n: Vec<f32> = (0..t.elem_count())
                            .map(|_| {
                                let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                                let u2: f64 = rng.random();
                                (std * (-2.0 * u1.ln()).sqrt()
                                    * (2.0 * std::f64::consts::PI * u2).cos())
                                    as f32
                            })
                            .collect();
                        (t + Tensor::from_vec(n, t.dims(), t.device())?.to_dtype(t.dtype())?)?
                    } else {
                        t.clone()
                    };
                    var.set(&t)?;
                }
            }
            // Routers keep their fresh initialisation.
        }
    }
    Ok((model, varmap, cfg))
}
