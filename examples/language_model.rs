//! The main job: train a small MoE language model on the Shakespeare the repo ships.
//!
//! `cargo run --release --example language_model` trains for the default budget, prints the
//! validation perplexity against a unigram baseline, per-layer expert load and three samples,
//! and writes the model directory plus `training.png` and (MoE) `routing.png`, the load per
//! expert per layer over training, into `--out`.
//! `--dense` trains the dense baseline with the same active parameters;
//! `--generate "prompt"` samples from a saved model.
//! `mpirun -np 2 target/release/examples/language_model --expert-parallel` (built with
//! `--features mpi`) trains with each sparse layer's experts split over the ranks, each rank
//! on its share of every batch; rank 0 alone prints and writes, the directory is the
//! single-process one (docs/expert_parallel.md).

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_moe::data::shakespeare;
use candle_moe::dist::Communicator;
use candle_moe::tasks::language_model as lm;
use candle_moe::tokenizer;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{CausalLm, ModelConfig, SamplingConfig};
use clap::Parser;
use common::{main_wrapper, plot_panels, print_table, Checkpoints, Series};
use rand::Rng;

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Train a small MoE language model on Shakespeare")]
#[command(mut_arg("aux_loss_coef", |a| a.default_value("0.05")))]
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
    /// With --generate: sample on the trainable (autograd) path instead of the frozen one, to
    /// compare their speed.
    #[arg(long)]
    generate_unfrozen: bool,
    /// Batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Model width, blocks, experts, experts per token, expert width.
    #[command(flatten)]
    shape: common::MoeShape,
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
    /// Load balancing, scoring, aux and z-loss coefficients, router init scale.
    #[command(flatten)]
    router: common::RouterArgs,
    /// Split each sparse layer's experts over the ranks of an MPI job (run under `mpirun`;
    /// needs `--features mpi`); each rank trains on its share of every batch.
    #[arg(long)]
    expert_parallel: bool,
}

fn model_config(a: &Args, vocab: usize) -> ModelConfig {
    let mut c = a.shape.config(vocab, a.run.dense);
    c.max_position_embeddings = a.seq_len.max(256);
    c
}

fn main() {
    main_wrapper(run)
}

/// The tokenizer and the tokenized training and validation works.
struct Corpus {
    tok: tokenizers::Tokenizer,
    train_ids: Vec<u32>,
    valid_ids: Vec<u32>,
}

/// Every paragraph of `texts` (with its blank line), tokenized and concatenated.
fn encode_all(tok: &tokenizers::Tokenizer, texts: &[&str]) -> Result<Vec<u32>> {
    let mut ids = vec![];
    for t in texts {
        for para in t.split("\n\n") {
            ids.extend(tokenizer::encode(tok, &format!("{para}\n\n"))?);
        }
    }
    Ok(ids)
}

fn load_corpus(a: &Args, root: bool) -> Result<Corpus> {
    let t0 = Instant::now();
    let works = shakespeare::load(&a.run.corpus("shakespeare.txt.gz"))?;
    let (train_w, valid_w) = shakespeare::split(works);
    anyhow::ensure!(
        !train_w.is_empty() && !valid_w.is_empty(),
        "need training and validation works"
    );
    let train_text: Vec<&str> = train_w.iter().map(|w| w.text.as_str()).collect();
    let tok = a.run.tokenizer(|| {
        Ok(tokenizer::train_bpe(
            train_text.iter().flat_map(|t| t.split("\n\n")),
            a.vocab,
        )?)
    })?;
    let train_ids = encode_all(&tok, &train_text)?;
    let valid_text: Vec<&str> = valid_w.iter().map(|w| w.text.as_str()).collect();
    let valid_ids = encode_all(&tok, &valid_text)?;
    if !root {
        return Ok(Corpus {
            tok,
            train_ids,
            valid_ids,
        });
    }
    println!(
        "data: {} train works ({} tokens), {} validation works {:?} ({} tokens), vocab {}, prep {:.1}s",
        train_w.len(),
        train_ids.len(),
        valid_w.len(),
        valid_w.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        valid_ids.len(),
        tok.get_vocab_size(true),
        t0.elapsed().as_secs_f64()
    );
    Ok(Corpus {
        tok,
        train_ids,
        valid_ids,
    })
}

fn print_model(a: &Args, cfg: &ModelConfig, n_params: usize) {
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
        a.run.label(),
        cfg.num_layers,
        cfg.hidden_size,
        n_params as f64 / 1e6
    );
}

/// The MPI world of `--expert-parallel`, after checking the flags it cannot be combined with.
fn world(a: &Args) -> Result<Option<Arc<dyn Communicator>>> {
    if !a.expert_parallel {
        return Ok(None);
    }
    anyhow::ensure!(
        a.generate.is_none() && !a.run.dense,
        "--expert-parallel trains an MoE: it cannot be combined with --generate (load the directory in one process) or --dense"
    );
    #[cfg(feature = "mpi")]
    {
        let comm: Arc<dyn Communicator> = Arc::new(candle_moe::dist::MpiComm::init()?);
        let w = comm.size();
        anyhow::ensure!(
            a.batch.is_multiple_of(w),
            "--expert-parallel: the batch of {} sequences does not split evenly over {w} ranks",
            a.batch
        );
        anyhow::ensure!(
            a.shape.experts.is_multiple_of(w),
            "--expert-parallel: {} experts do not split evenly over {w} ranks",
            a.shape.experts
        );
        Ok(Some(comm))
    }
    #[cfg(not(feature = "mpi"))]
    anyhow::bail!("--expert-parallel needs MPI: rebuild with `--features mpi` and run under mpirun")
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    a.router.balance().map_err(anyhow::Error::msg)?;
    let comm = world(&a)?;
    let root = comm.as_ref().is_none_or(|c| c.rank() == 0);
    if let Some(prompt) = &a.generate {
        let dir = a
            .run
            .resume
            .clone()
            .unwrap_or_else(|| a.run.out_dir("language_model"));
        return generate(&dir, prompt, &dev, a.run.seed, !a.generate_unfrozen);
    }
    let out = if root {
        a.run.create_out_dir("language_model")?
    } else {
        a.run.out_dir("language_model")
    };
    let data = load_corpus(&a, root)?;
    let vocab = data.tok.get_vocab_size(true);
    let (model, vm, cfg) = a
        .run
        .model::<CausalLm>(&dev, &a.router, || Ok(model_config(&a, vocab)))?;
    let n_params: usize = candle_moe::io::safetensors::varmap_tensors(&vm)?
        .values()
        .map(|t| t.elem_count())
        .sum();
    // Expert-parallel: this rank's share of the single-process model (fresh or resumed).
    let (model, vm) = match &comm {
        None => (model, vm),
        Some(c) => {
            let vm_ep = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&vm_ep, DType::F32, &dev);
            let mut ep = CausalLm::new_expert_parallel(&cfg, vb, c.clone())?;
            candle_moe::train::init::copy_vars(&vm_ep, &vm)?;
            ep.set_origin(candle_moe::models::Origin {
                varmap: None,
                ..model.origin().clone()
            });
            (ep, vm_ep)
        }
    };
    let tcfg = TrainConfig {
        checkpoint_every: 500,
        progress: root,
        ..a.run.train_config(a.steps, a.lr, a.eval_every, &a.router)?
    };
    let mut trainer = a.run.trainer(&vm, tcfg, &cfg, &model.selection_biases())?;
    if let Some(c) = &comm {
        trainer.set_comm(c.clone(), &model.sharded_parameters())?;
        if root {
            println!(
                "expert parallel: {} ranks, {} experts and {} sequences of each batch per rank",
                c.size(),
                cfg.moe.num_experts / c.size(),
                a.batch / c.size()
            );
        }
    }
    if let (Some(r), true) = (&a.run.resume, root) {
        println!(
            "resumed from {} at step {}",
            r.display(),
            trainer.state.step
        );
    }
    if root {
        print_model(&a, &cfg, n_params);
    }
    let ckpt = Checkpoints::new(&out, &model, &cfg, &vm, &data.tok)?;
    let (train_secs, trained_tokens) = train(&a, &model, &data, &mut trainer, &ckpt, &dev)?;
    ckpt.save(&trainer)?;

    // Expert-parallel: rank 0 evaluates and samples the gathered single-process model.
    let full = match &comm {
        None => None,
        Some(_) => match model.gathered()? {
            Some(full) => Some(full),
            None => return Ok(()),
        },
    };
    let model = full.as_ref().unwrap_or(&model);
    let ev = lm::evaluate(
        &model.frozen_copy()?,
        &data.valid_ids,
        a.seq_len,
        a.batch,
        a.eval_windows,
        &dev,
    )?;
    let uni = lm::unigram_nll(&data.train_ids, &data.valid_ids, vocab);
    print_evaluation(&ev, uni);
    print_samples(model, &data.tok, a.run.seed)?;
    let plot_path = out.join("training.png");
    plot(&trainer, a.run.dense, &plot_path);
    let routing_path = out.join("routing.png");
    let routed = common::plot_routing(
        &routing_path,
        "candle-moe: Shakespeare language model, expert load per layer",
        &trainer.state.history,
    );
    println!();
    print_table(
        &["metric", a.run.label()],
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
        "\nwrote {} (model directory) and {}{}",
        out.display(),
        plot_path.display(),
        if routed {
            format!(", {}", routing_path.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Runs the trainer (checkpoints into `ckpt`); returns the wall time and the tokens trained on.
fn train(
    a: &Args,
    model: &CausalLm,
    data: &Corpus,
    trainer: &mut Trainer,
    ckpt: &Checkpoints<CausalLm>,
    dev: &Device,
) -> Result<(f64, usize)> {
    let t_train = Instant::now();
    let start_step = trainer.state.step;
    // Expert-parallel: this rank's rows of every global batch.
    let (rank, world) = model.comm().map_or((0, 1), |c| (c.rank(), c.size()));
    let per = a.batch / world;
    trainer.run(
        |rng| {
            // Dropout and router noise from the step's generator: exact on resume.
            model.reseed(rng.random());
            let (x, y) = lm::batch(&data.train_ids, a.batch, a.seq_len, rng, dev)?;
            let (x, y) = if world == 1 {
                (x, y)
            } else {
                let t = a.seq_len;
                (
                    x.narrow(0, rank * per, per)?,
                    y.narrow(0, rank * per * t, per * t)?,
                )
            };
            Ok(lm::loss_parts(model, &x, &y, true)?)
        },
        || {
            let windows = a.eval_windows / 4;
            let frozen = match model.comm() {
                None => model.frozen_copy()?,
                // A collective; rank 0 evaluates the gathered model (the others' value is
                // not used: they neither print nor write).
                Some(_) => match model.gathered()? {
                    Some(full) => full,
                    None => return Ok(f64::NAN),
                },
            };
            Ok(lm::evaluate(&frozen, &data.valid_ids, a.seq_len, a.batch, windows, dev)?.nll)
        },
        |tr| ckpt.save(tr),
    )?;
    let train_secs = t_train.elapsed().as_secs_f64();
    let trained_tokens = (trainer.state.step - start_step) * a.batch * a.seq_len;
    Ok((train_secs, trained_tokens))
}

/// Validation perplexity against the unigram baseline, and the expert load per layer.
fn print_evaluation(ev: &lm::Eval, unigram_nll: f64) {
    println!(
        "\nvalidation perplexity: {:.2} (unigram baseline {:.2}) over {} tokens",
        ev.nll.exp(),
        unigram_nll.exp(),
        ev.tokens
    );
    if ev.expert_share.is_empty() {
        return;
    }
    println!("expert load on validation (share of routed assignments):");
    for (l, s) in ev.expert_share.iter().enumerate() {
        let cells: Vec<String> = s.iter().map(|x| format!("{:.3}", x)).collect();
        let max = s.iter().cloned().fold(0.0, f64::max);
        let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
        // An expert that gets under 1% of its fair share counts as unused.
        let unused = s.iter().filter(|&&x| x < 0.01 * mean).count();
        let starved = s.iter().filter(|&&x| x < 0.25 * mean).count();
        println!(
            "  layer {l}: [{}]  max/mean {:.2}, unused experts {unused}, under 25% of a fair share {starved}",
            cells.join(", "),
            max / mean.max(1e-12)
        );
    }
}

/// Plot: losses and (MoE) expert balance over training; a failure is only a warning.
fn plot(trainer: &Trainer, dense: bool, plot_path: &std::path::Path) {
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
    if !dense {
        panels.push((
            "expert load balance (mean over layers of max/mean expert load per batch)",
            "max/mean",
            vec![Series {
                name: "imbalance".into(),
                points: smooth(&|s| s.imbalance.min(50.0)),
            }],
        ));
    }
    if let Err(e) = plot_panels(plot_path, "candle-moe: Shakespeare language model", &panels) {
        eprintln!("warning: could not draw {}: {e}", plot_path.display());
    }
}

/// Three samples of 60 tokens, seeds `seed`, `seed + 1`, `seed + 2`.
fn print_samples(model: &CausalLm, tok: &tokenizers::Tokenizer, seed: u64) -> Result<()> {
    println!("\nsamples (top-p 0.9, temperature 0.8):");
    for (i, prompt) in ["ROMEO:", "To be, or not", "KING HENRY."]
        .iter()
        .enumerate()
    {
        let s = sample(model, tok, prompt, seed + i as u64, 60)?;
        println!("--- {prompt}{s}");
    }
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
    dev: &Device,
    seed: u64,
    freeze: bool,
) -> Result<()> {
    let (mut model, _) = CausalLm::load(dir, DType::F32, dev)?;
    if freeze {
        // Inference: plain tensors, so the fused expert, norm and softmax paths apply.
        model.freeze()?;
    }
    let tok = tokenizer::load(&dir.join("tokenizer.json"))?;
    anyhow::ensure!(!prompt.is_empty(), "empty prompt");
    let t0 = std::time::Instant::now();
    let s = sample(&model, &tok, prompt, seed, 100)?;
    let secs = t0.elapsed().as_secs_f64();
    let n = tokenizer::encode(&tok, &s)?.len();
    println!("{prompt}{s}");
    eprintln!(
        "generated ~{n} tokens in {secs:.2} s ({:.0} tokens/s)",
        n as f64 / secs
    );
    Ok(())
}
