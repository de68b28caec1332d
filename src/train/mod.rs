//! Training: AdamW (Loshchilov & Hutter 2019) with checkpointable state, linear warmup + cosine
//! decay, global gradient-norm clipping (Pascanu et al. 2013), the MoE total loss
//! `task + aux_coef · load_balancing + z_coef · z_loss + seq_coef · seq_aux +
//! cv_coef · (importance + load)`, optional global-batch balancing and DeepSeek-V3's
//! selection-bias update ([`balance`]), non-finite guards, a progress bar with loss and expert
//! balance, periodic evaluation and checkpoints, and exact resume; over the ranks of a
//! communicator ([`Trainer::set_comm`]), expert- and data-parallel training with the
//! single-process loss over the union of the ranks' tokens (`docs/expert_parallel.md`).
//!
//! The optimizer performs exactly candle-nn's `AdamW` update; it is re-implemented here because
//! candle-nn keeps the moments private, so they could not be checkpointed for resume.

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;
use rand::SeedableRng;

pub mod balance;
pub mod checkpoint;
mod config;
pub mod init;
mod loss;
pub mod optim;
mod parallel;
pub mod schedule;
mod state;

pub use config::{TrainConfig, DEFAULT_NO_DECAY};
pub use loss::LossParts;
pub use optim::AdamW;
pub use state::{LayerStepStats, StepStats, TrainerState};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors::{parse_safetensors, read_file, to_safetensors_bytes};

/// The variables of `varmap` whose names satisfy `keep`, as a new `VarMap` sharing them (not
/// copies): train it to freeze the others, e.g. `|n| !n.ends_with(".gate.weight")` keeps the
/// routers fixed, `|n| n.contains(".experts.")` trains the experts only.
pub fn select_vars(varmap: &VarMap, keep: impl Fn(&str) -> bool) -> VarMap {
    let out = VarMap::new();
    {
        let src = crate::ops::lock(varmap.data());
        let mut dst = crate::ops::lock(out.data());
        for (n, v) in src.iter() {
            if keep(n) {
                dst.insert(n.clone(), v.clone());
            }
        }
    }
    out
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
///         let task = cross_entropy(&out.logits.reshape((14, 32))?, &tgt, None)?;
///         Ok(LossParts::from_output(task, &out))
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
    /// The model's `(router_aux_loss_coef, router_z_loss_coef)`.
    model_coefs: (f64, f64),
    /// The model's `(seq_aux_loss_coef, cv_loss_coef)`.
    balance_coefs: (f64, f64),
    /// The variables the optimizer was built over (to find the selection biases in).
    varmap: VarMapHandle,
    /// The tracked selection biases, by layer index as in [`crate::LayerRouting::layer`].
    biases: Vec<(usize, candle_core::Var)>,
    /// The communicator and this rank's own parameters ([`Trainer::set_comm`]).
    parallel: parallel::Parallel,
}

/// A shared `VarMap` (which has no `Debug`).
struct VarMapHandle(VarMap);

impl std::fmt::Debug for VarMapHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VarMap")
    }
}

impl Trainer {
    /// The optimizer (its moments are part of a checkpoint).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// A trainer over every variable of `varmap`; errors when `cfg` is invalid
    /// ([`TrainConfig::validate`]).
    pub fn new(varmap: &VarMap, cfg: TrainConfig) -> Result<Self> {
        Self::for_model(varmap, cfg, &crate::config::MoeConfig::default())
    }

    /// A trainer for a model with MoE configuration `moe`: the aux-loss coefficients are the
    /// model's (`router_aux_loss_coef`, `router_z_loss_coef`) unless `cfg` overrides them, and
    /// the model's `seq_aux_loss_coef` and `cv_loss_coef`. ([`Trainer::new`] uses
    /// `MoeConfig::default()`'s.) The total loss of a micro-batch is
    /// `task + aux · load_balancing + z · z_loss + seq_aux_loss_coef · seq_aux +
    /// cv_loss_coef · (importance + load)` (a balance loss the parts do not carry counts 0).
    pub fn for_model(
        varmap: &VarMap,
        cfg: TrainConfig,
        moe: &crate::config::MoeConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let opt = AdamW::new(varmap, &cfg)?;
        let state = TrainerState {
            step: 0,
            seed: cfg.seed,
            skipped_total: 0,
            history: vec![],
            evals: vec![],
            loss_scale: cfg.loss_scale,
            loss_scale_good_steps: 0,
        };
        Ok(Self {
            cfg,
            opt,
            nonfinite_in_row: 0,
            state,
            model_coefs: (moe.router_aux_loss_coef, moe.router_z_loss_coef),
            balance_coefs: (moe.seq_aux_loss_coef, moe.cv_loss_coef),
            varmap: VarMapHandle(varmap.clone()),
            biases: Vec::new(),
            parallel: parallel::Parallel::default(),
        })
    }

    /// Tracks the selection biases DeepSeek-V3's auxiliary-loss-free balancing updates
    /// (`TrainConfig::bias_update_rate` > 0): `(layer, bias)` pairs as a model's
    /// `selection_biases()` gives them ([`crate::CausalLm::selection_biases`]), the layer
    /// index matching [`crate::LayerRouting::layer`]; each bias must be a variable of the trainer's
    /// `VarMap` (matched by identity). Replaces any earlier list.
    pub fn track_selection_biases(&mut self, biases: &[(usize, Tensor)]) -> Result<()> {
        self.biases = balance::find_bias_vars(&self.varmap.0, biases)?;
        Ok(())
    }

    /// The bias update rate γ in force at step `step` (0 from `bias_update_until` on).
    pub fn bias_rate_at(&self, step: usize) -> f64 {
        match self.cfg.bias_update_until {
            Some(until) if step >= until => 0.0,
            _ => self.cfg.bias_update_rate,
        }
    }

    /// The `(seq_aux_loss_coef, cv_loss_coef)` the total loss uses (the model's).
    pub fn balance_coefs(&self) -> (f64, f64) {
        self.balance_coefs
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
        self.step_accumulated(std::slice::from_ref(parts))
    }

    /// The `(load-balancing, z-loss)` coefficients the total loss uses: `cfg`'s overrides, else
    /// the model's.
    pub fn aux_coefs(&self) -> (f64, f64) {
        (
            self.cfg.aux_loss_coef.unwrap_or(self.model_coefs.0),
            self.cfg.z_loss_coef.unwrap_or(self.model_coefs.1),
        )
    }

    /// One optimizer step from the gradients of `micro.len()` micro-batches (gradient
    /// accumulation): the gradient of the mean of their total losses, each micro-batch's graph
    /// freed after its backward pass. For the task loss (a mean over tokens, micro-batches of
    /// equal size) this equals one batch `k` times the size. The load-balancing and z-losses
    /// are formed per micro-batch, as transformers forms them per forward call, and their mean
    /// is optimised: `F_e` and `P_e` come from each micro-batch's tokens, not from the whole
    /// accumulated batch, so the balancing gradient differs from the big batch's. With
    /// `TrainConfig::global_batch_balance` (and router outputs in every part's `balance`),
    /// `F_e` is counted over all the micro-batches first and each micro-batch's loss is
    /// `E · Σ_e F_e^global · P_e^(micro)` instead (Qiu et al. 2025; see
    /// [`crate::losses::balance::global_batch_load_balancing`]); `StepStats::load_balancing`
    /// then records that loss. After an applied step, with `bias_update_rate` > 0, the
    /// tracked selection biases are updated ([`balance`]).
    pub fn step_accumulated(&mut self, micro: &[LossParts]) -> Result<StepStats> {
        if micro.is_empty() {
            return Err(Error::Config(
                "train: step_accumulated needs at least one micro-batch".into(),
            ));
        }
        let lr = self.cfg.lr_at(self.state.step);
        let mut stats = StepStats {
            step: self.state.step,
            loss: 0.0,
            task: 0.0,
            load_balancing: 0.0,
            z_loss: 0.0,
            lr,
            grad_norm: f64::NAN,
            imbalance: 0.0,
            skipped: false,
            layers: LayerStepStats::pool(micro.iter().map(|p| p.routing.as_slice())),
            ..Default::default()
        };
        let gamma = self.bias_rate_at(self.state.step);
        if gamma > 0.0 && self.biases.is_empty() && micro.iter().any(|p| !p.routing.is_empty()) {
            return Err(Error::Config(
                "train: bias_update_rate > 0 but no selection bias is tracked: call Trainer::track_selection_biases(&model.selection_biases()) (the model needs MoeConfig::selection_bias)".into(),
            ));
        }
        let (grads, finite) = self.accumulate(micro, &mut stats)?;
        let mut grads = if self.parallel.comm.size() > 1 {
            // Over several ranks: the reduced gradients, global norm and averaged losses.
            let (g, norm) = self.reduce_parallel(grads, finite, &mut stats)?;
            stats.grad_norm = norm;
            Some(g)
        } else if finite {
            grads
        } else {
            None
        };
        let loss = stats.loss;
        if self.parallel.comm.size() == 1 {
            if let Some(g) = &grads {
                stats.grad_norm = self.grad_norm(g)?;
            }
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
                let comm = self.parallel.comm.clone();
                let ok = self.opt.try_step_agreed(&g, |ok| {
                    if comm.size() == 1 {
                        return Ok(ok);
                    }
                    let mut bad = [(!ok) as u64];
                    comm.all_reduce_sum_u64(&mut bad)?;
                    Ok(bad[0] == 0)
                })?;
                if !ok {
                    why = "update would make a parameter non-finite";
                }
                ok
            }
        };
        let scale_overflow = !applied && self.state.loss_scale.is_some_and(|s| s > 1.0);
        self.update_loss_scale(applied);
        if applied {
            if gamma > 0.0 {
                let loads = balance::bias_loads(&self.biases, micro)?;
                let loads = self.global_bias_loads(loads)?;
                balance::apply_bias_updates(&self.biases, &loads, gamma)?;
            }
            self.nonfinite_in_row = 0;
            self.state.step += 1;
        } else {
            stats.skipped = true;
            self.state.skipped_total += 1;
            // An f16 overflow under loss scaling is expected now and then: the scale was halved
            // and the next step retries; it counts toward the abort only once the scale is 1.
            if !scale_overflow {
                self.nonfinite_in_row += 1;
            }
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

    /// Dynamic loss scaling after a step: halve on a skipped step, double after
    /// `loss_scale_window` applied steps in a row.
    fn update_loss_scale(&mut self, applied: bool) {
        let Some(scale) = self.state.loss_scale else {
            return;
        };
        if !applied {
            self.state.loss_scale = Some((scale / 2.0).max(1.0));
            self.state.loss_scale_good_steps = 0;
        } else {
            self.state.loss_scale_good_steps += 1;
            if self.state.loss_scale_good_steps >= self.cfg.loss_scale_window {
                self.state.loss_scale = Some(scale * 2.0);
                self.state.loss_scale_good_steps = 0;
            }
        }
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
        let text = crate::files::read_json_text(&sp, "trainer_state.json")?;
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
        let t = parse_safetensors(&read_file(&p)?, &p, self.opt.state_dtype(), &dev)?;
        // Checks every moment first; only then sets them (infallibly, shapes and dtypes match).
        self.opt.load_state(&t, state.step, &p)?;
        self.nonfinite_in_row = 0;
        self.state = state;
        Ok(())
    }
}
