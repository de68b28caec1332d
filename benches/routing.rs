//! Criterion benches of the sparse layer against a dense SwiGLU FFN doing the same active FLOPs
//! (three matmuls on (k·T) × d) and the naive per-expert loop (candle-transformers' Mixtral
//! block algorithm), forward and forward + backward. `Throughput::Elements(tokens)`.
//!
//! `cargo bench --bench routing` (filter with e.g. `-- 512x1024`).

use candle_core::{DType, Device, Module, Tensor};
use candle_moe::moe::experts::Expert;
use candle_moe::{ExpertKind, MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn frozen(cfg: &MoeConfig) -> (SparseMoe, SparseMoe) {
    let vm = VarMap::new();
    let trainable =
        SparseMoe::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 0).unwrap();
    let ts = candle_moe::io::safetensors::varmap_tensors(&vm)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    let frozen =
        SparseMoe::new(cfg, VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)).unwrap();
    (frozen, trainable)
}

fn naive(moe: &SparseMoe, xs: &Tensor, k: usize) -> Tensor {
    let logits = xs.matmul(&moe.router().gate_weight().t().unwrap()).unwrap();
    let rw = candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let e = moe.experts().experts().len();
    let (mut top_x, mut sel) = (vec![vec![]; e], vec![vec![]; e]);
    for (r, p) in rw.iter().enumerate() {
        let mut d: Vec<usize> = (0..p.len()).collect();
        d.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
        let s: f32 = d.iter().take(k).map(|&i| p[i]).sum();
        for &i in d.iter().take(k) {
            top_x[i].push(r as u32);
            sel[i].push(p[i] / s);
        }
    }
    let mut ys = xs.zeros_like().unwrap();
    for (i, ex) in moe.experts().experts().iter().enumerate() {
        if top_x[i].is_empty() {
            continue;
        }
        let idx = Tensor::new(top_x[i].as_slice(), xs.device()).unwrap();
        let w = Tensor::new(sel[i].as_slice(), xs.device())
            .unwrap()
            .reshape(((), 1))
            .unwrap();
        let h = ex
            .forward(&xs.index_select(&idx, 0).unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        ys = ys.index_add(&idx, &h, 0).unwrap();
    }
    ys
}

fn bench(c: &mut Criterion) {
    let shapes: [(usize, usize, usize, usize, &[usize]); 3] = [
        (512, 1024, 8, 2, &[1, 128, 512, 2048]),
        (1024, 2816, 8, 2, &[512]),
        (512, 256, 64, 8, &[512]),
    ];
    for (d, f, e, k, tokens) in shapes {
        let cfg = MoeConfig {
            hidden_size: d,
            intermediate_size: f,
            num_experts: e,
            top_k: k,
            ..Default::default()
        };
        let (moe, moe_train) = frozen(&cfg);
        let dvm = VarMap::new();
        let dense = Expert::new(
            d,
            f,
            ExpertKind::Swiglu,
            VarBuilder::from_varmap(&dvm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let mut g = c.benchmark_group(format!("{d}x{f}_E{e}_k{k}"));
        g.sample_size(10);
        g.measurement_time(std::time::Duration::from_secs(3));
        g.warm_up_time(std::time::Duration::from_millis(500));
        for &t in tokens {
            let xs = Tensor::randn(0f32, 1.0, (t, d), &Device::Cpu).unwrap();
            let xd = Tensor::randn(0f32, 1.0, (t * k, d), &Device::Cpu).unwrap();
            g.throughput(Throughput::Elements(t as u64));
            // CPU ops are synchronous: the clock stops after the result exists.
            g.bench_with_input(BenchmarkId::new("moe_fwd", t), &t, |b, _| {
                b.iter(|| moe.forward(&xs).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("dense_fwd", t), &t, |b, _| {
                b.iter(|| dense.forward(&xd).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("naive_fwd", t), &t, |b, _| {
                b.iter(|| naive(&moe, &xs, k))
            });
            if t >= 128 {
                g.bench_with_input(BenchmarkId::new("moe_fwd_bwd", t), &t, |b, _| {
                    b.iter(|| {
                        let o = moe_train.forward_t(&xs, true).unwrap();
                        (o.hidden_states.sqr().unwrap().mean_all().unwrap() + o.load_balancing_loss)
                            .unwrap()
                            .backward()
                            .unwrap()
                    })
                });
                g.bench_with_input(BenchmarkId::new("dense_fwd_bwd", t), &t, |b, _| {
                    b.iter(|| {
                        dense
                            .forward(&xd)
                            .unwrap()
                            .sqr()
                            .unwrap()
                            .mean_all()
                            .unwrap()
                            .backward()
                            .unwrap()
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
