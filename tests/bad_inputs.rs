//! A table of bad inputs across the public API and the example CLIs: each gives an error that
//! names the cause (the CLIs exit non-zero with a one-line message), never a panic.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_moe::error::CheckpointErrorKind;
use candle_moe::io::model_dir as checkpoint;
use candle_moe::{CausalLm, Error, LoadOptions, ModelConfig, MoeConfig, SparseMoe};
use candle_nn::{VarBuilder, VarMap};

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::tiny(40);
    c.hidden_size = 16;
    c.moe.hidden_size = 16;
    c.moe.intermediate_size = 16;
    c.dense_intermediate_size = 16;
    c.num_layers = 1;
    c.max_position_embeddings = 16;
    c
}

fn saved() -> (tempfile::TempDir, ModelConfig) {
    let cfg = tiny();
    let vm = VarMap::new();
    CausalLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let d = tempfile::tempdir().unwrap();
    checkpoint::save(d.path(), &cfg, &vm, None).unwrap();
    (d, cfg)
}

fn load_err(d: &Path) -> candle_moe::Result<(CausalLm, VarMap)> {
    CausalLm::load(d, DType::F32, &Device::Cpu)
}

/// One row of the table: what a bad input gave, the text its message must contain and, where the
/// call returns the crate's [`Error`], the variant it must be.
struct Case {
    name: &'static str,
    msg: String,
    needle: &'static str,
    /// `Some((is_expected_variant, error))` for calls that return `candle_moe::Result`; `None` for
    /// layer and model calls, which return `candle_core::Result` (message checked only).
    kind: Option<(VariantCheck, Option<Error>)>,
}

/// Whether an error is the variant (and kind) a case expects.
type VariantCheck = fn(&Error) -> bool;

/// A case from a call returning the crate's `Error`: its message and its variant are checked.
fn crate_case<T>(
    name: &'static str,
    r: candle_moe::Result<T>,
    needle: &'static str,
    is: VariantCheck,
) -> Case {
    let e = r.err();
    Case {
        name,
        msg: e.as_ref().map(|e| e.to_string()).unwrap_or_default(),
        needle,
        kind: Some((is, e)),
    }
}

/// A case from a layer or model call (`candle_core::Result`): its message is checked.
fn candle_case<T>(name: &'static str, r: candle_core::Result<T>, needle: &'static str) -> Case {
    Case {
        name,
        msg: r
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no error".into()),
        needle,
        kind: None,
    }
}

fn with_tensors(d: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = d.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn model() -> CausalLm {
    let vm = VarMap::new();
    CausalLm::new(
        &tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn moe() -> SparseMoe {
    let cfg = MoeConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_experts: 4,
        top_k: 2,
        ..Default::default()
    };
    let vm = VarMap::new();
    SparseMoe::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap()
}

#[test]
fn bad_input_table() {
    let d = &Device::Cpu;
    let mut cases: Vec<Case> = vec![];

    // --- checkpoints ---
    let (dir, _) = saved();
    let w = dir.path().join("model.safetensors");
    let good = std::fs::read(&w).unwrap();
    std::fs::write(&w, &good[..good.len() - 100]).unwrap();
    cases.push(crate_case(
        "truncated safetensors",
        load_err(dir.path()),
        "model.safetensors",
        |e| e.checkpoint_kind() == Some(&CheckpointErrorKind::Corrupt),
    ));
    let mut bad = good.clone();
    bad[8..40].fill(b'!');
    std::fs::write(&w, &bad).unwrap();
    cases.push(crate_case(
        "corrupted safetensors header",
        load_err(dir.path()),
        "not a valid safetensors",
        |e| e.checkpoint_kind() == Some(&CheckpointErrorKind::Corrupt),
    ));
    std::fs::write(&w, &good).unwrap();
    with_tensors(dir.path(), |t| {
        let k = "model.norm.weight".to_string();
        let v = t[&k].to_dtype(DType::U8).unwrap();
        t.insert(k, v);
    });
    cases.push(crate_case(
        "wrong-dtype tensor",
        load_err(dir.path()),
        "`model.norm.weight` has dtype U8",
        |e| {
            matches!(e.checkpoint_kind(), Some(CheckpointErrorKind::Dtype { found, .. }) if found == "U8")
                && names_tensor(e, "model.norm.weight")
        },
    ));
    std::fs::write(&w, &good).unwrap();
    with_tensors(dir.path(), |t| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros(7, DType::F32, d).unwrap(),
        );
    });
    cases.push(crate_case(
        "wrong-shape tensor",
        load_err(dir.path()),
        "`model.norm.weight` has shape [7]",
        |e| {
            matches!(
                e.checkpoint_kind(),
                Some(CheckpointErrorKind::Shape { expected, found })
                    if expected == &[16] && found == &[7]
            ) && names_tensor(e, "model.norm.weight")
        },
    ));
    std::fs::write(&w, &good).unwrap();
    with_tensors(dir.path(), |t| {
        t.remove("model.embed_tokens.weight");
    });
    cases.push(crate_case(
        "missing tensor",
        load_err(dir.path()),
        "missing tensor `model.embed_tokens.weight`",
        |e| {
            e.checkpoint_kind() == Some(&CheckpointErrorKind::Missing)
                && names_tensor(e, "model.embed_tokens.weight")
        },
    ));
    std::fs::write(&w, &good).unwrap();
    with_tensors(dir.path(), |t| {
        t.insert(
            "model.extra.weight".into(),
            Tensor::zeros(3, DType::F32, d).unwrap(),
        );
    });
    cases.push(crate_case(
        "unexpected tensor",
        load_err(dir.path()),
        "model.extra.weight",
        |e| {
            e.checkpoint_kind() == Some(&CheckpointErrorKind::Unexpected)
                && names_tensor(e, "model.extra.weight")
        },
    ));
    std::fs::write(&w, &good).unwrap();

    // --- configs ---
    let cfgp = dir.path().join("config.json");
    let good_cfg = std::fs::read_to_string(&cfgp).unwrap();
    std::fs::write(&cfgp, "{\"vocab_size\": 40,").unwrap();
    cases.push(crate_case(
        "malformed config.json",
        load_err(dir.path()),
        "malformed JSON in",
        |e| matches!(e, Error::Json { path, .. } if path.ends_with("config.json")),
    ));
    std::fs::write(
        &cfgp,
        good_cfg.replace("\"num_kv_heads\": 2", "\"num_kv_heads\": 3"),
    )
    .unwrap();
    cases.push(crate_case(
        "contradictory config (heads)",
        load_err(dir.path()),
        "num_kv_heads",
        |e| matches!(e, Error::Config(_)),
    ));
    std::fs::write(&cfgp, good_cfg.replace("\"top_k\": 2", "\"top_k\": 9")).unwrap();
    cases.push(crate_case(
        "config top_k > experts",
        load_err(dir.path()),
        "top_k (9) must be <= num_experts (4)",
        |e| matches!(e, Error::Config(_)),
    ));
    std::fs::write(&cfgp, &good_cfg).unwrap();
    let r = MoeConfig {
        top_k: 9,
        num_experts: 8,
        ..Default::default()
    }
    .validate();
    cases.push(crate_case("MoeConfig top_k > experts", r, "top_k", |e| {
        matches!(e, Error::Config(_))
    }));
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    std::fs::write(hf.join("model.safetensors"), &good).unwrap();
    cases.push(crate_case(
        "unknown HF model_type",
        CausalLm::from_pretrained(hf.to_str().unwrap(), &LoadOptions::default()),
        "unknown model_type `gpt2`",
        |e| matches!(e, Error::Config(_)),
    ));

    // --- tokenizer ---
    let tp = dir.path().join("tokenizer.json");
    std::fs::write(&tp, "{ not json").unwrap();
    cases.push(crate_case(
        "malformed tokenizer.json",
        candle_moe::tokenizer::load(&tp),
        "tokenizer.json",
        |e| matches!(e, Error::Tokenizer { path, .. } if path.ends_with("tokenizer.json")),
    ));

    // --- model inputs ---
    let m = model();
    let err = |x: Tensor| m.forward(&x);
    cases.push(candle_case(
        "token id >= vocab",
        err(Tensor::new(&[[1u32, 40]], d).unwrap()),
        "token id 40 is out of range for vocab_size 40",
    ));
    cases.push(candle_case(
        "empty batch",
        err(Tensor::zeros((0, 4), DType::U32, d).unwrap()),
        "empty batch",
    ));
    cases.push(candle_case(
        "empty sequence",
        err(Tensor::zeros((2, 0), DType::U32, d).unwrap()),
        "empty batch",
    ));
    cases.push(candle_case(
        "sequence too long",
        err(Tensor::zeros((1, 17), DType::U32, d).unwrap()),
        "exceeds the model's max_position_embeddings 16",
    ));
    cases.push(candle_case(
        "float token ids",
        err(Tensor::zeros((1, 3), DType::F32, d).unwrap()),
        "integer token ids",
    ));
    cases.push(candle_case(
        "rank-3 token ids",
        err(Tensor::zeros((1, 3, 1), DType::U32, d).unwrap()),
        "(batch, seq)",
    ));

    // --- layer inputs ---
    let l = moe();
    let lerr = |x: Tensor| l.forward(&x);
    let nan = Tensor::new(&[[1f32, f32::NAN, 0., 0., 0., 0., 0., 0.]], d).unwrap();
    cases.push(candle_case(
        "NaN in layer input",
        lerr(nan),
        "non-finite values (NaN or Inf)",
    ));
    let inf = Tensor::new(&[[1f32, f32::INFINITY, 0., 0., 0., 0., 0., 0.]], d).unwrap();
    cases.push(candle_case(
        "Inf in layer input",
        lerr(inf),
        "non-finite values (NaN or Inf)",
    ));
    cases.push(candle_case(
        "wrong hidden size",
        lerr(Tensor::zeros((2, 5), DType::F32, d).unwrap()),
        "hidden size 5",
    ));
    cases.push(candle_case(
        "rank-1 layer input",
        lerr(Tensor::zeros(8, DType::F32, d).unwrap()),
        "shape [8]",
    ));

    // --- losses ---
    cases.push(candle_case(
        "target id out of range",
        candle_moe::losses::cross_entropy(
            &Tensor::zeros((2, 3), DType::F32, d).unwrap(),
            &Tensor::new(&[0u32, 5], d).unwrap(),
            None,
        ),
        "target id 5 is out of range for 3 classes",
    ));

    // --- data files ---
    let bad_tsv = dir.path().join("bad.tsv");
    std::fs::write(&bad_tsv, "some text without a label\n").unwrap();
    cases.push(crate_case(
        "data file with a malformed line",
        candle_moe::data::sentiment::load_eval_tsv(&bad_tsv),
        "bad.tsv, line 1: expected `text<TAB>label`",
        |e| matches!(e, Error::Data { path, line: 1, .. } if path.ends_with("bad.tsv")),
    ));

    // --- output directory that cannot be written ---
    let blocker = dir.path().join("a_file");
    std::fs::write(&blocker, "x").unwrap();
    let vm = VarMap::new();
    CausalLm::new(&tiny(), VarBuilder::from_varmap(&vm, DType::F32, d)).unwrap();
    cases.push(crate_case(
        "unwritable output directory",
        checkpoint::save(&blocker.join("sub"), &tiny(), &vm, None),
        "a_file/sub",
        |e| matches!(e, Error::Io { .. }),
    ));

    for c in &cases {
        let (name, msg, needle) = (c.name, &c.msg, c.needle);
        assert!(
            msg.contains(needle),
            "case `{name}`: error `{msg}` should contain `{needle}`"
        );
        if let Some((is, e)) = &c.kind {
            match e {
                Some(e) => assert!(is(e), "case `{name}`: wrong error variant: {e:?}"),
                None => panic!("case `{name}`: no error"),
            }
        }
    }
    assert!(cases.len() >= 20, "{} cases", cases.len());
}

/// Whether a checkpoint error names `tensor`.
fn names_tensor(e: &Error, tensor: &str) -> bool {
    matches!(e, Error::Checkpoint { tensor: Some(t), .. } if t == tensor)
}

/// The layer's own checks (moved from `tests/moe_layer.rs`): configs and inputs it refuses.
#[test]
fn bad_config_and_bad_input_give_clear_errors() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let bad = MoeConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_experts: 4,
        top_k: 5,
        ..Default::default()
    };
    let err = SparseMoe::new(&bad, vb.pp("a")).unwrap_err().to_string();
    assert!(
        err.contains("top_k") && err.contains("num_experts"),
        "{err}"
    );
    for (cfg, field) in [
        (
            MoeConfig {
                top_k: 0,
                ..Default::default()
            },
            "top_k",
        ),
        (
            MoeConfig {
                capacity_factor: Some(0.0),
                ..Default::default()
            },
            "capacity_factor",
        ),
        (
            MoeConfig {
                capacity_factor: Some(-1.0),
                ..Default::default()
            },
            "capacity_factor",
        ),
        (
            MoeConfig {
                hidden_size: 0,
                ..Default::default()
            },
            "hidden_size",
        ),
        (
            MoeConfig {
                intermediate_size: 0,
                ..Default::default()
            },
            "intermediate_size",
        ),
        (
            MoeConfig {
                num_experts: 0,
                ..Default::default()
            },
            "num_experts",
        ),
    ] {
        let err = cfg.validate().unwrap_err();
        assert!(
            matches!(err, Error::Config(_)),
            "{err:?} should be Error::Config"
        );
        let e = err.to_string();
        assert!(e.contains(field), "{e} should name {field}");
    }
    let cfg = MoeConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_experts: 4,
        top_k: 2,
        ..Default::default()
    };
    let moe = SparseMoe::new(&cfg, vb.pp("b")).unwrap();
    let cases: Vec<(Tensor, &str)> = vec![
        (
            Tensor::zeros((3, 7), DType::F32, &dev).unwrap(),
            "hidden size 7",
        ),
        (Tensor::zeros(8, DType::F32, &dev).unwrap(), "shape [8]"),
        (
            Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap(),
            "shape [1, 2, 3, 8]",
        ),
        (
            Tensor::zeros((0, 5, 8), DType::F32, &dev).unwrap(),
            "empty input",
        ),
        (
            Tensor::zeros((0, 8), DType::F32, &dev).unwrap(),
            "empty input",
        ),
        (Tensor::zeros((2, 8), DType::U32, &dev).unwrap(), "float"),
    ];
    for (xs, needle) in cases {
        let e = moe.forward(&xs).unwrap_err().to_string();
        assert!(e.contains(needle), "error `{e}` should mention `{needle}`");
    }
}

#[test]
fn example_clis_fail_with_one_line_and_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let bad_tsv = tmp.path().join("eval.tsv");
    std::fs::write(&bad_tsv, "good movie\t1\nbad line without label\n").unwrap();
    let bad_corpus = tmp.path().join("corpus.txt");
    std::fs::write(&bad_corpus, "text before any header\n").unwrap();
    // A classifier directory whose tokenizer.json has another vocabulary size than the model.
    let d = tempfile::tempdir().unwrap();
    let mut ccfg = tiny();
    ccfg.num_labels = 2;
    let vm = VarMap::new();
    candle_moe::SequenceClassifier::new(
        &ccfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let text = "the quick brown fox jumps over the lazy dog ".repeat(50);
    let tok = candle_moe::tokenizer::train_bpe(std::iter::once(text.as_str()), 300).unwrap();
    let tj = candle_moe::tokenizer::to_json(&tok).unwrap();
    checkpoint::save(d.path(), &ccfg, &vm, Some(&tj)).unwrap();
    let runs: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "language_model",
            vec!["--device".into(), "tpu".into()],
            "unknown device `tpu`",
        ),
        (
            "language_model",
            vec![
                "--data".into(),
                bad_corpus.display().to_string(),
                "--out".into(),
                tmp.path().join("o1").display().to_string(),
            ],
            "line 1",
        ),
        (
            "language_model",
            vec!["--out".into(), blocker.join("sub").display().to_string()],
            "cannot create output directory",
        ),
        (
            "language_model",
            vec![
                "--generate".into(),
                "hi".into(),
                "--out".into(),
                tmp.path().join("nothing").display().to_string(),
            ],
            "config.json",
        ),
        (
            "sentiment",
            vec![
                "--model".into(),
                tmp.path().join("missing").display().to_string(),
                "--eval-file".into(),
                bad_tsv.display().to_string(),
            ],
            "config.json",
        ),
        (
            "sentiment",
            vec![
                "--model".into(),
                d.path().display().to_string(),
                "--eval-file".into(),
                bad_tsv.display().to_string(),
            ],
            "but the model's vocab_size is 40",
        ),
        (
            "sentiment",
            vec![
                "--init".into(),
                d.path().display().to_string(),
                "--resume".into(),
                d.path().display().to_string(),
            ],
            "--init and --resume cannot be combined",
        ),
        (
            "language_model",
            vec!["--balance".into(), "aux-free,foo".into()],
            "--balance: unknown method `foo`",
        ),
        (
            "translation",
            vec!["--scoring".into(), "tanh".into()],
            "--scoring: unknown scoring `tanh`",
        ),
        (
            "sentiment",
            vec!["--routing".into(), "sideways".into()],
            "--routing: unknown routing `sideways`",
        ),
        (
            "translation",
            vec![
                "--data".into(),
                bad_tsv.display().to_string(),
                "--out".into(),
                tmp.path().join("o2").display().to_string(),
            ],
            "line 1",
        ),
    ];
    for (ex, args, needle) in runs {
        if !common::example_path(ex).exists() {
            panic!(
                "example binary {} not built (run cargo test, which builds examples)",
                common::example_path(ex).display()
            );
        }
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (code, stderr) = common::example_cli(ex, &args);
        assert_ne!(code, 0, "{ex} {args:?} should fail");
        assert!(
            !stderr.contains("panicked"),
            "{ex} {args:?} panicked: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{ex} {args:?}: expected one line, got {stderr}"
        );
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{ex} {args:?}: `{}` should contain `{needle}`",
            lines[0]
        );
    }
}

/// The inputs fuzzing found (`fuzz/regressions/`): each is an error now, quickly, not a hang or a
/// panic.
#[test]
fn fuzz_regressions_are_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(root.join("config_json")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let t = std::time::Instant::now();
        if let Ok(cfg) = serde_json::from_slice::<ModelConfig>(&bytes) {
            assert!(cfg.validate().is_err());
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            assert!(candle_moe::io::hf::config_from_hf(&v, Path::new("config.json")).is_err());
        }
        assert!(t.elapsed().as_secs() < 5);
        seen += 1;
    }
    for entry in std::fs::read_dir(root.join("tokenizer_json")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let p = Path::new("fuzzed/tokenizer.json");
        match candle_moe::tokenizer::from_json(&text, p) {
            Err(e) => assert!(e.to_string().contains("fuzzed/tokenizer.json"), "{e}"),
            Ok(tok) => {
                // Loads: encoding and decoding must not panic either.
                if let Ok(ids) = candle_moe::tokenizer::encode(&tok, "hello world") {
                    let _ = candle_moe::tokenizer::decode(&tok, &ids);
                }
                let _ = candle_moe::tokenizer::decode(&tok, &[0, 1, 2, 3]);
            }
        }
        seen += 1;
    }
    assert!(seen >= 9);
}
