//! Sampling: greedy, temperature, top-k (Fan et al. 2018) and nucleus / top-p (Holtzman et al.
//! 2020), seeded. Beam search for encoder-decoders lives in [`crate::models::seq2seq`].

use candle_core::{bail, DType, Result, Tensor};
use rand::{Rng, SeedableRng};

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

    /// Picks a token from `logits` `(vocab,)`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if logits.is_empty() {
            bail!("sample: empty logits")
        }
        if logits.iter().any(|v| v.is_nan()) {
            bail!("sample: logits contain NaN")
        }
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                    if x > b.1 {
                        (i, x)
                    } else {
                        b
                    }
                })
                .0 as u32
        };
        if self.cfg.temperature <= 0.0 {
            return Ok(argmax(&logits));
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.cfg.top_k {
            idx.truncate(k.max(1));
        }
        let t = self.cfg.temperature as f32;
        let m = logits[idx[0]];
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - m) / t) as f64).exp())
            .collect();
        let s: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= s);
        if let Some(top_p) = self.cfg.top_p {
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
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (j, v) in p.iter().enumerate() {
            acc += v;
            if u < acc {
                return Ok(idx[j] as u32);
            }
        }
        Ok(idx[idx.len() - 1] as u32)
    }
}
