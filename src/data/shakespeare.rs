//! Shakespeare's works (`data/shakespeare.txt.gz`): each work starts with a line
//! `<<<WORK name>>>` followed by its text.

use std::path::Path;

use crate::error::{Error, Result};

/// One work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// File stem of the work (e.g. `hamlet`).
    pub name: String,
    /// Its text (without the header line).
    pub text: String,
}

/// Parses the works file.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Work>> {
    let mut works: Vec<Work> = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches('\n');
        if let Some(rest) = trimmed.strip_prefix("<<<WORK ") {
            let name = rest.strip_suffix(">>>").ok_or_else(|| Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                msg: format!("malformed work header `{trimmed}`"),
            })?;
            works.push(Work {
                name: name.to_string(),
                text: String::new(),
            });
        } else {
            match works.last_mut() {
                Some(w) => w.text.push_str(line),
                None if trimmed.trim().is_empty() => {}
                None => {
                    return Err(Error::Data {
                        path: path.to_path_buf(),
                        line: i + 1,
                        msg: "text before the first `<<<WORK name>>>` header".into(),
                    })
                }
            }
        }
    }
    if works.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: "no `<<<WORK name>>>` header found".into(),
        });
    }
    Ok(works)
}

/// Loads `data/shakespeare.txt.gz` (or another file of the same format).
pub fn load(path: &Path) -> Result<Vec<Work>> {
    parse(&super::read_text(path)?, path)
}

/// The works held out for validation.
pub const VALID_WORKS: [&str; 2] = ["hamlet", "tempest"];

/// Splits works into (train, validation) by [`VALID_WORKS`].
pub fn split(works: Vec<Work>) -> (Vec<Work>, Vec<Work>) {
    works
        .into_iter()
        .partition(|w| !VALID_WORKS.contains(&w.name.as_str()))
}
