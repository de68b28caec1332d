//! Per-expert tensors <-> fused expert tensors: the readings of a fused `gate_up` tensor, the
//! slice of one expert out of a fused tensor (loading), and the fused tensors `save_pretrained`
//! writes from per-expert ones (GraniteMoE's `input_linear` / `output_linear`, gpt-oss's
//! interleaved `gate_up_proj` with biases, or transformers 5's `experts.gate_up_proj` /
//! `experts.down_proj` on request).

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::layout::{Dims, Part, Slice};
use super::{hf_name, Family};
use crate::config::ModelConfig;

/// How the gate and up projections of every expert sit in a fused `gate_up` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// `gate_up` `[E, 2I, H]`: rows `0..I` gate, `I..2I` up; `down` `[E, H, I]`.
    Rows,
    /// `gate_up` `[E, H, 2I]`: columns `0..I` gate, `I..2I` up; `down` `[E, I, H]`.
    Cols,
    /// `gate_up` `[E, H, 2I]`: even columns gate, odd columns up; `down` `[E, I, H]` (gpt-oss).
    Interleaved,
}

impl Reading {
    /// Its name in error messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Reading::Rows => "gate/up stacked by rows [E, 2I, H] with down [E, H, I]",
            Reading::Cols => "gate/up stacked by columns [E, H, 2I] with down [E, I, H]",
            Reading::Interleaved => "gate/up interleaved by columns [E, H, 2I] with down [E, I, H]",
        }
    }

    /// The shape of the fused gate/up tensor.
    pub(crate) fn gate_up(self, d: Dims) -> Vec<usize> {
        match self {
            Reading::Rows => vec![d.experts, 2 * d.inter, d.hidden],
            _ => vec![d.experts, d.hidden, 2 * d.inter],
        }
    }

    /// The shape of the fused down tensor.
    pub(crate) fn down(self, d: Dims) -> Vec<usize> {
        match self {
            Reading::Rows => vec![d.experts, d.hidden, d.inter],
            _ => vec![d.experts, d.inter, d.hidden],
        }
    }
}

/// The readings a family's checkpoints may use, and its known one (which resolves a shape that
/// fits several). Families stored per expert by transformers have no known fused layout.
pub(crate) fn family_readings(family: Family) -> (&'static [Reading], Option<Reading>) {
    match family {
        Family::GptOss => (&[Reading::Interleaved], Some(Reading::Interleaved)),
        Family::GraniteMoe => (&[Reading::Rows], Some(Reading::Rows)),
        _ => (&[Reading::Rows, Reading::Cols], None),
    }
}

/// Expert `s.expert`'s tensor `s.part` out of the whole fused tensor `t` (dequantised, in the
/// load dtype): a view of `t` for the rows layout, a contiguous copy of the one expert otherwise.
pub(crate) fn slice(t: &Tensor, s: &Slice) -> candle_core::Result<Tensor> {
    let x = t.get(s.expert)?; // (a, b) or (n,) for biases
    let i = s.inter;
    let pick = |x: &Tensor, k: usize| -> candle_core::Result<Tensor> {
        // Columns k, k + 2, ... of (h, 2i) -> (i, h).
        let (h, _) = x.dims2()?;
        x.reshape((h, i, 2))?
            .narrow(2, k, 1)?
            .squeeze(2)?
            .t()?
            .contiguous()
    };
    match (s.part, s.reading) {
        (Part::Gate, Reading::Rows) => x.narrow(0, 0, i),
        (Part::Up, Reading::Rows) => x.narrow(0, i, i),
        (Part::Gate, Reading::Cols) => x.narrow(1, 0, i)?.t()?.contiguous(),
        (Part::Up, Reading::Cols) => x.narrow(1, i, i)?.t()?.contiguous(),
        (Part::Gate, Reading::Interleaved) => pick(&x, 0),
        (Part::Up, Reading::Interleaved) => pick(&x, 1),
        (Part::Down, Reading::Rows) => Ok(x),
        (Part::Down, _) => x.t()?.contiguous(),
        (Part::GateBias, Reading::Interleaved) => {
            x.reshape((i, 2))?.narrow(1, 0, 1)?.squeeze(1)?.contiguous()
        }
        (Part::UpBias, Reading::Interleaved) => {
            x.reshape((i, 2))?.narrow(1, 1, 1)?.squeeze(1)?.contiguous()
        }
        (Part::GateBias, _) => x.narrow(0, 0, i),
        (Part::UpBias, _) => x.narrow(0, i, i),
        (Part::DownBias, _) => Ok(x),
    }
}

/// Removes the `E` per-expert tensors named by `name(e)` from `tensors`; `None` (nothing
/// removed) unless all are there.
fn take(
    tensors: &mut BTreeMap<String, Tensor>,
    experts: usize,
    name: impl Fn(usize) -> String,
) -> Option<Vec<Tensor>> {
    if !(0..experts).all(|e| tensors.contains_key(&name(e))) {
        return None;
    }
    (0..experts).map(|e| tensors.remove(&name(e))).collect()
}

/// Stacks one tensor per expert, each made by `f`, into `[E, ...]`.
fn stack_with(
    parts: &[(Tensor, Tensor)],
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let each = parts
        .iter()
        .map(|(a, b)| f(a, b))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&each, 0)?.contiguous()
}

/// Replaces the per-expert tensors of every sparse layer of `tensors` (the family's names) by
/// the fused tensors of the family's on-disk layout: GraniteMoE `input_linear` [E, 2I, H] +
/// `output_linear` [E, H, I]; gpt-oss `gate_up_proj` [E, H, 2I] (gate and up interleaved by
/// columns) + `down_proj` [E, I, H] and their biases; any other family transformers 5's
/// `mlp.experts.gate_up_proj` [E, 2I, H] + `mlp.experts.down_proj` [E, H, I], with the layer's
/// other MoE tensors moved under `mlp.` (Mixtral's `block_sparse_moe.`).
pub(crate) fn fuse_for_save(
    family: Family,
    cfg: &ModelConfig,
    tensors: &mut BTreeMap<String, Tensor>,
) -> candle_core::Result<()> {
    let d = Dims {
        experts: cfg.moe.num_experts,
        hidden: cfg.hidden_size,
        inter: cfg.moe.intermediate_size,
    };
    for l in (0..cfg.num_layers).filter(|l| cfg.is_sparse_layer(*l)) {
        let name = |w: &'static str, kind: &'static str| {
            move |e: usize| {
                hf_name(
                    family,
                    &format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.{kind}"),
                )
            }
        };
        let wanted = name("w1", "weight")(0);
        let wanted = wanted
            .split(".experts.")
            .next()
            .unwrap_or_default()
            .to_string();
        let (Some(w1), Some(w3), Some(w2)) = (
            take(tensors, d.experts, name("w1", "weight")),
            take(tensors, d.experts, name("w3", "weight")),
            take(tensors, d.experts, name("w2", "weight")),
        ) else {
            continue;
        };
        let gate_up: Vec<(Tensor, Tensor)> = w1.into_iter().zip(w3).collect();
        let down: Vec<(Tensor, Tensor)> = w2.iter().map(|w| (w.clone(), w.clone())).collect();
        let biases = (
            take(tensors, d.experts, name("w1", "bias")),
            take(tensors, d.experts, name("w3", "bias")),
            take(tensors, d.experts, name("w2", "bias")),
        );
        match family {
            Family::GraniteMoe => {
                let gu = stack_with(&gate_up, |g, u| Tensor::cat(&[g, u], 0))?;
                tensors.insert(format!("{wanted}.input_linear.weight"), gu);
                let dn = stack_with(&down, |w, _| Ok(w.clone()))?;
                tensors.insert(format!("{wanted}.output_linear.weight"), dn);
            }
            Family::GptOss => {
                let (h, i2) = (d.hidden, 2 * d.inter);
                let gu = stack_with(&gate_up, |g, u| {
                    Tensor::stack(&[&g.t()?, &u.t()?], 2)?.reshape((h, i2)) // (h, i, 2) -> (h, 2i)
                })?;
                tensors.insert(format!("{wanted}.experts.gate_up_proj"), gu);
                let dn = stack_with(&down, |w, _| w.t()?.contiguous())?;
                tensors.insert(format!("{wanted}.experts.down_proj"), dn);
                if let (Some(b1), Some(b3), Some(b2)) = biases {
                    let pairs: Vec<(Tensor, Tensor)> = b1.into_iter().zip(b3).collect();
                    let gb = stack_with(&pairs, |g, u| Tensor::stack(&[g, u], 1)?.reshape(i2))?;
                    tensors.insert(format!("{wanted}.experts.gate_up_proj_bias"), gb);
                    tensors.insert(
                        format!("{wanted}.experts.down_proj_bias"),
                        Tensor::stack(&b2, 0)?,
                    );
                }
            }
            _ => {
                let stored = format!("model.layers.{l}.mlp");
                let gu = stack_with(&gate_up, |g, u| Tensor::cat(&[g, u], 0))?;
                tensors.insert(format!("{stored}.experts.gate_up_proj"), gu);
                let dn = stack_with(&down, |w, _| Ok(w.clone()))?;
                tensors.insert(format!("{stored}.experts.down_proj"), dn);
                if stored != wanted {
                    let moved: Vec<String> = tensors
                        .keys()
                        .filter(|k| k.starts_with(&format!("{wanted}.")))
                        .cloned()
                        .collect();
                    for k in moved {
                        if let Some(t) = tensors.remove(&k) {
                            tensors.insert(k.replacen(&wanted, &stored, 1), t);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
