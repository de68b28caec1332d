//! The mixture density head (Bishop 1994) against closed forms, its samples, and training it on
//! transformer hidden states.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_moe::classic::MdnHead;
use candle_nn::{VarBuilder, VarMap};
use common::classic::{normal, R};
use rand::{rngs::StdRng, SeedableRng};

/// A head whose weights are zero and whose biases are fixed: the output does not depend on the
/// input, so the NLL has a closed form.
fn fixed_mdn(
    pi_logits: &[f64],
    mu: &[f64],
    log_sigma: &[f64],
    h: usize,
) -> candle_core::Result<MdnHead> {
    let dev = Device::Cpu;
    let k = pi_logits.len();
    let kd = mu.len();
    let mut t = HashMap::new();
    t.insert(
        "pi.weight".to_string(),
        Tensor::zeros((k, h), DType::F64, &dev)?,
    );
    t.insert("pi.bias".to_string(), Tensor::new(pi_logits, &dev)?);
    t.insert(
        "mu.weight".to_string(),
        Tensor::zeros((kd, h), DType::F64, &dev)?,
    );
    t.insert("mu.bias".to_string(), Tensor::new(mu, &dev)?);
    t.insert(
        "log_sigma.weight".to_string(),
        Tensor::zeros((kd, h), DType::F64, &dev)?,
    );
    t.insert("log_sigma.bias".to_string(), Tensor::new(log_sigma, &dev)?);
    MdnHead::new(h, k, kd / k, VarBuilder::from_tensors(t, DType::F64, &dev))
}

#[test]
fn mdn_nll_matches_closed_form() -> R {
    let dev = Device::Cpu;
    // K = 2 components over D = 2 outputs
    let logits = [0.3, -0.4];
    let mu = [0.0, 1.0, 2.0, -1.0];
    let ls = [0.1f64.ln(), 0.5f64.ln(), 1.5f64.ln(), 0.8f64.ln()];
    let head = fixed_mdn(&logits, &mu, &ls, 3)?;
    let xs = Tensor::randn(0f64, 1.0, (2, 2, 3), &dev)?; // (b, t, h)
    let out = head.forward(&xs)?;
    assert_eq!(out.log_pi.dims(), &[2, 2, 2]);
    assert_eq!(out.mu.dims(), &[2, 2, 2, 2]);
    let targets = [[0.1, 0.7], [1.5, -0.2], [-0.3, 2.0], [2.2, -1.1]];
    let target = Tensor::new(&targets, &dev)?.reshape((2, 2, 2))?;
    // closed form
    let lse = (logits[0].exp() + logits[1].exp()).ln();
    let pi = [(logits[0] - lse).exp(), (logits[1] - lse).exp()];
    let sig = [[0.1, 0.5], [1.5, 0.8]];
    let mus = [[0.0, 1.0], [2.0, -1.0]];
    let gauss = |t: f64, m: f64, s: f64| {
        (-(t - m).powi(2) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
    };
    let mut want = 0.0;
    for t in &targets {
        let p: f64 = (0..2)
            .map(|k| pi[k] * gauss(t[0], mus[k][0], sig[k][0]) * gauss(t[1], mus[k][1], sig[k][1]))
            .sum();
        want -= p.ln();
    }
    want /= 4.0;
    let got = head.nll(&out, &target)?.to_scalar::<f64>()?;
    assert!(
        (got - want).abs() < 1e-12,
        "nll {got} vs closed form {want}"
    );
    // per-example log-probabilities have the leading shape
    assert_eq!(out.log_prob(&target)?.dims(), &[2, 2]);
    // a wrong target shape is rejected
    assert!(out
        .log_prob(&Tensor::zeros((2, 2, 3), DType::F64, &dev)?)
        .is_err());
    Ok(())
}

#[test]
fn mdn_samples_match_mixture_mean_and_variance() -> R {
    let dev = Device::Cpu;
    let logits = [0.0, 1.0, -0.5];
    let mu = [-2.0, 0.5, 3.0];
    let ls = [0.3f64.ln(), 0.7f64.ln(), 0.2f64.ln()];
    let head = fixed_mdn(&logits, &mu, &ls, 4)?;
    let n = 40_000;
    let out = head.forward(&Tensor::zeros((n, 4), DType::F64, &dev)?)?;
    let lse = logits.iter().map(|l: &f64| l.exp()).sum::<f64>().ln();
    let pi: Vec<f64> = logits.iter().map(|l| (l - lse).exp()).collect();
    let sig: Vec<f64> = ls.iter().map(|l| l.exp()).collect();
    let mean: f64 = (0..3).map(|k| pi[k] * mu[k]).sum();
    let var: f64 = (0..3)
        .map(|k| pi[k] * (sig[k] * sig[k] + mu[k] * mu[k]))
        .sum::<f64>()
        - mean * mean;
    // closed-form moments from the output
    let m = out.mean()?.i(0)?.to_vec1::<f64>()?[0];
    let v = out.variance()?.i(0)?.to_vec1::<f64>()?[0];
    assert!((m - mean).abs() < 1e-12 && (v - var).abs() < 1e-12);
    // the most probable component's mean
    assert!((out.mode_mean()?.i(0)?.to_vec1::<f64>()?[0] - 0.5).abs() < 1e-12);
    let s = head.sample(&out, &mut StdRng::seed_from_u64(3))?;
    assert_eq!(s.dims(), &[n, 1]);
    let s = s.flatten_all()?.to_vec1::<f64>()?;
    let sm = s.iter().sum::<f64>() / n as f64;
    let sv = s.iter().map(|x| (x - sm).powi(2)).sum::<f64>() / n as f64;
    // standard error of the mean is sqrt(var / n) ≈ 0.01; allow 4 of them
    assert!(
        (sm - mean).abs() < 4.0 * (var / n as f64).sqrt(),
        "sample mean {sm} vs {mean}"
    );
    assert!(
        (sv / var - 1.0).abs() < 0.03,
        "sample variance {sv} vs {var}"
    );
    // component frequencies match π
    let near = |c: f64| s.iter().filter(|&&x| (x - c).abs() < 1.0).count() as f64 / n as f64;
    assert!((near(3.0) - pi[2]).abs() < 0.015);
    Ok(())
}

#[test]
fn mdn_head_trains_on_transformer_hidden_states() -> R {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let head = MdnHead::new(16, 3, 2, vb)?;
    // deterministic parameters and data (candle cannot seed its CPU generator)
    let mut rng = StdRng::seed_from_u64(12);
    {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| 0.25 * normal(&mut rng) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &dev)?)?;
        }
    }
    let mut gen = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| normal(&mut rng) as f32).collect();
        Tensor::from_vec(v, shape, &dev)
    };
    let hidden = gen(&[2, 5, 16])?; // (b, t, h)
    let target = gen(&[2, 5, 2])?;
    let out = head.forward(&hidden)?;
    assert_eq!(out.log_pi.dims(), &[2, 5, 3]);
    assert_eq!(out.mu.dims(), &[2, 5, 3, 2]);
    assert_eq!(out.log_sigma.dims(), &[2, 5, 3, 2]);
    let lse = out.log_pi.exp()?.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(lse.iter().all(|s| (s - 1.0).abs() < 1e-5));
    assert_eq!(
        head.sample(&out, &mut StdRng::seed_from_u64(0))?.dims(),
        &[2, 5, 2]
    );
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 0.05)?;
    let first = head.nll(&out, &target)?.to_scalar::<f32>()?;
    let mut last = first;
    for _ in 0..100 {
        let loss = head.nll(&head.forward(&hidden)?, &target)?;
        last = loss.to_scalar::<f32>()?;
        candle_nn::Optimizer::backward_step(&mut opt, &loss)?;
    }
    assert!(last < first - 1.0, "NLL {first} -> {last}");
    Ok(())
}
