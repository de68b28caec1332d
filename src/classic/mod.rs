//! The classic mixture of experts (Jordan & Jacobs 1994): softmax-gated experts of any kind,
//! trained by expectation-maximisation; hierarchical MoE and mixture density networks.
