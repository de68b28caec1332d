//! GraniteMoE (`granitemoe`): `config.json` mapping and tensor names.

use std::path::Path;

use serde_json::Value;

use super::config::cfg_err;
use crate::config::ModelConfig;
use crate::error::Result;

/// Maps the family's `config.json` onto a [`ModelConfig`].
pub(super) fn config(v: &Value, path: &Path) -> Result<ModelConfig> {
    let _ = v;
    Err(cfg_err(path, "this model_type is not implemented yet"))
}

/// The crate's (Mixtral) weight name -> the family's weight name.
pub(super) fn hf_name(ours: &str) -> String {
    ours.to_string()
}
