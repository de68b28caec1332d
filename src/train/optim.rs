//! AdamW (Loshchilov & Hutter 2019) with named, checkpointable moments.
//!
//! The update is exactly candle-nn's `AdamW`; it is re-implemented because candle-nn keeps the
//! moments private, so they could not be checkpointed for resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::TrainConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::set_checked;
use crate::ops::lock;

/// AdamW with named, checkpointable moments (candle-nn's update rule).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var, Var, Var)>,
    step_t: usize,
    /// Learning rate of the next step.
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Optimises every variable of `varmap` (float vars only).
    pub fn new(varmap: &VarMap, cfg: &TrainConfig) -> Result<Self> {
        let data = lock(varmap.data());
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut vars = Vec::new();
        for n in names {
            let v = data[n].clone();
            if !v.dtype().is_float() {
                continue;
            }
            let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
            let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
            vars.push((n.clone(), v, m, s));
        }
        Ok(Self {
            vars,
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

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// One update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let lr = self.lr;
        let lr_lambda = lr * self.weight_decay;
        let (b1, b2) = (self.beta1, self.beta2);
        let scale_m = 1f64 / (1f64 - b1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - b2.powi(self.step_t as i32));
        for (_, theta, m, v) in &self.vars {
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * b1)? + (g * (1.0 - b1))?)?;
                let next_v = ((v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                let next_theta = (next_theta - (adjusted * lr)?)?;
                m.set(&next_m)?;
                v.set(&next_v)?;
                theta.set(&next_theta)?;
            }
        }
        Ok(())
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

    /// Restores moments and step count.
    pub fn load_state(
        &mut self,
        t: &HashMap<String, Tensor>,
        step_t: usize,
        path: &Path,
    ) -> Result<()> {
        for (n, _, m, v) in &self.vars {
            for (suffix, var) in [("m", m), ("v", v)] {
                let key = format!("{n}.{suffix}");
                let x = t.get(&key).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &key,
                        crate::error::CheckpointErrorKind::Missing,
                        format!("missing optimizer tensor `{key}`"),
                    )
                })?;
                set_checked(var, x, &key, path)?;
            }
        }
        self.step_t = step_t;
        Ok(())
    }
}
