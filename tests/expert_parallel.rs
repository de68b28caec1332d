#![cfg(feature = "mpi")]
//! Expert parallelism over MPI (`--features mpi`): the expert-parallel layer on each rank's
//! token slice against the single-process layer on the union of the ranks' tokens (outputs,
//! aux losses, counts, and the gradients of the router, the inputs and the rank's experts) and
//! against the plain f64 per-token reference (outputs, counts, drops).
//!
//! `cargo test` runs this binary directly: the `launch_*` tests then re-run it under
//! `mpirun -np 2` and `-np 4` (the worker tests filtered by name) and check the exit status;
//! under MPI (`OMPI_COMM_WORLD_SIZE` set) the launchers do nothing and the workers check. The
//! worker also runs directly, as a world of one rank ([`LocalComm`]).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::dist::{all_reduce_grads, Communicator, ExpertParallelMoe, LocalComm, MpiComm};
use candle_moe::moe::SparseMoe;
use candle_moe::MoeConfig;
use candle_nn::{VarBuilder, VarMap};
use common::mpirun::under_mpi;
use common::{max_abs_diff, moe_ref, randomize, Rng};

const TOL: f64 = 1e-5;

/// Runs this test binary under `mpirun -np {np}` with the exact test `name`; returns whether it
/// succeeded, its combined output and how long it took. Kills it after `limit`.
fn mpirun(np: usize, name: &str, timeout_env: &str, limit: Duration) -> (bool, String, Duration) {
    let t = std::ffi::OsStr::new(timeout_env);
    common::mpirun::mpirun(np, name, &[("CANDLE_MOE_MPI_TIMEOUT_S", t)], limit)
}

fn launch_ok(np: usize) {
    if under_mpi() {
        return;
    }
    let (ok, text, t) = mpirun(np, "mpi_worker_equivalence", "60", Duration::from_secs(600));
    assert!(ok, "mpirun -np {np} failed after {t:?}:\n{text}");
    let passed = text.matches("equivalence: rank ").count();
    assert_eq!(passed, np, "expected one pass line per rank:\n{text}");
}

#[test]
fn launch_two_ranks() {
    launch_ok(2);
}

#[test]
fn launch_four_ranks_oversubscribed() {
    launch_ok(4);
}

#[test]
fn launch_expert_parallel_training() {
    if under_mpi() {
        return;
    }
    let name = "mpi_worker_ep_training";
    for np in [2, 4] {
        let (ok, text, t) = mpirun(np, name, "60", Duration::from_secs(600));
        assert!(ok, "mpirun -np {np} {name} failed after {t:?}:\n{text}");
        assert_eq!(text.matches("ep training: rank ").count(), np, "{text}");
    }
}

#[test]
fn launch_data_parallel_two_ranks() {
    if under_mpi() {
        return;
    }
    let name = "mpi_worker_data_parallel";
    let (ok, text, t) = mpirun(2, name, "60", Duration::from_secs(600));
    assert!(ok, "mpirun -np 2 {name} failed after {t:?}:\n{text}");
    assert_eq!(text.matches("data parallel: rank ").count(), 2, "{text}");
}

/// A rank that dies mid-job: the survivors, waiting in a collective, are ended by `mpirun`
/// within the deadline, and the job fails naming the dead rank (never a hang).
#[test]
fn launch_killed_rank_fails_fast() {
    if under_mpi() {
        return;
    }
    let (ok, text, t) = mpirun(2, "mpi_worker_dies", "20", Duration::from_secs(120));
    assert!(!ok, "a job with a dead rank succeeded:\n{text}");
    assert!(t < Duration::from_secs(60), "took {t:?}:\n{text}");
    // Open MPI names the rank ("process rank 1", or its process name "[[job,1],1]").
    assert!(
        text.contains("rank 1") || text.contains(",1],1]"),
        "the error does not name rank 1:\n{text}"
    );
}

/// A rank that is alive but never arrives: the others time out with a clear error.
#[test]
fn launch_stuck_rank_times_out() {
    if under_mpi() {
        return;
    }
    let (ok, text, t) = mpirun(2, "mpi_worker_stuck", "3", Duration::from_secs(120));
    assert!(!ok, "a job with a stuck rank succeeded:\n{text}");
    assert!(t < Duration::from_secs(60), "took {t:?}:\n{text}");
    assert!(
        text.contains("rank 0 of 2: barrier did not complete within 3s"),
        "no timeout message:\n{text}"
    );
}

/// The communicator of this process: MPI's world under `mpirun`, else one local rank.
fn world() -> Arc<dyn Communicator> {
    if under_mpi() {
        Arc::new(MpiComm::init().unwrap())
    } else {
        Arc::new(LocalComm)
    }
}

/// Runs `f`; a failure on any rank aborts the whole MPI job (so no peer waits forever).
fn on_every_rank(comm: &Arc<dyn Communicator>, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(f));
    if r.is_err() && under_mpi() {
        eprintln!("rank {} failed; aborting the job", comm.rank());
        std::process::exit(1);
    }
    if let Err(p) = r {
        std::panic::resume_unwind(p)
    }
}

#[test]
fn mpi_worker_dies() {
    if !under_mpi() {
        return;
    }
    let comm = world();
    if comm.rank() == 1 {
        // Killed from outside, as by the OOM killer or a node failure.
        let pid = std::process::id().to_string();
        let _ = Command::new("kill").args(["-9", &pid]).status();
        std::thread::sleep(Duration::from_secs(30));
    }
    comm.barrier().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    comm.barrier().unwrap();
    eprintln!("rank {} passed the barrier of a dead peer", comm.rank());
}

#[test]
fn mpi_worker_stuck() {
    if !under_mpi() {
        return;
    }
    let comm = world();
    if comm.rank() == 1 {
        std::thread::sleep(Duration::from_secs(30));
    }
    comm.barrier().unwrap();
}

#[test]
fn mpi_worker_equivalence() {
    let comm = world();
    on_every_rank(&comm, || {
        let w = comm.size();
        // Dropless, with capacity drops, one expert of the last rank never chosen, and (W > 1)
        // every expert of the last rank never chosen, so that rank receives no rows at all.
        check(&comm, None, &[]);
        check(&comm, Some(0.6), &[]);
        check(&comm, None, &[7]);
        check(&comm, Some(1.0), &[7]);
        if w > 1 {
            let last: Vec<usize> = (8 - 8 / w..8).collect();
            check(&comm, None, &last);
            check(&comm, Some(0.8), &last);
        }
        comm.barrier().unwrap();
        eprintln!("equivalence: rank {} of {w} passed", comm.rank());
    });
}

/// Token counts per rank (uneven) and the offset of rank `r`'s slice in the union.
fn slices(w: usize) -> Vec<(usize, usize)> {
    let mut at = 0;
    (0..w)
        .map(|r| {
            let n = 7 + 3 * r;
            at += n;
            (at - n, n)
        })
        .collect()
}

fn check(comm: &Arc<dyn Communicator>, cf: Option<f64>, dead: &[usize]) {
    let (w, rank) = (comm.size(), comm.rank());
    let (h, e) = (12, 8);
    let cfg = MoeConfig {
        hidden_size: h,
        intermediate_size: 10,
        num_experts: e,
        top_k: 2,
        capacity_factor: cf,
        router_aux_loss_coef: 0.1,
        router_z_loss_coef: 0.01,
        ..MoeConfig::default()
    };
    let dev = Device::Cpu;
    // The same weights on every rank: a full layer, then the gate rows of the dead experts
    // pointed against the constant input feature 0.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let full = SparseMoe::new(&cfg, vb.clone()).unwrap();
    randomize(&vm, &mut Rng::new(11), 0.3);
    {
        let data = vm.data().lock().unwrap();
        let g = &data["gate.weight"];
        let mut rows = g.to_vec2::<f32>().unwrap();
        for &d in dead {
            rows[d][0] = -40.0;
        }
        g.set(&Tensor::new(rows, &dev).unwrap()).unwrap();
    }
    let ep = ExpertParallelMoe::new(&cfg, vb, comm.clone()).unwrap();

    let sl = slices(w);
    let total: usize = sl.iter().map(|s| s.1).sum();
    let mut rng = Rng::new(5);
    let mut xs = rng.normals(total * h, 1.0);
    for t in 0..total {
        xs[t * h] = 1.0; // the constant feature
    }
    let proj = rng.tensor(&[total, h], 1.0, DType::F32);
    let x_all = Var::from_vec(xs.iter().map(|&v| v as f32).collect(), (total, h), &dev).unwrap();
    let (off, n) = sl[rank];
    let x_mine = Var::from_tensor(&x_all.narrow(0, off, n).unwrap()).unwrap();

    // Single process on the union.
    let out = full.forward_t(x_all.as_tensor(), false).unwrap();
    let loss = ((out.hidden_states.clone() * &proj)
        .unwrap()
        .sum_all()
        .unwrap()
        + (out.load_balancing_loss.clone() * 0.1).unwrap()
        + (out.z_loss.clone() * 0.01).unwrap())
    .unwrap();
    let g_full = loss.backward().unwrap();

    // Expert parallel on this rank's slice.
    let mine = ep.forward_t(x_mine.as_tensor(), false).unwrap();
    let loss = ((mine.hidden_states.clone() * proj.narrow(0, off, n).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        + (mine.load_balancing_loss.clone() * 0.1).unwrap()
        + (mine.z_loss.clone() * 0.01).unwrap())
    .unwrap();
    let g_ep = loss.backward().unwrap();

    let case = format!("rank {rank}/{w} cf {cf:?} dead {dead:?}");
    let y_ref = out.hidden_states.narrow(0, off, n).unwrap();
    let d = max_abs_diff(&mine.hidden_states, &y_ref);
    assert!(d < TOL, "{case}: outputs differ by {d}");
    for (a, b, what) in [
        (&mine.load_balancing_loss, &out.load_balancing_loss, "lb"),
        (&mine.z_loss, &out.z_loss, "z"),
    ] {
        let d = max_abs_diff(a, b);
        assert!(d < TOL, "{case}: {what} loss differs by {d}");
    }
    assert_eq!(mine.expert_counts, out.expert_counts, "{case}: counts");
    assert_eq!(mine.dropped, out.dropped, "{case}: dropped");
    if cf == Some(0.6) {
        assert!(out.dropped > 0, "{case}: the capacity case drops nothing");
    }
    for &dd in dead {
        assert_eq!(
            out.expert_counts[dd], 0,
            "{case}: dead expert {dd} was chosen"
        );
    }

    // The f64 per-token reference on the union.
    let rows: Vec<Vec<f64>> = xs.chunks(h).map(|r| r.to_vec()).collect();
    let r = moe_ref::reference(&cfg, &vm, &rows);
    assert_eq!(r.counts, out.expert_counts, "{case}: reference counts");
    assert_eq!(r.dropped, out.dropped, "{case}: reference drops");
    let y_f64 = Tensor::new(r.y[off..off + n].to_vec(), &dev).unwrap();
    let d = max_abs_diff(&mine.hidden_states, &y_f64);
    assert!(
        d < 1e-4,
        "{case}: outputs differ from the f64 reference by {d}"
    );

    // Gradients: the input slice, the router (summed over ranks), this rank's experts.
    let gx = g_ep.get(x_mine.as_tensor()).expect("no input gradient");
    let gx_ref = g_full
        .get(x_all.as_tensor())
        .unwrap()
        .narrow(0, off, n)
        .unwrap();
    let d = max_abs_diff(gx, &gx_ref);
    assert!(d < TOL, "{case}: input gradients differ by {d}");
    let data = vm.data().lock().unwrap();
    let gate = &data["gate.weight"];
    let mut g = g_ep
        .get(gate)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    comm.all_reduce_sum_f32(&mut g).unwrap();
    let g = Tensor::from_vec(g, (e, h), &dev).unwrap();
    let d = max_abs_diff(&g, g_full.get(gate).unwrap());
    assert!(d < TOL, "{case}: router gradients differ by {d}");
    // The data-parallel helper: the same sum, then the mean of identical sums.
    let (mut g_dp, gate_t) = (loss.backward().unwrap(), gate.as_tensor().clone());
    all_reduce_grads(
        comm.as_ref(),
        &mut g_dp,
        std::slice::from_ref(&gate_t),
        false,
    )
    .unwrap();
    let d = max_abs_diff(g_dp.get(&gate_t).unwrap(), &g);
    assert!(d < TOL, "{case}: all_reduce_grads (sum) differs by {d}");
    all_reduce_grads(
        comm.as_ref(),
        &mut g_dp,
        std::slice::from_ref(&gate_t),
        true,
    )
    .unwrap();
    let d = max_abs_diff(g_dp.get(&gate_t).unwrap(), &g);
    assert!(d < TOL, "{case}: all_reduce_grads (average) differs by {d}");
    for i in ep.expert_range() {
        for p in ["w1", "w2", "w3"] {
            let v = &data[&format!("experts.{i}.{p}.weight")];
            // An expert no row reached may have no gradient (or a zero one) on either side.
            let zero = v.zeros_like().unwrap();
            let a = g_ep.get(v).unwrap_or(&zero);
            let b = g_full.get(v).unwrap_or(&zero);
            let d = max_abs_diff(a, b);
            assert!(d < TOL, "{case}: expert {i} {p} gradients differ by {d}");
            let norm = b
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                norm > 0.0,
                out.expert_counts[i] > 0,
                "{case}: expert {i} {p}: gradient norm {norm} with {} rows",
                out.expert_counts[i]
            );
        }
    }
}

/// Data parallelism: a tiny `CausalLm` replicated on every rank, each on its slice of the batch,
/// gradients averaged with [`all_reduce_grads`] before AdamW, against the single-process run on
/// the whole batch: 20 steps, losses to 1e-4 (cross entropy + z-loss, which are means over
/// equal-sized slices; the load-balancing loss is not, and is left out).
#[test]
fn mpi_worker_data_parallel() {
    use candle_moe::losses::cross_entropy;
    use candle_moe::{CausalLm, ModelConfig};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    let comm = world();
    on_every_rank(&comm, || {
        let (w, rank) = (comm.size(), comm.rank());
        let (vocab, len, per_rank) = (16, 10, 4 / w.min(4));
        let batch = per_rank * w;
        let mut cfg = ModelConfig::tiny(vocab);
        cfg.hidden_size = 16;
        cfg.moe.hidden_size = 16;
        cfg.moe.intermediate_size = 16;
        cfg.num_heads = 2;
        cfg.num_kv_heads = 2;
        cfg.max_position_embeddings = 32;
        let dev = Device::Cpu;
        let build = || {
            let vm = VarMap::new();
            let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
            candle_moe::train::init::reseed_varmap(&vm, 3).unwrap();
            let data = vm.data().lock().unwrap();
            let mut names: Vec<_> = data.keys().cloned().collect();
            names.sort();
            let vars: Vec<Var> = names.iter().map(|n| data[n].clone()).collect();
            drop(data);
            let opt = AdamW::new(
                vars.clone(),
                ParamsAdamW {
                    lr: 1e-2,
                    ..Default::default()
                },
            )
            .unwrap();
            (m, vars, opt, vm)
        };
        let (m_all, _, mut opt_all, _vm_all) = build();
        let (m_mine, vars, mut opt_mine, _vm_mine) = build();
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let mut rng = Rng::new(9);
        let ids: Vec<u32> = (0..batch * len)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();
        let all = Tensor::from_vec(ids, (batch, len), &dev).unwrap();
        let mine = all.narrow(0, rank * per_rank, per_rank).unwrap();
        let loss_of = |m: &CausalLm, x: &Tensor| {
            let b = x.dim(0).unwrap();
            let inp = x.narrow(1, 0, len - 1).unwrap();
            let tgt = x.narrow(1, 1, len - 1).unwrap().flatten_all().unwrap();
            let out = m.forward_t(&inp, None, false).unwrap();
            let logits = out.logits.reshape((b * (len - 1), vocab)).unwrap();
            (cross_entropy(&logits, &tgt, None).unwrap() + (out.z_loss * 0.01).unwrap()).unwrap()
        };
        let (mut worst, mut first, mut last) = (0f64, 0f64, 0f64);
        for step in 0..20 {
            let l_all = loss_of(&m_all, &all);
            opt_all.backward_step(&l_all).unwrap();
            let l_mine = loss_of(&m_mine, &mine);
            let mut grads = l_mine.backward().unwrap();
            all_reduce_grads(comm.as_ref(), &mut grads, &params, true).unwrap();
            opt_mine.step(&grads).unwrap();
            let mut l = vec![l_mine.to_scalar::<f32>().unwrap()];
            comm.all_reduce_sum_f32(&mut l).unwrap();
            let (dp, sp) = (
                l[0] as f64 / w as f64,
                l_all.to_scalar::<f32>().unwrap() as f64,
            );
            let d = (dp - sp).abs();
            worst = worst.max(d);
            if step == 0 {
                first = sp;
            }
            last = sp;
            assert!(
                d < 1e-4,
                "rank {rank}/{w} step {step}: loss {dp} vs single-process {sp}"
            );
        }
        comm.barrier().unwrap();
        assert!(last < first, "the loss did not fall: {first} -> {last}");
        eprintln!(
            "data parallel: rank {rank} of {w} passed (20 steps, loss {first:.4} -> {last:.4}, worst difference {worst:.2e})"
        );
    });
}

/// Experts sharded, the rest data-parallel: 20 AdamW steps of the expert-parallel layer (router
/// gradients summed over the ranks, each rank's experts updated by their owner) against the
/// single-process layer on the union of the tokens; capacity on, so drops move with training.
#[test]
fn mpi_worker_ep_training() {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    let comm = world();
    on_every_rank(&comm, || {
        let (w, rank) = (comm.size(), comm.rank());
        let (h, e) = (12, 8);
        let cfg = MoeConfig {
            hidden_size: h,
            intermediate_size: 10,
            num_experts: e,
            top_k: 2,
            capacity_factor: Some(1.0),
            ..MoeConfig::default()
        };
        let dev = Device::Cpu;
        let weights = || {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let full = SparseMoe::new(&cfg, vb.clone()).unwrap();
            randomize(&vm, &mut Rng::new(11), 0.3);
            (vm, vb, full)
        };
        let (vm_all, _, full) = weights();
        let (vm_ep, vb_ep, _) = weights();
        let ep = ExpertParallelMoe::new(&cfg, vb_ep, comm.clone()).unwrap();
        let vars = |vm: &VarMap, keep: &dyn Fn(&str) -> bool| -> Vec<Var> {
            let data = vm.data().lock().unwrap();
            let mut names: Vec<_> = data.keys().filter(|n| keep(n)).cloned().collect();
            names.sort();
            names.iter().map(|n| data[n].clone()).collect()
        };
        let adam = |v: Vec<Var>| {
            let p = ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            };
            AdamW::new(v, p).unwrap()
        };
        let mut opt_all = adam(vars(&vm_all, &|_| true));
        let range = ep.expert_range();
        let mine = move |n: &str| match n.strip_prefix("experts.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| range.contains(&i)),
            None => true,
        };
        let mut opt_ep = adam(vars(&vm_ep, &mine));
        let gate = vars(&vm_ep, &|n| n.starts_with("gate"));
        let gate: Vec<Tensor> = gate.iter().map(|v| v.as_tensor().clone()).collect();

        let sl = slices(w);
        let total: usize = sl.iter().map(|s| s.1).sum();
        let (off, n) = sl[rank];
        let mut rng = Rng::new(21);
        let x_all = rng.tensor(&[total, h], 1.0, DType::F32);
        let target = rng.tensor(&[total, h], 0.5, DType::F32);
        let (x_mine, t_mine) = (
            x_all.narrow(0, off, n).unwrap(),
            target.narrow(0, off, n).unwrap(),
        );
        // Σ over tokens of squared errors / all tokens, + 0.1 · load balancing: the ranks'
        // task parts sum to the union's, and each rank's balancing loss has the global value.
        let loss = |y: &Tensor, t: &Tensor, lb: &Tensor| {
            let sq = (y - t).unwrap().sqr().unwrap().sum_all().unwrap();
            ((sq / total as f64).unwrap() + (lb * 0.1).unwrap()).unwrap()
        };
        let (mut worst, mut first, mut last) = (0f64, 0f64, 0f64);
        for step in 0..20 {
            let o = full.forward_t(&x_all, false).unwrap();
            let l_all = loss(&o.hidden_states, &target, &o.load_balancing_loss);
            opt_all.backward_step(&l_all).unwrap();
            let o = ep.forward_t(&x_mine, false).unwrap();
            let l_mine = loss(&o.hidden_states, &t_mine, &o.load_balancing_loss);
            let mut grads = l_mine.backward().unwrap();
            all_reduce_grads(comm.as_ref(), &mut grads, &gate, false).unwrap();
            opt_ep.step(&grads).unwrap();
            // The global loss: the task parts summed, the balancing loss counted once.
            let lb = (o.load_balancing_loss * 0.1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mut l = vec![l_mine.to_scalar::<f32>().unwrap() - lb];
            comm.all_reduce_sum_f32(&mut l).unwrap();
            let (ep_l, sp) = ((l[0] + lb) as f64, l_all.to_scalar::<f32>().unwrap() as f64);
            let d = (ep_l - sp).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-4,
                "rank {rank}/{w} step {step}: loss {ep_l} vs single-process {sp}"
            );
            if step == 0 {
                first = sp;
            }
            last = sp;
        }
        assert!(last < first, "the loss did not fall: {first} -> {last}");
        comm.barrier().unwrap();
        eprintln!(
            "ep training: rank {rank} of {w} passed (20 steps, loss {first:.4} -> {last:.4}, worst difference {worst:.2e})"
        );
    });
}
