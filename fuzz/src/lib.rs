//! Helpers shared by the fuzz targets of `candle-moe` and the seed-corpus generator.
//!
//! `cargo test` in this directory (see `README.md`) runs [`tests::write_seed_corpus`],
//! which writes the seed corpora under `fuzz/corpus/<target>/`.

use candle_core::{DType, Device, Tensor};
use candle_moe::{CausalLm, ModelConfig};

mod fixtures;
pub use fixtures::{seed_shard_index, sharded_tiny_dir, with_trainer_fixture, TrainerFixture};

/// The fixed tiny model of the `checkpoint_bytes` target: vocabulary 16, width 8, one sparse
/// layer of 4 experts (top-2) of width 8, 2 heads, 8 positions.
pub fn tiny_config() -> ModelConfig {
    let mut cfg = ModelConfig::tiny(16);
    cfg.hidden_size = 8;
    cfg.moe.hidden_size = 8;
    cfg.moe.intermediate_size = 8;
    cfg.dense_intermediate_size = 8;
    cfg.num_heads = 2;
    cfg.num_kv_heads = 2;
    cfg.num_layers = 1;
    cfg.num_decoder_layers = 1;
    cfg.max_position_embeddings = 8;
    cfg
}

/// An over-estimate of the number of scalars `CausalLm::new` allocates for `cfg` (weights,
/// RoPE tables, norms), in saturating `u128` arithmetic so that any config can be asked.
pub fn param_estimate(cfg: &ModelConfig) -> u128 {
    let u = |x: usize| x as u128;
    let h = u(cfg.hidden_size);
    let hd = u(cfg.head_dim());
    let nh = u(cfg.num_heads);
    let nkv = u(cfg.num_kv_heads);
    let m = &cfg.moe;
    let embed = u(cfg.vocab_size).saturating_mul(h).saturating_mul(2);
    let pos = u(cfg.max_position_embeddings).saturating_mul(h.max(hd).saturating_add(1));
    let types = u(cfg.type_vocab_size).saturating_mul(h);
    let attn = h
        .saturating_add(1)
        .saturating_mul(nh.saturating_add(nkv).saturating_mul(hd))
        .saturating_mul(2)
        .saturating_add(nh.saturating_add(nkv).saturating_mul(hd));
    let expert = |f: u128| h.saturating_add(1).saturating_mul(f.saturating_add(1)).saturating_mul(3);
    let sparse = u(m.num_experts)
        .saturating_mul(expert(u(m.intermediate_size)))
        .saturating_add(h.saturating_add(1).saturating_mul(u(m.num_experts)).saturating_mul(2))
        .saturating_add(expert(u(m.shared_expert_intermediate_size)))
        .saturating_add(h);
    let dense = expert(u(cfg.dense_intermediate_size));
    let layer = attn
        .saturating_add(sparse.max(dense))
        .saturating_add(h.saturating_mul(8));
    embed
        .saturating_add(pos)
        .saturating_add(types)
        .saturating_add(h.saturating_mul(4))
        .saturating_add(u(cfg.num_layers).saturating_mul(layer))
}

/// Runs one short inference forward (ids `0, 1, ...`, at most 3 tokens) through `model`.
/// Errors are fine; the caller only cares that nothing panics.
pub fn tiny_forward(model: &CausalLm, cfg: &ModelConfig) {
    let t = cfg.max_position_embeddings.min(3);
    let ids: Vec<u32> = (0..t).map(|i| (i % cfg.vocab_size) as u32).collect();
    if let Ok(ids) = Tensor::from_vec(ids, (1, t), &Device::Cpu) {
        let _ = model.forward(&ids);
    }
}

/// A valid `model.safetensors` of [`tiny_config`] with deterministic random weights.
pub fn seed_checkpoint_bytes() -> Vec<u8> {
    let cfg = tiny_config();
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    CausalLm::new(&cfg, vb).expect("tiny model");
    let dir = std::env::temp_dir().join(format!("candle-moe-fuzz-seed-{}", std::process::id()));
    candle_moe::io::model_dir::save(&dir, &cfg, &vm, None).expect("save");
    let bytes = std::fs::read(dir.join(candle_moe::io::model_dir::WEIGHTS)).expect("read");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// A byte-level BPE `tokenizer.json` of 300 tokens trained on a few sentences.
pub fn seed_tokenizer_json() -> String {
    let text = [
        "The quick brown fox jumps over the lazy dog.",
        "Sparse mixture-of-experts layers route every token to its top-k experts.",
        "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!",
        "Il était une fois, dans un pays lointain, une reine et un roi.",
        "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
        "1234567890 + 0987654321 = 2222222211; tokens: <pad> <bos> <eos> <unk>",
    ];
    let texts: Vec<String> = (0..20).flat_map(|_| text.iter().map(|s| s.to_string())).collect();
    let tok = candle_moe::tokenizer::train_bpe(texts.into_iter(), 300).expect("train");
    candle_moe::tokenizer::to_json(&tok).expect("to_json")
}

/// Hand-written `tokenizer.json` seeds of the other model types and components the `tokenizers`
/// crate reads (WordPiece, Unigram, WordLevel, BPE with byte fallback; normalizers,
/// pre-tokenizers, post-processors, decoders, padding and truncation).
pub fn seed_tokenizer_variants() -> Vec<(&'static str, &'static str)> {
    vec![
        ("wordpiece_bert", r###"{"version":"1.0","truncation":{"direction":"Right","max_length":16,"strategy":"LongestFirst","stride":0},"padding":{"strategy":{"Fixed":16},"direction":"Right","pad_to_multiple_of":null,"pad_id":0,"pad_type_id":0,"pad_token":"[PAD]"},"added_tokens":[{"id":0,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":1,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":2,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":3,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},"pre_tokenizer":{"type":"BertPreTokenizer"},"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}}],"pair":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}},{"Sequence":{"id":"B","type_id":1}},{"SpecialToken":{"id":"[SEP]","type_id":1}}],"special_tokens":{"[CLS]":{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]},"[SEP]":{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}},"decoder":{"type":"WordPiece","prefix":"##","cleanup":true},"model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,"vocab":{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"hello":4,"world":5,"##s":6,",":7,"!":8,"h":9,"##e":10,"##l":11,"##o":12,"1":13,"##2":14,"##3":15}}}"###),
        ("unigram_metaspace", r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"Sequence","normalizers":[{"type":"NFKC"},{"type":"Replace","pattern":{"String":"  "},"content":" "},{"type":"Lowercase"}]},"pre_tokenizer":{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true},"post_processor":null,"decoder":{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true},"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["▁",-1.5],["▁hello",-3.0],["▁world",-3.2],["h",-4.0],["e",-4.0],["l",-4.0],["o",-4.0],["w",-4.1],["r",-4.1],["d",-4.1],[",",-4.5],["!",-4.5]],"byte_fallback":false}}"###),
        ("wordlevel_whitespace", r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"Strip","strip_left":true,"strip_right":true},"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Whitespace"},{"type":"Punctuation","behavior":"Isolated"},{"type":"Digits","individual_digits":true}]},"post_processor":{"type":"BertProcessing","sep":["</s>",2],"cls":["<s>",1]},"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"hello":3,"world":4,",":5,"!":6,"1":7,"2":8,"3":9},"unk_token":"<unk>"}}"###),
        ("bpe_byte_fallback", r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]},"pre_tokenizer":{"type":"Split","pattern":{"Regex":"\\s+"},"behavior":"MergedWithPrevious","invert":false},"post_processor":{"type":"RobertaProcessing","sep":["<s>",1],"cls":["<s>",1],"trim_offsets":true,"add_prefix_space":true},"decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]},"model":{"type":"BPE","dropout":null,"unk_token":"<unk>","continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":true,"byte_fallback":true,"ignore_merges":false,"vocab":{"<unk>":0,"<s>":1,"<0x00>":2,"<0x41>":3,"<0xC3>":4,"<0xB6>":5,"▁":6,"H":7,"e":8,"l":9,"o":10,"▁H":11,"ll":12,"▁He":13,"▁Hell":14,"▁Hello":15},"merges":["▁ H","l l","▁H e","▁He ll","▁Hell o"]}}"###),
    ]
}

/// `config.json` seeds: the crate's own configs and Hugging Face configs of every family.
pub fn seed_configs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let tiny = tiny_config();
    out.push(("tiny_model".into(), serde_json::to_string_pretty(&tiny).unwrap()));
    out.push(("tiny256_model".into(), serde_json::to_string(&ModelConfig::tiny(256)).unwrap()));
    out.push(("moe".into(), serde_json::to_string_pretty(&tiny.moe).unwrap()));
    let mut bert = tiny.clone();
    bert.position = candle_moe::PositionKind::Learned;
    bert.norm = candle_moe::NormKind::Layernorm;
    bert.post_norm = true;
    bert.attention_bias = true;
    bert.type_vocab_size = 2;
    bert.sparse_step = 2;
    bert.num_layers = 2;
    bert.mlp_only_layers = vec![0];
    bert.moe.expert_kind = candle_moe::ExpertKind::Gelu;
    bert.moe.expert_bias = true;
    bert.moe.capacity_factor = Some(1.25);
    bert.moe.noisy_gating = true;
    bert.moe.shared_expert_intermediate_size = 4;
    out.push(("tiny_model_variants".into(), serde_json::to_string(&bert).unwrap()));
    out.push((
        "hf_mixtral".into(),
        r#"{"model_type":"mixtral","vocab_size":32,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":4,"num_experts_per_tok":2,"max_position_embeddings":16,"rope_theta":1000000.0,"rms_norm_eps":1e-5,"router_aux_loss_coef":0.02,"router_jitter_noise":0.0,"tie_word_embeddings":false}"#.into(),
    ));
    out.push((
        "hf_qwen2_moe".into(),
        r#"{"model_type":"qwen2_moe","vocab_size":32,"hidden_size":8,"intermediate_size":16,"moe_intermediate_size":4,"shared_expert_intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":2,"num_experts":4,"num_experts_per_tok":2,"norm_topk_prob":false,"decoder_sparse_step":1,"mlp_only_layers":[1],"max_position_embeddings":16,"rope_theta":10000.0,"rms_norm_eps":1e-6}"#.into(),
    ));
    out.push((
        "hf_olmoe".into(),
        r#"{"model_type":"olmoe","vocab_size":32,"hidden_size":8,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"num_experts":4,"num_experts_per_tok":2,"norm_topk_prob":false,"max_position_embeddings":16,"rope_theta":10000.0,"rms_norm_eps":1e-5,"attention_bias":false}"#.into(),
    ));
    out.push((
        "hf_bert".into(),
        r#"{"model_type":"bert","vocab_size":30,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":16,"type_vocab_size":2,"hidden_act":"gelu","layer_norm_eps":1e-12,"position_embedding_type":"absolute","pad_token_id":0}"#.into(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn corpus(target: &str) -> PathBuf {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes the seed corpora: `corpus/{config_json,checkpoint_bytes,tokenizer_json}/seed_*`.
    #[test]
    fn write_seed_corpus() {
        let dir = corpus("config_json");
        for (name, json) in seed_configs() {
            std::fs::write(dir.join(format!("seed_{name}.json")), json).unwrap();
        }
        // Every Hugging Face config the repo's tests load (all eight families, both spellings).
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for set in ["hf", "hf_v5", "hf_v5_fused", "real_configs"] {
            for e in std::fs::read_dir(fixtures.join(set)).unwrap() {
                let d = e.unwrap().path();
                for file in ["config.json", "config.v4.json"] {
                    if let Ok(text) = std::fs::read_to_string(d.join(file)) {
                        let name = format!("seed_{set}_{}_{file}", d.file_name().unwrap().to_string_lossy());
                        std::fs::write(dir.join(name), text).unwrap();
                    }
                }
            }
        }

        let dir = corpus("checkpoint_bytes");
        let st = seed_checkpoint_bytes();
        std::fs::write(dir.join("seed_valid.safetensors"), &st).unwrap();
        // Header mutations: the 8-byte little-endian header length, then the JSON header.
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&st[8..8 + n]).unwrap().to_string();
        let data = &st[8 + n..];
        let with_header = |h: &str, data: &[u8]| {
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(data);
            v
        };
        let mut muts: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", st[..st.len() / 2].to_vec()),
            ("header_only", st[..8 + n].to_vec()),
            ("len_too_big", {
                let mut v = st.clone();
                v[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                v
            }),
            ("len_off_by_one", {
                let mut v = st.clone();
                v[..8].copy_from_slice(&((n as u64) + 1).to_le_bytes());
                v
            }),
            ("f16", with_header(&header.replace("\"F32\"", "\"F16\""), &data[..data.len() / 2])),
            ("bf16", with_header(&header.replace("\"F32\"", "\"BF16\""), &data[..data.len() / 2])),
            ("u8_dtype", with_header(&header.replace("\"F32\"", "\"U8\""), &data[..data.len() / 4])),
            ("i64_dtype", with_header(&header.replace("\"F32\"", "\"I64\""), &[data, data].concat())),
            ("renamed", with_header(&header.replacen("model.", "modelX", 1), data)),
            ("metadata", with_header(&header.replacen('{', "{\"__metadata__\":{\"format\":\"pt\"},", 1), data)),
        ];
        // One tensor's shape changed without fixing the offsets, and one extra tensor.
        muts.push(("shape", with_header(&header.replacen("[16,8]", "[8,16]", 1), data)));
        muts.push(("shape_bad", with_header(&header.replacen("[16,8]", "[16,9]", 1), data)));
        let extra = header.replacen(
            '{',
            &format!("{{\"extra\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{},{}]}},", data.len(), data.len() + 4),
            1,
        );
        muts.push(("extra_tensor", with_header(&extra, &[data, &[0, 0, 128, 127]].concat())));
        // NaN and infinite weights (valid file).
        let nan: Vec<u8> = data.chunks(4).flat_map(|_| f32::NAN.to_le_bytes()).collect();
        muts.push(("nan_weights", with_header(&header, &nan)));
        let inf: Vec<u8> = data.chunks(4).flat_map(|_| f32::INFINITY.to_le_bytes()).collect();
        muts.push(("inf_weights", with_header(&header, &inf)));
        for (name, bytes) in muts {
            std::fs::write(dir.join(format!("seed_{name}.safetensors")), bytes).unwrap();
        }

        let dir = corpus("shard_index");
        let index = seed_shard_index();
        std::fs::write(dir.join("seed_valid.json"), &index).unwrap();
        let text = String::from_utf8(index).unwrap();
        let first = text.split('"').find(|s| s.ends_with(".safetensors")).unwrap().to_string();
        for (name, to) in [
            ("climb_out", "../outside.safetensors".to_string()),
            ("absolute", "/etc/passwd".to_string()),
            ("subdir", format!("sub/{first}")),
            ("missing", "model-99999-of-99999.safetensors".to_string()),
        ] {
            std::fs::write(dir.join(format!("seed_{name}.json")), text.replacen(&first, &to, 1)).unwrap();
        }

        let dir = corpus("trainer_state");
        with_trainer_fixture(|fx| {
            for (which, file) in [
                (0u8, fx.checkpoint.join("trainer/trainer_state.json")),
                (1, fx.checkpoint.join("trainer/optimizer.safetensors")),
                (2, fx.checkpoint.join("checkpoint.json")),
                (3, fx.state_dir.join("trainer_state.json")),
            ] {
                let mut bytes = vec![which];
                bytes.extend(std::fs::read(file).unwrap());
                std::fs::write(dir.join(format!("seed_{which}")), bytes).unwrap();
            }
        });

        let dir = corpus("example_args");
        for (name, args) in [
            ("defaults", ""),
            ("language_model", "--steps\n200\n--batch\n8\n--seq-len\n64\n--hidden\n64\n--experts\n4"),
            ("dense", "--dense\n--layers\n2\n--top-k\n1\n--vocab\n300"),
            ("zeros", "--seq-len\n0\n--batch\n0\n--steps\n0\n--hidden\n0"),
            ("bad_lr", "--lr\nNaN\n--aux-loss-coef\n-1\n--z-loss-coef\ninf"),
        ] {
            std::fs::write(dir.join(format!("seed_{name}")), args.replace("\\n", "\n")).unwrap();
        }

        let dir = corpus("tokenizer_json");
        std::fs::write(dir.join("seed_bpe300.json"), seed_tokenizer_json()).unwrap();
        for (name, json) in seed_tokenizer_variants() {
            // Every hand-written seed must load, or it seeds nothing useful.
            let t = candle_moe::tokenizer::from_json(json, Path::new(name))
                .unwrap_or_else(|e| panic!("seed {name}: {e}"));
            let ids = candle_moe::tokenizer::encode(&t, "Hello, world! 123").unwrap();
            assert!(!ids.is_empty(), "{name}");
            std::fs::write(dir.join(format!("seed_{name}.json")), json).unwrap();
        }
    }
}
