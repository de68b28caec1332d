//! EM for the classic mixture of experts (Jordan & Jacobs 1994): the log-likelihood never
//! decreases, known generating parameters are recovered, and EM is at least as good as gradient
//! training of the same model.

mod common;

use candle_moe::classic::{
    EmConfig, Expert, GradientConfig, LinearGaussianExpert, MixtureOfExperts,
};
use common::classic::{assert_monotone, hme_data, linear_moe, normal, rows, R};
use rand::{rngs::StdRng, Rng, SeedableRng};

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
