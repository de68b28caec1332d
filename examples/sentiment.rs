//! Sentiment classification with a MoE encoder on the Hutto & Gilbert (ICWSM 2014) sentences the
//! repo ships; accuracy and F1 on the held-out test split.
//!
//! `cargo run --release --example sentiment [-- --dense]`;
//! `--model DIR --eval-file PATH` scores a TSV of `text<TAB>label` with a saved model.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_moe::data::sentiment;
use candle_moe::tasks::sentiment as classify;
use candle_moe::tokenizer;
use candle_moe::train::TrainConfig;
use candle_moe::{ModelConfig, SequenceClassifier};
use candle_nn::VarMap;
use clap::Parser;
use common::{main_wrapper, print_table, Checkpoints};
use rand::Rng;

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Binary sentiment classification with a MoE encoder")]
#[command(mut_arg("layers", |a| a.default_value("2")))]
#[command(mut_arg("experts", |a| a.default_value("4")))]
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
    /// Model width, blocks, experts, experts per token, expert width.
    #[command(flatten)]
    shape: common::MoeShape,
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
    /// Load balancing, scoring, aux and z-loss coefficients, router init scale.
    #[command(flatten)]
    router: common::RouterArgs,
    /// Who chooses in the sparse layers: token-choice (each token its top-k experts) or
    /// expert-choice (each expert its top-C tokens of the batch, Zhou et al. 2022).
    #[arg(long, default_value = "token-choice")]
    routing: String,
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

/// Labelled token ids.
type Labelled = Vec<(Vec<u32>, u32)>;

/// A model with its weights and config.
type Built = (SequenceClassifier, VarMap, ModelConfig);

/// `--model DIR --eval-file PATH`: scores a TSV with a saved model.
fn score_file(a: &Args, model_dir: &Path, dev: &Device) -> Result<()> {
    let file = a
        .eval_file
        .as_ref()
        .context("--model needs --eval-file PATH")?;
    let (model, _) = SequenceClassifier::load(model_dir, DType::F32, dev)?;
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
    let pred = classify::predict(&model, &encode_all(&tok, &texts)?, 64, a.max_len, pad, dev)?;
    let (acc, f1) = classify::accuracy_f1(&pred, &gold);
    println!("examples: {}", rows.len());
    println!("f1: {f1:.4}");
    println!("accuracy: {acc:.4}");
    Ok(())
}

/// `--init`: the dense BERT-family checkpoint, fine-tuned as it is or sparse-upcycled; with its
/// tokenizer.
fn init_from(a: &Args, src: &str, dev: &Device) -> Result<(tokenizers::Tokenizer, Built)> {
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
    let built = if a.upcycle_experts > 0 {
        let (m, vm, cfg) = candle_moe::upcycle::upcycle(
            &dense,
            a.upcycle_experts,
            a.shape.top_k,
            0.01,
            a.run.seed,
        )?;
        println!(
            "upcycled {src}: {} experts (top-{}) per layer, copies of the dense FFN",
            a.upcycle_experts, a.shape.top_k
        );
        (m, vm, cfg)
    } else {
        println!("fine-tuning the dense {src}");
        (dense.model, dense.varmap, dense.config)
    };
    Ok((tok, built))
}

fn model_config(a: &Args, vocab: usize, pad: u32) -> Result<ModelConfig> {
    let mut c = a.shape.config(vocab, a.run.dense);
    c.moe.routing = common::parse_routing(&a.routing).map_err(anyhow::Error::msg)?;
    c.max_position_embeddings = a.max_len.max(64);
    c.num_labels = 2;
    c.pad_token_id = Some(pad);
    c.hidden_dropout = a.dropout;
    Ok(c)
}

/// The tokenizer, its padding id and the train, validation and test splits as token ids.
struct Data {
    tok: tokenizers::Tokenizer,
    pad: u32,
    train: Labelled,
    valid: Labelled,
    test: Labelled,
}

/// Loads and tokenizes the corpus (with the `--init` checkpoint's tokenizer if given) and
/// builds the model: from `--init`, `--resume` or fresh.
fn prepare(a: &Args, dev: &Device) -> Result<(Data, Built)> {
    // A resumed run continues the saved weights with their optimizer state; starting them again
    // from --init would put that state on other weights.
    anyhow::ensure!(
        a.init.is_none() || a.run.resume.is_none(),
        "--init and --resume cannot be combined: --resume continues the checkpoint's own weights"
    );
    let all = sentiment::load(&a.run.corpus("sentiment.tsv.gz"))?;
    let by = |s: &str| all.iter().filter(|e| e.split == s).collect::<Vec<_>>();
    let (train, valid, test) = (by("train"), by("valid"), by("test"));
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "need train and test examples"
    );
    let init = match &a.init {
        Some(src) => Some(init_from(a, src, dev)?),
        None => None,
    };
    let specials = init.is_some();
    let (tok, init_model) = match init {
        Some((t, m)) => (t, Some(m)),
        None => {
            let tok = a.run.tokenizer(|| {
                Ok(tokenizer::train_bpe(
                    train.iter().map(|e| e.text.as_str()),
                    a.vocab,
                )?)
            })?;
            (tok, None)
        }
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
    let ids = |xs: &[&sentiment::Example]| -> Result<Labelled> {
        xs.iter().map(|e| Ok((encode(&e.text)?, e.label))).collect()
    };
    let (train, valid, test) = (ids(&train)?, ids(&valid)?, ids(&test)?);
    println!(
        "data: {} train, {} validation, {} test sentences; vocab {}",
        train.len(),
        valid.len(),
        test.len(),
        tok.get_vocab_size(true)
    );
    let built = match init_model {
        Some(m) => m,
        None => {
            let vocab = tok.get_vocab_size(true);
            a.run
                .model::<SequenceClassifier>(dev, &a.router, || model_config(a, vocab, pad))?
        }
    };
    let data = Data {
        tok,
        pad,
        train,
        valid,
        test,
    };
    Ok((data, built))
}

/// A copy of every variable's value.
fn snapshot(vm: &VarMap) -> candle_core::Result<Vec<(String, Tensor)>> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
    data.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Sets the variables of `vm` to `weights` (a [`snapshot`]).
fn restore(vm: &VarMap, weights: &[(String, Tensor)]) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock"))?;
    for (n, w) in weights {
        if let Some(v) = data.get(n) {
            v.set(w)?;
        }
    }
    Ok(())
}

fn split_xy(xs: &[(Vec<u32>, u32)]) -> (Vec<Vec<u32>>, Vec<u32>) {
    (
        xs.iter().map(|v| v.0.clone()).collect(),
        xs.iter().map(|v| v.1).collect(),
    )
}

fn run() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(&a.run.device)?;
    a.router.balance().map_err(anyhow::Error::msg)?;
    common::parse_routing(&a.routing).map_err(anyhow::Error::msg)?;
    if let Some(model_dir) = &a.model {
        return score_file(&a, model_dir, &dev);
    }
    let out = a.run.create_out_dir("sentiment")?;
    let (data, (model, vm, cfg)) = prepare(&a, &dev)?;
    let pad = data.pad;
    let tcfg = TrainConfig {
        weight_decay: 0.05,
        ..a.run.train_config(a.steps, a.lr, 100, &a.router)?
    };
    let mut trainer = a.run.trainer(&vm, tcfg, &cfg, &model.selection_biases())?;
    let (valid_x, valid_y) = split_xy(&data.valid);
    let t0 = Instant::now();
    let mut best = (0.0f64, 0usize);
    let ckpt = Checkpoints::new(&out, &model, &cfg, &vm, &data.tok)?;
    // Model selection on validation: a copy of the weights at the best validation accuracy.
    let mut best_weights: Option<(f64, Vec<(String, Tensor)>)> = None;
    trainer.run(
        |rng| {
            // Dropout and router noise from the step's generator: exact on resume.
            model.reseed(rng.random());
            let (x, m, y) = classify::batch(&data.train, a.batch, a.max_len, pad, rng, &dev)?;
            Ok(classify::loss_parts(&model, &x, &m, &y, true)?)
        },
        || {
            let pred = classify::predict(&model, &valid_x, 64, a.max_len, pad, &dev)?;
            let acc = classify::accuracy_f1(&pred, &valid_y).0;
            if a.keep_best && best_weights.as_ref().is_none_or(|b| acc > b.0) {
                best_weights = Some((acc, snapshot(&vm)?));
            }
            Ok(acc)
        },
        |tr| ckpt.save(tr),
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
            restore(&vm, &weights)?;
            println!(
                "kept the weights of step {} (validation accuracy {acc:.4}; final step {last:.4})",
                best.1
            );
        }
    }
    ckpt.save(&trainer)?;
    let routing_path = out.join("routing.png");
    if common::plot_routing(
        &routing_path,
        "candle-moe: sentiment classifier, expert load per layer",
        &trainer.state.history,
    ) {
        println!("wrote {}", routing_path.display());
    }
    let (test_x, test_y) = split_xy(&data.test);
    let pred = classify::predict(&model, &test_x, 64, a.max_len, pad, &dev)?;
    let (acc, f1) = classify::accuracy_f1(&pred, &test_y);
    let majority = test_y.iter().filter(|&&y| y == 1).count() as f64 / test_y.len() as f64;
    println!("\ntest accuracy {acc:.4}, F1 {f1:.4} (majority class {:.4}); best validation accuracy {:.4} at step {}", majority.max(1.0 - majority), best.0, best.1);
    println!();
    print_table(
        &["metric", a.run.label()],
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
