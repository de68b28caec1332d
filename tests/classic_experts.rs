//! The classic mixture of experts with other experts than linear-Gaussian ones (softmax
//! classifiers, neural and GRU experts), and mismatched shapes as errors rather than panics.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_moe::classic::series::{lagged, load_sunspots};
use candle_moe::classic::{
    EmConfig, Expert, GruWindow, LinearGaussianExpert, MdnHead, MdnOutput, MixtureOfExperts,
    NeuralExpert, NeuralExpertConfig, SoftmaxExpert, SoftmaxGate,
};
use candle_nn::{VarBuilder, VarMap};
use common::classic::{assert_monotone, data_dir, hme_data, linear_experts, linear_moe, rows, R};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[test]
fn em_with_softmax_experts_classifies_two_regimes() -> R {
    // class depends on x2 with opposite signs in the two halves of x1: no single linear classifier
    let mut rng = StdRng::seed_from_u64(21);
    let n = 600;
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let x1: f64 = rng.random_range(-1.0..1.0);
        let x2: f64 = rng.random_range(-1.0..1.0);
        let c = if x1 < 0.0 { x2 > 0.0 } else { x2 < 0.0 };
        let c = if rng.random::<f64>() < 0.05 { !c } else { c };
        x.extend([x1, x2]);
        labels.push(c as u32);
    }
    let xs = rows(x, n, 2)?;
    let ys = Tensor::from_vec(labels.clone(), n, &Device::Cpu)?;
    let dev = Device::Cpu;
    let mut best = (f64::NEG_INFINITY, 0.0);
    for seed in 0..3 {
        let experts = (0..2)
            .map(|_| SoftmaxExpert::new(2, 2, &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut moe = MixtureOfExperts::new(SoftmaxGate::new(2, 2, &dev)?, experts)?;
        moe.init_random(&xs, &ys, 3.0, &mut StdRng::seed_from_u64(seed))?;
        let report = moe.fit_em(
            &xs,
            &ys,
            &EmConfig {
                max_iters: 60,
                tol: 1e-9,
                gate_steps: 5,
            },
        )?;
        assert_monotone(&report, "softmax experts");
        let p = moe.predict(&xs)?.to_vec2::<f64>()?; // class probabilities
        assert!(p.iter().all(|r| (r[0] + r[1] - 1.0).abs() < 1e-10));
        let acc = p
            .iter()
            .zip(&labels)
            .filter(|(r, &l)| (r[1] > r[0]) == (l == 1))
            .count() as f64
            / n as f64;
        let ll = report.log_likelihood[report.log_likelihood.len() - 1];
        if ll > best.0 {
            best = (ll, acc);
        }
    }
    assert!(best.1 > 0.9, "accuracy of the best restart {}", best.1);
    // one-hot targets give the same likelihood as class ids
    let e = SoftmaxExpert::new(2, 2, &dev)?;
    let onehot = Tensor::from_vec(
        labels
            .iter()
            .flat_map(|&l| if l == 1 { [0.0, 1.0] } else { [1.0, 0.0] })
            .collect::<Vec<f64>>(),
        (n, 2),
        &dev,
    )?;
    let a = e.log_likelihood(&xs, &ys)?.sum_all()?.to_scalar::<f64>()?;
    let b = e
        .log_likelihood(&xs, &onehot)?
        .sum_all()?
        .to_scalar::<f64>()?;
    assert!((a - b).abs() < 1e-9 && (a + n as f64 * 2f64.ln()).abs() < 1e-9);
    Ok(())
}

#[test]
fn neural_and_gru_experts_keep_em_monotone() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let mlp = |vm: &VarMap| -> candle_core::Result<Box<dyn Module>> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &dev);
        let l1 = candle_nn::linear(1, 8, vb.pp("l1"))?;
        let l2 = candle_nn::linear(8, 1, vb.pp("l2"))?;
        Ok(Box::new(
            candle_nn::seq().add(l1).add_fn(|x| x.tanh()).add(l2),
        ))
    };
    let cfg = NeuralExpertConfig {
        steps: 10,
        learning_rate: 0.02,
        min_variance: 1e-6,
    };
    let experts: Vec<Box<dyn Expert>> = (0..2)
        .map(|_| {
            let vm = VarMap::new();
            let m = mlp(&vm)?;
            Ok(Box::new(NeuralExpert::new(m, vm, 1, cfg.clone())?) as Box<dyn Expert>)
        })
        .chain(std::iter::once(Ok(
            Box::new(LinearGaussianExpert::new(1, 1, &dev)?) as Box<dyn Expert>,
        )))
        .collect::<candle_core::Result<_>>()?;
    let mut moe: MixtureOfExperts = MixtureOfExperts::new(SoftmaxGate::new(1, 3, &dev)?, experts)?;
    moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(1))?;
    let report = moe.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 25,
            tol: 0.0,
            gate_steps: 3,
        },
    )?;
    assert!(assert_monotone(&report, "neural experts") > 50.0);

    // a GRU over a window of lags as an autoregressive expert on the sunspots
    let sun = load_sunspots(data_dir().join("sunspots.csv"))?;
    let v: Vec<f64> = sun.iter().take(120).map(|r| r.1 / 50.0 - 1.0).collect();
    let (lx, ly) = lagged(&v, 4)?;
    let vm = VarMap::new();
    let gru = GruWindow::new(4, 6, 1, VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
    let experts: Vec<Box<dyn Expert>> = vec![
        Box::new(NeuralExpert::new(Box::new(gru), vm, 1, cfg.clone())?),
        Box::new(LinearGaussianExpert::new(4, 1, &dev)?),
    ];
    let mut moe: MixtureOfExperts = MixtureOfExperts::new(SoftmaxGate::new(4, 2, &dev)?, experts)?;
    moe.init_random(&lx, &ly, 2.0, &mut StdRng::seed_from_u64(2))?;
    let report = moe.fit_em(
        &lx,
        &ly,
        &EmConfig {
            max_iters: 8,
            tol: 0.0,
            gate_steps: 3,
        },
    )?;
    assert!(assert_monotone(&report, "gru expert") > 1.0);
    assert_eq!(moe.predict(&lx)?.dims(), &[116, 1]);
    Ok(())
}

#[test]
fn mismatched_shapes_are_errors_not_panics() -> R {
    let dev = Device::Cpu;
    assert!(
        MixtureOfExperts::new(SoftmaxGate::new(2, 3, &dev)?, linear_experts(2, 2, 1)?).is_err()
    );
    let mut moe = linear_moe(2, 2)?;
    let xs = Tensor::zeros((5, 3), DType::F64, &dev)?;
    let ys = Tensor::zeros((5, 1), DType::F64, &dev)?;
    assert!(moe.predict(&xs).is_err());
    assert!(moe.fit_em(&xs, &ys, &EmConfig::default()).is_err());
    let xs = Tensor::zeros((5, 2), DType::F64, &dev)?;
    assert!(moe
        .log_likelihood(&xs, &Tensor::zeros((4, 1), DType::F64, &dev)?)
        .is_err());
    let mut e = LinearGaussianExpert::new(2, 1, &dev)?;
    assert!(e
        .m_step(&xs, &ys, &Tensor::new(&[1.0, -1.0, 1.0, 1.0, 1.0], &dev)?)
        .is_err());
    assert!(lagged(&[1.0, 2.0], 2).is_err());
    assert!(load_sunspots(data_dir().join("missing.csv")).is_err());
    assert!(MdnHead::new(0, 2, 1, VarBuilder::zeros(DType::F32, &dev)).is_err());
    let bad = MdnOutput {
        log_pi: Tensor::zeros(3, DType::F32, &dev)?,
        mu: Tensor::zeros(3, DType::F32, &dev)?,
        log_sigma: Tensor::zeros(3, DType::F32, &dev)?,
    };
    assert!(bad.sample(&mut StdRng::seed_from_u64(0)).is_err());
    assert!(bad.mean().is_err());
    assert!(bad.log_prob(&Tensor::zeros(3, DType::F32, &dev)?).is_err());
    Ok(())
}
