//! The NCCL backend (cargo feature `nccl`): cudarc's NCCL bindings through candle's `nccl`
//! feature, one communicator rank per GPU.
//!
//! NCCL has no all-to-all-v: [`NcclComm::all_to_all_v`] first exchanges the per-destination
//! counts (an `ncclAllGather` of every rank's count row), then runs one NCCL group
//! (`ncclGroupStart` … `ncclGroupEnd`) of one `ncclSend` and one `ncclRecv` per peer (itself
//! included), as the NCCL documentation describes all-to-all. All-reduce is `ncclAllReduce`
//! (sum); NCCL has no barrier, so [`NcclComm::barrier`] is an all-reduce of one value.
//!
//! The [`Communicator`] methods take host slices: the values are copied to device buffers on the
//! communicator's stream (the candle device's stream, so the order with candle's kernels is
//! kept), exchanged there, and copied back. That is a host round trip per collective; keeping the
//! rows on the device needs tensor-level collectives (see `docs/expert_parallel.md`).
//!
//! Every collective waits for its stream against a deadline (`CANDLE_MOE_NCCL_TIMEOUT_S`,
//! default [`DEFAULT_TIMEOUT_S`]): past it, the call returns an error naming the collective, and
//! the communicator must not be used again (an NCCL collective cannot be cancelled; NCCL's own
//! `NCCL_TIMEOUT`-style watchdogs belong to the launcher).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc;
use candle_core::{bail, Device, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};

use super::{check_counts, Communicator};

/// Seconds a collective may wait for its peers when `CANDLE_MOE_NCCL_TIMEOUT_S` is unset.
pub const DEFAULT_TIMEOUT_S: u64 = 120;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// One rank of an NCCL communicator on one CUDA device.
pub struct NcclComm {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: the NCCL communicator handle is only used through the mutex, so no two threads call
// NCCL on it at once (NCCL allows a communicator to be used from any thread, one at a time);
// the stream is `Send + Sync` in cudarc, `rank`, `size` and `timeout` are plain values.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NcclComm: {what} failed: {e:?}"))
}

impl NcclComm {
    /// A fresh NCCL unique id (`ncclGetUniqueId`): create it on one process (rank 0) and hand
    /// the same bytes to every rank's [`NcclComm::new`] (a file, the launcher's environment, or
    /// an MPI broadcast).
    pub fn unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Joins the communicator of `size` ranks named by `id` as rank `rank`, on the CUDA device
    /// `device` (its stream carries the collectives). A collective: every rank calls it with
    /// the same `id` and `size`, each with its own rank and device. The collective deadline is
    /// `CANDLE_MOE_NCCL_TIMEOUT_S` seconds (default [`DEFAULT_TIMEOUT_S`]).
    pub fn new(
        device: &Device,
        rank: usize,
        size: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        if rank >= size {
            bail!("NcclComm::new: rank {rank} is not below the world size {size}")
        }
        let Device::Cuda(dev) = device else {
            bail!("NcclComm::new: needs a CUDA device, got {device:?}")
        };
        let timeout = match std::env::var("CANDLE_MOE_NCCL_TIMEOUT_S") {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(s) if s > 0 => Duration::from_secs(s),
                _ => bail!("CANDLE_MOE_NCCL_TIMEOUT_S = {v:?} is not a positive number of seconds"),
            },
            Err(_) => Duration::from_secs(DEFAULT_TIMEOUT_S),
        };
        let stream = dev.cuda_stream();
        // `ncclCommInitRank` takes the device from the calling thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the CUDA context", e))?;
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, size, id)
            .map_err(|e| nccl_err(&format!("ncclCommInitRank (rank {rank} of {size})"), e))?;
        Ok(Self {
            comm: Mutex::new(comm),
            stream,
            rank,
            size,
            timeout,
        })
    }

    /// The deadline of one collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The communicator, locked, with its device's context current on this thread (a
    /// collective may run on another thread than the one that created the communicator).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
        let comm = self.comm.lock().map_err(|_| {
            candle_core::Error::Msg("NcclComm: a thread panicked inside NCCL".into())
        })?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the CUDA context", e))?;
        Ok(comm)
    }

    /// A device buffer holding `values` (at least one element: CUDA allocations are non-empty).
    fn upload<T: DeviceRepr + ValidAsZeroBits + Copy>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        let mut buf = self
            .stream
            .alloc_zeros::<T>(values.len().max(1))
            .map_err(|e| nccl_err("device allocation", e))?;
        if !values.is_empty() {
            self.stream
                .memcpy_htod(values, &mut buf)
                .map_err(|e| nccl_err("host-to-device copy", e))?;
        }
        Ok(buf)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| nccl_err("device allocation", e))
    }

    /// Waits until the stream has run everything enqueued so far, polling an event against the
    /// deadline (a peer that never arrives leaves the stream busy forever).
    fn wait(&self, what: &str) -> Result<()> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| nccl_err("event record", e))?;
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            match event.is_complete() {
                true => return Ok(()),
                false if start.elapsed() > self.timeout => bail!(
                    "NcclComm: rank {} of {}: {what} did not complete within {:?} (a peer rank died, is stuck or called a different collective); the communicator is unusable",
                    self.rank,
                    self.size,
                    self.timeout
                ),
                false => {}
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Copies `buf[..n]` back to the host (after [`Self::wait`]).
    fn download<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.stream
                .memcpy_dtoh(&buf.slice(..n), &mut out[..])
                .map_err(|e| nccl_err("device-to-host copy", e))?;
        }
        Ok(out)
    }

    fn all_reduce_sum<T>(&self, values: &mut [T], what: &str) -> Result<()>
    where
        T: DeviceRepr + ValidAsZeroBits + NcclType + Copy + Default,
    {
        if values.is_empty() {
            return Ok(());
        }
        let comm = self.lock()?;
        let mut buf = self.upload(values)?;
        comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| nccl_err(what, e))?;
        self.wait(what)?;
        let out = self.download(&buf, values.len())?;
        values.copy_from_slice(&out);
        Ok(())
    }
}

/// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`; the group is closed also when `f` fails.
fn grouped(f: impl FnOnce() -> Result<()>) -> Result<()> {
    group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
    let r = f();
    let end = group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
    r.and(end.map(|_| ()))
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        check_counts("all_to_all_v", send.len(), send_counts, self.size)?;
        let (w, rank) = (self.size, self.rank);
        let comm = self.lock()?;
        // The counts first: every rank's row of send counts, gathered (W × W, row = source).
        let mine: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let counts_dev = self.upload(&mine)?;
        let mut table_dev = self.zeros::<u64>(w * w)?;
        comm.all_gather(&counts_dev, &mut table_dev)
            .map_err(|e| nccl_err("all_to_all_v (counts: ncclAllGather)", e))?;
        self.wait("all_to_all_v (counts)")?;
        let table = self.download(&table_dev, w * w)?;
        let recv_counts: Vec<usize> = (0..w).map(|s| table[s * w + rank] as usize).collect();
        if table[rank * w..(rank + 1) * w] != mine[..] {
            bail!("all_to_all_v: the gathered count table does not hold this rank's counts")
        }

        // The rows: one send and one receive per peer with a non-zero count, in one group.
        let total: usize = recv_counts.iter().sum();
        let send_dev = self.upload(send)?;
        let mut recv_dev = self.zeros::<f32>(total)?;
        let (mut s_at, mut r_at) = (0usize, 0usize);
        grouped(|| {
            for peer in 0..w {
                let (sc, rc) = (send_counts[peer], recv_counts[peer]);
                if sc > 0 {
                    comm.send(&send_dev.slice(s_at..s_at + sc), peer as i32)
                        .map_err(|e| nccl_err(&format!("all_to_all_v (ncclSend to {peer})"), e))?;
                }
                if rc > 0 {
                    comm.recv(&mut recv_dev.slice_mut(r_at..r_at + rc), peer as i32)
                        .map_err(|e| {
                            nccl_err(&format!("all_to_all_v (ncclRecv from {peer})"), e)
                        })?;
                }
                s_at += sc;
                r_at += rc;
            }
            Ok(())
        })?;
        self.wait("all_to_all_v (rows)")?;
        Ok((self.download(&recv_dev, total)?, recv_counts))
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(values, "all_reduce_sum_f32 (ncclAllReduce)")
    }
    fn all_reduce_sum_u64(&self, values: &mut [u64]) -> Result<()> {
        self.all_reduce_sum(values, "all_reduce_sum_u64 (ncclAllReduce)")
    }
    fn barrier(&self) -> Result<()> {
        let mut one = [1u64];
        self.all_reduce_sum(&mut one, "barrier (ncclAllReduce of one value)")?;
        if one[0] != self.size as u64 {
            bail!(
                "NcclComm: barrier counted {} ranks, expected {}",
                one[0],
                self.size
            )
        }
        Ok(())
    }
}
