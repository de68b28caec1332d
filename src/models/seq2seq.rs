//! Encoder-decoder MoE transformer (Vaswani et al. 2017 layout, pre-norm, shared embeddings)
//! with greedy decoding and beam search over a KV cache.

use candle_core::{bail, DType, Device, Module, Result, Tensor};

use crate::ops::HostRead;
use candle_nn::{Embedding, Linear, VarBuilder};

use super::{pool_aux, DecodeCache, LayerRouting, Trunk};
use crate::config::ModelConfig;

/// What [`Seq2Seq::forward`] returns.
#[derive(Debug, Clone)]
pub struct Seq2SeqOutput {
    /// Decoder logits `(b, t, vocab)`.
    pub logits: Tensor,
    /// Load-balancing loss pooled over the encoder's and decoder's sparse layers; scalar f32.
    pub load_balancing_loss: Tensor,
    /// Router z-loss pooled over all sparse layers; scalar f32.
    pub z_loss: Tensor,
    /// Per-layer routing statistics (encoder layers first, decoder layers numbered after).
    pub routing: Vec<LayerRouting>,
    /// The other balance losses (sequence-wise, importance / load; unscaled, `None` when
    /// their coefficient is 0) and every sparse layer's router outputs.
    pub balance: crate::losses::BalanceLosses,
}

/// An encoded source batch, reusable across decoding steps.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Encoder states `(b, s, h)`.
    pub hidden: Tensor,
    /// Source padding mask `(b, s)` (1 = token).
    pub mask: Option<Tensor>,
    aux: Vec<crate::losses::RouterAux>,
    routing: Vec<LayerRouting>,
}

/// An encoder-decoder transformer with sparse feed-forwards.
///
/// Weights: `shared.weight` (token embeddings of both sides), `encoder.layers.{i}.*`,
/// `encoder.norm.weight`, `decoder.layers.{i}.*` (with `cross_attn`), `decoder.norm.weight`,
/// and `lm_head.weight` unless tied.
#[derive(Debug)]
pub struct Seq2Seq {
    pub(super) encoder: Trunk,
    pub(super) decoder: Trunk,
    lm_head: Linear,
    cfg: ModelConfig,
}

impl Seq2Seq {
    /// Builds the model; `cfg.num_layers` encoder and `cfg.num_decoder_layers` decoder blocks.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        Self::new_validated(cfg, vb)
    }

    /// [`Self::new`] for a configuration already validated (the loaders validate it once).
    pub(crate) fn new_validated(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        // The decoder shares the encoder's configuration: expert choice is refused as soon as
        // a decoder layer is sparse (an encoder-only sparse stack may use it).
        if (0..cfg.num_decoder_layers).any(|i| cfg.is_sparse_layer(i)) {
            if let Err(e) = cfg.moe.check_causal_routing("the Seq2Seq decoder (causal)") {
                bail!("{e}")
            }
        }
        let shared: Embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("shared"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(shared.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let encoder = Trunk::new(
            cfg,
            cfg.num_layers,
            false,
            false,
            shared.clone(),
            vb.pp("encoder"),
        )?;
        let decoder = Trunk::new(
            cfg,
            cfg.num_decoder_layers,
            true,
            true,
            shared,
            vb.pp("decoder"),
        )?;
        Ok(Self {
            encoder,
            decoder,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Encodes a source batch.
    ///
    /// # Shapes
    /// - `src`, `src_mask`: `(b, s)` -> hidden `(b, s, h)`
    pub fn encode(&self, src: &Tensor, src_mask: Option<&Tensor>, train: bool) -> Result<Encoded> {
        let out = self
            .encoder
            .forward(src, None, src_mask, None, None, train, 0)?;
        Ok(Encoded {
            hidden: out.hidden,
            mask: src_mask.cloned(),
            aux: out.aux,
            routing: out.routing,
        })
    }

    /// Every sparse layer's trainable selection bias (`gate.e_score_correction_bias`, with
    /// `selection_bias`) with its layer index as in [`LayerRouting::layer`]: what
    /// [`crate::Trainer::track_selection_biases`] updates.
    pub fn selection_biases(&self) -> Vec<(usize, Tensor)> {
        super::selection_biases(&[
            (&self.encoder, 0),
            (&self.decoder, self.encoder.num_layers()),
        ])
    }

    /// Teacher-forced forward: encoder on `src`, decoder on `tgt_in`.
    ///
    /// # Shapes
    /// - `src`, `src_mask`: `(b, s)`; `tgt_in`, `tgt_mask`: `(b, t)` -> `logits` `(b, t, vocab)`
    pub fn forward_t(
        &self,
        src: &Tensor,
        src_mask: Option<&Tensor>,
        tgt_in: &Tensor,
        tgt_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Seq2SeqOutput> {
        let enc = self.encode(src, src_mask, train)?;
        let dec = self.decoder.forward(
            tgt_in,
            None,
            tgt_mask,
            Some((&enc.hidden, enc.mask.as_ref())),
            None,
            train,
            self.encoder.num_layers(),
        )?;
        let logits = self.lm_head.forward(&dec.hidden)?;
        let aux_all: Vec<_> = enc.aux.iter().chain(dec.aux.iter()).collect();
        let masks = if src_mask.is_some() || tgt_mask.is_some() {
            let dev = logits.device();
            let ones =
                |t: &Tensor| -> Result<Tensor> { Tensor::ones(t.elem_count(), DType::F32, dev) };
            let sm = match src_mask {
                Some(m) => m.flatten_all()?.to_dtype(DType::F32)?,
                None => ones(src)?,
            };
            let tm = match tgt_mask {
                Some(m) => m.flatten_all()?.to_dtype(DType::F32)?,
                None => ones(tgt_in)?,
            };
            let mut v = vec![sm; enc.aux.len()];
            v.extend(vec![tm; dec.aux.len()]);
            Some(v)
        } else {
            None
        };
        let (lb, z, balance) = pool_aux(
            &self.cfg,
            &aux_all,
            masks.as_deref(),
            logits.device(),
            logits.dim(0)?,
        )?;
        let mut routing = enc.routing;
        routing.extend(dec.routing);
        Ok(Seq2SeqOutput {
            logits,
            load_balancing_loss: lb,
            z_loss: z,
            routing,
            balance,
        })
    }

    /// Inference forward (no padding masks, no router noise).
    ///
    /// # Shapes
    /// - `src`: `(b, s)`, `tgt_in`: `(b, t)` -> `logits` `(b, t, vocab)`
    pub fn forward(&self, src: &Tensor, tgt_in: &Tensor) -> Result<Seq2SeqOutput> {
        self.forward_t(src, None, tgt_in, None, false)
    }

    /// A decoder cache sized for this model.
    pub fn new_cache(&self) -> DecodeCache {
        DecodeCache::new(self.decoder.num_layers())
    }

    /// One incremental decoder step over `tgt_new` (the positions after those in `cache`).
    ///
    /// # Shapes
    /// - `tgt_new`: `(b, t_new)` -> logits `(b, t_new, vocab)`
    pub fn decode_step(
        &self,
        enc: &Encoded,
        tgt_new: &Tensor,
        cache: &mut DecodeCache,
    ) -> Result<Tensor> {
        let dec = self.decoder.forward(
            tgt_new,
            None,
            None,
            Some((&enc.hidden, enc.mask.as_ref())),
            Some(cache),
            false,
            self.encoder.num_layers(),
        )?;
        self.lm_head.forward(&dec.hidden)
    }

    /// Greedy decoding of a source batch; each output stops at `eos` (excluded).
    pub fn generate_greedy(
        &self,
        src: &Tensor,
        src_mask: Option<&Tensor>,
        bos: u32,
        eos: u32,
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let enc = self.encode(src, src_mask, false)?;
        let b = src.dim(0)?;
        let dev = src.device();
        let mut cache = self.new_cache();
        let mut outs = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut next = vec![bos; b];
        let max_len = max_len.min(self.cfg.max_position_embeddings);
        for _ in 0..max_len {
            let inp = Tensor::from_vec(next.clone(), (b, 1), dev)?;
            let logits = self.decode_step(&enc, &inp, &mut cache)?; // (b, 1, vocab)
            let best = logits.squeeze(1)?.argmax(1)?.host_vec1::<u32>()?;
            for i in 0..b {
                if !done[i] {
                    if best[i] == eos {
                        done[i] = true;
                    } else {
                        outs[i].push(best[i]);
                    }
                }
            }
            next = best;
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Ok(outs)
    }

    /// Beam search for one source sentence `(1, s)`; scores are summed log-probabilities
    /// divided by `length^alpha` (Wu et al. 2016, GNMT length penalty).
    pub fn beam_search(
        &self,
        src: &Tensor,
        beam: usize,
        bos: u32,
        eos: u32,
        max_len: usize,
        alpha: f64,
    ) -> Result<Vec<u32>> {
        if src.dim(0)? != 1 {
            bail!(
                "beam_search: one source sentence at a time, got batch {}",
                src.dim(0)?
            )
        }
        let beam = beam.max(1);
        let dev: Device = src.device().clone();
        let enc1 = self.encode(src, None, false)?;
        let mut hyps: Vec<Hypothesis> = vec![(vec![], 0.0)];
        let mut finished: Vec<Hypothesis> = Vec::new();
        let mut cache = self.new_cache();
        let max_len = max_len.min(self.cfg.max_position_embeddings);
        for step in 0..max_len {
            let logp = self.beam_log_probs(&enc1, &hyps, bos, &mut cache, &dev)?;
            let (next, parents) = expand_beam(&hyps, &logp, beam, eos, alpha, &mut finished);
            let best_open = next
                .iter()
                .map(|(t, sc)| length_penalised(t, *sc, alpha))
                .fold(f64::NEG_INFINITY, f64::max);
            let best_done = finished
                .iter()
                .map(|f| f.1)
                .fold(f64::NEG_INFINITY, f64::max);
            if next.is_empty()
                || (finished.len() >= beam && best_done >= best_open)
                || step + 1 == max_len
            {
                if finished.is_empty() {
                    finished.extend(
                        next.iter()
                            .map(|(t, sc)| (t.clone(), length_penalised(t, *sc, alpha))),
                    );
                }
                break;
            }
            cache.reorder(&Tensor::from_vec(parents, next.len(), &dev)?)?;
            hyps = next;
        }
        let best = finished
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|f| f.0)
            .unwrap_or_default();
        Ok(best)
    }

    /// One beam-search decoder step: feeds each hypothesis's last token (`bos` for an empty one)
    /// and returns the next-token log-probabilities, one row per hypothesis.
    fn beam_log_probs(
        &self,
        enc1: &Encoded,
        hyps: &[Hypothesis],
        bos: u32,
        cache: &mut DecodeCache,
        dev: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let (_, s, h) = enc1.hidden.dims3()?;
        let n = hyps.len();
        let enc = Encoded {
            hidden: enc1.hidden.broadcast_as((n, s, h))?.contiguous()?,
            mask: None,
            aux: vec![],
            routing: vec![],
        };
        let last: Vec<u32> = hyps
            .iter()
            .map(|(t, _)| *t.last().unwrap_or(&bos))
            .collect();
        let inp = Tensor::from_vec(last, (n, 1), dev)?;
        let logits = self.decode_step(&enc, &inp, cache)?.squeeze(1)?; // (n, vocab)
        let logp = logits.broadcast_sub(
            &crate::ops::logsumexp_keepdim(&logits.to_dtype(DType::F32)?)?
                .to_dtype(logits.dtype())?,
        )?;
        logp.to_dtype(DType::F32)?.to_vec2()
    }
}

/// A beam hypothesis: the tokens so far and their summed log-probability.
type Hypothesis = (Vec<u32>, f64);

/// `score / (len + 1)^alpha`: the GNMT length penalty, counting the (pending) end token.
fn length_penalised(tokens: &[u32], score: f64, alpha: f64) -> f64 {
    score / ((tokens.len() + 1) as f64).powf(alpha)
}

/// Expands every hypothesis by its `beam` most likely tokens and keeps the best `beam` open
/// continuations, moving those that end in `eos` (length-penalised) into `finished`. Returns the
/// open continuations and, for each, the index of the hypothesis it extends.
fn expand_beam(
    hyps: &[Hypothesis],
    logp: &[Vec<f32>],
    beam: usize,
    eos: u32,
    alpha: f64,
    finished: &mut Vec<Hypothesis>,
) -> (Vec<Hypothesis>, Vec<u32>) {
    let mut cands: Vec<(usize, u32, f64)> = Vec::new();
    for (i, row) in logp.iter().enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &j in idx.iter().take(beam) {
            cands.push((i, j as u32, hyps[i].1 + row[j] as f64));
        }
    }
    cands.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut next: Vec<Hypothesis> = Vec::new();
    let mut parents: Vec<u32> = Vec::new();
    for (i, tok, score) in cands {
        if tok == eos {
            finished.push((
                hyps[i].0.clone(),
                length_penalised(&hyps[i].0, score, alpha),
            ));
        } else if next.len() < beam {
            let mut t = hyps[i].0.clone();
            t.push(tok);
            next.push((t, score));
            parents.push(i as u32);
        }
        if next.len() >= beam && finished.len() >= beam {
            break;
        }
    }
    (next, parents)
}
