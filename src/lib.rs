//! # candle-moe
//!
//! Sparse mixture-of-experts (MoE) transformer layers for [candle](https://github.com/huggingface/candle):
//! a top-k softmax router, token dispatch by expert, SwiGLU experts, and the load-balancing and
//! router z-losses returned as values.
//!
//! ```text
//! token ids ─► embedding ─► N × TransformerBlock ─► final norm ─► head ─► task loss
//!                               ├─ norm ─► attention ─► +residual
//!                               └─ norm ─► FeedForward::{Dense | Sparse} ─► +residual
//! Sparse: router ─► dispatch (permute tokens by expert) ─► experts ─► combine (weighted, unpermute)
//! total loss = task loss + router_aux_loss_coef · load_balancing + router_z_loss_coef · z_loss
//! ```
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_moe::{MoeConfig, MoeOutput, SparseMoe};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let cfg = MoeConfig { hidden_size: 64, intermediate_size: 128, num_experts: 8, top_k: 2, ..Default::default() };
//! let moe = SparseMoe::new(&cfg, vb.pp("block_sparse_moe"))?;
//! let xs = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev)?;
//! let out: MoeOutput = moe.forward(&xs)?;
//! assert_eq!(out.hidden_states.dims(), &[2, 5, 64]);
//! assert_eq!(out.router_logits.dims(), &[10, 8]);
//! // Every token goes to exactly two experts (dropless).
//! assert_eq!(out.expert_counts.iter().sum::<usize>(), 10 * 2);
//! assert_eq!(out.dropped, 0);
//! // The load-balancing loss of a top-2 router is at least close to 2 (= 2 when balanced).
//! let lb = out.load_balancing_loss.to_scalar::<f32>()?;
//! assert!(lb > 1.0 && lb < 8.0);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

// Layers, bottom up (ARCHITECTURE.md): a module only imports from modules listed above it.
pub mod attention;
pub mod block;
pub mod classic;
pub mod config;
pub(crate) mod cpu;
#[cfg(feature = "tasks")]
pub mod data;
pub mod error;
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
pub use config::{ExpertKind, ModelConfig, MoeConfig, NormKind, Pooling, PositionKind};
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
