//! Sentiment classification with a MoE encoder on the Hutto & Gilbert (ICWSM 2014) sentences the
//! repo ships; accuracy and F1 on the held-out test split.
//!
//! `cargo run --release --example sentiment [-- --dense]`;
//! `--model DIR --eval-file PATH` scores a TSV of `text<TAB>label` with a saved model.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_moe::data::{self, sentiment};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::tasks::sentiment as classify;
use candle_moe::tokenizer;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{ModelConfig, SequenceClassifier};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{main_wrapper, print_table};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Binary sentiment classification with a MoE encoder")]
struct Args {
    /// Device, seed, output and data options shared by the examples.
    #[command(flatten)]
    run: common::RunArgs,
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Score `--eval-file` with the model directory `--model` and exit.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A TSV of `text<TAB>label` (label 0/1).
    #[arg(long)]
    eval_file: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    #[arg(long, default_value_t = 128)]
    expert_ffn: usize,
    /// BPE vocabulary size (16,000 on 18,656 training sentences is close to whole words).
    #[arg(long, default_value_t = 16000)]
    vocab: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Dropout on embeddings and block outputs while training (models trained from scratch).
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Keep the weights of the evaluation with the best validation accuracy (model selection
    /// on the validation split; the test split is scored once, at the end).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    keep_best: bool,
    /// Start from a dense BERT-family checkpoint (local folder or hub id), e.g. all-MiniLM-L6-v2.
    #[arg(long)]
    init: Option<String>,
    /// With --init: sparse-upcycle every feed-forward into this many experts (0 = dense fine-tune).
    #[arg(long, default_value_t = 0)]
    upcycle_experts: usize,
}

fn main() {
    main_wrapper(run)
}

fn encode_all(tok: &tokenizers::Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .map(|t| Ok(tokenizer::encode(tok, t)?))
        .collect()
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    if let Some(model_dir) = &a.model {
        let file = a
            .eval_file
            .as_ref()
            .context("--model needs --eval-file PATH")?;
        let (model, _) = SequenceClassifier::load(model_dir, DType::F32, &dev)?;
        let tok = tokenizer::load(&model_dir.join("tokenizer.json"))?;
        anyhow::ensure!(
            tok.get_vocab_size(true) <= model.config().vocab_size,
            "tokenizer.json has {} tokens but the model's vocab_size is {}",
            tok.get_vocab_size(true),
            model.config().vocab_size
        );
        let rows = sentiment::load_eval_tsv(file)?;
        let texts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let gold: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let pad = match tok.token_to_id("[PAD]") {
            Some(p) => p,
            None => tokenizer::special_id(&tok, "<pad>")?,
        };
        let pred = classify::predict(&model, &encode_all(&tok, &texts)?, 64, a.max_len, pad, &dev)?;
        let (acc, f1) = classify::accuracy_f1(&pred, &gold);
        println!("examples: {}", rows.len());
        println!("f1: {f1:.4}");
        println!("accuracy: {acc:.4}");
        return Ok(());
    }
    let out = a.run.out.clone().unwrap_or_else(|| {
        PathBuf::from(if a.run.dense {
            "runs/sentiment_dense"
        } else {
            "runs/sentiment"
        })
    });
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let path = a
        .run
        .data
        .clone()
        .unwrap_or_else(|| data::data_dir().join("sentiment.tsv.gz"));
    let all = sentiment::load(&path)?;
    let by = |s: &str| all.iter().filter(|e| e.split == s).collect::<Vec<_>>();
    let (train, valid, test) = (by("train"), by("valid"), by("test"));
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "need train and test examples"
    );
    let mut bert_tok = None;
    let mut init_model = None;
    if let Some(src) = &a.init {
        let dense = candle_moe::io::bert::load_bert(
            src,
            2,
            &candle_moe::LoadOptions {
                device: dev.clone(),
                ..Default::default()
            },
        )?;
        let tok = dense
            .tokenizer
            .clone()
            .context("the --init checkpoint has no tokenizer.json")?;
        bert_tok = Some(tok);
        init_model = Some(if a.upcycle_experts > 0 {
            let (m, vm, cfg) =
                candle_moe::upcycle::upcycle(&dense, a.upcycle_experts, a.top_k, 0.01, a.run.seed)?;
            println!(
                "upcycled {src}: {} experts (top-{}) per layer, copies of the dense FFN",
                a.upcycle_experts, a.top_k
            );
            (m, vm, cfg)
        } else {
            println!("fine-tuning the dense {src}");
            (dense.model, dense.varmap, dense.config)
        });
    }
    let specials = bert_tok.is_some();
    let tok = match (&bert_tok, &a.run.tokenizer, &a.run.resume) {
        (Some(t), _, _) => t.clone(),
        (None, Some(p), _) => tokenizer::load(p)?,
        (None, None, Some(r)) => tokenizer::load(&r.join("tokenizer.json"))?,
        (None, None, None) => tokenizer::train_bpe(train.iter().map(|e| e.text.as_str()), a.vocab)?,
    };
    let pad = if specials {
        tok.token_to_id("[PAD]").unwrap_or(0)
    } else {
        tokenizer::special_id(&tok, "<pad>")?
    };
    let encode = |t: &str| -> Result<Vec<u32>> {
        if specials {
            Ok(tok
                .encode(t, true)
                .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
                .get_ids()
                .to_vec())
        } else {
            Ok(tokenizer::encode(&tok, t)?)
        }
    };
    let ids = |xs: &[&sentiment::Example]| -> Result<Vec<(Vec<u32>, u32)>> {
        xs.iter().map(|e| Ok((encode(&e.text)?, e.label))).collect()
    };
    let (train_ids, valid_ids, test_ids) = (ids(&train)?, ids(&valid)?, ids(&test)?);
    println!(
        "data: {} train, {} validation, {} test sentences; vocab {}",
        train_ids.len(),
        valid_ids.len(),
        test_ids.len(),
        tok.get_vocab_size(true)
    );
    let (model, vm, cfg) = match (init_model, &a.run.resume) {
        (Some(m), _) => m,
        (None, Some(r)) => {
            let cfg = ModelConfig::from_file(r.join("config.json"))?;
            let (m, vm) = SequenceClassifier::load(r, DType::F32, &dev)?;
            (m, vm, cfg)
        }
        (None, None) => {
            let mut c = ModelConfig::tiny(tok.get_vocab_size(true));
            c.hidden_size = a.hidden;
            c.num_layers = a.layers;
            c.num_heads = 4;
            c.num_kv_heads = 4;
            c.max_position_embeddings = a.max_len.max(64);
            c.moe.hidden_size = a.hidden;
            c.moe.num_experts = a.experts;
            c.moe.top_k = a.top_k;
            c.moe.intermediate_size = a.expert_ffn;
            c.dense_intermediate_size = a.expert_ffn * a.top_k;
            c.sparse_step = if a.run.dense { 0 } else { 1 };
            c.num_labels = 2;
            c.pad_token_id = Some(pad);
            c.hidden_dropout = a.dropout;
            let vm = VarMap::new();
            let m = SequenceClassifier::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
            candle_moe::train::init::reseed_varmap(&vm, a.run.seed)?;
            (m, vm, c)
        }
    };
    let mut trainer = Trainer::new(
        &vm,
        TrainConfig {
            steps: a.steps,
            lr: a.lr,
            warmup_steps: (a.steps / 20).max(1),
            weight_decay: 0.05,
            eval_every: 100,
            aux_loss_coef: cfg.moe.router_aux_loss_coef,
            z_loss_coef: cfg.moe.router_z_loss_coef,
            seed: a.run.seed,
            ..Default::default()
        },
    )?;
    if let Some(r) = &a.run.resume {
        trainer.load_state(r)?;
    }
    let valid_x: Vec<Vec<u32>> = valid_ids.iter().map(|v| v.0.clone()).collect();
    let valid_y: Vec<u32> = valid_ids.iter().map(|v| v.1).collect();
    let t0 = Instant::now();
    let mut best = (0.0f64, 0usize);
    let tok_json = tokenizer::to_json(&tok)?;
    // Model selection on validation: a copy of the weights at the best validation accuracy.
    let mut best_weights: Option<(f64, Vec<(String, Tensor)>)> = None;
    trainer.run(
        |rng| {
            let (x, m, y) = classify::batch(&train_ids, a.batch, a.max_len, pad, rng, &dev)?;
            Ok(classify::loss_parts(&model, &x, &m, &y, true)?)
        },
        || {
            let pred = classify::predict(&model, &valid_x, 64, a.max_len, pad, &dev)?;
            let acc = classify::accuracy_f1(&pred, &valid_y).0;
            if a.keep_best && best_weights.as_ref().is_none_or(|b| acc > b.0) {
                let data = vm
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
                let copy = data
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                best_weights = Some((acc, copy));
            }
            Ok(acc)
        },
        |tr| {
            checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
            tr.save_state(&out)
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    for (s, v) in &trainer.state.evals {
        if *v > best.0 {
            best = (*v, *s);
        }
    }
    let final_acc = trainer.state.evals.last().map(|e| e.1);
    if let (Some((acc, weights)), Some(last)) = (best_weights, final_acc) {
        if acc > last {
            let data = vm
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("varmap lock"))?;
            for (n, w) in &weights {
                if let Some(v) = data.get(n) {
                    v.set(w)?;
                }
            }
            println!(
                "kept the weights of step {} (validation accuracy {acc:.4}; final step {last:.4})",
                best.1
            );
        }
    }
    checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
    trainer.save_state(&out)?;
    let test_x: Vec<Vec<u32>> = test_ids.iter().map(|v| v.0.clone()).collect();
    let test_y: Vec<u32> = test_ids.iter().map(|v| v.1).collect();
    let pred = classify::predict(&model, &test_x, 64, a.max_len, pad, &dev)?;
    let (acc, f1) = classify::accuracy_f1(&pred, &test_y);
    let majority = test_y.iter().filter(|&&y| y == 1).count() as f64 / test_y.len() as f64;
    println!("\ntest accuracy {acc:.4}, F1 {f1:.4} (majority class {:.4}); best validation accuracy {:.4} at step {}", majority.max(1.0 - majority), best.0, best.1);
    println!();
    print_table(
        &["metric", if a.run.dense { "dense" } else { "MoE" }],
        &[
            vec!["test accuracy".into(), format!("{acc:.4}")],
            vec!["test F1".into(), format!("{f1:.4}")],
            vec!["steps".into(), trainer.state.step.to_string()],
            vec!["train wall time".into(), format!("{secs:.0}s")],
            vec![
                "train sentences/s".into(),
                format!("{:.0}", (a.batch * a.steps) as f64 / secs),
            ],
        ],
    );
    println!("\nwrote {}", out.display());
    Ok(())
}
