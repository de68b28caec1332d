//! Byte-level BPE tokenizers (Sennrich et al. 2016; GPT-2's byte-level variant) trained with the
//! `tokenizers` crate, saved as `tokenizer.json` and loaded back.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{Error, Result};

/// Special tokens every tokenizer of this crate has, with ids 0..4.
pub const SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<unk>"];

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Trains a byte-level BPE tokenizer of `vocab_size` tokens on `texts`.
pub fn train_bpe<S: AsRef<str> + Send>(
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
) -> Result<Tokenizer> {
    let mem = Path::new("<memory>");
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| tok_err(mem, e))?;
    tk.train(&mut trainer, texts).map_err(|e| tok_err(mem, e))?;
    Ok(Tokenizer::from(tk))
}

/// Runs `f`, turning a panic inside the `tokenizers` crate (fuzzing found some on malformed
/// `tokenizer.json` files) into an error naming `path`.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(tok_err(path, format!("malformed tokenizer ({msg})")))
        }
    }
}

/// Loads a `tokenizer.json`, naming the file on error; padding and truncation are disabled.
/// Only a regular file (links followed) of at most 64 MiB is read.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let json = crate::files::read_json_text(path, "tokenizer.json")?;
    from_json(&json, path)
}

/// Parses a tokenizer from its JSON text.
pub fn from_json(json: &str, path: &Path) -> Result<Tokenizer> {
    guarded(path, || {
        let mut t: Tokenizer = json.parse().map_err(|e| tok_err(path, e))?;
        t.with_padding(None);
        t.with_truncation(None).map_err(|e| tok_err(path, e))?;
        Ok(t)
    })
}

/// The tokenizer as JSON (what `tokenizer.json` holds).
pub fn to_json(t: &Tokenizer) -> Result<String> {
    t.to_string(false)
        .map_err(|e| tok_err(Path::new("<memory>"), e))
}

/// Token ids of `text` (no special tokens added).
pub fn encode(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mem = Path::new("<memory>");
    guarded(mem, || {
        Ok(t.encode(text, false)
            .map_err(|e| tok_err(mem, e))?
            .get_ids()
            .to_vec())
    })
}

/// Text of `ids`, skipping special tokens.
pub fn decode(t: &Tokenizer, ids: &[u32]) -> Result<String> {
    let mem = Path::new("<memory>");
    guarded(mem, || t.decode(ids, true).map_err(|e| tok_err(mem, e)))
}

/// The id of a special token.
pub fn special_id(t: &Tokenizer, name: &str) -> Result<u32> {
    t.token_to_id(name)
        .ok_or_else(|| tok_err(Path::new("<memory>"), format!("no special token `{name}`")))
}
