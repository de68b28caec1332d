//! Learning-rate schedules: linear warmup then cosine decay to a floor, transformers'
//! `get_cosine_with_min_lr_schedule_with_warmup` (`get_cosine_schedule_with_warmup` when the
//! floor is 0) with one difference: transformers' first warmup step runs at learning rate 0
//! (step `s` gets `s / warmup`), ours at `1 / warmup` (step `s` gets `(s + 1) / warmup`); after
//! the warmup both are equal (checked against transformers in `tests/train_oracle.rs`).

/// Learning rate at `step` (0-based) of a `steps`-step run: linear warmup over `warmup` steps
/// to `lr`, then cosine decay to `min_ratio · lr` at `steps`.
pub fn warmup_cosine(step: usize, steps: usize, warmup: usize, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    let min = lr * min_ratio;
    min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * p).cos())
}
