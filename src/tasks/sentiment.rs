//! Sequence classification: padded batches, loss, accuracy and F1.

use candle_core::{Device, Result, Tensor};
use rand::Rng;

use super::pad_batch;
use crate::losses::cross_entropy;
use crate::models::SequenceClassifier;
use crate::train::LossParts;

/// Checks a batch size and a maximum length (both at least 1).
fn check_sizes(what: &str, b: usize, max_len: usize) -> Result<()> {
    if b == 0 {
        candle_core::bail!("{what}: batch size must be at least 1, got 0")
    }
    if max_len == 0 {
        candle_core::bail!("{what}: max_len must be at least 1 token, got 0")
    }
    Ok(())
}

/// A batch of `b` random examples truncated to `max_len`: `(ids, mask, labels)`.
///
/// Errors when `b` or `max_len` is 0 or there are no examples.
pub fn batch(
    data: &[(Vec<u32>, u32)],
    b: usize,
    max_len: usize,
    pad: u32,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_sizes("sentiment batch", b, max_len)?;
    if data.is_empty() {
        candle_core::bail!("sentiment batch: no training examples")
    }
    let picked: Vec<&(Vec<u32>, u32)> = (0..b)
        .map(|_| &data[rng.random_range(0..data.len())])
        .collect();
    let rows: Vec<Vec<u32>> = picked
        .iter()
        .map(|p| p.0.iter().take(max_len).copied().collect())
        .collect();
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let (ids, mask) = pad_batch(&rows, len, pad, dev)?;
    let labels = Tensor::from_vec(picked.iter().map(|p| p.1).collect::<Vec<u32>>(), b, dev)?;
    Ok((ids, mask, labels))
}

/// Loss parts of a batch.
pub fn loss_parts(
    model: &SequenceClassifier,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    train: bool,
) -> Result<LossParts> {
    let out = model.forward_t(ids, None, Some(mask), train)?;
    Ok(LossParts::from_output(
        cross_entropy(&out.logits, labels, None)?,
        &out,
    ))
}

/// Predicted labels for every example (batches of `b`, truncated to `max_len`; an empty
/// example is read as one padding token). Errors when `b` or `max_len` is 0.
pub fn predict(
    model: &SequenceClassifier,
    data: &[Vec<u32>],
    b: usize,
    max_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<Vec<u32>> {
    check_sizes("sentiment predict", b, max_len)?;
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(b) {
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| {
                if r.is_empty() {
                    vec![pad]
                } else {
                    r.iter().take(max_len).copied().collect()
                }
            })
            .collect();
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(1);
        let (ids, mask) = pad_batch(&rows, len, pad, dev)?;
        let logits = model.forward(&ids, Some(&mask))?.logits;
        out.extend(logits.argmax(1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Accuracy and F1 of the positive class (label 1).
pub fn accuracy_f1(pred: &[u32], gold: &[u32]) -> (f64, f64) {
    let n = pred.len().min(gold.len());
    let (mut tp, mut fp, mut fneg, mut ok) = (0f64, 0f64, 0f64, 0usize);
    for i in 0..n {
        ok += (pred[i] == gold[i]) as usize;
        match (pred[i], gold[i]) {
            (1, 1) => tp += 1.0,
            (1, _) => fp += 1.0,
            (_, 1) => fneg += 1.0,
            _ => {}
        }
    }
    let f1 = if tp == 0.0 {
        0.0
    } else {
        2.0 * tp / (2.0 * tp + fp + fneg)
    };
    (ok as f64 / n.max(1) as f64, f1)
}
