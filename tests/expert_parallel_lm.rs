#![cfg(feature = "mpi")]
//! The expert-parallel language model over MPI (`--features mpi`): a tiny `CausalLm` with its
//! experts split over the ranks, trained 20 steps through `Trainer` (each rank on its share of
//! every global batch), against the single-process run on the whole batches (losses to 1e-4);
//! and the checkpoint the expert-parallel run writes (rank 0 alone, every expert gathered)
//! loaded in a single process: plain sparse layers, the same logits (1e-5), the optimizer
//! state resumable.
//!
//! As `tests/expert_parallel.rs`: `cargo test` runs the `launch_*` tests, which re-run this
//! binary under `mpirun -np 2` and `-np 4` (oversubscribed) with the worker filtered by name;
//! without `mpirun` around it the worker runs as a world of one rank (`LocalComm`).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_moe::block::FeedForward;
use candle_moe::dist::{Communicator, LocalComm, MpiComm};
use candle_moe::losses::cross_entropy;
use candle_moe::train::{checkpoint, init, LossParts, StepStats};
use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use common::mpirun::under_mpi;
use rand::Rng as _;

const DIR_ENV: &str = "CANDLE_MOE_EP_LM_DIR";
const VOCAB: usize = 32;
/// Sequences per global batch.
const BATCH: usize = 4;
/// Tokens per sequence (plus one for the targets).
const LEN: usize = 8;

/// Runs this binary under `mpirun -np {np}` with the exact test `name` and `dir` for the
/// checkpoint; returns whether it succeeded and its output. Kills it after `limit`.
fn mpirun(np: usize, name: &str, dir: &Path, limit: Duration) -> (bool, String) {
    let envs = [
        ("CANDLE_MOE_MPI_TIMEOUT_S", std::ffi::OsStr::new("60")),
        (DIR_ENV, dir.as_os_str()),
    ];
    let (ok, text, _) = common::mpirun::mpirun(np, name, &envs, limit);
    (ok, text)
}

fn launch(np: usize) {
    if under_mpi() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("candle_moe_ep_lm_{}_{np}", std::process::id()));
    let name = "mpi_worker_lm";
    let (ok, text) = mpirun(np, name, &dir, Duration::from_secs(900));
    std::fs::remove_dir_all(&dir).ok();
    assert!(ok, "mpirun -np {np} {name} failed:\n{text}");
    assert_eq!(text.matches("ep lm: rank ").count(), np, "{text}");
}

#[test]
fn launch_lm_two_ranks() {
    launch(2);
}

#[test]
fn launch_lm_four_ranks_oversubscribed() {
    launch(4);
}

/// The communicator of this process: MPI's world under `mpirun`, else one local rank.
fn world() -> Arc<dyn Communicator> {
    if under_mpi() {
        Arc::new(MpiComm::init().unwrap())
    } else {
        Arc::new(LocalComm)
    }
}

fn config(capacity: Option<f64>, selection_bias: bool) -> ModelConfig {
    let mut cfg = ModelConfig::tiny(VOCAB);
    (cfg.hidden_size, cfg.moe.hidden_size) = (16, 16);
    (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
    (cfg.num_heads, cfg.num_kv_heads, cfg.max_position_embeddings) = (2, 2, 32);
    cfg.moe.num_experts = 4;
    cfg.moe.capacity_factor = capacity;
    cfg.moe.selection_bias = selection_bias;
    cfg
}

fn train_config(bias_rate: f64) -> TrainConfig {
    TrainConfig {
        steps: 20,
        lr: 1e-2,
        warmup_steps: 2,
        // Small enough to clip most steps: the global norm decides.
        grad_clip: Some(0.5),
        bias_update_rate: bias_rate,
        progress: false,
        seed: 7,
        ..Default::default()
    }
}

/// The step's global batch `(BATCH, LEN + 1)` from the trainer's step generator (the same on
/// every rank): counting sequences `s, s + 1, …` (mod the vocabulary) from random starts, a
/// pattern the model learns; and rows `rows` of it.
fn batch(rng: &mut rand::rngs::StdRng, rows: std::ops::Range<usize>) -> Tensor {
    let mut ids: Vec<u32> = Vec::with_capacity(BATCH * (LEN + 1));
    for _ in 0..BATCH {
        let s = rng.random_range(0..VOCAB as u32);
        ids.extend((0..=LEN as u32).map(|i| (s + i) % VOCAB as u32));
    }
    let all = Tensor::from_vec(ids, (BATCH, LEN + 1), &Device::Cpu).unwrap();
    all.narrow(0, rows.start, rows.len()).unwrap()
}

/// Next-token cross entropy (mean over the batch's tokens) and the model's aux losses.
fn loss_parts(m: &CausalLm, x: &Tensor) -> candle_moe::Result<LossParts> {
    let b = x.dim(0)?;
    let (inp, tgt) = (x.narrow(1, 0, LEN)?, x.narrow(1, 1, LEN)?.flatten_all()?);
    let out = m.forward_t(&inp, None, true)?;
    let task = cross_entropy(&out.logits.reshape((b * LEN, VOCAB))?, &tgt, None)?;
    Ok(LossParts::from_output(task, &out))
}

/// 20 steps single-process on the whole batches and over the ranks on this rank's rows: the
/// model expert-parallel, or (`expert_parallel` false) replicated on every rank (pure data
/// parallelism); returns the distributed model, its variables and trainer, after checking the
/// losses.
fn train_both(
    comm: &Arc<dyn Communicator>,
    cfg: &ModelConfig,
    tcfg: &TrainConfig,
    expert_parallel: bool,
) -> (CausalLm, VarMap, Trainer) {
    let (w, rank) = (comm.size(), comm.rank());
    let dev = Device::Cpu;
    let vm_sp = VarMap::new();
    let sp = CausalLm::new(cfg, VarBuilder::from_varmap(&vm_sp, DType::F32, &dev)).unwrap();
    init::reseed_varmap(&vm_sp, 5).unwrap();
    let vm_ep = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm_ep, DType::F32, &dev);
    let ep = if expert_parallel {
        CausalLm::new_expert_parallel(cfg, vb, comm.clone()).unwrap()
    } else {
        CausalLm::new(cfg, vb).unwrap()
    };
    init::copy_vars(&vm_ep, &vm_sp).unwrap();
    assert!(ep.is_expert_parallel() == expert_parallel && !sp.is_expert_parallel());
    let experts = cfg.moe.num_experts / w;
    let sharded = if expert_parallel { experts * 3 } else { 0 };
    assert_eq!(ep.sharded_parameters().len(), cfg.num_layers * sharded);

    let mut t_sp = Trainer::for_model(&vm_sp, tcfg.clone(), &cfg.moe).unwrap();
    t_sp.track_selection_biases(&sp.selection_biases()).unwrap();
    t_sp.run(
        |rng| loss_parts(&sp, &batch(rng, 0..BATCH)),
        || Ok(0.0),
        |_| Ok(()),
    )
    .unwrap();

    let mut t_ep = Trainer::for_model(&vm_ep, tcfg.clone(), &cfg.moe)
        .unwrap()
        .with_comm(comm.clone(), &ep.sharded_parameters())
        .unwrap();
    t_ep.track_selection_biases(&ep.selection_biases()).unwrap();
    let per = BATCH / w;
    let mine = rank * per..(rank + 1) * per;
    t_ep.run(
        |rng| loss_parts(&ep, &batch(rng, mine.clone())),
        || Ok(0.0),
        |_| Ok(()),
    )
    .unwrap();

    let (a, b) = (&t_sp.state.history, &t_ep.state.history);
    assert_eq!((a.len(), b.len()), (20, 20));
    // A replicated model's load-balancing loss is each rank's own (the mean is logged): its
    // coefficient is 0 in that run, the other fields must agree.
    let lb = |s: &StepStats| {
        if expert_parallel {
            s.load_balancing
        } else {
            0.0
        }
    };
    let field = |s: &StepStats| [s.loss, s.task, lb(s), s.z_loss, s.grad_norm];
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(!x.skipped && !y.skipped, "step {i} skipped");
        for (u, v) in field(x).iter().zip(field(y)) {
            let d = (u - v).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-4,
                "rank {rank}/{w} step {i}: {x:?}\nvs single-process {y:?}"
            );
        }
        assert_eq!(x.layers.len(), y.layers.len());
        for (l, m) in x.layers.iter().zip(&y.layers).filter(|_| expert_parallel) {
            assert_eq!(
                (l.tokens, &l.expert_counts, l.dropped),
                (m.tokens, &m.expert_counts, m.dropped)
            );
        }
    }
    assert!(a[19].task < a[0].task, "the loss did not fall");
    for ((_, bs), (_, be)) in sp.selection_biases().iter().zip(ep.selection_biases()) {
        assert!(max_abs_diff(bs, &be) < 1e-5, "selection biases differ");
    }
    eprintln!(
        "rank {rank}/{w} ({}): 20 steps, task loss {:.4} -> {:.4}, worst difference {worst:.2e}",
        if expert_parallel {
            "expert-parallel"
        } else {
            "replicated"
        },
        a[0].task,
        a[19].task
    );
    (ep, vm_ep, t_ep)
}

/// The checkpoint of the expert-parallel run, written by rank 0 alone, loads in one process
/// as a plain model (every expert, `SparseMoe` layers) with the same logits on every rank's
/// rows, and its optimizer state resumes a single-process trainer.
fn check_checkpoint(comm: &Arc<dyn Communicator>, ep: &CausalLm, t_ep: &Trainer, dir: &Path) {
    let (w, rank) = (comm.size(), comm.rank());
    let files = match ep.gathered().unwrap() {
        Some(full) => {
            assert_eq!(rank, 0, "a rank other than 0 got the gathered model");
            full.checkpoint_files(None, dir).unwrap()
        }
        None => vec![],
    };
    checkpoint::save(dir, files, t_ep).unwrap();
    let (loaded, vm) = CausalLm::load(dir, DType::F32, &Device::Cpu).unwrap();
    assert!(loaded.comm().is_none());
    assert!(loaded
        .layers()
        .iter()
        .all(|b| matches!(b.feed_forward(), FeedForward::Sparse(_))));
    let mut rng = common::Rng::new(33);
    let ids: Vec<u32> = (0..BATCH * LEN)
        .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
        .collect();
    let all = Tensor::from_vec(ids, (BATCH, LEN), &Device::Cpu).unwrap();
    let per = BATCH / w;
    let mine = all.narrow(0, rank * per, per).unwrap();
    let ep_out = ep.forward(&mine).unwrap();
    let sp_out = loaded.forward(&all).unwrap();
    let d = max_abs_diff(
        &ep_out.logits,
        &sp_out.logits.narrow(0, rank * per, per).unwrap(),
    );
    assert!(d < 1e-5, "rank {rank}: logits differ by {d}");
    let dl = (ep_out.load_balancing_loss.to_scalar::<f32>().unwrap()
        - sp_out.load_balancing_loss.to_scalar::<f32>().unwrap())
    .abs();
    assert!(
        dl < 1e-5,
        "rank {rank}: load-balancing loss differs by {dl}"
    );
    let cfg = loaded.config().clone();
    let mut t = Trainer::for_model(&vm, train_config(0.0), &cfg.moe).unwrap();
    checkpoint::resume(&mut t, dir).unwrap();
    assert_eq!(t.state.step, t_ep.state.step);
    // This rank's expert moments, as the single-process trainer restored them.
    let restored = t.optimizer().state_tensors();
    let own = t_ep.optimizer().state_tensors();
    for (name, _) in ep.sharded_parameters() {
        let key = format!("{name}.m");
        assert!(
            max_abs_diff(&restored[&key], &own[&key]) == 0.0,
            "{key} differs"
        );
    }
    comm.barrier().unwrap();
    eprintln!("rank {rank}/{w}: checkpoint loads in one process, logits differ by {d:.2e}");
}

#[test]
fn mpi_worker_lm() {
    let comm = world();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let dir = match std::env::var_os(DIR_ENV) {
            Some(d) => PathBuf::from(d),
            None => std::env::temp_dir().join(format!("candle_moe_ep_lm_{}", std::process::id())),
        };
        // Dropless with the load-balancing loss; then capacity 1.0 and the aux-free bias.
        let cfg = config(None, false);
        let (ep, vm, t_ep) = train_both(&comm, &cfg, &train_config(0.0), true);
        check_checkpoint(&comm, &ep, &t_ep, &dir);
        // Misuse refused: saving a rank's shard directly, and (several ranks) its experts
        // passed as replicated parameters (reduced by position, they would mix experts).
        let e = ep.checkpoint_files(None, &dir).unwrap_err().to_string();
        assert!(e.contains("gathered()"), "{e}");
        if comm.size() > 1 {
            let t = Trainer::for_model(&vm, train_config(0.0), &cfg.moe).unwrap();
            let e = t.with_comm(comm.clone(), &[]).unwrap_err().to_string();
            assert!(e.contains("replicated parameters differ"), "{e}");
        }
        train_both(&comm, &config(Some(1.0), true), &train_config(1e-2), true);
        // Pure data parallelism through the same trainer: dropless (capacity is per forward),
        // the aux-free bias from counts summed over the ranks, no load-balancing loss (a
        // rank's is not a share of the union's).
        let mut dp = config(None, true);
        dp.moe.router_aux_loss_coef = 0.0;
        train_both(&comm, &dp, &train_config(1e-2), false);
        if !under_mpi() {
            std::fs::remove_dir_all(&dir).ok();
        }
        comm.barrier().unwrap();
        // One write, so that the ranks' lines do not interleave.
        let line = format!("ep lm: rank {} of {} passed\n", comm.rank(), comm.size());
        eprint!("{line}");
    }));
    if r.is_err() && under_mpi() {
        eprintln!("rank {} failed; aborting the job", comm.rank());
        std::process::exit(1);
    }
    if let Err(p) = r {
        std::panic::resume_unwind(p)
    }
}
