//! Reseeding every random stream of a model (dropout masks, router noise and jitter) from one
//! seed, per layer: what makes a resumed training run draw exactly the noise the uninterrupted
//! run would have drawn.

use super::causal_lm::CausalLm;
use super::classifier::SequenceClassifier;
use super::seq2seq::Seq2Seq;

impl CausalLm {
    /// Restarts the model's generators (dropout masks; each sparse layer's router noise and
    /// jitter, layer `l` from its own stream of `seed`). A training loop that calls it before
    /// each step with a seed that is a function of (run seed, step) — e.g. drawn from
    /// [`Trainer::step_rng`](crate::train::Trainer::step_rng) — draws the same noise after a
    /// resume as without one.
    pub fn reseed(&self, seed: u64) {
        self.trunk.reseed(seed, 0);
    }
}

impl SequenceClassifier {
    /// As [`CausalLm::reseed`].
    pub fn reseed(&self, seed: u64) {
        self.trunk.reseed(seed, 0);
    }
}

impl Seq2Seq {
    /// As [`CausalLm::reseed`], with separate streams for the encoder and the decoder.
    pub fn reseed(&self, seed: u64) {
        self.encoder.reseed(seed, 0);
        self.decoder.reseed(seed, 1);
    }
}
