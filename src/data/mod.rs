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

/// The most bytes [`read_text`] reads from a file, or decompresses from a `.gz` one (1 GiB).
pub const TEXT_CAP: u64 = 1 << 30;

/// Reads a UTF-8 text file, gunzipping it when its name ends in `.gz`. Only a regular file
/// (links followed) is read, and at most [`TEXT_CAP`] bytes of it, or of its decompressed text
/// (a gzip bomb is an error, not an out-of-memory).
pub fn read_text(path: &Path) -> Result<String> {
    read_text_capped(path, TEXT_CAP)
}

/// [`read_text`] with an explicit cap on the file's size and on its decompressed size.
pub(crate) fn read_text_capped(path: &Path, cap: u64) -> Result<String> {
    let bytes = crate::files::read_capped(path, cap, "a text file")?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .take(cap.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| Error::io(path, e))?;
        if out.len() as u64 > cap {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: 0,
                msg: format!("decompresses to more than {cap} bytes, the limit: refused"),
            });
        }
        out
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        msg: format!("not UTF-8: {e}"),
    })
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A small `.gz` that expands beyond the cap is an error naming the file and the limit,
    /// after reading at most cap + 1 decompressed bytes.
    #[test]
    fn gzip_bomb_is_capped() {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e));
        let Ok(dir) = dir else { return };
        let p = dir.path().join("bomb.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b'a'; 1 << 20];
        for _ in 0..4 {
            assert!(enc.write_all(&zeros).is_ok());
        }
        let gz = enc.finish().unwrap_or_default();
        assert!(gz.len() < 64 << 10, "{} bytes compressed", gz.len());
        assert!(std::fs::write(&p, &gz).is_ok());
        // Under a 1 MiB cap: refused; the compressed file itself is under the cap.
        match read_text_capped(&p, 1 << 20) {
            Err(Error::Data { msg, path, .. }) => {
                assert!(
                    msg.contains("decompresses to more than 1048576 bytes"),
                    "{msg}"
                );
                assert_eq!(path, p);
            }
            other => panic!("not refused: {:?}", other.map(|s| s.len())),
        }
        // Under the default cap it reads.
        assert_eq!(read_text(&p).map(|s| s.len()).ok(), Some(4 << 20));
        // A plain file over the cap is refused from its size.
        let plain = dir.path().join("big.txt");
        assert!(std::fs::write(&plain, vec![b'a'; 2048]).is_ok());
        let e = read_text_capped(&plain, 1024).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("limit")));
    }
}
