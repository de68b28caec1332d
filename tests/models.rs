//! Whole-model checks: causality, KV cache, routing statistics, checkpoints and exact resume.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::losses::cross_entropy;
use candle_moe::train::{LossParts, TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig, Seq2Seq};
use candle_nn::{VarBuilder, VarMap};
use common::{max_abs_diff, randomize, Rng};

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::tiny(50);
    c.hidden_size = 32;
    c.moe.hidden_size = 32;
    c.moe.intermediate_size = 24;
    c.dense_intermediate_size = 48;
    c.max_position_embeddings = 64;
    c.num_layers = 3;
    c.sparse_step = 1;
    c
}

fn lm(cfg: &ModelConfig, seed: u64) -> (CausalLm, VarMap) {
    let vm = VarMap::new();
    let m = CausalLm::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(seed), 0.3);
    (m, vm)
}

fn load_err(d: &std::path::Path) -> String {
    match CausalLm::load(d, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading a bad checkpoint succeeded"),
        Err(e) => e.to_string(),
    }
}

fn ids(v: &[u32], b: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (b, v.len() / b), &Device::Cpu).unwrap()
}

#[test]
fn changing_token_t_never_changes_earlier_logits() {
    let mut cfg = tiny();
    cfg.sparse_step = 2; // dense and sparse blocks
    let (m, _) = lm(&cfg, 1);
    let base: Vec<u32> = (0..12).map(|i| (i * 7 % 50) as u32).collect();
    let l0 = m.forward(&ids(&base, 1)).unwrap().logits;
    assert_eq!(l0.dims(), &[1, 12, 50]);
    for t in [0usize, 5, 11] {
        let mut changed = base.clone();
        changed[t] = (changed[t] + 13) % 50;
        let l1 = m.forward(&ids(&changed, 1)).unwrap().logits;
        if t > 0 {
            let d = max_abs_diff(&l0.narrow(1, 0, t).unwrap(), &l1.narrow(1, 0, t).unwrap());
            assert!(d < 1e-6, "position < {t} changed by {d}");
        }
        let after = max_abs_diff(&l0.narrow(1, t, 1).unwrap(), &l1.narrow(1, t, 1).unwrap());
        assert!(
            after > 1e-4,
            "changing token {t} should change its own logits"
        );
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward_causal_lm() {
    let (m, _) = lm(&tiny(), 2);
    let seq: Vec<u32> = vec![3, 9, 27, 31, 4, 8, 15, 16, 23, 42];
    let full = m.forward(&ids(&seq, 1)).unwrap().logits;
    let mut cache = m.new_cache();
    // A prefix of 4, then one token at a time.
    let mut parts = vec![
        m.forward_cached(&ids(&seq[..4], 1), &mut cache)
            .unwrap()
            .logits,
    ];
    for &t in &seq[4..] {
        parts.push(m.forward_cached(&ids(&[t], 1), &mut cache).unwrap().logits);
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    assert_eq!(cache.len(), seq.len());
    let d = max_abs_diff(&full, &inc);
    assert!(d < 1e-5, "incremental vs full: {d}");
}

#[test]
fn kv_cache_decoding_equals_full_forward_seq2seq() {
    let cfg = tiny();
    let vm = VarMap::new();
    let m = Seq2Seq::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(3), 0.3);
    let src = ids(&[5, 6, 7, 8, 9, 10, 11, 12], 2);
    let tgt: Vec<u32> = vec![1, 20, 21, 22, 23, 1, 30, 31, 32, 33];
    let full = m.forward(&src, &ids(&tgt, 2)).unwrap().logits; // (2, 5, vocab)
    let enc = m.encode(&src, None, false).unwrap();
    let mut cache = m.new_cache();
    let mut parts = vec![];
    for t in 0..5 {
        let step = Tensor::from_vec(vec![tgt[t], tgt[5 + t]], (2, 1), &Device::Cpu).unwrap();
        parts.push(m.decode_step(&enc, &step, &mut cache).unwrap());
    }
    let d = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
    assert!(d < 1e-5, "seq2seq incremental vs full: {d}");
}

#[test]
fn routing_statistics_sum_to_tokens_times_k_minus_drops() {
    let mut cfg = tiny();
    cfg.moe.capacity_factor = Some(0.75);
    let (m, _) = lm(&cfg, 4);
    let seq: Vec<u32> = (0..40).map(|i| (i * 11 % 50) as u32).collect();
    let out = m.forward(&ids(&seq, 2)).unwrap();
    assert_eq!(out.routing.len(), 3);
    let mut any_drop = false;
    for r in &out.routing {
        assert_eq!(r.tokens, 40);
        assert_eq!(
            r.expert_counts.iter().sum::<usize>() + r.dropped,
            40 * cfg.moe.top_k
        );
        // Capacity: no expert keeps more than ceil(0.75 · 40 · 2 / 4) = 15.
        assert!(r.expert_counts.iter().all(|&c| c <= 15));
        any_drop |= r.dropped > 0;
    }
    assert!(any_drop, "capacity 0.75 should drop something");
    // The pooled loss equals the free function over the same logits.
    let lb = candle_moe::losses::load_balancing_loss(&out.router_logits, 4, 2, None).unwrap();
    let d = max_abs_diff(&lb, &out.load_balancing_loss);
    assert!(d < 1e-6);
}

#[test]
fn save_load_round_trip_and_bad_checkpoints_name_the_problem() {
    let cfg = tiny();
    let (m, vm) = lm(&cfg, 5);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint::save(d, &cfg, &vm, Some("{\"fake\": true}")).unwrap();
    let x = ids(&[1, 2, 3, 4, 5, 6], 1);
    let before = m.forward(&x).unwrap().logits;
    let (m2, _) = CausalLm::load(d, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&before, &m2.forward(&x).unwrap().logits), 0.0);
    assert!(d.join("tokenizer.json").exists());

    let weights = d.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // Truncated.
    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    let e = load_err(d);
    assert!(e.contains("model.safetensors"), "{e}");
    // Corrupted header.
    let mut bad = good.clone();
    for b in bad.iter_mut().skip(8).take(20) {
        *b = b'#';
    }
    std::fs::write(&weights, &bad).unwrap();
    let e = load_err(d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&weights, &good).unwrap();

    // Shape mismatch: weights of a wider expert layer under the same config.
    let mut wide = cfg.clone();
    wide.moe.intermediate_size = 40;
    let (_, vm_wide) = lm(&wide, 6);
    let other = tempfile::tempdir().unwrap();
    checkpoint::save(other.path(), &wide, &vm_wide, None).unwrap();
    std::fs::copy(other.path().join("model.safetensors"), &weights).unwrap();
    let e = load_err(d);
    assert!(
        e.contains("block_sparse_moe.experts.0.w1.weight") && e.contains("[40, 32]"),
        "{e}"
    );
    std::fs::write(&weights, &good).unwrap();

    // Missing tensor: a config with one more layer than the weights.
    let mut deeper = cfg.clone();
    deeper.num_layers = 4;
    std::fs::write(
        d.join("config.json"),
        serde_json::to_string(&deeper).unwrap(),
    )
    .unwrap();
    let e = load_err(d);
    assert!(e.contains("missing tensor `model.layers.3."), "{e}");
    std::fs::write(d.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();

    // A save that fails midway (the temporary file cannot be written) leaves the previous
    // checkpoint loadable and unchanged.
    std::fs::create_dir(d.join(".model.safetensors.tmp")).unwrap();
    let (_, vm3) = lm(&cfg, 7);
    let e = checkpoint::save(d, &cfg, &vm3, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(".model.safetensors.tmp"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), good);
    let (m4, _) = CausalLm::load(d, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&before, &m4.forward(&x).unwrap().logits), 0.0);
}

fn lm_step_loss(m: &CausalLm, rng: &mut rand::rngs::StdRng) -> LossParts {
    use rand::Rng as _;
    let seq: Vec<u32> = (0..24).map(|_| rng.random_range(0..50u32)).collect();
    let x = ids(&seq, 2);
    let out = m.forward_t(&x, None, true).unwrap();
    let logits = out
        .logits
        .narrow(1, 0, 11)
        .unwrap()
        .reshape((22, 50))
        .unwrap();
    let tgt = x.narrow(1, 1, 11).unwrap().flatten_all().unwrap();
    LossParts::from_output(cross_entropy(&logits, &tgt, None).unwrap(), &out)
}

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-2,
        warmup_steps: 2,
        seed: 9,
        progress: false,
        ..Default::default()
    }
}

#[test]
fn resume_is_bit_for_bit() {
    let cfg = tiny();
    let n = 8;
    // Straight run.
    let (m, vm) = lm(&cfg, 10);
    let mut tr = Trainer::new(&vm, train_cfg(n)).unwrap();
    tr.run(|rng| Ok(lm_step_loss(&m, rng)), || Ok(0.0), |_| Ok(()))
        .unwrap();
    let straight = candle_moe::io::safetensors::varmap_tensors(&vm).unwrap();

    // Half, save, load into a fresh model, the other half.
    let dir = tempfile::tempdir().unwrap();
    let (m1, vm1) = lm(&cfg, 10);
    let mut tr1 = Trainer::new(&vm1, train_cfg(n)).unwrap();
    tr1.run_until(
        n / 2,
        |rng| Ok(lm_step_loss(&m1, rng)),
        || Ok(0.0),
        |_| Ok(()),
    )
    .unwrap();
    checkpoint::save(dir.path(), &cfg, &vm1, None).unwrap();
    tr1.save_state(dir.path()).unwrap();
    drop((m1, vm1, tr1));

    let (m2, vm2) = CausalLm::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut tr2 = Trainer::new(&vm2, train_cfg(n)).unwrap();
    tr2.load_state(dir.path()).unwrap();
    assert_eq!(tr2.state.step, n / 2);
    tr2.run(|rng| Ok(lm_step_loss(&m2, rng)), || Ok(0.0), |_| Ok(()))
        .unwrap();
    let resumed = candle_moe::io::safetensors::varmap_tensors(&vm2).unwrap();
    assert_eq!(straight.len(), resumed.len());
    for (k, v) in &straight {
        let a = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = resumed[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} differs"
        );
    }
    // And training changed the weights at all.
    let (_, vm0) = lm(&cfg, 10);
    let init = candle_moe::io::safetensors::varmap_tensors(&vm0).unwrap();
    let w = "model.layers.0.block_sparse_moe.gate.weight";
    assert!(max_abs_diff(&init[w], &straight[w]) > 1e-4);
}

#[test]
fn dropout_is_training_only_reproducible_and_scaled() {
    let mut cfg = tiny();
    cfg.hidden_dropout = 0.3;
    let (m, vm) = lm(&cfg, 71);
    let plain = {
        let mut c = cfg.clone();
        c.hidden_dropout = 0.0;
        let ts = candle_moe::io::safetensors::varmap_tensors(&vm).unwrap();
        CausalLm::new(&c, VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)).unwrap()
    };
    let x = ids(&[1, 5, 9, 2, 7, 3, 4, 8, 6, 1, 2, 3], 2);
    // Inference: dropout is the identity.
    let a = m.forward(&x).unwrap().logits;
    let b = plain.forward(&x).unwrap().logits;
    assert!(max_abs_diff(&a, &b) == 0.0);
    // Training: masks differ from the identity, and the same seed gives the same masks.
    let t1 = m.forward_t(&x, None, true).unwrap().logits;
    assert!(max_abs_diff(&t1, &b) > 1e-3);
    let (m2, _) = lm(&cfg, 71);
    let t2 = m2.forward_t(&x, None, true).unwrap().logits;
    assert!(max_abs_diff(&t1, &t2) == 0.0);
    // The mask keeps about 1 - p of the elements, scaled by 1 / (1 - p) (mean preserved).
    let d = candle_moe::layers::Dropout::new(0.3, 5).unwrap();
    let ones = Tensor::ones((200, 100), DType::F32, &Device::Cpu).unwrap();
    let y = d.forward_t(&ones, true).unwrap().flatten_all().unwrap();
    let v = y.to_vec1::<f32>().unwrap();
    let kept = v.iter().filter(|&&e| e != 0.0).count() as f64 / v.len() as f64;
    assert!((kept - 0.7).abs() < 0.02, "kept {kept}");
    assert!(v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.7).abs() < 1e-6));
    assert!(candle_moe::layers::Dropout::new(1.0, 0).is_err());
    let mut bad = tiny();
    bad.hidden_dropout = 1.5;
    let e = match CausalLm::new(&bad, VarBuilder::zeros(DType::F32, &Device::Cpu)) {
        Ok(_) => panic!("hidden_dropout 1.5 accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("hidden_dropout"), "{e}");
}
