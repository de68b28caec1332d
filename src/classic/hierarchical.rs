//! Hierarchical mixture of experts (Jordan & Jacobs 1994, §2–4): a tree whose internal nodes are
//! softmax gates and whose leaves are experts,
//!
//! ```text
//! P(y|x) = Σ_i g_i(x) Σ_j g_{j|i}(x) P_ij(y|x)        (eq. 4, two levels; any depth here)
//! ```
//!
//! trained by EM with nested posteriors (eqs. 16–18): at every gate the posterior of child `c` is
//! `h_c = h_parent · g_c P_c / Σ_c' g_c' P_c'`, where `P_c` is the likelihood of the sub-tree
//! below `c`. The gate at a node is refit towards its children's joint posteriors `h_c`
//! (eq. 22), and each leaf expert on the data weighted by its joint posterior (eq. 21). A tree
//! whose root has a single branch reduces exactly to the flat [`MixtureOfExperts`](super::MixtureOfExperts).

use candle_core::{bail, DType, IndexOp, Result, Tensor};
use rand::Rng;

use super::expert::Expert;
use super::gate::SoftmaxGate;
use super::mixture::{EmConfig, EmReport};
use super::{gated_sum, logsumexp_last};

/// A node of a hierarchical mixture of experts.
pub enum HmeNode<E: Expert = Box<dyn Expert>> {
    /// An expert.
    Leaf(E),
    /// A softmax gate over the children (`gate.n_out() == children.len()`).
    Gate {
        /// The gate.
        gate: SoftmaxGate,
        /// The sub-trees it gates.
        children: Vec<HmeNode<E>>,
    },
}

impl<E: Expert> HmeNode<E> {
    fn validate(&self) -> Result<()> {
        if let HmeNode::Gate { gate, children } = self {
            if children.is_empty() || gate.n_out() != children.len() {
                bail!(
                    "HierarchicalMoe: a gate with {} outputs has {} children",
                    gate.n_out(),
                    children.len()
                )
            }
            for c in children {
                c.validate()?;
            }
        }
        Ok(())
    }

    fn n_leaves(&self) -> usize {
        match self {
            HmeNode::Leaf(_) => 1,
            HmeNode::Gate { children, .. } => children.iter().map(|c| c.n_leaves()).sum(),
        }
    }

    /// `log P(y_n | x_n)` of the sub-tree, `(n,)`.
    fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        match self {
            HmeNode::Leaf(e) => e.log_likelihood(xs, ys)?.to_dtype(DType::F64),
            HmeNode::Gate { gate, children } => {
                logsumexp_last(&Self::log_joint(gate, children, xs, ys)?)
            }
        }
    }

    /// `log g_c + log P_c` for the children of a gate, `(n, C)`.
    fn log_joint(
        gate: &SoftmaxGate,
        children: &[HmeNode<E>],
        xs: &Tensor,
        ys: &Tensor,
    ) -> Result<Tensor> {
        let cols = children
            .iter()
            .map(|c| c.log_likelihood(xs, ys))
            .collect::<Result<Vec<_>>>()?;
        gate.log_probs(xs)? + Tensor::stack(&cols, 1)? // (n, C)
    }

    fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            HmeNode::Leaf(e) => e.predict(xs)?.to_dtype(DType::F64),
            HmeNode::Gate { gate, children } => {
                let g = gate.probs(xs)?; // (n, C)
                let preds = children.iter().map(|child| child.predict(xs)); // (n, out) each
                gated_sum(&g, preds, "HierarchicalMoe: a gate without children")
            }
        }
    }

    /// Pushes `log P(leaf | x)` (prior path products) of every leaf, depth first.
    fn leaf_log_priors(
        &self,
        xs: &Tensor,
        log_prior: &Tensor,
        out: &mut Vec<Tensor>,
    ) -> Result<()> {
        match self {
            HmeNode::Leaf(_) => out.push(log_prior.clone()),
            HmeNode::Gate { gate, children } => {
                let lg = gate.log_probs(xs)?; // (n, C)
                for (c, child) in children.iter().enumerate() {
                    child.leaf_log_priors(xs, &(log_prior + lg.i((.., c))?)?, out)?;
                }
            }
        }
        Ok(())
    }

    /// Pushes the joint posterior `log h_leaf` of every leaf, depth first.
    fn leaf_log_posteriors(
        &self,
        xs: &Tensor,
        ys: &Tensor,
        log_post: &Tensor,
        out: &mut Vec<Tensor>,
    ) -> Result<()> {
        match self {
            HmeNode::Leaf(_) => out.push(log_post.clone()),
            HmeNode::Gate { gate, children } => {
                let child_post = Self::child_log_posteriors(gate, children, xs, ys, log_post)?;
                for (c, child) in children.iter().enumerate() {
                    child.leaf_log_posteriors(
                        xs,
                        ys,
                        &child_post.i((.., c))?.contiguous()?,
                        out,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Nested E-step at a gate: `log h_c = log h_parent + log g_c + log P_c − log Σ_c' g_c' P_c'`.
    fn child_log_posteriors(
        gate: &SoftmaxGate,
        children: &[HmeNode<E>],
        xs: &Tensor,
        ys: &Tensor,
        log_post: &Tensor,
    ) -> Result<Tensor> {
        let joint = Self::log_joint(gate, children, xs, ys)?.detach(); // (n, C)
        let lse = logsumexp_last(&joint)?.unsqueeze(1)?; // (n, 1)
        joint
            .broadcast_sub(&lse)?
            .broadcast_add(&log_post.unsqueeze(1)?) // (n, C)
    }

    /// E-step below this node with the current (old) parameters, then the M-step of this node's
    /// gate and the recursive update of its children. The children's posteriors are computed
    /// before anything in the sub-tree changes, so all M-steps use the same (old) E-step.
    fn em_update(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        log_post: &Tensor,
        gate_steps: usize,
    ) -> Result<()> {
        match self {
            HmeNode::Leaf(e) => e.m_step(xs, ys, &log_post.exp()?),
            HmeNode::Gate { gate, children } => {
                let child_post = Self::child_log_posteriors(gate, children, xs, ys, log_post)?; // (n, C)
                gate.m_step(xs, &child_post.exp()?, gate_steps)?;
                for (c, child) in children.iter_mut().enumerate() {
                    child.em_update(xs, ys, &child_post.i((.., c))?.contiguous()?, gate_steps)?;
                }
                Ok(())
            }
        }
    }

    fn randomize_gates<R: Rng + ?Sized>(
        &mut self,
        xs: &Tensor,
        scale: f64,
        rng: &mut R,
    ) -> Result<()> {
        if let HmeNode::Gate { gate, children } = self {
            gate.randomize(xs, scale, rng)?;
            for c in children {
                c.randomize_gates(xs, scale, rng)?;
            }
        }
        Ok(())
    }

    fn fit_leaves(&mut self, xs: &Tensor, ys: &Tensor, log_prior: &Tensor) -> Result<()> {
        match self {
            HmeNode::Leaf(e) => e.m_step(xs, ys, &log_prior.exp()?),
            HmeNode::Gate { gate, children } => {
                let lg = gate.log_probs(xs)?.detach(); // (n, C)
                for (c, child) in children.iter_mut().enumerate() {
                    child.fit_leaves(xs, ys, &(log_prior + lg.i((.., c))?)?)?;
                }
                Ok(())
            }
        }
    }
}

/// A hierarchical mixture of experts: a tree of [`SoftmaxGate`]s over [`Expert`] leaves, trained
/// by EM with nested posteriors.
pub struct HierarchicalMoe<E: Expert = Box<dyn Expert>> {
    root: HmeNode<E>,
}

impl<E: Expert> std::fmt::Debug for HierarchicalMoe<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HierarchicalMoe")
            .field("n_leaves", &self.root.n_leaves())
            .finish()
    }
}

impl<E: Expert> HierarchicalMoe<E> {
    /// A tree rooted at `root`; checks that every gate has as many outputs as children.
    pub fn new(root: HmeNode<E>) -> Result<Self> {
        root.validate()?;
        Ok(Self { root })
    }

    /// The two-level tree of Jordan & Jacobs: `top` gates over branches, each a gate over its
    /// experts.
    pub fn two_level(top: SoftmaxGate, branches: Vec<(SoftmaxGate, Vec<E>)>) -> Result<Self> {
        let children = branches
            .into_iter()
            .map(|(gate, experts)| HmeNode::Gate {
                gate,
                children: experts.into_iter().map(HmeNode::Leaf).collect(),
            })
            .collect();
        Self::new(HmeNode::Gate {
            gate: top,
            children,
        })
    }

    /// The root node.
    pub fn root(&self) -> &HmeNode<E> {
        &self.root
    }

    /// The root node, mutably.
    pub fn root_mut(&mut self) -> &mut HmeNode<E> {
        &mut self.root
    }

    /// Number of leaf experts.
    pub fn n_leaves(&self) -> usize {
        self.root.n_leaves()
    }

    /// The gate-weighted prediction `Σ_leaves P(leaf | x) μ_leaf(x)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, out_dim)`
    pub fn predict(&self, xs: &Tensor) -> Result<Tensor> {
        self.root.predict(xs)
    }

    /// Per-example log-likelihood `log P(y_n | x_n)`.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n,)`
    pub fn log_likelihood_per_example(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        self.root.log_likelihood(xs, ys)
    }

    /// Total log-likelihood `Σ_n log P(y_n | x_n)`.
    pub fn log_likelihood(&self, xs: &Tensor, ys: &Tensor) -> Result<f64> {
        self.root
            .log_likelihood(xs, ys)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    /// Prior probability of each leaf, the product of the gate outputs along its path.
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, n_leaves)` (leaves depth first); rows sum to one
    pub fn leaf_probs(&self, xs: &Tensor) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let mut cols = Vec::new();
        self.root
            .leaf_log_priors(xs, &Tensor::zeros(n, DType::F64, xs.device())?, &mut cols)?;
        Tensor::stack(&cols, 1)?.exp()
    }

    /// Joint posterior responsibility of each leaf (nested E-step).
    ///
    /// # Shapes
    /// - `xs`: `(n, in_dim)` → `(n, n_leaves)` (leaves depth first); rows sum to one
    pub fn leaf_posteriors(&self, xs: &Tensor, ys: &Tensor) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let mut cols = Vec::new();
        self.root.leaf_log_posteriors(
            xs,
            ys,
            &Tensor::zeros(n, DType::F64, xs.device())?,
            &mut cols,
        )?;
        Tensor::stack(&cols, 1)?.exp()
    }

    /// One EM iteration; returns the total log-likelihood before it.
    pub fn em_step(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<f64> {
        let ll = self.log_likelihood(xs, ys)?;
        let n = xs.dim(0)?;
        self.root.em_update(
            xs,
            ys,
            &Tensor::zeros(n, DType::F64, xs.device())?,
            cfg.gate_steps,
        )?;
        Ok(ll)
    }

    /// EM until `cfg.max_iters` iterations or a mean per-example log-likelihood change below
    /// `cfg.tol`; same report as [`MixtureOfExperts::fit_em`](super::MixtureOfExperts::fit_em).
    pub fn fit_em(&mut self, xs: &Tensor, ys: &Tensor, cfg: &EmConfig) -> Result<EmReport> {
        super::em::run_em(self, xs, ys, cfg)
    }

    /// Breaks the symmetry before EM: every gate gets random weights (see
    /// [`SoftmaxGate::randomize`]) and every leaf is fitted on the data weighted by its prior
    /// path probability.
    pub fn init_random<R: Rng + ?Sized>(
        &mut self,
        xs: &Tensor,
        ys: &Tensor,
        scale: f64,
        rng: &mut R,
    ) -> Result<()> {
        self.root.randomize_gates(xs, scale, rng)?;
        let n = xs.dim(0)?;
        self.root
            .fit_leaves(xs, ys, &Tensor::zeros(n, DType::F64, xs.device())?)
    }
}
