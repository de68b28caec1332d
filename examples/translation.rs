//! English → Spanish translation with an encoder-decoder MoE on the verse-aligned KJV /
//! Reina-Valera 1909 Bible the repo ships; corpus BLEU (sacreBLEU 13a) on held-out books.
//!
//! `cargo run --release --example translation [-- --dense] [-- --beam 4]`

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_moe::data::{self, bible};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::tasks::translation::{self as s2s, Specials};
use candle_moe::tokenizer;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{ModelConfig, Seq2Seq};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{main_wrapper, print_table};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "English -> Spanish MoE translation on the Bible")]
struct Args {
    /// Device, seed, output and data options shared by the examples.
    #[command(flatten)]
    run: common::RunArgs,
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Beam width for the test set (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 48)]
    max_len: usize,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 3)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    #[arg(long, default_value_t = 128)]
    expert_ffn: usize,
    #[arg(long, default_value_t = 4000)]
    vocab: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Limit the number of test verses (0 = all).
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
}

fn main() {
    main_wrapper(run)
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    let out = a.run.out.clone().unwrap_or_else(|| {
        PathBuf::from(if a.run.dense {
            "runs/translation_dense"
        } else {
            "runs/translation"
        })
    });
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let path = a
        .run
        .data
        .clone()
        .unwrap_or_else(|| data::data_dir().join("bible_en_es.tsv.gz"));
    let (train, valid, test) = bible::split(bible::load(&path)?);
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "need training and test verses"
    );
    let tok = match (&a.run.tokenizer, &a.run.resume) {
        (Some(p), _) => tokenizer::load(p)?,
        (None, Some(r)) => tokenizer::load(&r.join("tokenizer.json"))?,
        (None, None) => tokenizer::train_bpe(
            train.iter().flat_map(|p| [p.en.as_str(), p.es.as_str()]),
            a.vocab,
        )?,
    };
    let sp = Specials {
        pad: tokenizer::special_id(&tok, "<pad>")?,
        bos: tokenizer::special_id(&tok, "<bos>")?,
        eos: tokenizer::special_id(&tok, "<eos>")?,
    };
    let enc = |p: &bible::Pair| -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            tokenizer::encode(&tok, &p.en)?,
            tokenizer::encode(&tok, &p.es)?,
        ))
    };
    let train_ids: Vec<(Vec<u32>, Vec<u32>)> = train
        .iter()
        .map(enc)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|(s, t)| s.len() <= a.max_len && t.len() < a.max_len)
        .collect();
    let valid_ids: Vec<(Vec<u32>, Vec<u32>)> =
        valid.iter().take(256).map(enc).collect::<Result<_>>()?;
    println!(
        "data: {} train pairs ({} kept ≤ {} tokens), {} validation, {} test verses; vocab {}",
        train.len(),
        train_ids.len(),
        a.max_len,
        valid.len(),
        test.len(),
        tok.get_vocab_size(true)
    );
    let cfg = match &a.run.resume {
        Some(r) => ModelConfig::from_file(r.join("config.json"))?,
        None => {
            let mut c = ModelConfig::tiny(tok.get_vocab_size(true));
            c.hidden_size = a.hidden;
            c.num_layers = a.layers;
            c.num_decoder_layers = a.layers;
            c.num_heads = 4;
            c.num_kv_heads = 4;
            c.max_position_embeddings = a.max_len + 8;
            c.moe.hidden_size = a.hidden;
            c.moe.num_experts = a.experts;
            c.moe.top_k = a.top_k;
            c.moe.intermediate_size = a.expert_ffn;
            c.dense_intermediate_size = a.expert_ffn * a.top_k;
            c.sparse_step = if a.run.dense { 0 } else { 1 };
            c.pad_token_id = Some(sp.pad);
            c
        }
    };
    let (model, vm) = match &a.run.resume {
        Some(r) => Seq2Seq::load(r, DType::F32, &dev)?,
        None => {
            let vm = VarMap::new();
            let m = Seq2Seq::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
            candle_moe::train::init::reseed_varmap(&vm, a.run.seed)?;
            (m, vm)
        }
    };
    let mut trainer = Trainer::new(
        &vm,
        TrainConfig {
            steps: a.steps,
            lr: a.lr,
            warmup_steps: (a.steps / 20).max(1),
            eval_every: 250,
            checkpoint_every: 500,
            aux_loss_coef: cfg.moe.router_aux_loss_coef,
            z_loss_coef: cfg.moe.router_z_loss_coef,
            seed: a.run.seed,
            ..Default::default()
        },
    )?;
    if let Some(r) = &a.run.resume {
        trainer.load_state(r)?;
    }
    let tok_json = tokenizer::to_json(&tok)?;
    let t0 = Instant::now();
    let start = trainer.state.step;
    let mut tgt_tokens = 0usize;
    trainer.run(
        |rng| {
            let b = s2s::batch(&train_ids, a.batch, a.max_len, sp, rng, &dev)?;
            tgt_tokens += b[3].sum_all()?.to_scalar::<u32>()? as usize;
            Ok(s2s::loss_parts(&model, &b, sp.pad, true)?)
        },
        || {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
            let b = s2s::batch(&valid_ids, 128, a.max_len, sp, &mut rng, &dev)?;
            Ok(s2s::loss_parts(&model, &b, sp.pad, false)?
                .task
                .to_scalar::<f32>()? as f64)
        },
        |tr| {
            checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
            tr.save_state(&out)
        },
    )?;
    let train_secs = t0.elapsed().as_secs_f64();
    checkpoint::save(&out, &cfg, &vm, Some(&tok_json))?;
    trainer.save_state(&out)?;

    let t1 = Instant::now();
    let test: Vec<&bible::Pair> = if a.test_limit > 0 {
        test.iter().take(a.test_limit).collect()
    } else {
        test.iter().collect()
    };
    let mut hyps = vec![];
    if a.beam > 1 {
        for p in &test {
            let src: Vec<u32> = tokenizer::encode(&tok, &p.en)?
                .into_iter()
                .take(a.max_len)
                .collect();
            let x = Tensor::from_vec(src.clone(), (1, src.len()), &dev)?;
            let ids = model.beam_search(&x, a.beam, sp.bos, sp.eos, a.max_len, 1.0)?;
            hyps.push(tokenizer::decode(&tok, &ids)?);
        }
    } else {
        for chunk in test.chunks(32) {
            let rows: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| {
                    Ok(tokenizer::encode(&tok, &p.en)?
                        .into_iter()
                        .take(a.max_len)
                        .collect())
                })
                .collect::<Result<_>>()?;
            let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
            let (x, m) = candle_moe::tasks::pad_batch(&rows, len, sp.pad, &dev)?;
            for ids in model.generate_greedy(&x, Some(&m), sp.bos, sp.eos, a.max_len)? {
                hyps.push(tokenizer::decode(&tok, &ids)?);
            }
        }
    }
    let refs: Vec<String> = test.iter().map(|p| p.es.clone()).collect();
    let bleu = s2s::corpus_bleu(&hyps, &refs);
    let books: Vec<&str> = bible::TEST_BOOKS.to_vec();
    println!(
        "\ntest books {:?}: {} verses, corpus BLEU {:.2} ({}), decoding {:.0}s",
        books,
        test.len(),
        bleu,
        if a.beam > 1 {
            format!("beam {}", a.beam)
        } else {
            "greedy".into()
        },
        t1.elapsed().as_secs_f64()
    );
    for (p, h) in test
        .iter()
        .zip(&hyps)
        .step_by((test.len() / 4).max(1))
        .take(4)
    {
        println!(
            "\n  {} {}:{}\n  en:  {}\n  ref: {}\n  hyp: {}",
            p.book, p.chapter, p.verse, p.en, p.es, h
        );
    }
    println!();
    print_table(
        &["metric", if a.run.dense { "dense" } else { "MoE" }],
        &[
            vec!["test BLEU".into(), format!("{bleu:.2}")],
            vec![
                "final validation loss".into(),
                format!(
                    "{:.3}",
                    trainer.state.evals.last().map(|e| e.1).unwrap_or(f64::NAN)
                ),
            ],
            vec!["steps".into(), trainer.state.step.to_string()],
            vec!["train wall time".into(), format!("{train_secs:.0}s")],
            vec![
                "train target tokens/s".into(),
                format!("{:.0}", tgt_tokens as f64 / train_secs),
            ],
            vec![
                "steps run now".into(),
                (trainer.state.step - start).to_string(),
            ],
        ],
    );
    Ok(())
}
