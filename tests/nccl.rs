//! The NCCL backend on two GPUs (`--features nccl`): one thread per GPU, each joining the same
//! NCCL communicator as its own rank (`NcclComm::new` with a shared unique id).
//!
//! - The collectives against values computed on the host: `all_to_all_v` with uneven counts
//!   (one rank sends nothing to the other), both all-reduces, the barrier.
//! - `ExpertParallelMoe` over `NcclComm`, each rank on its GPU with its slice of the tokens,
//!   against `SparseMoe` on the CPU on the union of the slices (same weights): outputs, aux
//!   losses, counts, drops, input gradients, router gradients (summed over the ranks) and each
//!   rank's expert gradients, to 1e-4; dropless and with capacity drops.
//!
//! Both tests are `#[ignore]`d (CI has no GPU; most machines have at most one). Run them on a
//! machine with two NVIDIA GPUs and NCCL (docs/expert_parallel.md, "NCCL"):
//! `cargo test --release --features nccl --test nccl -- --ignored --test-threads=1`.
//! With fewer than two GPUs visible they fail at once, saying so.

#![cfg(feature = "nccl")]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::dist::{Communicator, ExpertParallelMoe, NcclComm};
use candle_moe::moe::SparseMoe;
use candle_moe::MoeConfig;
use candle_nn::{VarBuilder, VarMap};
use common::{max_abs_diff, randomize, Rng};

const TOL: f64 = 1e-4;
const W: usize = 2;

/// Runs `f(rank, comm)` on one thread per GPU, every rank in one NCCL communicator; returns
/// when all have finished (a failure on one rank ends the other's waits at the deadline).
fn on_two_gpus<F>(f: F)
where
    F: Fn(usize, Arc<dyn Communicator>, Device) + Send + Sync + 'static,
{
    let n = candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .expect("cannot count CUDA devices: is the NVIDIA driver installed?");
    assert!(
        n >= W as i32,
        "this test needs {W} CUDA GPUs, {n} visible (CUDA_VISIBLE_DEVICES?)"
    );
    // A failed rank ends the other's waits after 60 s instead of the default 120 s.
    std::env::set_var("CANDLE_MOE_NCCL_TIMEOUT_S", "60");
    let id = NcclComm::unique_id().unwrap();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..W)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let dev = Device::new_cuda(rank).unwrap();
                let comm: Arc<dyn Communicator> =
                    Arc::new(NcclComm::new(&dev, rank, W, &id).unwrap());
                assert_eq!((comm.rank(), comm.size()), (rank, W));
                f(rank, comm, dev)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    for (rank, r) in results.into_iter().enumerate() {
        if let Err(p) = r {
            eprintln!("rank {rank} failed");
            std::panic::resume_unwind(p)
        }
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL: cargo test --release --features nccl --test nccl -- --ignored"]
fn nccl_collectives_on_two_gpus() {
    on_two_gpus(|rank, comm, _dev| {
        // Rank s sends counts[s][d] values to rank d: value = 100·s + 10·d + i. Rank 1 sends
        // nothing to rank 0.
        let counts = [[3usize, 5], [0, 4]];
        let mut send = vec![];
        for (d, &c) in counts[rank].iter().enumerate() {
            send.extend((0..c).map(|i| (100 * rank + 10 * d + i) as f32));
        }
        let (got, rc) = comm.all_to_all_v(&send, &counts[rank]).unwrap();
        let mut want = vec![];
        for (s, row) in counts.iter().enumerate() {
            want.extend((0..row[rank]).map(|i| (100 * s + 10 * rank + i) as f32));
        }
        assert_eq!(
            rc,
            vec![counts[0][rank], counts[1][rank]],
            "rank {rank}: counts"
        );
        assert_eq!(got, want, "rank {rank}: values");

        let mut f = vec![rank as f32 + 1.0, 2.0 * (rank as f32 + 1.0), -0.5];
        comm.all_reduce_sum_f32(&mut f).unwrap();
        assert_eq!(f, vec![3.0, 6.0, -1.0], "rank {rank}: f32 all-reduce");
        let mut u = vec![rank as u64, 1 << 40, 7];
        comm.all_reduce_sum_u64(&mut u).unwrap();
        assert_eq!(u, vec![1, 2 << 40, 14], "rank {rank}: u64 all-reduce");
        comm.barrier().unwrap();
        // Empty buffers pass.
        let (got, rc) = comm.all_to_all_v(&[], &[0, 0]).unwrap();
        assert!(
            got.is_empty() && rc == vec![0, 0],
            "rank {rank}: empty all-to-all"
        );
        eprintln!("nccl collectives: rank {rank} of {W} passed");
    });
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL: cargo test --release --features nccl --test nccl -- --ignored"]
fn nccl_expert_parallel_layer_equals_single_process() {
    for cf in [None, Some(0.6)] {
        on_two_gpus(move |rank, comm, dev| check(rank, &comm, &dev, cf));
    }
}

fn check(rank: usize, comm: &Arc<dyn Communicator>, gpu: &Device, cf: Option<f64>) {
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
    let cpu = Device::Cpu;
    // The single-process layer on the CPU, and the same weights as variables on this GPU.
    let vm = VarMap::new();
    let full = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &cpu)).unwrap();
    randomize(&vm, &mut Rng::new(11), 0.3);
    let vm_gpu = VarMap::new();
    let _ = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm_gpu, DType::F32, gpu)).unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        vm_gpu.data().lock().unwrap()[name]
            .set(&v.as_tensor().to_device(gpu).unwrap())
            .unwrap();
    }
    let ep = ExpertParallelMoe::new(
        &cfg,
        VarBuilder::from_varmap(&vm_gpu, DType::F32, gpu),
        comm.clone(),
    )
    .unwrap();

    // Uneven slices: 9 tokens on rank 0, 14 on rank 1.
    let sizes = [9usize, 14];
    let (off, n, total) = (sizes[..rank].iter().sum::<usize>(), sizes[rank], 23);
    let mut rng = Rng::new(5);
    let x_all = Var::from_tensor(&rng.tensor(&[total, h], 1.0, DType::F32)).unwrap();
    let proj = rng.tensor(&[total, h], 1.0, DType::F32);
    let loss_of = |y: &Tensor, lb: &Tensor, z: &Tensor, p: &Tensor| {
        ((y * p).unwrap().sum_all().unwrap() + (lb * 0.1).unwrap() + (z * 0.01).unwrap()).unwrap()
    };
    let out = full.forward_t(x_all.as_tensor(), false).unwrap();
    let g_full = loss_of(
        &out.hidden_states,
        &out.load_balancing_loss,
        &out.z_loss,
        &proj,
    )
    .backward()
    .unwrap();

    let x_mine =
        Var::from_tensor(&x_all.narrow(0, off, n).unwrap().to_device(gpu).unwrap()).unwrap();
    let mine = ep.forward_t(x_mine.as_tensor(), false).unwrap();
    let p_mine = proj.narrow(0, off, n).unwrap().to_device(gpu).unwrap();
    let g_ep = loss_of(
        &mine.hidden_states,
        &mine.load_balancing_loss,
        &mine.z_loss,
        &p_mine,
    )
    .backward()
    .unwrap();

    let case = format!("rank {rank}/{W} cf {cf:?}");
    let host = |t: &Tensor| t.to_device(&cpu).unwrap();
    let d = max_abs_diff(
        &host(&mine.hidden_states),
        &out.hidden_states.narrow(0, off, n).unwrap(),
    );
    assert!(d < TOL, "{case}: outputs differ by {d}");
    for (a, b, what) in [
        (&mine.load_balancing_loss, &out.load_balancing_loss, "lb"),
        (&mine.z_loss, &out.z_loss, "z"),
    ] {
        let d = max_abs_diff(&host(a), b);
        assert!(d < TOL, "{case}: {what} loss differs by {d}");
    }
    assert_eq!(mine.expert_counts, out.expert_counts, "{case}: counts");
    assert_eq!(mine.dropped, out.dropped, "{case}: dropped");
    if cf.is_some() {
        assert!(out.dropped > 0, "{case}: the capacity case drops nothing");
    }

    let gx = host(g_ep.get(x_mine.as_tensor()).expect("no input gradient"));
    let gx_ref = g_full
        .get(x_all.as_tensor())
        .unwrap()
        .narrow(0, off, n)
        .unwrap();
    let d = max_abs_diff(&gx, &gx_ref);
    assert!(d < TOL, "{case}: input gradients differ by {d}");
    let (cpu_vars, gpu_vars) = (vm.data().lock().unwrap(), vm_gpu.data().lock().unwrap());
    let gate = &gpu_vars["gate.weight"];
    let mut g = host(g_ep.get(gate).unwrap())
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    comm.all_reduce_sum_f32(&mut g).unwrap();
    let g = Tensor::from_vec(g, (e, h), &cpu).unwrap();
    let d = max_abs_diff(&g, g_full.get(&cpu_vars["gate.weight"]).unwrap());
    assert!(d < TOL, "{case}: router gradients differ by {d}");
    for i in ep.expert_range() {
        for p in ["w1", "w2", "w3"] {
            let name = format!("experts.{i}.{p}.weight");
            let zero = cpu_vars[&name].zeros_like().unwrap();
            let a = g_ep.get(&gpu_vars[&name]).map(host).unwrap_or(zero.clone());
            let b = g_full.get(&cpu_vars[&name]).cloned().unwrap_or(zero);
            let d = max_abs_diff(&a, &b);
            assert!(d < TOL, "{case}: expert {i} {p} gradients differ by {d}");
        }
    }
    comm.barrier().unwrap();
    eprintln!("nccl expert parallel: {case} passed");
}
