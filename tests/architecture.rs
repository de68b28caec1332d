//! The crate's layering (ARCHITECTURE.md): a module may only use `crate::X` for modules `X` at or
//! below its own layer, and no source file grows past 500 lines.
//!
//! Reads every `src/**/*.rs`, strips comments (doc comments included) and string literals, and
//! finds the `crate::<top-module>` paths in `use` lines and inline paths (`crate::{a, b}` groups
//! and the crate-root re-exports of `src/lib.rs` resolved to their modules). `super::` paths are
//! not followed: they stay inside a module's own folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers, bottom up: a module may use the modules listed before it (and itself).
const ORDER: &[&str] = &[
    "error",
    "files",
    "config",
    "ops",
    "cpu",
    "layers",
    "losses",
    "moe",
    "dist",
    "attention",
    "block",
    "models",
    "tokenizer",
    "io",
    "train",
    "upcycle",
    "data",
    "tasks",
    "classic",
];

/// `classic` is independent of the transformer stack: it may use only these (and itself).
const CLASSIC_MAY_USE: &[&str] = &["error", "ops"];

const MAX_LINES: usize = 500;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/io/hf/mod.rs` -> `io`); `None` for `lib.rs`.
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src_dir()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    if rel.components().count() > 1 {
        Some(first)
    } else {
        let stem = first.trim_end_matches(".rs");
        (stem != "lib").then(|| stem.to_string())
    }
}

/// The source with comments (line, block, doc) and the contents of string and char literals
/// blanked out, line structure kept.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let keep_newlines = |s: &[char], out: &mut String| {
        out.extend(s.iter().filter(|&&ch| ch == '\n'));
    };
    while i < c.len() {
        let rest = &c[i..];
        if rest.starts_with(&['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let start = i;
            let mut depth = 0;
            while i < c.len() {
                if c[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    i += 2;
                } else if c[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            keep_newlines(&c[start..i], &mut out);
        } else if c[i] == 'r'
            && (i == 0 || !is_ident(c[i - 1]))
            && rest.len() > 1
            && (rest[1] == '"' || rest[1] == '#')
        {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while j < c.len() && c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            if j < c.len() && c[j] == '"' {
                let start = i;
                j += 1;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"'
                        && c[j + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&h| h == '#')
                            .count()
                            == hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                keep_newlines(&c[start..j.min(c.len())], &mut out);
                out.push_str("\"\"");
                i = j;
            } else {
                out.push(c[i]);
                i += 1;
            }
        } else if c[i] == '"' {
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            keep_newlines(&c[start..i.min(c.len())], &mut out);
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // a char literal ('x', '\n', '\u{..}'), or else a lifetime / label
            if rest.len() > 2 && rest[1] == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if rest.len() > 2 && rest[2] == '\'' {
                i += 3;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The first identifiers of the items of a `{ ... }` group starting at `s[0] == '{'`.
fn group_heads(s: &[char]) -> Vec<String> {
    let mut heads = vec![];
    let mut depth = 0;
    let mut expect_head = false;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '{' => {
                depth += 1;
                expect_head = depth == 1;
                i += 1;
            }
            '}' => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    break;
                }
            }
            ',' => {
                expect_head = depth == 1;
                i += 1;
            }
            ch if is_ident(ch) => {
                let start = i;
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
                if expect_head {
                    heads.push(s[start..i].iter().collect());
                    expect_head = false;
                }
            }
            _ => i += 1,
        }
    }
    heads
}

/// Every `crate::<name>` in the stripped source: (1-based line, name).
fn crate_refs(stripped: &str) -> Vec<(usize, String)> {
    let c: Vec<char> = stripped.chars().collect();
    let pat: Vec<char> = "crate::".chars().collect();
    let mut refs = vec![];
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        if c[i] == '\n' {
            line += 1;
        }
        let preceded = i > 0 && (is_ident(c[i - 1]) || c[i - 1] == '$');
        if !preceded && c[i..].starts_with(&pat) {
            let mut j = i + pat.len();
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            if j < c.len() && c[j] == '{' {
                for h in group_heads(&c[j..]) {
                    refs.push((line, h));
                }
            } else {
                let start = j;
                while j < c.len() && is_ident(c[j]) {
                    j += 1;
                }
                refs.push((line, c[start..j].iter().collect()));
            }
            i += pat.len();
            continue;
        }
        i += 1;
    }
    refs
}

/// Names re-exported at the crate root (`pub use module::{A, B}` in lib.rs) -> their module.
fn root_reexports() -> HashMap<String, String> {
    let lib = strip(&std::fs::read_to_string(src_dir().join("lib.rs")).unwrap());
    let mut map = HashMap::new();
    for stmt in lib.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim().trim_start_matches("crate::");
        let module: String = path.chars().take_while(|&ch| is_ident(ch)).collect();
        for name in path
            .split(|ch: char| !is_ident(ch))
            .filter(|n| !n.is_empty())
        {
            if name != "self" && name != "as" {
                map.entry(name.to_string())
                    .or_insert_with(|| module.clone());
            }
        }
    }
    map
}

#[test]
fn modules_only_use_lower_layers() {
    let mut files = vec![];
    rust_files(&src_dir(), &mut files);
    assert!(files.len() > 10, "found only {} source files", files.len());
    let reexports = root_reexports();
    let rank = |m: &str| ORDER.iter().position(|&o| o == m);
    let mut problems = vec![];
    for f in &files {
        let Some(own) = top_module(f) else { continue };
        let rel = f.strip_prefix(src_dir()).unwrap().display().to_string();
        let Some(own_rank) = rank(&own) else {
            problems.push(format!(
                "src/{rel}: module `{own}` is not in the layer order (add it to ARCHITECTURE.md and ORDER)"
            ));
            continue;
        };
        let stripped = strip(&std::fs::read_to_string(f).unwrap());
        for (line, name) in crate_refs(&stripped) {
            let target = if rank(&name).is_some() {
                name.clone()
            } else if let Some(m) = reexports.get(&name) {
                m.clone()
            } else {
                problems.push(format!(
                    "src/{rel}:{line}: `crate::{name}` is neither a module in the layer order nor a root re-export"
                ));
                continue;
            };
            if target == own {
                continue;
            }
            let allowed = if own == "classic" {
                CLASSIC_MAY_USE.contains(&target.as_str())
            } else {
                rank(&target).is_some_and(|r| r <= own_rank)
            };
            if !allowed {
                problems.push(format!(
                    "src/{rel}:{line}: `{own}` uses `crate::{name}` (module `{target}`), which is above it in the layer order"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering violations (order: {}):\n{}",
        ORDER.join(" < "),
        problems.join("\n")
    );
}

#[test]
fn no_source_file_exceeds_500_lines() {
    let mut files = vec![];
    rust_files(&src_dir(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "source files over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// The checker itself: comments, strings and `$crate` are not references; groups are.
#[test]
fn reference_scanner_sees_code_only() {
    let src = r##"
//! See [`crate::tasks`] and crate::train.
/// crate::data in a doc comment
use crate::{config::ModelConfig, ops::{lock, normal}};
/* crate::upcycle in /* a nested */ block comment */
let s = "crate::io in a string"; let r = r#"crate::models"#; let c = '"'; let l: &'a str;
let x = crate::losses::cross_entropy(a, b); // crate::block
macro_rules! m { () => { $crate::error::Error } }
"##;
    let refs = crate_refs(&strip(src));
    assert_eq!(
        refs,
        vec![
            (4, "config".to_string()),
            (4, "ops".to_string()),
            (7, "losses".to_string())
        ]
    );
}
