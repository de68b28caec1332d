//! Multi-head latent attention against a per-token f64 reference written here: queries (plain
//! or through the low-rank bottleneck), the compressed latent and its RMSNorm, the shared RoPE
//! key rotated as interleaved pairs (complex multiplication, DeepSeek-V2) or rotate-half, the
//! per-head keys and values expanded from the latent, causal softmax with the MLA scale, and
//! the output projection; also with a padding mask and incremental decoding.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::attention::{KvCache, Mla, Rope};
use candle_moe::config::MlaConfig;
use candle_moe::ModelConfig;
use candle_nn::{VarBuilder, VarMap};
use common::{mat, matvec, randomize, Rng};

const H: usize = 12;
const NH: usize = 3;
const T: usize = 5;
const THETA: f64 = 100.0;

fn model_cfg() -> ModelConfig {
    ModelConfig {
        hidden_size: H,
        num_heads: NH,
        num_kv_heads: NH,
        head_dim: Some(4),
        norm_eps: 1e-5,
        ..ModelConfig::tiny(16)
    }
}

fn mla_cfg(q_lora_rank: Option<usize>, rope_interleave: bool) -> MlaConfig {
    MlaConfig {
        q_lora_rank,
        kv_lora_rank: 6,
        qk_nope_head_dim: 5,
        qk_rope_head_dim: 4,
        v_head_dim: 3,
        rope_interleave,
        latent_norm_eps: 1e-6,
    }
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    x.iter()
        .zip(w)
        .map(|(v, g)| v / (ms + eps).sqrt() * g)
        .collect()
}

/// Rotates `x` (width d) at position `pos`: pairs `(x[2i], x[2i+1])` when interleaved, else
/// `(x[i], x[i + d/2])`, by `pos · θ^(-2i/d)`.
fn rotate(x: &[f64], pos: usize, interleave: bool) -> Vec<f64> {
    let d = x.len();
    let mut out = x.to_vec();
    for i in 0..d / 2 {
        let a = pos as f64 * THETA.powf(-2.0 * i as f64 / d as f64);
        let (p, q) = if interleave {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + d / 2)
        };
        out[p] = x[p] * a.cos() - x[q] * a.sin();
        out[q] = x[q] * a.cos() + x[p] * a.sin();
    }
    out
}

fn vecw(vm: &VarMap, name: &str) -> Vec<f64> {
    let data = vm.data().lock().unwrap();
    data[name].to_vec1::<f64>().unwrap()
}

/// The reference output `(T, H)` for token states `xs` (`T` rows), keys masked by `keep`.
fn reference(vm: &VarMap, m: &MlaConfig, xs: &[Vec<f64>], keep: &[bool]) -> Vec<Vec<f64>> {
    let (nope, dr, dv, r) = (
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
    );
    let qk = nope + dr;
    let scale = 1.0 / (qk as f64).sqrt();
    let q_of = |x: &[f64]| match m.q_lora_rank {
        None => matvec(&mat(vm, "q_proj.weight"), x),
        Some(_) => {
            let a = matvec(&mat(vm, "q_a_proj.weight"), x);
            let a = rms(&a, &vecw(vm, "q_a_layernorm.weight"), 1e-6);
            matvec(&mat(vm, "q_b_proj.weight"), &a)
        }
    };
    let mut keys = vec![]; // per position: (per-head k (qk), per-head v (dv))
    for (pos, x) in xs.iter().enumerate() {
        let ckv = matvec(&mat(vm, "kv_a_proj_with_mqa.weight"), x);
        let c = rms(&ckv[..r], &vecw(vm, "kv_a_layernorm.weight"), 1e-6);
        let k_rot = rotate(&ckv[r..], pos, m.rope_interleave);
        let kv = matvec(&mat(vm, "kv_b_proj.weight"), &c);
        let per: Vec<(Vec<f64>, Vec<f64>)> = (0..NH)
            .map(|h| {
                let s = &kv[h * (nope + dv)..(h + 1) * (nope + dv)];
                let mut k = s[..nope].to_vec();
                k.extend(&k_rot);
                (k, s[nope..].to_vec())
            })
            .collect();
        keys.push(per);
    }
    let o = mat(vm, "o_proj.weight");
    xs.iter()
        .enumerate()
        .map(|(i, x)| {
            let q = q_of(x);
            let mut cat = vec![];
            for h in 0..NH {
                let qh = &q[h * qk..(h + 1) * qk];
                let mut qv = qh[..nope].to_vec();
                qv.extend(rotate(&qh[nope..], i, m.rope_interleave));
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        if keep[j] {
                            qv.iter()
                                .zip(&keys[j][h].0)
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                * scale
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                let mut out = vec![0.0; dv];
                for (j, sv) in s.iter().enumerate() {
                    let p = (sv - mx).exp() / z;
                    for (o, v) in out.iter_mut().zip(&keys[j][h].1) {
                        *o += p * v;
                    }
                }
                cat.extend(out);
            }
            matvec(&o, &cat)
        })
        .collect()
}

fn build(m: &MlaConfig, seed: u64) -> (Mla, VarMap, Rope) {
    let vm = VarMap::new();
    let cfg = model_cfg();
    let mla = Mla::new(
        &cfg,
        m,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    randomize(&vm, &mut Rng::new(seed), 0.5);
    let rope = Rope::new(m.qk_rope_head_dim, 64, THETA, DType::F64, &Device::Cpu).unwrap();
    (mla, vm, rope)
}

fn max_diff(got: &Tensor, want: &[Vec<f64>]) -> f64 {
    let got = got.squeeze(0).unwrap().to_vec2::<f64>().unwrap();
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (a - b).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn mla_matches_the_per_token_reference() {
    for (seed, q_lora, interleave) in [(1, None, true), (2, Some(7), true), (3, Some(7), false)] {
        let m = mla_cfg(q_lora, interleave);
        let (mla, vm, rope) = build(&m, seed);
        let mut rng = Rng::new(seed + 100);
        let xs: Vec<Vec<f64>> = (0..T).map(|_| rng.normals(H, 1.0)).collect();
        let x = Tensor::new(xs.clone(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = mla.forward_self(&x, Some(&rope), true, None, None).unwrap();
        let d = max_diff(&got, &reference(&vm, &m, &xs, &[true; T]));
        // The RoPE tables are computed in f32.
        assert!(d < 1e-5, "q_lora {q_lora:?} interleave {interleave}: {d}");
        // A padding mask on the last two keys: the first three rows are unchanged.
        let keep = [true, true, true, false, false];
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let got = mla
            .forward_self(&x, Some(&rope), true, Some(&mask), None)
            .unwrap();
        let want = reference(&vm, &m, &xs, &keep);
        let d = max_diff(&got.narrow(1, 0, 3).unwrap(), &want[..3]);
        assert!(d < 1e-5, "masked: {d}");
        // Incremental decoding: 2 positions, then one at a time.
        let mut cache = KvCache::default();
        let mut parts = vec![mla
            .forward_self(
                &x.narrow(1, 0, 2).unwrap(),
                Some(&rope),
                true,
                None,
                Some(&mut cache),
            )
            .unwrap()];
        for t in 2..T {
            parts.push(
                mla.forward_self(
                    &x.narrow(1, t, 1).unwrap(),
                    Some(&rope),
                    true,
                    None,
                    Some(&mut cache),
                )
                .unwrap(),
            );
        }
        assert_eq!(cache.len(), T);
        let dec = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(&dec, &reference(&vm, &m, &xs, &[true; T]));
        assert!(d < 1e-5, "decode: {d}");
    }
}

#[test]
fn mla_scale_takes_yarn_mscale_all_dim_only() {
    use candle_moe::attention::mla::mla_softmax_scale;
    use candle_moe::config::RopeScaling;
    let yarn = |all: Option<f64>, factor: f64| RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: 16,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(0.707),
        mscale_all_dim: all,
        attention_factor: None,
        truncate: true,
    };
    let base = 1.0 / 192f64.sqrt();
    assert_eq!(mla_softmax_scale(192, None), base);
    assert_eq!(mla_softmax_scale(192, Some(&yarn(None, 40.0))), base);
    assert_eq!(mla_softmax_scale(192, Some(&yarn(Some(0.707), 1.0))), base);
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    let got = mla_softmax_scale(192, Some(&yarn(Some(0.707), 40.0)));
    assert!((got - base * m * m).abs() < 1e-15);
}

#[test]
fn bad_mla_configs_name_the_field() {
    for (m, needle) in [
        (
            MlaConfig {
                qk_rope_head_dim: 3,
                ..mla_cfg(None, true)
            },
            "qk_rope_head_dim",
        ),
        (
            MlaConfig {
                kv_lora_rank: 0,
                ..mla_cfg(None, true)
            },
            "kv_lora_rank",
        ),
        (
            MlaConfig {
                q_lora_rank: Some(0),
                ..mla_cfg(None, true)
            },
            "q_lora_rank",
        ),
    ] {
        let cfg = ModelConfig {
            mla: Some(m),
            ..model_cfg()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
