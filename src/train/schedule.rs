//! Learning-rate schedules: linear warmup then cosine decay to a floor (as transformers'
//! `get_cosine_schedule_with_warmup` with a minimum ratio).

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
