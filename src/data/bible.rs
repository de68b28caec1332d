//! Verse-aligned English (KJV) / Spanish (Reina-Valera 1909) Bible (`data/bible_en_es.tsv.gz`,
//! columns `book chapter verse en es`), split by book so test verses come from unseen books.

use std::path::Path;

use crate::error::{Error, Result};

/// One aligned verse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Book name.
    pub book: String,
    /// Chapter number.
    pub chapter: u32,
    /// Verse number.
    pub verse: u32,
    /// English (KJV).
    pub en: String,
    /// Spanish (RV 1909).
    pub es: String,
}

/// Test books (never seen in training).
pub const TEST_BOOKS: [&str; 6] = ["Ruth", "Jonah", "Philemon", "Jude", "III John", "Titus"];
/// Validation books.
pub const VALID_BOOKS: [&str; 3] = ["Esther", "Micah", "II Thessalonians"];

/// Parses the TSV (with its header line).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Pair>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            if !line.starts_with("book\t") {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: 1,
                    msg: "expected the header `book\\tchapter\\tverse\\ten\\tes`".into(),
                });
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let f = super::fields(line, 5, path, i + 1)?;
        let num = |s: &str, what: &str| -> Result<u32> {
            s.parse().map_err(|_| Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                msg: format!("{what} `{s}` is not a number"),
            })
        };
        out.push(Pair {
            book: f[0].to_string(),
            chapter: num(f[1], "chapter")?,
            verse: num(f[2], "verse")?,
            en: f[3].to_string(),
            es: f[4].to_string(),
        });
    }
    Ok(out)
}

/// Loads the pairs file.
pub fn load(path: &Path) -> Result<Vec<Pair>> {
    parse(&super::read_text(path)?, path)
}

/// Splits pairs into (train, validation, test) by book.
pub fn split(pairs: Vec<Pair>) -> (Vec<Pair>, Vec<Pair>, Vec<Pair>) {
    let (mut train, mut valid, mut test) = (vec![], vec![], vec![]);
    for p in pairs {
        if TEST_BOOKS.contains(&p.book.as_str()) {
            test.push(p);
        } else if VALID_BOOKS.contains(&p.book.as_str()) {
            valid.push(p);
        } else {
            train.push(p);
        }
    }
    (train, valid, test)
}
