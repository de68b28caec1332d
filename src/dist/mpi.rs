//! The MPI backend (cargo feature `mpi`): rsmpi over the system's MPI (Open MPI on CPU).
//!
//! Collectives are started non-blocking and polled against a deadline, so a peer that never
//! arrives cannot hang the job: when the deadline passes, the rank prints which collective timed
//! out and aborts the whole job (`MPI_Abort`; an MPI collective cannot be cancelled, so the
//! communicator is unusable afterwards). A rank that dies is handled by Open MPI itself:
//! `mpirun` notices the process exit and terminates the other ranks (its default), and
//! `mpirun` exits non-zero naming the rank that failed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

use super::{check_counts, Communicator};

/// Seconds a collective may wait for its peers when `CANDLE_MOE_MPI_TIMEOUT_S` is unset.
pub const DEFAULT_TIMEOUT_S: u64 = 120;

/// The world communicator of an MPI job (one per process: it initialises MPI when created and
/// finalises it when dropped).
pub struct MpiComm {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

struct Inner {
    // Field order is drop order: the communicator before the universe (which finalises MPI).
    world: SimpleCommunicator,
    _universe: Universe,
}

// SAFETY: MPI is initialised with (at least) `MPI_THREAD_SERIALIZED` and every call goes through
// the mutex, so no two threads ever call into MPI at once.
unsafe impl Send for MpiComm {}
// SAFETY: as above; `rank`, `size` and `timeout` are plain values.
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl MpiComm {
    /// Initialises MPI and returns the world communicator. The collective deadline is
    /// `CANDLE_MOE_MPI_TIMEOUT_S` seconds (default [`DEFAULT_TIMEOUT_S`]). Errors when MPI is
    /// already initialised in this process or cannot serialise calls from several threads.
    pub fn init() -> Result<Self> {
        let timeout = match std::env::var("CANDLE_MOE_MPI_TIMEOUT_S") {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(s) if s > 0 => Duration::from_secs(s),
                _ => bail!("CANDLE_MOE_MPI_TIMEOUT_S = {v:?} is not a positive number of seconds"),
            },
            Err(_) => Duration::from_secs(DEFAULT_TIMEOUT_S),
        };
        let Some((universe, threading)) =
            mpi::initialize_with_threading(mpi::Threading::Serialized)
        else {
            bail!("MpiComm::init: MPI is already initialised in this process")
        };
        if threading < mpi::Threading::Serialized {
            bail!("MpiComm::init: the MPI library provides only {threading:?} threading; Serialized is needed")
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            inner: Mutex::new(Inner {
                world,
                _universe: universe,
            }),
            rank,
            size,
            timeout,
        })
    }

    /// The deadline of one collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| candle_core::Error::Msg("MpiComm: a thread panicked inside MPI".into()))
    }
}

/// Polls `req` until it completes; past `timeout` prints what timed out and aborts the job.
fn wait<'a, R: ?Sized, S: Scope<'a>>(
    mut req: Request<'a, R, S>,
    world: &SimpleCommunicator,
    op: &str,
    timeout: Duration,
) {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        if start.elapsed() > timeout {
            eprintln!(
                "candle-moe MpiComm: rank {} of {}: {op} did not complete within {:?} (a peer rank died, is stuck or called a different collective); aborting the job",
                world.rank(),
                world.size(),
                timeout
            );
            world.abort(75)
        }
        spins += 1;
        if spins > 1000 {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            std::thread::yield_now();
        }
    }
}

fn to_count(n: usize, what: &str) -> Result<Count> {
    match Count::try_from(n) {
        Ok(c) => Ok(c),
        Err(_) => bail!("MpiComm: {what} = {n} exceeds MPI's 32-bit count"),
    }
}

fn displs(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

impl MpiComm {
    /// Element-wise sum of `values` over the ranks, in place (`what` names the call in a
    /// timeout message).
    fn all_reduce_sum<T: mpi::datatype::Equivalence + Clone>(
        &self,
        values: &mut [T],
        what: &str,
    ) -> Result<()> {
        let inner = self.lock()?;
        let world = &inner.world;
        let send = values.to_vec();
        mpi::request::scope(|scope| {
            let req =
                world.immediate_all_reduce_into(scope, &send[..], values, SystemOperation::sum());
            wait(req, world, what, self.timeout)
        });
        Ok(())
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        check_counts("all_to_all_v", send.len(), send_counts, self.size)?;
        let sc: Vec<Count> = send_counts
            .iter()
            .map(|&c| to_count(c, "send count"))
            .collect::<Result<_>>()?;
        let inner = self.lock()?;
        let world = &inner.world;
        // The counts first, so every rank can size its receive buffer.
        let mut rc: Vec<Count> = vec![0; self.size];
        mpi::request::scope(|scope| {
            let req = world.immediate_all_to_all_into(scope, &sc[..], &mut rc[..]);
            wait(req, world, "all_to_all_v (counts)", self.timeout)
        });
        if rc.iter().any(|&c| c < 0) {
            bail!("all_to_all_v: received a negative count {rc:?}")
        }
        let total: usize = rc.iter().map(|&c| c as usize).sum();
        let mut recv = vec![0f32; total];
        let (sd, rd) = (displs(&sc), displs(&rc));
        {
            let send_part = Partition::new(send, &sc[..], &sd[..]);
            let mut recv_part = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
            mpi::request::scope(|scope| {
                let req =
                    world.immediate_all_to_all_varcount_into(scope, &send_part, &mut recv_part);
                wait(req, world, "all_to_all_v (rows)", self.timeout)
            });
        }
        Ok((recv, rc.iter().map(|&c| c as usize).collect()))
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(values, "all_reduce_sum_f32")
    }
    fn all_reduce_sum_u64(&self, values: &mut [u64]) -> Result<()> {
        self.all_reduce_sum(values, "all_reduce_sum_u64")
    }
    fn barrier(&self) -> Result<()> {
        let inner = self.lock()?;
        let world = &inner.world;
        let req = world.immediate_barrier();
        wait(req, world, "barrier", self.timeout);
        Ok(())
    }
}
