//! The shipped time series (sunspots, Mauna Loa CO2): readers, EM on them, and the AR-expert MoE
//! against a single AR expert on held-out sunspots.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_moe::classic::series::{co2_monthly, lagged, load_co2_weekly, load_sunspots};
use candle_moe::classic::{EmConfig, Expert, LinearGaussianExpert, MixtureOfExperts, SoftmaxGate};
use common::classic::{assert_monotone, data_dir, linear_moe, R};
use rand::{rngs::StdRng, SeedableRng};

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
