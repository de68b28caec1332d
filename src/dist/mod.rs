//! Distributed execution: a communicator abstraction and expert parallelism on top of it.
//!
//! [`Communicator`] is the handful of collectives expert parallelism needs (rank, size,
//! all-to-all-v of f32 rows, all-reduce sums, barrier). [`LocalComm`] is the single-process
//! backend (one rank: every collective is the identity); with the cargo feature `mpi`,
//! `MpiComm` runs them over MPI (rsmpi over the system's Open MPI); with the feature `nccl`,
//! `NcclComm` runs them over NCCL on CUDA devices. [`TimedComm`] wraps any communicator and
//! times its collectives ([`CommTimes`]). The expert-parallel layer
//! ([`ExpertParallelMoe`]) shards a sparse layer's experts over the ranks and moves token rows
//! with two differentiable all-to-alls ([`all_to_all`]); [`gather`] assembles the sharded
//! experts on rank 0 (checkpoints) and pools a model's aux losses over the ranks. See
//! `docs/expert_parallel.md`.

use std::fmt::Debug;

use candle_core::Result;

pub mod all_to_all;
pub mod expert_parallel;
pub mod gather;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod plan;
mod timed;

pub use all_to_all::all_to_all_rows;
pub use expert_parallel::ExpertParallelMoe;
pub use gather::{expert_id, gather_experts, global_pooled_aux_losses, with_expert_id};
#[cfg(feature = "mpi")]
pub use mpi::MpiComm;
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NCCL_ID_BYTES};
pub use timed::{CommTimes, OpTimes, TimedComm};

/// The collectives of a group of `size()` ranks. Every rank must call the same collectives in
/// the same order (as with MPI); a backend reports a peer that never arrives as an error or
/// ends the job (see the backend), never by waiting forever.
pub trait Communicator: Debug + Send + Sync {
    /// This process's rank in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// All-to-all with variable counts: `send` holds `send_counts[d]` values for rank `d`, in
    /// rank order. The counts are exchanged first; returns the values received, in source-rank
    /// order, and how many came from each rank.
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)>;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the ranks of counts, in place.
    fn all_reduce_sum_u64(&self, values: &mut [u64]) -> Result<()>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
}

/// The single-process backend: one rank, every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalComm;

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        check_counts("all_to_all_v", send.len(), send_counts, 1)?;
        Ok((send.to_vec(), send_counts.to_vec()))
    }
    fn all_reduce_sum_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_u64(&self, _values: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Checks that `counts` has one entry per rank and sums to the buffer length.
pub(crate) fn check_counts(op: &str, len: usize, counts: &[usize], size: usize) -> Result<()> {
    if counts.len() != size {
        candle_core::bail!(
            "{op}: {} send counts for a world of {size} ranks",
            counts.len()
        )
    }
    let total: usize = counts.iter().sum();
    if total != len {
        candle_core::bail!("{op}: send counts sum to {total} but the buffer holds {len} values")
    }
    Ok(())
}

/// Data parallelism for the replicated parameters: sums (or, with `average`, averages) the
/// gradients of `params` over the ranks, in place, with one all-reduce of all of them
/// concatenated. A parameter without a gradient on this rank contributes zeros (and then
/// receives the others' sum), so every rank sends the same sizes. Pass only replicated
/// parameters (router, shared expert, attention, embeddings, norms), never a rank's own experts.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    grads: &mut candle_core::backprop::GradStore,
    params: &[candle_core::Tensor],
    average: bool,
) -> Result<()> {
    let mut flat: Vec<f32> = Vec::new();
    for p in params {
        match grads.get(p) {
            Some(g) => flat.extend(
                g.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => flat.extend(std::iter::repeat_n(0f32, p.elem_count())),
        }
    }
    comm.all_reduce_sum_f32(&mut flat)?;
    let scale = if average {
        1.0 / comm.size() as f32
    } else {
        1.0
    };
    let mut at = 0;
    for p in params {
        let n = p.elem_count();
        let g: Vec<f32> = flat[at..at + n].iter().map(|v| v * scale).collect();
        at += n;
        let g = candle_core::Tensor::from_vec(g, p.shape(), p.device())?.to_dtype(p.dtype())?;
        grads.insert(p, g);
    }
    Ok(())
}
