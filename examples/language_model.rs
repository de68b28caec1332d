//! The main job: train a small MoE language model on the Shakespeare the repo ships.
//!
//! `cargo run --release --example language_model` trains for the default budget, prints the
//! validation perplexity against a unigram baseline, per-layer expert load and three samples,
//! and writes the model directory plus `training.png` into `--out`.
//! `--dense` trains the dense baseline with the same active parameters;
//! `--generate "prompt"` samples from a saved model.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_moe::data::{self, shakespeare};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::tasks::language_model as lm;
use candle_moe::tokenizer;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig, SamplingConfig};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{main_wrapper, plot_panels, print_table, Series};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Train a small MoE language model on Shakespeare")]
struct Args {
    /// Device, seed, output and data options shared by the examples.
    #[command(flatten)]
    run: common::RunArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 800)]
    steps: usize,
    /// Load the model in --out (or --resume) and sample from this prompt.
    #[arg(long)]
    generate: Option<String>,
    /// Batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Blocks.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Experts per sparse layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Hidden size of each expert.
    #[arg(long, default_value_t = 128)]
    expert_ffn: usize,
    /// BPE vocabulary size.
    #[arg(long, default_value_t = 1024)]
    vocab: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Validation windows.
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Coefficient of the load-balancing loss.
    #[arg(long, default_value_t = 0.05)]
    aux_loss_coef: f64,
    /// Scale of the routers' initial weights (1 = the same init as other linear layers; smaller
    /// starts from flatter routing, as Switch Transformer recommends).
    #[arg(long, default_value_t = 1.0)]
    router_init_scale: f64,
    /// Coefficient of the router z-loss.
    #[arg(long, default_value_t = 0.001)]
    z_loss_coef: f64,
}

fn model_config(a: &Args, vocab: usize) -> ModelConfig {
    let mut c = ModelConfig::tiny(vocab);
    c.hidden_size = a.hidden;
    c.num_layers = a.layers;
    c.num_heads = 4;
    c.num_kv_heads = 4;
    c.max_position_embeddings = a.seq_len.max(256);
    c.moe.hidden_size = a.hidden;
    c.moe.num_experts = a.experts;
    c.moe.top_k = a.top_k;
    c.moe.intermediate_size = a.expert_ffn;
    c.moe.router_aux_loss_coef = a.aux_loss_coef;
    c.moe.router_z_loss_coef = a.z_loss_coef;
    // The dense baseline runs k experts' worth of FFN per token: the same active parameters.
    c.dense_intermediate_size = a.expert_ffn * a.top_k;
    c.sparse_step = if a.run.dense { 0 } else { 1 };
    c
}

fn main() {
    main_wrapper(run)
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    let out = a.run.out.clone().unwrap_or_else(|| {
        PathBuf::from(if a.run.dense {
            "runs/language_model_dense"
        } else {
            "runs/language_model"
        })
    });
    if let Some(prompt) = &a.generate {
        let dir = a.run.resume.clone().unwrap_or(out);
        return generate(&dir, prompt, &dev, a.run.seed);
    }
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let t0 = Instant::now();
    let path = a
        .run
        .data
        .clone()
        .unwrap_or_else(|| data::data_dir().join("shakespeare.txt.gz"));
    let works = shakespeare::load(&path)?;
    let (train_w, valid_w) = shakespeare::split(works);
    anyhow::ensure!(
        !train_w.is_empty() && !valid_w.is_empty(),
        "need training and validation works"
    );
    let train_text: Vec<&str> = train_w.iter().map(|w| w.text.as_str()).collect();

    let tok = match (&a.run.tokenizer, &a.run.resume) {
        (Some(p), _) => tokenizer::load(p)?,
        (None, Some(r)) => tokenizer::load(&r.join("tokenizer.json"))?,
        (None, None) => {
            tokenizer::train_bpe(train_text.iter().flat_map(|t| t.split("\n\n")), a.vocab)?
        }
    };
    let vocab = tok.get_vocab_size(true);
    let encode_all = |texts: &[&str]| -> Result<Vec<u32>> {
        let mut ids = vec![];
        for t in texts {
            for para in t.split("\n\n") {
                ids.extend(tokenizer::encode(&tok, &format!("{para}\n\n"))?);
            }
        }
        Ok(ids)
    };
    let train_ids = encode_all(&train_text)?;
    let valid_ids = encode_all(&valid_w.iter().map(|w| w.text.as_str()).collect::<Vec<_>>())?;
    println!(
        "data: {} train works ({} tokens), {} validation works {:?} ({} tokens), vocab {vocab}, prep {:.1}s",
        train_w.len(),
        train_ids.len(),
        valid_w.len(),
        valid_w.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        valid_ids.len(),
        t0.elapsed().as_secs_f64()
    );

    let cfg = match &a.run.resume {
        Some(r) => ModelConfig::from_file(r.join("config.json"))?,
        None => model_config(&a, vocab),
    };
    let (model, vm) = match &a.run.resume {
        Some(r) => CausalLm::load(r, DType::F32, &dev)?,
        None => {
            let vm = VarMap::new();
            let m = CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
            candle_moe::train::init::reseed_varmap(&vm, a.run.seed)?;
            if a.router_init_scale != 1.0 {
                let data = vm
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
                for (name, var) in data.iter() {
                    if name.ends_with("block_sparse_moe.gate.weight") {
                        var.set(&(var.as_tensor() * a.router_init_scale)?)?;
                    }
                }
            }
            (m, vm)
        }
    };
    let n_params: usize = candle_moe::io::safetensors::varmap_tensors(&vm)?
        .values()
        .map(|t| t.elem_count())
        .sum();
    let tcfg = TrainConfig {
        steps: a.steps,
        lr: a.lr,
        warmup_steps: (a.steps / 20).max(1),
        eval_every: a.eval_every,
        checkpoint_every: 500,
        aux_loss_coef: cfg.moe.router_aux_loss_coef,
        z_loss_coef: cfg.moe.router_z_loss_coef,
        seed: a.run.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vm, tcfg)?;
    if let Some(r) = &a.run.resume {
        trainer.load_state(r)?;
        println!(
            "resumed from {} at step {}",
            r.display(),
            trainer.state.step
        );
    }
    let ffn = if a.run.dense {
        format!("a dense FFN of width {}", cfg.dense_intermediate_size)
    } else {
        format!(
            "{} experts top-{} of width {}",
            cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size
        )
    };
    println!(
        "model: {} ({} layers, width {}, {ffn}), {:.2}M parameters",
        if a.run.dense { "dense" } else { "MoE" },
        cfg.num_layers,
        cfg.hidden_size,
        n_params as f64 / 1e6
    );
    let tok_json = tokenizer::to_json(&tok)?;
    let mut shares: Vec<(usize, Vec<f64>)> = vec![];
    let t_train = Instant::now();
    let start_step = trainer.state.step;
    {
        let eval = || -> candle_moe::Result<f64> {
            Ok(lm::evaluate(
                &model,
                &valid_ids,
                a.seq_len,
                a.batch,
                a.eval_windows / 4,
                &dev,
            )?
            .nll)
        };
        trainer.run(
            |rng| {
                Ok(lm::batch(&train_ids, a.batch, a.seq_len, rng, &dev)
                    .and_then(|(x, y)| lm::loss_parts(&model, &x, &y, true))?)
            },
            eval,
            |tr| {
                checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
                tr.save_state(&out)
            },
        )?;
    }
    let train_secs = t_train.elapsed().as_secs_f64();
    let trained_tokens = (trainer.state.step - start_step) * a.batch * a.seq_len;
    checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
    trainer.save_state(&out)?;

    let ev = lm::evaluate(&model, &valid_ids, a.seq_len, a.batch, a.eval_windows, &dev)?;
    shares.push((
        trainer.state.step,
        ev.expert_share.iter().flatten().copied().collect(),
    ));
    let uni = lm::unigram_nll(&train_ids, &valid_ids, vocab);
    println!(
        "\nvalidation perplexity: {:.2} (unigram baseline {:.2}) over {} tokens",
        ev.nll.exp(),
        uni.exp(),
        ev.tokens
    );
    if !ev.expert_share.is_empty() {
        println!("expert load on validation (share of routed assignments):");
        for (l, s) in ev.expert_share.iter().enumerate() {
            let cells: Vec<String> = s.iter().map(|x| format!("{:.3}", x)).collect();
            let max = s.iter().cloned().fold(0.0, f64::max);
            let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
            // An expert that gets under 1% of its fair share counts as unused.
            let unused = s.iter().filter(|&&x| x < 0.01 * mean).count();
            println!(
                "  layer {l}: [{}]  max/mean {:.2}, unused experts {unused}",
                cells.join(", "),
                max / mean.max(1e-12)
            );
        }
    }
    println!("\nsamples (top-p 0.9, temperature 0.8):");
    for (i, prompt) in ["ROMEO:", "To be, or not", "KING HENRY."]
        .iter()
        .enumerate()
    {
        let s = sample(&model, &tok, prompt, a.run.seed + i as u64, 60)?;
        println!("--- {prompt}{s}");
    }

    // Plot: losses and expert balance over training.
    let hist = &trainer.state.history;
    let smooth = |f: &dyn Fn(&candle_moe::train::StepStats) -> f64| -> Vec<(f64, f64)> {
        let w = 20usize;
        hist.windows(w.min(hist.len()).max(1))
            .map(|win| {
                (
                    win[win.len() - 1].step as f64,
                    win.iter().map(f).sum::<f64>() / win.len() as f64,
                )
            })
            .collect()
    };
    let plot_path = out.join("training.png");
    let mut panels = vec![(
        "loss (nats/token)",
        "loss",
        vec![
            Series {
                name: "train (20-step mean)".into(),
                points: smooth(&|s| s.task),
            },
            Series {
                name: "validation".into(),
                points: trainer
                    .state
                    .evals
                    .iter()
                    .map(|(s, v)| (*s as f64, *v))
                    .collect(),
            },
        ],
    )];
    if !a.run.dense {
        panels.push((
            "expert load balance (mean over layers of max/mean expert load per batch)",
            "max/mean",
            vec![Series {
                name: "imbalance".into(),
                points: smooth(&|s| s.imbalance.min(50.0)),
            }],
        ));
    }
    if let Err(e) = plot_panels(
        &plot_path,
        "candle-moe: Shakespeare language model",
        &panels,
    ) {
        eprintln!("warning: could not draw {}: {e}", plot_path.display());
    }
    println!();
    print_table(
        &["metric", if a.run.dense { "dense" } else { "MoE" }],
        &[
            vec![
                "validation perplexity".into(),
                format!("{:.2}", ev.nll.exp()),
            ],
            vec!["unigram perplexity".into(), format!("{:.2}", uni.exp())],
            vec!["steps".into(), trainer.state.step.to_string()],
            vec![
                "skipped steps".into(),
                trainer.state.skipped_total.to_string(),
            ],
            vec![
                "parameters".into(),
                format!("{:.2}M", n_params as f64 / 1e6),
            ],
            vec!["train wall time".into(), format!("{:.0}s", train_secs)],
            vec![
                "train tokens/s".into(),
                format!("{:.0}", trained_tokens as f64 / train_secs),
            ],
        ],
    );
    println!(
        "\nwrote {} (model directory) and {}",
        out.display(),
        plot_path.display()
    );
    Ok(())
}

fn sample(
    model: &CausalLm,
    tok: &tokenizers::Tokenizer,
    prompt: &str,
    seed: u64,
    n: usize,
) -> Result<String> {
    let ids = tokenizer::encode(tok, prompt)?;
    let cfg = SamplingConfig {
        temperature: 0.8,
        top_p: Some(0.9),
        seed,
        max_new_tokens: n,
        ..Default::default()
    };
    let out = model.generate(&ids, &cfg)?;
    Ok(tokenizer::decode(tok, &out)?)
}

fn generate(
    dir: &std::path::Path,
    prompt: &str,
    dev: &candle_core::Device,
    seed: u64,
) -> Result<()> {
    let (model, _) = CausalLm::load(dir, DType::F32, dev)?;
    let tok = tokenizer::load(&dir.join("tokenizer.json"))?;
    anyhow::ensure!(!prompt.is_empty(), "empty prompt");
    let s = sample(&model, &tok, prompt, seed, 100)?;
    println!("{prompt}{s}");
    let _ = Tensor::zeros(1, DType::F32, dev)?;
    Ok(())
}
