//! Summary statistics of a router's forward: entropy, mean probability per expert, selection
//! bias (what the trainer's per-layer history records).

use candle_core::{DType, Result, Tensor};

use crate::ops::HostRead;

use super::router::RouterOutput;

/// Summary statistics of one forward's router (read back with the layer's expert ids, in the
/// same device-to-host transfer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterStats {
    /// Mean over tokens of the entropy `−Σ_e p_e log p_e` (nats) of the softmax router
    /// probabilities (whatever the scoring; `ln E` is uniform, 0 is one expert per token).
    pub entropy: f64,
    /// Mean softmax router probability per expert over the tokens (`P_e` of the
    /// load-balancing loss), `E` values summing to 1.
    pub mean_probs: Vec<f64>,
    /// The router's selection bias (`Router::selection_bias`) when it has one, else empty.
    pub selection_bias: Vec<f64>,
}

impl RouterStats {
    /// The statistics of `routed` (and the router's selection bias `bias`) as one f32 vector on
    /// the device, `[entropy, mean P (E), bias (E or 0)]`, no gradient: what
    /// [`Self::from_host`] reads back (the layer appends it to its one transfer of expert ids).
    pub(crate) fn device_vector(routed: &RouterOutput, bias: Option<&Tensor>) -> Result<Tensor> {
        let probs = routed.probs.detach(); // (n, E)
        let log_p = candle_nn::ops::log_softmax(&routed.logits.detach(), 1)?; // finite
        let entropy = (probs.mul(&log_p)?.sum(1)?.mean_all()? * -1.0)?.reshape(1)?;
        // The router computes in f32 (f64 models in f64): one f32 vector for the transfer.
        let mut parts = vec![
            entropy.to_dtype(DType::F32)?,
            probs.mean(0)?.to_dtype(DType::F32)?,
        ];
        if let Some(b) = bias {
            parts.push(b.detach().to_dtype(DType::F32)?.flatten_all()?);
        }
        Tensor::cat(&parts, 0)
    }

    /// The statistics from the host copy of [`Self::device_vector`] for `e` experts.
    pub(crate) fn from_host(v: &[f32], e: usize) -> Self {
        let f = |s: &[f32]| s.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        Self {
            entropy: v.first().map_or(f64::NAN, |&x| x as f64),
            mean_probs: f(v.get(1..1 + e).unwrap_or(&[])),
            selection_bias: f(v.get(1 + e..).unwrap_or(&[])),
        }
    }

    /// The statistics of `routed` in a transfer of their own (layers that make no other).
    pub(crate) fn fetch(routed: &RouterOutput, bias: Option<&Tensor>) -> Result<Self> {
        let v = Self::device_vector(routed, bias)?.host_vec1::<f32>()?;
        Ok(Self::from_host(&v, routed.probs.dim(1)?))
    }
}
