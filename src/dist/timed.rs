//! A communicator wrapper that times every collective of the communicator it wraps:
//! [`TimedComm`] forwards each call and adds its wall time, call count and bytes to a
//! [`CommTimes`] counter, read with [`TimedComm::times`] and reset with [`TimedComm::reset`].
//! The bench (`route_bench --expert-parallel`) wraps its `MpiComm` in one to report the share of
//! a layer's time spent in the all-to-alls and all-reduces.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Result;

use super::Communicator;

/// Cumulative time, calls and bytes of one kind of collective.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTimes {
    /// Wall time spent inside the calls (on this rank: waiting for peers included).
    pub time: Duration,
    /// Number of calls.
    pub calls: u64,
    /// Bytes this rank sent to other ranks (for an all-to-all, excluding the values it sends to
    /// itself; for an all-reduce, the size of the buffer).
    pub bytes: u64,
}

impl OpTimes {
    fn add(&mut self, t: Duration, bytes: u64) {
        self.time += t;
        self.calls += 1;
        self.bytes += bytes;
    }
}

/// Cumulative timings of a [`TimedComm`]'s collectives since its creation or last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommTimes {
    /// `all_to_all_v` (the count exchange included).
    pub all_to_all: OpTimes,
    /// `all_reduce_sum_f32` and `all_reduce_sum_u64`.
    pub all_reduce: OpTimes,
    /// `barrier`.
    pub barrier: OpTimes,
}

impl CommTimes {
    /// Time in all collectives together.
    pub fn total(&self) -> Duration {
        self.all_to_all.time + self.all_reduce.time + self.barrier.time
    }
}

/// Wraps a communicator and times its collectives (see the module doc). Behaves exactly as the
/// wrapped communicator otherwise: same rank, size, results and errors.
#[derive(Debug)]
pub struct TimedComm {
    inner: Arc<dyn Communicator>,
    times: Mutex<CommTimes>,
}

impl TimedComm {
    /// Wraps `inner`, with zeroed counters.
    pub fn new(inner: Arc<dyn Communicator>) -> Self {
        Self {
            inner,
            times: Mutex::new(CommTimes::default()),
        }
    }

    /// The wrapped communicator.
    pub fn inner(&self) -> &Arc<dyn Communicator> {
        &self.inner
    }

    /// The counters since creation or the last [`Self::reset`].
    pub fn times(&self) -> CommTimes {
        match self.times.lock() {
            Ok(t) => *t,
            Err(p) => *p.into_inner(),
        }
    }

    /// Zeroes the counters and returns what they held.
    pub fn reset(&self) -> CommTimes {
        let mut t = match self.times.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        std::mem::take(&mut *t)
    }

    fn record(&self, pick: fn(&mut CommTimes) -> &mut OpTimes, start: Instant, bytes: u64) {
        let t = start.elapsed();
        let mut g = match self.times.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        pick(&mut g).add(t, bytes);
    }
}

impl Communicator for TimedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        let start = Instant::now();
        let out = self.inner.all_to_all_v(send, send_counts)?;
        let own = send_counts.get(self.rank()).copied().unwrap_or(0);
        let remote = (send.len().saturating_sub(own) * 4) as u64;
        self.record(|t| &mut t.all_to_all, start, remote);
        Ok(out)
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        self.inner.all_reduce_sum_f32(values)?;
        self.record(|t| &mut t.all_reduce, start, (values.len() * 4) as u64);
        Ok(())
    }
    fn all_reduce_sum_u64(&self, values: &mut [u64]) -> Result<()> {
        let start = Instant::now();
        self.inner.all_reduce_sum_u64(values)?;
        self.record(|t| &mut t.all_reduce, start, (values.len() * 8) as u64);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let start = Instant::now();
        self.inner.barrier()?;
        self.record(|t| &mut t.barrier, start, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalComm;

    #[test]
    fn counts_calls_and_remote_bytes_and_resets() -> Result<()> {
        let c = TimedComm::new(Arc::new(LocalComm));
        let (got, counts) = c.all_to_all_v(&[1.0, 2.0, 3.0], &[3])?;
        assert_eq!((got, counts), (vec![1.0, 2.0, 3.0], vec![3]));
        let mut v = [1f32; 5];
        c.all_reduce_sum_f32(&mut v)?;
        let mut u = [1u64; 2];
        c.all_reduce_sum_u64(&mut u)?;
        c.barrier()?;
        let t = c.times();
        assert_eq!((t.all_to_all.calls, t.all_to_all.bytes), (1, 0)); // all to itself
        assert_eq!((t.all_reduce.calls, t.all_reduce.bytes), (2, 20 + 16));
        assert_eq!(t.barrier.calls, 1);
        assert_eq!(c.reset(), t);
        assert_eq!(c.times(), CommTimes::default());
        // Errors pass through unchanged and are not counted.
        assert!(c.all_to_all_v(&[1.0], &[2]).is_err());
        assert_eq!(c.times().all_to_all.calls, 0);
        Ok(())
    }
}
