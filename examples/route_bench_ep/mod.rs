//! `route_bench --expert-parallel` (feature `mpi`): run under `mpirun -np W`. Every rank builds
//! the same layer weights (seed 0) and its own `T` tokens (rows `[r·T, (r+1)·T)` of one seeded
//! union), runs `ExpertParallelMoe` over `MpiComm` (wrapped in a `TimedComm`), forward or, with
//! `--backward`, forward + backward, and rank 0 prints per-rank tokens/s, the global tokens/s
//! (`W·T` over the slowest rank's time), the share of the layer's time in the all-to-alls and in
//! the all-reduces, and the single-process `SparseMoe` on the union of the tokens (rank 0, same
//! weights) timed alternately with the expert-parallel step. Before that, a microbench of
//! `all_to_all_v` and of a small all-reduce through `MpiComm` fits the latency and bandwidth of
//! the cost model `docs/expert_parallel.md` describes, whose prediction is printed next to the
//! measurement.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_moe::dist::{Communicator, ExpertParallelMoe, MpiComm, TimedComm};
use candle_moe::{MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::{median, Args};
use crate::common::print_table;

/// Latency and bandwidth of `all_to_all_v` (fitted) and the latency of a small all-reduce.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// Seconds per `all_to_all_v` call at zero bytes (the count exchange included).
    a2a_latency: f64,
    /// Bytes per second sent to the other ranks, per rank.
    bandwidth: f64,
    /// Seconds per all-reduce of a routing table.
    ar_latency: f64,
}

pub fn run(a: &Args) -> Result<()> {
    let comm = Arc::new(TimedComm::new(Arc::new(MpiComm::init()?)));
    let (w, rank) = (comm.size(), comm.rank());
    let link = microbench(&comm, a.reps.max(5))?;
    if rank == 0 {
        println!(
            "expert parallel over MPI: {w} ranks, {} CPU threads per rank; all_to_all_v latency {:.1} µs, bandwidth {:.2} GB/s per rank (least-squares fit over 0..16 MiB per peer), all-reduce latency {:.1} µs",
            candle_core::utils::get_num_threads(),
            link.a2a_latency * 1e6,
            link.bandwidth / 1e9,
            link.ar_latency * 1e6
        );
    }
    for &e in &a.experts {
        for &k in &a.top_k {
            shape(a, &comm, link, e, k)?;
        }
    }
    Ok(())
}

/// Median time of `f` over `reps` calls, all ranks starting together (barrier before each).
fn timed(comm: &TimedComm, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ts = vec![];
    for _ in 0..reps {
        comm.inner().barrier()?;
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    // The slowest rank's median: every rank waits for it in the collective.
    let mut all = vec![0f32; comm.size()];
    all[comm.rank()] = median(ts).0 as f32;
    comm.inner().all_reduce_sum_f32(&mut all)?;
    Ok(all.iter().fold(0f32, |m, &v| m.max(v)) as f64)
}

/// Fits `t = latency + bytes / bandwidth` to `all_to_all_v` with the same number of floats to
/// every peer, and times an all-reduce of a routing table's size.
fn microbench(comm: &TimedComm, reps: usize) -> Result<Link> {
    let w = comm.size();
    let mut pts = vec![];
    for per_peer in [0usize, 1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22] {
        let send = vec![1f32; per_peer * w];
        let counts = vec![per_peer; w];
        let t = timed(comm, reps, || {
            comm.inner().all_to_all_v(&send, &counts)?;
            Ok(())
        })?;
        pts.push(((per_peer * 4 * (w - 1)) as f64, t));
    }
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let slope = sxy / sxx.max(f64::MIN_POSITIVE);
    let mut table = vec![1u64; w * 8 + w + 8];
    let ar = timed(comm, reps, || {
        comm.inner().all_reduce_sum_u64(&mut table)?;
        Ok(())
    })?;
    Ok(Link {
        a2a_latency: (my - slope * mx).max(0.0),
        bandwidth: 1.0 / slope.max(f64::MIN_POSITIVE),
        ar_latency: ar,
    })
}

/// One step's measurements on one rank.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    layer: f64,
    a2a: f64,
    a2a_calls: f64,
    a2a_bytes: f64,
    ar: f64,
    ar_calls: f64,
}

const FIELDS: usize = 6;

impl Step {
    fn to_vec(self) -> [f32; FIELDS] {
        [
            self.layer,
            self.a2a,
            self.a2a_calls,
            self.a2a_bytes,
            self.ar,
            self.ar_calls,
        ]
        .map(|v| v as f32)
    }
    fn from_slice(v: &[f32]) -> Self {
        let g = |i: usize| v[i] as f64;
        Self {
            layer: g(0),
            a2a: g(1),
            a2a_calls: g(2),
            a2a_bytes: g(3),
            ar: g(4),
            ar_calls: g(5),
        }
    }
}

fn shape(a: &Args, comm: &Arc<TimedComm>, link: Link, e: usize, k: usize) -> Result<()> {
    let (w, rank) = (comm.size(), comm.rank());
    let (h, f) = (a.hidden, a.ffn);
    let cfg = MoeConfig {
        hidden_size: h,
        intermediate_size: f,
        num_experts: e,
        top_k: k,
        ..Default::default()
    };
    let dev = Device::Cpu;
    // The same trainable weights on every rank (seed 0); the single-process layer and this
    // rank's shard read the same variables.
    let vm = VarMap::new();
    let single = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    candle_moe::train::init::reseed_varmap(&vm, 0)?;
    let dyn_comm: Arc<dyn Communicator> = comm.clone();
    let ep = ExpertParallelMoe::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
        dyn_comm,
    )?;
    let mut rows = vec![];
    let mut summary = vec![];
    for t in a.tokens.split(',').map(|s| s.trim().parse::<usize>()) {
        let t = t?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let union: Vec<f32> = (0..w * t * h)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let x_all = Tensor::from_vec(union, (w * t, h), &dev)?;
        let x = x_all.narrow(0, rank * t, t)?.contiguous()?;
        // With --backward the inputs need their gradient, as a layer inside a model does: the
        // backward then runs both reverse all-to-alls (four exchanges per step).
        let (x_all, x) = if a.backward {
            (
                Var::from_tensor(&x_all)?.as_tensor().clone(),
                Var::from_tensor(&x)?.as_tensor().clone(),
            )
        } else {
            (x_all, x)
        };
        let ep_step = || -> Result<()> {
            let o = ep.forward_t(&x, a.backward)?;
            if a.backward {
                let l = (o.hidden_states.sqr()?.mean_all()? + (o.load_balancing_loss * 0.01)?)?;
                l.backward()?;
            }
            Ok(())
        };
        let single_step = || -> Result<()> {
            let o = single.forward_t(&x_all, a.backward)?;
            if a.backward {
                let l = (o.hidden_states.sqr()?.mean_all()? + (o.load_balancing_loss * 0.01)?)?;
                l.backward()?;
            }
            Ok(())
        };
        // Agreement with the single process on this rank's rows (inference forward).
        let diff = {
            let mine = ep.forward_t(&x, false)?.hidden_states;
            let all = single.forward_t(&x_all, false)?.hidden_states;
            (mine - all.narrow(0, rank * t, t)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
        };
        // Warm-up, then alternate: the expert-parallel step on every rank, then the single
        // process on rank 0 while the others wait at the barrier.
        ep_step()?;
        if rank == 0 {
            single_step()?;
        }
        let mut steps: Vec<Vec<Step>> = vec![vec![]; w];
        let mut singles = vec![];
        for _ in 0..a.reps {
            comm.inner().barrier()?;
            comm.reset();
            let t0 = Instant::now();
            ep_step()?;
            let layer = t0.elapsed().as_secs_f64();
            let ct = comm.reset();
            let mine = Step {
                layer,
                a2a: ct.all_to_all.time.as_secs_f64(),
                a2a_calls: ct.all_to_all.calls as f64,
                a2a_bytes: ct.all_to_all.bytes as f64,
                ar: ct.all_reduce.time.as_secs_f64(),
                ar_calls: ct.all_reduce.calls as f64,
            };
            let mut all = vec![0f32; w * FIELDS];
            all[rank * FIELDS..(rank + 1) * FIELDS].copy_from_slice(&mine.to_vec());
            comm.inner().all_reduce_sum_f32(&mut all)?;
            for (r, s) in steps.iter_mut().enumerate() {
                s.push(Step::from_slice(&all[r * FIELDS..(r + 1) * FIELDS]));
            }
            comm.inner().barrier()?;
            if rank == 0 {
                let t0 = Instant::now();
                single_step()?;
                singles.push(t0.elapsed().as_secs_f64());
            }
        }
        comm.inner().barrier()?;
        if rank != 0 {
            continue;
        }
        let med = |r: usize, g: fn(&Step) -> f64| median(steps[r].iter().map(g).collect()).0;
        for r in 0..w {
            let (layer, a2a, ar) = (med(r, |s| s.layer), med(r, |s| s.a2a), med(r, |s| s.ar));
            rows.push(vec![
                t.to_string(),
                r.to_string(),
                format!("{:.2}", layer * 1e3),
                format!("{:.0}", t as f64 / layer),
                format!("{:.2} ({:.0})", a2a * 1e3, med(r, |s| s.a2a_calls)),
                format!("{:.1}%", 100.0 * a2a / layer),
                format!("{:.2} ({:.0})", ar * 1e3, med(r, |s| s.ar_calls)),
                format!("{:.1}%", 100.0 * ar / layer),
                format!("{:.2}", med(r, |s| s.a2a_bytes) / 1e6),
            ]);
        }
        // Global: per round, the slowest rank's layer time.
        let slowest = median(
            (0..a.reps)
                .map(|i| steps.iter().map(|s| s[i].layer).fold(0.0, f64::max))
                .collect(),
        )
        .0;
        let single_t = median(singles).0;
        let a2a_mean = (0..w).map(|r| med(r, |s| s.a2a)).sum::<f64>() / w as f64;
        // The last rank to arrive at a collective waits least: per round, the smallest
        // all-to-all time over the ranks is the exchange itself without the skew between ranks.
        let a2a_last = median(
            (0..a.reps)
                .map(|i| steps.iter().map(|s| s[i].a2a).fold(f64::INFINITY, f64::min))
                .collect(),
        )
        .0;
        let ar_mean = (0..w).map(|r| med(r, |s| s.ar)).sum::<f64>() / w as f64;
        // Compute: the layer time outside the collectives, on the rank where it is largest.
        let compute = (0..w)
            .map(|r| med(r, |s| s.layer - s.a2a - s.ar))
            .fold(0.0, f64::max);
        // Cost model: the single process's compute split evenly over the ranks, plus each
        // all-to-all at the fitted latency and bandwidth with the balanced-routing bytes, plus the
        // all-reduces at their latency (docs/expert_parallel.md).
        let exchanges = if a.backward { 4.0 } else { 2.0 };
        let bytes = 4.0 * (t * k * h) as f64 * (w - 1) as f64 / w as f64;
        let a2a_model = exchanges * (link.a2a_latency + bytes / link.bandwidth);
        let ar_model = 2.0 * link.ar_latency;
        let total_model = single_t / w as f64 + a2a_model + ar_model;
        summary.push(vec![
            t.to_string(),
            format!("{:.0}", (w * t) as f64 / slowest),
            format!("{:.2}", slowest * 1e3),
            format!("{:.2}", single_t * 1e3),
            format!("{:.2}x", single_t / slowest),
            format!("{:.2} / {:.2}", compute * 1e3, single_t / w as f64 * 1e3),
            format!(
                "{:.2} / {:.2} / {:.2}",
                a2a_mean * 1e3,
                a2a_last * 1e3,
                a2a_model * 1e3
            ),
            format!("{:.2} / {:.2}", ar_mean * 1e3, ar_model * 1e3),
            format!("{:.2} / {:.2}", slowest * 1e3, total_model * 1e3),
            format!("{diff:.1e}"),
        ]);
    }
    if rank == 0 {
        let what = if a.backward {
            "forward + backward"
        } else {
            "forward"
        };
        println!(
            "\nExpertParallelMoe, {what}: d={h} f={} E={e} k={k}, {w} ranks, T tokens per rank, medians of {} rounds",
            a.ffn, a.reps
        );
        print_table(
            &[
                "T",
                "rank",
                "layer ms",
                "tokens/s",
                "all-to-all ms (calls)",
                "a2a share",
                "all-reduce ms (calls)",
                "ar share",
                "MB sent to others",
            ],
            &rows,
        );
        println!(
            "\nglobal: W·T tokens over the slowest rank; single process = SparseMoe on the W·T tokens (rank 0, same weights, alternated); measured / cost model"
        );
        print_table(
            &[
                "T",
                "global tokens/s",
                "EP step ms",
                "single ms",
                "single/EP",
                "compute ms meas/model",
                "a2a ms mean / last rank / model",
                "all-reduce ms meas/model",
                "step ms meas/model",
                "max |Δ| vs single",
            ],
            &summary,
        );
    }
    Ok(())
}
