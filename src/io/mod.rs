//! Everything that touches checkpoint files: where they are ([`hub`]), how safetensors are read,
//! checked and written ([`safetensors`]), the Hugging Face families ([`hf`]), BERT encoders
//! ([`bert`]) and the crate's own model directories ([`model_dir`]).

pub mod atomic;
pub(crate) mod backend;
pub mod bert;
pub mod hf;
pub mod hub;
pub mod inspect;
pub mod model_dir;
pub mod quant;
pub mod safetensors;
