//! EM vs gradient training of a classic mixture of experts, and a mixture density network, on
//! regression problems with regimes and with more than one answer per input.
//!
//! 1. **Piecewise-linear regression** (three linear regimes with different noise levels): the
//!    same mixture of three linear-Gaussian experts trained by EM (Jordan & Jacobs 1994) and by
//!    plain gradient descent (Adam on the negative log-likelihood, Jacobs et al. 1991), from the
//!    same initialisation, against a single linear model.
//! 2. **Bishop's inverse problem** (Bishop 1994 §4): `t ~ U(0, 1)`,
//!    `x = t + 0.3 sin(2πt) + U(−0.1, 0.1)`; predict `t` from `x` — for `x` near 0.5 there are
//!    three answers. A least-squares MLP predicts their average; a mixture of linear experts
//!    (EM or gradient) and an MDN (MLP + [`MdnHead`], Adam on the NLL) model the whole
//!    conditional density.
//!
//! Prints a summary table (held-out NLL per point, MSE of the mean, error of the most probable
//! branch, training time).
//!
//! ```sh
//! cargo run --release --example classic_regression
//! ```

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_moe::classic::{
    EmConfig, Expert, GradientConfig, LinearGaussianExpert, MdnHead, MixtureOfExperts, SoftmaxGate,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(
    about = "EM vs gradient training of a classic MoE, and an MDN, on multi-valued regression"
)]
struct Args {
    /// Training examples per problem (the test set has as many).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Experts of the mixture.
    #[arg(long, default_value_t = 3)]
    experts: usize,
    /// Maximum EM iterations.
    #[arg(long, default_value_t = 200)]
    em_iters: usize,
    /// Adam steps for gradient training of the mixture.
    #[arg(long, default_value_t = 2000)]
    grad_steps: usize,
    /// Adam learning rate for gradient training of the mixture.
    #[arg(long, default_value_t = 0.03)]
    grad_lr: f64,
    /// MDN: components.
    #[arg(long, default_value_t = 3)]
    mdn_components: usize,
    /// MDN and least-squares MLP: hidden tanh units.
    #[arg(long, default_value_t = 20)]
    hidden: usize,
    /// MDN and least-squares MLP: Adam steps.
    #[arg(long, default_value_t = 3000)]
    mdn_steps: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct Row {
    problem: &'static str,
    model: String,
    train: String,
    train_nll: f64,
    nll: f64,
    mse_mean: f64,
    branch_err: Option<f64>,
    secs: f64,
}

fn col(v: Vec<f64>, dev: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, (n, 1), dev)?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn mse(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len().max(1) as f64
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

type Moe = MixtureOfExperts<LinearGaussianExpert>;

/// Scores predictions of `t` on the inverse problem (see `branch err` in the table).
type BranchErr<'a> = dyn Fn(&[f64]) -> f64 + 'a;

fn new_moe(k: usize, xs: &Tensor, ys: &Tensor, seed: u64) -> Result<Moe> {
    let dev = xs.device();
    let experts = (0..k)
        .map(|_| Ok(LinearGaussianExpert::new(1, 1, dev)?.with_min_variance(1e-5)))
        .collect::<Result<Vec<_>>>()?;
    let mut moe = MixtureOfExperts::new(SoftmaxGate::new(1, k, dev)?, experts)?;
    moe.init_random(xs, ys, 3.0, &mut StdRng::seed_from_u64(seed))?;
    Ok(moe)
}

/// Mean of the most probable expert (by gate weight).
fn moe_branch(moe: &Moe, xs: &Tensor) -> Result<Vec<f64>> {
    let g = moe.gate_probs(xs)?.to_vec2::<f64>()?;
    let preds = moe
        .experts()
        .iter()
        .map(|e| to_vec(&e.predict(xs)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(g.iter()
        .enumerate()
        .map(|(i, row)| {
            let k = row
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (j, &v)| if v > b.1 { (j, v) } else { b },
                )
                .0;
            preds[k][i]
        })
        .collect())
}

/// EM and gradient training of the same mixture from the same start; a single linear model.
fn mixture_rows(
    problem: &'static str,
    args: &Args,
    (xtr, ytr): (&Tensor, &Tensor),
    (xte, yte): (&Tensor, &Tensor),
    branch_truth: Option<&BranchErr<'_>>,
) -> Result<Vec<Row>> {
    let n_te = xte.dim(0)? as f64;
    let n_tr = xtr.dim(0)? as f64;
    let truth = to_vec(yte)?;
    let mut rows = Vec::new();

    let t0 = Instant::now();
    let mut single = LinearGaussianExpert::new(1, 1, xtr.device())?;
    single.m_step(
        xtr,
        ytr,
        &Tensor::ones(xtr.dim(0)?, DType::F64, xtr.device())?,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let nll = -to_vec(&single.log_likelihood(xte, yte)?)?
        .iter()
        .sum::<f64>()
        / n_te;
    let train_nll = -to_vec(&single.log_likelihood(xtr, ytr)?)?
        .iter()
        .sum::<f64>()
        / n_tr;
    let mean = to_vec(&single.predict(xte)?)?;
    rows.push(Row {
        problem,
        model: "single linear-Gaussian".into(),
        train: "least squares".into(),
        train_nll,
        nll,
        mse_mean: mse(&mean, &truth),
        branch_err: branch_truth.map(|f| f(&mean)),
        secs,
    });

    let mut em = new_moe(args.experts, xtr, ytr, args.seed)?;
    let t0 = Instant::now();
    let rep = em.fit_em(
        xtr,
        ytr,
        &EmConfig {
            max_iters: args.em_iters,
            tol: 1e-9,
            gate_steps: 5,
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let monotone = rep
        .log_likelihood
        .windows(2)
        .all(|w| w[1] >= w[0] - 1e-9 * w[0].abs());
    let nll = -em.log_likelihood(xte, yte)? / n_te;
    let train_nll = -em.log_likelihood(xtr, ytr)? / n_tr;
    let mean = to_vec(&em.predict(xte)?)?;
    let branch = moe_branch(&em, xte)?;
    rows.push(Row {
        problem,
        model: format!("MoE, {} linear experts", args.experts),
        train: format!(
            "EM, {} it.{}",
            rep.iterations,
            if monotone {
                ", LL monotone"
            } else {
                ", LL NOT monotone"
            }
        ),
        train_nll,
        nll,
        mse_mean: mse(&mean, &truth),
        branch_err: branch_truth.map(|f| f(&branch)),
        secs,
    });

    let mut gd = new_moe(args.experts, xtr, ytr, args.seed)?;
    let t0 = Instant::now();
    let em_train_ll = -train_nll * n_tr;
    let grep = gd.fit_gradient(
        xtr,
        ytr,
        &GradientConfig {
            steps: args.grad_steps,
            learning_rate: args.grad_lr,
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let nll = -gd.log_likelihood(xte, yte)? / n_te;
    let train_nll = -gd.log_likelihood(xtr, ytr)? / n_tr;
    let mean = to_vec(&gd.predict(xte)?)?;
    let branch = moe_branch(&gd, xte)?;
    rows.push(Row {
        problem,
        model: format!("MoE, {} linear experts", args.experts),
        train: format!(
            "Adam, {} steps ({})",
            args.grad_steps,
            match grep
                .log_likelihood
                .iter()
                .position(|&l| l >= em_train_ll - 1e-3 * n_tr)
            {
                Some(s) => format!("within 1e-3 nats/example of EM's fit at step {s}"),
                None => "never within 1e-3 nats/example of EM's fit".to_string(),
            }
        ),
        train_nll,
        nll,
        mse_mean: mse(&mean, &truth),
        branch_err: branch_truth.map(|f| f(&branch)),
        secs,
    });
    Ok(rows)
}

/// A tanh MLP trunk `(n, 1) → (n, hidden)` in f32.
fn trunk(hidden: usize, vb: VarBuilder) -> Result<impl Module> {
    let l1 = candle_nn::linear(1, hidden, vb.pp("l1"))?;
    Ok(candle_nn::seq().add(l1).add_fn(|xs| xs.tanh()))
}

/// Re-initialises every variable from `rng` (candle cannot seed its CPU generator), with the
/// bounds of `candle_nn::linear`: `U(±1/√fan_in)` for `X.weight` `(out, in)` and `X.bias`.
fn seeded_init(vm: &VarMap, rng: &mut StdRng) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let fan_in = match name.strip_suffix(".bias") {
            Some(stem) => data
                .get(&format!("{stem}.weight"))
                .map_or(1, |w| w.dims().get(1).copied().unwrap_or(1)),
            None => var.dims().get(1).copied().unwrap_or(1),
        };
        let b = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-b..b) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn adam(vm: &VarMap, lr: f64) -> Result<AdamW> {
    Ok(AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut rows: Vec<Row> = Vec::new();

    // 1. piecewise-linear regression: three regimes of x with different slopes and noise
    let piecewise = |rng: &mut StdRng, n: usize| -> Result<(Tensor, Tensor)> {
        let mut xs = Vec::with_capacity(n);
        let mut ys = Vec::with_capacity(n);
        for _ in 0..n {
            let x: f64 = rng.random_range(-3.0..3.0);
            let y = if x < -1.0 {
                -1.0 - 1.5 * (x + 1.0) + 0.1 * normal(rng)
            } else if x < 1.0 {
                -1.0 + x + 0.3 * normal(rng)
            } else {
                0.0 + 0.05 * normal(rng) - 2.0 * (x - 1.0)
            };
            xs.push(x);
            ys.push(y);
        }
        Ok((col(xs, &dev)?, col(ys, &dev)?))
    };
    let (xtr, ytr) = piecewise(&mut rng, args.n)?;
    let (xte, yte) = piecewise(&mut rng, args.n)?;
    rows.extend(mixture_rows(
        "piecewise",
        &args,
        (&xtr, &ytr),
        (&xte, &yte),
        None,
    )?);

    // 2. Bishop's inverse sine problem: predict t from x = t + 0.3 sin(2πt) + U(-0.1, 0.1)
    let inverse = |rng: &mut StdRng, n: usize| -> Result<(Tensor, Tensor)> {
        let mut xs = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        for _ in 0..n {
            let t: f64 = rng.random();
            let x = t + 0.3 * (2.0 * std::f64::consts::PI * t).sin() + rng.random_range(-0.1..0.1);
            xs.push(x);
            ts.push(t);
        }
        Ok((col(xs, &dev)?, col(ts, &dev)?))
    };
    let (xtr, ttr) = inverse(&mut rng, args.n)?;
    let (xte, tte) = inverse(&mut rng, args.n)?;
    // branch error: |x(t̂) − x| — does the predicted t map back onto the observed input?
    let x_te = to_vec(&xte)?;
    let x_of_t = |t: f64| t + 0.3 * (2.0 * std::f64::consts::PI * t).sin();
    let branch_err = |pred: &[f64]| -> f64 {
        pred.iter()
            .zip(&x_te)
            .map(|(&t, &x)| (x_of_t(t) - x).abs())
            .sum::<f64>()
            / pred.len().max(1) as f64
    };
    rows.extend(mixture_rows(
        "inverse sine",
        &args,
        (&xtr, &ttr),
        (&xte, &tte),
        Some(&branch_err),
    )?);
    let truth = to_vec(&tte)?;
    let n_te = args.n as f64;
    let (xtr32, ttr32) = (xtr.to_dtype(DType::F32)?, ttr.to_dtype(DType::F32)?);
    let (xte32, tte32) = (xte.to_dtype(DType::F32)?, tte.to_dtype(DType::F32)?);

    // least-squares MLP (conditional mean), with a Gaussian of the training residual variance
    {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let net = trunk(args.hidden, vb.pp("trunk"))?;
        let out = candle_nn::linear(args.hidden, 1, vb.pp("out"))?;
        seeded_init(&vm, &mut rng)?;
        let mut opt = adam(&vm, 0.01)?;
        let t0 = Instant::now();
        for _ in 0..args.mdn_steps {
            let pred = out.forward(&net.forward(&xtr32)?)?;
            let loss = (pred - &ttr32)?.sqr()?.mean_all()?;
            opt.backward_step(&loss)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let var = to_vec(
            &(out.forward(&net.forward(&xtr32)?)? - &ttr32)?
                .sqr()?
                .mean_all()?,
        )?[0];
        let train_nll = 0.5 * (2.0 * std::f64::consts::PI * var).ln() + 0.5;
        let pred = to_vec(&out.forward(&net.forward(&xte32)?)?)?;
        let nll = truth
            .iter()
            .zip(&pred)
            .map(|(t, p)| {
                0.5 * (2.0 * std::f64::consts::PI * var).ln() + 0.5 * (t - p).powi(2) / var
            })
            .sum::<f64>()
            / n_te;
        rows.push(Row {
            problem: "inverse sine",
            model: format!("MLP 1-{}-1, least squares", args.hidden),
            train: format!("Adam, {} steps", args.mdn_steps),
            train_nll,
            nll,
            mse_mean: mse(&pred, &truth),
            branch_err: Some(branch_err(&pred)),
            secs,
        });
    }

    // mixture density network
    let mdn_vm = VarMap::new();
    let mdn_vb = VarBuilder::from_varmap(&mdn_vm, DType::F32, &dev);
    let mdn_net = trunk(args.hidden, mdn_vb.pp("trunk"))?;
    let head = MdnHead::new(args.hidden, args.mdn_components, 1, mdn_vb.pp("mdn"))?;
    seeded_init(&mdn_vm, &mut rng)?;
    let (mdn_train_nll, mdn_nll, mdn_mean, mdn_mode, sample_err, secs) = {
        let (vm, net) = (&mdn_vm, &mdn_net);
        let mut opt = adam(vm, 0.01)?;
        let t0 = Instant::now();
        for _ in 0..args.mdn_steps {
            let out = head.forward(&net.forward(&xtr32)?)?;
            let loss = head.nll(&out, &ttr32)?;
            opt.backward_step(&loss)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let train_nll = to_vec(&head.nll(&head.forward(&net.forward(&xtr32)?)?, &ttr32)?)?[0];
        let out = head.forward(&net.forward(&xte32)?)?;
        let nll = to_vec(&head.nll(&out, &tte32)?)?[0];
        let mean = to_vec(&out.mean()?)?;
        let mode = to_vec(&out.mode_mean()?)?;
        let samples = to_vec(&head.sample(&out, &mut rng)?)?;
        (train_nll, nll, mean, mode, branch_err(&samples), secs)
    };
    rows.push(Row {
        problem: "inverse sine",
        model: format!(
            "MDN 1-{}-({}×Gauss), mean",
            args.hidden, args.mdn_components
        ),
        train: format!("Adam, {} steps", args.mdn_steps),
        train_nll: mdn_train_nll,
        nll: mdn_nll,
        mse_mean: mse(&mdn_mean, &truth),
        branch_err: Some(branch_err(&mdn_mean)),
        secs,
    });
    rows.push(Row {
        problem: "inverse sine",
        model: "  same MDN, most probable component".into(),
        train: "".into(),
        train_nll: mdn_train_nll,
        nll: mdn_nll,
        mse_mean: mse(&mdn_mode, &truth),
        branch_err: Some(branch_err(&mdn_mode)),
        secs,
    });

    println!("Held-out results ({} train / {} test examples per problem; NLL per example, lower is better).", args.n, args.n);
    println!("`branch err` (inverse sine): mean |x(t̂) − x| with x(t) = t + 0.3 sin(2πt): how far the predicted t̂ lies from a branch of the inverse (0 = on a branch; averaging branches scores high).");
    println!();
    println!("| problem | model | training | train NLL | test NLL | test MSE of mean | branch err | time (s) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | {} | {:.2} |",
            r.problem,
            r.model,
            r.train,
            r.train_nll,
            r.nll,
            r.mse_mean,
            r.branch_err.map_or("–".to_string(), |v| format!("{v:.4}")),
            r.secs
        );
    }
    println!();
    println!("MDN samples: branch err {sample_err:.4} (a sample is drawn with its component's spread, so about the noise level U(−0.1, 0.1) → 0.05 is expected).");
    let probe = Tensor::from_vec(vec![0.5f32], (1, 1), &dev)?;
    let out = head.forward(&mdn_net.forward(&probe)?)?;
    let pi = to_vec(&out.pi()?)?;
    let mu = to_vec(&out.mu)?;
    let sigma = to_vec(&out.log_sigma.exp()?)?;
    let comps: Vec<String> = (0..pi.len())
        .map(|k| format!("π={:.2} μ={:.3} σ={:.3}", pi[k], mu[k], sigma[k]))
        .collect();
    println!("MDN at x = 0.5 (three true answers): {}", comps.join("; "));
    Ok(())
}
