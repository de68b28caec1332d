//! Seeded parameter initialisation.
//!
//! candle's CPU random generator cannot be seeded, so models built from a `VarMap` start from
//! different weights on every run. [`reseed_varmap`] redraws every variable from a seeded
//! generator (in name order), which makes training runs and tests reproducible.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use crate::ops::{normal, sorted_vars};

/// Redraws every variable of `varmap` from a generator seeded with `seed`.
///
/// - rank ≥ 2 named `*embed*` / `*wte*` / `*wpe*`: normal, std 0.02 (GPT-2);
/// - other rank ≥ 2 (linear weights `(out, in)`): uniform `±1/sqrt(in)` (PyTorch's default);
/// - rank 1 whose values are all equal (norm weights, biases) is kept as initialised.
pub fn reseed_varmap(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in sorted_vars(varmap) {
        let name = name.as_str();
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        if dims.len() < 2 {
            let v = var
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?;
            if v.windows(2).all(|w| w[0] == w[1]) {
                continue;
            }
        }
        let embed = name.contains("embed") || name.contains("wte") || name.contains("wpe");
        let vals: Vec<f32> = if embed && dims.len() >= 2 {
            (0..n).map(|_| (0.02 * normal(&mut rng)) as f32).collect()
        } else {
            let fan_in = *dims.last().unwrap_or(&1) as f64;
            let b = 1.0 / fan_in.max(1.0).sqrt();
            (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
        };
        let t = Tensor::from_vec(vals, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Sets every variable of `dst` to the same-named variable of `src` (shapes must match): how
/// an expert-parallel rank, whose `VarMap` holds only its share of the experts, starts from the
/// single-process model's initial weights (build that model over `src`, [`reseed_varmap`] it,
/// copy). Errors name a variable `src` lacks or whose shape differs.
pub fn copy_vars(dst: &VarMap, src: &VarMap) -> Result<()> {
    let vars = sorted_vars(dst);
    let from = crate::ops::lock(src.data());
    for (name, var) in vars {
        let Some(s) = from.get(&name) else {
            candle_core::bail!("copy_vars: `{name}` is not a variable of the source VarMap")
        };
        if s.dims() != var.dims() {
            candle_core::bail!(
                "copy_vars: `{name}` has shape {:?} in the source, {:?} here",
                s.dims(),
                var.dims()
            )
        }
        var.set(&s.as_tensor().to_dtype(var.dtype())?)?;
    }
    Ok(())
}
