//! Hutto & Gilbert (ICWSM 2014) sentiment sentences (`data/sentiment.tsv.gz`, columns
//! `split source id rating label text`), and plain `text<TAB>label` evaluation files.

use std::path::Path;

use crate::error::{Error, Result};

/// One labelled sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// `train`, `valid` or `test`.
    pub split: String,
    /// Where the sentence comes from (movie, amazon, nyt, tweets).
    pub source: String,
    /// Mean human rating (−4 … 4).
    pub rating: f64,
    /// 1 = positive, 0 = negative.
    pub label: u32,
    /// The sentence.
    pub text: String,
}

/// Parses the shipped TSV (with its header line).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            if !line.starts_with("split\t") {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: 1,
                    msg: "expected the header `split\\tsource\\tid\\trating\\tlabel\\ttext`".into(),
                });
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let f = super::fields(line, 6, path, i + 1)?;
        let bad = |msg: String| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let rating: f64 = f[3]
            .parse()
            .map_err(|_| bad(format!("rating `{}` is not a number", f[3])))?;
        let label =
            parse_label(f[4]).ok_or_else(|| bad(format!("label `{}` is not 0 or 1", f[4])))?;
        out.push(Example {
            split: f[0].to_string(),
            source: f[1].to_string(),
            rating,
            label,
            text: f[5].to_string(),
        });
    }
    Ok(out)
}

fn parse_label(s: &str) -> Option<u32> {
    match s.trim() {
        "0" => Some(0),
        "1" => Some(1),
        _ => None,
    }
}

/// Loads the shipped file.
pub fn load(path: &Path) -> Result<Vec<Example>> {
    parse(&super::read_text(path)?, path)
}

/// Reads an evaluation file of `text<TAB>label` lines (label 0/1), naming the bad line.
pub fn load_eval_tsv(path: &Path) -> Result<Vec<(String, u32)>> {
    let text = super::read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (t, l) = line.rsplit_once('\t').ok_or_else(|| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: "expected `text<TAB>label`".into(),
        })?;
        let label = parse_label(l).ok_or_else(|| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("label `{l}` is not 0 or 1"),
        })?;
        out.push((t.to_string(), label));
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: "no examples".into(),
        });
    }
    Ok(out)
}
