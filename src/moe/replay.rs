//! Routing replay ("rollout routing replay", R3): record the experts a forward chose, per
//! sparse layer, and force them in a later forward.
//!
//! A replayed forward keeps the recorded expert ids (the selection is not recomputed), but the
//! gate weights come from the *current* router: its scores (softmax, or sigmoid with
//! `scoring = sigmoid`) gathered at the forced ids, renormalised when the configuration
//! renormalises (`norm_topk_prob`), times `routed_scaling_factor`, exactly as the router forms
//! the weights of its own choice. So replaying the ids a router would choose reproduces its
//! forward bit for bit, and after the router changed the output uses the recorded experts with
//! the new router's weights, differentiable with respect to the router. With noisy gating the
//! replayed weights are the noise-free scores. Capacity drops are applied to the forced ids as
//! to chosen ones; the load-balancing loss counts the forced assignments.
//!
//! Replay applies to token-choice routing (expert choice records nothing: its picks depend on
//! the whole batch).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::ops::HostRead;

use super::router::RouterOutput;
use crate::config::{MoeConfig, RouterScoring};

/// The expert ids one sparse layer chose.
#[derive(Debug, Clone)]
pub struct RecordedLayer {
    /// Block index, numbered as in [`crate::models::LayerRouting::layer`].
    pub layer: usize,
    /// Chosen expert ids `(tokens, k)` u32, best first.
    pub expert_ids: Tensor,
}

/// The expert ids every (token-choice) sparse layer of a forward chose, for
/// [`crate::models::CausalLm::forward_replay`] or, per layer,
/// [`super::SparseMoe::forward_replay`].
#[derive(Debug, Clone, Default)]
pub struct RoutingRecord {
    layers: Vec<RecordedLayer>,
}

impl RoutingRecord {
    /// A record from per-layer ids (e.g. the routing an inference engine reported); layer
    /// indices must be distinct.
    pub fn new(layers: Vec<RecordedLayer>) -> Result<Self> {
        for (i, l) in layers.iter().enumerate() {
            if layers[..i].iter().any(|p| p.layer == l.layer) {
                bail!("RoutingRecord: layer {} is recorded twice", l.layer)
            }
        }
        Ok(Self { layers })
    }

    /// Appends one layer's ids (the models record in layer order).
    pub(crate) fn push(&mut self, layer: usize, expert_ids: Tensor) {
        self.layers.push(RecordedLayer { layer, expert_ids });
    }

    /// The recorded layers, in layer order.
    pub fn layers(&self) -> &[RecordedLayer] {
        &self.layers
    }

    /// The ids recorded for block `layer`, if any.
    pub fn get(&self, layer: usize) -> Option<&Tensor> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| &l.expert_ids)
    }

    /// Number of recorded layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether no layer is recorded.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// Checks replayed ids against a layer routing `n` tokens to `k` of `num_experts` experts:
/// shape `(n, k)`, integer, each in `0..E`, no expert twice for a token. Returns them as a u32
/// tensor on `device`.
pub(crate) fn check_ids(
    ids: &Tensor,
    n: usize,
    k: usize,
    num_experts: usize,
    device: &Device,
) -> Result<Tensor> {
    if ids.dims() != [n, k] {
        bail!(
            "replay: expert ids must be (tokens, top_k) = ({n}, {k}), got shape {:?}",
            ids.dims()
        )
    }
    if ids.dtype().is_float() {
        bail!(
            "replay: expert ids must be integers (u32), got {:?}",
            ids.dtype()
        )
    }
    let host = ids
        .to_dtype(DType::I64)?
        .flatten_all()?
        .host_vec1::<i64>()?;
    for (t, row) in host.chunks(k.max(1)).enumerate() {
        for (j, &e) in row.iter().enumerate() {
            if e < 0 || e as u64 >= num_experts as u64 {
                bail!(
                    "replay: expert id {e} of token {t} is out of range for {num_experts} experts"
                )
            }
            if row[..j].contains(&e) {
                bail!("replay: token {t} lists expert {e} twice")
            }
        }
    }
    let ids: Vec<u32> = host.iter().map(|&e| e as u32).collect();
    Tensor::from_vec(ids, (n, k), device)
}

/// The gate weights `(n, k)` of the forced `ids` under the current router output, formed as
/// the router forms the weights of its own choice (see the module doc).
pub(crate) fn forced_weights(
    cfg: &MoeConfig,
    routed: &RouterOutput,
    ids: &Tensor,
) -> Result<Tensor> {
    let sigmoid = cfg.scoring == RouterScoring::Sigmoid;
    let scores = if sigmoid {
        candle_nn::ops::sigmoid(&routed.logits)?
    } else {
        routed.probs.clone()
    };
    let weights = scores.gather(ids, 1)?; // (n, k)
    let weights = if cfg.norm_topk_prob && (cfg.top_k < cfg.num_experts || sigmoid) {
        let sum = weights.sum_keepdim(1)?;
        let sum = if sigmoid { (sum + 1e-20)? } else { sum };
        weights.broadcast_div(&sum)?
    } else {
        weights
    };
    if cfg.routed_scaling_factor != 1.0 {
        weights * cfg.routed_scaling_factor
    } else {
        Ok(weights)
    }
}
