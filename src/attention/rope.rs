//! Rotary position embeddings (Su et al. 2021, RoFormer eq. 34, "rotate-half" layout as in
//! Llama/Mixtral), with cos/sin tables grown to the lengths used.

use candle_core::{bail, DType, Device, Result, Tensor};

/// Rotary position embeddings (Su et al. 2021): cos/sin tables computed for the lengths used.
#[derive(Debug)]
pub struct Rope {
    head_dim: usize,
    max_pos: usize,
    theta: f64,
    dtype: DType,
    device: Device,
    /// `(cos, sin)`, `(rows, d/2)`: built for the lengths used so far (doubling), never for
    /// `max_position_embeddings` up front.
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
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("RoPE needs an even head_dim > 0, got {head_dim}")
        }
        if !(theta.is_finite() && theta > 1.0) {
            bail!("rope_theta must be finite and > 1, got {theta}")
        }
        let rows = max_pos.min(1024);
        let tables = Self::build(head_dim, rows, theta, dtype, dev)?;
        Ok(Self {
            head_dim,
            max_pos,
            theta,
            dtype,
            device: dev.clone(),
            tables: std::sync::RwLock::new(tables),
        })
    }

    fn build(
        head_dim: usize,
        rows: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, rows as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((rows, 1))?;
        let freqs = pos.broadcast_mul(&inv)?; // (rows, d/2)
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// `(cos, sin)` rows `offset..offset + t`, growing the tables when needed.
    fn rows(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let end = offset + t;
        if end > self.max_pos {
            bail!(
                "sequence of {end} positions exceeds max_position_embeddings {}",
                self.max_pos
            )
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
            *g = Self::build(self.head_dim, rows, self.theta, self.dtype, &self.device)?;
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
