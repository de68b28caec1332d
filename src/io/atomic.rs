//! Atomic writes: one file (temporary name, fsync, rename) or a whole directory (a fresh
//! temporary directory, fsynced, swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux), so
//! that a failure or a kill at any point leaves the old version or the new one, complete.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Entries a checkpoint directory's new version replaces (everything else is carried over).
fn is_checkpoint_entry(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".json") || name == "trainer"
}

/// Fsyncs a directory (so a rename in it is durable).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); `false` where unsupported.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> bool {
    false
}

/// Removes temporaries of `name` left by processes that no longer run (a save killed midway),
/// so they do not pile up; another live process's temporary is left alone (Linux only).
fn remove_stale_temporaries(parent: &Path, name: &str) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The directory's own entries to carry into its new version: files that are not checkpoint
/// files (a plot, notes); a foreign sub-directory is refused, never deleted.
fn entries_to_carry(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
    let mut carry = vec![];
    if !dir.exists() {
        return Ok(carry);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if is_checkpoint_entry(&n) || files.iter().any(|(f, _)| *f == n) {
            continue;
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(true) {
            return Err(Error::io(
                dir.join(&n),
                std::io::Error::other(
                    "a directory that is not part of a checkpoint: save into an empty or checkpoint directory",
                ),
            ));
        }
        carry.push(n);
    }
    Ok(carry)
}

/// Writes `files` (and hard links to `carry` from `dir`) into the new directory `tmp`, every
/// file and directory fsynced.
fn write_tmp(
    tmp: &Path,
    dir: &Path,
    files: &[(String, Vec<u8>)],
    carry: &[String],
    fail_after: Option<usize>,
) -> std::io::Result<()> {
    std::fs::create_dir(tmp)?;
    for (i, (f, bytes)) in files.iter().enumerate() {
        if fail_after == Some(i) {
            return Err(std::io::Error::other("injected failure"));
        }
        let target = tmp.join(f);
        if let Some(sub) = target.parent() {
            std::fs::create_dir_all(sub)?;
        }
        let mut fh = std::fs::File::create(&target)?;
        fh.write_all(bytes)?;
        fh.sync_all()?;
    }
    for n in carry {
        if std::fs::hard_link(dir.join(n), tmp.join(n)).is_err() {
            std::fs::copy(dir.join(n), tmp.join(n))?;
        }
    }
    for sub in files
        .iter()
        .filter_map(|(f, _)| f.rsplit_once('/').map(|p| p.0))
    {
        sync_dir(&tmp.join(sub))?;
    }
    sync_dir(tmp)
}

/// Puts `tmp` in place of `dir`: one atomic exchange on Linux when `dir` exists (then `tmp`
/// holds the old contents), a rename when it does not.
fn swap_in(tmp: &Path, dir: &Path, parent: &Path, name: &str) -> std::io::Result<()> {
    if !dir.exists() {
        return std::fs::rename(tmp, dir);
    }
    if exchange(tmp, dir) {
        return Ok(());
    }
    // Non-Linux fallback: two renames (a short window without `dir`).
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    std::fs::rename(dir, &old)?;
    std::fs::rename(tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes a whole directory atomically: every file into a fresh temporary directory beside it
/// (unique per process and call), fsynced, then swapped in with one atomic exchange (Linux) or
/// renames, so that after a failure or a kill at any point `dir` holds either the old contents
/// or the new ones, complete. No temporary is left behind on an error path; temporaries of
/// killed saves are removed by the next save. Files of the directory that are not checkpoint
/// files are carried over. `files` are `(relative path, bytes)`; a path may have one
/// sub-directory (`trainer/...`).
pub(crate) fn write_dir_atomic(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    fail_after: Option<usize>,
) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .ok_or_else(|| Error::io(dir, std::io::Error::other("not a directory name")))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(dir, e))?;
    let carry = entries_to_carry(dir, files)?;
    remove_stale_temporaries(&parent, &name);
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let tmp = parent.join(unique);
    if let Err(e) = write_tmp(&tmp, dir, files, &carry, fail_after) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    let swapped = swap_in(&tmp, dir, &parent, &name);
    // After an exchange `tmp` holds the old contents; after a failure, the new ones.
    let _ = std::fs::remove_dir_all(&tmp);
    swapped.map_err(|e| Error::io(dir, e))?;
    sync_dir(&parent).map_err(|e| Error::io(&parent, e))
}
