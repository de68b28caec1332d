//! What every model's forward reports about its sparse layers: per-layer routing statistics
//! ([`LayerRouting`]) and the task-independent parts of a training loss ([`RoutedOutput`]).

use candle_core::Tensor;

use super::{CausalLmOutput, ClassifierOutput, Seq2SeqOutput};

/// Routing statistics of one sparse layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRouting {
    /// Block index (in its stack; decoder layers of a seq2seq are numbered after the encoder's).
    pub layer: usize,
    /// Tokens the layer routed.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Kept assignments per expert (sums to `tokens · top_k - dropped`; under expert choice,
    /// the `C` tokens each expert picked).
    pub expert_counts: Vec<usize>,
    /// Assignments dropped by the capacity limit (under expert choice: tokens no expert
    /// picked).
    pub dropped: usize,
    /// Router entropy, mean probability per expert and selection bias of the forward.
    pub router: crate::moe::RouterStats,
}

impl LayerRouting {
    /// Routed (token, expert) assignments: the kept ones plus the dropped ones.
    pub fn assignments(&self) -> usize {
        self.expert_counts.iter().sum::<usize>() + self.dropped
    }

    /// Largest expert load over the mean load (1 = perfectly balanced, `E` = every assignment
    /// on one expert).
    pub fn imbalance(&self) -> f64 {
        let n = self.expert_counts.len().max(1) as f64;
        let total: usize = self.expert_counts.iter().sum();
        let max = self.expert_counts.iter().copied().max().unwrap_or(0) as f64;
        if total == 0 {
            1.0
        } else {
            max * n / total as f64
        }
    }
}

/// What the three models' outputs share: the task-independent parts of a training loss.
pub trait RoutedOutput {
    /// The pooled load-balancing loss (unscaled), scalar.
    fn load_balancing_loss(&self) -> &Tensor;
    /// The pooled router z-loss (unscaled), scalar.
    fn z_loss(&self) -> &Tensor;
    /// Per-layer routing statistics.
    fn routing(&self) -> &[LayerRouting];
    /// The other balance losses and the router outputs global-batch balancing needs.
    fn balance(&self) -> &crate::losses::BalanceLosses;
}

macro_rules! routed_output {
    ($t:ty) => {
        impl RoutedOutput for $t {
            fn load_balancing_loss(&self) -> &Tensor {
                &self.load_balancing_loss
            }
            fn z_loss(&self) -> &Tensor {
                &self.z_loss
            }
            fn routing(&self) -> &[LayerRouting] {
                &self.routing
            }
            fn balance(&self) -> &crate::losses::BalanceLosses {
                &self.balance
            }
        }
    };
}
routed_output!(CausalLmOutput);
routed_output!(Seq2SeqOutput);
routed_output!(ClassifierOutput);
