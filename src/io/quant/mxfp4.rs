//! MXFP4 expert blocks with E8M0 scales (gpt-oss), dequantised at load.
//!
//! OCP Microscaling MXFP4: every group of 32 values shares one E8M0 scale `2^(s - 127)`; each
//! value is a 4-bit E2M1 code. gpt-oss stores `*_blocks` u8 `[E, R, G, 16]` (two codes per byte,
//! the low nibble first) and `*_scales` u8 `[E, R, G]`; as transformers'
//! `integrations/mxfp4.py::convert_moe_packed_tensors` (5.24), row `r` of expert `e` dequantises
//! to `32·G` values `lut[code] · 2^(s - 127)`, and the result is transposed to `[E, 32·G, R]`.

/// E2M1 code -> value (transformers' `FP4_VALUES`).
pub(crate) const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The dequantised shape `[E, 32·G, R]` of blocks `[E, R, G, 16]` (u8) with scales `[E, R, G]`
/// (u8); the error message names the tensor at fault.
pub(crate) fn dequantized_shape(
    blocks: &str,
    bshape: &[usize],
    bdtype: &str,
    scales: &str,
    sshape: &[usize],
    sdtype: &str,
) -> Result<Vec<usize>, String> {
    for (n, dt) in [(blocks, bdtype), (scales, sdtype)] {
        if !matches!(dt, "U8" | "F8_E8M0" | "E8M0" | "I8") {
            return Err(format!("MXFP4 tensor `{n}` has dtype {dt}, expected U8"));
        }
    }
    match bshape {
        [e, r, g, 16] if sshape == [*e, *r, *g] => Ok(vec![*e, 32 * g, *r]),
        [_, _, _, 16] => Err(format!(
            "MXFP4 scales `{scales}` have shape {sshape:?}, expected {:?} (the blocks' `{blocks}` {bshape:?} without the last dimension)",
            &bshape[..3]
        )),
        _ => Err(format!(
            "MXFP4 blocks `{blocks}` have shape {bshape:?}, expected [experts, rows, groups, 16]"
        )),
    }
}

/// Dequantises blocks `[E, R, G, 16]` with scales `[E, R, G]` into `[E, 32·G, R]` f32
/// (row-major), exactly as transformers does in f32 (`ldexp` of the table value).
pub(crate) fn dequantize(
    blocks: &[u8],
    bshape: &[usize],
    scales: &[u8],
) -> Result<Vec<f32>, String> {
    let [e, r, g, b] = bshape else {
        return Err(format!("MXFP4 blocks must be 4-D, got {bshape:?}"));
    };
    let (e, r, g, b) = (*e, *r, *g, *b);
    if blocks.len() != e * r * g * b || scales.len() != e * r * g || b != 16 {
        return Err(format!(
            "MXFP4: {} block bytes and {} scales do not fit {bshape:?}",
            blocks.len(),
            scales.len()
        ));
    }
    let cols = g * 2 * b; // values per row
    let mut out = vec![0f32; e * cols * r];
    for ei in 0..e {
        for ri in 0..r {
            for gi in 0..g {
                let row = (ei * r + ri) * g + gi;
                let scale = ((scales[row] as i32) - 127) as f64;
                let mul = scale.exp2();
                for bi in 0..b {
                    let byte = blocks[row * b + bi];
                    for (k, code) in [(0, byte & 0x0F), (1, byte >> 4)] {
                        let v = (FP4_VALUES[code as usize] as f64 * mul) as f32;
                        let c = gi * 2 * b + 2 * bi + k;
                        out[(ei * cols + c) * r + ri] = v;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Dequantises MXFP4 `blocks` (u8 `[E, R, G, 16]`) with E8M0 `scales` (u8 `[E, R, G]`) into
/// f32 `[E, 32·G, R]` on the blocks' device, exactly as transformers'
/// `convert_moe_packed_tensors` (the layout of gpt-oss's `gate_up_proj` / `down_proj`).
pub fn dequantize_mxfp4(
    blocks: &candle_core::Tensor,
    scales: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let shape = dequantized_shape(
        "blocks",
        blocks.dims(),
        &format!("{:?}", blocks.dtype()).to_uppercase(),
        "scales",
        scales.dims(),
        &format!("{:?}", scales.dtype()).to_uppercase(),
    )
    .map_err(candle_core::Error::msg)?;
    let b = blocks.flatten_all()?.to_vec1::<u8>()?;
    let s = scales.flatten_all()?.to_vec1::<u8>()?;
    let v = dequantize(&b, blocks.dims(), &s).map_err(candle_core::Error::msg)?;
    candle_core::Tensor::from_vec(v, shape, blocks.device())
}
