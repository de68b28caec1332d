//! What a training run records and saves: per-step statistics and the resumable state, with
//! non-finite values kept through JSON.

use serde::{Deserialize, Serialize};

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
