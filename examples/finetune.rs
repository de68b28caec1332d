//! Fine-tune a MoE language model (a Hugging Face checkpoint of a supported family, a hub id
//! in the cache, or a directory this crate saved) on plain text, fully or with LoRA adapters,
//! and write the result in the Hugging Face layout that transformers loads.
//!
//! Default data: the English (KJV) side of the shipped Bible corpus, trained on every book but
//! the held-out test books (`data::bible::TEST_BOOKS`), evaluated on those.
//!
//! ```text
//! cargo run --release --example language_model               # writes runs/language_model
//! cargo run --release --example finetune -- --model runs/language_model --out runs/finetune
//! ```

mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_moe::data::{self, bible};
use candle_moe::tasks::language_model as lm;
use candle_moe::train::{LossParts, TrainConfig, Trainer};
use candle_moe::{tokenizer, CausalLm, LoadOptions, LoraConfig};
use candle_nn::VarMap;
use clap::Parser;
use common::main_wrapper;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a MoE checkpoint on plain text and save it for transformers")]
struct Args {
    /// Model directory or hub id (mixtral, qwen2_moe, olmoe, or a directory this crate saved).
    #[arg(long)]
    model: String,
    /// Plain-text file (the last 10% of its lines are held out); default: the English side of
    /// the shipped Bible corpus, test books held out.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// LoRA rank on attention and experts (0: fine-tune every weight).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Keep the routers fixed (train everything else).
    #[arg(long)]
    freeze_router: bool,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Held-out windows evaluated before and after.
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    /// Output directory (Hugging Face layout).
    #[arg(long, default_value = "runs/finetune")]
    out: PathBuf,
    /// Seed (batches, adapters).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() {
    main_wrapper(|| run(Args::parse()));
}

/// Training and held-out token streams.
fn corpus(a: &Args, tok: &tokenizers::Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let (train, held): (Vec<String>, Vec<String>) = match &a.data {
        Some(p) => {
            let text = data::read_text(p)?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() < 10 {
                bail!("{}: need at least 10 lines of text", p.display())
            }
            let cut = lines.len() - lines.len() / 10;
            (lines[..cut].to_vec(), lines[cut..].to_vec())
        }
        None => {
            let pairs = bible::load(&data::data_dir().join("bible_en_es.tsv.gz"))?;
            let (train, valid, test) = bible::split(pairs);
            let en = |v: Vec<bible::Pair>| v.into_iter().map(|p| p.en).collect::<Vec<_>>();
            let mut t = en(train);
            t.extend(en(valid));
            (t, en(test))
        }
    };
    let encode = |lines: &[String]| tokenizer::encode(tok, &lines.join("\n"));
    Ok((encode(&train)?, encode(&held)?))
}

/// Share of each expert per sparse layer, as `layer: e0 e1 ...` lines (percent).
fn load_lines(ev: &lm::Eval) -> Vec<String> {
    ev.expert_share
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let cells: Vec<String> = s.iter().map(|x| format!("{:.0}", 100.0 * x)).collect();
            format!("  layer {i}: {}%", cells.join(" "))
        })
        .collect()
}

/// The variables to train: adapters (LoRA), or the model's variables without the routers.
fn trainable(model: &mut CausalLm, a: &Args) -> Result<VarMap> {
    if a.lora_rank > 0 {
        return Ok(model.add_lora(&LoraConfig {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            seed: a.seed,
            ..Default::default()
        })?);
    }
    let all = model
        .varmap()
        .context("the model did not load trainable")?
        .clone();
    if !a.freeze_router {
        return Ok(all);
    }
    Ok(candle_moe::train::select_vars(&all, |name| {
        !name.ends_with(".gate.weight")
    }))
}

fn run(a: Args) -> Result<()> {
    let dev = Device::Cpu;
    let opts = LoadOptions {
        trainable: a.lora_rank == 0,
        ..Default::default()
    };
    let (mut model, tok) = CausalLm::from_pretrained_with_tokenizer(&a.model, &opts)?;
    let tok = tok.context("the checkpoint has no tokenizer.json")?;
    let (train_ids, held_ids) = corpus(&a, &tok)?;
    let eval = |m: &CausalLm| -> Result<lm::Eval> {
        Ok(lm::evaluate(
            &m.frozen_copy()?,
            &held_ids,
            a.seq_len,
            a.batch,
            a.eval_windows,
            &dev,
        )?)
    };
    let before = eval(&model)?;
    let vars = trainable(&mut model, &a)?;
    let n_params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let cfg = TrainConfig {
        steps: a.steps,
        lr: a.lr,
        warmup_steps: (a.steps / 10).max(1),
        seed: a.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::for_model(&vars, cfg, &model.config().moe)?;
    let t0 = Instant::now();
    while trainer.state.step < a.steps {
        let mut rng = trainer.step_rng();
        let micro = (0..a.accumulate.max(1))
            .map(|_| {
                let (x, y) = lm::batch(&train_ids, a.batch, a.seq_len, &mut rng, &dev)?;
                lm::loss_parts(&model, &x, &y, true)
            })
            .collect::<candle_core::Result<Vec<LossParts>>>()?;
        trainer.step_accumulated(&micro)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = a.steps * a.accumulate.max(1) * a.batch * a.seq_len;
    if a.lora_rank > 0 {
        model.merge_lora()?;
    } else {
        model.freeze()?;
    }
    let after = eval(&model)?;
    model.save_pretrained(&a.out)?;
    let mode = if a.lora_rank > 0 {
        format!("LoRA rank {}", a.lora_rank)
    } else if a.freeze_router {
        "full, routers frozen".to_string()
    } else {
        "full".to_string()
    };
    println!("model: {} ({mode})", a.model);
    println!("trainable parameters: {n_params}");
    println!(
        "training: {} steps x {} micro-batches x {}x{} tokens in {secs:.1} s ({:.0} tokens/s)",
        a.steps,
        a.accumulate.max(1),
        a.batch,
        a.seq_len,
        tokens as f64 / secs
    );
    println!(
        "held-out perplexity: before {:.2}, after {:.2} ({} tokens)",
        before.nll.exp(),
        after.nll.exp(),
        after.tokens
    );
    println!("expert load on held-out text after fine-tuning:");
    for l in load_lines(&after) {
        println!("{l}");
    }
    println!("wrote {} (Hugging Face layout)", a.out.display());
    Ok(())
}
