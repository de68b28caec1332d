//! Routing throughput: the sparse layer against a dense SwiGLU FFN doing the same active FLOPs
//! (three matmuls on (k·T) × d) and against the naive per-expert loop of candle-transformers'
//! Mixtral block, measured side by side in one process. Medians of repeated runs after warm-up.
//!
//! `cargo run --release --example route_bench -- --experts 8 --top-k 2 --hidden 512 --ffn 1024 --tokens 512`

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_moe::experts::Expert;
use candle_moe::{ExpertKind, MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{main_wrapper, print_table};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
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
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn time(reps: usize, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
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
    let dev = common::device(&a.device)?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => anyhow::bail!("unknown dtype {d}"),
    };
    let cfg = MoeConfig {
        hidden_size: a.hidden,
        intermediate_size: a.ffn,
        num_experts: a.experts,
        top_k: a.top_k,
        ..Default::default()
    };
    // Inference weights (not variables), as a loaded checkpoint has them.
    let vm = VarMap::new();
    let _ = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    candle_moe::init::reseed_varmap(&vm, 0)?;
    let ts: std::collections::HashMap<String, Tensor> =
        candle_moe::checkpoint::varmap_tensors(&vm)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(dtype)?.to_device(&dev)?.detach())))
            .collect::<Result<_>>()?;
    let moe = SparseMoe::new(&cfg, VarBuilder::from_tensors(ts, dtype, &dev))?;
    let dvm = VarMap::new();
    let _ = Expert::new(
        a.hidden,
        a.ffn,
        ExpertKind::Swiglu,
        VarBuilder::from_varmap(&dvm, dtype, &dev),
    )?;
    candle_moe::init::reseed_varmap(&dvm, 1)?;
    let dense_w = candle_moe::checkpoint::varmap_tensors(&dvm)?;
    let dense = Expert::from_weights(
        dense_w["w1.weight"].detach(),
        Some(dense_w["w3.weight"].detach()),
        dense_w["w2.weight"].detach(),
    );

    let mut rows = vec![];
    for t in a.tokens.split(',').map(|s| s.trim().parse::<usize>()) {
        let t = t?;
        let xs = Tensor::randn(0f32, 1.0, (t, a.hidden), &dev)?.to_dtype(dtype)?;
        let xs_dense = Tensor::randn(0f32, 1.0, (t * a.top_k, a.hidden), &dev)?.to_dtype(dtype)?;
        let d = time(a.reps, &dev, || Ok(dense.forward(&xs_dense).map(|_| ())?))?;
        let m = time(a.reps, &dev, || Ok(moe.forward(&xs).map(|_| ())?))?;
        let n = time(a.reps, &dev, || naive(&moe, &xs, a.top_k).map(|_| ()))?;
        // Routing share: the router alone.
        let r = time(a.reps, &dev, || {
            let l = moe.router().forward(&xs)?;
            let _ = l.arg_sort_last_dim(false)?;
            Ok(())
        })?;
        let out = moe.forward(&xs)?;
        let max = *out.expert_counts.iter().max().unwrap_or(&0) as f64;
        let min = *out.expert_counts.iter().min().unwrap_or(&0) as f64;
        let flops = 2.0 * 3.0 * (t * a.top_k) as f64 * a.hidden as f64 * a.ffn as f64;
        let mut row = vec![
            t.to_string(),
            format!("{:.0}", t as f64 / m.0),
            format!("{:.1}", flops / m.0 / 1e9),
            format!("{:.1}", flops / d.0 / 1e9),
            format!("{:.2}x", m.0 / d.0),
            format!("{:.2}x", n.0 / d.0),
            format!("{:.2}x", m.0 / n.0),
            format!("{:.1}%", 100.0 * r.0 / m.0),
            format!("{:.2}", max / min.max(1.0)),
            format!("{:.2}-{:.2}x", m.1 / d.2, m.2 / d.1),
        ];
        if a.backward {
            let mvm = VarMap::new();
            let mt = SparseMoe::new(&cfg, VarBuilder::from_varmap(&mvm, dtype, &dev))?;
            let dvm2 = VarMap::new();
            let dt = Expert::new(
                a.hidden,
                a.ffn,
                ExpertKind::Swiglu,
                VarBuilder::from_varmap(&dvm2, dtype, &dev),
            )?;
            let fb_m = time(a.reps, &dev, || {
                let o = mt.forward_t(&xs, true)?;
                let l = (o.hidden_states.sqr()?.mean_all()? + (o.load_balancing_loss * 0.01)?)?;
                l.backward()?;
                Ok(())
            })?;
            let fb_d = time(a.reps, &dev, || {
                dt.forward(&xs_dense)?.sqr()?.mean_all()?.backward()?;
                Ok(())
            })?;
            row.push(format!("{:.2}x", fb_m.0 / fb_d.0));
        }
        if a.json {
            println!(
                "{{\"tokens\":{t},\"moe_s\":{},\"dense_s\":{},\"naive_s\":{},\"ratio_dense\":{},\"ratio_naive\":{}}}",
                m.0, d.0, n.0, m.0 / d.0, m.0 / n.0
            );
        }
        rows.push(row);
    }
    if !a.json {
        println!(
            "shape d={} f={} E={} k={} dtype={} device={} (medians of {} runs)",
            a.hidden, a.ffn, a.experts, a.top_k, a.dtype, a.device, a.reps
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
        ];
        if a.backward {
            header.push("fwd+bwd MoE/dense");
        }
        print_table(&header, &rows);
    }
    Ok(())
}
