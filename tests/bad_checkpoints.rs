//! Hostile and malformed checkpoints: shard names that escape the checkpoint directory, links
//! out of it, special files, oversized JSON, overflowing safetensors headers, and Hugging Face
//! configs whose keys contradict each other or are missing (the family's transformers default).
//! Each is refused with the error variant / kind and a message that names the problem, and
//! nothing outside the checkpoint is read or echoed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_moe::error::CheckpointErrorKind;
use candle_moe::io::hf::config_from_hf;
use candle_moe::{CausalLm, Error, LoadOptions};
use serde_json::{json, Value};

/// Bytes no error message may ever contain (they live outside the checkpoint).
const SECRET: &str = "TOP-SECRET-0xC0FFEE-OUTSIDE";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load(dir: &Path) -> Error {
    match CausalLm::from_pretrained(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("bad checkpoint {} loaded", dir.display()),
        Err(e) => e,
    }
}

fn assert_corrupt(e: &Error, needles: &[&str]) {
    assert_eq!(
        e.checkpoint_kind(),
        Some(&CheckpointErrorKind::Corrupt),
        "not a corrupt-checkpoint error: {e}"
    );
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should contain `{n}`");
    }
    assert!(!msg.contains(SECRET), "leaks outside bytes: {msg}");
}

/// A file outside the checkpoint with recognisable bytes (a valid safetensors file whose
/// metadata holds the secret, so a loader that followed it would parse it).
fn outside_file(dir: &Path) -> PathBuf {
    let p = dir.join("outside.safetensors");
    let header = format!(
        "{{\"__metadata__\":{{\"secret\":\"{SECRET}\"}},\"lm_head.weight\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}}}"
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 4]);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The sharded Qwen2-MoE fixture copied into `root/ckpt`, with the index entry of
/// `lm_head.weight` replaced by `entry`.
fn sharded_with_entry(root: &Path, entry: &str) -> PathBuf {
    let d = root.join("ckpt");
    copy_dir(&fixture("qwen2_moe"), &d);
    let p = d.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["weight_map"]["lm_head.weight"] = Value::from(entry);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    d
}

#[test]
fn index_entries_must_be_plain_file_names() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = outside_file(tmp.path());
    let abs = outside.to_str().unwrap().to_string();
    for (entry, why) in [
        ("../outside.safetensors", "path separator"),
        (abs.as_str(), "absolute path"),
        ("C:x.safetensors", "absolute path"),
        ("sub/model-00003-of-00003.safetensors", "path separator"),
        ("sub\\x.safetensors", "path separator"),
        ("..", "directory reference"),
        (".", "directory reference"),
        ("", "is empty"),
        ("model\u{0}.safetensors", "NUL"),
    ] {
        let case = tempfile::tempdir_in(tmp.path()).unwrap();
        let d = sharded_with_entry(case.path(), entry);
        // The `sub/` name exists inside the checkpoint: still refused (plain names only).
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::copy(
            d.join("model-00003-of-00003.safetensors"),
            d.join("sub/model-00003-of-00003.safetensors"),
        )
        .unwrap();
        let e = load(&d);
        assert_corrupt(&e, &["model.safetensors.index.json", why]);
        let shown = format!("{entry:?}");
        assert!(e.to_string().contains(&shown), "{e} should name {shown}");
    }
}

#[test]
fn shards_linked_out_of_the_checkpoint_are_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = outside_file(tmp.path());
    let size = std::fs::metadata(&outside).unwrap().len().to_string();
    // A shard that is a link to a file outside the directory.
    let d = sharded_with_entry(tmp.path(), "model-00003-of-00003.safetensors");
    let shard = d.join("model-00003-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(&outside, &shard).unwrap();
    let e = load(&d);
    assert_corrupt(
        &e,
        &["model-00003-of-00003.safetensors", "outside the checkpoint"],
    );
    assert!(!e.to_string().contains(&format!(" {size} ")), "{e}");
    // A single model.safetensors linked out, and a config.json linked out.
    let d = tmp.path().join("single");
    copy_dir(&fixture("mixtral"), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("model.safetensors")).unwrap();
    assert_corrupt(&load(&d), &["model.safetensors", "outside the checkpoint"]);
    let d = tmp.path().join("config");
    copy_dir(&fixture("mixtral"), &d);
    let cfg = tmp.path().join("elsewhere.json");
    std::fs::copy(d.join("config.json"), &cfg).unwrap();
    std::fs::remove_file(d.join("config.json")).unwrap();
    std::os::unix::fs::symlink(&cfg, d.join("config.json")).unwrap();
    assert_corrupt(&load(&d), &["config.json", "outside the checkpoint"]);
    // A link inside the directory is fine.
    let d = tmp.path().join("inside");
    copy_dir(&fixture("mixtral"), &d);
    std::fs::rename(d.join("model.safetensors"), d.join("weights.bin")).unwrap();
    std::os::unix::fs::symlink("weights.bin", d.join("model.safetensors")).unwrap();
    CausalLm::from_pretrained(d.to_str().unwrap(), &LoadOptions::default()).unwrap();
}

/// Runs `f` on a thread; `None` when it has not finished within 20 s (it blocked on a FIFO,
/// i.e. it opened the file).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

fn mkfifo(p: &Path) -> bool {
    std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn loading_fails_before_opening_an_outside_target() {
    // The link target is a FIFO: opening it for reading would block until a writer comes, so a
    // loader that opened it would hang here instead of returning.
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("outside.fifo");
    if !mkfifo(&fifo) {
        eprintln!("mkfifo unavailable: skipped");
        return;
    }
    let d = sharded_with_entry(tmp.path(), "model-00003-of-00003.safetensors");
    let shard = d.join("model-00003-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(&fifo, &shard).unwrap();
    let e = within(move || load(&d)).expect("the loader opened the outside FIFO");
    assert_corrupt(&e, &["outside the checkpoint"]);
    // A FIFO inside the checkpoint (as model.safetensors, as config.json) is not a regular file:
    // refused without opening it.
    let d = tmp.path().join("fifo_inside");
    copy_dir(&fixture("mixtral"), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    assert!(mkfifo(&d.join("model.safetensors")));
    let e = within({
        let d = d.clone();
        move || load(&d)
    })
    .expect("the loader opened a FIFO");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(mkfifo(&d.join("config.json")));
    let e = within(move || load(&d)).expect("the loader opened a FIFO config");
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn special_files_are_refused() {
    let dev_zero = Path::new("/dev/zero");
    if !dev_zero.exists() {
        return;
    }
    // Weights linked to /dev/zero: refused (it lies outside the directory, and is no file).
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("zero");
    copy_dir(&fixture("mixtral"), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(dev_zero, d.join("model.safetensors")).unwrap();
    let e = within(move || load(&d).to_string()).expect("read /dev/zero");
    assert!(e.contains("model.safetensors"), "{e}");
    // The readers themselves refuse a special file, whatever the directory.
    let e = within(|| candle_moe::io::safetensors::read_file(Path::new("/dev/zero")).map(|_| ()))
        .expect("read_file read /dev/zero")
        .unwrap_err();
    assert_corrupt(&e, &["/dev/zero", "not a regular file"]);
    let e = within(|| candle_moe::io::hf::read_hf_config(Path::new("/dev/zero")).map(|_| ()))
        .expect("read_hf_config read /dev/zero")
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = within(|| candle_moe::tokenizer::load(Path::new("/dev/zero")).map(|_| ()))
        .expect("tokenizer::load read /dev/zero")
        .unwrap_err();
    assert!(
        e.to_string().contains("/dev/zero") && e.to_string().contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn oversized_json_files_are_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("big");
    copy_dir(&fixture("mixtral"), &d);
    // A sparse 65 MiB config.json: over the 64 MiB cap, refused from its size.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("config.json"))
        .unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    let e = load(&d);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("limit"),
        "{msg}"
    );
    let e = candle_moe::io::hf::read_hf_config(&d.join("config.json")).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    // The same for the index and for tokenizer.json.
    let d = sharded_with_entry(tmp.path(), "model-00003-of-00003.safetensors");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("model.safetensors.index.json"))
        .unwrap();
    f.set_len(100 << 20).unwrap();
    let e = load(&d);
    assert!(
        e.to_string().contains("model.safetensors.index.json") && e.to_string().contains("limit"),
        "{e}"
    );
    let tok = tmp.path().join("tokenizer.json");
    std::fs::File::create(&tok)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let e = candle_moe::tokenizer::load(&tok).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

/// A safetensors file with one tensor declared by `entry` (a JSON object) and `data` bytes.
fn safetensors_with(entry: Value, data: usize) -> Vec<u8> {
    let header = json!({ "model.embed_tokens.weight": entry }).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data));
    bytes
}

#[test]
fn header_offsets_are_checked_without_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [0, u64::MAX]}),
                16,
            ),
            "overflows",
        ),
        (
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [u64::MAX - 7, u64::MAX - 8]}),
                16,
            ),
            "is after end",
        ),
        (
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [u64::MAX - 8, u64::MAX]}),
                16,
            ),
            "overflows",
        ),
        (
            // Holds 16 bytes but declares 96 × 32 floats.
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [0, 16]}),
                16,
            ),
            "needs 12288",
        ),
        (
            // A shape whose byte size overflows u64.
            safetensors_with(
                json!({"dtype": "F64", "shape": [u64::MAX, 3], "data_offsets": [0, 16]}),
                16,
            ),
            "overflows",
        ),
        (
            // Data past the end of the file.
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [0, 12288]}),
                100,
            ),
            "truncated",
        ),
        (
            // Header length near u64::MAX.
            {
                let mut b = u64::MAX.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            "corrupt or truncated",
        ),
        (
            safetensors_with(
                json!({"dtype": "F32", "shape": [96, 32], "data_offsets": [0]}),
                16,
            ),
            "data_offsets",
        ),
    ];
    for (i, (bytes, needle)) in cases.into_iter().enumerate() {
        let d = tmp.path().join(format!("case{i}"));
        copy_dir(&fixture("mixtral"), &d);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        let e = load(&d);
        assert_corrupt(&e, &["model.safetensors", needle]);
    }
}

#[test]
fn a_tensor_stored_in_two_shards_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = sharded_with_entry(tmp.path(), "model-00003-of-00003.safetensors");
    let dup = d.join("model-00003-of-00003.safetensors");
    // Shard 1 has the embedding; write a shard 3 that also has it.
    let mut t = candle_core::safetensors::load(&dup, &candle_core::Device::Cpu).unwrap();
    let emb = candle_core::safetensors::load(
        d.join("model-00001-of-00003.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()["model.embed_tokens.weight"]
        .clone();
    t.insert("model.embed_tokens.weight".into(), emb);
    candle_core::safetensors::save(&t, &dup).unwrap();
    assert_corrupt(&load(&d), &["model.embed_tokens.weight", "stored twice"]);
}

#[cfg(feature = "hub")]
#[test]
fn hub_names_and_revisions_are_checked_before_use() {
    // A revision that would walk out of the cache's refs/ folder.
    let e = match CausalLm::from_pretrained(
        "tiny-org/not-a-dir",
        &LoadOptions {
            revision: Some("../../../etc".into()),
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Hub(_)), "{e:?}");
    assert!(e.to_string().contains("revision"), "{e}");
    // An index in the hub cache with a name that escapes the snapshot: refused before lookup.
    let home = tempfile::tempdir().unwrap();
    let rev = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = home.path().join("hub/models--tiny-org--escape");
    let snap = repo.join("snapshots").join(rev);
    let d = sharded_with_entry(home.path(), "../../blobs/secret.safetensors");
    copy_dir(&d, &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = match CausalLm::from_pretrained("tiny-org/escape", &LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    assert_corrupt(
        &e,
        &[
            "model.safetensors.index.json",
            "../../blobs/secret.safetensors",
        ],
    );
}

fn cfg(v: Value) -> candle_moe::Result<candle_moe::ModelConfig> {
    config_from_hf(&v, Path::new("ckpt/config.json")).map(|(_, c)| c)
}

fn cfg_err(v: Value, needles: &[&str]) {
    match cfg(v.clone()) {
        Ok(_) => panic!("accepted {v}"),
        Err(e) => {
            assert!(matches!(e, Error::Config(_)), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("ckpt/config.json"), "{msg}");
            for n in needles {
                assert!(msg.contains(n), "`{msg}` should contain `{n}`");
            }
        }
    }
}

fn tiny(model_type: &str) -> Value {
    let mut v = json!({
        "model_type": model_type,
        "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
    });
    match model_type {
        "mixtral" => v["num_local_experts"] = json!(4),
        "qwen2_moe" => {
            v["num_experts"] = json!(4);
            v["moe_intermediate_size"] = json!(48);
            v["shared_expert_intermediate_size"] = json!(64);
        }
        _ => v["num_experts"] = json!(4),
    }
    v
}

#[test]
fn v5_configs_read_rope_parameters_dtype_and_null_head_dim() {
    let mut v = tiny("mixtral");
    v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 250000.0});
    v["dtype"] = json!("bfloat16");
    v["head_dim"] = Value::Null;
    let c = cfg(v.clone()).unwrap();
    assert_eq!(c.rope_theta, 250000.0);
    assert_eq!(c.head_dim, None);
    assert_eq!(c.head_dim(), 8);
    // The 4.x spellings of the same, agreeing, are fine too.
    v["rope_theta"] = json!(250000.0);
    v["torch_dtype"] = json!("bfloat16");
    assert_eq!(cfg(v).unwrap().rope_theta, 250000.0);
    // Qwen2-MoE 5.x: `qkv_bias`, `layer_types`.
    let mut q = tiny("qwen2_moe");
    q["qkv_bias"] = json!(false);
    q["layer_types"] = json!(["full_attention", "full_attention"]);
    q["sliding_window"] = json!(0);
    q["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 30000.0});
    let c = cfg(q).unwrap();
    assert!(!c.attention_bias);
    assert_eq!(c.rope_theta, 30000.0);
}

#[test]
fn contradictory_configs_are_refused() {
    let with = |t: &str, f: &dyn Fn(&mut Value)| {
        let mut v = tiny(t);
        f(&mut v);
        v
    };
    cfg_err(
        with("mixtral", &|v| v["num_key_value_heads"] = json!(3)),
        &["num_key_value_heads", "(3)", "num_attention_heads", "(4)"],
    );
    cfg_err(
        with("mixtral", &|v| {
            v["rope_theta"] = json!(10000.0);
            v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        }),
        &["rope_theta", "rope_parameters.rope_theta", "disagree"],
    );
    cfg_err(
        with("mixtral", &|v| {
            v["dtype"] = json!("float32");
            v["torch_dtype"] = json!("bfloat16");
        }),
        &["`dtype`", "`torch_dtype`", "disagree"],
    );
    cfg_err(
        with("mixtral", &|v| v["num_experts"] = json!(8)),
        &["num_local_experts", "num_experts", "disagree"],
    );
    cfg_err(
        with("olmoe", &|v| v["head_dim"] = json!(16)),
        &["head_dim", "hidden_size", "OLMoE"],
    );
    cfg_err(
        with("mixtral", &|v| {
            v["hidden_size"] = json!(30);
        }),
        &["hidden_size", "(30)", "divisible"],
    );
    cfg_err(
        with("qwen2_moe", &|v| v["decoder_sparse_step"] = json!(0)),
        &["decoder_sparse_step"],
    );
    cfg_err(
        with("qwen2_moe", &|v| {
            v["layer_types"] = json!(["full_attention", "sliding_attention"])
        }),
        &["layer_types", "sliding_attention"],
    );
    cfg_err(
        with("qwen2_moe", &|v| {
            v["layer_types"] = json!(["full_attention"])
        }),
        &["layer_types", "num_hidden_layers"],
    );
    cfg_err(
        with("mixtral", &|v| v["num_experts_per_tok"] = json!(5)),
        &["num_experts_per_tok", "(5)"],
    );
    cfg_err(
        with("mixtral", &|v| {
            v["rope_scaling"] = json!({"type": "longrope", "factor": 2.0})
        }),
        &["rope_scaling.type", "longrope"],
    );
    cfg_err(
        with("olmoe", &|v| {
            v["rope_parameters"] = json!({"rope_type": "su", "rope_theta": 10000.0})
        }),
        &["rope_parameters.rope_type", "su"],
    );
    cfg_err(
        with("mixtral", &|v| v["hidden_act"] = json!("gelu")),
        &["hidden_act", "gelu"],
    );
    cfg_err(
        with("qwen2_moe", &|v| v["mlp_only_layers"] = json!([0, "one"])),
        &["mlp_only_layers"],
    );
}

#[test]
fn missing_keys_take_the_family_default() {
    // Only the model type: every value is the transformers config class default.
    let m = cfg(json!({"model_type": "mixtral"})).unwrap();
    assert_eq!(m.vocab_size, 32000);
    assert_eq!(m.hidden_size, 4096);
    assert_eq!(m.num_layers, 32);
    assert_eq!((m.num_heads, m.num_kv_heads), (32, 8));
    assert_eq!(m.max_position_embeddings, 131072);
    assert_eq!(m.norm_eps, 1e-5);
    assert_eq!(m.rope_theta, 1e6);
    assert_eq!((m.moe.num_experts, m.moe.top_k), (8, 2));
    assert_eq!(m.moe.intermediate_size, 14336);
    assert_eq!(m.moe.router_aux_loss_coef, 0.001);
    assert!(m.moe.norm_topk_prob && !m.tie_word_embeddings && !m.attention_bias);

    let q = cfg(json!({"model_type": "qwen2_moe"})).unwrap();
    assert_eq!(q.vocab_size, 151936);
    assert_eq!((q.num_heads, q.num_kv_heads), (16, 16));
    assert_eq!(q.max_position_embeddings, 32768);
    assert_eq!(q.norm_eps, 1e-6);
    assert_eq!(q.rope_theta, 1e4);
    assert_eq!((q.moe.num_experts, q.moe.top_k), (60, 4));
    assert_eq!(q.moe.intermediate_size, 1408);
    assert_eq!(q.moe.shared_expert_intermediate_size, 5632);
    assert_eq!(q.dense_intermediate_size, 5632);
    assert_eq!(q.moe.router_aux_loss_coef, 0.001);
    assert!(!q.moe.norm_topk_prob && q.attention_bias && !q.tie_word_embeddings);

    let o = cfg(json!({"model_type": "olmoe"})).unwrap();
    assert_eq!(o.vocab_size, 50304);
    // num_key_value_heads defaults to num_attention_heads.
    assert_eq!((o.num_heads, o.num_kv_heads), (16, 16));
    assert_eq!(o.max_position_embeddings, 4096);
    assert_eq!(o.norm_eps, 1e-5);
    assert_eq!(o.rope_theta, 1e4);
    assert_eq!((o.moe.num_experts, o.moe.top_k), (64, 8));
    assert_eq!(o.moe.router_aux_loss_coef, 0.01);
    assert!(!o.moe.norm_topk_prob && !o.attention_bias && o.qk_norm);

    // Null keys: `num_key_value_heads: null` is the number of heads; `head_dim: null` is
    // hidden / heads.
    let mut v = tiny("mixtral");
    v["num_key_value_heads"] = Value::Null;
    v["head_dim"] = Value::Null;
    let c = cfg(v).unwrap();
    assert_eq!(c.num_kv_heads, 4);
    assert_eq!(c.head_dim(), 8);
    // A partial tiny config keeps its own values and defaults the rest per family.
    let c = cfg(tiny("olmoe")).unwrap();
    assert_eq!(c.moe.router_aux_loss_coef, 0.01);
    assert_eq!(c.max_position_embeddings, 4096);
    let c = cfg(tiny("mixtral")).unwrap();
    assert_eq!(c.moe.router_aux_loss_coef, 0.001);
    assert_eq!(c.max_position_embeddings, 131072);
}
