//! DeepSeek-V2 / V3 checkpoints written by transformers 5.24 (`tests/fixtures/gen_hf_deepseek.py`,
//! `tests/fixtures/hf_v5/deepseek_*`): logits with and without a padding mask, both config
//! spellings, KV-cache decoding, the routers on crafted inputs whose best experts are spread
//! over the groups, FP8 block-quantised weights, the multi-token-prediction layer, bad input;
//! and the round trip: what `save_pretrained` writes, transformers loads with no missing or
//! unexpected keys and the same logits (`tests/fixtures/gen_roundtrip_deepseek.py`).

mod common;

use common::json::ids;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_moe::config::{GroupScore, RouterScoring};
use candle_moe::{CausalLm, LoadOptions, MoeConfig, Router};
use candle_nn::VarBuilder;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_v5")
        .join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap())
        .unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    let mut out = vec![];
    flat(v, &mut out);
    out
}

fn load(dir: &Path) -> CausalLm {
    CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn max_diff(got: &Tensor, want: &[f64]) -> f64 {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// Logits to 1e-4 without and with the padding mask.
fn check_logits(model: &CausalLm, name: &str) {
    let exp = expected(name);
    assert_eq!(exp["has_aux_loss"], Value::Bool(false));
    let input = ids(&exp["input_ids"]);
    let out = model.forward(&input).unwrap();
    let d = max_diff(&out.logits, &floats(&exp["logits"]));
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    let mask = ids(&exp["attention_mask"]);
    let out = model.forward_t(&input, Some(&mask), false).unwrap();
    let d = max_diff(&out.logits, &floats(&exp["logits_masked"]));
    assert!(d < 1e-4, "{name}: masked logits differ by {d}");
}

/// A copy of a fixture directory with `config.json` replaced by `config` (or edited by `edit`).
fn copy_with(name: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg = tmp.path().join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    tmp
}

fn v4_copy(name: &str) -> tempfile::TempDir {
    let v4: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("config.v4.json")).unwrap(),
    )
    .unwrap();
    copy_with(name, |v| *v = v4)
}

fn load_err(dir: &Path) -> String {
    CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn deepseek_v2_matches_transformers() {
    let model = load(&fixture("deepseek_v2"));
    check_logits(&model, "deepseek_v2");
    let cfg = model.config();
    assert!(!cfg.is_sparse_layer(0) && cfg.is_sparse_layer(1) && cfg.is_sparse_layer(2));
    assert_eq!(cfg.mla.as_ref().unwrap().q_lora_rank, None);
    assert_eq!(cfg.moe.n_group, 4);
    assert_eq!(cfg.moe.group_score, GroupScore::Max);
}

#[test]
fn deepseek_v3_matches_transformers() {
    let model = load(&fixture("deepseek_v3"));
    check_logits(&model, "deepseek_v3");
    let cfg = model.config();
    assert_eq!(cfg.mla.as_ref().unwrap().q_lora_rank, Some(12));
    assert_eq!(cfg.moe.scoring, RouterScoring::Sigmoid);
    assert_eq!(cfg.moe.routed_scaling_factor, 2.5);
    assert!(cfg.moe.selection_bias);
}

#[test]
fn v4_and_v5_configs_give_the_same_logits() {
    for name in ["deepseek_v2", "deepseek_v3"] {
        let exp = expected(name);
        let input = ids(&exp["input_ids"]);
        let a = load(&fixture(name)).forward(&input).unwrap().logits;
        let dir = v4_copy(name);
        let b = load(dir.path()).forward(&input).unwrap().logits;
        let d = max_diff(&b, &floats(&exp["logits"]));
        assert!(d < 1e-4, "{name} v4 config: logits differ by {d}");
        let same = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for name in ["deepseek_v2", "deepseek_v3"] {
        let model = load(&fixture(name));
        let input = ids(&expected(name)["input_ids"]);
        let full = model.forward(&input).unwrap().logits; // (2, 7, 96)
        let mut cache = model.new_cache();
        let mut parts = vec![
            model
                .forward_cached(&input.narrow(1, 0, 3).unwrap(), &mut cache)
                .unwrap()
                .logits,
        ];
        for t in 3..7 {
            let step = input.narrow(1, t, 1).unwrap();
            parts.push(model.forward_cached(&step, &mut cache).unwrap().logits);
        }
        let dec = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(
            &dec,
            &full
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
        );
        assert!(d < 1e-4, "{name}: decode vs full forward differ by {d}");
    }
}

/// transformers' router on crafted hidden states: chosen experts exactly, weights to 1e-5.
#[test]
fn crafted_routing_matches_transformers() {
    let mut seen = vec![];
    for name in ["deepseek_v2", "deepseek_v3"] {
        for case in expected(name)["routing_cases"].as_array().unwrap() {
            let v3 = case["topk_method"] == "noaux_tc";
            let gate = floats(&case["gate_weight"]);
            let e = case["router_logits"][0].as_array().unwrap().len();
            let h = gate.len() / e;
            let cfg = MoeConfig {
                hidden_size: h,
                intermediate_size: 4,
                num_experts: e,
                top_k: case["top_k"].as_u64().unwrap() as usize,
                norm_topk_prob: case["norm_topk_prob"].as_bool().unwrap(),
                scoring: if v3 {
                    RouterScoring::Sigmoid
                } else {
                    RouterScoring::Softmax
                },
                selection_bias: v3,
                n_group: case["n_group"].as_u64().unwrap() as usize,
                topk_group: case["topk_group"].as_u64().unwrap() as usize,
                group_score: if v3 {
                    GroupScore::Top2Sum
                } else {
                    GroupScore::Max
                },
                routed_scaling_factor: case["routed_scaling_factor"].as_f64().unwrap(),
                ..Default::default()
            };
            let dev = Device::Cpu;
            let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
            let mut ts = HashMap::new();
            ts.insert(
                "gate.weight".to_string(),
                Tensor::from_vec(f32s(gate), (e, h), &dev).unwrap(),
            );
            if v3 {
                let b = f32s(floats(&case["bias"]));
                ts.insert(
                    "gate.e_score_correction_bias".to_string(),
                    Tensor::from_vec(b, e, &dev).unwrap(),
                );
            }
            let router = Router::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &dev)).unwrap();
            let x = f32s(floats(&case["x"]));
            let n = x.len() / h;
            let out = router
                .forward_t(&Tensor::from_vec(x, (n, h), &dev).unwrap(), false)
                .unwrap();
            let d = max_diff(&out.logits, &floats(&case["router_logits"]));
            assert!(d < 1e-4, "{}: router logits differ by {d}", case["name"]);
            let experts = out.experts.to_vec2::<u32>().unwrap();
            let weights = out.weights.to_vec2::<f32>().unwrap();
            let want_w = case["weights"].as_array().unwrap();
            for (i, row) in case["experts"].as_array().unwrap().iter().enumerate() {
                let want: Vec<u32> = row
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                let mut got: Vec<(u32, f32)> = experts[i]
                    .iter()
                    .copied()
                    .zip(weights[i].iter().copied())
                    .collect();
                got.sort_by_key(|p| p.0);
                let got_ids: Vec<u32> = got.iter().map(|p| p.0).collect();
                assert_eq!(got_ids, want, "{} token {i}", case["name"]);
                for (j, (_, w)) in got.iter().enumerate() {
                    let ww = want_w[i][j].as_f64().unwrap();
                    assert!(
                        (*w as f64 - ww).abs() < 1e-5,
                        "{} token {i}: weight {w} vs {ww}",
                        case["name"]
                    );
                }
            }
            seen.push(case["name"].as_str().unwrap().to_string());
        }
    }
    assert!(seen.len() >= 3, "{seen:?}");
}

/// DeepSeek-V2 saved by transformers with fused experts (`gen_hf_fused.py`,
/// `tests/fixtures/hf_v5_fused/deepseek_v2`): the per-expert model's logits, with the v5 and the
/// v4 config.
#[test]
fn v2_fused_expert_copy_gives_the_same_logits() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_v5_fused/deepseek_v2");
    let exp = expected("deepseek_v2");
    for config in ["config.json", "config.v4.json"] {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", config] {
            std::fs::copy(
                dir.join(f),
                tmp.path().join(if f == config { "config.json" } else { f }),
            )
            .unwrap();
        }
        let out = load(tmp.path()).forward(&ids(&exp["input_ids"])).unwrap();
        let d = max_diff(&out.logits, &floats(&exp["logits"]));
        assert!(d < 1e-4, "fused V2 ({config}): logits differ by {d}");
    }
}

#[test]
fn fused_expert_copy_gives_the_same_logits() {
    let model = load(&fixture("deepseek_v3_fused"));
    let exp = expected("deepseek_v3");
    let out = model.forward(&ids(&exp["input_ids"])).unwrap();
    let d = max_diff(&out.logits, &floats(&exp["logits"]));
    assert!(d < 1e-4, "fused copy: logits differ by {d}");
}

#[test]
fn yarn_matches_transformers_past_the_original_length() {
    let model = load(&fixture("deepseek_v3_yarn"));
    check_logits(&model, "deepseek_v3_yarn");
    let dir = v4_copy("deepseek_v3_yarn");
    check_logits(&load(dir.path()), "deepseek_v3_yarn");
}

#[test]
fn yarn_config_maps_onto_rope_scaling_and_the_mla_scale() {
    use candle_moe::config::RopeScaling;
    for dir in [
        fixture("deepseek_v3_yarn"),
        v4_copy("deepseek_v3_yarn").keep(),
    ] {
        let (_, cfg) = candle_moe::io::hf::read_hf_config(&dir.join("config.json")).unwrap();
        match cfg.rope_scaling {
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                mscale,
                mscale_all_dim,
                ..
            }) => {
                assert_eq!(factor, 4.0);
                assert_eq!(original_max_position_embeddings, 16);
                assert_eq!((mscale, mscale_all_dim), (Some(1.0), Some(1.0)));
            }
            ref other => panic!("{other:?}"),
        }
        // transformers: qk_head_dim^-0.5 · (0.1 · 1.0 · ln 4 + 1)²
        let m = 0.1 * 4f64.ln() + 1.0;
        let want = m * m / 12f64.sqrt();
        let got = candle_moe::attention::mla::mla_softmax_scale(12, cfg.rope_scaling.as_ref());
        assert!((got - want).abs() < 1e-12);
    }
}

#[test]
fn fp8_weights_dequantise_to_the_reference() {
    let dir = fixture("deepseek_v3_fp8");
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    // A lone 200×136 weight: 2×2 blocks, partial in both directions.
    let big =
        candle_moe::io::quant::fp8::read_dequantized(&dir.join("big.fp8.safetensors")).unwrap();
    let d = max_diff(
        &big["big.weight"],
        &reference["big.weight"]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap(),
    );
    assert!(d < 1e-6, "big.weight differs by {d}");
    // The model: every quantised projection equals the reference, the logits the dequantised
    // transformers model's.
    let model = load(&dir);
    check_logits(&model, "deepseek_v3_fp8");
    let params: HashMap<String, Tensor> = model.parameters().iter().cloned().collect();
    let mut checked = 0;
    for (name, want) in &reference {
        let Some(ours) = params.iter().find_map(|(n, t)| {
            let theirs = n
                .replace(".block_sparse_moe.", ".mlp.")
                .replace(".shared_expert.", ".shared_experts.")
                .replace(".w1.", ".gate_proj.")
                .replace(".w3.", ".up_proj.")
                .replace(".w2.", ".down_proj.");
            (&theirs == name).then_some(t)
        }) else {
            continue;
        };
        let d = max_diff(
            ours,
            &want
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
        );
        assert!(d < 1e-6, "{name} differs by {d}");
        checked += 1;
    }
    assert!(checked > 30, "only {checked} weights compared");
}

#[test]
fn fp8_weight_without_its_scale_is_an_error_naming_it() {
    let err = load_err(&fixture("deepseek_v3_fp8_noscale"));
    assert!(
        err.contains("model.layers.1.mlp.experts.3.up_proj.weight"),
        "{err}"
    );
    assert!(err.contains("scale"), "{err}");
}

#[test]
fn the_multi_token_prediction_layer_is_skipped_for_v3_only() {
    for (name, ok) in [("deepseek_v3", true), ("deepseek_v2", false)] {
        let tmp = copy_with(name, |_| {});
        let path = tmp.path().join("model.safetensors");
        let mut ts = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let extra: Vec<(String, Tensor)> = ts
            .iter()
            .filter(|(k, _)| k.starts_with("model.layers.2."))
            .map(|(k, t)| (k.replace("model.layers.2.", "model.layers.3."), t.clone()))
            .collect();
        ts.extend(extra);
        ts.insert(
            "model.layers.3.enorm.weight".into(),
            Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&ts, &path).unwrap();
        if ok {
            let model = load(tmp.path());
            let exp = expected(name);
            let out = model.forward(&ids(&exp["input_ids"])).unwrap();
            let d = max_diff(&out.logits, &floats(&exp["logits"]));
            assert!(d < 1e-4, "{name}: logits differ by {d}");
        } else {
            let err = load_err(tmp.path());
            assert!(err.contains("model.layers.3."), "{err}");
        }
    }
}

#[test]
fn trainable_load_makes_the_selection_bias_a_variable_adamw_skips() {
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let model = CausalLm::from_pretrained(fixture("deepseek_v3").to_str().unwrap(), &opts).unwrap();
    let vm = model.varmap().unwrap().clone();
    let vars = vm.data().lock().unwrap();
    assert!(vars.contains_key("model.layers.1.mlp.gate.weight"));
    // A variable (the trainer's bias update moves it, checkpoints save it), never optimised.
    let bias = vars["model.layers.1.mlp.gate.e_score_correction_bias"].clone();
    drop(vars);
    let trainer = candle_moe::Trainer::new(&vm, Default::default()).unwrap();
    assert!(trainer
        .optimizer()
        .vars()
        .all(|v| v.as_tensor().id() != bias.as_tensor().id()));
    assert!(model
        .parameters()
        .iter()
        .any(|(n, _)| n.ends_with("gate.e_score_correction_bias")));
}

#[test]
fn bad_deepseek_configs_name_the_key() {
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("deepseek_v3", "n_group", Value::from(3), "n_group"),
        ("deepseek_v3", "topk_group", Value::from(5), "topk_group"),
        ("deepseek_v2", "n_group", Value::from(3), "n_group"),
        (
            "deepseek_v2",
            "topk_method",
            Value::from("bogus"),
            "topk_method",
        ),
        (
            "deepseek_v3",
            "topk_method",
            Value::from("greedy"),
            "topk_method",
        ),
        (
            "deepseek_v3",
            "scoring_func",
            Value::from("softplus"),
            "scoring_func",
        ),
        (
            "deepseek_v2",
            "scoring_func",
            Value::from("sigmoid"),
            "scoring_func",
        ),
        (
            "deepseek_v3",
            "rope_parameters",
            serde_json::json!({"rope_type": "longrope", "rope_theta": 30000.0, "factor": 2.0}),
            "rope_parameters",
        ),
        (
            "deepseek_v2",
            "num_key_value_heads",
            Value::from(2),
            "num_key_value_heads",
        ),
        (
            "deepseek_v2",
            "moe_layer_freq",
            Value::from(2),
            "moe_layer_freq",
        ),
    ];
    for (name, key, value, needle) in cases {
        let tmp = copy_with(name, |v| {
            v[key] = value.clone();
        });
        let err = load_err(tmp.path());
        assert!(err.contains(needle), "{name} {key}={value}: {err}");
    }
}

fn train_cfg(steps: usize) -> candle_moe::TrainConfig {
    candle_moe::TrainConfig {
        steps,
        lr: 3e-3,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    }
}

fn lm_loss(m: &CausalLm, x: &Tensor, y: &Tensor) -> candle_moe::train::LossParts {
    candle_moe::tasks::language_model::loss_parts(m, x, &y.flatten_all().unwrap(), true).unwrap()
}

/// The models the export writes: each fixture fine-tuned for 5 AdamW steps (every weight), and
/// the V3 fixture with LoRA adapters on the MLA projections and the experts, trained and merged.
fn export_model(name: &str) -> CausalLm {
    let (x, y) = common::fixed_lm_batch();
    if let Some(fam) = name.strip_prefix("lora_merged_") {
        let mut m = load(&fixture(fam));
        let vm = m
            .add_lora(&candle_moe::layers::LoraConfig {
                rank: 4,
                seed: 9,
                ..Default::default()
            })
            .unwrap();
        let mut trainer = candle_moe::Trainer::new(&vm, train_cfg(5)).unwrap();
        for _ in 0..5 {
            trainer.step(&lm_loss(&m, &x, &y)).unwrap();
        }
        m.merge_lora().unwrap();
        return m;
    }
    let fam = name.strip_prefix("finetuned_").unwrap();
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let mut m = CausalLm::from_pretrained(fixture(fam).to_str().unwrap(), &opts).unwrap();
    let vm = m.varmap().unwrap().clone();
    let mut trainer = candle_moe::Trainer::new(&vm, train_cfg(5)).unwrap();
    for _ in 0..5 {
        trainer.step(&lm_loss(&m, &x, &y)).unwrap();
    }
    m.freeze().unwrap();
    m
}

const EXPORTS: [&str; 3] = [
    "finetuned_deepseek_v2",
    "finetuned_deepseek_v3",
    "lora_merged_deepseek_v3",
];

/// Writes the export directories for the Python check: run with
/// `CANDLE_MOE_EXPORT=DIR cargo test --release --test hf_deepseek export_deepseek -- --ignored`.
#[test]
#[ignore = "run by tests/fixtures/gen_roundtrip_deepseek.py"]
fn export_deepseek() {
    let dir = PathBuf::from(std::env::var("CANDLE_MOE_EXPORT").expect("set CANDLE_MOE_EXPORT"));
    for name in EXPORTS {
        export_model(name).save_pretrained(dir.join(name)).unwrap();
    }
}

/// What transformers computed on the directories the export saved: rebuilding the same models
/// here, saving and reloading them gives its logits, and it reported no missing, unexpected
/// or mismatched key (the V3 `e_score_correction_bias` included).
#[test]
fn transformers_loads_the_deepseek_models_we_save() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/roundtrip_deepseek/expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = exp["cases"].as_object().unwrap();
    assert_eq!(cases.len(), EXPORTS.len());
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases {
        let out = tmp.path().join(name);
        export_model(name).save_pretrained(&out).unwrap();
        let back = load(&out);
        if name.contains("v3") {
            assert!(back
                .parameters()
                .iter()
                .any(|(n, _)| n.ends_with("e_score_correction_bias")));
        }
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let x = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let d = max_diff(&back.forward(&x).unwrap().logits, &floats(&case["logits"]));
        assert!(d < 1e-4, "{name}: transformers' logits differ by {d}");
        for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert_eq!(case[k].as_array().map(|a| a.len()), Some(0), "{name} {k}");
        }
        assert_eq!(
            case["model_type"].as_str(),
            Some(if name.contains("v2") {
                "deepseek_v2"
            } else {
                "deepseek_v3"
            })
        );
    }
}

/// A crate-built model with DeepSeek-only settings is not written as Mixtral.
#[test]
fn save_pretrained_refuses_deepseek_settings_for_a_crate_built_model() {
    let base = candle_moe::ModelConfig::tiny(32);
    let cases: Vec<(candle_moe::ModelConfig, &str)> = vec![
        (
            candle_moe::ModelConfig {
                mla: Some(candle_moe::config::MlaConfig::default()),
                head_dim: Some(8),
                ..base.clone()
            },
            "mla",
        ),
        (
            {
                let mut c = base.clone();
                c.moe.scoring = RouterScoring::Sigmoid;
                c
            },
            "moe.scoring",
        ),
        (
            {
                let mut c = base.clone();
                c.moe.routed_scaling_factor = 2.0;
                c
            },
            "routed_scaling_factor",
        ),
    ];
    for (cfg, needle) in cases {
        let vm = candle_nn::VarMap::new();
        let model =
            CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        assert!(!model.is_hf_expressible(), "{needle}");
        let tmp = tempfile::tempdir().unwrap();
        let err = model
            .save_pretrained(tmp.path().join("m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

/// Loaded trainable, every weight of the V3 model (MLA projections, latent norms, router,
/// routed and shared experts, dense layer) gets a gradient, and a few AdamW steps lower the
/// loss.
#[test]
fn deepseek_v3_trains_every_part() {
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let m = CausalLm::from_pretrained(fixture("deepseek_v3").to_str().unwrap(), &opts).unwrap();
    let vm = m.varmap().unwrap().clone();
    let (x, y) = common::fixed_lm_batch();
    let parts = lm_loss(&m, &x, &y);
    let grads = parts.task.backward().unwrap();
    let vars = vm.data().lock().unwrap();
    let mut missing = vec![];
    for (name, v) in vars.iter() {
        let ok = grads
            .get(v.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        // Experts no token chose this batch may have no gradient; the selection bias never
        // has one (the trainer's bias update moves it).
        if !ok && !name.contains(".experts.") && !name.ends_with("e_score_correction_bias") {
            missing.push(name.clone());
        }
    }
    drop(vars);
    assert!(missing.is_empty(), "no gradient: {missing:?}");
    let first = lm_loss(&m, &x, &y).task.to_scalar::<f32>().unwrap();
    let mut trainer = candle_moe::Trainer::new(&vm, train_cfg(8)).unwrap();
    for _ in 0..8 {
        trainer.step(&lm_loss(&m, &x, &y)).unwrap();
    }
    let last = lm_loss(&m, &x, &y).task.to_scalar::<f32>().unwrap();
    assert!(last < first - 0.05, "loss {first} -> {last}");
}

/// An FP8 checkpoint saves back as floats: no `quantization_config`, no scales, same logits.
#[test]
fn fp8_checkpoint_saves_back_dequantised() {
    let model = load(&fixture("deepseek_v3_fp8"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    model.save_pretrained(&out).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    let ts = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!ts.keys().any(|k| k.ends_with("_scale_inv")));
    assert!(ts.values().all(|t| t.dtype() == DType::F32));
    let back = load(&out);
    let exp = expected("deepseek_v3_fp8");
    let d = max_diff(
        &back.forward(&ids(&exp["input_ids"])).unwrap().logits,
        &floats(&exp["logits"]),
    );
    assert!(d < 1e-4, "{d}");
}
