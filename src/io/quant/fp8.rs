//! FP8 e4m3 weights with `weight_scale_inv` 128×128 block scales (DeepSeek-V3).
