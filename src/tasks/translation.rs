//! Translation: batching of (source, target) id pairs, teacher-forced loss, and corpus BLEU with
//! sacreBLEU's `13a` tokenisation (Papineni et al. 2002; Post 2018).

use candle_core::{Device, Result, Tensor};
use rand::Rng;

use super::pad_batch;
use crate::losses::cross_entropy;
use crate::models::Seq2Seq;
use crate::train::LossParts;

/// Special ids used by the translation task.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    /// Padding id (ignored in the loss).
    pub pad: u32,
    /// Decoder start id.
    pub bos: u32,
    /// End of sentence id.
    pub eos: u32,
}

/// A teacher-forced batch of `b` random pairs; sequences are truncated to `max_len` tokens.
/// Returns `[src, src_mask, tgt_in, tgt_mask, tgt_out]`.
///
/// Errors when `b` or `max_len` is 0 or there are no pairs.
pub fn batch(
    pairs: &[(Vec<u32>, Vec<u32>)],
    b: usize,
    max_len: usize,
    sp: Specials,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<[Tensor; 5]> {
    if b == 0 {
        candle_core::bail!("translation batch: batch size must be at least 1, got 0")
    }
    if max_len == 0 {
        candle_core::bail!("translation batch: max_len must be at least 1 token, got 0")
    }
    if pairs.is_empty() {
        candle_core::bail!("translation batch: no training pairs")
    }
    let picked: Vec<&(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|_| &pairs[rng.random_range(0..pairs.len())])
        .collect();
    let src: Vec<Vec<u32>> = picked
        .iter()
        .map(|p| p.0.iter().take(max_len).copied().collect())
        .collect();
    let tin: Vec<Vec<u32>> = picked
        .iter()
        .map(|p| {
            std::iter::once(sp.bos)
                .chain(p.1.iter().take(max_len - 1).copied())
                .collect()
        })
        .collect();
    let tout: Vec<Vec<u32>> = picked
        .iter()
        .map(|p| {
            p.1.iter()
                .take(max_len - 1)
                .copied()
                .chain(std::iter::once(sp.eos))
                .collect()
        })
        .collect();
    let ls = src.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let lt = tin.iter().map(|s| s.len()).max().unwrap_or(1);
    let (s, sm) = pad_batch(&src, ls, sp.pad, dev)?;
    let (ti, tm) = pad_batch(&tin, lt, sp.pad, dev)?;
    let (to, _) = pad_batch(&tout, lt, sp.pad, dev)?;
    Ok([s, sm, ti, tm, to])
}

/// Loss parts of a teacher-forced batch (padding targets ignored).
pub fn loss_parts(model: &Seq2Seq, b: &[Tensor; 5], pad: u32, train: bool) -> Result<LossParts> {
    let [s, sm, ti, tm, to] = b;
    let out = model.forward_t(s, Some(sm), ti, Some(tm), train)?;
    let (n, t, v) = out.logits.dims3()?;
    Ok(LossParts::from_output(
        cross_entropy(
            &out.logits.reshape((n * t, v))?,
            &to.flatten_all()?,
            Some(pad),
        )?,
        &out,
    ))
}

/// sacreBLEU's `13a` tokenisation (the mteval-v13a rules).
pub fn tokenize_13a(line: &str) -> Vec<String> {
    use std::sync::OnceLock;
    static RES: OnceLock<Vec<(regex::Regex, &'static str)>> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            (r"([\{-~\[-` -&\(-\+:-@/])", " $1 "),
            (r"([^0-9])([\.,])", "$1 $2 "),
            (r"([\.,])([^0-9])", " $1 $2"),
            (r"([0-9])(-)", "$1 $2 "),
        ]
        .into_iter()
        .filter_map(|(p, r)| regex::Regex::new(p).ok().map(|re| (re, r)))
        .collect()
    });
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut s = format!(" {s} ");
    for (re, rep) in res {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s.split_whitespace().map(|w| w.to_string()).collect()
}

/// Corpus BLEU (0–100) of `hyps` against one reference each, 13a-tokenised, 4-grams, with
/// sacreBLEU's default `exp` smoothing.
pub fn corpus_bleu(hyps: &[String], refs: &[String]) -> f64 {
    use std::collections::HashMap;
    let mut correct = [0usize; 4];
    let mut total = [0usize; 4];
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        let h = tokenize_13a(h);
        let r = tokenize_13a(r);
        hyp_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            let mut rc: HashMap<&[String], usize> = HashMap::new();
            for g in r.windows(n) {
                *rc.entry(g).or_default() += 1;
            }
            let mut hc: HashMap<&[String], usize> = HashMap::new();
            for g in h.windows(n) {
                *hc.entry(g).or_default() += 1;
            }
            for (g, c) in hc {
                correct[n - 1] += c.min(rc.get(g).copied().unwrap_or(0));
            }
            total[n - 1] += h.len().saturating_sub(n - 1);
        }
    }
    if hyp_len == 0 {
        return 0.0;
    }
    let mut smooth = 1.0;
    let mut log_sum = 0.0;
    for n in 0..4 {
        if total[n] == 0 {
            return 0.0;
        }
        let p = if correct[n] == 0 {
            smooth *= 2.0;
            1.0 / (smooth * total[n] as f64)
        } else {
            correct[n] as f64 / total[n] as f64
        };
        log_sum += p.ln();
    }
    let bp = if hyp_len < ref_len {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    } else {
        1.0
    };
    100.0 * bp * (log_sum / 4.0).exp()
}
