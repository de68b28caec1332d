//! Rotary position embeddings (Su et al. 2021, RoFormer eq. 34, "rotate-half" layout as in
//! Llama/Mixtral), with cos/sin tables grown to the lengths used, and the RoPE frequency
//! scalings of transformers' `modeling_rope_utils.py`: linear position interpolation (Chen et
//! al. 2023), dynamic NTK, YaRN (Peng et al. 2023, with DeepSeek's `mscale` /
//! `mscale_all_dim`) and Llama 3.1's piecewise scaling.
//!
//! Dynamic NTK and the KV cache: transformers recomputes the frequencies from the longest
//! sequence seen (`seq_len = max(position_ids) + 1`) whenever it grows past
//! `max_position_embeddings`, and rotates the new positions with them; keys already cached keep
//! the rotation they were computed with. We do the same, statelessly: the positions
//! `offset..offset + t` of one call are rotated with the frequencies of length `offset + t`
//! (the plain ones up to the original length), cached keys are never re-rotated. (transformers
//! also keeps the grown frequencies for later, shorter calls above the original length until one
//! drops below it; we do not keep that state.)

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::config::RopeScaling;

/// The inverse frequencies `(head_dim / 2,)` and the attention factor (multiplies cos and sin)
/// of RoPE with base `theta` and `scaling`, for a sequence of `seq_len` positions (only dynamic
/// NTK depends on it), as transformers' `ROPE_INIT_FUNCTIONS` compute them.
/// `max_pos` is the model's `max_position_embeddings`.
pub fn rope_parameters(
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
    max_pos: usize,
    seq_len: usize,
) -> (Vec<f64>, f64) {
    let dim = head_dim as f64;
    let plain = |base: f64| -> Vec<f64> {
        (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim))
            .collect()
    };
    match scaling {
        None => (plain(theta), 1.0),
        Some(RopeScaling::Linear { factor }) => {
            (plain(theta).iter().map(|f| f / factor).collect(), 1.0)
        }
        Some(RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings,
        }) => {
            let orig = original_max_position_embeddings.unwrap_or(max_pos) as f64;
            let len = (seq_len as f64).max(orig);
            let base = theta * ((factor * len / orig) - (factor - 1.0)).powf(dim / (dim - 2.0));
            (plain(base), 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate,
        }) => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let att = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *a)
                }
                _ => get_mscale(*factor, 1.0),
            });
            let orig = *original_max_position_embeddings as f64;
            let corr = |rot: f64| {
                dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let inv = plain(theta)
                .iter()
                .enumerate()
                .map(|(i, &extra)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp; // extrapolation weight
                    (extra / factor) * (1.0 - keep) + extra * keep
                })
                .collect();
            (inv, att)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
            let inv = plain(theta)
                .iter()
                .map(|&f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < high_wl {
                        f
                    } else if wl > low_wl {
                        f / factor
                    } else {
                        let s = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect();
            (inv, 1.0)
        }
    }
}

/// Rotary position embeddings (Su et al. 2021): cos/sin tables computed for the lengths used.
#[derive(Debug)]
pub struct Rope {
    head_dim: usize,
    max_pos: usize,
    theta: f64,
    scaling: Option<RopeScaling>,
    dtype: DType,
    device: Device,
    /// `(cos, sin)`, `(rows, d/2)`: built for the lengths used so far (doubling), never for
    /// `max_position_embeddings` up front. (Dynamic NTK above its original length computes
    /// its rows per call instead.)
    tables: std::sync::RwLock<(Tensor, Tensor)>,
}

impl Rope {
    /// Tables for up to `max_pos` positions of `head_dim`-wide heads with base `theta`; the
    /// first 1024 positions are computed now, more when a longer sequence needs them.
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::with_scaling(head_dim, max_pos, theta, None, dtype, dev)
    }

    /// [`Self::new`] with a frequency scaling. `max_pos` is the model's
    /// `max_position_embeddings`; with dynamic NTK, sequences up to
    /// [`crate::config::ModelConfig::position_limit`] are accepted.
    pub fn with_scaling(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        scaling: Option<RopeScaling>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("RoPE needs an even head_dim > 0, got {head_dim}")
        }
        if !(theta.is_finite() && theta > 1.0) {
            bail!("rope_theta must be finite and > 1, got {theta}")
        }
        let rows = max_pos.min(1024);
        let (inv, att) = rope_parameters(head_dim, theta, scaling.as_ref(), max_pos, rows);
        let tables = Self::build(&inv, att, 0, rows, dtype, dev)?;
        Ok(Self {
            head_dim,
            max_pos,
            theta,
            scaling,
            dtype,
            device: dev.clone(),
            tables: std::sync::RwLock::new(tables),
        })
    }

    /// The longest sequence these tables serve.
    fn limit(&self) -> usize {
        match &self.scaling {
            Some(s @ RopeScaling::Dynamic { .. }) => crate::config::dynamic_limit(s, self.max_pos),
            _ => self.max_pos,
        }
    }

    /// The original length past which dynamic NTK rescales (`None`: not dynamic).
    fn dynamic_from(&self) -> Option<usize> {
        match &self.scaling {
            Some(RopeScaling::Dynamic {
                original_max_position_embeddings,
                ..
            }) => Some(original_max_position_embeddings.unwrap_or(self.max_pos)),
            _ => None,
        }
    }

    /// `(cos, sin)` of positions `from..from + rows`, `(rows, d/2)`, times the attention factor.
    fn build(
        inv: &[f64],
        att: f64,
        from: usize,
        rows: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = inv.len();
        // As transformers: f32 frequencies, f32 positions, cos/sin in f32, then the factor.
        let inv: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(from as u32, (from + rows) as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((rows, 1))?;
        let freqs = pos.broadcast_mul(&inv)?; // (rows, d/2)
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if att != 1.0 {
            ((cos * att)?, (sin * att)?)
        } else {
            (cos, sin)
        };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// `(cos, sin)` rows `offset..offset + t`, growing the tables when needed.
    fn rows(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let end = offset + t;
        if end > self.limit() {
            bail!(
                "sequence of {end} positions exceeds max_position_embeddings {}",
                self.limit()
            )
        }
        if let Some(orig) = self.dynamic_from() {
            if end > orig {
                let s = self.scaling.as_ref();
                let (inv, att) = rope_parameters(self.head_dim, self.theta, s, self.max_pos, end);
                return Self::build(&inv, att, offset, t, self.dtype, &self.device);
            }
        }
        {
            let g = match self.tables.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if g.0.dim(0)? >= end {
                return Ok((g.0.narrow(0, offset, t)?, g.1.narrow(0, offset, t)?));
            }
        }
        let mut g = match self.tables.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let have = g.0.dim(0)?;
        if have < end {
            let rows = end.max(2 * have).min(self.max_pos);
            let s = self.scaling.as_ref();
            let (inv, att) = rope_parameters(self.head_dim, self.theta, s, self.max_pos, rows);
            *g = Self::build(&inv, att, 0, rows, self.dtype, &self.device)?;
        }
        Ok((g.0.narrow(0, offset, t)?, g.1.narrow(0, offset, t)?))
    }

    /// Rotates `xs` `(b, heads, t, d)` for positions `offset..offset + t`.
    pub fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let t = xs.dim(2)?;
        let (cos, sin) = self.rows(offset, t)?;
        if xs.track_op() {
            candle_nn::rotary_emb::rope_slow(&xs.contiguous()?, &cos, &sin)
        } else {
            // Inference: the fused kernel (no backward pass).
            candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
        }
    }
}
