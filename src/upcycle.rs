//! Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
//! from Dense Checkpoints"): each dense feed-forward becomes `E` experts that start as copies of
//! it (plus optional noise) with a freshly initialised router; with identical experts and
//! renormalised gate weights the upcycled model computes exactly what the dense one did.
//! Dense BERT checkpoints are read by [`crate::io::bert`].

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::bert::DenseEncoder;
use crate::io::safetensors::varmap_tensors;
use crate::models::SequenceClassifier;
use crate::ops::{normal, sorted_vars};

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
    let src = varmap_tensors(&dense.varmap)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    {
        for (name, var) in sorted_vars(&varmap) {
            let name = &name;
            if let Some(t) = src.get(name) {
                var.set(t)?;
                continue;
            }
            // `...block_sparse_moe.experts.{i}.{rest}` <- `...mlp.{rest}`
            if let Some((pre, post)) = name.split_once(".block_sparse_moe.experts.") {
                if let Some((_, rest)) = post.split_once('.') {
                    let dense_name = format!("{pre}.mlp.{rest}");
                    let t = src.get(&dense_name).ok_or_else(|| {
                        Error::Upcycle(format!(
                            "the dense model has no `{dense_name}` for `{name}`"
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
                            .map(|_| (std * normal(&mut rng)) as f32)
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
