//! Language modeling: random windows for training, contiguous windows for evaluation, and the
//! unigram baseline.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

use crate::losses::cross_entropy;
use crate::models::CausalLm;
use crate::train::LossParts;

/// Checks a batch size and a window length (both at least 1).
fn check_sizes(what: &str, b: usize, t: usize) -> Result<()> {
    if b == 0 {
        candle_core::bail!("{what}: batch size must be at least 1, got 0")
    }
    if t == 0 {
        candle_core::bail!("{what}: window (sequence length) must be at least 1 token, got 0")
    }
    Ok(())
}

/// A training batch of `b` random windows of `t + 1` tokens: inputs `(b, t)`, targets `(b·t,)`.
///
/// Errors when `b` or `t` is 0 or the stream is shorter than `t + 2` tokens.
pub fn batch(
    stream: &[u32],
    b: usize,
    t: usize,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    check_sizes("language model batch", b, t)?;
    if stream.len() < t.saturating_add(2) {
        candle_core::bail!(
            "token stream of {} tokens is shorter than a window of {}",
            stream.len(),
            t + 1
        )
    }
    let mut inp = Vec::with_capacity(b * t);
    let mut tgt = Vec::with_capacity(b * t);
    for _ in 0..b {
        let s = rng.random_range(0..stream.len() - t - 1);
        inp.extend_from_slice(&stream[s..s + t]);
        tgt.extend_from_slice(&stream[s + 1..s + t + 1]);
    }
    Ok((
        Tensor::from_vec(inp, (b, t), dev)?,
        Tensor::from_vec(tgt, b * t, dev)?,
    ))
}

/// The loss parts of one batch (training mode when `train`).
pub fn loss_parts(model: &CausalLm, inp: &Tensor, tgt: &Tensor, train: bool) -> Result<LossParts> {
    let out = model.forward_t(inp, None, train)?;
    let (b, t, v) = out.logits.dims3()?;
    Ok(LossParts::from_output(
        cross_entropy(&out.logits.reshape((b * t, v))?, tgt, None)?,
        &out,
    ))
}

/// Evaluation result over contiguous windows.
#[derive(Debug, Clone)]
pub struct Eval {
    /// Mean next-token negative log-likelihood (nats).
    pub nll: f64,
    /// Per sparse layer: share of the kept assignments each expert got.
    pub expert_share: Vec<Vec<f64>>,
    /// Tokens evaluated.
    pub tokens: usize,
}

/// Mean NLL over up to `max_windows` non-overlapping windows of `t` tokens, batched by `b`.
///
/// Errors when `t`, `b` or `max_windows` is 0 or the stream is shorter than one window.
pub fn evaluate(
    model: &CausalLm,
    stream: &[u32],
    t: usize,
    b: usize,
    max_windows: usize,
    dev: &Device,
) -> Result<Eval> {
    check_sizes("evaluate", b, t)?;
    if max_windows == 0 {
        candle_core::bail!("evaluate: max_windows must be at least 1, got 0")
    }
    let n_win = ((stream.len().saturating_sub(1)) / t).min(max_windows);
    if n_win == 0 {
        candle_core::bail!(
            "evaluation stream of {} tokens is shorter than one window of {t}",
            stream.len()
        )
    }
    let mut total = 0f64;
    let mut count = 0usize;
    let mut counts: Vec<Vec<usize>> = vec![];
    for chunk in (0..n_win).collect::<Vec<_>>().chunks(b) {
        let mut inp = vec![];
        let mut tgt = vec![];
        for &w in chunk {
            inp.extend_from_slice(&stream[w * t..w * t + t]);
            tgt.extend_from_slice(&stream[w * t + 1..w * t + t + 1]);
        }
        let n = chunk.len();
        let inp = Tensor::from_vec(inp, (n, t), dev)?;
        let tgt = Tensor::from_vec(tgt, n * t, dev)?;
        let parts = loss_parts(model, &inp, &tgt, false)?;
        total += parts.task.to_dtype(DType::F64)?.to_scalar::<f64>()? * (n * t) as f64;
        count += n * t;
        if counts.is_empty() {
            counts = parts
                .routing
                .iter()
                .map(|r| vec![0; r.expert_counts.len()])
                .collect();
        }
        for (acc, r) in counts.iter_mut().zip(&parts.routing) {
            for (a, c) in acc.iter_mut().zip(&r.expert_counts) {
                *a += c;
            }
        }
    }
    let expert_share = counts
        .iter()
        .map(|c| {
            let s: usize = c.iter().sum();
            c.iter().map(|&x| x as f64 / s.max(1) as f64).collect()
        })
        .collect();
    Ok(Eval {
        nll: total / count as f64,
        expert_share,
        tokens: count,
    })
}

/// NLL (nats/token) of `valid` under the add-one-smoothed unigram distribution of `train`.
/// NaN when there is nothing to measure (`valid` empty or `vocab` 0); ids outside the
/// vocabulary get the smoothing count only.
pub fn unigram_nll(train: &[u32], valid: &[u32], vocab: usize) -> f64 {
    if valid.is_empty() || vocab == 0 {
        return f64::NAN;
    }
    let mut c = vec![1f64; vocab];
    for &t in train {
        if (t as usize) < vocab {
            c[t as usize] += 1.0;
        }
    }
    let total: f64 = c.iter().sum();
    let nll: f64 = valid
        .iter()
        .map(|&t| -(c.get(t as usize).copied().unwrap_or(1.0) / total).ln())
        .sum();
    nll / valid.len() as f64
}
