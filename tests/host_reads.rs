//! Device-to-host reads, counted on CPU with `ops::host_reads` (the same code runs on CUDA, where
//! each is a transfer and a synchronisation): one per sparse layer forward on every routing path
//! the generic and grouped backends take (token choice in training and inference, noisy gating,
//! capacity, replay, expert choice); the fused CPU inference path also copies the gate weights
//! (two; it exists only on CPU); a language model forward adds one for its token-id check; a
//! training step makes three (the logged losses, the gradient norm that clipping uses, the
//! finiteness probe of the update).

use candle_core::{DType, Device, Tensor};
use candle_moe::moe::ExpertBackend;
use candle_moe::ops::host_reads;
use candle_moe::train::LossParts;
use candle_moe::{CausalLm, ModelConfig, MoeConfig, RoutingKind, SparseMoe, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};

fn reads<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = host_reads();
    let out = f();
    (out, host_reads() - before)
}

fn layer(cfg: &MoeConfig, backend: ExpertBackend) -> SparseMoe {
    let vm = VarMap::new();
    let mut moe =
        SparseMoe::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    moe.set_backend(backend);
    moe
}

#[test]
fn one_read_per_sparse_layer_forward() {
    let base = MoeConfig {
        hidden_size: 8,
        intermediate_size: 16,
        num_experts: 4,
        top_k: 2,
        ..Default::default()
    };
    let cases = [
        ("plain", base.clone()),
        (
            "capacity",
            MoeConfig {
                capacity_factor: Some(1.0),
                ..base.clone()
            },
        ),
        (
            "noisy",
            MoeConfig {
                noisy_gating: true,
                router_jitter_noise: 0.1,
                ..base.clone()
            },
        ),
        (
            "sigmoid+bias+groups",
            MoeConfig {
                scoring: candle_moe::RouterScoring::Sigmoid,
                selection_bias: true,
                n_group: 2,
                topk_group: 1,
                ..base.clone()
            },
        ),
        (
            "expert choice",
            MoeConfig {
                routing: RoutingKind::ExpertChoice,
                ..base.clone()
            },
        ),
        (
            "shared",
            MoeConfig {
                shared_expert_intermediate_size: 8,
                ..base.clone()
            },
        ),
    ];
    let xs = Tensor::randn(0f32, 1.0, (2, 6, 8), &Device::Cpu).unwrap();
    for (name, cfg) in cases {
        for backend in [ExpertBackend::Loop, ExpertBackend::Grouped] {
            let moe = layer(&cfg, backend);
            for train in [false, true] {
                let (out, n) = reads(|| moe.forward_t(&xs, train).unwrap());
                assert_eq!(n, 1, "{name} {backend:?} train={train}");
                if let Some(ids) = &out.expert_ids {
                    let (_, n) = reads(|| moe.forward_replay(&xs, ids, train).unwrap());
                    // Replay checks the forced ids on the host once, then routes as usual.
                    assert_eq!(n, 2, "{name} replay");
                }
            }
        }
    }
}

#[test]
fn fused_inference_path_copies_the_gate_weights_too() {
    let cfg = MoeConfig {
        hidden_size: 8,
        intermediate_size: 16,
        num_experts: 4,
        top_k: 2,
        ..Default::default()
    };
    let vm = VarMap::new();
    SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let ts: std::collections::HashMap<String, Tensor> =
        candle_moe::io::safetensors::varmap_tensors(&vm)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.detach()))
            .collect();
    let moe = SparseMoe::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)).unwrap();
    let xs = Tensor::randn(0f32, 1.0, (12, 8), &Device::Cpu).unwrap();
    assert_eq!(
        moe.chosen_backend(&xs, false).unwrap(),
        ExpertBackend::Fused
    );
    let (_, n) = reads(|| moe.forward(&xs).unwrap());
    assert_eq!(n, 2);
}

#[test]
fn model_forward_and_training_step_reads() {
    let mut cfg = ModelConfig::tiny(32);
    (cfg.hidden_size, cfg.moe.hidden_size, cfg.num_layers) = (16, 16, 3);
    (cfg.moe.intermediate_size, cfg.dense_intermediate_size) = (16, 16);
    let vm = VarMap::new();
    let model =
        CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let ids = Tensor::arange(0u32, 32, &Device::Cpu)
        .unwrap()
        .reshape((2, 16))
        .unwrap();
    // The token-id range check, then one per sparse layer (3).
    let (_, n) = reads(|| model.forward_t(&ids, None, true).unwrap());
    assert_eq!(n, 1 + 3);

    let train = TrainConfig {
        steps: 2,
        warmup_steps: 0,
        progress: false,
        grad_clip: Some(0.5),
        ..Default::default()
    };
    let mut trainer = Trainer::for_model(&vm, train, &cfg.moe).unwrap();
    let (x, y) = (
        ids.narrow(1, 0, 15).unwrap(),
        ids.narrow(1, 1, 15).unwrap().flatten_all().unwrap(),
    );
    let out = model.forward_t(&x, None, true).unwrap();
    let task = candle_moe::losses::cross_entropy(&out.logits.reshape((30, 32)).unwrap(), &y, None)
        .unwrap();
    let parts = LossParts::from_output(task, &out);
    let (stats, n) = reads(|| trainer.step(&parts).unwrap());
    assert!(!stats.skipped);
    assert_eq!(n, 3, "losses, gradient norm, update probe");
}
