//! AdamW (Loshchilov & Hutter 2019) with named, checkpointable moments.
//!
//! The update is exactly candle-nn's `AdamW`; it is re-implemented because candle-nn keeps the
//! moments private, so they could not be checkpointed for resume.
//!
//! Mixed precision: a variable in bf16 or f16 gets an f32 master copy and f32 moments (as
//! PyTorch's AMP with an f32 optimizer, or apex O2). The update runs in f32 on the master from
//! the gradient widened to f32, and the variable is set to the master rounded to its dtype, so
//! updates smaller than the half-precision spacing of a weight accumulate instead of vanishing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;

use crate::ops::HostRead;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use super::TrainConfig;
use crate::error::{CheckpointErrorKind, Error, Result};
use crate::ops::sorted_vars;

/// AdamW with named, checkpointable moments (candle-nn's update rule).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var, Var, Var)>,
    /// The f32 master copy of each half-precision variable (same order), `None` otherwise.
    masters: Vec<Option<Var>>,
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
        let mut masters = Vec::new();
        for (n, v) in sorted_vars(varmap) {
            let n = &n;
            if !v.dtype().is_float() || super::balance::is_selection_bias(n) {
                continue;
            }
            let (master, state_dtype) = if is_half(v.dtype()) {
                let m = Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?;
                (Some(m), DType::F32)
            } else {
                (None, v.dtype())
            };
            let m = Var::zeros(v.shape(), state_dtype, v.device())?;
            let s = Var::zeros(v.shape(), state_dtype, v.device())?;
            decay.push(cfg.decays(n));
            masters.push(master);
            vars.push((n.clone(), v, m, s));
        }
        Ok(Self {
            vars,
            masters,
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

    /// Whether any variable is in half precision (and so has an f32 master copy).
    pub fn has_masters(&self) -> bool {
        self.masters.iter().any(Option::is_some)
    }

    /// The dtype of the moments (and masters): f32 for half-precision variables, else the
    /// variables' own (f64 for an f64 model).
    pub fn state_dtype(&self) -> DType {
        self.vars.first().map(|v| v.2.dtype()).unwrap_or(DType::F32)
    }

    /// The f32 master copy of variable `var` (a half-precision variable of this optimizer).
    pub fn master(&self, var: &Var) -> Option<&Var> {
        self.vars
            .iter()
            .zip(&self.masters)
            .find(|(v, _)| v.1.id() == var.id())
            .and_then(|(_, m)| m.as_ref())
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
        for (((_, var, m, v), &decays), master) in
            self.vars.iter().zip(&self.decay).zip(&self.masters)
        {
            let lr_lambda = if decays { lr_lambda } else { 0.0 };
            // The update runs on the f32 master of a half-precision variable.
            let theta = master.as_ref().unwrap_or(var);
            if let Some(g) = grads.get(var) {
                let g = &g.to_dtype(theta.dtype())?;
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
                updates.push((var, master, m, v, next_theta, next_m, next_v));
            }
        }
        let finite = match probe {
            Some(p) => p.host_scalar::<f32>()?.is_finite(),
            None => true,
        };
        if !agree(finite)? {
            return Ok(false);
        }
        for (var, master, m, v, next_theta, next_m, next_v) in updates {
            m.set(&next_m)?;
            v.set(&next_v)?;
            match master {
                Some(master) => {
                    var.set(&next_theta.to_dtype(var.dtype())?)?;
                    master.set(&next_theta)?;
                }
                None => var.set(&next_theta)?,
            }
        }
        self.step_t = step_t;
        Ok(true)
    }

    /// The moments as named tensors (`{name}.m`, `{name}.v`) and the f32 masters of
    /// half-precision variables (`{name}.master`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((n, _, m, v), master) in self.vars.iter().zip(&self.masters) {
            out.insert(format!("{n}.m"), m.as_tensor().clone());
            out.insert(format!("{n}.v"), v.as_tensor().clone());
            if let Some(master) = master {
                out.insert(format!("{n}.master"), master.as_tensor().clone());
            }
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
    /// each variable's dtype and device, paired with their variables; changes nothing. The
    /// master of a half-precision variable is restored from `{name}.master` when `t` has it
    /// (a checkpoint of a half-precision run), else taken from the variable's current value.
    pub(crate) fn check_state(
        &self,
        t: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Vec<(&Var, Tensor)>> {
        let mut staged = Vec::with_capacity(3 * self.vars.len());
        for ((n, param, m, v), master) in self.vars.iter().zip(&self.masters) {
            let mut slots = vec![("m", m, true), ("v", v, true)];
            if let Some(master) = master {
                slots.push(("master", master, t.contains_key(&format!("{n}.master"))));
                if !slots[2].2 {
                    staged.push((master, param.as_tensor().to_dtype(DType::F32)?));
                }
            }
            for (suffix, var, _) in slots.into_iter().filter(|s| s.2) {
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

/// Whether `dtype` is a half-precision float (bf16 or f16), which gets an f32 master copy.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}
