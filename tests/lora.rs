//! LoRA: adapters on attention and experts start as the identity, only they receive
//! gradients, the grouped expert path (split form per expert) equals the per-expert loop, and
//! merging gives the same outputs as the unmerged adapters.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::layers::LoraConfig;
use candle_moe::moe::ExpertBackend;
use candle_moe::{CausalLm, LoadOptions, MoeConfig, SparseMoe, TrainConfig, Trainer};
use candle_nn::{VarBuilder, VarMap};

/// Sets every `lora_B` of `vm` to small random values (so the adapters are not the identity).
fn randomise_b(vm: &VarMap) {
    for (n, v) in vm.data().lock().unwrap().iter() {
        if n.contains("lora_B") {
            let t = Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu).unwrap();
            v.set(&t).unwrap();
        }
    }
}

#[test]
fn adapters_train_alone_and_merge_exactly() {
    for fam in ["mixtral", "qwen2_moe", "olmoe"] {
        let opts = LoadOptions::default();
        let mut model =
            CausalLm::from_pretrained(common::hf_fixture(fam).to_str().unwrap(), &opts).unwrap();
        let (x, y) = common::fixed_lm_batch();
        let before = model.forward(&x).unwrap().logits;
        let vm = model
            .add_lora(&LoraConfig {
                rank: 4,
                seed: 3,
                ..Default::default()
            })
            .unwrap();
        let d = common::max_abs_diff(&before, &model.forward(&x).unwrap().logits);
        assert!(d < 1e-5, "{fam}: fresh adapters change the output by {d}");

        // Only the adapters receive gradients.
        let parts = candle_moe::tasks::language_model::loss_parts(&model, &x, &y, true).unwrap();
        let grads = parts.task.backward().unwrap();
        for (n, t) in model.parameters() {
            assert!(
                grads.get(t).is_none(),
                "{fam}: base weight `{n}` got a gradient"
            );
        }
        let data = vm.data().lock().unwrap();
        assert!(data.keys().any(|k| k.contains("self_attn.q_proj.lora_A")));
        assert!(data.keys().any(|k| k.contains("experts.0.w1.lora_B")));
        let with_grad = data
            .values()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        assert!(
            with_grad > data.len() / 2,
            "{fam}: {with_grad}/{} adapters got gradients",
            data.len()
        );
        drop(data);

        // Training the adapters lowers the loss.
        let cfg = TrainConfig {
            steps: 15,
            lr: 1e-2,
            warmup_steps: 0,
            progress: false,
            ..Default::default()
        };
        let mut trainer = Trainer::new(&vm, cfg).unwrap();
        let first = trainer
            .step(&candle_moe::tasks::language_model::loss_parts(&model, &x, &y, true).unwrap())
            .unwrap()
            .task;
        for _ in 1..15 {
            trainer
                .step(&candle_moe::tasks::language_model::loss_parts(&model, &x, &y, true).unwrap())
                .unwrap();
        }
        let tuned = model.forward(&x).unwrap().logits;
        let last = candle_moe::tasks::language_model::loss_parts(&model, &x, &y, false)
            .unwrap()
            .task
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(last < first, "{fam}: adapter training {first} -> {last}");

        // Merged = unmerged.
        model.merge_lora().unwrap();
        let d = common::max_abs_diff(&tuned, &model.forward(&x).unwrap().logits);
        assert!(d < 1e-5, "{fam}: merged vs unmerged differ by {d}");
    }
}

#[test]
fn grouped_lora_equals_the_loop() {
    let cfg = MoeConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_experts: 4,
        top_k: 2,
        ..Default::default()
    };
    let base = VarMap::new();
    let mut moe = SparseMoe::new(
        &cfg,
        VarBuilder::from_varmap(&base, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vm = VarMap::new();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    for (e, ex) in moe.experts_mut().experts_mut().iter_mut().enumerate() {
        for (n, p) in ex.projs_mut() {
            let lc = LoraConfig {
                rank: 3,
                ..Default::default()
            };
            p.attach_lora(&lc, &format!("experts.{e}.{n}"), &vm, &mut rng)
                .unwrap();
        }
    }
    randomise_b(&vm);
    let x = Tensor::randn(0f32, 1.0, (20, 16), &Device::Cpu).unwrap();
    let mut outs = vec![];
    for backend in [ExpertBackend::Grouped, ExpertBackend::Loop] {
        moe.set_backend(backend);
        let y = moe.forward_t(&x, true).unwrap().hidden_states;
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = vm
            .all_vars()
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .map(|g| {
                        g.sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    })
                    .unwrap_or(0.0)
            })
            .collect();
        outs.push((y, g));
    }
    let d = common::max_abs_diff(&outs[0].0, &outs[1].0);
    assert!(d < 1e-5, "grouped vs loop outputs differ by {d}");
    for (a, b) in outs[0].1.iter().zip(&outs[1].1) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "adapter gradient {a} vs {b}"
        );
    }
    assert!(outs[0].1.iter().filter(|g| **g > 0.0).count() > outs[0].1.len() / 2);
}
