//! Per-layer router statistics: entropy and mean probability per expert against an f64
//! reference from the router logits, the selection bias, their pooling over the micro-batches of
//! a step in the trainer's history, the state file's round trip and old files; and the NLP
//! examples' routing flags (`examples/common/args.rs`) setting the configuration.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::train::{LayerStepStats, LossParts, StepStats, TrainerState};
use candle_moe::{CausalLm, ModelConfig, MoeConfig, SparseMoe, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{randomize, Rng};

#[allow(dead_code)]
#[path = "../examples/common/args.rs"]
mod args;

/// `(entropy, mean P)` of softmax rows of `logits`, in f64.
fn reference(logits: &Tensor) -> (f64, Vec<f64>) {
    let rows = logits
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let e = rows[0].len();
    let (mut h, mut p_mean) = (0.0, vec![0.0; e]);
    for r in &rows {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = r.iter().map(|l| (l - m).exp()).sum();
        for (j, l) in r.iter().enumerate() {
            let p = (l - m).exp() / z;
            if p > 0.0 {
                h -= p * p.ln();
            }
            p_mean[j] += p;
        }
    }
    let n = rows.len() as f64;
    (h / n, p_mean.into_iter().map(|p| p / n).collect())
}

#[test]
fn layer_entropy_mean_probs_and_bias_match_an_f64_reference() {
    for (bias, scale) in [(false, 0.3), (true, 0.3), (true, 3.0)] {
        let cfg = MoeConfig {
            hidden_size: 12,
            intermediate_size: 8,
            num_experts: 6,
            top_k: 2,
            selection_bias: bias,
            ..MoeConfig::default()
        };
        let vm = VarMap::new();
        let moe =
            SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        randomize(&vm, &mut Rng::new(3), scale);
        let x = Rng::new(4).tensor(&[3, 7, 12], 1.0, DType::F32);
        let out = moe.forward(&x).unwrap();
        let (h, p) = reference(&out.router_logits);
        assert!(
            (out.stats.entropy - h).abs() < 1e-5,
            "entropy {} vs {h}",
            out.stats.entropy
        );
        assert!(h > 0.0 && h < (6f64).ln());
        assert_eq!(out.stats.mean_probs.len(), 6);
        for (a, b) in out.stats.mean_probs.iter().zip(&p) {
            assert!((a - b).abs() < 1e-6, "mean P {a} vs {b}");
        }
        match moe.router().selection_bias() {
            Some(b) => {
                let want = b.to_vec1::<f32>().unwrap();
                assert!(want.iter().any(|&v| v != 0.0));
                let got: Vec<f32> = out.stats.selection_bias.iter().map(|&v| v as f32).collect();
                assert_eq!(got, want);
            }
            None => assert!(out.stats.selection_bias.is_empty()),
        }
    }
}

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::tiny(40);
    (c.hidden_size, c.moe.hidden_size, c.moe.intermediate_size) = (16, 16, 16);
    c.num_layers = 2;
    c.moe.capacity_factor = Some(1.0); // some drops, so `assignments` is more than the counts
    c
}

#[test]
fn history_pools_the_micro_batches_of_a_step() {
    let c = tiny();
    let vm = VarMap::new();
    let model = CausalLm::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    randomize(&vm, &mut Rng::new(9), 0.5);
    let cfg = TrainConfig {
        steps: 1,
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::for_model(&vm, cfg, &c.moe).unwrap();
    let mut rng = Rng::new(11);
    let micro: Vec<LossParts> = [(2usize, 6usize), (1, 10)]
        .iter()
        .map(|&(b, t)| {
            let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 40) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
            let out = model.forward_t(&ids, None, true).unwrap();
            LossParts::from_output(out.logits.mean_all().unwrap(), &out)
        })
        .collect();
    trainer.step_accumulated(&micro).unwrap();
    let layers = &trainer.state.history[0].layers;
    assert_eq!(layers.len(), 2);
    for (i, l) in layers.iter().enumerate() {
        let (a, b) = (&micro[0].routing[i], &micro[1].routing[i]);
        assert_eq!((l.layer, a.layer, b.layer), (i, i, i));
        assert_eq!(l.tokens, 12 + 10);
        assert_eq!(l.assignments, 22 * c.moe.top_k);
        assert_eq!(l.dropped, a.dropped + b.dropped);
        let sum: Vec<usize> = (0..4)
            .map(|e| a.expert_counts[e] + b.expert_counts[e])
            .collect();
        assert_eq!(l.expert_counts, sum);
        assert_eq!(
            l.expert_counts.iter().sum::<usize>() + l.dropped,
            l.assignments
        );
        let h = (12.0 * a.router.entropy + 10.0 * b.router.entropy) / 22.0;
        assert!((l.entropy - h).abs() < 1e-12);
        for e in 0..4 {
            let p = (12.0 * a.router.mean_probs[e] + 10.0 * b.router.mean_probs[e]) / 22.0;
            assert!((l.mean_probs[e] - p).abs() < 1e-12);
        }
        let shares = l.load_shares();
        assert!(
            (shares.iter().sum::<f64>() + l.dropped as f64 / l.assignments as f64 - 1.0).abs()
                < 1e-12
        );
    }
}

#[test]
fn state_with_layer_stats_round_trips_and_old_files_load() {
    let layer = LayerStepStats {
        layer: 3,
        tokens: 10,
        assignments: 20,
        expert_counts: vec![7, 0, 13],
        dropped: 0,
        entropy: f64::NAN,
        mean_probs: vec![0.5, f64::INFINITY, 0.25],
        selection_bias: vec![-0.125, 0.0, 1e-300],
    };
    let stats = StepStats {
        step: 1,
        loss: 1.0,
        task: 1.0,
        load_balancing: 2.0,
        z_loss: 0.5,
        lr: 1e-3,
        grad_norm: 0.1,
        imbalance: 1.5,
        skipped: false,
        layers: vec![layer.clone()],
        ..Default::default()
    };
    let state = TrainerState {
        step: 1,
        seed: 7,
        skipped_total: 0,
        history: vec![stats],
        evals: vec![],
        ..Default::default()
    };
    let json = serde_json::to_string(&state).unwrap();
    let back: TrainerState = serde_json::from_str(&json).unwrap();
    let l = &back.history[0].layers[0];
    assert!(l.entropy.is_nan());
    assert_eq!(l.mean_probs[1], f64::INFINITY);
    assert_eq!(
        (&l.expert_counts, &l.selection_bias),
        (&layer.expert_counts, &layer.selection_bias)
    );
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    // A file written before the per-layer statistics: no `layers`, read as none.
    let old = r#"{"step":1,"seed":7,"skipped_total":0,"history":[{"step":1,"loss":1.0,"task":1.0,
        "load_balancing":2.0,"z_loss":0.5,"lr":0.001,"grad_norm":0.1,"imbalance":1.5,
        "skipped":false}],"evals":[]}"#;
    let old: TrainerState = serde_json::from_str(old).unwrap();
    assert!(old.history[0].layers.is_empty());
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    router: args::RouterArgs,
}

#[test]
fn example_routing_flags_set_the_configuration() {
    let parse = |a: &[&str]| Cli::try_parse_from(std::iter::once("x").chain(a.iter().copied()));
    let cli = parse(&[
        "--balance",
        "aux-free,sequence",
        "--scoring",
        "sigmoid",
        "--bias-rate",
        "0.01",
    ])
    .unwrap();
    let (mut c, mut t) = (ModelConfig::tiny(10), TrainConfig::default());
    cli.router.apply_model(&mut c).unwrap();
    cli.router.apply_train(&mut t).unwrap();
    assert_eq!(c.moe.scoring, candle_moe::RouterScoring::Sigmoid);
    assert!(c.moe.selection_bias && !t.global_batch_balance);
    assert_eq!(
        (c.moe.router_aux_loss_coef, c.moe.seq_aux_loss_coef),
        (0.0, 1e-4)
    );
    assert_eq!(t.bias_update_rate, 0.01);
    let cli = parse(&["--balance", "global-batch", "--aux-loss-coef", "0.3"]).unwrap();
    cli.router.apply_model(&mut c).unwrap();
    cli.router.apply_train(&mut t).unwrap();
    assert!(t.global_batch_balance && !c.moe.selection_bias);
    assert_eq!((c.moe.router_aux_loss_coef, t.bias_update_rate), (0.3, 0.0));
    for (bad, needle) in [
        (vec!["--balance", "foo"], "unknown method `foo`"),
        (vec!["--balance", "aux-loss,"], "unknown method ``"),
        (vec!["--scoring", "tanh"], "unknown scoring `tanh`"),
        (vec!["--bias-rate=-1"], "--bias-rate must be"),
    ] {
        let e = parse(&bad).unwrap().router.balance().unwrap_err();
        assert!(e.contains(needle), "{bad:?}: `{e}`");
    }
    assert_eq!(
        args::parse_routing("expert-choice").unwrap(),
        candle_moe::RoutingKind::ExpertChoice
    );
    assert!(args::parse_routing("sideways")
        .unwrap_err()
        .contains("sideways"));
}

/// `language_model --balance aux-free --scoring sigmoid` end to end on a tiny model: the run
/// succeeds, its config keeps the choice, and the trained selection bias it saves has moved
/// (mean-centred: it sums to zero).
#[test]
fn language_model_trains_with_the_aux_free_bias() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lm");
    let args = [
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--experts",
        "4",
        "--expert-ffn",
        "16",
        "--eval-windows",
        "4",
        "--balance",
        "aux-free",
        "--bias-rate",
        "0.01",
        "--scoring",
        "sigmoid",
    ];
    let (code, stderr) = common::example_cli("language_model", &args);
    assert_eq!(code, 0, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["moe"]["selection_bias"], true);
    assert_eq!(cfg["moe"]["scoring"], "sigmoid");
    assert_eq!(cfg["moe"]["router_aux_loss_coef"], 0.0);
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let b = w["model.layers.0.block_sparse_moe.gate.e_score_correction_bias"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(b.iter().any(|&v| v != 0.0), "the bias did not move: {b:?}");
    assert!(
        b.iter().sum::<f32>().abs() < 1e-5,
        "not mean-centred: {b:?}"
    );
}
