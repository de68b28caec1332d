//! Quantised checkpoint formats dequantised at load: FP8 e4m3 with 128×128 block scales
//! (DeepSeek-V3, `fp8.rs`) and MXFP4 blocks with E8M0 scales (gpt-oss, `mxfp4.rs`).

pub mod fp8;
pub(crate) mod mxfp4;
