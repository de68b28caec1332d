//! Routing throughput: the sparse layer against a dense SwiGLU FFN doing the same active FLOPs
//! (three matmuls on (k·T) × d) and against the naive per-expert loop of candle-transformers'
//! Mixtral block, measured side by side in one process. Medians of repeated runs after warm-up.
//!
//! `cargo run --release --example route_bench -- --experts 8 --top-k 2 --hidden 512 --ffn 1024 --tokens 512`
//!
//! `--scoring sigmoid`, `--balance aux-free` (selection bias) and `--group 4,2` (group-limited
//! selection) configure the measured layer and add a column with its time over the plain
//! softmax top-k layer's on the same weights, timed alternately (with `--backward`, also the
//! training step with the balance losses of `--balance`).
//!
//! `--expert-parallel` (cargo feature `mpi`) runs the expert-parallel layer under `mpirun`
//! instead: per-rank and global tokens/s, the share of the layer's time in the all-to-alls and
//! all-reduces, the single-process layer on the union of the tokens, and the cost model's
//! prediction (`examples/route_bench_ep/mod.rs`, `docs/expert_parallel.md`):
//!
//! `mpirun --allow-run-as-root -np 2 -x RAYON_NUM_THREADS=1 target/release/examples/route_bench --expert-parallel --tokens 128,512,2048`

#[path = "common/mod.rs"]
mod common;
#[cfg(feature = "mpi")]
#[path = "route_bench_ep/mod.rs"]
mod ep;

use std::alloc::{GlobalAlloc, Layout};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_moe::moe::experts::Expert;
use candle_moe::{ExpertKind, MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{main_wrapper, plot_panels_x, print_table, Series};

/// mimalloc (the system allocator with `--features system-alloc`) with a byte counter, to
/// measure the peak memory of one forward.
struct Counting;

#[cfg(not(feature = "system-alloc"))]
use mimalloc::MiMalloc as Inner;
#[cfg(feature = "system-alloc")]
use std::alloc::System as Inner;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwards to the inner allocator with the caller's layout.
        let p = unsafe { Inner.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { Inner.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwards to the inner allocator; `p` came from it with layout `l`.
        let q = unsafe { Inner.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            let now = CURRENT.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Extra bytes allocated at the peak of `f` (above what was live before it).
fn peak_bytes(f: impl FnOnce() -> Result<()>) -> Result<usize> {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f()?;
    Ok(PEAK.load(Ordering::Relaxed) - base)
}

#[derive(Parser, Debug)]
struct Args {
    /// Experts per layer; a comma-separated list sweeps them.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    experts: Vec<usize>,
    /// Experts per token; a comma-separated list sweeps them.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    top_k: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    #[arg(long, default_value_t = 1024)]
    ffn: usize,
    /// Comma-separated token counts to sweep.
    #[arg(long, default_value = "512")]
    tokens: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed repetitions per measurement.
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Also time forward + backward.
    #[arg(long)]
    backward: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Also compare a 1-layer Mixtral-shaped `CausalLm` prefill with candle-transformers'
    /// `mixtral::Model` on the same weights.
    #[arg(long)]
    model: bool,
    /// PNG plot of tokens/s against the swept tokens, experts or top-k.
    #[arg(long, default_value = "runs/route_bench.png")]
    plot: PathBuf,
    /// Router scoring of the measured layer: softmax or sigmoid.
    #[arg(long, default_value = "softmax")]
    scoring: String,
    /// Load balancing of the measured layer (comma-separated): aux-loss, aux-free (selection
    /// bias), global-batch, sequence (sets the sequence-wise loss coefficient 1e-4). With
    /// --backward the training step adds the layer's load-balancing loss under aux-loss or
    /// global-batch.
    #[arg(long, default_value = "aux-loss")]
    balance: String,
    /// Group-limited selection `N,TG`: N expert groups, tokens choose from the TG best.
    #[arg(long)]
    group: Option<String>,
    /// Expert parallelism under `mpirun -np W` (needs the cargo feature `mpi`): `--tokens` per
    /// rank, forward (with `--backward`, forward + backward); rank 0 prints the tables. Uses
    /// `--experts`, `--top-k`, `--hidden`, `--ffn`, `--tokens`, `--reps`, `--backward`; always
    /// CPU, f32 and the plain softmax top-k router.
    #[arg(long)]
    expert_parallel: bool,
}

impl Args {
    /// The measured layer's routing on top of `cfg`; whether it differs from the plain softmax
    /// top-k layer; the load-balancing loss coefficient of the training step.
    fn routing(&self, cfg: &mut MoeConfig) -> Result<(bool, f64)> {
        let list = common::Balance::parse_list(&self.balance).map_err(anyhow::Error::msg)?;
        cfg.scoring = match self.scoring.as_str() {
            "softmax" => candle_moe::RouterScoring::Softmax,
            "sigmoid" => candle_moe::RouterScoring::Sigmoid,
            s => anyhow::bail!("--scoring: unknown scoring `{s}` (expected softmax or sigmoid)"),
        };
        cfg.selection_bias = list.contains(&common::Balance::AuxFree);
        if list.contains(&common::Balance::Sequence) {
            cfg.seq_aux_loss_coef = 1e-4;
        }
        if let Some(g) = &self.group {
            let v: Vec<usize> = g
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--group `{g}`: {e} (expected N,TG)"))?;
            let [n, tg] = v[..] else {
                anyhow::bail!("--group `{g}`: expected two numbers N,TG")
            };
            (cfg.n_group, cfg.topk_group) = (n, tg);
        }
        cfg.validate()?;
        let aux = list.contains(&common::Balance::AuxLoss)
            || list.contains(&common::Balance::GlobalBatch);
        let plain = MoeConfig {
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            ..Default::default()
        };
        let differs = cfg.scoring != plain.scoring
            || cfg.selection_bias
            || cfg.n_group > 1
            || cfg.seq_aux_loss_coef != 0.0
            || !aux;
        Ok((differs, if aux { 0.01 } else { 0.0 }))
    }
}

/// One measured point: experts, top-k, tokens, MoE tokens/s, dense tokens/s.
type Point = (usize, usize, usize, f64, f64);

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Median, minimum and maximum of a set of timings.
type Stats = (f64, f64, f64);

fn median(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn time(reps: usize, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..2 {
        f()?;
    }
    sync(dev)?;
    let mut ts = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        sync(dev)?;
        ts.push(t.elapsed().as_secs_f64());
    }
    Ok(median(ts))
}

/// Times `f` and `g` alternately (f, g, f, g, ...) so that slow drifts of a shared machine hit
/// both alike; returns the medians and spreads of each and the median of the per-round ratios
/// `f / g`.
fn time_pair(
    reps: usize,
    dev: &Device,
    mut f: impl FnMut() -> Result<()>,
    mut g: impl FnMut() -> Result<()>,
) -> Result<(Stats, Stats, f64)> {
    for _ in 0..2 {
        f()?;
        g()?;
    }
    sync(dev)?;
    let (mut tf, mut tg, mut ratios) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        sync(dev)?;
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        g()?;
        sync(dev)?;
        let b = t.elapsed().as_secs_f64();
        tf.push(a);
        tg.push(b);
        ratios.push(a / b);
    }
    Ok((median(tf), median(tg), median(ratios).0))
}

/// candle-transformers' Mixtral `SparseMoeBlock` algorithm: routing on the host, one gather,
/// expert and `index_add` per expert.
fn naive(moe: &SparseMoe, xs: &Tensor, top_k: usize) -> Result<Tensor> {
    let w = moe.router().gate_weight();
    let logits = xs.matmul(&w.t()?)?;
    let rw = candle_nn::ops::softmax_last_dim(&logits)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let e = moe.experts().experts().len();
    let mut top_x = vec![vec![]; e];
    let mut sel = vec![vec![]; e];
    for (r, p) in rw.iter().enumerate() {
        let mut d: Vec<usize> = (0..p.len()).collect();
        d.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
        let s: f32 = d.iter().take(top_k).map(|&i| p[i]).sum();
        for &i in d.iter().take(top_k) {
            top_x[i].push(r as u32);
            sel[i].push(p[i] / s);
        }
    }
    let mut ys = xs.zeros_like()?;
    for (i, ex) in moe.experts().experts().iter().enumerate() {
        if top_x[i].is_empty() {
            continue;
        }
        let idx = Tensor::new(top_x[i].as_slice(), xs.device())?;
        let rws = Tensor::new(sel[i].as_slice(), xs.device())?
            .to_dtype(xs.dtype())?
            .reshape(((), 1))?;
        let h = ex
            .forward(&xs.index_select(&idx, 0)?)?
            .broadcast_mul(&rws)?;
        ys = ys.index_add(&idx, &h, 0)?;
    }
    Ok(ys)
}

fn main() {
    main_wrapper(run)
}

fn run() -> Result<()> {
    let a = Args::parse();
    if a.expert_parallel {
        #[cfg(feature = "mpi")]
        return ep::run(&a);
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!("--expert-parallel needs the cargo feature `mpi`: build with `cargo build --release --features mpi --example route_bench` and run it under `mpirun -np 2`");
    }
    let dev = common::device(&a.device)?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => anyhow::bail!("unknown dtype {d}"),
    };
    let mut points: Vec<Point> = vec![];
    for &e in &a.experts {
        for &k in &a.top_k {
            bench_shape(&a, e, k, &dev, dtype, &mut points)?;
        }
    }
    plot(&a, &points)?;
    if a.model {
        whole_model(&a, &dev)?;
    }
    Ok(())
}

/// Draws tokens/s of the layer and of the dense FFN against whichever of tokens, experts and
/// top-k was swept (tokens when several are given).
fn plot(a: &Args, points: &[Point]) -> Result<()> {
    let distinct = |f: &dyn Fn(&Point) -> usize| {
        let mut v: Vec<usize> = points.iter().map(f).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    let (xname, x): (&str, fn(&Point) -> usize) = if distinct(&|p| p.2) > 1 {
        ("tokens", |p| p.2)
    } else if distinct(&|p| p.0) > 1 {
        ("experts", |p| p.0)
    } else {
        ("top-k", |p| p.1)
    };
    let mut series: Vec<Series> = vec![];
    let push = |series: &mut Vec<Series>, name: String, pt: (f64, f64)| match series
        .iter_mut()
        .find(|s| s.name == name)
    {
        Some(s) if !s.points.iter().any(|q| q.0 == pt.0) => s.points.push(pt),
        Some(_) => {}
        None => series.push(Series {
            name,
            points: vec![pt],
        }),
    };
    for p in points {
        let xv = x(p) as f64;
        let tag = match xname {
            "tokens" => format!("E={} k={}", p.0, p.1),
            "experts" => format!("k={} T={}", p.1, p.2),
            _ => format!("E={} T={}", p.0, p.2),
        };
        push(&mut series, format!("MoE {tag}"), (xv, p.3));
        // The dense FFN depends on k and T only: one line per k (first measurement per x).
        let dense_tag = match xname {
            "top-k" => format!("T={}", p.2),
            "experts" => format!("k={} T={}", p.1, p.2),
            _ => format!("k={}", p.1),
        };
        push(
            &mut series,
            format!("dense, same active FLOPs ({dense_tag})"),
            (xv, p.4),
        );
    }
    if let Some(dir) = a.plot.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    plot_panels_x(
        &a.plot,
        &format!(
            "route_bench: d={} f={} {} {}",
            a.hidden, a.ffn, a.dtype, a.device
        ),
        xname,
        &[(
            format!("tokens/s against {xname}").as_str(),
            "tokens/s",
            series,
        )],
    )?;
    println!("wrote {}", a.plot.display());
    Ok(())
}

fn bench_shape(
    a: &Args,
    experts: usize,
    top_k: usize,
    dev: &Device,
    dtype: DType,
    points: &mut Vec<Point>,
) -> Result<()> {
    let dev = dev.clone();
    let plain = MoeConfig {
        hidden_size: a.hidden,
        intermediate_size: a.ffn,
        num_experts: experts,
        top_k,
        ..Default::default()
    };
    let mut cfg = plain.clone();
    let (variant, lb_coef) = a.routing(&mut cfg)?;
    // Inference weights (not variables), as a loaded checkpoint has them.
    let vm = VarMap::new();
    let _ = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    candle_moe::train::init::reseed_varmap(&vm, 0)?;
    let ts: std::collections::HashMap<String, Tensor> =
        candle_moe::io::safetensors::varmap_tensors(&vm)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(dtype)?.to_device(&dev)?.detach())))
            .collect::<Result<_>>()?;
    let moe = SparseMoe::new(&cfg, VarBuilder::from_tensors(ts.clone(), dtype, &dev))?;
    // The plain softmax top-k layer on the same weights (the selection bias unused).
    let base = SparseMoe::new(&plain, VarBuilder::from_tensors(ts, dtype, &dev))?;
    let dvm = VarMap::new();
    let _ = Expert::new(
        a.hidden,
        a.ffn,
        ExpertKind::Swiglu,
        VarBuilder::from_varmap(&dvm, dtype, &dev),
    )?;
    candle_moe::train::init::reseed_varmap(&dvm, 1)?;
    let dense_w = candle_moe::io::safetensors::varmap_tensors(&dvm)?;
    let dense = Expert::from_weights(
        dense_w["w1.weight"].detach(),
        Some(dense_w["w3.weight"].detach()),
        dense_w["w2.weight"].detach(),
    );

    let mut rows = vec![];
    for t in a.tokens.split(',').map(|s| s.trim().parse::<usize>()) {
        let t = t?;
        let xs = Tensor::randn(0f32, 1.0, (t, a.hidden), &dev)?.to_dtype(dtype)?;
        let xs_dense = Tensor::randn(0f32, 1.0, (t * top_k, a.hidden), &dev)?.to_dtype(dtype)?;
        let (m, d, ratio) = time_pair(
            a.reps,
            &dev,
            || Ok(moe.forward(&xs).map(|_| ())?),
            || Ok(dense.forward(&xs_dense).map(|_| ())?),
        )?;
        let n = time(a.reps, &dev, || naive(&moe, &xs, top_k).map(|_| ()))?;
        // Routing share: the router alone.
        let r = time(a.reps, &dev, || {
            let l = moe.router().forward(&xs)?;
            let _ = l.arg_sort_last_dim(false)?;
            Ok(())
        })?;
        let out = moe.forward(&xs)?;
        let max = *out.expert_counts.iter().max().unwrap_or(&0) as f64;
        let min = *out.expert_counts.iter().min().unwrap_or(&0) as f64;
        let flops = 2.0 * 3.0 * (t * top_k) as f64 * a.hidden as f64 * a.ffn as f64;
        let mut row = vec![
            t.to_string(),
            format!("{:.0}", t as f64 / m.0),
            format!("{:.1}", flops / m.0 / 1e9),
            format!("{:.1}", flops / d.0 / 1e9),
            format!("{ratio:.2}x"),
            format!("{:.2}x", n.0 / d.0),
            format!("{:.2}x", m.0 / n.0),
            format!("{:.1}%", 100.0 * r.0 / m.0),
            format!("{:.2}", max / min.max(1.0)),
            format!("{:.2}-{:.2}x", m.1 / d.2, m.2 / d.1),
        ];
        let mem_m = peak_bytes(|| Ok(moe.forward(&xs).map(|_| ())?))?;
        let mem_d = peak_bytes(|| Ok(dense.forward(&xs_dense).map(|_| ())?))?;
        row.push(format!(
            "{:.1}/{:.1} MB ({:.2}x)",
            mem_m as f64 / 1e6,
            mem_d as f64 / 1e6,
            mem_m as f64 / mem_d as f64
        ));
        if variant {
            let (_, _, v) = time_pair(
                a.reps,
                &dev,
                || Ok(moe.forward(&xs).map(|_| ())?),
                || Ok(base.forward(&xs).map(|_| ())?),
            )?;
            row.push(format!("{v:.2}x"));
        }
        if a.backward {
            if variant {
                row.push(train_step_ratio(
                    a, &cfg, &plain, lb_coef, &xs, dtype, &dev,
                )?);
            }
            let mvm = VarMap::new();
            let mt = SparseMoe::new(&cfg, VarBuilder::from_varmap(&mvm, dtype, &dev))?;
            let dvm2 = VarMap::new();
            let dt = Expert::new(
                a.hidden,
                a.ffn,
                ExpertKind::Swiglu,
                VarBuilder::from_varmap(&dvm2, dtype, &dev),
            )?;
            let (_, _, fb_ratio) = time_pair(
                a.reps,
                &dev,
                || {
                    let o = mt.forward_t(&xs, true)?;
                    let l = (o.hidden_states.sqr()?.mean_all()? + (o.load_balancing_loss * 0.01)?)?;
                    l.backward()?;
                    Ok(())
                },
                || {
                    dt.forward(&xs_dense)?.sqr()?.mean_all()?.backward()?;
                    Ok(())
                },
            )?;
            row.push(format!("{fb_ratio:.2}x"));
        }
        if a.json {
            println!(
                "{{\"tokens\":{t},\"moe_s\":{},\"dense_s\":{},\"naive_s\":{},\"ratio_dense\":{},\"ratio_naive\":{}}}",
                m.0, d.0, n.0, ratio, m.0 / n.0
            );
        }
        points.push((experts, top_k, t, t as f64 / m.0, t as f64 / d.0));
        rows.push(row);
    }
    if !a.json {
        println!(
            "shape d={} f={} E={} k={} dtype={} device={} allocator={} (medians of {} runs)",
            a.hidden,
            a.ffn,
            experts,
            top_k,
            a.dtype,
            a.device,
            if cfg!(feature = "system-alloc") {
                "system"
            } else {
                "mimalloc"
            },
            a.reps
        );
        let mut header = vec![
            "T",
            "tokens/s",
            "GFLOP/s",
            "dense GFLOP/s",
            "MoE/dense",
            "naive/dense",
            "MoE/naive",
            "router share",
            "load max/min",
            "MoE/dense range",
            "peak mem MoE/dense",
        ];
        if variant {
            header.push("MoE/plain router");
        }
        if a.backward {
            if variant {
                header.push("train step/plain");
            }
            header.push("fwd+bwd MoE/dense");
        }
        print_table(&header, &rows);
    }
    Ok(())
}

/// The training step (forward, loss with the layer's balance losses, backward) of the layer
/// `cfg` over that of the plain layer with its load-balancing loss at 0.01, alternately timed.
fn train_step_ratio(
    a: &Args,
    cfg: &MoeConfig,
    plain: &MoeConfig,
    lb_coef: f64,
    xs: &Tensor,
    dtype: DType,
    dev: &Device,
) -> Result<String> {
    let vm = VarMap::new();
    let layer = SparseMoe::new(cfg, VarBuilder::from_varmap(&vm, dtype, dev))?;
    let bvm = VarMap::new();
    let base = SparseMoe::new(plain, VarBuilder::from_varmap(&bvm, dtype, dev))?;
    let step = |m: &SparseMoe, coef: f64| -> Result<()> {
        let o = m.forward_t(xs, true)?;
        let mut l = o.hidden_states.sqr()?.mean_all()?;
        if coef > 0.0 {
            l = (l + (o.load_balancing_loss * coef)?)?;
        }
        l.backward()?;
        Ok(())
    };
    let (_, _, r) = time_pair(a.reps, dev, || step(&layer, lb_coef), || step(&base, 0.01))?;
    Ok(format!("{r:.2}x"))
}

/// 1-layer Mixtral-shaped prefill: `CausalLm` against candle-transformers' `mixtral::Model`.
fn whole_model(a: &Args, dev: &Device) -> Result<()> {
    use candle_moe::{CausalLm, ModelConfig};
    let vocab = 1000;
    let mut cfg = ModelConfig::tiny(vocab);
    cfg.hidden_size = a.hidden;
    cfg.num_layers = 1;
    cfg.num_heads = 8;
    cfg.num_kv_heads = 2;
    cfg.max_position_embeddings = 4096;
    cfg.rope_theta = 1e6;
    cfg.tie_word_embeddings = false;
    cfg.moe.hidden_size = a.hidden;
    cfg.moe.intermediate_size = a.ffn;
    cfg.moe.num_experts = a.experts[0];
    cfg.moe.top_k = a.top_k[0];
    let vm = VarMap::new();
    let _ = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    candle_moe::train::init::reseed_varmap(&vm, 3)?;
    let ts: std::collections::HashMap<String, Tensor> =
        candle_moe::io::safetensors::varmap_tensors(&vm)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(dev)?.detach())))
            .collect::<Result<_>>()?;
    let ours = CausalLm::new(&cfg, VarBuilder::from_tensors(ts.clone(), DType::F32, dev))?;
    let ct_cfg: candle_transformers::models::mixtral::Config = serde_json::from_value(
        serde_json::json!({
            "vocab_size": vocab, "hidden_size": a.hidden, "intermediate_size": a.ffn, "num_hidden_layers": 1,
            "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": 1e6, "sliding_window": 4096, "num_experts_per_tok": a.top_k[0],
            "num_local_experts": a.experts[0], "use_flash_attn": false
        }),
    )?;
    let mut rows = vec![];
    for t in [128usize, 512, 2048] {
        let ids: Vec<u32> = (0..t).map(|i| ((i * 7919) % vocab) as u32).collect();
        let x = Tensor::from_vec(ids, (1, t), dev)?;
        let (ours_t, theirs_t, ratio) = time_pair(
            a.reps.min(7),
            dev,
            || Ok(ours.last_logits(&x, None).map(|_| ())?),
            || {
                // A fresh model per prefill: candle-transformers keeps its KV cache inside.
                let mut m = candle_transformers::models::mixtral::Model::new(
                    &ct_cfg,
                    VarBuilder::from_tensors(ts.clone(), DType::F32, dev),
                )?;
                m.forward(&x, 0)?;
                Ok(())
            },
        )?;
        let mut m = candle_transformers::models::mixtral::Model::new(
            &ct_cfg,
            VarBuilder::from_tensors(ts.clone(), DType::F32, dev),
        )?;
        let theirs_l = m.forward(&x, 0)?.flatten_all()?;
        let ours_l = ours.last_logits(&x, None)?.flatten_all()?;
        let diff = (theirs_l - ours_l)?.abs()?.max_all()?.to_scalar::<f32>()?;
        rows.push(vec![
            t.to_string(),
            format!("{:.1} ms", ours_t.0 * 1e3),
            format!("{:.1} ms", theirs_t.0 * 1e3),
            format!("{:.2}x", 1.0 / ratio),
            format!("{diff:.1e}"),
        ]);
    }
    println!("\n1-layer Mixtral-shaped prefill (d={} f={} E={} k={}, 8 heads / 2 kv heads, vocab {vocab}), medians", a.hidden, a.ffn, a.experts[0], a.top_k[0]);
    print_table(
        &[
            "T",
            "CausalLm",
            "candle-transformers Mixtral",
            "speed-up",
            "max |Δ logits|",
        ],
        &rows,
    );
    Ok(())
}
