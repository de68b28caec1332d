//! `tokenizer.json` text: `tokenizer::from_json`; a tokenizer that loads encodes a short
//! string and decodes the ids back. Non-UTF-8 inputs are skipped. Errors are fine; panics are
//! bugs.
#![no_main]

use std::path::Path;

use candle_moe::tokenizer;
use libfuzzer_sys::fuzz_target;

const TEXT: &str = "Hello, world! <bos>Zwölf Boxkämpfer 123 <eos> \u{1F600}";

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tok) = tokenizer::from_json(json, Path::new("tokenizer.json")) else {
        return;
    };
    if let Ok(ids) = tokenizer::encode(&tok, TEXT) {
        let _ = tokenizer::decode(&tok, &ids);
    }
});
