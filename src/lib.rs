#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

// Modules in name order; the layer order (a module only imports from the layers below it) is
// in ARCHITECTURE.md and checked by tests/architecture.rs.
pub mod attention;
pub mod block;
pub mod classic;
pub mod config;
pub(crate) mod cpu;
#[cfg(feature = "tasks")]
pub mod data;
pub mod dist;
pub mod error;
pub(crate) mod files;
pub mod io;
pub mod layers;
pub mod losses;
pub mod models;
pub mod moe;
pub mod ops;
#[cfg(feature = "tasks")]
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod upcycle;

pub use block::TransformerBlock;
pub use config::{
    AttentionSpan, ExpertKind, ModelConfig, MoeConfig, NormKind, Pooling, PositionKind,
    RopeScaling, RouterScoring, RoutingKind,
};
pub use error::{Error, Result};
pub use io::hub::LoadOptions;
pub use layers::LoraConfig;
pub use models::generate::{Sampler, SamplingConfig};
pub use models::{
    CausalLm, CausalLmOutput, ClassifierOutput, DecodeCache, LayerRouting, Seq2Seq, Seq2SeqOutput,
    SequenceClassifier,
};
pub use moe::router::{Router, RouterOutput};
pub use moe::{MoeOutput, SparseMoe};
pub use train::{TrainConfig, Trainer};
