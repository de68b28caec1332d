//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod classic;
pub mod json;
pub mod moe_ref;
#[cfg(feature = "mpi")]
pub mod mpirun;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// Deterministic pseudo-random normals (SplitMix64 + Box-Muller), independent of candle's RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_add(0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * std).collect()
    }
    pub fn tensor(&mut self, shape: &[usize], std: f64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.normals(n, std), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

/// Overwrites every var of `varmap` with N(0, std²) values from `rng`, in name order.
pub fn randomize(varmap: &VarMap, rng: &mut Rng, std: f64) {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for n in names {
        let v = &data[&n];
        let t = rng.tensor(v.dims(), std, v.dtype());
        v.set(&t).unwrap();
    }
}

/// A sparse layer's weights drawn at random (N(0, std²), seeded) and rounded to `dt`: the f64
/// varmap holding the rounded values (what the per-token reference reads) and the rounded
/// tensors by name (to build the same layer in `dt`).
pub fn rounded_moe_weights(
    cfg: &candle_moe::MoeConfig,
    seed: u64,
    std: f64,
    dt: DType,
) -> (VarMap, std::collections::HashMap<String, Tensor>) {
    let vm64 = VarMap::new();
    candle_moe::SparseMoe::new(
        cfg,
        candle_nn::VarBuilder::from_varmap(&vm64, DType::F64, &Device::Cpu),
    )
    .unwrap();
    randomize(&vm64, &mut Rng::new(seed), std);
    let mut rounded = std::collections::HashMap::new();
    for (name, v) in vm64.data().lock().unwrap().iter() {
        let r = v.as_tensor().to_dtype(dt).unwrap();
        v.set(&r.to_dtype(DType::F64).unwrap()).unwrap();
        rounded.insert(name.clone(), r);
    }
    (vm64, rounded)
}

/// The value of a named var as a host matrix of f64.
pub fn mat(varmap: &VarMap, name: &str) -> Vec<Vec<f64>> {
    let data = varmap.data().lock().unwrap();
    let v = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
    v.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

pub fn matvec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A Hugging Face fixture directory (`tests/fixtures/hf/<name>`).
pub fn hf_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A fixed language-model batch below the fixtures' vocabulary of 96: inputs `(2, 12)`,
/// next-token targets `(24,)`.
pub fn fixed_lm_batch() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..26u32).map(|i| (i * 37 + 11) % 96).collect();
    let t = Tensor::from_vec(ids, (2, 13), &Device::Cpu).unwrap();
    let y = t.narrow(1, 1, 12).unwrap().flatten_all().unwrap();
    (t.narrow(1, 0, 12).unwrap(), y)
}

/// An example binary: cargo test builds the examples beside the test binaries, one level up
/// from `target/<profile>/deps`.
pub fn example_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

/// Runs an example binary without backtraces in the environment (candle errors would carry
/// them in their message); returns (exit code, stderr).
pub fn example_cli(name: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(example_path(name))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
