//! English → Spanish translation with an encoder-decoder MoE on the verse-aligned KJV /
//! Reina-Valera 1909 Bible the repo ships; corpus BLEU (sacreBLEU 13a) on held-out books.
//!
//! `cargo run --release --example translation [-- --dense] [-- --beam 4]`

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_moe::data::bible;
use candle_moe::tasks::translation::{self as s2s, Specials};
use candle_moe::tokenizer;
use candle_moe::train::TrainConfig;
use candle_moe::{ModelConfig, Seq2Seq};
use clap::Parser;
use common::{main_wrapper, print_table, Checkpoints};
use rand::Rng;

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "English -> Spanish MoE translation on the Bible")]
#[command(mut_arg("layers", |a| a.default_value("3")))]
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
    /// Model width, blocks, experts, experts per token, expert width.
    #[command(flatten)]
    shape: common::MoeShape,
    #[arg(long, default_value_t = 4000)]
    vocab: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Limit the number of test verses (0 = all).
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    /// Load balancing, scoring, aux and z-loss coefficients, router init scale.
    #[command(flatten)]
    router: common::RouterArgs,
}

fn main() {
    main_wrapper(run)
}

/// Source and target token ids of a verse pair.
type PairIds = (Vec<u32>, Vec<u32>);

fn model_config(a: &Args, vocab: usize, pad: u32) -> ModelConfig {
    let mut c = a.shape.config(vocab, a.run.dense);
    c.num_decoder_layers = a.shape.layers;
    c.max_position_embeddings = a.max_len + 8;
    c.pad_token_id = Some(pad);
    c
}

fn specials(tok: &tokenizers::Tokenizer) -> Result<Specials> {
    Ok(Specials {
        pad: tokenizer::special_id(tok, "<pad>")?,
        bos: tokenizer::special_id(tok, "<bos>")?,
        eos: tokenizer::special_id(tok, "<eos>")?,
    })
}

/// The tokenizer (trained on the training pairs unless given or resumed), its special ids, and
/// the training pairs that fit `--max-len` and the first 256 validation pairs as token ids.
fn encode(
    a: &Args,
    train: &[bible::Pair],
    valid: &[bible::Pair],
    n_test: usize,
) -> Result<(tokenizers::Tokenizer, Specials, Vec<PairIds>, Vec<PairIds>)> {
    let tok = a.run.tokenizer(|| {
        Ok(tokenizer::train_bpe(
            train.iter().flat_map(|p| [p.en.as_str(), p.es.as_str()]),
            a.vocab,
        )?)
    })?;
    let sp = specials(&tok)?;
    let enc = |p: &bible::Pair| -> Result<PairIds> {
        Ok((
            tokenizer::encode(&tok, &p.en)?,
            tokenizer::encode(&tok, &p.es)?,
        ))
    };
    let train_ids: Vec<PairIds> = train
        .iter()
        .map(enc)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|(s, t)| s.len() <= a.max_len && t.len() < a.max_len)
        .collect();
    let valid_ids: Vec<PairIds> = valid.iter().take(256).map(enc).collect::<Result<_>>()?;
    println!(
        "data: {} train pairs ({} kept ≤ {} tokens), {} validation, {} test verses; vocab {}",
        train.len(),
        train_ids.len(),
        a.max_len,
        valid.len(),
        n_test,
        tok.get_vocab_size(true)
    );
    Ok((tok, sp, train_ids, valid_ids))
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    a.router.balance().map_err(anyhow::Error::msg)?;
    let out = a.run.create_out_dir("translation")?;
    let (train, valid, test) = bible::split(bible::load(&a.run.corpus("bible_en_es.tsv.gz"))?);
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "need training and test verses"
    );
    let (tok, sp, train_ids, valid_ids) = encode(&a, &train, &valid, test.len())?;
    let vocab = tok.get_vocab_size(true);
    let (model, vm, cfg) = a
        .run
        .model::<Seq2Seq>(&dev, &a.router, || Ok(model_config(&a, vocab, sp.pad)))?;
    let tcfg = TrainConfig {
        checkpoint_every: 500,
        ..a.run.train_config(a.steps, a.lr, 250, &a.router)?
    };
    let mut trainer = a.run.trainer(&vm, tcfg, &cfg, &model.selection_biases())?;
    let ckpt = Checkpoints::new(&out, &model, &cfg, &vm, &tok)?;
    let t0 = Instant::now();
    let start = trainer.state.step;
    let mut tgt_tokens = 0usize;
    trainer.run(
        |rng| {
            // Dropout and router noise from the step's generator: exact on resume.
            model.reseed(rng.random());
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
        |tr| ckpt.save(tr),
    )?;
    let train_secs = t0.elapsed().as_secs_f64();
    ckpt.save(&trainer)?;

    let routing_path = out.join("routing.png");
    if common::plot_routing(
        &routing_path,
        "candle-moe: English -> Spanish translation, expert load per layer",
        &trainer.state.history,
    ) {
        println!("wrote {}", routing_path.display());
    }
    let bleu = test_bleu(&a, &model, &tok, sp, &test, &dev)?;
    println!();
    print_table(
        &["metric", a.run.label()],
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

/// Translates the test verses (the first `--test-limit`), prints the corpus BLEU and four
/// examples, returns the BLEU.
fn test_bleu(
    a: &Args,
    model: &Seq2Seq,
    tok: &tokenizers::Tokenizer,
    sp: Specials,
    test: &[bible::Pair],
    dev: &Device,
) -> Result<f64> {
    let t1 = Instant::now();
    let test: Vec<&bible::Pair> = if a.test_limit > 0 {
        test.iter().take(a.test_limit).collect()
    } else {
        test.iter().collect()
    };
    let hyps = translate(a, model, tok, sp, &test, dev)?;
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
    Ok(bleu)
}

/// Translations of the `test` verses: beam search one verse at a time with `--beam` > 1,
/// else greedy decoding in batches of 32.
fn translate(
    a: &Args,
    model: &Seq2Seq,
    tok: &tokenizers::Tokenizer,
    sp: Specials,
    test: &[&bible::Pair],
    dev: &Device,
) -> Result<Vec<String>> {
    let source = |p: &bible::Pair| -> Result<Vec<u32>> {
        Ok(tokenizer::encode(tok, &p.en)?
            .into_iter()
            .take(a.max_len)
            .collect())
    };
    let mut hyps = vec![];
    if a.beam > 1 {
        for p in test {
            let src = source(p)?;
            let x = Tensor::from_vec(src.clone(), (1, src.len()), dev)?;
            let ids = model.beam_search(&x, a.beam, sp.bos, sp.eos, a.max_len, 1.0)?;
            hyps.push(tokenizer::decode(tok, &ids)?);
        }
    } else {
        for chunk in test.chunks(32) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|p| source(p)).collect::<Result<_>>()?;
            let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
            let (x, m) = candle_moe::tasks::pad_batch(&rows, len, sp.pad, dev)?;
            for ids in model.generate_greedy(&x, Some(&m), sp.bos, sp.eos, a.max_len)? {
                hyps.push(tokenizer::decode(tok, &ids)?);
            }
        }
    }
    Ok(hyps)
}
