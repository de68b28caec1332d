//! LoRA fine-tuning of a [`CausalLm`]: adapters attached to the attention projections and to
//! every expert (and dense feed-forward), trained through their own `VarMap` while the base
//! weights stay fixed, then merged into the base weights (for `save_pretrained`).

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;

use super::CausalLm;
use crate::block::FeedForward;
use crate::layers::{LoraConfig, Proj};

/// Visits every projection a [`LoraConfig`] targets, with its weight's name prefix.
fn for_each_target(
    model: &mut CausalLm,
    cfg: &LoraConfig,
    mut f: impl FnMut(&str, &mut Proj) -> Result<()>,
) -> Result<()> {
    for (i, layer) in model.trunk.layers_mut().iter_mut().enumerate() {
        if cfg.attention {
            for (name, p) in layer.attention_mut().projs_mut() {
                f(&format!("model.layers.{i}.self_attn.{name}"), p)?;
            }
        }
        if !cfg.experts {
            continue;
        }
        match layer.feed_forward_mut() {
            FeedForward::Dense(e) => {
                for (name, p) in e.projs_mut() {
                    f(&format!("model.layers.{i}.mlp.{name}"), p)?;
                }
            }
            FeedForward::ExpertParallel(_) => {
                bail!("LoRA: adapters on the experts of an expert-parallel model are not supported (layer {i})")
            }
            FeedForward::Sparse(moe) => {
                for (j, e) in moe.experts_mut().experts_mut().iter_mut().enumerate() {
                    for (name, p) in e.projs_mut() {
                        f(
                            &format!("model.layers.{i}.block_sparse_moe.experts.{j}.{name}"),
                            p,
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

impl CausalLm {
    /// Attaches fresh LoRA adapters (rank `cfg.rank`, `B = 0`, so the model's outputs are
    /// unchanged) and returns the `VarMap` holding only them: train it with
    /// [`Trainer`](crate::Trainer) and only the adapters change. On experts the adapters run in
    /// split form on each expert's tokens (`x Aᵀ` then `· Bᵀ`), never forming `ΔW`.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<VarMap> {
        if !cfg.attention && !cfg.experts {
            bail!("LoRA: no targets (attention and experts both off)")
        }
        if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
            bail!("LoRA: alpha must be finite and > 0, got {}", cfg.alpha)
        }
        let varmap = VarMap::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        for_each_target(self, cfg, |name, p| {
            if p.lora().is_some() {
                bail!("LoRA: `{name}` already has an adapter")
            }
            p.attach_lora(cfg, name, &varmap, &mut rng)
        })?;
        Ok(varmap)
    }

    /// Merges every adapter into its base weight (`W + s · B A`) and rebuilds the model over
    /// the merged weights as a frozen inference model without adapters, ready for
    /// `save_pretrained`.
    pub fn merge_lora(&mut self) -> Result<()> {
        let all = LoraConfig::default();
        let mut merged: HashMap<String, Tensor> = HashMap::new();
        for_each_target(self, &all, |name, p| {
            if p.lora().is_some() {
                merged.insert(format!("{name}.weight"), p.merged_weight()?);
            }
            Ok(())
        })?;
        if merged.is_empty() {
            bail!("merge_lora: the model has no adapters")
        }
        let rebuilt = self.rebuilt_over(merged)?;
        *self = rebuilt;
        Ok(())
    }
}
