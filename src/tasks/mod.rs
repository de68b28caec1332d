//! Task plumbing shared by the examples and their tests: batching, losses and evaluation for
//! language modeling, translation and classification.

pub mod language_model;
pub mod sentiment;
pub mod translation;

use candle_core::{Device, Result, Tensor};

/// Pads `rows` to a common length `len` (truncating longer rows) and returns `(ids, mask)`,
/// both `(rows, len)` u32.
pub fn pad_batch(
    rows: &[Vec<u32>],
    len: usize,
    pad: u32,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        for i in 0..len {
            match r.get(i) {
                Some(&t) => {
                    ids.push(t);
                    mask.push(1u32);
                }
                None => {
                    ids.push(pad);
                    mask.push(0);
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(ids, (rows.len(), len), dev)?,
        Tensor::from_vec(mask, (rows.len(), len), dev)?,
    ))
}
