//! Auxiliary router losses and the task loss, as pure functions.
//!
//! - Load balancing (Fedus et al. 2021, Switch Transformer eq. 4, top-k form as in Hugging Face
//!   transformers' `load_balancing_loss_func`): the router logits of all layers are concatenated
//!   (rows = tokens × layers), `p = softmax(logits)`, `F_e` = share of top-k slots choosing `e`,
//!   `P_e` = mean of `p[:, e]`; `loss = E · Σ_e F_e · P_e`. Padding rows are excluded when a
//!   mask is given. A perfectly balanced router scores `k`.
//! - Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over rows of `(logsumexp_e logits)²`.
//! - Cross entropy with an ignore index.
//!
//! Only `P` carries a gradient in the load-balancing loss (`F` is a count), as in transformers.
//!
//! The other balance losses (DeepSeek-V3's sequence-wise loss, Shazeer et al.'s importance and
//! load losses, global-batch balancing) live in [`balance`].

use candle_core::{bail, DType, Result, Tensor, D};

use crate::ops::HostRead;

use crate::ops::{compute_dtype, logsumexp_keepdim, softmax_last_dim};

pub mod balance;
pub use balance::BalanceLosses;

fn concat_rows(gate_logits: &[Tensor]) -> Result<Tensor> {
    if gate_logits.is_empty() {
        bail!("router loss: no router logits given")
    }
    let rows: Vec<Tensor> = gate_logits
        .iter()
        .map(|t| t.to_dtype(compute_dtype(t.dtype()))?.flatten_to(D::Minus2))
        .collect::<Result<_>>()?;
    let e = rows[0].dim(1)?;
    for r in &rows {
        if r.rank() != 2 || r.dim(1)? != e {
            bail!(
                "router loss: every layer's logits must be (tokens, {e}), got {:?}",
                r.shape()
            )
        }
    }
    if rows.len() == 1 {
        Ok(rows[0].clone())
    } else {
        Tensor::cat(&rows, 0)
    }
}

/// Load-balancing loss pooled over per-layer router logits, as transformers'
/// `load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask)`.
///
/// # Shapes
/// - `gate_logits`: each `(batch · seq, E)` (or `(batch, seq, E)`)
/// - `attention_mask`: `(batch, seq)`, 1 = real token, 0 = padding; every layer shares it
/// - returns a scalar f32
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_moe::losses::load_balancing_loss;
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // 4 tokens, 4 experts, top-2: token i prefers experts i and i + 1 (mod 4), so every expert
/// // gets the same share of the slots and the same mean probability: balanced, loss = top_k.
/// let row = [2f32, 1.0, 0.0, -1.0];
/// let rotate = |i: usize| (0..4).map(move |e| row[(e + 4 - i) % 4]);
/// let balanced: Vec<f32> = (0..4).flat_map(rotate).collect();
/// let logits = Tensor::from_vec(balanced, (4, 4), &dev)?;
/// let lb = load_balancing_loss(&[logits], 4, 2, None)?.to_scalar::<f32>()?;
/// assert!((lb - 2.0).abs() < 1e-5);
///
/// // Every token prefers experts 0 and 1: the loss rises above top_k.
/// let collapsed = Tensor::from_vec(row.repeat(4), (4, 4), &dev)?;
/// let lb = load_balancing_loss(&[collapsed], 4, 2, None)?.to_scalar::<f32>()?;
/// assert!(lb > 3.0);
/// # Ok(())
/// # }
/// ```
pub fn load_balancing_loss(
    gate_logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
    attention_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let logits = concat_rows(gate_logits)?; // (rows, E)
    let (rows, e) = logits.dims2()?;
    if e != num_experts {
        bail!("load_balancing_loss: logits have {e} experts, num_experts = {num_experts}")
    }
    if top_k == 0 || top_k > num_experts {
        bail!("load_balancing_loss: top_k = {top_k} must be in 1..={num_experts}")
    }
    let probs = softmax_last_dim(&logits)?;
    let ids = logits
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k)?
        .contiguous()?;
    let row_mask = match attention_mask {
        None => None,
        Some(m) => {
            let m = m.flatten_all()?.to_dtype(DType::F32)?;
            let per_layer = m.dim(0)?;
            if per_layer == 0 || rows % per_layer != 0 {
                bail!(
                    "load_balancing_loss: attention mask has {per_layer} positions, which does not divide {rows} logit rows"
                )
            }
            let reps = rows / per_layer;
            Some(m.unsqueeze(0)?.repeat((reps, 1))?.flatten_all()?) // (rows,)
        }
    };
    load_balancing_from_parts(&probs, &ids, row_mask.as_ref(), num_experts)
}

/// Load-balancing loss from router probabilities and top-k choices already computed.
///
/// # Shapes
/// - `probs`: `(rows, E)` f32, `ids`: `(rows, k)` u32, `row_mask`: `(rows,)` 0/1
pub fn load_balancing_from_parts(
    probs: &Tensor,
    ids: &Tensor,
    row_mask: Option<&Tensor>,
    num_experts: usize,
) -> Result<Tensor> {
    let (rows, k) = ids.dims2()?;
    let ids_host = ids.flatten_all()?.host_vec1::<u32>()?;
    let mask_host = match row_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.host_vec1::<f32>()?),
        None => None,
    };
    let mut counts = vec![0f64; num_experts];
    let mut valid = 0f64;
    for r in 0..rows {
        let w = mask_host.as_ref().map_or(1.0, |m| m[r] as f64);
        valid += w;
        for &e in &ids_host[r * k..(r + 1) * k] {
            counts[e as usize] += w;
        }
    }
    if valid <= 0.0 {
        bail!("load_balancing_loss: no unmasked tokens")
    }
    // F_e summed over the k slots, as transformers sums tokens_per_expert (k, E) · P (E).
    let f: Vec<f32> = counts.iter().map(|c| (c / valid) as f32).collect();
    let f = Tensor::from_vec(f, num_experts, probs.device())?.to_dtype(probs.dtype())?;
    let p = match row_mask {
        None => probs.mean(0)?,
        Some(m) => {
            let m = m.to_dtype(probs.dtype())?.unsqueeze(1)?;
            (probs.broadcast_mul(&m)?.sum(0)? / valid)?
        }
    };
    (f * p)?.sum_all()? * num_experts as f64
}

/// What one sparse layer's router produced that the aux losses need, computed once in the
/// layer; the models pool these over layers ([`pooled_aux_losses`]) instead of recomputing
/// softmax and top-k from the logits.
#[derive(Debug, Clone)]
pub struct RouterAux {
    /// `softmax(router logits)`, `(rows, E)`, f32, differentiable.
    pub probs: Tensor,
    /// The clean (noise-free) top-k expert ids, row-major `rows · k`, on the host.
    pub top_k_ids: Vec<u32>,
    /// Experts per token.
    pub top_k: usize,
    /// `Σ_rows logsumexp(logits)²`, scalar f32, differentiable.
    pub lse_sq_sum: Tensor,
    /// Normalised affinity scores `s' = s / Σ_j s_j` `(rows, E)`, differentiable (the softmax
    /// probabilities, or the sigmoid scores over their sum): what DeepSeek-V3's sequence-wise
    /// balance loss averages. `None` when the layer did not keep them (the loss is off).
    pub affinity: Option<Tensor>,
    /// Shazeer et al.'s `(importance, load)` CV² losses of this layer, scalars, differentiable;
    /// `None` when they are off (`cv_loss_coef == 0`).
    pub cv: Option<(Tensor, Tensor)>,
    /// The padding mask of the rows (1 = real token), set by the models; `None` = every row.
    pub row_mask: Option<Vec<f32>>,
}

impl RouterAux {
    /// Builds the parts from router logits `(rows, E)`, probabilities and the clean top-k ids.
    pub fn new(logits: &Tensor, probs: Tensor, top_k_ids: Vec<u32>, top_k: usize) -> Result<Self> {
        let lse_sq_sum = logsumexp_keepdim(logits)?.sqr()?.sum_all()?;
        Ok(Self {
            probs,
            top_k_ids,
            top_k,
            lse_sq_sum,
            affinity: None,
            cv: None,
            row_mask: None,
        })
    }

    /// Rows (tokens) routed.
    pub fn rows(&self) -> usize {
        self.top_k_ids.len() / self.top_k.max(1)
    }
}

/// The load-balancing and z-loss pooled over layers exactly as transformers pools them over
/// concatenated router logits: `E · Σ_e F_e · P_e` over every (unmasked) row of every layer, and
/// the mean of `logsumexp²` over all rows. `row_masks` holds one `(rows,)` 0/1 mask per layer.
/// Zero scalars when `layers` is empty.
pub fn pooled_aux_losses(
    layers: &[&RouterAux],
    row_masks: Option<&[Tensor]>,
    num_experts: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    match pooled_aux_sums(layers, row_masks, num_experts)? {
        None => {
            let z = Tensor::new(0f32, device)?;
            Ok((z.clone(), z))
        }
        Some(s) => s.losses(device),
    }
}

/// The sums the pooled aux losses are formed from ([`pooled_aux_losses`] over one process;
/// an expert-parallel model sums them over its ranks first).
#[derive(Debug, Clone)]
pub struct AuxSums {
    /// Top-k picks per expert over the unmasked rows of every layer (mask-weighted).
    pub counts: Vec<f64>,
    /// Unmasked rows of every layer (mask-weighted).
    pub valid: f64,
    /// Rows of every layer, masked or not (the z-loss mean is over all of them).
    pub rows: usize,
    /// Σ over the unmasked rows of the router probabilities, `(E,)`, differentiable.
    pub p_sum: Tensor,
    /// Σ over all rows of `logsumexp²`, scalar, differentiable.
    pub z_sum: Tensor,
}

impl AuxSums {
    /// The load-balancing loss `E · Σ_e (counts_e / valid) · (p_sum_e / valid)` and the
    /// z-loss `z_sum / rows`.
    pub fn losses(self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        if self.valid <= 0.0 {
            bail!("load_balancing_loss: no unmasked tokens")
        }
        let e = self.counts.len();
        let f: Vec<f32> = self
            .counts
            .iter()
            .map(|c| (c / self.valid) as f32)
            .collect();
        let f = Tensor::from_vec(f, e, device)?.to_dtype(self.p_sum.dtype())?;
        let lb = ((f * (self.p_sum / self.valid)?)?.sum_all()? * e as f64)?;
        let z = (self.z_sum / self.rows as f64)?;
        Ok((lb, z))
    }
}

/// The sums of [`pooled_aux_losses`] over `layers` (`None` when `layers` is empty).
pub fn pooled_aux_sums(
    layers: &[&RouterAux],
    row_masks: Option<&[Tensor]>,
    num_experts: usize,
) -> Result<Option<AuxSums>> {
    let Some(first) = layers.first() else {
        return Ok(None);
    };
    if row_masks.is_some_and(|m| m.len() != layers.len()) {
        bail!("pooled aux losses: one row mask per layer expected")
    }
    let dt = first.probs.dtype();
    let mut counts = vec![0f64; num_experts];
    let (mut valid, mut rows_all) = (0f64, 0usize);
    let mut p_sum: Option<Tensor> = None;
    let mut z_sum: Option<Tensor> = None;
    let mut host_mask: Option<(candle_core::TensorId, Vec<f32>)> = None;
    for (l, a) in layers.iter().enumerate() {
        let (rows, k) = (a.rows(), a.top_k);
        // The models pass one mask tensor for every layer of a stack: read it once.
        let mask = match row_masks {
            Some(m) => match &host_mask {
                Some((id, v)) if *id == m[l].id() => Some(v.clone()),
                _ => {
                    let v = m[l]
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .host_vec1::<f32>()?;
                    host_mask = Some((m[l].id(), v.clone()));
                    Some(v)
                }
            },
            None => None,
        };
        if mask.as_ref().is_some_and(|m| m.len() != rows) {
            bail!("pooled aux losses: layer {l} has {rows} rows but its mask does not")
        }
        for r in 0..rows {
            let w = mask.as_ref().map_or(1.0, |m| m[r] as f64);
            valid += w;
            for &e in &a.top_k_ids[r * k..(r + 1) * k] {
                if (e as usize) < num_experts {
                    counts[e as usize] += w;
                }
            }
        }
        let p = match &mask {
            None => a.probs.sum(0)?,
            Some(m) => {
                let m = Tensor::from_slice(m, (1, rows), a.probs.device())?.to_dtype(dt)?;
                m.matmul(&a.probs)?.squeeze(0)?
            }
        }; // (E,)
        p_sum = Some(match p_sum {
            None => p,
            Some(s) => (s + p)?,
        });
        rows_all += rows;
        z_sum = Some(match z_sum {
            None => a.lse_sq_sum.clone(),
            Some(s) => (s + &a.lse_sq_sum)?,
        });
    }
    let (Some(p_sum), Some(z_sum)) = (p_sum, z_sum) else {
        bail!("pooled aux losses: no layers")
    };
    Ok(Some(AuxSums {
        counts,
        valid,
        rows: rows_all,
        p_sum,
        z_sum,
    }))
}

/// Router z-loss (ST-MoE): mean over all rows of all layers of `logsumexp(logits)²`.
///
/// # Shapes
/// - `router_logits`: each `(tokens, E)` -> scalar f32
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_moe::losses::router_z_loss;
///
/// # fn main() -> candle_core::Result<()> {
/// // Zero logits over E = 8 experts: logsumexp = ln 8 for every row, so the loss is (ln 8)².
/// let logits = Tensor::zeros((5, 8), DType::F32, &Device::Cpu)?;
/// let z = router_z_loss(&[logits])?.to_scalar::<f32>()?;
/// assert!((z - 8f32.ln().powi(2)).abs() < 1e-5);
/// # Ok(())
/// # }
/// ```
pub fn router_z_loss(router_logits: &[Tensor]) -> Result<Tensor> {
    let logits = concat_rows(router_logits)?;
    logsumexp_keepdim(&logits)?.sqr()?.mean_all()
}

/// Mean cross entropy of `logits` against `targets`, skipping targets equal to `ignore_index`.
///
/// Every target must be a class id below `C`, except those equal to `ignore_index` (which may
/// be `>= C`, as a sentinel); targets are range-checked in their own dtype, so a negative i64
/// id is an error, not a wrapped-around class. No rows, or only ignored ones, is an error.
///
/// # Shapes
/// - `logits`: `(n, C)`, `targets`: `(n,)` integer (u8, u32, i16, i32, i64) -> scalar f32
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
) -> Result<Tensor> {
    let logits = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let (n, c) = logits.dims2()?;
    if targets.dims1()? != n {
        bail!(
            "cross_entropy: {n} rows of logits but {} targets",
            targets.dims1()?
        )
    }
    if n == 0 {
        bail!("cross_entropy: no targets (0 rows of logits)")
    }
    // Range-check every target in its own dtype before any cast: an `ignore_index` at or above
    // `C` is a valid sentinel, but any other target must be below `C`.
    let targets = match targets.dtype() {
        DType::U8 | DType::U32 => targets.to_dtype(DType::U32)?,
        DType::I16 | DType::I32 | DType::I64 => {
            let wide = targets.to_dtype(DType::I64)?;
            let min = wide.min_all()?.host_scalar::<i64>()?;
            if min < 0 {
                bail!("cross_entropy: target id {min} is negative")
            }
            if wide.max_all()?.host_scalar::<i64>()? > u32::MAX as i64 {
                bail!("cross_entropy: target ids do not fit in u32")
            }
            wide.to_dtype(DType::U32)?
        }
        d => bail!("cross_entropy: targets must be integer class ids, got {d:?}"),
    };
    // With an ignore index the targets go to the host anyway (for the mask).
    let host = match ignore_index {
        Some(_) => Some(targets.host_vec1::<u32>()?),
        None => None,
    };
    let out_of_range = match (ignore_index, &host) {
        (Some(ig), Some(t)) => t.iter().copied().find(|&x| x != ig && x as usize >= c),
        // Only the max is needed when nothing is exempt.
        _ => {
            let max_t = targets.max_all()?.host_scalar::<u32>()?;
            ((max_t as usize) >= c).then_some(max_t)
        }
    };
    if let Some(bad) = out_of_range {
        bail!("cross_entropy: target id {bad} is out of range for {c} classes")
    }
    let log_probs = logits.broadcast_sub(&logsumexp_keepdim(&logits)?)?;
    match ignore_index {
        None => {
            let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
            picked.mean_all()?.neg()
        }
        Some(ig) => {
            let t = host.unwrap_or_default();
            let keep: Vec<f32> = t.iter().map(|&x| if x == ig { 0.0 } else { 1.0 }).collect();
            let count: f32 = keep.iter().sum();
            if count == 0.0 {
                bail!("cross_entropy: every target is the ignore index")
            }
            let safe: Vec<u32> = t
                .iter()
                .map(|&x| if x == ig || x as usize >= c { 0 } else { x })
                .collect();
            let safe = Tensor::from_vec(safe, (n, 1), logits.device())?;
            let keep = Tensor::from_vec(keep, (n, 1), logits.device())?;
            let picked = (log_probs.gather(&safe, 1)? * keep)?;
            (picked.sum_all()? / count as f64)?.neg()
        }
    }
}
