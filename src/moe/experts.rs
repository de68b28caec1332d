//! Expert feed-forwards and their batched compute over expert-contiguous segments.
//!
//! - SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"; Mixtral): `w2(silu(w1 x) ⊙ w3 x)`
//!   with Mixtral's names `w1` (gate proj, `(f, h)`), `w3` (up proj, `(f, h)`), `w2` (down proj,
//!   `(h, f)`).
//! - GELU MLP: `w2(gelu(w1 x))`.
//! - Shared experts (Qwen2-MoE): an always-on expert, optionally scaled by
//!   `sigmoid(shared_expert_gate(x))`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::ExpertKind;
use crate::layers::Proj;

/// One feed-forward expert (also the dense FFN of dense blocks).
#[derive(Debug, Clone)]
pub struct Expert {
    w1: Proj,
    w3: Option<Proj>,
    w2: Proj,
    /// gpt-oss's clamped SwiGLU `(limit, alpha)` (`None`: plain SwiGLU).
    clamp: Option<(f64, f64)>,
}

impl Expert {
    /// Creates an expert with weights `w1.weight` `(f, h)`, `w3.weight` `(f, h)` (SwiGLU only)
    /// and `w2.weight` `(h, f)` under `vb`.
    pub fn new(hidden: usize, inter: usize, kind: ExpertKind, vb: VarBuilder) -> Result<Self> {
        Self::new_with_bias(hidden, inter, kind, false, vb)
    }

    /// As [`Expert::new`], with `bias` vectors on every projection when `bias` is true (BERT).
    pub fn new_with_bias(
        hidden: usize,
        inter: usize,
        kind: ExpertKind,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let lin = |i, o, vb| Proj::new(i, o, bias, vb);
        let w1 = lin(hidden, inter, vb.pp("w1"))?;
        let w3 = match kind {
            ExpertKind::Swiglu => Some(lin(hidden, inter, vb.pp("w3"))?),
            ExpertKind::Gelu => None,
        };
        let w2 = lin(inter, hidden, vb.pp("w2"))?;
        Ok(Self {
            w1,
            w3,
            w2,
            clamp: None,
        })
    }

    /// Makes a SwiGLU expert gpt-oss's clamped SwiGLU:
    /// `(clamp(u, -limit, limit) + 1) · g' · sigmoid(alpha · g')` with `g' = min(g, limit)`.
    pub fn with_clamped_swiglu(mut self, limit: f64, alpha: f64) -> Self {
        self.clamp = Some((limit, alpha));
        self
    }

    /// Whether the expert is a plain (unclamped) SwiGLU, what the grouped and fused CPU paths
    /// compute.
    pub fn is_plain_swiglu(&self) -> bool {
        self.w3.is_some() && self.clamp.is_none()
    }

    /// Builds an expert from existing weight tensors (`w3` is `None` for a GELU MLP).
    pub fn from_weights(w1: Tensor, w3: Option<Tensor>, w2: Tensor) -> Self {
        let p = |w| Proj::from_linear(Linear::new(w, None));
        Self {
            w1: p(w1),
            w3: w3.map(p),
            w2: p(w2),
            clamp: None,
        }
    }

    /// Whether the projections carry biases.
    pub fn has_bias(&self) -> bool {
        self.w1.base().bias().is_some()
    }

    /// Whether any weight is a trainable variable (gradients may be needed).
    pub fn is_trainable(&self) -> bool {
        self.w1.weight().is_variable()
            || self.w2.weight().is_variable()
            || self.w3.as_ref().is_some_and(|w| w.weight().is_variable())
    }

    /// The projections with their names (`w1`, `w3`, `w2`), for attaching or merging adapters.
    pub fn projs_mut(&mut self) -> Vec<(&'static str, &mut Proj)> {
        let mut v = vec![("w1", &mut self.w1)];
        if let Some(w3) = self.w3.as_mut() {
            v.push(("w3", w3));
        }
        v.push(("w2", &mut self.w2));
        v
    }

    /// Whether any projection carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.w1.lora().is_some()
            || self.w2.lora().is_some()
            || self.w3.as_ref().is_some_and(|w| w.lora().is_some())
    }

    /// The projections `(w1, w3, w2)` with their adapters.
    pub fn projs(&self) -> (&Proj, Option<&Proj>, &Proj) {
        (&self.w1, self.w3.as_ref(), &self.w2)
    }

    /// The weights `(w1, w3, w2)`.
    pub fn weights(&self) -> (&Tensor, Option<&Tensor>, &Tensor) {
        (
            self.w1.weight(),
            self.w3.as_ref().map(|l| l.weight()),
            self.w2.weight(),
        )
    }
}

impl Module for Expert {
    /// # Shapes
    /// - `xs`: `(n, h)` or `(b, t, h)` -> same shape
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let a = self.w1.forward(xs)?; // (n, f)
        let hidden = match (&self.w3, self.clamp) {
            (Some(w3), Some((limit, alpha))) => {
                let g = a.minimum(limit)?;
                let u = w3.forward(xs)?.clamp(-limit, limit)?;
                let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha)?)?)?;
                ((u + 1.0)? * glu)?
            }
            (Some(w3), None) => (a.silu()? * w3.forward(xs)?)?,
            (None, _) => a.gelu_erf()?,
        };
        self.w2.forward(&hidden) // (n, h)
    }
}

/// The routed experts of one sparse layer.
#[derive(Debug, Clone)]
pub struct Experts {
    experts: Vec<Expert>,
    hidden: usize,
}

impl Experts {
    /// Makes every expert gpt-oss's clamped SwiGLU (see [`Expert::with_clamped_swiglu`]).
    pub fn with_clamped_swiglu(mut self, limit: f64, alpha: f64) -> Self {
        self.experts = self
            .experts
            .into_iter()
            .map(|e| e.with_clamped_swiglu(limit, alpha))
            .collect();
        self
    }

    /// Creates `n` experts named `{i}.w1`, `{i}.w3`, `{i}.w2` under `vb`.
    pub fn new(
        n: usize,
        hidden: usize,
        inter: usize,
        kind: ExpertKind,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let experts = (0..n)
            .map(|i| Expert::new_with_bias(hidden, inter, kind, bias, vb.pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { experts, hidden })
    }

    /// A set of experts built elsewhere (the expert-parallel layer holds only its rank's shard).
    pub(crate) fn from_experts(experts: Vec<Expert>, hidden: usize) -> Self {
        Self { experts, hidden }
    }

    /// The experts, by id.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// The experts, mutably (to attach or merge adapters).
    pub fn experts_mut(&mut self) -> &mut [Expert] {
        &mut self.experts
    }

    /// Runs expert `e` on rows `offsets[e]..offsets[e + 1]` of `xs` for every expert, each on
    /// its own contiguous segment, and stacks the results in the same order.
    ///
    /// # Shapes
    /// - `xs`: `(n_kept, h)` sorted by expert -> `(n_kept, h)`
    pub fn forward_segments(&self, xs: &Tensor, offsets: &[usize]) -> Result<Tensor> {
        if self.supports_grouped(xs) {
            if let Some(y) = self.forward_grouped(xs, offsets)? {
                return Ok(y);
            }
        }
        self.forward_segments_loop(xs, offsets)
    }

    /// Whether the grouped CPU op applies: f32 on CPU, bias-free SwiGLU experts.
    pub fn supports_grouped(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == candle_core::DType::F32
            && self.experts.iter().all(|e| {
                !e.has_bias()
                    && e.is_plain_swiglu()
                    && e.w1.weight().dtype() == candle_core::DType::F32
                    && e.w1.weight().device().is_cpu()
            })
    }

    /// SwiGLU on every segment with three grouped matmuls (call when
    /// [`Self::supports_grouped`]); `None` when it does not apply. Differentiable (see
    /// `moe::grouped`).
    pub fn forward_grouped(&self, xs: &Tensor, offsets: &[usize]) -> Result<Option<Tensor>> {
        if !self
            .experts
            .iter()
            .all(|e| e.is_plain_swiglu() && !e.has_bias())
        {
            return Ok(None);
        }
        let w1: Vec<&Proj> = self.experts.iter().map(|e| &e.w1).collect();
        let w3: Option<Vec<&Proj>> = self.experts.iter().map(|e| e.w3.as_ref()).collect();
        let Some(w3) = w3 else { return Ok(None) };
        let w2: Vec<&Proj> = self.experts.iter().map(|e| &e.w2).collect();
        let (Some(g), Some(u)) = (
            grouped_proj(xs, &w1, offsets)?,
            grouped_proj(xs, &w3, offsets)?,
        ) else {
            return Ok(None);
        }; // (n, f) each
        let h = (g.silu()? * u)?;
        grouped_proj(&h, &w2, offsets) // (n, h)
    }

    /// The plain loop: each expert's three matmuls on its segment, one expert after another
    /// (any dtype, device or expert kind; the reference the grouped path is tested against).
    ///
    /// # Shapes
    /// - `xs`: `(n_kept, h)` sorted by expert -> `(n_kept, h)`
    pub fn forward_segments_loop(&self, xs: &Tensor, offsets: &[usize]) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.experts.len());
        for (e, expert) in self.experts.iter().enumerate() {
            let (start, end) = (offsets[e], offsets[e + 1]);
            if end > start {
                outs.push(expert.forward(&xs.narrow(0, start, end - start)?)?);
            }
        }
        match outs.len() {
            0 => Tensor::zeros((0, self.hidden), xs.dtype(), xs.device()),
            1 => Ok(outs.remove(0)),
            _ => Tensor::cat(&outs, 0),
        }
    }
}

/// One projection of every expert over the expert segments, with the grouped op: the base
/// weights, plus `s · (x Aᵀ) Bᵀ` per expert when every expert has an adapter (split form, no
/// `ΔW` formed); `None` when only some experts have adapters (the loop handles that).
fn grouped_proj(xs: &Tensor, projs: &[&Proj], offsets: &[usize]) -> Result<Option<Tensor>> {
    let w: Vec<&Tensor> = projs.iter().map(|p| p.weight()).collect();
    let y = super::grouped::expert_matmul(xs, &w, offsets)?;
    let loras: Option<Vec<_>> = projs.iter().map(|p| p.lora()).collect();
    match loras {
        Some(l) if !l.is_empty() => {
            let a: Vec<&Tensor> = l.iter().map(|l| &l.a).collect();
            let b: Vec<&Tensor> = l.iter().map(|l| &l.b).collect();
            let low = super::grouped::expert_matmul(xs, &a, offsets)?; // (n, r)
            let delta = super::grouped::expert_matmul(&low, &b, offsets)?; // (n, out)
            Ok(Some((y + (delta * l[0].scale)?)?))
        }
        _ if projs.iter().any(|p| p.lora().is_some()) => Ok(None),
        _ => Ok(Some(y)),
    }
}

/// An always-on shared expert, optionally gated by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    expert: Expert,
    gate: Option<Linear>,
}

impl SharedExpert {
    /// Weights `shared_expert.{w1,w3,w2}.weight` and `shared_expert_gate.weight` `(1, h)` under
    /// `vb`.
    pub fn new(
        hidden: usize,
        inter: usize,
        kind: ExpertKind,
        gated: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let expert = Expert::new(hidden, inter, kind, vb.pp("shared_expert"))?;
        let gate = if gated {
            Some(candle_nn::linear_no_bias(
                hidden,
                1,
                vb.pp("shared_expert_gate"),
            )?)
        } else {
            None
        };
        Ok(Self { expert, gate })
    }
}

impl Module for SharedExpert {
    /// # Shapes
    /// - `xs`: `(n, h)` -> `(n, h)`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out = self.expert.forward(xs)?;
        match &self.gate {
            Some(g) => out.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(xs)?)?),
            None => Ok(out),
        }
    }
}
