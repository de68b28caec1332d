//! Balancing done by the trainer rather than by a loss of one forward: DeepSeek-V3's
//! auxiliary-loss-free bias update (after each applied step) and global-batch load balancing
//! (the load-balancing loss recounted over the step's micro-batches).
//!
//! The bias of a sparse layer is the variable `…gate.e_score_correction_bias` of the model's
//! `VarMap` ([`SELECTION_BIAS`]): AdamW never optimises it (no moments, no weight decay), and
//! the checkpoint writers save it like any variable. The trainer learns which layer each bias
//! belongs to from the model ([`super::Trainer::track_selection_biases`] with e.g.
//! [`crate::CausalLm::selection_biases`]), keyed by [`crate::LayerRouting::layer`].

use candle_core::{Tensor, Var};

use crate::ops::HostRead;
use candle_nn::VarMap;

use super::LossParts;
use crate::error::{Error, Result};

/// The last component of a selection-bias variable's name; AdamW skips these variables.
pub const SELECTION_BIAS: &str = "e_score_correction_bias";

/// Whether the variable `name` is a router selection bias (updated by the trainer's rule, not
/// by the optimizer).
pub fn is_selection_bias(name: &str) -> bool {
    name == SELECTION_BIAS || name.ends_with(&format!(".{SELECTION_BIAS}"))
}

/// The variables of `varmap` behind the `(layer, tensor)` pairs, matched by tensor identity.
pub(crate) fn find_bias_vars(
    varmap: &VarMap,
    biases: &[(usize, Tensor)],
) -> Result<Vec<(usize, Var)>> {
    let data = crate::ops::lock(varmap.data());
    let mut out = Vec::with_capacity(biases.len());
    for (layer, t) in biases {
        let Some(v) = data.values().find(|v| v.as_tensor().id() == t.id()) else {
            return Err(Error::Config(format!(
                "train: the selection bias of layer {layer} is not a variable of the trainer's VarMap (the model was built over another VarMap, or loaded frozen)"
            )));
        };
        if out.iter().any(|(l, _): &(usize, Var)| l == layer) {
            return Err(Error::Config(format!(
                "train: two selection biases given for layer {layer}"
            )));
        }
        out.push((*layer, v.clone()));
    }
    Ok(out)
}

/// `x`'s sign, 0 for 0.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The new bias from the old one and a layer's loads: `b_e + γ · sign(mean − load_e)`, then
/// mean-centred.
pub fn updated_bias(bias: &[f64], load: &[f64], gamma: f64) -> Vec<f64> {
    let e = load.len().max(1) as f64;
    let mean = load.iter().sum::<f64>() / e;
    let moved: Vec<f64> = bias
        .iter()
        .zip(load)
        .map(|(b, l)| b + gamma * sign(mean - l))
        .collect();
    let centre = moved.iter().sum::<f64>() / moved.len().max(1) as f64;
    moved.iter().map(|b| b - centre).collect()
}

/// Each tracked layer's kept assignments per expert over `micro` (`None`: the layer did not
/// route in this step).
pub(crate) fn bias_loads(
    biases: &[(usize, Var)],
    micro: &[LossParts],
) -> Result<Vec<Option<Vec<f64>>>> {
    let mut out = Vec::with_capacity(biases.len());
    for (layer, var) in biases {
        let e = var.elem_count();
        let mut load = vec![0f64; e];
        let mut seen = false;
        for r in micro.iter().flat_map(|p| p.routing.iter()) {
            if r.layer != *layer {
                continue;
            }
            if r.expert_counts.len() != e {
                return Err(Error::Config(format!(
                    "train: layer {layer} routed over {} experts but its selection bias has {e}",
                    r.expert_counts.len()
                )));
            }
            seen = true;
            for (l, c) in load.iter_mut().zip(&r.expert_counts) {
                *l += *c as f64;
            }
        }
        out.push(seen.then_some(load));
    }
    Ok(out)
}

/// Moves every tracked bias by its layer's `loads` ([`updated_bias`]; a layer without loads
/// keeps its bias).
pub(crate) fn apply_bias_updates(
    biases: &[(usize, Var)],
    loads: &[Option<Vec<f64>>],
    gamma: f64,
) -> Result<()> {
    for ((_, var), load) in biases.iter().zip(loads) {
        let Some(load) = load else {
            continue;
        };
        let e = var.elem_count();
        let old = var
            .as_tensor()
            .to_dtype(candle_core::DType::F64)?
            .host_vec1::<f64>()?;
        let new = updated_bias(&old, load, gamma);
        let t = Tensor::from_vec(new, e, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// The load-balancing loss of each micro-batch with `F_e` counted over all of them, or `None`
/// when a micro-batch carries no router outputs (then each keeps its own loss).
pub(crate) fn global_load_balancing(micro: &[LossParts]) -> Result<Option<Vec<Tensor>>> {
    if micro.iter().any(|p| p.balance.router_aux.is_empty()) {
        return Ok(None);
    }
    let num_experts = micro[0].balance.router_aux[0].probs.dim(1)?;
    let layers: Vec<&[crate::losses::RouterAux]> = micro
        .iter()
        .map(|p| p.balance.router_aux.as_slice())
        .collect();
    Ok(Some(crate::losses::balance::global_batch_load_balancing(
        &layers,
        num_experts,
    )?))
}
