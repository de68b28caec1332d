//! Balance losses besides the Hugging Face load-balancing loss, as pure functions.
//!
//! - Sequence-wise balance loss (DeepSeek-V3, 2024, eq. 17-20): per sequence of `T` (unmasked)
//!   tokens, `f_i = E / (K·T) · Σ_t 1(i ∈ topk(t))` and `P_i = 1/T · Σ_t s'_{i,t}` with the
//!   normalised affinities `s' = s / Σ_j s_j` (sigmoid or softmax scores); `L = Σ_i f_i P_i`,
//!   averaged over the sequences that have a real token, then over the sparse layers. A
//!   balanced router scores 1. Only `P` carries a gradient.
//! - Importance and load losses (Shazeer et al. 2017, eq. 6-10) of noisy top-k gating:
//!   `Importance_e = Σ_x G(x)_e` (gate values, zero outside the top-k), `L_imp =
//!   CV(Importance)²`; `Load_e = Σ_x Φ((clean_e(x) − kth_excluding_e(H(x))) / σ_e(x))`, the
//!   smooth estimate of how many tokens pick `e`, `L_load = CV(Load)²`. `CV² = variance / mean²`
//!   (population variance over the experts). Both are differentiable, over every routed token
//!   of a layer (padding included: the router does not see the mask), averaged over layers.
//! - Global-batch load balancing (Qiu et al. 2025, "Demons in the Detail"): the Hugging Face
//!   loss of each micro-batch of an optimizer step formed with the expert frequencies `F_e`
//!   counted over all the step's micro-batches (see [`global_batch_load_balancing`]).

use candle_core::{bail, DType, Result, Tensor};

use super::RouterAux;

/// The balance losses of a forward besides the load-balancing and z-losses, unscaled; `None`
/// for a loss that was not computed (its coefficient is 0, or there is no sparse layer).
#[derive(Debug, Clone, Default)]
pub struct BalanceLosses {
    /// DeepSeek-V3's sequence-wise balance loss (balanced: 1), mean over sparse layers.
    pub seq_aux: Option<Tensor>,
    /// Shazeer et al.'s importance loss `CV(Importance)²`, mean over sparse layers.
    pub importance: Option<Tensor>,
    /// Shazeer et al.'s load loss `CV(Load)²`, mean over sparse layers (0 without noisy gating).
    pub load: Option<Tensor>,
    /// Every sparse layer's router outputs (with their padding masks), in layer order: what
    /// global-batch balancing recounts `F_e` from.
    pub router_aux: Vec<RouterAux>,
}

impl BalanceLosses {
    /// Pools the layers' losses: the sequence-wise loss for the layers that kept their
    /// affinities (rows `batch · seq_len`, sequence-major), the CV² losses of those that
    /// computed them, each averaged over the layers that have it.
    pub fn pooled(layers: &[RouterAux], batch: usize, num_experts: usize) -> Result<Self> {
        let mut seq = Vec::new();
        let (mut imp, mut load) = (Vec::new(), Vec::new());
        for a in layers {
            if let Some(s) = &a.affinity {
                seq.push(sequence_balance_loss(
                    s,
                    &a.top_k_ids,
                    a.top_k,
                    a.row_mask.as_deref(),
                    batch,
                    num_experts,
                )?);
            }
            if let Some((i, l)) = &a.cv {
                imp.push(i.clone());
                load.push(l.clone());
            }
        }
        Ok(Self {
            seq_aux: mean_of(&seq)?,
            importance: mean_of(&imp)?,
            load: mean_of(&load)?,
            router_aux: layers.to_vec(),
        })
    }
}

/// The mean of scalars, `None` when there are none.
fn mean_of(xs: &[Tensor]) -> Result<Option<Tensor>> {
    if xs.is_empty() {
        return Ok(None);
    }
    Ok(Some((Tensor::stack(xs, 0)?.sum_all()? / xs.len() as f64)?))
}

/// The normalised affinities `s / Σ_j s_j` of scores `(rows, E)` (identity for a softmax).
pub fn normalized_affinity(scores: &Tensor) -> Result<Tensor> {
    scores.broadcast_div(&(scores.sum_keepdim(1)? + 1e-20)?)
}

/// DeepSeek-V3's sequence-wise balance loss of one layer (see the module doc).
///
/// # Shapes
/// - `affinity`: `(batch · seq, E)` normalised scores, differentiable; `ids`: `batch · seq · k`
///   chosen experts (host); `row_mask`: `batch · seq` (1 = real token) -> scalar
pub fn sequence_balance_loss(
    affinity: &Tensor,
    ids: &[u32],
    top_k: usize,
    row_mask: Option<&[f32]>,
    batch: usize,
    num_experts: usize,
) -> Result<Tensor> {
    let (rows, e) = affinity.dims2()?;
    if e != num_experts || batch == 0 || rows % batch != 0 || ids.len() != rows * top_k {
        bail!("sequence balance loss: affinities {rows}×{e}, {} ids, top_k {top_k}, batch {batch}, {num_experts} experts do not agree", ids.len())
    }
    if row_mask.is_some_and(|m| m.len() != rows) {
        bail!("sequence balance loss: the mask does not have {rows} rows")
    }
    let t = rows / batch;
    let mut coef = vec![0f64; rows * e];
    let mut sequences = 0usize;
    for s in 0..batch {
        let w = |r: usize| row_mask.map_or(1.0, |m| m[r] as f64);
        let real: f64 = (s * t..(s + 1) * t).map(w).sum();
        if real <= 0.0 {
            continue;
        }
        sequences += 1;
        let mut f = vec![0f64; e];
        for r in s * t..(s + 1) * t {
            for &i in &ids[r * top_k..(r + 1) * top_k] {
                if (i as usize) < e {
                    f[i as usize] += w(r);
                }
            }
        }
        let scale = e as f64 / (top_k as f64 * real);
        // L_s = Σ_i f_i · (1/T) Σ_t m_t s'_{t,i}: one coefficient per (row, expert).
        for r in s * t..(s + 1) * t {
            for i in 0..e {
                coef[r * e + i] = f[i] * scale * w(r) / real;
            }
        }
    }
    if sequences == 0 {
        bail!("sequence balance loss: no unmasked tokens")
    }
    let c = Tensor::from_vec(coef, (rows, e), affinity.device())?.to_dtype(affinity.dtype())?;
    (c * affinity)?.sum_all()? / sequences as f64
}

/// `CV(v)² = variance / mean²` of a vector `(E,)` (population variance), scalar.
pub fn cv_squared(v: &Tensor) -> Result<Tensor> {
    let mean = v.mean_all()?;
    let var = v.broadcast_sub(&mean)?.sqr()?.mean_all()?;
    var / (mean.sqr()? + 1e-10)?
}

/// One-hot `(n, E)` of the `(n, k)` expert ids, summed over the `k` slots, in `dtype`.
fn chosen_mask(ids: &Tensor, num_experts: usize, dtype: DType) -> Result<Tensor> {
    let all = Tensor::arange(0u32, num_experts as u32, ids.device())?.reshape((1, 1, ()))?;
    ids.unsqueeze(2)?
        .broadcast_eq(&all)?
        .to_dtype(dtype)?
        .sum(1)
}

/// Shazeer et al.'s `(L_importance, L_load)` of one layer (see the module doc).
///
/// `noisy`: the noisy logits `H` and the noise standard deviations `σ = softplus(x W_noise)`,
/// both `(n, E)`; without them (no noisy gating) the load loss is 0. With `k = E` every expert
/// is always chosen, and the load loss is 0.
///
/// # Shapes
/// - `weights`: `(n, k)` gate values, `ids`: `(n, k)` u32, `clean`: `(n, E)` clean logits
pub fn importance_load_losses(
    weights: &Tensor,
    ids: &Tensor,
    clean: &Tensor,
    noisy: Option<(&Tensor, &Tensor)>,
    top_k: usize,
) -> Result<(Tensor, Tensor)> {
    let (_, e) = clean.dims2()?;
    let all = Tensor::arange(0u32, e as u32, ids.device())?.reshape((1, 1, ()))?;
    let hit = ids
        .unsqueeze(2)?
        .broadcast_eq(&all)?
        .to_dtype(weights.dtype())?; // (n, k, E)
    let gates = weights.unsqueeze(2)?.broadcast_mul(&hit)?.sum(1)?; // (n, E): G(x)
    let importance = cv_squared(&gates.sum(0)?)?;
    let zero = Tensor::new(0f32, clean.device())?.to_dtype(clean.dtype())?;
    let load = match noisy {
        Some((h, std)) if top_k < e => {
            let order = h.detach().arg_sort_last_dim(false)?; // (n, E) descending
            let kth = h.gather(&order.narrow(1, top_k - 1, 1)?.contiguous()?, 1)?; // (n, 1)
            let next = h.gather(&order.narrow(1, top_k, 1)?.contiguous()?, 1)?; // (n, 1)
            let in_top =
                chosen_mask(&order.narrow(1, 0, top_k)?.contiguous()?, e, DType::F32)?.gt(0.0)?; // (n, E)
                                                                                                 // kth_excluding(H, k, i): the (k+1)-th largest when i is in the top-k, else the k-th.
            let threshold = in_top.where_cond(
                &next.broadcast_as(h.shape())?,
                &kth.broadcast_as(h.shape())?,
            )?;
            let z = ((clean - threshold)? / std)?;
            let p = ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5; // Φ(z)
            cv_squared(&p?.sum(0)?)?
        }
        _ => zero,
    };
    Ok((importance, load))
}

/// Global-batch load balancing (Qiu et al. 2025): the Hugging Face load-balancing loss of each
/// micro-batch, with `F_e` (the share of top-k slots choosing `e`, pooled over layers as
/// transformers pools them) counted over the unmasked rows of all the micro-batches, and `P_e`
/// (mean router probability, differentiable) over the micro-batch's own rows:
/// `L_m = E · Σ_e F_e^global · P_e^(m)`. With one micro-batch this is the usual pooled loss.
/// Per-micro-batch balancing instead uses `F_e^(m)` in `L_m`, so a micro-batch that is
/// imbalanced one way is pushed to balance on its own even when the step's whole batch is
/// balanced; global counting only penalises imbalance of the whole step's batch.
///
/// Returns one scalar per micro-batch (`micro[m]` holds its layers' router outputs).
pub fn global_batch_load_balancing(
    micro: &[&[RouterAux]],
    num_experts: usize,
) -> Result<Vec<Tensor>> {
    let mut counts = vec![0f64; num_experts];
    let mut valid = 0f64;
    for layers in micro {
        for a in layers.iter() {
            let (rows, k) = (a.rows(), a.top_k);
            if a.row_mask.as_ref().is_some_and(|m| m.len() != rows) {
                bail!("global-batch balance: a layer's mask does not have its {rows} rows")
            }
            for r in 0..rows {
                let w = a.row_mask.as_ref().map_or(1.0, |m| m[r] as f64);
                valid += w;
                for &e in &a.top_k_ids[r * k..(r + 1) * k] {
                    if (e as usize) < num_experts {
                        counts[e as usize] += w;
                    }
                }
            }
        }
    }
    if valid <= 0.0 {
        bail!("global-batch balance: no unmasked tokens in any micro-batch")
    }
    let f: Vec<f64> = counts.iter().map(|c| c / valid).collect();
    let mut out = Vec::with_capacity(micro.len());
    for layers in micro {
        let Some(first) = layers.first() else {
            bail!("global-batch balance: a micro-batch has no router outputs")
        };
        let (dev, dt) = (first.probs.device(), first.probs.dtype());
        let mut p_sum: Option<Tensor> = None;
        let mut valid_m = 0f64;
        for a in layers.iter() {
            let p = match &a.row_mask {
                None => {
                    valid_m += a.rows() as f64;
                    a.probs.sum(0)?
                }
                Some(m) => {
                    valid_m += m.iter().map(|&x| x as f64).sum::<f64>();
                    let m = Tensor::from_slice(m, (1, m.len()), dev)?.to_dtype(dt)?;
                    m.matmul(&a.probs)?.squeeze(0)?
                }
            };
            p_sum = Some(match p_sum {
                None => p,
                Some(s) => (s + p)?,
            });
        }
        let Some(p_sum) = p_sum else {
            bail!("global-batch balance: a micro-batch has no router outputs")
        };
        if valid_m <= 0.0 {
            bail!("global-batch balance: a micro-batch has no unmasked tokens")
        }
        let f = Tensor::from_slice(&f, num_experts, dev)?.to_dtype(dt)?;
        out.push(((f * (p_sum / valid_m)?)?.sum_all()? * num_experts as f64)?);
    }
    Ok(out)
}
