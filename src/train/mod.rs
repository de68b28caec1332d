//! Training: AdamW (Loshchilov & Hutter 2019) with checkpointable state, linear warmup + cosine
//! decay, global gradient-norm clipping (Pascanu et al. 2013), the MoE total loss
//! `task + aux_coef · load_balancing + z_coef · z_loss`, non-finite guards, a progress bar with
//! loss and expert balance, periodic evaluation and checkpoints, and exact resume.
//!
//! The optimizer performs exactly candle-nn's `AdamW` update; it is re-implemented here because
//! candle-nn keeps the moments private, so they could not be checkpointed for resume.

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub mod checkpoint;
pub mod init;
pub mod optim;
pub mod schedule;

pub use optim::AdamW;

use crate::error::{Error, Result};
use crate::io::safetensors::{parse_safetensors, read_file, to_safetensors_bytes, write_atomic};
use crate::models::LayerRouting;

/// Hyper-parameters of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak (cosine decay floor).
    pub min_lr_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Coefficient of the load-balancing loss.
    pub aux_loss_coef: f64,
    /// Coefficient of the router z-loss.
    pub z_loss_coef: f64,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Call the checkpoint hook every this many steps (0 = never).
    pub checkpoint_every: usize,
    /// Seed of the batch sampler (each step's generator is derived from it and the step).
    pub seed: u64,
    /// Stop after this many non-finite steps in a row.
    pub max_nonfinite_in_row: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            lr: 3e-3,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: Some(1.0),
            aux_loss_coef: 0.01,
            z_loss_coef: 0.001,
            eval_every: 0,
            checkpoint_every: 0,
            seed: 0,
            max_nonfinite_in_row: 5,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// Learning rate at `step` (0-based): linear warmup, then cosine decay to
    /// `min_lr_ratio · lr` at `steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        schedule::warmup_cosine(
            step,
            self.steps,
            self.warmup_steps,
            self.lr,
            self.min_lr_ratio,
        )
    }
}

/// The parts of one step's loss, as the model returned them.
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
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Step index (1-based after the update).
    pub step: usize,
    /// Total loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Task loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub task: f64,
    /// Load-balancing loss (unscaled).
    #[serde(deserialize_with = "f64_or_nan")]
    pub load_balancing: f64,
    /// Router z-loss (unscaled).
    #[serde(deserialize_with = "f64_or_nan")]
    pub z_loss: f64,
    /// Learning rate used.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    /// Mean over sparse layers of max/mean expert load (1 = perfectly balanced).
    #[serde(deserialize_with = "f64_or_nan")]
    pub imbalance: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

/// Non-finite values are written as JSON `null`; read them back as NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Saved between runs to resume exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Skipped (non-finite) steps so far.
    pub skipped_total: usize,
    /// Training history so far.
    pub history: Vec<StepStats>,
    /// Evaluations so far: (step, value).
    pub evals: Vec<(usize, f64)>,
}

/// Drives optimisation of one `VarMap`.
#[derive(Debug)]
pub struct Trainer {
    /// The run's hyper-parameters.
    pub cfg: TrainConfig,
    opt: AdamW,
    nonfinite_in_row: usize,
    /// Resumable state (step, history, evaluations).
    pub state: TrainerState,
}

fn mean_imbalance(routing: &[LayerRouting]) -> f64 {
    if routing.is_empty() {
        return 1.0;
    }
    routing.iter().map(|r| r.imbalance()).sum::<f64>() / routing.len() as f64
}

impl Trainer {
    /// The optimizer (its moments are part of a checkpoint).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// A trainer over every variable of `varmap`.
    pub fn new(varmap: &VarMap, cfg: TrainConfig) -> Result<Self> {
        let opt = AdamW::new(varmap, &cfg)?;
        let state = TrainerState {
            step: 0,
            seed: cfg.seed,
            skipped_total: 0,
            history: vec![],
            evals: vec![],
        };
        Ok(Self {
            cfg,
            opt,
            nonfinite_in_row: 0,
            state,
        })
    }

    /// The generator for the current step's batch: a function of (seed, step) only, so a
    /// resumed run draws exactly the batches the uninterrupted run would have drawn.
    pub fn step_rng(&self) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed ^ (self.state.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }

    /// Applies one step: total loss, backward, clipping, update. A non-finite loss or gradient
    /// skips the update and is counted; too many in a row is an error.
    pub fn step(&mut self, parts: &LossParts) -> Result<StepStats> {
        let total = ((&parts.task + (&parts.load_balancing * self.cfg.aux_loss_coef)?)?
            + (&parts.z_loss * self.cfg.z_loss_coef)?)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let loss = scalar(&total)?;
        let lr = self.cfg.lr_at(self.state.step);
        let mut stats = StepStats {
            step: self.state.step,
            loss,
            task: scalar(&parts.task)?,
            load_balancing: scalar(&parts.load_balancing)?,
            z_loss: scalar(&parts.z_loss)?,
            lr,
            grad_norm: f64::NAN,
            imbalance: mean_imbalance(&parts.routing),
            skipped: false,
        };
        let mut grads = if loss.is_finite() {
            Some(total.backward()?)
        } else {
            None
        };
        if let Some(g) = &grads {
            let mut sq = 0f64;
            for v in self.opt.vars() {
                if let Some(gv) = g.get(v) {
                    sq += gv
                        .to_dtype(DType::F64)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                }
            }
            stats.grad_norm = sq.sqrt();
        }
        if !stats.grad_norm.is_finite() {
            grads = None;
        }
        match grads {
            None => {
                stats.skipped = true;
                self.nonfinite_in_row += 1;
                self.state.skipped_total += 1;
                if self.nonfinite_in_row >= self.cfg.max_nonfinite_in_row {
                    self.state.history.push(stats.clone());
                    return Err(Error::Training(format!(
                        "{} non-finite steps in a row (loss {loss}, grad norm {}) at step {}; the last checkpoint is untouched",
                        self.nonfinite_in_row, stats.grad_norm, self.state.step
                    )));
                }
            }
            Some(mut g) => {
                self.nonfinite_in_row = 0;
                if let Some(max) = self.cfg.grad_clip {
                    if stats.grad_norm > max {
                        let s = max / stats.grad_norm;
                        for v in self.opt.vars() {
                            if let Some(gv) = g.remove(v) {
                                g.insert(v, (gv * s)?);
                            }
                        }
                    }
                }
                self.opt.lr = lr;
                self.opt.step(&g)?;
                self.state.step += 1;
            }
        }
        stats.step = self.state.step;
        self.state.history.push(stats.clone());
        Ok(stats)
    }

    /// Runs until `cfg.steps`: `batch_loss` computes one training batch's losses (training
    /// mode), `eval` returns the validation metric every `eval_every` steps and at the end, and
    /// `checkpoint` is called every `checkpoint_every` steps.
    pub fn run(
        &mut self,
        batch_loss: impl FnMut(&mut rand::rngs::StdRng) -> Result<LossParts>,
        eval: impl FnMut() -> Result<f64>,
        checkpoint: impl FnMut(&Trainer) -> Result<()>,
    ) -> Result<()> {
        self.run_until(self.cfg.steps, batch_loss, eval, checkpoint)
    }

    /// As [`Trainer::run`], but stops after step `stop` (≤ `cfg.steps`) with the learning-rate
    /// schedule still that of the whole run (to split a run, e.g. save and resume).
    pub fn run_until(
        &mut self,
        stop: usize,
        mut batch_loss: impl FnMut(&mut rand::rngs::StdRng) -> Result<LossParts>,
        mut eval: impl FnMut() -> Result<f64>,
        mut checkpoint: impl FnMut(&Trainer) -> Result<()>,
    ) -> Result<()> {
        let stop = stop.min(self.cfg.steps);
        let pb = if self.cfg.progress {
            let pb = indicatif::ProgressBar::new(self.cfg.steps as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                pb.set_style(style);
            }
            pb.set_position(self.state.step as u64);
            Some(pb)
        } else {
            None
        };
        while self.state.step < stop {
            let mut rng = self.step_rng();
            let parts = batch_loss(&mut rng)?;
            let s = self.step(&parts)?;
            if let Some(pb) = &pb {
                pb.set_position(self.state.step as u64);
                pb.set_message(format!(
                    "loss {:.3} lb {:.3} balance {:.2}{}",
                    s.task,
                    s.load_balancing,
                    s.imbalance,
                    if s.skipped { " (skipped)" } else { "" }
                ));
            }
            let at = self.state.step;
            if !s.skipped
                && self.cfg.eval_every > 0
                && at.is_multiple_of(self.cfg.eval_every)
                && at < self.cfg.steps
            {
                let v = eval()?;
                self.state.evals.push((at, v));
                if pb.as_ref().is_some_and(|p| p.is_hidden()) {
                    // No terminal for the bar: keep a plain log line per evaluation.
                    eprintln!(
                        "step {at}/{}: train loss {:.4}, eval {v:.4}, lb {:.3}, balance {:.2}",
                        self.cfg.steps, s.task, s.load_balancing, s.imbalance
                    );
                }
            }
            if !s.skipped
                && self.cfg.checkpoint_every > 0
                && at.is_multiple_of(self.cfg.checkpoint_every)
            {
                checkpoint(self)?;
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        if self.state.evals.last().map(|e| e.0) != Some(self.state.step) {
            let v = eval()?;
            self.state.evals.push((self.state.step, v));
        }
        Ok(())
    }

    /// Writes `optimizer.safetensors` and `trainer_state.json` into `dir` (atomically).
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let p = dir.join("optimizer.safetensors");
        write_atomic(&p, &to_safetensors_bytes(&self.opt.state_tensors(), &p)?)?;
        let json = serde_json::to_string(&self.state).map_err(|source| Error::Json {
            path: dir.join("trainer_state.json"),
            source,
        })?;
        write_atomic(&dir.join("trainer_state.json"), json.as_bytes())
    }

    /// Restores what [`Trainer::save_state`] wrote (the weights are loaded separately).
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: sp.clone(),
            source,
        })?;
        let p = dir.join("optimizer.safetensors");
        let dev = self
            .opt
            .vars()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let dtype = self
            .opt
            .vars()
            .next()
            .map(|v| v.dtype())
            .unwrap_or(DType::F32);
        let t = parse_safetensors(&read_file(&p)?, &p, dtype, &dev)?;
        self.opt.load_state(&t, state.step, &p)?;
        if state.seed != self.cfg.seed {
            bail_cfg(format!(
                "resume: checkpoint was trained with seed {}, this run has seed {}",
                state.seed, self.cfg.seed
            ))?;
        }
        self.state = state;
        Ok(())
    }
}

fn bail_cfg(msg: String) -> Result<()> {
    Err(Error::Config(msg))
}
