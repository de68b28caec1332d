//! AdamW (Loshchilov & Hutter 2019) with named, checkpointable moments.
//!
//! The update is exactly candle-nn's `AdamW`; it is re-implemented because candle-nn keeps the
//! moments private, so they could not be checkpointed for resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;

use crate::ops::HostRead;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::TrainConfig;
use crate::error::{CheckpointErrorKind, Error, Result};
use crate::ops::sorted_vars;

/// AdamW with named, checkpointable moments (candle-nn's update rule).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var, Var, Var)>,
    /// Whether each variable (same order) gets weight decay.
    decay: Vec<bool>,
    step_t: usize,
    /// Learning rate of the next step.
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Optimises every variable of `varmap` (float vars only) but the router selection biases
    /// (`…e_score_correction_bias`), which the trainer updates by its own rule.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig) -> Result<Self> {
        let mut vars = Vec::new();
        let mut decay = Vec::new();
        for (n, v) in sorted_vars(varmap) {
            let n = &n;
            if !v.dtype().is_float() || super::balance::is_selection_bias(n) {
                continue;
            }
            let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
            let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
            decay.push(cfg.decays(n));
            vars.push((n.clone(), v, m, s));
        }
        Ok(Self {
            vars,
            decay,
            step_t: 0,
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    /// The optimised variables, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter().map(|v| &v.1)
    }

    /// The optimised variables with their names, sorted by name.
    pub fn named_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|v| (v.0.as_str(), &v.1))
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// One update from `grads`; an error (and nothing changed) when the update would make a
    /// parameter or a moment non-finite (see [`AdamW::try_step`]).
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        if !self.try_step(grads)? {
            candle_core::bail!(
                "AdamW: the update at step {} would make a parameter non-finite (lr {}); nothing was changed",
                self.step_t + 1,
                self.lr
            )
        }
        Ok(())
    }

    /// One update from `grads`, applied only when every new parameter and second moment is
    /// finite: returns `false` (parameters, moments and step count unchanged) otherwise.
    ///
    /// The check costs one reduction per updated tensor, all summed on the device into one
    /// scalar read by the host. (The first moment is a convex combination of finite gradients,
    /// so it overflows only where the second moment does.)
    pub fn try_step(&mut self, grads: &GradStore) -> candle_core::Result<bool> {
        self.try_step_agreed(grads, Ok)
    }

    /// [`Self::try_step`] with the decision to apply passed through `agree` (local finiteness
    /// in, the decision out): the distributed trainer makes it identical on every rank.
    pub(crate) fn try_step_agreed(
        &mut self,
        grads: &GradStore,
        agree: impl FnOnce(bool) -> candle_core::Result<bool>,
    ) -> candle_core::Result<bool> {
        let step_t = self.step_t + 1;
        let lr = self.lr;
        let lr_lambda = lr * self.weight_decay;
        let (b1, b2) = (self.beta1, self.beta2);
        let scale_m = 1f64 / (1f64 - b1.powi(step_t as i32));
        let scale_v = 1f64 / (1f64 - b2.powi(step_t as i32));
        let mut updates = Vec::new();
        // `x * 0` is 0 for finite x and NaN for ±inf or NaN, and its sum cannot overflow.
        let mut probe: Option<Tensor> = None;
        for ((_, theta, m, v), &decays) in self.vars.iter().zip(&self.decay) {
            let lr_lambda = if decays { lr_lambda } else { 0.0 };
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * b1)? + (g * (1.0 - b1))?)?;
                let next_v = ((v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                let next_theta = (next_theta - (adjusted * lr)?)?;
                let bad = ((&next_theta * 0.0)?.sum_all()? + (&next_v * 0.0)?.sum_all()?)?
                    .to_dtype(candle_core::DType::F32)?;
                probe = Some(match probe {
                    Some(p) => (p + bad)?,
                    None => bad,
                });
                updates.push((theta, m, v, next_theta, next_m, next_v));
            }
        }
        let finite = match probe {
            Some(p) => p.host_scalar::<f32>()?.is_finite(),
            None => true,
        };
        if !agree(finite)? {
            return Ok(false);
        }
        for (theta, m, v, next_theta, next_m, next_v) in updates {
            m.set(&next_m)?;
            v.set(&next_v)?;
            theta.set(&next_theta)?;
        }
        self.step_t = step_t;
        Ok(true)
    }

    /// The moments as named tensors (`{name}.m`, `{name}.v`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (n, _, m, v) in &self.vars {
            out.insert(format!("{n}.m"), m.as_tensor().clone());
            out.insert(format!("{n}.v"), v.as_tensor().clone());
        }
        out
    }

    /// Restores moments and step count, all or nothing: every moment must be present in `t`
    /// with its variable's shape, else an error names it and nothing is changed.
    pub fn load_state(
        &mut self,
        t: &HashMap<String, Tensor>,
        step_t: usize,
        path: &Path,
    ) -> Result<()> {
        let staged = self.check_state(t, path)?;
        for (var, x) in staged {
            var.set(&x)?;
        }
        self.step_t = step_t;
        Ok(())
    }

    /// Checks that `t` holds every moment with the right shape and returns them converted to
    /// each variable's dtype and device, paired with their variables; changes nothing.
    pub(crate) fn check_state(
        &self,
        t: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Vec<(&Var, Tensor)>> {
        let mut staged = Vec::with_capacity(2 * self.vars.len());
        for (n, _, m, v) in &self.vars {
            for (suffix, var) in [("m", m), ("v", v)] {
                let key = format!("{n}.{suffix}");
                let x = t.get(&key).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &key,
                        CheckpointErrorKind::Missing,
                        format!("missing optimizer tensor `{key}`"),
                    )
                })?;
                if x.dims() != var.dims() {
                    return Err(Error::tensor(
                        path,
                        &key,
                        CheckpointErrorKind::Shape {
                            expected: var.dims().to_vec(),
                            found: x.dims().to_vec(),
                        },
                        format!(
                            "optimizer tensor `{key}` has shape {:?}, expected {:?}",
                            x.dims(),
                            var.dims()
                        ),
                    ));
                }
                let x = x.to_dtype(var.dtype())?.to_device(var.device())?;
                staged.push((var, x));
            }
        }
        Ok(staged)
    }
}
