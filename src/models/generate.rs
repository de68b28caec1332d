//! Sampling: greedy, temperature, top-k (Fan et al. 2018) and nucleus / top-p (Holtzman et al.
//! 2020), seeded. Beam search for encoder-decoders lives in [`crate::models::seq2seq`].
//!
//! # Rules for unusual inputs
//! - The config must be valid ([`SamplingConfig::validate`]): `temperature` finite and `>= 0`
//!   (`0` = greedy), `top_k` `None` or `>= 1`, `top_p` `None` or in `(0, 1]`. [`Sampler::sample`]
//!   checks it first and returns an error naming the field.
//! - A NaN anywhere in the logits is an error, as are empty logits and logits that are all
//!   `-inf` (no token can be chosen).
//! - `+inf` logits take all the probability: greedy picks the first of them, sampling picks
//!   uniformly among those that survive `top_k` (then `top_p` over that uniform distribution).
//! - `-inf` logits have probability zero and are never sampled.

use candle_core::{bail, DType, Result, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::Error;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0` = greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Maximum number of new tokens.
    pub max_new_tokens: usize,
    /// Stop after this token.
    pub eos_token_id: Option<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            max_new_tokens: 64,
            eos_token_id: None,
        }
    }
}

impl SamplingConfig {
    /// Checks the sampling parameters: `temperature` finite and `>= 0`, `top_k` `None` or
    /// `>= 1`, `top_p` `None` or in `(0, 1]`. The error ([`Error::Config`]) names the field.
    pub fn validate(&self) -> crate::error::Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::Config(format!(
                "sampling: temperature must be finite and >= 0 (0 = greedy), got {t}"
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config(
                "sampling: top_k must be >= 1 (or None for no limit), got 0".into(),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Config(format!(
                    "sampling: top_p must be in (0, 1] (or None for no limit), got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// A seeded token sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler seeded with `cfg.seed`.
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// The distribution a temperature `> 0` sample of `logits` `(vocab,)` is drawn from:
    /// `(token id, probability)` of every token that can be drawn, most likely first (softmax at
    /// the temperature over the `top_k` largest logits, cut to the `top_p` nucleus and
    /// renormalised). Errors as [`Self::sample`] does, and at temperature 0 (greedy).
    pub fn distribution(&self, logits: &Tensor) -> Result<Vec<(u32, f64)>> {
        self.cfg
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if self.cfg.temperature == 0.0 {
            bail!("distribution: temperature 0 is greedy decoding, not a distribution")
        }
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            bail!("distribution: logits are empty or contain NaN")
        }
        if logits.iter().all(|&v| v == f32::NEG_INFINITY) {
            bail!("distribution: every logit is -inf")
        }
        let (idx, p) = filtered(&logits, &self.cfg);
        Ok(idx.into_iter().map(|i| i as u32).zip(p).collect())
    }

    /// Picks a token from `logits` `(vocab,)` (see the module docs for NaN / `inf` logits).
    ///
    /// Errors when the config is invalid ([`SamplingConfig::validate`]), the logits are empty,
    /// contain a NaN, or are all `-inf`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        self.cfg
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if logits.is_empty() {
            bail!("sample: empty logits")
        }
        if let Some(i) = logits.iter().position(|v| v.is_nan()) {
            bail!("sample: logits contain NaN (first at index {i})")
        }
        if logits.iter().all(|&v| v == f32::NEG_INFINITY) {
            bail!("sample: every logit is -inf, no token can be chosen")
        }
        if self.cfg.temperature == 0.0 {
            // Greedy: the first of the largest logits (not all are -inf, checked above).
            let mut best = 0usize;
            for (i, &x) in logits.iter().enumerate() {
                if x > logits[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        // Stable sort, most likely first: ties (e.g. several +inf) keep index order.
        let (idx, p) = filtered(&logits, &self.cfg);
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut last = idx[0];
        for (j, v) in p.iter().enumerate() {
            if *v <= 0.0 {
                continue;
            }
            last = idx[j];
            acc += v;
            if u < acc {
                return Ok(idx[j] as u32);
            }
        }
        // Rounding left `u` above the total: the last token with non-zero probability.
        Ok(last as u32)
    }
}

/// The distribution [`Sampler::sample`] draws from at temperature `> 0`: token ids in order of
/// decreasing logit and their probabilities — softmax of `logits / temperature` over the `top_k`
/// largest logits, then cut to the smallest prefix whose mass reaches `top_p` and renormalised
/// (transformers' `TopKLogitsWarper` then `TopPLogitsWarper`, ties broken by position). With a
/// `+inf` logit, the `+inf` logits share the mass equally.
fn filtered(logits: &[f32], cfg: &SamplingConfig) -> (Vec<usize>, Vec<f64>) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        idx.truncate(k);
    }
    let t = cfg.temperature;
    let m = logits[idx[0]];
    let mut p: Vec<f64> = if m == f32::INFINITY {
        // +inf logits share all the probability, uniformly.
        idx.iter()
            .map(|&i| if logits[i] == f32::INFINITY { 1.0 } else { 0.0 })
            .collect()
    } else {
        // In f64 so that a tiny temperature gives 0 / t = 0 for the max, not NaN.
        idx.iter()
            .map(|&i| ((logits[i] as f64 - m as f64) / t).exp())
            .collect()
    };
    let s: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= s);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (j, v) in p.iter().enumerate() {
            acc += v;
            if acc >= top_p {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
        let s: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= s);
    }
    (idx, p)
}
