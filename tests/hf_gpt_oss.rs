//! gpt-oss (`gpt_oss`): a tiny random model written by transformers 5.24
//! (`tests/fixtures/gen_hf_gpt_oss.py`) and its MXFP4 copy.
//!
//! Expert and router side: the config maps as transformers reads it (v5 and
//! v4 spellings alike); the fused interleaved experts de-interleave to transformers' weights; the
//! MXFP4 blocks dequantise bit for bit to what transformers' `convert_moe_packed_tensors` gives;
//! layer 0's MoE (router with bias, top-k then softmax, clamped SwiGLU experts with biases)
//! reproduces transformers' `GptOssMLP`; a per-token f64 reference pins the clamped SwiGLU and
//! the biased router; MXFP4 blocks without scales are an error naming the tensor.
//!
//! Whole model, with the attention side (per-head sinks, alternating sliding-window and full
//! layers with a window shorter than the sequence, YaRN, q/k/v/o biases): logits to 1e-4 and
//! aux loss to 1e-5 with and without a padding mask, decode with the KV cache equal to the full
//! forward, both config spellings, and the MXFP4 model.

mod common;

use common::json::{check_parity, flat, ids, max_diff};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_moe::config::AttentionSpan;
use candle_moe::io::hf::{dequantize_mxfp4, read_fused_experts, read_hf_config};
use candle_moe::{CausalLm, LoadOptions, MoeConfig, RopeScaling, SparseMoe};
use candle_nn::{VarBuilder, VarMap};
use common::{mat, matvec, Rng};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_v5")
        .join(name)
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tensors(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn gpt_oss_config_maps_as_transformers_reads_it() {
    let (fam, cfg) = read_hf_config(&fixture("gpt_oss").join("config.json")).unwrap();
    assert_eq!(fam, candle_moe::io::hf::Family::GptOss);
    assert_eq!(cfg.head_dim, Some(8));
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.num_layers), (4, 2, 2));
    assert_eq!(cfg.sliding_window, Some(4));
    assert_eq!(
        cfg.layer_types,
        vec![
            AttentionSpan::SlidingAttention,
            AttentionSpan::FullAttention
        ]
    );
    assert!(cfg.attention_sinks && cfg.attention_bias && cfg.attention_out_bias);
    assert_eq!(cfg.rope_theta, 150_000.0);
    assert_eq!(
        cfg.rope_scaling,
        Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 16,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: false,
        })
    );
    let m = &cfg.moe;
    assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (4, 2, 64));
    assert!(m.router_bias && m.expert_bias && m.norm_topk_prob);
    assert_eq!((m.swiglu_limit, m.swiglu_alpha), (Some(0.6), 1.702));
    assert_eq!(m.router_aux_loss_coef, 0.01);
    // The 4.x spelling (torch_dtype, rope_theta, rope_scaling) maps to the same configuration,
    // and so does the MXFP4 copy's.
    for (dir, file) in [
        ("gpt_oss", "config.v4.json"),
        ("gpt_oss_mxfp4", "config.json"),
        ("gpt_oss_mxfp4", "config.v4.json"),
    ] {
        let (_, c) = read_hf_config(&fixture(dir).join(file)).unwrap();
        assert_eq!(c, cfg, "{dir}/{file}");
    }
    // A RoPE type gpt-oss's loader does not implement is an error naming the key.
    let mut v = json(&fixture("gpt_oss").join("config.json"));
    v["rope_parameters"]["rope_type"] = "longrope".into();
    let e = candle_moe::io::hf::config_from_hf(&v, Path::new("config.json")).unwrap_err();
    assert!(e.to_string().contains("rope_parameters.rope_type"), "{e}");
}

/// Expert `e`'s (w1, w3, w2, b1, b3, b2) from gpt-oss's fused tensors of `layer`, by plain
/// indexing (the reference for the loader's slices).
fn deinterleave(ts: &HashMap<String, Tensor>, layer: usize, e: usize) -> [Tensor; 6] {
    let p = format!("model.layers.{layer}.mlp.experts");
    let gu = ts[&format!("{p}.gate_up_proj")].get(e).unwrap(); // (h, 2i)
    let (h, i2) = gu.dims2().unwrap();
    let cols = |k: usize| -> Tensor {
        let idx: Vec<u32> = (0..i2 as u32 / 2).map(|c| 2 * c + k as u32).collect();
        let idx = Tensor::new(idx, &Device::Cpu).unwrap();
        gu.index_select(&idx, 1)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let b = ts[&format!("{p}.gate_up_proj_bias")].get(e).unwrap();
    let bsel = |k: usize| -> Tensor {
        let idx: Vec<u32> = (0..i2 as u32 / 2).map(|c| 2 * c + k as u32).collect();
        b.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0)
            .unwrap()
    };
    let down = ts[&format!("{p}.down_proj")].get(e).unwrap(); // (i, h)
    assert_eq!(down.dim(1).unwrap(), h);
    [
        cols(0),
        cols(1),
        down.t().unwrap().contiguous().unwrap(),
        bsel(0),
        bsel(1),
        ts[&format!("{p}.down_proj_bias")].get(e).unwrap(),
    ]
}

fn expert_name(layer: usize, e: usize, k: usize) -> String {
    let (w, kind) = [
        ("w1", "weight"),
        ("w3", "weight"),
        ("w2", "weight"),
        ("w1", "bias"),
        ("w3", "bias"),
        ("w2", "bias"),
    ][k];
    format!("model.layers.{layer}.mlp.experts.{e}.{w}.{kind}")
}

fn check_served(served: &BTreeMap<String, Tensor>, ts: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(served.len(), 2 * 4 * 6, "{what}");
    for layer in 0..2 {
        for e in 0..4 {
            for (k, want) in deinterleave(ts, layer, e).iter().enumerate() {
                let n = expert_name(layer, e, k);
                let got = &served[&n];
                assert_eq!(got.dims(), want.dims(), "{what} {n}");
                assert_eq!(max_abs(got, want), 0.0, "{what} {n}");
            }
        }
    }
}

#[test]
fn gpt_oss_fused_experts_deinterleave_to_transformers_weights() {
    let dir = fixture("gpt_oss");
    let served = read_fused_experts(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_served(&served, &tensors(&dir.join("model.safetensors")), "gpt_oss");
}

#[test]
fn mxfp4_dequantises_exactly_to_transformers_reference() {
    let dir = fixture("gpt_oss_mxfp4");
    let q = tensors(&dir.join("model.safetensors"));
    let reference = tensors(&dir.join("reference.safetensors"));
    assert_eq!(reference.len(), 4);
    for (name, want) in &reference {
        let blocks = &q[&format!("{name}_blocks")];
        let scales = &q[&format!("{name}_scales")];
        assert_eq!(blocks.dtype(), DType::U8);
        let got = dequantize_mxfp4(blocks, scales).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        // Bit for bit, zeros' signs included.
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bits_differ = g
            .iter()
            .zip(&w)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bits_differ, 0, "{name}");
    }
    // Loading serves the experts from the dequantised, de-interleaved tensors.
    let mut as_float = reference.clone();
    for (k, t) in &q {
        if !k.ends_with("_blocks") && !k.ends_with("_scales") {
            as_float.insert(k.clone(), t.clone());
        }
    }
    let served = read_fused_experts(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_served(&served, &as_float, "gpt_oss_mxfp4");
}

#[test]
fn mxfp4_blocks_without_scales_is_an_error_naming_the_tensor() {
    let src = fixture("gpt_oss_mxfp4");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let mut q = tensors(&src.join("model.safetensors"));
    let missing = "model.layers.1.mlp.experts.down_proj_scales";
    q.remove(missing).unwrap();
    candle_core::safetensors::save(&q, dst.join("model.safetensors")).unwrap();
    let e = match CausalLm::from_pretrained(dst.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    match &e {
        candle_moe::Error::Checkpoint { tensor, .. } => {
            assert_eq!(tensor.as_deref(), Some(missing), "{e}")
        }
        _ => panic!("{e}"),
    }
    assert!(matches!(
        e.checkpoint_kind(),
        Some(candle_moe::error::CheckpointErrorKind::Missing)
    ));
    assert!(
        e.to_string()
            .contains("model.layers.1.mlp.experts.down_proj_blocks"),
        "{e}"
    );
}

/// Layer 0's MoE built from the served experts and the stored router reproduces transformers'
/// `GptOssMLP` on the hidden states it saw (router logits with bias, top-2 then softmax,
/// clamped SwiGLU with biases).
#[test]
fn gpt_oss_moe_layer_matches_transformers() {
    let dir = fixture("gpt_oss");
    let (_, cfg) = read_hf_config(&dir.join("config.json")).unwrap();
    let ts = tensors(&dir.join("model.safetensors"));
    let served = read_fused_experts(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let mut layer: HashMap<String, Tensor> = HashMap::new();
    for (n, t) in &served {
        if let Some(rest) = n.strip_prefix("model.layers.0.mlp.") {
            layer.insert(rest.to_string(), t.clone());
        }
    }
    for k in ["weight", "bias"] {
        let t = ts[&format!("model.layers.0.mlp.router.{k}")].clone();
        layer.insert(format!("gate.{k}"), t);
    }
    let moe = SparseMoe::new(
        &cfg.moe,
        VarBuilder::from_tensors(layer, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let exp = json(&dir.join("expected.json"));
    let x = matrix(&exp["mlp0"]["input"]);
    let out = moe.forward(&x).unwrap();
    let d = max_abs(&out.router_logits, &matrix(&exp["mlp0"]["router_logits"]));
    assert!(d < 1e-5, "router logits differ from transformers by {d}");
    let d = max_abs(&out.hidden_states, &matrix(&exp["mlp0"]["output"]));
    assert!(d < 1e-5, "MoE output differs from transformers by {d}");
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn vec_of(vm: &VarMap, name: &str) -> Vec<f64> {
    let data = vm.data().lock().unwrap();
    data[name]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Per token, in f64: logits `W x + b`, the top-2 logits softmaxed, each chosen expert
/// `W2 ((clamp(u, ±L) + 1) · g' · σ(α g')) + b2` with `g' = min(W1 x + b1, L)`, `u = W3 x + b3`.
#[test]
fn clamped_swiglu_and_biased_router_match_a_per_token_reference() {
    let (h, f, e, k, limit, alpha) = (8usize, 6usize, 4usize, 2usize, 0.5f64, 1.702f64);
    let cfg = MoeConfig {
        hidden_size: h,
        intermediate_size: f,
        num_experts: e,
        top_k: k,
        norm_topk_prob: true,
        expert_bias: true,
        router_bias: true,
        swiglu_limit: Some(limit),
        swiglu_alpha: alpha,
        ..Default::default()
    };
    let vm = VarMap::new();
    let moe = SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut rng = Rng::new(17);
    common::randomize(&vm, &mut rng, 0.6);
    let n = 12;
    let x = rng.tensor(&[n, h], 1.0, DType::F32);
    let xs = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let (wg, bg) = (mat(&vm, "gate.weight"), vec_of(&vm, "gate.bias"));
    let add = |a: Vec<f64>, b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<_>>();
    let mut clamped = [0usize; 2];
    let mut want = vec![];
    for row in &xs {
        let logits = add(matvec(&wg, row), &bg);
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|a, b| logits[*b].partial_cmp(&logits[*a]).unwrap());
        let top = &order[..k];
        let z: f64 = top
            .iter()
            .map(|&i| (logits[i] - logits[top[0]]).exp())
            .sum();
        let mut y = vec![0.0; h];
        for &i in top {
            let w = (logits[i] - logits[top[0]]).exp() / z;
            let p = |s: &str| format!("experts.{i}.{s}");
            let g = add(
                matvec(&mat(&vm, &p("w1.weight")), row),
                &vec_of(&vm, &p("w1.bias")),
            );
            let u = add(
                matvec(&mat(&vm, &p("w3.weight")), row),
                &vec_of(&vm, &p("w3.bias")),
            );
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    clamped[0] += (g > limit) as usize;
                    clamped[1] += (u.abs() > limit) as usize;
                    let g = g.min(limit);
                    (u.clamp(-limit, limit) + 1.0) * g * sigmoid(alpha * g)
                })
                .collect();
            let out = add(
                matvec(&mat(&vm, &p("w2.weight")), &act),
                &vec_of(&vm, &p("w2.bias")),
            );
            for (yy, o) in y.iter_mut().zip(out) {
                *yy += w * o;
            }
        }
        want.push(y);
    }
    assert!(
        clamped[0] > 0 && clamped[1] > 0,
        "the clamps never acted: {clamped:?}"
    );
    let want = Tensor::new(want, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    // Trainable (variables), then the same weights frozen (the CPU fast paths must not apply
    // to clamped, biased experts), on every backend setting.
    let frozen_ts: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let mut frozen = SparseMoe::new(
        &cfg,
        VarBuilder::from_tensors(frozen_ts, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let got = moe.forward(&x).unwrap().hidden_states;
    assert!(
        max_abs(&got, &want) < 1e-5,
        "trainable: {}",
        max_abs(&got, &want)
    );
    use candle_moe::moe::ExpertBackend;
    for b in [
        ExpertBackend::Auto,
        ExpertBackend::Fused,
        ExpertBackend::Grouped,
        ExpertBackend::Loop,
    ] {
        frozen.set_backend(b);
        let got = frozen.forward(&x).unwrap().hidden_states;
        let d = max_abs(&got, &want);
        assert!(d < 1e-5, "frozen, {b:?}: {d}");
        assert_eq!(
            frozen.chosen_backend(&x, false).unwrap(),
            ExpertBackend::Loop
        );
    }
    // Gradients flow through the clamped activation to every expert parameter kind.
    let loss = moe
        .forward_t(&x, true)
        .unwrap()
        .hidden_states
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for n in [
        "gate.bias",
        "experts.0.w1.bias",
        "experts.0.w3.weight",
        "experts.0.w2.bias",
    ] {
        assert!(
            grads.get(data[n].as_tensor()).is_some(),
            "no gradient for {n}"
        );
    }
}

// ---- Whole-model parity: needs the attention side (sinks, sliding windows, YaRN). ----

fn load(dir: &Path) -> CausalLm {
    CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn check_model(model: &CausalLm, what: &str) {
    check_parity(
        model,
        &json(&fixture("gpt_oss").join("expected.json")),
        what,
    );
}

#[test]
fn gpt_oss_matches_transformers() {
    check_model(&load(&fixture("gpt_oss")), "gpt_oss");
    // The 4.x spelling of config.json gives the same logits.
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("v4");
    std::fs::create_dir_all(&dst).unwrap();
    let src = fixture("gpt_oss");
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.v4.json"), dst.join("config.json")).unwrap();
    check_model(&load(&dst), "gpt_oss (v4 config)");
}

/// Nine positions against a window of four: decoding one token at a time with the KV cache
/// equals the full forward (and transformers).
#[test]
fn gpt_oss_decode_with_cache_equals_full_forward() {
    let exp = json(&fixture("gpt_oss").join("expected.json"));
    let model = load(&fixture("gpt_oss"));
    let input = ids(&exp["input_ids"]);
    let t = input.dim(1).unwrap();
    assert!(t > 4);
    let mut cache = model.new_cache();
    let mut steps = vec![
        model
            .forward_cached(&input.narrow(1, 0, 2).unwrap(), &mut cache)
            .unwrap()
            .logits,
    ];
    for i in 2..t {
        let step = input.narrow(1, i, 1).unwrap();
        steps.push(model.forward_cached(&step, &mut cache).unwrap().logits);
    }
    let got = Tensor::cat(&steps, 1).unwrap();
    let d = max_diff(&got, &flat(&exp["logits"]), None);
    assert!(d <= 1e-4, "decode differs from transformers by {d}");
}

#[test]
fn gpt_oss_mxfp4_model_matches_dequantised_transformers() {
    let exp = json(&fixture("gpt_oss_mxfp4").join("expected.json"));
    let model = load(&fixture("gpt_oss_mxfp4"));
    let out = model.forward(&ids(&exp["input_ids"])).unwrap();
    let d = max_diff(&out.logits, &flat(&exp["logits_dequantized"]), None);
    assert!(d <= 1e-4, "MXFP4 logits differ by {d}");
    let aux = out.load_balancing_loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["aux_loss_dequantized"].as_f64().unwrap();
    assert!((aux - want).abs() <= 1e-5, "MXFP4 aux {aux} vs {want}");
}
