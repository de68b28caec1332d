//! FP8 e4m3 weights with `weight_scale_inv` 128×128 block scales (DeepSeek-V3; transformers'
//! finegrained FP8): a weight `W` `(rows, cols)` is stored as `q = fp8_e4m3(W / s)` with one
//! f32 scale `s` per 128×128 block, `scale_inv` `(ceil(rows/128), ceil(cols/128))`, and is
//! dequantised at load as `W[i, j] = f32(q[i, j]) · scale_inv[i / 128, j / 128]`.

use crate::error::{CheckpointErrorKind, Error, Result};

/// The block size of the scales (DeepSeek-V3 `weight_block_size` = [128, 128]).
pub(crate) const BLOCK: usize = 128;

/// The f32 value of one e4m3fn byte (OCP FP8: 1 sign, 4 exponent bits with bias 7, 3 mantissa
/// bits; no infinities, `S.1111.111` is NaN).
pub(crate) fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((b >> 3) & 0x0f);
    let m = f32::from(b & 0x07);
    if e == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * mag
}

/// Dequantises `q` (e4m3 bytes of a `(rows, cols)` weight) with its block scales `scale_inv`
/// `(ceil(rows/128), ceil(cols/128))` (row-major); the error names `name` and the scale.
pub(crate) fn dequantize(
    name: &str,
    file: &std::path::Path,
    q: &[u8],
    shape: &[usize],
    scale_inv: &[f32],
    scale_shape: &[usize],
) -> Result<Vec<f32>> {
    let (rows, cols) = match shape {
        [r, c] => (*r, *c),
        _ => {
            return Err(Error::tensor(
                file,
                name,
                CheckpointErrorKind::Corrupt,
                format!("FP8 tensor `{name}` must be 2-D, got shape {shape:?}"),
            ))
        }
    };
    let want = [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)];
    if scale_shape != want || q.len() != rows * cols {
        return Err(Error::tensor(
            file,
            format!("{name}_scale_inv").as_str(),
            CheckpointErrorKind::Shape {
                expected: want.to_vec(),
                found: scale_shape.to_vec(),
            },
            format!(
                "`{name}_scale_inv` has shape {scale_shape:?}, the {rows}×{cols} FP8 weight `{name}` needs {want:?} (128×128 blocks)"
            ),
        ));
    }
    let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let srow = &scale_inv[(i / BLOCK) * want[1]..(i / BLOCK + 1) * want[1]];
        for (j, &b) in q[i * cols..(i + 1) * cols].iter().enumerate() {
            out.push(lut[usize::from(b)] * srow[j / BLOCK]);
        }
    }
    Ok(out)
}

/// Reads every tensor of one safetensors file through the checked loading backend, FP8 weights
/// dequantised with their `<name>_scale_inv` block scales (which are consumed, not returned):
/// the tensors a model loaded from the file would see, as f32 on the CPU.
pub fn read_dequantized(
    path: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let files = [path.to_path_buf()];
    let opts = crate::io::hub::LoadOptions::default();
    let (vb, log, names) = crate::io::backend::var_builder(&files, &opts, None)?;
    let mut out = std::collections::BTreeMap::new();
    for name in names.iter().filter(|n| !n.ends_with("_scale_inv")) {
        let t = vb
            .get_unchecked(name)
            .map_err(|e| crate::io::backend::build_error(&log, e, path))?;
        out.insert(name.clone(), t);
    }
    crate::io::backend::check_unused(&log, &names, path)?;
    Ok(out)
}
