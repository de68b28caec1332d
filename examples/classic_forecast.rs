//! Forecasting with a classic mixture of autoregressive experts (Jordan & Jacobs 1994 EM;
//! gated experts for time series as in Weigend, Mangeas & Srivastava 1995).
//!
//! Two public-domain series from `data/timeseries/` (see its SOURCES.md):
//! - **Yearly sunspots** 1700–2008: one-step-ahead forecasts from the last `--lags` years; train
//!   on targets 1700–1920, test on 1921–1955 (Weigend's first test set) and 1956–1979 (his
//!   second). Linear-Gaussian AR experts under a softmax gate on the same lags vs one AR model.
//! - **Mauna Loa CO2** 1958–2001: weekly values averaged per month (months without any reading
//!   are interpolated); the experts forecast the monthly change from the last `--co2-lags`
//!   changes (trend + seasonality), train to 1990, test 1991–2001.
//!
//! Prints held-out MSE of the MoE and of a single AR expert with the same lag, which expert the
//! gate picks in which regime, and writes `sunspots.png` and `co2.png` (forecast vs truth and
//! gate weights over time) into `--out`.
//!
//! ```sh
//! cargo run --release --example classic_forecast
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{IndexOp, Tensor};
use candle_moe::classic::series::{co2_monthly, lagged, load_co2_weekly, load_sunspots};
use candle_moe::classic::{
    fit_em_restarts, EmConfig, Expert, LinearGaussianExpert, MixtureOfExperts, SoftmaxGate,
};
use clap::Parser;
use plotters::prelude::*;
use rand::rngs::StdRng;

#[derive(Parser, Debug)]
#[command(about = "Mixture of autoregressive experts on yearly sunspots and Mauna Loa CO2")]
struct Args {
    /// Folder with sunspots.csv and co2.csv.
    #[arg(long, default_value = "data/timeseries")]
    data_dir: PathBuf,
    /// Output folder for the plots.
    #[arg(long, default_value = "runs/classic_forecast")]
    out: PathBuf,
    /// Sunspots: autoregressive order (lags) of every expert and of the gate's input.
    #[arg(long, default_value_t = 6)]
    lags: usize,
    /// Sunspots: number of experts.
    #[arg(long, default_value_t = 2)]
    experts: usize,
    /// CO2: autoregressive order on the monthly changes.
    #[arg(long, default_value_t = 12)]
    co2_lags: usize,
    /// CO2: number of experts.
    #[arg(long, default_value_t = 2)]
    co2_experts: usize,
    /// EM restarts from random gates (the best training log-likelihood is kept).
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// Maximum EM iterations per restart.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Scale of the random initial gate logits.
    #[arg(long, default_value_t = 2.0)]
    gate_scale: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

type Moe = MixtureOfExperts<LinearGaussianExpert>;

/// EM from `restarts` random gates; keeps the model with the best training log-likelihood.
fn fit_moe(xs: &Tensor, ys: &Tensor, k: usize, args: &Args, seed: u64) -> Result<(Moe, Vec<f64>)> {
    let dev = xs.device().clone();
    let d = xs.dim(1)?;
    let cfg = EmConfig {
        max_iters: args.iters,
        tol: 1e-8,
        gate_steps: 5,
    };
    let start = |rng: &mut StdRng| {
        let experts = (0..k)
            .map(|_| Ok(LinearGaussianExpert::new(d, 1, &dev)?.with_min_variance(1e-4)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut moe = MixtureOfExperts::new(SoftmaxGate::new(d, k, &dev)?, experts)?;
        moe.init_random(xs, ys, args.gate_scale, rng)?;
        Ok(moe)
    };
    let seeds = (0..args.restarts.max(1)).map(|r| seed.wrapping_mul(1000).wrapping_add(r as u64));
    let fit = fit_em_restarts(seeds, start, xs, ys, &cfg)?;
    let trace = fit.report().log_likelihood.clone();
    anyhow::ensure!(!trace.is_empty(), "empty EM trace");
    Ok((fit.model, trace))
}

fn fit_single(xs: &Tensor, ys: &Tensor) -> Result<LinearGaussianExpert> {
    let mut e = LinearGaussianExpert::new(xs.dim(1)?, 1, xs.device())?;
    let w = Tensor::ones(xs.dim(0)?, candle_core::DType::F64, xs.device())?;
    e.m_step(xs, ys, &w)?;
    Ok(e)
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

fn mse(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len().max(1) as f64
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    sunspots(&args)?;
    co2(&args)?;
    Ok(())
}

fn sunspots(args: &Args) -> Result<()> {
    let path = args.data_dir.join("sunspots.csv");
    let rows = load_sunspots(&path).with_context(|| format!("reading {}", path.display()))?;
    let years: Vec<i32> = rows.iter().map(|r| r.0).collect();
    let values: Vec<f64> = rows.iter().map(|r| r.1).collect();
    let lags = args.lags;
    // standardise with the training years' statistics
    let train_vals: Vec<f64> = rows.iter().filter(|r| r.0 <= 1920).map(|r| r.1).collect();
    let mean = train_vals.iter().sum::<f64>() / train_vals.len() as f64;
    let var = train_vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / train_vals.len() as f64;
    let sd = var.sqrt();
    let z: Vec<f64> = values.iter().map(|v| (v - mean) / sd).collect();
    let (xs, ys) = lagged(&z, lags)?;
    let target_year: Vec<i32> = years[lags..].to_vec();
    let idx = |lo: i32, hi: i32| -> Vec<usize> {
        (0..target_year.len())
            .filter(|&i| target_year[i] >= lo && target_year[i] <= hi)
            .collect()
    };
    let select = |ix: &[usize]| -> Result<(Tensor, Tensor)> {
        let t = Tensor::from_vec(
            ix.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            ix.len(),
            xs.device(),
        )?;
        Ok((xs.index_select(&t, 0)?, ys.index_select(&t, 0)?))
    };
    let train = idx(1700, 1920);
    let (xtr, ytr) = select(&train)?;
    let (moe, trace) = fit_moe(&xtr, &ytr, args.experts, args, args.seed)?;
    let single = fit_single(&xtr, &ytr)?;

    let pred_moe: Vec<f64> = to_vec(&moe.predict(&xs)?)?
        .iter()
        .map(|v| v * sd + mean)
        .collect();
    let pred_one: Vec<f64> = to_vec(&single.predict(&xs)?)?
        .iter()
        .map(|v| v * sd + mean)
        .collect();
    let truth: Vec<f64> = values[lags..].to_vec();
    let gate = moe.gate_probs(&xs)?.to_vec2::<f64>()?;

    println!(
        "== Yearly sunspots: {} experts, AR({lags}) each, gate on the same {lags} lags ==",
        args.experts
    );
    println!(
        "train 1700–1920 (targets {}–1920, n = {}), EM {} iterations, train log-likelihood {:.2} → {:.2} (monotone: {})",
        target_year[train[0]],
        train.len(),
        trace.len() - 1,
        trace[0],
        trace[trace.len() - 1],
        trace.windows(2).all(|w| w[1] >= w[0] - 1e-9 * w[0].abs())
    );
    println!("variance of the training series: {var:.1}; NMSE = MSE / that variance");
    println!("| split | n | MSE single AR({lags}) | MSE MoE | NMSE single | NMSE MoE |");
    println!("|---|---|---|---|---|---|");
    for (name, lo, hi) in [
        ("train 1700–1920", 1700, 1920),
        ("test 1921–1955", 1921, 1955),
        ("test 1956–1979", 1956, 1979),
    ] {
        let ix = idx(lo, hi);
        let t: Vec<f64> = ix.iter().map(|&i| truth[i]).collect();
        let a: Vec<f64> = ix.iter().map(|&i| pred_one[i]).collect();
        let b: Vec<f64> = ix.iter().map(|&i| pred_moe[i]).collect();
        let (ma, mb) = (mse(&a, &t), mse(&b, &t));
        println!(
            "| {name} | {} | {ma:.1} | {mb:.1} | {:.4} | {:.4} |",
            ix.len(),
            ma / var,
            mb / var
        );
    }
    // which expert the gate picks, by regime (rising / falling phase, high / low activity)
    println!("which expert the gate picks (argmax of g(x)), 1700–1979, by regime:");
    println!("| expert | years picked | mean sunspots | share in rising years | σ (sunspots) |");
    println!("|---|---|---|---|---|");
    let all = idx(1700, 1979);
    for k in 0..args.experts {
        let picked: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| argmax(&gate[i]) == k)
            .collect();
        let m = picked.iter().map(|&i| truth[i]).sum::<f64>() / picked.len().max(1) as f64;
        let rising = picked
            .iter()
            .filter(|&&i| i > 0 && truth[i] > truth[i - 1])
            .count();
        let sigma = to_vec(&moe.experts()[k].variance()?)?[0].sqrt() * sd;
        println!(
            "| {k} | {} | {m:.1} | {:.2} | {sigma:.1} |",
            picked.len(),
            rising as f64 / picked.len().max(1) as f64
        );
    }
    let t_years: Vec<f64> = target_year.iter().map(|&y| y as f64).collect();
    let shown = idx(1860, 1979);
    let (a, b) = (shown[0], shown[shown.len() - 1] + 1);
    let path = args.out.join("sunspots.png");
    report_plot(
        &path,
        draw(
            &path,
            "Yearly sunspots 1860–1979: one-step forecasts (train ≤ 1920, test 1921–1979)",
            &t_years[a..b],
            &truth[a..b],
            &[
                ("MoE", &pred_moe[a..b]),
                (&format!("single AR({lags})"), &pred_one[a..b]),
            ],
            &gate[a..b],
            Some(1920.5),
        ),
    );
    Ok(())
}

fn co2(args: &Args) -> Result<()> {
    let path = args.data_dir.join("co2.csv");
    let weekly = load_co2_weekly(&path).with_context(|| format!("reading {}", path.display()))?;
    let missing = weekly.iter().filter(|w| w.1.is_none()).count();
    let monthly = co2_monthly(&weekly)?;
    let interpolated = monthly.iter().filter(|m| m.observed_weeks == 0).count();
    let level: Vec<f64> = monthly.iter().map(|m| m.value).collect();
    let diff: Vec<f64> = level.windows(2).map(|w| w[1] - w[0]).collect();
    let lags = args.co2_lags;
    // diff[i] is the change into month i + 1; row j of the lag matrix predicts diff[j + lags],
    // i.e. the level of month j + lags + 1.
    let n_train_months = monthly.iter().filter(|m| m.year <= 1990).count();
    let n_train_rows = n_train_months - 1 - lags;
    let tr_sd = {
        let d = &diff[..n_train_months - 1];
        let m = d.iter().sum::<f64>() / d.len() as f64;
        (d.iter().map(|v| (v - m).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
    };
    let zd: Vec<f64> = diff.iter().map(|v| v / tr_sd).collect();
    let (xs, ys) = lagged(&zd, lags)?;
    let xtr = xs.i(0..n_train_rows)?;
    let ytr = ys.i(0..n_train_rows)?;
    let (moe, trace) = fit_moe(&xtr, &ytr, args.co2_experts, args, args.seed + 17)?;
    let single = fit_single(&xtr, &ytr)?;
    let rows = xs.dim(0)?;
    let month_of_row = |j: usize| j + lags + 1;
    let dm = to_vec(&moe.predict(&xs)?)?;
    let d1 = to_vec(&single.predict(&xs)?)?;
    let pred_moe: Vec<f64> = (0..rows)
        .map(|j| level[month_of_row(j) - 1] + dm[j] * tr_sd)
        .collect();
    let pred_one: Vec<f64> = (0..rows)
        .map(|j| level[month_of_row(j) - 1] + d1[j] * tr_sd)
        .collect();
    let truth: Vec<f64> = (0..rows).map(|j| level[month_of_row(j)]).collect();
    let gate = moe.gate_probs(&xs)?.to_vec2::<f64>()?;
    println!();
    println!(
        "== Mauna Loa CO2: {} weekly rows ({missing} missing) → {} months ({interpolated} interpolated) ==",
        weekly.len(),
        monthly.len()
    );
    println!(
        "{} experts, AR({lags}) on monthly changes, train to 1990 (n = {n_train_rows}), test 1991–2001 (n = {}); EM {} iterations, train log-likelihood {:.2} → {:.2}",
        args.co2_experts,
        rows - n_train_rows,
        trace.len() - 1,
        trace[0],
        trace[trace.len() - 1]
    );
    let (tr, te) = (0..n_train_rows, n_train_rows..rows);
    let m = |p: &[f64], r: std::ops::Range<usize>| mse(&p[r.clone()], &truth[r]);
    println!("| split | MSE single AR({lags}) (ppmv²) | MSE MoE (ppmv²) |");
    println!("|---|---|---|");
    println!(
        "| train 1959–1990 | {:.4} | {:.4} |",
        m(&pred_one, tr.clone()),
        m(&pred_moe, tr)
    );
    println!(
        "| test 1991–2001 | {:.4} | {:.4} |",
        m(&pred_one, te.clone()),
        m(&pred_moe, te.clone())
    );
    println!("which expert the gate picks, test months, by calendar month:");
    let mut line = String::from("| expert |");
    for mo in 1..=12 {
        line.push_str(&format!(" {mo} |"));
    }
    println!("{line}");
    println!("|---|{}", "---|".repeat(12));
    for k in 0..args.co2_experts {
        let mut cells = format!("| {k} |");
        for mo in 1..=12u32 {
            let ix: Vec<usize> = te
                .clone()
                .filter(|&j| monthly[month_of_row(j)].month == mo)
                .collect();
            let share = ix.iter().filter(|&&j| argmax(&gate[j]) == k).count() as f64
                / ix.len().max(1) as f64;
            cells.push_str(&format!(" {share:.2} |"));
        }
        println!("{cells}");
    }
    let times: Vec<f64> = (0..rows).map(|j| monthly[month_of_row(j)].time()).collect();
    let from = n_train_rows.saturating_sub(48);
    let path = args.out.join("co2.png");
    report_plot(
        &path,
        draw(
            &path,
            "Mauna Loa CO2 (monthly): one-step forecasts, train ≤ 1990, test 1991–2001",
            &times[from..],
            &truth[from..],
            &[
                ("MoE", &pred_moe[from..]),
                (&format!("single AR({lags})"), &pred_one[from..]),
            ],
            &gate[from..],
            Some(1991.0),
        ),
    );
    Ok(())
}

const GATE_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// Reports a plot drawn with [`draw`]: a failure to draw (e.g. no fonts) is a warning, not
/// fatal.
fn report_plot(path: &Path, drawn: std::result::Result<(), Box<dyn std::error::Error>>) {
    match drawn {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("warning: could not draw {}: {e}", path.display()),
    }
}

/// Forecast vs truth on top, gate weights below.
fn draw(
    path: &Path,
    title: &str,
    t: &[f64],
    truth: &[f64],
    preds: &[(&str, &[f64])],
    gate: &[Vec<f64>],
    split: Option<f64>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(500);
    let (x0, x1) = (t[0], t[t.len() - 1]);
    let all = truth.iter().chain(preds.iter().flat_map(|p| p.1.iter()));
    let (y0, y1) = all.fold((f64::MAX, f64::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    let pad = (y1 - y0) * 0.05;
    let mut chart = ChartBuilder::on(&top)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("value")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            t.iter().copied().zip(truth.iter().copied()),
            BLACK.stroke_width(2),
        ))?
        .label("truth")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    for (i, (name, p)) in preds.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                t.iter().copied().zip(p.iter().copied()),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    if let Some(s) = split {
        chart.draw_series(LineSeries::new(
            vec![(s, y0 - pad), (s, y1 + pad)],
            RED.mix(0.6),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    let mut gchart = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..1.0)?;
    gchart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("year")
        .y_desc("gate weight")
        .draw()?;
    let k = gate.first().map_or(0, |r| r.len());
    for e in 0..k {
        let color = GATE_COLORS[e % GATE_COLORS.len()].to_rgba();
        gchart
            .draw_series(LineSeries::new(
                t.iter().copied().zip(gate.iter().map(|r| r[e])),
                color.stroke_width(2),
            ))?
            .label(format!("g_{e}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    gchart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
