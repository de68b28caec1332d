//! Fine-tuning controls: gradient accumulation (k micro-batches = one batch k times the size,
//! except the balancing terms, formed per micro-batch), parameter groups without weight decay,
//! and training a selection of the variables.

use candle_core::{DType, Device, Tensor, Var};
use candle_moe::train::{select_vars, LossParts, TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig};
use candle_nn::{VarBuilder, VarMap};

fn model() -> (CausalLm, VarMap) {
    let mut c = ModelConfig::tiny(40);
    c.hidden_size = 16;
    c.moe.hidden_size = 16;
    c.moe.intermediate_size = 16;
    c.num_layers = 2;
    let vm = VarMap::new();
    let m = CausalLm::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_moe::train::init::reseed_varmap(&vm, 4).unwrap();
    (m, vm)
}

/// `rows` sequences of 9 tokens: inputs (rows, 8), targets (rows·8,).
fn batch(rows: std::ops::Range<u32>) -> (Tensor, Tensor) {
    let ids: Vec<u32> = rows
        .flat_map(|r| (0..9u32).map(move |i| (r * 13 + i * 7 + 3) % 40))
        .collect();
    let n = ids.len() / 9;
    let t = Tensor::from_vec(ids, (n, 9), &Device::Cpu).unwrap();
    let y = t.narrow(1, 1, 8).unwrap().flatten_all().unwrap();
    (t.narrow(1, 0, 8).unwrap(), y)
}

fn parts(m: &CausalLm, (x, y): &(Tensor, Tensor)) -> LossParts {
    candle_moe::tasks::language_model::loss_parts(m, x, y, true).unwrap()
}

/// Adam with a large `eps`, so that an update is close to linear in the gradient (with the
/// default 1e-8 the first step is about `lr · sign(g)`, which amplifies rounding in tiny
/// gradient components).
fn cfg(aux: Option<f64>) -> TrainConfig {
    TrainConfig {
        steps: 10,
        lr: 1e-2,
        eps: 1.0,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: None,
        aux_loss_coef: aux,
        z_loss_coef: aux,
        progress: false,
        ..Default::default()
    }
}

fn flat(vm: &VarMap) -> Vec<f32> {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| data[*n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    // Task loss only: identical gradients, so identical steps.
    let (m1, vm1) = model();
    let mut t1 = Trainer::new(&vm1, cfg(Some(0.0))).unwrap();
    let s1 = t1
        .step_accumulated(&[parts(&m1, &batch(0..2)), parts(&m1, &batch(2..4))])
        .unwrap();
    let (m2, vm2) = model();
    let mut t2 = Trainer::new(&vm2, cfg(Some(0.0))).unwrap();
    let s2 = t2.step(&parts(&m2, &batch(0..4))).unwrap();
    assert!(
        (s1.grad_norm - s2.grad_norm).abs() <= 1e-5 * s2.grad_norm,
        "grad norm {} vs {}",
        s1.grad_norm,
        s2.grad_norm
    );
    assert!(
        (s1.task - s2.task).abs() < 1e-5,
        "{} vs {}",
        s1.task,
        s2.task
    );
    let d = flat(&vm1)
        .iter()
        .zip(flat(&vm2))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "parameters after the step differ by {d}");
}

#[test]
fn balancing_terms_are_formed_per_micro_batch() {
    // With the balancing terms on, the step optimises the mean of the micro-batches' total
    // losses: its gradient is the mean of theirs, and its reported balancing loss their mean.
    let (m, vm) = model();
    let (a, b) = (batch(0..2), batch(2..5));
    let micro = [parts(&m, &a), parts(&m, &b)];
    let coef = (0.3, 0.05);
    let total = |p: &LossParts| {
        ((&p.task + (&p.load_balancing * coef.0).unwrap()).unwrap() + (&p.z_loss * coef.1).unwrap())
            .unwrap()
    };
    let mut sum: Option<Vec<f64>> = None;
    for p in &micro {
        let g = (total(p) / 2.0).unwrap().backward().unwrap();
        let flat_g: Vec<f64> = vm
            .all_vars()
            .iter()
            .flat_map(|var| match g.get(var.as_tensor()) {
                Some(t) => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect::<Vec<_>>(),
                None => vec![0.0; var.elem_count()],
            })
            .collect();
        sum = Some(match sum {
            None => flat_g,
            Some(s) => s.iter().zip(flat_g).map(|(x, y)| x + y).collect(),
        });
    }
    let want_norm = sum.unwrap().iter().map(|x| x * x).sum::<f64>().sqrt();
    let lb_mean = micro
        .iter()
        .map(|p| p.load_balancing.to_scalar::<f32>().unwrap() as f64)
        .sum::<f64>()
        / 2.0;
    let mut t = Trainer::new(&vm, cfg(None)).unwrap();
    t.cfg.aux_loss_coef = Some(coef.0);
    t.cfg.z_loss_coef = Some(coef.1);
    let s = t.step_accumulated(&micro).unwrap();
    assert!(
        (s.grad_norm - want_norm).abs() <= 1e-5 * want_norm,
        "accumulated grad norm {} vs mean of micro-batch gradients {want_norm}",
        s.grad_norm
    );
    assert!((s.load_balancing - lb_mean).abs() < 1e-6);
}

#[test]
fn norms_biases_embeddings_and_routers_get_no_weight_decay() {
    let vm = VarMap::new();
    let names = [
        "model.norm.weight",
        "model.embed_tokens.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.q_proj.weight",
    ];
    let mut loss: Option<Tensor> = None;
    for n in names {
        let v = Var::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let l = v.as_tensor().sum_all().unwrap(); // gradient 1 everywhere
        loss = Some(match loss {
            None => l,
            Some(s) => (s + l).unwrap(),
        });
        vm.data().lock().unwrap().insert(n.to_string(), v);
    }
    let zero = Tensor::new(0f32, &Device::Cpu).unwrap();
    let c = TrainConfig {
        weight_decay: 0.5,
        lr: 0.1,
        warmup_steps: 0,
        progress: false,
        ..Default::default()
    };
    let mut t = Trainer::new(&vm, c).unwrap();
    t.step(&LossParts::new(loss.unwrap(), zero.clone(), zero, vec![]))
        .unwrap();
    let data = vm.data().lock().unwrap();
    for n in names {
        let v = data[n].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        // Adam's first step moves every weight by lr · g / (|g| + eps) = 0.1; decoupled decay
        // also scales the decayed ones by 1 - lr · weight_decay.
        let decays = n.ends_with("q_proj.weight");
        let want = if decays {
            1.0 - 0.1 * 0.5 - 0.1
        } else {
            1.0 - 0.1
        };
        assert!((v - want).abs() < 1e-6, "{n}: {v} (decay {decays})");
    }
}

#[test]
fn a_selection_of_variables_trains_alone() {
    let (m, vm) = model();
    let experts_only = select_vars(&vm, |n| n.contains(".experts."));
    assert!(experts_only.all_vars().len() < vm.all_vars().len());
    let before = flat(&vm);
    let mut t = Trainer::new(&experts_only, cfg(Some(0.0))).unwrap();
    t.step(&parts(&m, &batch(0..4))).unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut at = 0;
    let (mut changed_experts, mut changed_others) = (0, 0);
    for n in names {
        let v = data[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let moved = v.iter().zip(&before[at..at + v.len()]).any(|(a, b)| a != b);
        at += v.len();
        if n.contains(".experts.") {
            changed_experts += moved as usize;
        } else {
            changed_others += moved as usize;
        }
    }
    assert!(changed_experts > 0);
    assert_eq!(changed_others, 0, "variables outside the selection changed");
}
