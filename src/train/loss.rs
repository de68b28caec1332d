//! The parts of a step's loss ([`LossParts`]) and the trainer's accumulation of their total
//! loss and gradients over micro-batches.

use candle_core::{DType, Tensor};

use crate::ops::HostRead;

use super::{balance, StepStats, Trainer};
use crate::error::Result;
use crate::losses::BalanceLosses;
use crate::models::{LayerRouting, RoutedOutput};

/// The parts of one step's loss, as the model returned them. Build it with
/// [`LossParts::from_output`] (every part a model returns) or [`LossParts::new`].
#[derive(Debug, Clone)]
pub struct LossParts {
    /// The task loss (cross entropy), scalar.
    pub task: Tensor,
    /// Load-balancing loss, scalar (unscaled).
    pub load_balancing: Tensor,
    /// Router z-loss, scalar (unscaled).
    pub z_loss: Tensor,
    /// Per-layer routing statistics.
    pub routing: Vec<LayerRouting>,
    /// The other balance losses (unscaled) and the router outputs global-batch balancing
    /// recounts; `BalanceLosses::default()` when there are none.
    pub balance: BalanceLosses,
}

impl LossParts {
    /// The parts from a task loss and the load-balancing, z-loss and routing statistics, with
    /// no other balance loss.
    pub fn new(
        task: Tensor,
        load_balancing: Tensor,
        z_loss: Tensor,
        routing: Vec<LayerRouting>,
    ) -> Self {
        Self {
            task,
            load_balancing,
            z_loss,
            routing,
            balance: BalanceLosses::default(),
        }
    }

    /// The parts from a task loss and everything a model's output carries (the aux losses,
    /// the routing statistics, the balance losses and router outputs).
    pub fn from_output(task: Tensor, out: &impl RoutedOutput) -> Self {
        Self {
            task,
            load_balancing: out.load_balancing_loss().clone(),
            z_loss: out.z_loss().clone(),
            routing: out.routing().to_vec(),
            balance: out.balance().clone(),
        }
    }
}

fn mean_imbalance(routing: &[LayerRouting]) -> f64 {
    if routing.is_empty() {
        return 1.0;
    }
    routing.iter().map(|r| r.imbalance()).sum::<f64>() / routing.len() as f64
}

impl Trainer {
    /// Backward passes of the micro-batches, their gradients summed (each loss divided by their
    /// number), and their mean losses in `stats`; `false` when a loss is not finite.
    pub(super) fn accumulate(
        &self,
        micro: &[LossParts],
        stats: &mut StepStats,
    ) -> Result<(Option<candle_core::backprop::GradStore>, bool)> {
        let k = micro.len() as f64;
        let (aux, zc) = self.aux_coefs();
        let (sc, cc) = self.balance_coefs;
        let global = if self.cfg.global_batch_balance {
            balance::global_load_balancing(micro)?
        } else {
            None
        };
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut finite = true;
        let w = self.parallel.comm.size();
        for (m, parts) in micro.iter().enumerate() {
            let lb = global.as_ref().map_or(&parts.load_balancing, |g| &g[m]);
            let mut terms = vec![(lb * aux)?, (&parts.z_loss * zc)?];
            let b = &parts.balance;
            // Every logged value in one device-to-host read: [total, task, lb, z, seq?, imp?, load?].
            let mut logged = vec![&parts.task, lb, &parts.z_loss];
            if let Some(s) = &b.seq_aux {
                terms.push((s * sc)?);
                logged.push(s);
            }
            for t in [&b.importance, &b.load].into_iter().flatten() {
                terms.push((t * cc)?);
                logged.push(t);
            }
            let mut total = parts.task.clone();
            for t in &terms {
                total = (total + t)?;
            }
            let mut parts_f64 = vec![total.to_dtype(DType::F64)?.reshape(1)?];
            for t in &logged {
                parts_f64.push(t.to_dtype(DType::F64)?.reshape(1)?);
            }
            let v = Tensor::cat(&parts_f64, 0)?.host_vec1::<f64>()?;
            let loss = v[0];
            stats.loss += loss / k;
            stats.task += v[1] / k;
            stats.load_balancing += v[2] / k;
            stats.z_loss += v[3] / k;
            let mut rest = v[4..].iter();
            if b.seq_aux.is_some() {
                stats.seq_aux += rest.next().copied().unwrap_or(f64::NAN) / k;
            }
            if b.importance.is_some() {
                stats.importance += rest.next().copied().unwrap_or(f64::NAN) / k;
            }
            if b.load.is_some() {
                stats.load += rest.next().copied().unwrap_or(f64::NAN) / k;
            }
            stats.imbalance += mean_imbalance(&parts.routing) / k;
            if !loss.is_finite() {
                finite = false;
                if w == 1 {
                    continue;
                }
                // Over several ranks every backward runs (its collectives pair with the other
                // ranks'); the step is skipped on every rank after the reduction.
            }
            let target = if w == 1 {
                total
            } else {
                self.parallel_target(&parts.task, &total, &terms)?
            };
            // The loss in f32 (at least) before any scaling: an f16 loss times a loss scale
            // would overflow; the gradient re-enters the half-precision graph through the cast.
            let target = target.to_dtype(crate::ops::compute_dtype(target.dtype()))?;
            let scale = self.state.loss_scale.unwrap_or(1.0);
            let mut g = (target / (k / scale))?.backward()?;
            self.master_grads(&mut g, scale)?;
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for v in self.opt.vars() {
                        if let Some(gv) = g.remove(v) {
                            let sum = match acc.remove(v) {
                                Some(a) => (a + gv)?,
                                None => gv,
                            };
                            acc.insert(v, sum);
                        }
                    }
                    acc
                }
            });
        }
        Ok((grads, finite))
    }

    /// Widens the gradients of half-precision variables to f32 (the dtype of their masters,
    /// so accumulation, the norm, clipping and AdamW run in f32) and divides every gradient by
    /// the loss scale (when it is not 1).
    fn master_grads(&self, g: &mut candle_core::backprop::GradStore, scale: f64) -> Result<()> {
        if scale == 1.0 && !self.opt.has_masters() {
            return Ok(());
        }
        for v in self.opt.vars() {
            if let Some(gv) = g.remove(v) {
                let gv = if super::optim::is_half(gv.dtype()) {
                    gv.to_dtype(DType::F32)?
                } else {
                    gv
                };
                let gv = if scale == 1.0 { gv } else { (gv / scale)? };
                g.insert(v, gv);
            }
        }
        Ok(())
    }

    /// The global gradient norm: one reduction on the device, one scalar to the host.
    pub(super) fn grad_norm(&self, g: &candle_core::backprop::GradStore) -> Result<f64> {
        let mut sq: Option<Tensor> = None;
        for v in self.opt.vars() {
            if let Some(gv) = g.get(v) {
                let s = gv.to_dtype(DType::F64)?.sqr()?.sum_all()?;
                sq = Some(match sq {
                    None => s,
                    Some(a) => (a + s)?,
                });
            }
        }
        Ok(match sq {
            Some(s) => s.host_scalar::<f64>()?.sqrt(),
            None => 0.0,
        })
    }
}
