//! The sampler's top-k / top-p / temperature distribution against distributions computed by
//! hand, and its draws against that distribution.

use candle_core::{Device, Tensor};
use candle_moe::{Sampler, SamplingConfig};

fn logits(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn cfg(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k,
        top_p,
        seed: 11,
        ..Default::default()
    }
}

/// softmax(x / t) over the given logits, in f64.
fn softmax(x: &[f64], t: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| ((v - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn assert_dist(got: &[(u32, f64)], want: &[(u32, f64)]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for ((gi, gp), (wi, wp)) in got.iter().zip(want) {
        assert_eq!(gi, wi, "{got:?} vs {want:?}");
        assert!((gp - wp).abs() < 1e-7, "{got:?} vs {want:?}");
    }
}

// Logits of 6 tokens, not in order: sorted ids by logit are 3, 0, 4, 1, 5, 2.
const L: [f32; 6] = [2.0, 0.5, -1.0, 3.0, 1.0, 0.0];

#[test]
fn temperature_alone_is_the_softmax() {
    let order = [3u32, 0, 4, 1, 5, 2];
    for t in [1.0, 0.5, 2.0] {
        let x: Vec<f64> = order.iter().map(|&i| L[i as usize] as f64).collect();
        let want: Vec<(u32, f64)> = order.iter().cloned().zip(softmax(&x, t)).collect();
        let got = Sampler::new(cfg(t, None, None))
            .distribution(&logits(&L))
            .unwrap();
        assert_dist(&got, &want);
    }
}

#[test]
fn top_k_keeps_the_k_largest_and_renormalises() {
    // k = 3 at t = 1: softmax over logits 3, 2, 1 (ids 3, 0, 4).
    let p = softmax(&[3.0, 2.0, 1.0], 1.0);
    let got = Sampler::new(cfg(1.0, Some(3), None))
        .distribution(&logits(&L))
        .unwrap();
    assert_dist(&got, &[(3, p[0]), (0, p[1]), (4, p[2])]);
    // k larger than the vocabulary keeps everything.
    assert_eq!(
        Sampler::new(cfg(1.0, Some(50), None))
            .distribution(&logits(&L))
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn top_p_keeps_the_smallest_nucleus_reaching_p() {
    // The full softmax at t = 1, in logit order.
    let x: Vec<f64> = [3.0, 2.0, 1.0, 0.5, 0.0, -1.0].to_vec();
    let p = softmax(&x, 1.0);
    let c1 = p[0];
    let c2 = p[0] + p[1];
    // p just above the first token's mass: two tokens; exactly the first's mass: one token
    // (transformers removes a token when the mass above it already reaches top_p).
    let got = Sampler::new(cfg(1.0, None, Some(c1 + 1e-6)))
        .distribution(&logits(&L))
        .unwrap();
    assert_dist(&got, &[(3, p[0] / c2), (0, p[1] / c2)]);
    let got = Sampler::new(cfg(1.0, None, Some(c1 - 1e-6)))
        .distribution(&logits(&L))
        .unwrap();
    assert_dist(&got, &[(3, 1.0)]);
    let got = Sampler::new(cfg(1.0, None, Some(0.9)))
        .distribution(&logits(&L))
        .unwrap();
    let c3 = c2 + p[2];
    assert_dist(&got, &[(3, p[0] / c3), (0, p[1] / c3), (4, p[2] / c3)]);
    assert_eq!(
        Sampler::new(cfg(1.0, None, Some(1.0)))
            .distribution(&logits(&L))
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn top_k_then_top_p_at_a_temperature() {
    // t = 0.5, k = 4: softmax(2·[3, 2, 1, 0.5]); then top_p = 0.95 on that.
    let p = softmax(&[3.0, 2.0, 1.0, 0.5], 0.5);
    let mut keep = 0;
    let mut acc = 0.0;
    while acc < 0.95 {
        acc += p[keep];
        keep += 1;
    }
    let ids = [3u32, 0, 4, 1];
    let want: Vec<(u32, f64)> = (0..keep).map(|j| (ids[j], p[j] / acc)).collect();
    let got = Sampler::new(cfg(0.5, Some(4), Some(0.95)))
        .distribution(&logits(&L))
        .unwrap();
    assert_dist(&got, &want);
}

#[test]
fn infinite_logits_share_the_mass() {
    let got = Sampler::new(cfg(1.0, None, None))
        .distribution(&logits(&[0.0, f32::INFINITY, 5.0, f32::INFINITY]))
        .unwrap();
    let mass: Vec<(u32, f64)> = got.into_iter().filter(|(_, p)| *p > 0.0).collect();
    assert_dist(&mass, &[(1, 0.5), (3, 0.5)]);
}

/// 200,000 seeded draws: every token's frequency within 4.5 standard errors of its probability,
/// and nothing outside the distribution's support is drawn.
#[test]
fn draws_follow_the_distribution() {
    let c = cfg(0.8, Some(5), Some(0.97));
    let dist = Sampler::new(c.clone()).distribution(&logits(&L)).unwrap();
    let mut s = Sampler::new(c);
    let n = 200_000;
    let mut counts = [0usize; 6];
    let t = logits(&L);
    for _ in 0..n {
        counts[s.sample(&t).unwrap() as usize] += 1;
    }
    for (id, count) in counts.iter().enumerate() {
        let p = dist
            .iter()
            .find(|(i, _)| *i as usize == id)
            .map_or(0.0, |d| d.1);
        let f = *count as f64 / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (f - p).abs() <= 4.5 * se + 1e-12,
            "token {id}: frequency {f} vs probability {p}"
        );
    }
}
