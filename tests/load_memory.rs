//! Loading allocates only what the weights hold: a config that declares sizes far beyond its
//! weights fails before anything that size is allocated, and a legitimate load does not build
//! (and randomly initialise) the model before reading the weights. Each load runs in a child
//! process that reports its peak resident memory (`VmHWM`).

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::{CausalLm, ModelConfig};
use candle_nn::{VarBuilder, VarMap};

const MB: f64 = 1024.0 * 1024.0;

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::tiny(8192);
    c.hidden_size = 256;
    c.moe.hidden_size = 256;
    c.moe.intermediate_size = 256;
    c.moe.num_experts = 8;
    c.num_layers = 2;
    c.tie_word_embeddings = false;
    c
}

fn peak_bytes() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024.0
}

/// Child: load `CANDLE_MOE_LOAD_DIR` (if set) and print `ok|err <peak bytes>`.
#[test]
#[ignore]
fn load_child() {
    let Some(dir) = std::env::var_os("CANDLE_MOE_LOAD_DIR") else {
        return;
    };
    let res = if dir.is_empty() {
        Ok(())
    } else {
        CausalLm::load(Path::new(&dir), DType::F32, &Device::Cpu).map(|_| ())
    };
    let tag = match &res {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("err {e}"),
    };
    println!("RESULT {} PEAK {}", tag.replace('\n', " "), peak_bytes());
}

fn run_child(dir: &str) -> (String, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "load_child", "--ignored", "--nocapture"])
        .env("CANDLE_MOE_LOAD_DIR", dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no result: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (tag, peak) = line["RESULT ".len()..].rsplit_once(" PEAK ").unwrap();
    (tag.to_string(), peak.parse().unwrap())
}

#[test]
fn loading_allocates_only_what_the_weights_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let c = cfg();
    let vm = VarMap::new();
    CausalLm::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    checkpoint::save(&good, &c, &vm, None).unwrap();
    let model_bytes = std::fs::metadata(good.join("model.safetensors"))
        .unwrap()
        .len() as f64;
    drop(vm);

    let (tag, base) = run_child("");
    assert_eq!(tag, "ok");
    let (tag, legit) = run_child(good.to_str().unwrap());
    assert_eq!(tag, "ok", "legitimate load");
    eprintln!(
        "weights {:.1} MB; child baseline peak {:.1} MB; legitimate load peak {:.1} MB (+{:.1} MB)",
        model_bytes / MB,
        base / MB,
        legit / MB,
        (legit - base) / MB
    );
    assert!(
        legit - base < 1.5 * model_bytes,
        "load peak grew by {:.1} MB for {:.1} MB of weights",
        (legit - base) / MB,
        model_bytes / MB
    );

    // Sizes 100x the weights': refused before allocating them.
    for (what, key, value) in [
        (
            "vocab_size",
            "\"vocab_size\": 8192",
            "\"vocab_size\": 819200",
        ),
        (
            "expert width",
            "\"intermediate_size\": 256",
            "\"intermediate_size\": 25600",
        ),
        (
            "max_position_embeddings",
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 1000000000",
        ),
    ] {
        let bad = tmp.path().join(what.replace(' ', "_"));
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::copy(
            good.join("model.safetensors"),
            bad.join("model.safetensors"),
        )
        .unwrap();
        let cfg_text = std::fs::read_to_string(good.join("config.json")).unwrap();
        assert!(cfg_text.contains(key), "{key}");
        std::fs::write(bad.join("config.json"), cfg_text.replace(key, value)).unwrap();
        let (tag, peak) = run_child(bad.to_str().unwrap());
        eprintln!("{what} x100: {tag}; peak {:.1} MB", peak / MB);
        if what == "max_position_embeddings" {
            // Valid weights: it loads, with RoPE tables only for the lengths used.
            assert_eq!(tag, "ok");
        } else {
            assert!(
                tag.starts_with("err") && tag.contains("shape"),
                "{what}: {tag}"
            );
        }
        assert!(peak < 100.0 * MB, "{what}: peak {:.1} MB", peak / MB);
    }
}
