//! The crate error type for the IO, checkpoint, hub, tokenizer and config edges.
//!
//! Layers return [`candle_core::Result`]; everything that touches files, JSON or the hub
//! returns [`Error`], whose message names the file, the tensor and the expected vs found value.

use std::path::PathBuf;

/// Errors at the crate's edges (files, configs, checkpoints, tokenizers, hub).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; the message names the field.
    #[error("invalid config: {0}")]
    Config(String),
    /// A JSON file could not be parsed.
    #[error("malformed JSON in {path}: {source}")]
    Json {
        /// The file that failed to parse.
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
    },
    /// An IO error on a named file.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// A checkpoint is missing a tensor, or has one of the wrong shape or dtype, or is corrupt.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The safetensors (or index) file involved.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        msg: String,
    },
    /// A tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file (or `<memory>`).
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A Hugging Face Hub lookup failed.
    #[error("hub: {0}")]
    Hub(String),
    /// A data file is malformed.
    #[error("data file {path}, line {line}: {msg}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// An error from a candle tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the crate's edges.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An IO error naming its file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A checkpoint error naming its file.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
