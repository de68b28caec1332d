//! Readers and batching for the corpora the repo ships in `data/` (see `data/SOURCES.md`), and
//! BPE tokenizers trained with the `tokenizers` crate.
//!
//! - [`shakespeare`]: the 42 works as plain text (language modeling).
//! - [`bible`]: verse-aligned King James Bible / Reina-Valera 1909 (English → Spanish).
//! - [`sentiment`]: Hutto & Gilbert (ICWSM 2014) rated sentences (binary sentiment).

pub mod bible;
pub mod sentiment;
pub mod shakespeare;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The repo's `data/` folder (`CARGO_MANIFEST_DIR/data`, or `$CANDLE_MOE_DATA`).
pub fn data_dir() -> PathBuf {
    std::env::var_os("CANDLE_MOE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data"))
}

/// Reads a UTF-8 text file, gunzipping it when its name ends in `.gz`.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .map_err(|e| Error::io(path, e))?;
    } else {
        text = String::from_utf8(bytes).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: format!("not UTF-8: {e}"),
        })?;
    }
    Ok(text)
}

/// Splits a TSV line into exactly `n` fields, with an error naming the file and line.
pub(crate) fn fields<'a>(
    line: &'a str,
    n: usize,
    path: &Path,
    lineno: usize,
) -> Result<Vec<&'a str>> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != n {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: lineno,
            msg: format!("expected {n} tab-separated fields, found {}", f.len()),
        });
    }
    Ok(f)
}
