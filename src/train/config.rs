//! Hyper-parameters of a training run and their validation.

use serde::{Deserialize, Serialize};

use super::schedule;
#[cfg(doc)]
use super::Trainer;
use crate::error::{Error, Result};

/// Name substrings [`TrainConfig::no_decay`] holds by default: norms, biases, embeddings and
/// the router (`*.gate.weight`, `shared_expert_gate`), as transformers' `Trainer` and most MoE
/// recipes exclude them from weight decay.
pub const DEFAULT_NO_DECAY: [&str; 6] = [
    "norm",
    ".bias",
    "embed",
    ".gate.weight",
    "expert_gate",
    "token_type",
];

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
    /// Clip the global gradient norm to this value: gradients are scaled by `max / norm` when
    /// `norm > max` (`torch.nn.utils.clip_grad_norm_` uses `max / (norm + 1e-6)`: the same to
    /// 1e-6 relative; checked against torch in `tests/train_oracle.rs`).
    pub grad_clip: Option<f64>,
    /// Override of the load-balancing loss coefficient; `None` (default): the model's
    /// `MoeConfig::router_aux_loss_coef` (see [`Trainer::for_model`]).
    pub aux_loss_coef: Option<f64>,
    /// Override of the router z-loss coefficient; `None` (default): the model's
    /// `MoeConfig::router_z_loss_coef`.
    pub z_loss_coef: Option<f64>,
    /// Rate γ of the auxiliary-loss-free balancing bias update (DeepSeek-V3 §2.1.2): after
    /// each applied optimizer step every tracked router selection bias
    /// ([`Trainer::track_selection_biases`]) moves by `γ · sign(mean load − load_e)`, the
    /// loads being the kept assignments of the step's micro-batches, then is mean-centred.
    /// The biases are never touched by AdamW. 0 = off.
    pub bias_update_rate: f64,
    /// Step from which γ drops to 0 (DeepSeek-V3 stops updating the bias for its last
    /// phase); `None` (default): γ for the whole run.
    pub bias_update_until: Option<usize>,
    /// Global-batch load balancing (Qiu et al. 2025): the expert frequencies `F_e` of the
    /// load-balancing loss are counted over all micro-batches of an optimizer step
    /// ([`Trainer::step_accumulated`]); each micro-batch's loss uses those with its own `P_e`
    /// ([`crate::losses::balance::global_batch_load_balancing`]). Needs the router outputs in
    /// [`super::LossParts::balance`] (as [`super::LossParts::from_output`] fills them).
    pub global_batch_balance: bool,
    /// Dynamic loss scaling for f16 training (as PyTorch's `GradScaler`): the initial scale
    /// (e.g. 65536). The total loss is multiplied by the scale before the backward pass and
    /// the gradients divided by it in f32; a step whose gradients overflow is skipped and the
    /// scale halved (such skips do not count toward `max_nonfinite_in_row` while the scale is
    /// above 1); after `loss_scale_window` applied steps in a row the scale doubles. `None`
    /// (default): no scaling, which is what f32, f64 and bf16 (f32's exponent range) need.
    pub loss_scale: Option<f64>,
    /// Applied steps in a row after which the loss scale doubles (PyTorch's default 2000).
    pub loss_scale_window: usize,
    /// Substrings of the variable names that get no weight decay (norms, biases, embeddings
    /// and the router by default); an empty list decays every variable.
    pub no_decay: Vec<String>,
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
            aux_loss_coef: None,
            z_loss_coef: None,
            bias_update_rate: 0.0,
            bias_update_until: None,
            global_batch_balance: false,
            loss_scale: None,
            loss_scale_window: 2000,
            no_decay: DEFAULT_NO_DECAY.iter().map(|s| s.to_string()).collect(),
            eval_every: 0,
            checkpoint_every: 0,
            seed: 0,
            max_nonfinite_in_row: 5,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// Whether the variable `name` gets weight decay (no name in [`Self::no_decay`] matches).
    pub fn decays(&self, name: &str) -> bool {
        !self.no_decay.iter().any(|p| name.contains(p.as_str()))
    }

    /// Rejects nonsense with [`Error::Config`] naming the field: `steps >= 1`; `lr` finite
    /// and `> 0`; `eps` finite and `> 0`; `beta1`,
    /// `beta2` in `[0, 1)`; `weight_decay` finite and `>= 0`; `grad_clip` `None` or finite and
    /// `> 0`; `min_lr_ratio` in `[0, 1]`; `aux_loss_coef`, `z_loss_coef`, `bias_update_rate` finite and `>= 0`;
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
            ("aux_loss_coef", self.aux_loss_coef.unwrap_or(0.0)),
            ("z_loss_coef", self.z_loss_coef.unwrap_or(0.0)),
            ("bias_update_rate", self.bias_update_rate),
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
        if let Some(s) = self.loss_scale {
            if !(s.is_finite() && s >= 1.0) {
                return bad(
                    "loss_scale",
                    "None or finite and >= 1",
                    format!("Some({s})"),
                );
            }
        }
        if self.loss_scale_window == 0 {
            return bad("loss_scale_window", "at least 1", "0".into());
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
