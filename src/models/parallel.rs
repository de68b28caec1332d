//! The expert-parallel [`CausalLm`]: every sparse layer an
//! [`ExpertParallelMoe`](crate::dist::ExpertParallelMoe) over one communicator, the rest
//! (embeddings, attention, norms, routers, shared experts) replicated on every rank; and what
//! a run needs around it: the rank's own expert parameters (what the trainer must not average)
//! and the whole model assembled on rank 0 (checkpoints, evaluation). See
//! `docs/expert_parallel.md`.

use std::sync::Arc;

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

use super::CausalLm;
use crate::block::FeedForward;
use crate::config::ModelConfig;
use crate::dist::{expert_id, gather_experts, Communicator};

impl CausalLm {
    /// Builds rank `comm.rank()`'s part of an expert-parallel model: the weight names are
    /// those of [`CausalLm::new`] (a single-process checkpoint loads unchanged); every rank
    /// holds the embeddings, attention, norms and routers, and of each sparse layer only its
    /// own experts `[r·E/W, (r+1)·E/W)` (`E` divisible by the world size `W`; token-choice
    /// routing; no sequence-wise or CV² loss).
    ///
    /// Its forwards are collectives: every rank calls them (and the backward of their losses)
    /// in the same order, each on its own tokens (at least one). The logits are the rank's;
    /// the pooled load-balancing and z-loss have the value of the single-process losses over
    /// the union of the ranks' tokens (each rank's gradient reaching its own router inputs
    /// only, the ranks' gradients summing to the global loss's); the routing statistics
    /// (counts, drops, tokens, entropy, mean probabilities) are global. Train it with a
    /// [`Trainer`](crate::Trainer) given the communicator and
    /// [`Self::sharded_parameters`] ([`crate::Trainer::set_comm`]).
    ///
    /// # Shapes
    /// As [`CausalLm::new`]'s model: `input_ids` `(b, t)` -> `logits` `(b, t, vocab)`.
    pub fn new_expert_parallel(
        cfg: &ModelConfig,
        vb: VarBuilder,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated_with(cfg, vb, Some(comm))
    }

    /// The communicator of an expert-parallel model; `None` for a single-process one.
    pub fn comm(&self) -> Option<&Arc<dyn Communicator>> {
        self.comm.as_ref()
    }

    /// The parameters only this rank holds: its experts of every sparse layer (empty for a
    /// single-process model). The trainer sums nothing over the ranks for these and counts
    /// them once in the global gradient norm.
    pub fn sharded_parameters(&self) -> Vec<(String, Tensor)> {
        if self.comm.is_none() {
            return vec![];
        }
        self.params
            .iter()
            .filter(|(n, _)| is_sparse_expert(n))
            .cloned()
            .collect()
    }

    /// The whole model on one process: for an expert-parallel model, a collective that gathers
    /// every rank's experts to rank 0 and returns there a single-process, frozen model (plain
    /// [`SparseMoe`](crate::moe::SparseMoe) layers, every expert; the origin kept), `None` on
    /// the other ranks; for a single-process model, its frozen copy. What rank 0 writes a
    /// checkpoint from ([`CausalLm::checkpoint_files`], `save_pretrained`) or evaluates.
    pub fn gathered(&self) -> Result<Option<CausalLm>> {
        let Some(comm) = &self.comm else {
            return Ok(Some(self.frozen_copy()?));
        };
        let sharded = self.sharded_parameters();
        let local: Vec<(String, Tensor)> = sharded
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        let Some(experts) = gather_experts(comm, &local, self.cfg.moe.num_experts)? else {
            return Ok(None);
        };
        let Some((_, first)) = self.params.first() else {
            bail!("the model has no parameters")
        };
        let (dtype, dev) = (first.dtype(), first.device().clone());
        let mut map: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .filter(|(n, _)| !is_sparse_expert(n))
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        map.extend(experts);
        let vb = VarBuilder::from_tensors(map, dtype, &dev);
        let mut full = Self::new_validated_with(&self.cfg, vb, None)?;
        full.origin = super::Origin {
            varmap: None,
            ..self.origin.clone()
        };
        Ok(Some(full))
    }

    /// Whether any block's feed-forward is expert-parallel.
    pub fn is_expert_parallel(&self) -> bool {
        self.trunk
            .layers()
            .iter()
            .any(|b| matches!(b.feed_forward(), FeedForward::ExpertParallel(_)))
    }
}

/// Whether `name` is a routed expert's parameter of a sparse layer
/// (`…block_sparse_moe.experts.{i}.…`; not the shared expert).
fn is_sparse_expert(name: &str) -> bool {
    name.contains("block_sparse_moe.experts.") && expert_id(name).is_some()
}
