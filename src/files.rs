//! Bounded reads: regular files only (a device, FIFO or socket, or a link to one, is refused
//! before it is opened) and a size cap checked before and while reading, for every file the
//! crate reads from a checkpoint, a corpus or a tokenizer.

use std::path::Path;

use crate::error::{Error, Result};

/// The cap on a JSON file the loader reads (`config.json`, the index, `tokenizer.json`).
pub(crate) const JSON_CAP: u64 = 64 << 20;

/// Checks that `path` (after following links) is a regular file, without opening it: a
/// special file such as `/dev/zero` or a FIFO is refused. `what` names the file's role.
pub(crate) fn check_regular(path: &Path, what: &str) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} is not a regular file (a directory, device, FIFO or socket)"),
            ),
        ));
    }
    Ok(meta)
}

/// Reads a whole regular file of at most `cap` bytes (checked before and while reading), naming
/// the file and the cap on error.
pub(crate) fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let too_big = || {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{what} is larger than the {cap}-byte limit for such files"),
            ),
        )
    };
    if check_regular(path, what)?.len() > cap {
        return Err(too_big());
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The opened file itself (the path may have been swapped since the check).
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} is not a regular file"),
            ),
        ));
    }
    let mut buf = Vec::new();
    f.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(buf)
}

/// Reads a JSON file of at most [`JSON_CAP`] bytes as UTF-8 text, naming it on error.
pub(crate) fn read_json_text(path: &Path, what: &str) -> Result<String> {
    let bytes = read_capped(path, JSON_CAP, what)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}")),
        )
    })
}
