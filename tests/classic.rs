//! Tests of the classic mixture of experts (Jordan & Jacobs 1994 EM), the hierarchical MoE and the
//! mixture density head (Bishop 1994), against closed forms and known generating parameters.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_moe::classic::series::{co2_monthly, lagged, load_co2_weekly, load_sunspots};
use candle_moe::classic::{
    EmConfig, EmReport, Expert, GradientConfig, GruWindow, HierarchicalMoe, HmeNode,
    LinearGaussianExpert, MdnHead, MdnOutput, MixtureOfExperts, NeuralExpert, NeuralExpertConfig,
    SoftmaxExpert, SoftmaxGate,
};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};

type R = candle_core::Result<()>;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/timeseries")
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn linear_experts(k: usize, d: usize, m: usize) -> candle_core::Result<Vec<LinearGaussianExpert>> {
    (0..k)
        .map(|_| LinearGaussianExpert::new(d, m, &Device::Cpu))
        .collect()
}

fn linear_moe(k: usize, d: usize) -> candle_core::Result<MixtureOfExperts<LinearGaussianExpert>> {
    MixtureOfExperts::new(
        SoftmaxGate::new(d, k, &Device::Cpu)?,
        linear_experts(k, d, 1)?,
    )
}

/// Asserts that the EM trace never decreases (up to rounding) and returns the total gain.
fn assert_monotone(report: &EmReport, what: &str) -> f64 {
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

fn rows(v: Vec<f64>, n: usize, d: usize) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, (n, d), &Device::Cpu)
}

#[test]
fn em_log_likelihood_never_decreases_on_random_data() -> R {
    let mut rng = StdRng::seed_from_u64(1);
    let (n, d) = (300, 3);
    let x: Vec<f64> = (0..n * d).map(|_| normal(&mut rng)).collect();
    // a nonlinear target no linear mixture fits exactly, with heavy-ish noise
    let y: Vec<f64> = (0..n)
        .map(|i| (2.0 * x[i * d]).sin() + x[i * d + 1] * x[i * d + 2] + 0.3 * normal(&mut rng))
        .collect();
    let xs = rows(x, n, d)?;
    let ys = rows(y, n, 1)?;
    for seed in 0..3 {
        let mut moe = linear_moe(4, d)?;
        moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(seed))?;
        let report = moe.fit_em(
            &xs,
            &ys,
            &EmConfig {
                max_iters: 60,
                tol: 0.0,
                gate_steps: 3,
            },
        )?;
        assert_eq!(report.iterations, 60);
        assert!(!report.converged);
        let gain = assert_monotone(&report, "random data");
        assert!(
            gain > 1.0,
            "EM should improve on the initialisation, gained {gain}"
        );
        // the reported final value is the model's log-likelihood
        let ll = moe.log_likelihood(&xs, &ys)?;
        assert!((ll - report.log_likelihood[60]).abs() < 1e-9 * ll.abs());
    }
    Ok(())
}

#[test]
fn em_log_likelihood_never_decreases_on_shipped_series() -> R {
    let sun = load_sunspots(data_dir().join("sunspots.csv"))?;
    assert_eq!(sun.len(), 309);
    assert_eq!((sun[0].0, sun[308].0), (1700, 2008));
    let v: Vec<f64> = sun.iter().map(|r| r.1 / 50.0).collect();
    let (xs, ys) = lagged(&v, 6)?;
    let mut moe = linear_moe(3, 6)?;
    moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(3))?;
    let report = moe.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 80,
            tol: 0.0,
            gate_steps: 5,
        },
    )?;
    assert!(assert_monotone(&report, "sunspots") > 10.0);

    let weekly = load_co2_weekly(data_dir().join("co2.csv"))?;
    let monthly = co2_monthly(&weekly)?;
    let d: Vec<f64> = monthly
        .windows(2)
        .map(|w| w[1].value - w[0].value)
        .collect();
    let (xs, ys) = lagged(&d, 12)?;
    let mut moe = linear_moe(2, 12)?;
    moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(4))?;
    let report = moe.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 60,
            tol: 0.0,
            gate_steps: 5,
        },
    )?;
    assert!(assert_monotone(&report, "co2") > 10.0);
    Ok(())
}

#[test]
fn co2_reader_averages_weeks_and_fills_missing_months() -> R {
    let weekly = load_co2_weekly(data_dir().join("co2.csv"))?;
    assert_eq!(weekly.len(), 2284);
    assert_eq!(weekly.iter().filter(|w| w.1.is_none()).count(), 59);
    assert_eq!(weekly[0], (19580329, Some(316.1)));
    let monthly = co2_monthly(&weekly)?;
    // March 1958 … December 2001
    assert_eq!(monthly.len(), 12 * 44 - 2);
    assert_eq!((monthly[0].year, monthly[0].month), (1958, 3));
    let last = monthly[monthly.len() - 1];
    assert_eq!((last.year, last.month), (2001, 12));
    assert!(monthly
        .iter()
        .all(|m| m.value.is_finite() && m.value > 300.0 && m.value < 380.0));
    let filled: Vec<usize> = (0..monthly.len())
        .filter(|&i| monthly[i].observed_weeks == 0)
        .collect();
    assert!(!filled.is_empty());
    for &i in &filled {
        // interior gaps are interpolated between the neighbouring observed months
        let (a, b) = (monthly[i - 1].value, monthly[i + 1].value);
        assert!(monthly[i].value >= a.min(b) - 1e-9 && monthly[i].value <= a.max(b) + 1e-9);
    }
    // March 1958: 19580329 only (316.1)
    assert!((monthly[0].value - 316.1).abs() < 1e-12);
    // a small synthetic case: two observed months around a gap
    let m = co2_monthly(&[
        (20000105, Some(1.0)),
        (20000112, Some(3.0)),
        (20000215, None),
        (20000310, Some(5.0)),
    ])?;
    assert_eq!(m.len(), 3);
    assert_eq!((m[0].value, m[1].value, m[2].value), (2.0, 3.5, 5.0));
    assert_eq!(m[1].observed_weeks, 0);
    Ok(())
}

/// Two linear regimes split by the sign of x₁; EM must find both regression planes, their noise
/// levels and the split.
#[test]
fn em_recovers_two_linear_regimes() -> R {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 1200;
    let (wa, ba, sa) = ([1.5, -2.0], 0.5, 0.1);
    let (wb, bb, sb) = ([-1.0, 0.5], -1.0, 0.2);
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut regime = Vec::new();
    for _ in 0..n {
        let x1: f64 = rng.random_range(-1.0..1.0);
        let x2: f64 = rng.random_range(-1.0..1.0);
        let a = x1 < 0.0;
        let v = if a {
            wa[0] * x1 + wa[1] * x2 + ba + sa * normal(&mut rng)
        } else {
            wb[0] * x1 + wb[1] * x2 + bb + sb * normal(&mut rng)
        };
        x.extend([x1, x2]);
        y.push(v);
        regime.push(a);
    }
    let xs = rows(x, n, 2)?;
    let ys = rows(y, n, 1)?;
    // a few restarts, keep the best likelihood (the usual practice for EM)
    let mut best: Option<(f64, MixtureOfExperts<LinearGaussianExpert>)> = None;
    for seed in 0..3 {
        let mut moe = linear_moe(2, 2)?;
        moe.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(seed))?;
        let report = moe.fit_em(
            &xs,
            &ys,
            &EmConfig {
                max_iters: 200,
                tol: 1e-10,
                gate_steps: 5,
            },
        )?;
        assert_monotone(&report, "two regimes");
        let ll = report.log_likelihood[report.log_likelihood.len() - 1];
        if best.as_ref().is_none_or(|b| ll > b.0) {
            best = Some((ll, moe));
        }
    }
    let Some((_, moe)) = best else {
        panic!("no restart")
    };
    // match experts to regimes by their bias
    let w: Vec<Vec<f64>> = moe
        .experts()
        .iter()
        .map(|e| e.weight().flatten_all()?.to_vec1::<f64>())
        .collect::<candle_core::Result<_>>()?;
    let var: Vec<f64> = moe
        .experts()
        .iter()
        .map(|e| Ok(e.variance()?.to_vec1::<f64>()?[0]))
        .collect::<candle_core::Result<_>>()?;
    let (ia, ib) = if w[0][2] > w[1][2] { (0, 1) } else { (1, 0) };
    for (i, (ww, b, s)) in [(ia, (wa, ba, sa)), (ib, (wb, bb, sb))] {
        assert!(
            (w[i][0] - ww[0]).abs() < 0.05,
            "slope x1 {} vs {}",
            w[i][0],
            ww[0]
        );
        assert!(
            (w[i][1] - ww[1]).abs() < 0.05,
            "slope x2 {} vs {}",
            w[i][1],
            ww[1]
        );
        assert!((w[i][2] - b).abs() < 0.05, "bias {} vs {b}", w[i][2]);
        let sd = var[i].sqrt();
        assert!((sd / s - 1.0).abs() < 0.15, "noise sd {sd} vs {s}");
    }
    // the gate learned the split: it picks the right expert for ≥ 97% of the inputs
    let g = moe.gate_probs(&xs)?.to_vec2::<f64>()?;
    let correct = g
        .iter()
        .zip(&regime)
        .filter(|(row, &a)| (row[ia] > row[ib]) == a)
        .count();
    assert!(
        correct as f64 / n as f64 > 0.97,
        "gate accuracy {correct}/{n}"
    );
    // the responsibilities are a distribution per example
    let h = moe.responsibilities(&xs, &ys)?;
    let sums = h.sum(1)?.to_vec1::<f64>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12));
    // the mixture's prediction is the gate-weighted sum of the experts'
    let pred = moe.predict(&xs)?.to_vec2::<f64>()?;
    let p0 = moe.experts()[0].predict(&xs)?.to_vec2::<f64>()?;
    let p1 = moe.experts()[1].predict(&xs)?.to_vec2::<f64>()?;
    for i in (0..n).step_by(97) {
        let want = g[i][0] * p0[i][0] + g[i][1] * p1[i][0];
        assert!((pred[i][0] - want).abs() < 1e-12);
    }
    Ok(())
}

fn hme_data() -> candle_core::Result<(Tensor, Tensor)> {
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

/// A tree whose root has a single branch computes exactly what the flat MoE under that branch's
/// gate computes, through a whole EM run.
#[test]
fn hme_with_one_branch_reduces_to_flat_moe() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let mut flat = linear_moe(3, 1)?;
    flat.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(5))?;
    // copy the initial parameters into the tree
    let branch_gate = flat.gate().try_clone()?;
    let experts = flat
        .experts()
        .iter()
        .map(|e| e.try_clone())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut top = SoftmaxGate::new(1, 1, &dev)?;
    top.randomize(&xs, 3.0, &mut StdRng::seed_from_u64(9))?; // a 1-way softmax is 1 whatever V
    let mut hme = HierarchicalMoe::two_level(top, vec![(branch_gate, experts)])?;
    assert_eq!(hme.n_leaves(), 3);

    let ll0_flat = flat.log_likelihood(&xs, &ys)?;
    let ll0_hme = hme.log_likelihood(&xs, &ys)?;
    assert!((ll0_flat - ll0_hme).abs() < 1e-9 * ll0_flat.abs());
    let cfg = EmConfig {
        max_iters: 25,
        tol: 0.0,
        gate_steps: 4,
    };
    let rf = flat.fit_em(&xs, &ys, &cfg)?;
    let rh = hme.fit_em(&xs, &ys, &cfg)?;
    assert_monotone(&rh, "hme");
    assert_eq!(rf.log_likelihood.len(), rh.log_likelihood.len());
    for (a, b) in rf.log_likelihood.iter().zip(&rh.log_likelihood) {
        assert!(
            (a - b).abs() < 1e-8 * a.abs().max(1.0),
            "flat {a} vs hme {b}"
        );
    }
    assert!(rf.log_likelihood[25] - rf.log_likelihood[0] > 50.0);
    let pf = flat.predict(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let ph = hme.predict(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let max_diff = pf
        .iter()
        .zip(&ph)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max_diff < 1e-8, "predictions differ by {max_diff}");
    let gf = flat.gate_probs(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let gh = hme.leaf_probs(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    assert!(gf.iter().zip(&gh).all(|(a, b)| (a - b).abs() < 1e-8));
    let hf = flat
        .responsibilities(&xs, &ys)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let hh = hme
        .leaf_posteriors(&xs, &ys)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(hf.iter().zip(&hh).all(|(a, b)| (a - b).abs() < 1e-8));
    Ok(())
}

#[test]
fn two_level_hme_em_is_monotone_and_fits_four_pieces() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let mut best = f64::NEG_INFINITY;
    let mut best_mse = f64::INFINITY;
    for seed in 0..3 {
        let branches = (0..2)
            .map(|_| Ok((SoftmaxGate::new(1, 2, &dev)?, linear_experts(2, 1, 1)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut hme = HierarchicalMoe::two_level(SoftmaxGate::new(1, 2, &dev)?, branches)?;
        hme.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(seed))?;
        let report = hme.fit_em(
            &xs,
            &ys,
            &EmConfig {
                max_iters: 150,
                tol: 1e-9,
                gate_steps: 5,
            },
        )?;
        assert_monotone(&report, "two-level hme");
        let post = hme.leaf_posteriors(&xs, &ys)?;
        assert_eq!(post.dims(), &[400, 4]);
        assert!(post
            .sum(1)?
            .to_vec1::<f64>()?
            .iter()
            .all(|s| (s - 1.0).abs() < 1e-10));
        let prior = hme.leaf_probs(&xs)?;
        assert!(prior
            .sum(1)?
            .to_vec1::<f64>()?
            .iter()
            .all(|s| (s - 1.0).abs() < 1e-10));
        let ll = report.log_likelihood[report.log_likelihood.len() - 1];
        if ll > best {
            best = ll;
            let r = (hme.predict(&xs)? - &ys)?;
            best_mse = r.sqr()?.mean_all()?.to_scalar::<f64>()?;
        }
    }
    // noise variance is 0.01; a fit of all four pieces gets close to it
    assert!(best_mse < 0.03, "best HME mse {best_mse}");
    assert!(
        best / 400.0 > 0.4,
        "best mean log-likelihood {}",
        best / 400.0
    );
    Ok(())
}

/// Trees of mixed depth built from explicit `HmeNode`s train by the same nested EM; a gate whose
/// output count does not match its children is rejected.
#[test]
fn hme_accepts_unbalanced_trees() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let leaf = || -> candle_core::Result<HmeNode<LinearGaussianExpert>> {
        Ok(HmeNode::Leaf(LinearGaussianExpert::new(1, 1, &dev)?))
    };
    let root = HmeNode::Gate {
        gate: SoftmaxGate::new(1, 2, &dev)?,
        children: vec![
            leaf()?,
            HmeNode::Gate {
                gate: SoftmaxGate::new(1, 3, &dev)?,
                children: vec![leaf()?, leaf()?, leaf()?],
            },
        ],
    };
    let mut hme = HierarchicalMoe::new(root)?;
    assert_eq!(hme.n_leaves(), 4);
    hme.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(2))?;
    let report = hme.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 40,
            tol: 0.0,
            gate_steps: 3,
        },
    )?;
    assert!(assert_monotone(&report, "unbalanced hme") > 100.0);
    // a gate with the wrong number of outputs is rejected
    let bad = HmeNode::Gate {
        gate: SoftmaxGate::new(1, 3, &dev)?,
        children: vec![leaf()?, leaf()?],
    };
    assert!(HierarchicalMoe::new(bad).is_err());
    Ok(())
}

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
fn gradient_training_of_the_same_model_improves_but_em_is_at_least_as_good() -> R {
    let (xs, ys) = hme_data()?;
    let mut em = linear_moe(4, 1)?;
    em.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(8))?;
    let mut gd = linear_moe(4, 1)?;
    gd.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(8))?;
    let start = em.log_likelihood(&xs, &ys)?;
    assert!((start - gd.log_likelihood(&xs, &ys)?).abs() < 1e-9 * start.abs());
    let g = gd.fit_gradient(
        &xs,
        &ys,
        &GradientConfig {
            steps: 300,
            learning_rate: 0.05,
        },
    )?;
    assert_eq!(g.log_likelihood.len(), 301);
    assert!((g.log_likelihood[0] - start).abs() < 1e-9 * start.abs());
    let gd_end = g.log_likelihood[300];
    assert!(
        gd_end > start + 100.0,
        "gradient training: {start} -> {gd_end}"
    );
    let r = em.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 100,
            tol: 1e-9,
            gate_steps: 5,
        },
    )?;
    let em_end = r.log_likelihood[r.log_likelihood.len() - 1];
    assert!(em_end >= gd_end - 1.0, "EM {em_end} vs gradient {gd_end}");
    // predictive variance of the mixture is positive and at least the smallest expert variance
    let v = em
        .predictive_variance(&xs)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(v.iter().all(|&x| x > 0.0));
    Ok(())
}

/// The MoE of AR experts beats a single AR expert with the same lag on held-out sunspots
/// (train 1700–1920, test 1921–1955, as in Weigend et al. 1995) — the example's default setting.
#[test]
fn sunspots_moe_beats_single_ar_expert() -> R {
    let sun = load_sunspots(data_dir().join("sunspots.csv"))?;
    let lags = 6;
    let train: Vec<f64> = sun.iter().filter(|r| r.0 <= 1920).map(|r| r.1).collect();
    let mean = train.iter().sum::<f64>() / train.len() as f64;
    let sd = (train.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / train.len() as f64).sqrt();
    let z: Vec<f64> = sun.iter().map(|r| (r.1 - mean) / sd).collect();
    let (xs, ys) = lagged(&z, lags)?;
    let years: Vec<i32> = sun[lags..].iter().map(|r| r.0).collect();
    let n_train = years.iter().filter(|&&y| y <= 1920).count();
    let test: Vec<usize> = (0..years.len())
        .filter(|&i| years[i] >= 1921 && years[i] <= 1955)
        .collect();
    assert_eq!(test.len(), 35);
    let (xtr, ytr) = (xs.i(0..n_train)?, ys.i(0..n_train)?);
    let (xte, yte) = (
        xs.i(test[0]..test[test.len() - 1] + 1)?,
        ys.i(test[0]..test[test.len() - 1] + 1)?,
    );
    let mse = |p: &Tensor| -> candle_core::Result<f64> {
        ((p - &yte)?.sqr()?.mean_all()?.to_scalar::<f64>()).map(|v| v * sd * sd)
    };
    let mut single = LinearGaussianExpert::new(lags, 1, &Device::Cpu)?;
    single.m_step(
        &xtr,
        &ytr,
        &Tensor::ones(n_train, DType::F64, &Device::Cpu)?,
    )?;
    let mse_single = mse(&single.predict(&xte)?)?;
    // the example's procedure: 5 restarts, keep the best training likelihood
    let mut best: Option<(f64, MixtureOfExperts<LinearGaussianExpert>)> = None;
    for r in 0..5u64 {
        let experts = (0..2)
            .map(|_| Ok(LinearGaussianExpert::new(lags, 1, &Device::Cpu)?.with_min_variance(1e-4)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut moe = MixtureOfExperts::new(SoftmaxGate::new(lags, 2, &Device::Cpu)?, experts)?;
        moe.init_random(&xtr, &ytr, 2.0, &mut StdRng::seed_from_u64(r))?;
        let rep = moe.fit_em(
            &xtr,
            &ytr,
            &EmConfig {
                max_iters: 200,
                tol: 1e-8,
                gate_steps: 5,
            },
        )?;
        assert_monotone(&rep, "sunspots restart");
        let ll = rep.log_likelihood[rep.log_likelihood.len() - 1];
        if best.as_ref().is_none_or(|b| ll > b.0) {
            best = Some((ll, moe));
        }
    }
    let Some((_, moe)) = best else {
        panic!("no restart")
    };
    let mse_moe = mse(&moe.predict(&xte)?)?;
    assert!(
        mse_moe < 0.85 * mse_single,
        "MoE MSE {mse_moe:.1} should beat the single AR({lags}) MSE {mse_single:.1}"
    );
    Ok(())
}

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
