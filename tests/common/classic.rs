//! Helpers shared by the tests of the classic mixture of experts (`tests/classic_*.rs`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candle_moe::classic::{EmReport, LinearGaussianExpert, MixtureOfExperts, SoftmaxGate};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub type R = candle_core::Result<()>;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/timeseries")
}

pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn linear_experts(
    k: usize,
    d: usize,
    m: usize,
) -> candle_core::Result<Vec<LinearGaussianExpert>> {
    (0..k)
        .map(|_| LinearGaussianExpert::new(d, m, &Device::Cpu))
        .collect()
}

pub fn linear_moe(
    k: usize,
    d: usize,
) -> candle_core::Result<MixtureOfExperts<LinearGaussianExpert>> {
    MixtureOfExperts::new(
        SoftmaxGate::new(d, k, &Device::Cpu)?,
        linear_experts(k, d, 1)?,
    )
}

/// Asserts that the EM trace never decreases (up to rounding) and returns the total gain.
pub fn assert_monotone(report: &EmReport, what: &str) -> f64 {
    let ll = &report.log_likelihood;
    assert_eq!(ll.len(), report.iterations + 1, "{what}: trace length");
    for (i, w) in ll.windows(2).enumerate() {
        assert!(
            w[1] >= w[0] - 1e-9 * w[0].abs().max(1.0),
            "{what}: log-likelihood decreased at iteration {i}: {} -> {}",
            w[0],
            w[1]
        );
    }
    ll[ll.len() - 1] - ll[0]
}

pub fn rows(v: Vec<f64>, n: usize, d: usize) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, (n, d), &Device::Cpu)
}

pub fn hme_data() -> candle_core::Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(11);
    let n = 400;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..n {
        let v: f64 = rng.random_range(-2.0..2.0);
        x.push(v);
        // four linear pieces
        let t = match v {
            v if v < -1.0 => 2.0 * v + 3.0,
            v if v < 0.0 => -v,
            v if v < 1.0 => 3.0 * v,
            v => 4.0 - v,
        };
        y.push(t + 0.1 * normal(&mut rng));
    }
    Ok((rows(x, n, 1)?, rows(y, n, 1)?))
}
