//! The trainer over several ranks (a [`Communicator`] with more than one rank): data
//! parallelism for the replicated parameters, expert parallelism for the sharded ones.
//!
//! Loss convention: each rank's task loss is the mean over its own tokens, and the ranks hold
//! equal numbers of tokens, so the mean of the ranks' task losses is the task loss of the union
//! of their tokens. Each rank back-propagates `task / W + aux` (expert-parallel model: its aux
//! losses already have the value over the union, each rank's gradient being its share) or
//! `(task + aux) / W` (replicated model: per-rank aux losses, their mean is optimised); then
//! the replicated parameters' gradients are summed over the ranks (one all-reduce), and each
//! expert's gradient, which the all-to-all backward already summed over the ranks' tokens on
//! the expert's owner, is kept. The result is the single-process gradient of the loss over the
//! union. The gradient norm for clipping sums the squares of the replicated gradients once and
//! of every rank's experts (one all-reduce, which also averages the logged losses and carries a
//! non-finite loss of any rank into every rank's norm), so the skip and clip decisions are the
//! same on every rank; whether the update leaves every parameter finite is agreed by one more
//! all-reduce. The selection-bias update reads global expert loads (summed over the ranks for
//! a replicated model).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId};

use super::{StepStats, Trainer};
use crate::dist::{gather_experts, Communicator};
use crate::error::{Error, Result};
use crate::ops::HostRead;

/// The distributed side of a trainer: its communicator and the parameters only this rank
/// holds.
#[derive(Debug, Clone)]
pub(super) struct Parallel {
    pub comm: Arc<dyn Communicator>,
    pub sharded: HashSet<TensorId>,
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            comm: Arc::new(crate::dist::LocalComm),
            sharded: HashSet::new(),
        }
    }
}

impl Trainer {
    /// Trains over the ranks of `comm` (the default is one rank, [`crate::dist::LocalComm`]:
    /// single-process training). `sharded` are the parameters only this rank holds (an
    /// expert-parallel model's experts, [`crate::CausalLm::sharded_parameters`]), each a
    /// variable the trainer optimises. With any, the model is taken as expert-parallel: its aux
    /// losses and routing counts are global; with none, as replicated on every rank (pure data
    /// parallelism): per-rank aux losses (their mean is optimised) and counts (summed for the
    /// selection-bias update). Over several ranks it is a collective (one all-reduce checks that
    /// every rank holds the same replicated parameters, which are reduced by position: an
    /// expert-parallel model's experts passed as replicated are refused). Every rank must take
    /// equally many tokens per step; each rank's task
    /// loss is the mean over its own tokens, and the trainer then optimises the single-process
    /// loss over the union of the ranks' tokens (`docs/expert_parallel.md`, Training).
    /// Global-batch balancing is refused over several ranks.
    pub fn set_comm(
        &mut self,
        comm: Arc<dyn Communicator>,
        sharded: &[(String, Tensor)],
    ) -> Result<()> {
        if comm.size() > 1 && self.cfg.global_batch_balance {
            return Err(Error::Config(
                "train: global_batch_balance is not supported over several ranks".into(),
            ));
        }
        let vars: HashSet<TensorId> = self.opt.vars().map(|v| v.as_tensor().id()).collect();
        let mut ids = HashSet::new();
        for (name, t) in sharded {
            if !vars.contains(&t.id()) {
                return Err(Error::Config(format!(
                    "train: the sharded parameter `{name}` is not a variable the trainer optimises"
                )));
            }
            ids.insert(t.id());
        }
        if comm.size() > 1 {
            check_replicated_alike(comm.as_ref(), self.opt.named_vars(), &ids)?;
        }
        self.parallel = Parallel { comm, sharded: ids };
        Ok(())
    }

    /// [`Self::set_comm`], by value (a collective over several ranks, as `set_comm`).
    pub fn with_comm(
        mut self,
        comm: Arc<dyn Communicator>,
        sharded: &[(String, Tensor)],
    ) -> Result<Self> {
        self.set_comm(comm, sharded)?;
        Ok(self)
    }

    /// The communicator the trainer reduces over.
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.parallel.comm
    }

    /// Whether the trainer's model is expert-parallel (some parameters are this rank's only).
    fn expert_parallel(&self) -> bool {
        !self.parallel.sharded.is_empty()
    }

    /// What one micro-batch back-propagates over several ranks: `task / W + Σ terms`
    /// (expert-parallel) or `total / W` (replicated).
    pub(super) fn parallel_target(
        &self,
        task: &Tensor,
        total: &Tensor,
        terms: &[Tensor],
    ) -> Result<Tensor> {
        let inv = 1.0 / self.parallel.comm.size() as f64;
        if !self.expert_parallel() {
            return Ok((total * inv)?);
        }
        let mut t = (task * inv)?;
        for x in terms {
            t = (t + x)?;
        }
        Ok(t)
    }

    /// Over several ranks: sums the replicated gradients over the ranks (a parameter without
    /// a gradient on every rank keeps none), forms the global gradient norm (`NaN` when any
    /// rank's loss was not finite) and averages the logged losses of `stats` over the ranks.
    pub(super) fn reduce_parallel(
        &self,
        grads: Option<GradStore>,
        finite: bool,
        stats: &mut StepStats,
    ) -> Result<(GradStore, f64)> {
        let comm = &self.parallel.comm;
        let Some(mut g) = grads else {
            return Err(Error::Training(
                "train: no gradients to reduce over the ranks".into(),
            ));
        };
        let replicated: Vec<&candle_core::Var> = self
            .opt
            .vars()
            .filter(|v| !self.parallel.sharded.contains(&v.as_tensor().id()))
            .collect();
        let mut present: Vec<u64> = replicated
            .iter()
            .map(|v| g.get(v.as_tensor()).is_some() as u64)
            .collect();
        comm.all_reduce_sum_u64(&mut present)?;
        let params: Vec<Tensor> = replicated.iter().map(|v| v.as_tensor().clone()).collect();
        crate::dist::all_reduce_grads(comm.as_ref(), &mut g, &params, false)?;
        for (p, &c) in params.iter().zip(&present) {
            if c == 0 {
                g.remove(p);
            }
        }
        // The squared norms of the replicated and of this rank's sharded gradients, summed on
        // the device and read in one transfer.
        let mut parts: [Option<Tensor>; 2] = [None, None];
        for v in self.opt.vars() {
            if let Some(x) = g.get(v.as_tensor()) {
                let i = self.parallel.sharded.contains(&v.as_tensor().id()) as usize;
                let s = x.to_dtype(DType::F64)?.sqr()?.sum_all()?;
                parts[i] = Some(match parts[i].take() {
                    Some(a) => (a + s)?,
                    None => s,
                });
            }
        }
        let dev = vars_device(&params, self.opt.vars().next());
        let parts = parts
            .into_iter()
            .map(|p| match p {
                Some(t) => t.reshape(1),
                None => Tensor::zeros(1, DType::F64, &dev),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let sq = Tensor::cat(&parts, 0)?.host_vec1::<f64>()?;
        let (sq_repl, sq_sharded) = (sq[0], sq[1]);
        // One all-reduce: the norm's parts (the replicated squares once, from rank 0) and the
        // logged values to average.
        let mut norm_part = sq_sharded;
        if comm.rank() == 0 {
            norm_part += sq_repl;
        }
        if !finite {
            norm_part = f64::NAN;
        }
        let logged = [
            norm_part,
            stats.loss,
            stats.task,
            stats.load_balancing,
            stats.z_loss,
            stats.seq_aux,
            stats.importance,
            stats.load,
            stats.imbalance,
        ];
        let mut v: Vec<f32> = logged.iter().map(|&x| x as f32).collect();
        comm.all_reduce_sum_f32(&mut v)?;
        let w = comm.size() as f64;
        let mean = |i: usize| v[i] as f64 / w;
        (stats.loss, stats.task, stats.load_balancing, stats.z_loss) =
            (mean(1), mean(2), mean(3), mean(4));
        (stats.seq_aux, stats.importance, stats.load, stats.imbalance) =
            (mean(5), mean(6), mean(7), mean(8));
        Ok((g, (v[0] as f64).sqrt()))
    }

    /// The selection-bias loads of a step made global: summed over the ranks for a replicated
    /// model (an expert-parallel model's counts are global already).
    pub(super) fn global_bias_loads(
        &self,
        mut loads: Vec<Option<Vec<f64>>>,
    ) -> Result<Vec<Option<Vec<f64>>>> {
        if self.parallel.comm.size() == 1 || self.expert_parallel() {
            return Ok(loads);
        }
        let mut flat: Vec<u64> = loads
            .iter()
            .flatten()
            .flatten()
            .map(|&c| c as u64)
            .collect();
        self.parallel.comm.all_reduce_sum_u64(&mut flat)?;
        let mut it = flat.into_iter();
        for l in loads.iter_mut().flatten() {
            for c in l.iter_mut() {
                *c = it.next().unwrap_or(0) as f64;
            }
        }
        Ok(loads)
    }

    /// The optimizer moments a checkpoint holds: this process's, or over several ranks a
    /// collective that gathers every rank's expert moments to rank 0 (under their global
    /// names, as a single-process run names them); `None` on the other ranks.
    pub fn checkpoint_state_tensors(&self) -> Result<Option<HashMap<String, Tensor>>> {
        let mut all = self.opt.state_tensors();
        let comm = &self.parallel.comm;
        if comm.size() == 1 || !self.expert_parallel() {
            return Ok((comm.rank() == 0).then_some(all));
        }
        let mut local: Vec<(String, Tensor)> = Vec::new();
        for (name, v) in self.opt.named_vars() {
            if self.parallel.sharded.contains(&v.as_tensor().id()) {
                for s in ["m", "v"] {
                    let key = format!("{name}.{s}");
                    if let Some(t) = all.remove(&key) {
                        local.push((key, t));
                    }
                }
            }
        }
        let per: std::collections::BTreeSet<usize> = local
            .iter()
            .filter_map(|(n, _)| crate::dist::expert_id(n).map(|(i, _)| i))
            .collect();
        let experts = per.len() * comm.size();
        let Some(gathered) = gather_experts(comm, &local, experts)? else {
            return Ok(None);
        };
        all.extend(gathered);
        Ok(Some(all))
    }
}

/// Checks that every rank holds the same replicated variables (names and shapes, in the
/// optimizer's order): one all-reduce of a 32-bit hash of them.
fn check_replicated_alike<'a>(
    comm: &dyn Communicator,
    vars: impl Iterator<Item = (&'a str, &'a candle_core::Var)>,
    sharded: &HashSet<TensorId>,
) -> Result<()> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for (name, v) in vars.filter(|(_, v)| !sharded.contains(&v.as_tensor().id())) {
        for b in name.bytes().chain(format!("{:?};", v.dims()).into_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let h = h >> 32;
    let mut sum = [h];
    comm.all_reduce_sum_u64(&mut sum)?;
    if sum[0] != h * comm.size() as u64 {
        return Err(Error::Config(format!(
            "train: rank {} of {}: the ranks' replicated parameters differ (pass an expert-parallel model's own experts as `sharded`)",
            comm.rank(),
            comm.size()
        )));
    }
    Ok(())
}

/// The device of the trained variables (the CPU when there are none).
fn vars_device(params: &[Tensor], first: Option<&candle_core::Var>) -> candle_core::Device {
    params
        .first()
        .map(|p| p.device().clone())
        .or_else(|| first.map(|v| v.device().clone()))
        .unwrap_or(candle_core::Device::Cpu)
}
