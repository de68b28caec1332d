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
    /// A checkpoint is missing a tensor, or has one of the wrong shape or dtype, an unexpected
    /// one, or is corrupt.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The safetensors (or index) file involved.
        path: PathBuf,
        /// The tensor involved, when there is one.
        tensor: Option<String>,
        /// What kind of problem it is (see also [`Error::checkpoint_kind`]).
        kind: Box<CheckpointErrorKind>,
        /// What is wrong, naming the tensor, in words.
        msg: String,
    },
    /// Training stopped (e.g. too many non-finite steps in a row).
    #[error("training stopped: {0}")]
    Training(String),
    /// Model surgery (upcycling) found models that do not fit together.
    #[error("upcycle: {0}")]
    Upcycle(String),
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

/// What is wrong with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointErrorKind {
    /// A tensor the model needs is not in the checkpoint.
    Missing,
    /// A tensor has another shape than the config implies.
    Shape {
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the model cannot use.
    Dtype {
        /// What was expected (e.g. "a float dtype").
        expected: String,
        /// The stored dtype.
        found: String,
    },
    /// The file is not a valid safetensors file, is truncated, or an index is malformed.
    Corrupt,
    /// A tensor the model does not have (the config disagrees with the weights).
    Unexpected,
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
    /// A corrupt-checkpoint error naming its file.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            tensor: None,
            kind: Box::new(CheckpointErrorKind::Corrupt),
            msg: msg.into(),
        }
    }
    /// A checkpoint error about one tensor.
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        kind: CheckpointErrorKind,
        msg: impl Into<String>,
    ) -> Self {
        Error::Checkpoint {
            path: path.into(),
            tensor: Some(tensor.into()),
            kind: Box::new(kind),
            msg: msg.into(),
        }
    }
    /// The kind of a checkpoint error (`None` for other errors).
    pub fn checkpoint_kind(&self) -> Option<&CheckpointErrorKind> {
        match self {
            Error::Checkpoint { kind, .. } => Some(kind),
            _ => None,
        }
    }
}
