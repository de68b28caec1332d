//! BERT-family encoders (post-norm LayerNorm, learned absolute positions, token-type
//! embeddings, GELU feed-forward with biases) loaded onto the crate's [`SequenceClassifier`]
//! trunk, as the dense starting point of sparse upcycling ([`crate::upcycle`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

use crate::config::{ExpertKind, ModelConfig, NormKind, Pooling, PositionKind};
use crate::error::{Error, Result};
use crate::io::hub::{resolve, LoadOptions};
use crate::io::safetensors::{parse_safetensors, read_file, set_checked};
use crate::models::SequenceClassifier;
use crate::ops::lock;

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
    if mt == "roberta" {
        return Err(Error::Config(format!(
            "{}: model_type `roberta` is not supported (its position ids start after the padding index; only `bert` is implemented)",
            path.display()
        )));
    }
    if !matches!(mt, "bert" | "") {
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
    let text = crate::files::read_json_text(&r.config, "config.json")?;
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
        let data = lock(varmap.data());
        for (name, var) in data.iter() {
            let Some(theirs) = bert_name(name) else {
                continue;
            };
            let t = file_tensors
                .get(&theirs)
                .or_else(|| file_tensors.get(&format!("bert.{theirs}")))
                .ok_or_else(|| {
                    Error::tensor(
                        &wpath,
                        &theirs,
                        crate::error::CheckpointErrorKind::Missing,
                        format!("missing tensor `{theirs}` (for `{name}`)"),
                    )
                })?;
            set_checked(var, t, &theirs, &wpath)?;
            tensors.insert(name.clone(), t.clone());
        }
    }
    let tokenizer = match &r.tokenizer {
        Some(p) => Some(crate::tokenizer::load(p)?),
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
