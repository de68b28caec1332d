//! GraniteMoE (`granitemoe`): a tiny random model written by transformers 5.24
//! (`tests/fixtures/gen_hf_granite.py`) loads through `from_pretrained` and reproduces
//! transformers' logits (1e-4) and `aux_loss` (1e-5) with and without a padding mask, decoding
//! with the KV cache equals the full forward, the 4.x spelling of its config.json and the copy
//! saved with fused `experts.gate_up_proj` give the same logits, and the config maps its four
//! multipliers.

mod common;

use common::json::{check_parity, flat, ids, max_diff};

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_moe::{CausalLm, LoadOptions};
use serde_json::Value;

fn fixture(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join("granitemoe")
}

fn expected() -> Value {
    let p = fixture("hf_v5").join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(dir: &Path) -> CausalLm {
    CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

/// Max |got - want| over the positions where `keep` is true (all when `None`).
#[test]
fn granitemoe_matches_transformers() {
    check_parity(&load(&fixture("hf_v5")), &expected(), "granitemoe");
}

#[test]
fn granitemoe_trainable_load_matches_transformers() {
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let m = CausalLm::from_pretrained(fixture("hf_v5").to_str().unwrap(), &opts).unwrap();
    let vm = m.varmap().unwrap();
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    // Every expert is a variable of its own, sliced from `input_linear` / `output_linear`.
    for n in [
        "model.layers.1.block_sparse_moe.experts.3.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.0.block_sparse_moe.router.layer.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    check_parity(&m, &expected(), "granitemoe (trainable)");
}

#[test]
fn granitemoe_decode_with_cache_equals_full_forward() {
    let exp = expected();
    let model = load(&fixture("hf_v5"));
    let input = ids(&exp["input_ids"]);
    let t = input.dim(1).unwrap();
    let mut cache = model.new_cache();
    let mut steps = vec![];
    // Prefill three tokens, then one at a time.
    steps.push(
        model
            .forward_cached(&input.narrow(1, 0, 3).unwrap(), &mut cache)
            .unwrap()
            .logits,
    );
    for i in 3..t {
        let step = input.narrow(1, i, 1).unwrap();
        steps.push(model.forward_cached(&step, &mut cache).unwrap().logits);
    }
    let got = Tensor::cat(&steps, 1).unwrap();
    let d = max_diff(&got, &flat(&exp["logits"]), None);
    assert!(d <= 1e-4, "decode differs from transformers by {d}");
}

#[test]
fn granitemoe_v4_config_and_fused_copy_give_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, config) in [
        ("hf_v5", "config.v4.json"),
        ("hf_v5_fused", "config.json"),
        ("hf_v5_fused", "config.v4.json"),
    ] {
        let src = fixture(set);
        let dst = tmp.path().join(format!("{set}_{config}"));
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
        std::fs::copy(src.join(config), dst.join("config.json")).unwrap();
        check_parity(&load(&dst), &expected(), &format!("{set}/{config}"));
    }
}

#[test]
fn granitemoe_config_maps_the_multipliers() {
    let (fam, cfg) =
        candle_moe::io::hf::read_hf_config(&fixture("hf_v5").join("config.json")).unwrap();
    assert_eq!(fam, candle_moe::io::hf::Family::GraniteMoe);
    assert_eq!(cfg.embedding_multiplier, 12.0);
    assert_eq!(cfg.residual_multiplier, 0.22);
    assert_eq!(cfg.attention_multiplier, Some(0.125));
    assert_eq!(cfg.logits_scaling, 6.0);
    assert_eq!(cfg.rope_theta, 5e4);
    assert_eq!(cfg.norm_eps, 1e-6);
    assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (4, 2));
    assert!(cfg.moe.norm_topk_prob);
    assert_eq!(cfg.moe.router_aux_loss_coef, 0.01);
    // Keys left out take GraniteMoeConfig's defaults (attention_multiplier 1.0, not
    // 1/sqrt(head_dim)).
    let v = serde_json::json!({"model_type": "granitemoe", "hidden_size": 64,
        "num_attention_heads": 4, "intermediate_size": 32, "vocab_size": 50});
    let (_, d) = candle_moe::io::hf::config_from_hf(&v, Path::new("config.json")).unwrap();
    assert_eq!(d.attention_multiplier, Some(1.0));
    assert_eq!(
        (
            d.embedding_multiplier,
            d.residual_multiplier,
            d.logits_scaling
        ),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(
        (d.num_kv_heads, d.moe.num_experts, d.num_layers),
        (4, 8, 32)
    );
    assert_eq!(d.rope_theta, 10_000.0);
    assert!(!d.tie_word_embeddings);
}

/// `input_linear` of the wrong shape names the tensor and the shape the config implies.
#[test]
fn granitemoe_input_linear_of_the_wrong_shape_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("hf_v5");
    let dst = tmp.path().join("bad");
    std::fs::create_dir_all(&dst).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(48);
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let e = match CausalLm::from_pretrained(dst.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.block_sparse_moe.input_linear.weight"),
        "{msg}"
    );
    match e.checkpoint_kind() {
        Some(candle_moe::error::CheckpointErrorKind::Shape { expected, found }) => {
            assert_eq!(expected, &vec![4, 96, 32]);
            assert_eq!(found, &vec![4, 128, 32]);
        }
        k => panic!("{k:?}: {msg}"),
    }
}
