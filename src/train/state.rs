//! What a training run records and saves: per-step statistics and the resumable state, with
//! non-finite values kept through JSON.

use serde::{Deserialize, Serialize};

use crate::models::LayerRouting;

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// DeepSeek-V3 sequence-wise balance loss (unscaled; 0 when not computed).
    #[serde(default, with = "json_f64")]
    pub seq_aux: f64,
    /// Shazeer et al.'s importance loss `CV(Importance)²` (unscaled; 0 when not computed).
    #[serde(default, with = "json_f64")]
    pub importance: f64,
    /// Shazeer et al.'s load loss `CV(Load)²` (unscaled; 0 when not computed).
    #[serde(default, with = "json_f64")]
    pub load: f64,
    /// Routing of each sparse layer in this step, its micro-batches pooled (empty in files
    /// written before it was recorded).
    #[serde(default)]
    pub layers: Vec<LayerStepStats>,
}

/// What one sparse layer's router did in one step, over all its micro-batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStepStats {
    /// The layer ([`LayerRouting::layer`]).
    pub layer: usize,
    /// Tokens routed (summed over micro-batches).
    pub tokens: usize,
    /// Routed (token, expert) assignments, kept and dropped (summed; `tokens · k` for top-k).
    pub assignments: usize,
    /// Kept assignments per expert (summed).
    pub expert_counts: Vec<usize>,
    /// Assignments dropped by the capacity limit (summed).
    pub dropped: usize,
    /// Mean over tokens of the router entropy `−Σ_e p_e log p_e` (nats; micro-batches weighted
    /// by their tokens).
    #[serde(with = "json_f64")]
    pub entropy: f64,
    /// Mean softmax router probability per expert over the tokens (weighted as `entropy`).
    #[serde(with = "json_f64::vec")]
    pub mean_probs: Vec<f64>,
    /// The selection bias the step routed with (its last micro-batch's, before the step's
    /// update); empty when the router has none.
    #[serde(with = "json_f64::vec", default)]
    pub selection_bias: Vec<f64>,
}

impl LayerStepStats {
    /// Pools the per-layer routing of one step's micro-batches, layers matched by
    /// [`LayerRouting::layer`] (in order of first appearance).
    pub fn pool<'a>(micro: impl IntoIterator<Item = &'a [LayerRouting]>) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for routing in micro {
            for r in routing {
                let i = match out.iter().position(|s| s.layer == r.layer) {
                    Some(i) => i,
                    None => {
                        out.push(Self {
                            layer: r.layer,
                            tokens: 0,
                            assignments: 0,
                            expert_counts: vec![],
                            dropped: 0,
                            entropy: 0.0,
                            mean_probs: vec![],
                            selection_bias: vec![],
                        });
                        out.len() - 1
                    }
                };
                out[i].add(r);
            }
        }
        for s in &mut out {
            let t = s.tokens.max(1) as f64;
            s.entropy /= t;
            s.mean_probs.iter_mut().for_each(|p| *p /= t);
        }
        out
    }

    /// Adds one micro-batch's routing (entropy and probabilities weighted by its tokens).
    fn add(&mut self, r: &LayerRouting) {
        let w = r.tokens as f64;
        self.tokens += r.tokens;
        self.assignments += r.assignments();
        self.dropped += r.dropped;
        self.entropy += r.router.entropy * w;
        if self.expert_counts.len() < r.expert_counts.len() {
            self.expert_counts.resize(r.expert_counts.len(), 0);
        }
        for (a, c) in self.expert_counts.iter_mut().zip(&r.expert_counts) {
            *a += c;
        }
        if self.mean_probs.len() < r.router.mean_probs.len() {
            self.mean_probs.resize(r.router.mean_probs.len(), 0.0);
        }
        for (a, p) in self.mean_probs.iter_mut().zip(&r.router.mean_probs) {
            *a += p * w;
        }
        self.selection_bias = r.router.selection_bias.clone();
    }

    /// Each expert's share of the layer's routed assignments (kept counts over
    /// [`Self::assignments`]; all zero when nothing was routed).
    pub fn load_shares(&self) -> Vec<f64> {
        let total = self.assignments.max(1) as f64;
        self.expert_counts
            .iter()
            .map(|&c| c as f64 / total)
            .collect()
    }
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

    /// `Vec<f64>` with the floats by these rules.
    pub mod vec {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|&x| super::F(x)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            Ok(Vec::<super::F>::deserialize(d)?
                .into_iter()
                .map(|f| f.0)
                .collect())
        }
    }

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The current dynamic loss scale (`TrainConfig::loss_scale`); `None` without scaling
    /// (then left out of the state file, which never holds a JSON `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Applied steps since the loss scale last changed.
    #[serde(default)]
    pub loss_scale_good_steps: usize,
}
