//! RoPE scaling, sliding-window attention and attention sinks.
//!
//! - RoPE: the inverse frequencies and attention factor of every scaling type match what
//!   transformers' `ROPE_INIT_FUNCTIONS` computed (`tests/fixtures/rope.json`, written by
//!   `tests/fixtures/gen_rope.py`), with the config read through the crate's loader under the
//!   4.x and 5.x spellings.
//! - Sliding windows and sinks: the attention layer equals a per-token f64 reference written
//!   here (loops over queries and keys), in the inference (fused) and training paths, with a
//!   padding mask, and in KV-cache decode; the sink gradient matches finite differences.
//! - Bad input: unknown rope types, bad factors, `sliding_window: 0`, bad `layer_types`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_moe::attention::{rope_parameters, Attention, KvCache, Rope};
use candle_moe::config::{AttentionSpan, RopeScaling};
use candle_moe::ModelConfig;
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

fn rope_fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rope.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A Mixtral config.json carrying `case`'s RoPE settings in the 5.x (`rope_parameters`) or
/// 4.x (`rope_scaling` with `type`, top-level `rope_theta`) spelling.
fn hf_config(case: &Value, v5: bool) -> Value {
    let hd = case["head_dim"].as_u64().unwrap();
    let mut c = json!({
        "model_type": "mixtral",
        "vocab_size": 32, "hidden_size": hd * 4, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": hd, "num_local_experts": 2, "num_experts_per_tok": 1,
        "max_position_embeddings": case["max_position_embeddings"],
    });
    let mut rope = case["rope"].clone();
    if v5 {
        rope["rope_theta"] = case["rope_theta"].clone();
        c["rope_parameters"] = rope;
    } else {
        let kind = rope.as_object_mut().unwrap().remove("rope_type").unwrap();
        rope["type"] = kind;
        c["rope_scaling"] = rope;
        c["rope_theta"] = case["rope_theta"].clone();
    }
    c
}

fn map(c: &Value) -> candle_moe::Result<ModelConfig> {
    candle_moe::io::hf::config_from_hf(c, Path::new("config.json")).map(|(_, m)| m)
}

#[test]
fn rope_scaling_matches_transformers_tables() {
    let fx = rope_fixture();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for v5 in [true, false] {
            let cfg = map(&hf_config(case, v5)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cfg.rope_scaling.is_some(), "{name}: no scaling read");
            let seq = case["seq_len"].as_u64().map_or(0, |s| s as usize);
            let (inv, att) = rope_parameters(
                cfg.head_dim(),
                cfg.rope_theta,
                cfg.rope_scaling.as_ref(),
                cfg.max_position_embeddings,
                seq,
            );
            let want: Vec<f64> = case["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(inv.len(), want.len(), "{name}");
            for (i, (g, w)) in inv.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} (v5 {v5}): inv_freq[{i}] {g} vs transformers {w}"
                );
            }
            let want_att = case["attention_factor"].as_f64().unwrap();
            assert!(
                (att - want_att).abs() <= 1e-6,
                "{name}: attention factor {att} vs {want_att}"
            );
        }
    }
}

/// The tables the model uses are cos/sin of position × inv_freq, times the attention factor:
/// rotating a unit vector gives them back.
#[test]
fn rope_tables_apply_the_scaled_frequencies_and_factor() {
    let scaling = RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: 16,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
        truncate: true,
    };
    let (hd, theta) = (8usize, 10_000.0);
    let (inv, att) = rope_parameters(hd, theta, Some(&scaling), 64, 0);
    let rope = Rope::with_scaling(hd, 64, theta, Some(scaling), DType::F32, &Device::Cpu).unwrap();
    // x = e_0 + e_{d/2} in every position: rotate-half gives (cos - sin, ..., sin + cos) · att.
    let t = 40;
    let mut x = vec![0f32; t * hd];
    for p in 0..t {
        x[p * hd] = 1.0;
    }
    let xs = Tensor::from_vec(x, (1, 1, t, hd), &Device::Cpu).unwrap();
    let y = rope.apply(&xs, 0).unwrap().flatten_all().unwrap();
    let y = y.to_vec1::<f32>().unwrap();
    for p in 0..t {
        let a = p as f64 * (inv[0] as f32) as f64;
        let (c, s) = (a.cos() * att, a.sin() * att);
        assert!((y[p * hd] as f64 - c).abs() < 1e-5, "pos {p}: cos");
        assert!((y[p * hd + hd / 2] as f64 - s).abs() < 1e-5, "pos {p}: sin");
    }
    // Decoding position by position reads the same rows.
    let one = rope.apply(&xs.narrow(2, 37, 1).unwrap(), 37).unwrap();
    let full = rope.apply(&xs, 0).unwrap().narrow(2, 37, 1).unwrap();
    assert!(common::max_abs_diff(&one, &full) < 1e-7);
}

/// Dynamic NTK: plain frequencies up to the original length, rescaled for longer sequences
/// (which the model then accepts, up to factor × the original length).
#[test]
fn dynamic_rope_rescales_only_past_the_original_length() {
    let s = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_position_embeddings: None,
    };
    let (plain, _) = rope_parameters(8, 1e4, None, 32, 0);
    let (short, _) = rope_parameters(8, 1e4, Some(&s), 32, 20);
    let (long, _) = rope_parameters(8, 1e4, Some(&s), 32, 50);
    assert_eq!(plain, short);
    assert!(long[1] < plain[1]);
    let mut cfg = ModelConfig::tiny(32);
    cfg.max_position_embeddings = 32;
    cfg.rope_scaling = Some(s);
    assert_eq!(cfg.position_limit(), 64);
    let rope = Rope::with_scaling(
        16,
        32,
        1e4,
        cfg.rope_scaling.clone(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let xs = Tensor::ones((1, 1, 50, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(rope.apply(&xs, 0).is_ok());
    assert!(rope.apply(&xs, 20).is_err(), "70 positions > 64");
}

#[test]
fn unsupported_or_bad_rope_settings_are_refused_naming_the_key() {
    let case = json!({"head_dim": 8, "max_position_embeddings": 64, "rope_theta": 1e4,
                      "rope": {"rope_type": "longrope", "factor": 2.0}});
    for v5 in [true, false] {
        let e = map(&hf_config(&case, v5)).unwrap_err().to_string();
        let key = if v5 {
            "rope_parameters.rope_type"
        } else {
            "rope_scaling.type"
        };
        assert!(e.contains(key) && e.contains("longrope"), "{e}");
    }
    let mut c = hf_config(&case, false);
    c["rope_scaling"] = json!({"type": "su", "factor": 2.0});
    let e = map(&c).unwrap_err().to_string();
    assert!(e.contains("rope_scaling.type") && e.contains("`su`"), "{e}");
    for (rope, needle) in [
        (json!({"rope_type": "linear", "factor": 0.0}), "factor"),
        (json!({"rope_type": "linear", "factor": -2.0}), "factor"),
        (json!({"rope_type": "dynamic"}), "rope_parameters.factor"),
        (
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
            "high_freq_factor",
        ),
        (
            json!({"rope_type": "yarn", "factor": "x"}),
            "rope_parameters.factor",
        ),
    ] {
        let case =
            json!({"head_dim": 8, "max_position_embeddings": 64, "rope_theta": 1e4, "rope": rope});
        let e = map(&hf_config(&case, true)).unwrap_err().to_string();
        assert!(e.contains(needle), "{rope}: {e}");
    }
    // Per-layer-type RoPE parameters and partial rotary dimensions are refused, not dropped.
    let mut c = hf_config(&case, true);
    c["rope_parameters"] = json!({"full_attention": {"rope_type": "default", "rope_theta": 1e4}});
    let e = map(&c).unwrap_err().to_string();
    assert!(e.contains("rope_parameters.full_attention"), "{e}");
    let mut c = hf_config(&case, true);
    c["rope_parameters"] =
        json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5});
    let e = map(&c).unwrap_err().to_string();
    assert!(e.contains("partial_rotary_factor"), "{e}");
    // The two spellings at once must agree.
    let mut c = hf_config(&case, true);
    c["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4});
    c["rope_scaling"] = json!({"type": "linear", "factor": 3.0});
    let e = map(&c).unwrap_err().to_string();
    assert!(
        e.contains("rope_scaling") && e.contains("rope_parameters"),
        "{e}"
    );
    // And a crate config with a bad factor fails validation naming the field.
    let mut cfg = ModelConfig::tiny(32);
    cfg.rope_scaling = Some(RopeScaling::Linear { factor: f64::NAN });
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("rope_scaling.factor"), "{e}");
}

#[test]
fn bad_sliding_window_settings_are_refused() {
    let base = json!({"model_type": "mixtral", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1});
    let mut c = base.clone();
    c["sliding_window"] = json!(0);
    let e = map(&c).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    let mut c = base.clone();
    c["sliding_window"] = json!(4);
    let m = map(&c).unwrap();
    assert_eq!((m.layer_window(0), m.layer_window(1)), (Some(4), Some(4)));
    // Qwen2-MoE: layer_types with an unknown entry, or the wrong length.
    let mut q = base.clone();
    q["model_type"] = json!("qwen2_moe");
    q["use_sliding_window"] = json!(true);
    q["sliding_window"] = json!(4);
    q["layer_types"] = json!(["full_attention", "chunked_attention"]);
    let e = map(&q).unwrap_err().to_string();
    assert!(
        e.contains("layer_types") && e.contains("chunked_attention"),
        "{e}"
    );
    q["layer_types"] = json!(["full_attention"]);
    let e = map(&q).unwrap_err().to_string();
    assert!(
        e.contains("layer_types") && e.contains("num_hidden_layers"),
        "{e}"
    );
    q["layer_types"] = json!(["sliding_attention", "full_attention"]);
    let m = map(&q).unwrap();
    assert_eq!((m.layer_window(0), m.layer_window(1)), (Some(4), None));
    // Without layer_types: transformers' rule (even layers below max_window_layers).
    q.as_object_mut().unwrap().remove("layer_types");
    q["max_window_layers"] = json!(1);
    let m = map(&q).unwrap();
    assert_eq!(
        m.layer_types,
        vec![
            AttentionSpan::SlidingAttention,
            AttentionSpan::FullAttention
        ]
    );
    // Crate configs: the same rules in validate().
    let mut cfg = ModelConfig::tiny(32);
    cfg.sliding_window = Some(0);
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("sliding_window"));
    cfg.sliding_window = None;
    cfg.layer_types = vec![AttentionSpan::SlidingAttention; 2];
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("sliding_window"));
    cfg.sliding_window = Some(3);
    cfg.layer_types = vec![AttentionSpan::SlidingAttention; 3];
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("layer_types"));
}

// ---------------------------------------------------------------------------------------------
// The attention layer against a per-token f64 reference.

const H: usize = 16;
const NH: usize = 4;
const NKV: usize = 2;
const HD: usize = 4;

fn attn_cfg(sinks: bool, out_bias: bool) -> ModelConfig {
    let mut cfg = ModelConfig::tiny(32);
    cfg.hidden_size = H;
    cfg.num_heads = NH;
    cfg.num_kv_heads = NKV;
    cfg.attention_sinks = sinks;
    cfg.attention_out_bias = out_bias;
    cfg
}

/// Random weights for an attention layer (`{q,k,v,o}_proj.weight`, `o_proj.bias`, `sinks`).
fn weights(sinks: bool, out_bias: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = common::Rng::new(seed);
    let mut w = HashMap::new();
    for (n, o, i) in [
        ("q_proj", NH * HD, H),
        ("k_proj", NKV * HD, H),
        ("v_proj", NKV * HD, H),
        ("o_proj", H, NH * HD),
    ] {
        w.insert(format!("{n}.weight"), rng.tensor(&[o, i], 0.5, DType::F64));
    }
    if out_bias {
        w.insert("o_proj.bias".into(), rng.tensor(&[H], 0.5, DType::F64));
    }
    if sinks {
        w.insert("sinks".into(), rng.tensor(&[NH], 1.0, DType::F64));
    }
    w
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The attention output `(b, t, H)` computed per token in f64: query `i` sees key `j` iff
/// `j <= i`, `j > i - window` and `mask[b][j]`, plus the sink column of its head.
fn reference(
    w: &HashMap<String, Tensor>,
    x: &[f64],
    b: usize,
    t: usize,
    window: Option<usize>,
    mask: Option<&[Vec<u32>]>,
) -> Vec<f64> {
    let m = |n: &str| host(&w[n]);
    let (wq, wk, wv, wo) = (
        m("q_proj.weight"),
        m("k_proj.weight"),
        m("v_proj.weight"),
        m("o_proj.weight"),
    );
    let bo = w.get("o_proj.bias").map(host);
    let sinks = w.get("sinks").map(host);
    let lin = |wt: &[f64], rows: usize, xv: &[f64]| -> Vec<f64> {
        (0..rows)
            .map(|r| (0..xv.len()).map(|c| wt[r * xv.len() + c] * xv[c]).sum())
            .collect()
    };
    let mut out = vec![0f64; b * t * H];
    for bi in 0..b {
        let tok = |p: usize| &x[(bi * t + p) * H..(bi * t + p + 1) * H];
        let ks: Vec<Vec<f64>> = (0..t).map(|p| lin(&wk, NKV * HD, tok(p))).collect();
        let vs: Vec<Vec<f64>> = (0..t).map(|p| lin(&wv, NKV * HD, tok(p))).collect();
        for i in 0..t {
            let q = lin(&wq, NH * HD, tok(i));
            let mut heads = vec![0f64; NH * HD];
            for h in 0..NH {
                let kv = h / (NH / NKV);
                let vis: Vec<usize> = (0..t)
                    .filter(|&j| j <= i)
                    .filter(|&j| window.is_none_or(|wd| j + wd > i))
                    .filter(|&j| mask.is_none_or(|mk| mk[bi][j] == 1))
                    .collect();
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..HD)
                            .map(|d| q[h * HD + d] * ks[j][kv * HD + d])
                            .sum::<f64>()
                            / (HD as f64).sqrt()
                    })
                    .collect();
                let sink = sinks.as_ref().map(|z| z[h]);
                let mx = s
                    .iter()
                    .chain(sink.iter())
                    .fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum::<f64>()
                    + sink.map_or(0.0, |v| (v - mx).exp());
                for (&j, sv) in vis.iter().zip(&s) {
                    let p = (sv - mx).exp() / z;
                    for d in 0..HD {
                        heads[h * HD + d] += p * vs[j][kv * HD + d];
                    }
                }
            }
            let o = lin(&wo, H, &heads);
            for c in 0..H {
                out[(bi * t + i) * H + c] = o[c] + bo.as_ref().map_or(0.0, |bv| bv[c]);
            }
        }
    }
    out
}

/// The layer over plain tensors (inference: the fused softmax when f32 and unmasked).
fn frozen(
    cfg: &ModelConfig,
    w: &HashMap<String, Tensor>,
    dtype: DType,
    window: Option<usize>,
) -> Attention {
    let w: HashMap<String, Tensor> = w
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
        .collect();
    let vb = VarBuilder::from_tensors(w, dtype, &Device::Cpu);
    Attention::new(cfg, vb).unwrap().with_window(window)
}

/// The layer over trainable variables (the differentiable path), and its VarMap.
fn trainable(
    cfg: &ModelConfig,
    w: &HashMap<String, Tensor>,
    window: Option<usize>,
) -> (Attention, VarMap) {
    let vm = VarMap::new();
    let a = Attention::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
        .unwrap()
        .with_window(window);
    for (n, v) in vm.data().lock().unwrap().iter() {
        v.set(&w[n]).unwrap();
    }
    (a, vm)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn sliding_window_and_sinks_match_the_reference_in_every_path() {
    let (b, t) = (2, 11);
    let x = common::Rng::new(5).normals(b * t * H, 1.0);
    let xs = Tensor::from_vec(x.clone(), (b, t, H), &Device::Cpu).unwrap();
    let mask_rows = vec![vec![1u32; t], {
        let mut r = vec![1u32; t];
        r[t - 3..].iter_mut().for_each(|v| *v = 0);
        r
    }];
    let mask = Tensor::new(mask_rows.clone(), &Device::Cpu).unwrap();
    for (sinks, window) in [
        (false, Some(3)),
        (true, None),
        (true, Some(4)),
        (true, Some(1)),
    ] {
        let cfg = attn_cfg(sinks, sinks);
        let w = weights(sinks, sinks, 11);
        let what = format!("sinks {sinks}, window {window:?}");
        let want = reference(&w, &x, b, t, window, None);
        // Inference, f32: the fused softmax.
        let a = frozen(&cfg, &w, DType::F32, window);
        let got = a
            .forward_self(&xs.to_dtype(DType::F32).unwrap(), None, true, None, None)
            .unwrap();
        let d = max_diff(&host(&got), &want);
        assert!(d < 1e-4, "{what}: fused path off by {d}");
        // Inference, f64: the bias + softmax path.
        let a64 = frozen(&cfg, &w, DType::F64, window);
        let d = max_diff(
            &host(&a64.forward_self(&xs, None, true, None, None).unwrap()),
            &want,
        );
        assert!(d < 1e-5, "{what}: masked path off by {d}");
        // Training path.
        let (tr, _vm) = trainable(&cfg, &w, window);
        let d = max_diff(
            &host(&tr.forward_self(&xs, None, true, None, None).unwrap()),
            &want,
        );
        assert!(d < 1e-5, "{what}: training path off by {d}");
        // With a padding mask.
        let want_m = reference(&w, &x, b, t, window, Some(&mask_rows));
        let got = a
            .forward_self(
                &xs.to_dtype(DType::F32).unwrap(),
                None,
                true,
                Some(&mask),
                None,
            )
            .unwrap();
        // Rows whose every visible key is padding are undefined; compare the valid rows.
        let (g, wm) = (host(&got), want_m);
        for (bi, row) in mask_rows.iter().enumerate() {
            for (i, &keep) in row.iter().enumerate() {
                if keep == 0 {
                    continue;
                }
                let r = (bi * t + i) * H..(bi * t + i + 1) * H;
                let d = max_diff(&g[r.clone()], &wm[r]);
                assert!(
                    d < 1e-4,
                    "{what}: padded batch row {bi} query {i} off by {d}"
                );
            }
        }
    }
}

/// Decoding with a KV cache (one position at a time, and in chunks) equals the full forward,
/// with RoPE, a window shorter than the sequence and sinks.
#[test]
fn kv_cache_decode_equals_full_forward_with_window_and_sinks() {
    let (b, t) = (2, 13);
    let x = common::Rng::new(8).normals(b * t * H, 1.0);
    let xs = Tensor::from_vec(x, (b, t, H), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let rope = Rope::new(HD, 64, 1e4, DType::F32, &Device::Cpu).unwrap();
    for (sinks, window) in [(true, Some(4)), (false, Some(2)), (true, None)] {
        let cfg = attn_cfg(sinks, false);
        let a = frozen(&cfg, &weights(sinks, false, 3), DType::F32, window);
        let full = a.forward_self(&xs, Some(&rope), true, None, None).unwrap();
        for chunk in [1usize, 3, 5] {
            let mut cache = KvCache::default();
            let mut outs = vec![];
            let mut p = 0;
            while p < t {
                let n = chunk.min(t - p);
                let part = xs.narrow(1, p, n).unwrap();
                outs.push(
                    a.forward_self(&part, Some(&rope), true, None, Some(&mut cache))
                        .unwrap(),
                );
                p += n;
            }
            let dec = Tensor::cat(&outs, 1).unwrap();
            let d = common::max_abs_diff(&dec, &full);
            assert!(
                d < 1e-5,
                "sinks {sinks} window {window:?} chunk {chunk}: decode off by {d}"
            );
            assert_eq!(cache.len(), t);
        }
    }
}

/// The gradient of a loss with respect to the sink logits matches central differences.
#[test]
fn sink_gradient_matches_finite_differences() {
    let (b, t) = (1, 7);
    let cfg = attn_cfg(true, false);
    let w = weights(true, false, 21);
    let x = common::Rng::new(2).normals(b * t * H, 1.0);
    let xs = Tensor::from_vec(x, (b, t, H), &Device::Cpu).unwrap();
    let r = Tensor::from_vec(
        common::Rng::new(3).normals(b * t * H, 1.0),
        (b, t, H),
        &Device::Cpu,
    )
    .unwrap();
    let loss = |a: &Attention| {
        (a.forward_self(&xs, None, true, None, None).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let (a, vm) = trainable(&cfg, &w, Some(3));
    let grads = loss(&a).backward().unwrap();
    let sinks = vm.data().lock().unwrap()["sinks"].clone();
    let g = host(grads.get(sinks.as_tensor()).expect("sinks get a gradient"));
    let s0 = host(&w["sinks"]);
    let eps = 1e-3;
    for h in 0..NH {
        let at = |delta: f64| {
            let mut s = s0.clone();
            s[h] += delta;
            let mut w2 = w.clone();
            w2.insert(
                "sinks".into(),
                Tensor::from_vec(s, NH, &Device::Cpu).unwrap(),
            );
            let (a2, _) = trainable(&cfg, &w2, Some(3));
            loss(&a2).to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[h]).abs() < 2e-3 * fd.abs().max(1.0),
            "head {h}: gradient {} vs finite difference {fd}",
            g[h]
        );
        assert!(g[h].abs() > 1e-6, "head {h}: zero gradient");
    }
}
