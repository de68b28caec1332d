//! The models learn: memorise a text, reverse sequences, and classify by a rule.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::losses::cross_entropy;
use candle_moe::train::{LossParts, TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig, Seq2Seq, SequenceClassifier};
use candle_nn::{VarBuilder, VarMap};

fn small(vocab: usize) -> ModelConfig {
    let mut c = ModelConfig::tiny(vocab);
    c.hidden_size = 48;
    c.moe.hidden_size = 48;
    c.moe.intermediate_size = 48;
    c.num_heads = 4;
    c.num_kv_heads = 4;
    c.max_position_embeddings = 64;
    c
}

fn tcfg(steps: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        steps,
        lr,
        warmup_steps: 10,
        weight_decay: 0.0,
        progress: false,
        seed: 1,
        ..Default::default()
    }
}

#[test]
fn causal_lm_memorises_a_short_text() {
    let text = "to be, or not to be, that is the question.";
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort();
    chars.dedup();
    let enc: Vec<u32> = text
        .chars()
        .map(|c| chars.iter().position(|x| *x == c).unwrap() as u32)
        .collect();
    let v = chars.len();
    let cfg = small(v);
    let vm = VarMap::new();
    let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 3).unwrap();
    let n = enc.len();
    let x = Tensor::from_vec(enc.clone(), (1, n), &Device::Cpu).unwrap();
    let inp = x.narrow(1, 0, n - 1).unwrap();
    let tgt = x.narrow(1, 1, n - 1).unwrap().flatten_all().unwrap();
    let mut tr = Trainer::new(&vm, tcfg(200, 1e-2)).unwrap();
    let mut last = f64::MAX;
    tr.run(
        |_| {
            let out = m.forward_t(&inp, None, true)?;
            let logits = out.logits.reshape((n - 1, v))?;
            Ok(LossParts::from_output(
                cross_entropy(&logits, &tgt, None)?,
                &out,
            ))
        },
        || {
            let out = m.forward(&inp)?;
            Ok(
                cross_entropy(&out.logits.reshape((n - 1, v))?, &tgt, None)?.to_scalar::<f32>()?
                    as f64,
            )
        },
        |_| Ok(()),
    )
    .unwrap();
    if let Some(e) = tr.state.evals.last() {
        last = e.1;
    }
    println!("memorisation loss after 200 steps: {last:.4}");
    assert!(last < 0.1, "final loss {last}");
    // Greedy generation from the first character reproduces the text.
    let gen = m
        .generate(
            &enc[..1],
            &candle_moe::SamplingConfig {
                max_new_tokens: n - 1,
                ..Default::default()
            },
        )
        .unwrap();
    let correct = gen.iter().zip(&enc[1..]).filter(|(a, b)| a == b).count();
    assert!(
        correct as f64 >= 0.9 * (n - 1) as f64,
        "{correct}/{}",
        n - 1
    );
}

const PAD: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;

fn reverse_batch(rng: &mut impl rand::Rng, b: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut src = vec![];
    let mut tgt = vec![];
    for _ in 0..b {
        let len = rng.random_range(3..=6);
        let s: Vec<u32> = (0..len).map(|_| rng.random_range(3..13u32)).collect();
        let mut t = s.clone();
        t.reverse();
        src.push(s);
        tgt.push(t);
    }
    (src, tgt)
}

fn pad(rows: &[Vec<u32>], len: usize) -> (Tensor, Tensor) {
    let mut ids = vec![];
    let mut mask = vec![];
    for r in rows {
        for i in 0..len {
            ids.push(*r.get(i).unwrap_or(&PAD));
            mask.push(if i < r.len() { 1u32 } else { 0 });
        }
    }
    let d = &Device::Cpu;
    (
        Tensor::from_vec(ids, (rows.len(), len), d).unwrap(),
        Tensor::from_vec(mask, (rows.len(), len), d).unwrap(),
    )
}

#[test]
fn seq2seq_learns_to_reverse_sequences() {
    let mut cfg = small(13);
    cfg.num_layers = 2;
    cfg.num_decoder_layers = 2;
    cfg.pad_token_id = Some(PAD);
    let vm = VarMap::new();
    let m = Seq2Seq::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 4).unwrap();
    let mut tr = Trainer::new(&vm, tcfg(800, 5e-3)).unwrap();
    tr.run(
        |rng| {
            let (src, tgt) = reverse_batch(rng, 32);
            let (s, sm) = pad(&src, 6);
            let tin: Vec<Vec<u32>> = tgt
                .iter()
                .map(|t| [vec![BOS], t.clone()].concat())
                .collect();
            let tout: Vec<Vec<u32>> = tgt
                .iter()
                .map(|t| [t.clone(), vec![EOS]].concat())
                .collect();
            let (ti, tm) = pad(&tin, 7);
            let (to, _) = pad(&tout, 7);
            let out = m.forward_t(&s, Some(&sm), &ti, Some(&tm), true)?;
            let logits = out.logits.reshape((32 * 7, 13))?;
            Ok(LossParts::from_output(
                cross_entropy(&logits, &to.flatten_all()?, Some(PAD))?,
                &out,
            ))
        },
        || Ok(0.0),
        |_| Ok(()),
    )
    .unwrap();
    // Held out: fresh sequences from another generator.
    let mut rng = rand::rngs::StdRng::seed_from_u64_compat(12345);
    let (src, tgt) = reverse_batch(&mut rng, 200);
    let mut correct = 0;
    for (s, t) in src.iter().zip(&tgt) {
        let x = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
        let out = m.generate_greedy(&x, None, BOS, EOS, 10).unwrap();
        correct += (&out[0] == t) as usize;
    }
    let acc = correct as f64 / 200.0;
    println!("reverse exact match: {acc:.3}");
    assert!(acc >= 0.9, "exact match {acc}");
    // Beam search agrees on a clear-cut case.
    let x = Tensor::from_vec(src[0].clone(), (1, src[0].len()), &Device::Cpu).unwrap();
    let beam = m.beam_search(&x, 4, BOS, EOS, 10, 1.0).unwrap();
    assert_eq!(beam.len(), tgt[0].len());
}

trait SeedCompat {
    fn seed_from_u64_compat(s: u64) -> Self;
}
impl SeedCompat for rand::rngs::StdRng {
    fn seed_from_u64_compat(s: u64) -> Self {
        <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(s)
    }
}

fn rule_batch(rng: &mut impl rand::Rng, b: usize) -> (Tensor, Tensor) {
    // Label 1 iff token 3 occurs in the sequence.
    let mut ids = vec![];
    let mut labels = vec![];
    for _ in 0..b {
        let want = rng.random_bool(0.5);
        let mut s: Vec<u32> = (0..10).map(|_| rng.random_range(4..20u32)).collect();
        if want {
            let i = rng.random_range(0..10);
            s[i] = 3;
        }
        labels.push(want as u32);
        ids.extend(s);
    }
    let d = &Device::Cpu;
    (
        Tensor::from_vec(ids, (b, 10), d).unwrap(),
        Tensor::from_vec(labels, b, d).unwrap(),
    )
}

#[test]
fn classifier_learns_a_synthetic_rule() {
    let mut cfg = small(20);
    cfg.num_labels = 2;
    let vm = VarMap::new();
    let m = SequenceClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 5).unwrap();
    let mut tr = Trainer::new(&vm, tcfg(150, 5e-3)).unwrap();
    tr.run(
        |rng| {
            let (x, y) = rule_batch(rng, 32);
            let out = m.forward_t(&x, None, None, true)?;
            Ok(LossParts::from_output(
                cross_entropy(&out.logits, &y, None)?,
                &out,
            ))
        },
        || Ok(0.0),
        |_| Ok(()),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64_compat(999);
    let (x, y) = rule_batch(&mut rng, 500);
    let pred = m.forward(&x, None).unwrap().logits.argmax(1).unwrap();
    let acc = pred
        .eq(&y)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("rule accuracy: {acc:.3}");
    assert!(acc >= 0.95, "accuracy {acc}");
}
