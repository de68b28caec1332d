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
use crate::io::atomic::write_atomic;
use crate::io::safetensors::{parse_safetensors, read_file, to_safetensors_bytes};
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
    /// Rejects nonsense with [`Error::Config`] naming the field: `steps >= 1`; `lr` finite
    /// and `> 0`; `eps` finite and `> 0`; `beta1`,
    /// `beta2` in `[0, 1)`; `weight_decay` finite and `>= 0`; `grad_clip` `None` or finite and
    /// `> 0`; `min_lr_ratio` in `[0, 1]`; `aux_loss_coef`, `z_loss_coef` finite and `>= 0`;
    /// `max_nonfinite_in_row >= 1`. [`Trainer::new`] calls it. (`warmup_steps > steps` is
    /// allowed: the learning rate then never reaches its peak, as `..Default::default()` with a
    /// short run gives.)
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, rule: &str, v: String| -> Result<()> {
            Err(Error::Config(format!(
                "train: {field} must be {rule}, got {v}"
            )))
        };
        if self.steps == 0 {
            return bad("steps", "at least 1", "0".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "finite and > 0", self.lr.to_string());
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", "finite and > 0", self.eps.to_string());
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, "in [0, 1)", b.to_string());
            }
        }
        for (field, c) in [
            ("weight_decay", self.weight_decay),
            ("aux_loss_coef", self.aux_loss_coef),
            ("z_loss_coef", self.z_loss_coef),
        ] {
            if !(c.is_finite() && c >= 0.0) {
                return bad(field, "finite and >= 0", c.to_string());
            }
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return bad("grad_clip", "None or finite and > 0", format!("Some({c})"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "in [0, 1]", self.min_lr_ratio.to_string());
        }
        if self.max_nonfinite_in_row == 0 {
            return bad("max_nonfinite_in_row", "at least 1", "0".into());
        }
        Ok(())
    }

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
    #[serde(with = "json_f64")]
    pub loss: f64,
    /// Task loss.
    #[serde(with = "json_f64")]
    pub task: f64,
    /// Load-balancing loss (unscaled).
    #[serde(with = "json_f64")]
    pub load_balancing: f64,
    /// Router z-loss (unscaled).
    #[serde(with = "json_f64")]
    pub z_loss: f64,
    /// Learning rate used.
    #[serde(with = "json_f64")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "json_f64")]
    pub grad_norm: f64,
    /// Mean over sparse layers of max/mean expert load (1 = perfectly balanced).
    #[serde(with = "json_f64")]
    pub imbalance: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

/// Lossless JSON for `f64`: finite values as numbers, non-finite ones as the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"` (JSON has no literal for them). Reading also accepts `null`
/// as NaN (files written before this rule) and `"inf"` / `"+Infinity"` spellings.
mod json_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
        Null(()),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            None | Some(Repr::Null(())) => Ok(f64::NAN),
            Some(Repr::Num(v)) => Ok(v),
            Some(Repr::Str(s)) => match s.to_ascii_lowercase().as_str() {
                "nan" => Ok(f64::NAN),
                "infinity" | "+infinity" | "inf" | "+inf" => Ok(f64::INFINITY),
                "-infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(serde::de::Error::custom(format!(
                    "expected a number, \"NaN\", \"Infinity\" or \"-Infinity\", got \"{s}\""
                ))),
            },
        }
    }

    /// A float that (de)serialises by these rules, for use inside containers.
    #[derive(serde::Serialize, Deserialize)]
    struct F(#[serde(with = "self")] f64);

    /// `Vec<(usize, f64)>` with the floats by these rules.
    pub mod pairs {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[(usize, f64)], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|&(i, x)| (i, super::F(x))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, f64)>, D::Error> {
            Ok(Vec::<(usize, super::F)>::deserialize(d)?
                .into_iter()
                .map(|(i, f)| (i, f.0))
                .collect())
        }
    }
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
    #[serde(with = "json_f64::pairs")]
    pub evals: Vec<(usize, f64)>,
}

/// Drives optimisation of one `VarMap`.
///
/// Three steps on one fixed batch of a tiny [`CausalLm`](crate::CausalLm):
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_moe::losses::cross_entropy;
/// use candle_moe::train::LossParts;
/// use candle_moe::{CausalLm, ModelConfig, TrainConfig, Trainer};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_moe::Result<()> {
/// let dev = Device::Cpu;
/// let mut cfg = ModelConfig::tiny(32);
/// (cfg.hidden_size, cfg.moe.hidden_size, cfg.num_layers) = (16, 16, 1);
/// (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
/// let varmap = VarMap::new();
/// let model = CausalLm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
///
/// // Next-token prediction on 0 1 2 … 15, as two sequences of 8.
/// let ids = Tensor::arange(0u32, 16, &dev)?.reshape((2, 8))?;
/// let (inp, tgt) = (ids.narrow(1, 0, 7)?, ids.narrow(1, 1, 7)?.flatten_all()?);
/// let (steps, lr, warmup_steps, progress) = (3, 1e-2, 0, false);
/// let train = TrainConfig { steps, lr, warmup_steps, progress, ..Default::default() };
/// let mut trainer = Trainer::new(&varmap, train)?;
/// trainer.run(
///     |_rng| {
///         let out = model.forward_t(&inp, None, true)?; // training mode
///         Ok(LossParts {
///             task: cross_entropy(&out.logits.reshape((14, 32))?, &tgt, None)?,
///             load_balancing: out.load_balancing_loss,
///             z_loss: out.z_loss,
///             routing: out.routing,
///         })
///     },
///     || Ok(0.0), // no validation set here
///     |_| Ok(()), // no checkpoints
/// )?;
/// let history = &trainer.state.history;
/// assert_eq!((trainer.state.step, history.len()), (3, 3));
/// assert!(history[2].task < history[0].task);
/// # Ok(())
/// # }
/// ```
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

    /// A trainer over every variable of `varmap`; errors when `cfg` is invalid
    /// ([`TrainConfig::validate`]).
    pub fn new(varmap: &VarMap, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
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

    /// Applies one step: total loss, backward, clipping, update. A non-finite loss or gradient,
    /// or an update that would make a parameter non-finite (e.g. a learning rate that
    /// overflows), skips the update (parameters and moments unchanged) and is counted; too many
    /// in a row is an error.
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
        let mut why = "non-finite loss or gradient";
        let applied = match grads {
            None => false,
            Some(mut g) => {
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
                // Applied only if every new parameter is finite.
                let ok = self.opt.try_step(&g)?;
                if !ok {
                    why = "update would make a parameter non-finite";
                }
                ok
            }
        };
        if applied {
            self.nonfinite_in_row = 0;
            self.state.step += 1;
        } else {
            stats.skipped = true;
            self.nonfinite_in_row += 1;
            self.state.skipped_total += 1;
            if self.nonfinite_in_row >= self.cfg.max_nonfinite_in_row {
                self.state.history.push(stats.clone());
                return Err(Error::Training(format!(
                    "{} non-finite steps in a row (last: {why}; loss {loss}, grad norm {}, lr {lr}) at step {}; the last checkpoint is untouched",
                    self.nonfinite_in_row, stats.grad_norm, self.state.step
                )));
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
    ///
    /// All or nothing: the state file, the seed and every optimizer moment (present, right
    /// shape) are checked before anything changes, so a failed load leaves the trainer and its
    /// optimizer as they were.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: sp.clone(),
            source,
        })?;
        if state.seed != self.cfg.seed {
            return Err(Error::Config(format!(
                "resume: checkpoint {} was trained with seed {}, this run has seed {}",
                sp.display(),
                state.seed,
                self.cfg.seed
            )));
        }
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
        // Checks every moment first; only then sets them (infallibly, shapes and dtypes match).
        self.opt.load_state(&t, state.step, &p)?;
        self.nonfinite_in_row = 0;
        self.state = state;
        Ok(())
    }
}
