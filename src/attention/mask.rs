//! Attention masks and the attention softmax: causal and sliding-window masks (Beltagy et al.
//! 2020, Longformer; Mistral's sliding window), padding masks, and learned attention sinks
//! (Xiao et al. 2023; gpt-oss's per-head sink logit that joins every softmax row as an extra
//! column and is dropped after the softmax).
//!
//! Which keys a query sees (transformers' `masking_utils.py`: `causal_mask_function` and
//! `sliding_window_overlay`): query at absolute position `i = offset + q` sees key `j` iff
//! `j <= i` (causal) and, with a window `w`, `j > i - w` — the `w` most recent positions,
//! itself included.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::ops::softmax_last_dim;

/// A large negative logit for masked keys (as an additive bias).
const NEG: f32 = -1e9;

/// Whether query row `i` (absolute position `offset + i`) may see key `j` (the oracle of the
/// tensor-made masks in the tests).
#[cfg(test)]
fn visible(i: usize, j: usize, offset: usize, causal: bool, window: Option<usize>) -> bool {
    let pos = offset + i;
    (!causal || j <= pos) && window.is_none_or(|w| j + w > pos)
}

/// Additive attention bias `(b, 1, t_q, t_k)` in f32, or `None` when nothing is masked.
///
/// `causal` allows key `j` for query `i` iff `j <= offset + i`; `key_mask` `(b, t_k)` (1 = keep,
/// 0 = padding) removes padding keys.
pub fn attention_bias(
    b: usize,
    t_q: usize,
    t_k: usize,
    offset: usize,
    causal: bool,
    key_mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    window_bias(b, t_q, t_k, offset, causal, None, key_mask, dev)
}

/// [`attention_bias`] with a sliding window: query `i` (absolute position `offset + i`) also
/// loses the keys `j <= offset + i - window`.
#[allow(clippy::too_many_arguments)]
pub fn window_bias(
    b: usize,
    t_q: usize,
    t_k: usize,
    offset: usize,
    causal: bool,
    window: Option<usize>,
    key_mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    if window == Some(0) {
        bail!("sliding window must be > 0")
    }
    let mut bias: Option<Tensor> = None;
    // Something is masked iff the first query misses a later key (causal) or the last query
    // misses the first key (window).
    let any_masked =
        t_q > 0 && ((causal && t_k > offset + 1) || window.is_some_and(|w| offset + t_q > w));
    if any_masked {
        // Made on the device from two position ranges (no host-made T×T mask to upload):
        // query positions as a column, key positions as a row, compared by broadcasting.
        let pos = |lo: usize, n: usize| -> Result<Tensor> {
            Tensor::arange(lo as u32, (lo + n) as u32, dev)?.to_dtype(DType::F32)
        };
        let q = pos(offset, t_q)?.reshape((t_q, 1))?;
        let k = pos(0, t_k)?.reshape((1, t_k))?;
        let mut vis: Option<Tensor> = None;
        if causal {
            vis = Some(k.broadcast_le(&q)?.to_dtype(DType::F32)?);
        }
        if let Some(w) = window {
            let inside = (k + w as f64)?.broadcast_gt(&q)?.to_dtype(DType::F32)?;
            vis = Some(match vis {
                Some(v) => (v * inside)?,
                None => inside,
            });
        }
        if let Some(v) = vis {
            // visible 1 -> 0, masked 0 -> NEG
            let v = v
                .broadcast_as((t_q, t_k))?
                .affine(-(NEG as f64), NEG as f64)?;
            bias = Some(v.reshape((1, 1, t_q, t_k))?);
        }
    }
    if let Some(m) = key_mask {
        if m.dims() != [b, t_k] {
            bail!(
                "attention mask must be (batch, keys) = ({b}, {t_k}), got {:?}",
                m.dims()
            )
        }
        let pad =
            ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * NEG as f64)?).reshape((b, 1, 1, t_k))?;
        bias = Some(match bias {
            Some(c) => c.broadcast_add(&pad)?,
            None => pad,
        });
    }
    Ok(bias)
}

/// Softmax over the last dimension of f32 (or f64) scores `(b, heads, t_q, t_k)` (already scaled and
/// biased), with an optional per-head sink logit `(heads,)` joining every row as an extra
/// column that is dropped after the softmax. Differentiable when the inputs track gradients.
pub fn softmax_with_sinks(scores: &Tensor, sinks: Option<&Tensor>) -> Result<Tensor> {
    let Some(s) = sinks else {
        return if scores.track_op() {
            softmax_last_dim(scores)
        } else {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)
        };
    };
    let (b, h, t_q, t_k) = scores.dims4()?;
    let col = s
        .to_dtype(scores.dtype())?
        .reshape((1, h, 1, 1))?
        .broadcast_as((b, h, t_q, 1))?; // (b, h, t_q, 1)
    let all = Tensor::cat(&[scores, &col], 3)?; // (b, h, t_q, t_k + 1)
    let probs = if all.track_op() {
        softmax_last_dim(&all)?
    } else {
        candle_nn::ops::softmax_last_dim(&all.contiguous()?)?
    };
    probs.narrow(3, 0, t_k)
}

/// `softmax(scale · s)` over the last dimension of `(b, heads, t_q, t_k)` f32 scores, with keys
/// that query row `i` may not see (causal: `j > offset + i`; window `w`: `j <= offset + i - w`)
/// masked out (probability 0, as with an additive `-inf` bias), and an optional per-head sink
/// logit joining each row's normaliser. Inference only (no backward pass).
#[derive(Debug, Clone)]
pub(super) struct ScaledCausalSoftmax {
    pub(super) scale: f32,
    pub(super) causal: bool,
    pub(super) offset: usize,
    pub(super) window: Option<usize>,
    /// One sink logit per head (empty: no sinks).
    pub(super) sinks: Vec<f32>,
}

impl ScaledCausalSoftmax {
    /// The visible key range `lo..hi` of query row `i` among `t_k` keys.
    fn range(&self, i: usize, t_k: usize) -> (usize, usize) {
        let pos = self.offset + i;
        let hi = if self.causal { (pos + 1).min(t_k) } else { t_k };
        let lo = self
            .window
            .map_or(0, |w| (pos + 1).saturating_sub(w))
            .min(hi);
        (lo, hi)
    }
}

impl candle_core::CustomOp1 for ScaledCausalSoftmax {
    fn name(&self) -> &'static str {
        "scaled-causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let s = match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => bail!("scaled-causal-softmax: needs contiguous f32 scores"),
        };
        let dims = layout.shape().dims();
        let (heads, t_q, t_k) = match dims {
            [_, h, q, k] if *k > 0 => (*h, *q, *k),
            _ => bail!("scaled-causal-softmax: bad score shape {dims:?}"),
        };
        if !self.sinks.is_empty() && self.sinks.len() != heads {
            bail!(
                "scaled-causal-softmax: {} sinks for {heads} heads",
                self.sinks.len()
            )
        }
        let rows = s.len() / t_k;
        let mut out = vec![0f32; s.len()];
        let per_part = rows
            .div_ceil(8 * candle_core::utils::get_num_threads().max(1))
            .max(1);
        let scale = self.scale;
        crate::cpu::par_each(out.chunks_mut(per_part * t_k).collect(), |p, chunk| {
            for (r, o) in chunk.chunks_mut(t_k).enumerate() {
                let row = p * per_part + r;
                let i = row % t_q.max(1);
                let sink = self.sinks.get((row / t_q.max(1)) % heads).copied();
                let (lo, hi) = self.range(i, t_k);
                let x = &s[row * t_k + lo..row * t_k + hi];
                let mut m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
                if let Some(z) = sink {
                    m = m.max(z);
                }
                let mut sum = sink.map_or(0.0, |z| (z - m).exp());
                for (o, &v) in o[lo..hi].iter_mut().zip(x) {
                    let e = (v * scale - m).exp();
                    *o = e;
                    sum += e;
                }
                if sum > 0.0 {
                    let inv = 1.0 / sum;
                    o[lo..hi].iter_mut().for_each(|v| *v *= inv);
                }
            }
            Ok(())
        })?;
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device-made bias equals the per-element rule for causal, windowed and offset cases.
    #[test]
    fn window_bias_matches_the_visibility_rule() -> Result<()> {
        let dev = Device::Cpu;
        for (t_q, t_k, offset, causal, window) in [
            (5, 5, 0, true, None),
            (3, 8, 5, true, None),
            (6, 6, 0, true, Some(3)),
            (2, 9, 7, true, Some(4)),
            (4, 4, 0, false, Some(2)),
            (1, 7, 6, true, Some(7)),
        ] {
            let got = window_bias(1, t_q, t_k, offset, causal, window, None, &dev)?;
            let want: Vec<f32> = (0..t_q)
                .flat_map(|i| {
                    (0..t_k).map(move |j| {
                        if visible(i, j, offset, causal, window) {
                            0.0
                        } else {
                            NEG
                        }
                    })
                })
                .collect();
            let all_visible = want.iter().all(|&v| v == 0.0);
            match got {
                None => assert!(all_visible, "{t_q} {t_k} {offset} {causal} {window:?}"),
                Some(b) => {
                    assert_eq!(b.dims(), [1, 1, t_q, t_k]);
                    assert_eq!(b.flatten_all()?.to_vec1::<f32>()?, want);
                }
            }
        }
        Ok(())
    }
}
