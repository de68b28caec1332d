//! Safetensors files: a checked header reader, a memory-mapped VarBuilder backend that checks
//! every tensor against the headers, parsing and serialising named tensors, and atomic writes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

use crate::error::{CheckpointErrorKind, Error, Result};
use crate::io::hub::LoadOptions;
use crate::ops::lock;

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

/// Writes a whole directory atomically: every file into a fresh temporary directory beside it
/// (unique per process and call), fsynced, then swapped in with one atomic exchange (Linux) or
/// renames, so that after a failure or a kill at any point `dir` holds either the old contents
/// or the new ones, complete. No temporary is left behind on an error path.
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

/// `files` are `(relative path, bytes)`; a path may have one sub-directory (`trainer/...`).
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
    // Files of the directory's own that are not checkpoint files (a plot, notes) are carried
    // into the new directory as hard links; a foreign sub-directory is refused, never deleted.
    let mut carry = vec![];
    if dir.exists() {
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
    }
    remove_stale_temporaries(&parent, &name);
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let tmp = parent.join(unique);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir(&tmp)?;
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
        for n in &carry {
            if std::fs::hard_link(dir.join(n), tmp.join(n)).is_err() {
                std::fs::copy(dir.join(n), tmp.join(n))?;
            }
        }
        if files.iter().any(|(f, _)| f.contains('/')) {
            for sub in files
                .iter()
                .filter_map(|(f, _)| f.rsplit_once('/').map(|p| p.0))
            {
                sync_dir(&tmp.join(sub))?;
            }
        }
        sync_dir(&tmp)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    let swapped = if dir.exists() {
        if exchange(&tmp, dir) {
            Ok(())
        } else {
            // Non-Linux fallback: two renames (a short window without `dir`).
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old)
                .and_then(|_| std::fs::rename(&tmp, dir))
                .map(|_| {
                    let _ = std::fs::remove_dir_all(&old);
                })
        }
    } else {
        std::fs::rename(&tmp, dir)
    };
    // After an exchange `tmp` holds the old contents; after a failure, the new ones.
    let _ = std::fs::remove_dir_all(&tmp);
    swapped.map_err(|e| Error::io(dir, e))?;
    sync_dir(&parent).map_err(|e| Error::io(&parent, e))
}

/// Serialises named tensors to safetensors bytes (sorted by name).
pub fn to_safetensors_bytes(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(&String, &Tensor)> = names.into_iter().map(|n| (n, &tensors[n])).collect();
    safetensors::serialize(data, None)
        .map_err(|e| Error::checkpoint(path, format!("serialising: {e}")))
}

/// The variables of a `VarMap` as a name -> tensor map.
pub fn varmap_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = lock(varmap.data());
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

/// Sets `var` from `t` after checking the shape; the error names `what` (the tensor) and `path`.
pub fn set_checked(var: &candle_core::Var, t: &Tensor, what: &str, path: &Path) -> Result<()> {
    if t.dims() != var.dims() {
        return Err(Error::tensor(
            path,
            what,
            CheckpointErrorKind::Shape {
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            },
            format!(
                "tensor `{what}` has shape {:?}, expected {:?} from the config",
                t.dims(),
                var.dims()
            ),
        ));
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// Reads a whole file, naming it on error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

/// Parses safetensors bytes into tensors on `device`, converting floats to `dtype`, with errors
/// naming `path` and the tensor. Non-float tensors are kept as they are.
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dt = st_dtype(view.dtype()).ok_or_else(|| {
            Error::tensor(
                path,
                &name,
                CheckpointErrorKind::Dtype {
                    expected: "f32, f16, bf16, f64, u8, u32 or i64".into(),
                    found: format!("{:?}", view.dtype()),
                },
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu)
            .map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))?;
        let t = if dt.is_float() { t.to_dtype(dtype)? } else { t };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// Fills every variable of `varmap` from `tensors` (read from `path`), checking presence,
/// shape and float dtype; unexpected extra tensors are an error too (the config disagrees with
/// the weights).
pub fn fill_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let data = lock(varmap.data());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = tensors.get(name).ok_or_else(|| {
            Error::tensor(
                path,
                name,
                CheckpointErrorKind::Missing,
                format!("missing tensor `{name}` (expected shape {:?})", var.dims()),
            )
        })?;
        if !t.dtype().is_float() {
            return Err(Error::tensor(
                path,
                name,
                CheckpointErrorKind::Dtype {
                    expected: "a float dtype".into(),
                    found: format!("{:?}", t.dtype()),
                },
                format!(
                    "tensor `{name}` has dtype {:?}, expected a float dtype",
                    t.dtype()
                ),
            ));
        }
        set_checked(var, t, name, path)?;
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
    extra.sort();
    if let Some(x) = extra.first() {
        return Err(Error::tensor(
            path,
            x.as_str(),
            CheckpointErrorKind::Unexpected,
            format!(
                "unexpected tensor `{x}` ({} unexpected in all): the config does not match the weights",
                extra.len()
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub(crate) struct HeaderEntry {
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
}

/// Reads a safetensors header (without the tensor data) and checks that the file is long
/// enough for every tensor it declares.
pub(crate) fn read_header(path: &Path) -> Result<HashMap<String, HeaderEntry>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::checkpoint(path, "truncated: shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > size {
        return Err(Error::checkpoint(
            path,
            format!("corrupt or truncated: header of {n} bytes in a file of {size}"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_slice(&buf).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a valid safetensors file: corrupt header: {e}"),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        Error::checkpoint(
            path,
            "not a valid safetensors file: corrupt header: not a JSON object",
        )
    })?;
    let mut out = HashMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |m: &str| Error::checkpoint(path, format!("tensor `{name}`: {m}"));
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no dtype"))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|u| u as usize)
                    .ok_or_else(|| bad("bad shape"))
            })
            .collect::<Result<_>>()?;
        let end = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad("no data_offsets"))?;
        if 8 + n + end > size {
            return Err(bad(&format!(
                "data ends at byte {} but the file has {size}: truncated",
                8 + n + end
            )));
        }
        out.insert(
            name.clone(),
            HeaderEntry {
                file: path.to_path_buf(),
                dtype: dtype.to_string(),
                shape,
            },
        );
    }
    Ok(out)
}

/// What a loading backend recorded: every tensor it handed out under its stored name (the
/// model's parameters, for saving), and the first structured error.
#[derive(Debug, Default)]
pub(crate) struct LoadLog {
    /// `(stored name, tensor)` in request order.
    pub loaded: Vec<(String, Tensor)>,
    /// The first problem found, with its kind.
    pub error: Option<Error>,
}

/// Shared handle on a [`LoadLog`].
pub(crate) type SharedLog = Arc<Mutex<LoadLog>>;

/// A VarBuilder backend over memory-mapped safetensors that checks every tensor against the
/// headers before reading it (so a config that disagrees with the weights allocates nothing),
/// names the file and tensor in its errors, and records what it loaded. With a `VarMap` every
/// tensor becomes a trainable variable registered under its stored name.
struct Checked {
    st: candle_core::safetensors::MmapedSafetensors,
    headers: HashMap<String, HeaderEntry>,
    files: PathBuf,
    varmap: Option<VarMap>,
    log: SharedLog,
}

impl Checked {
    fn fail(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        lock(&self.log).error.get_or_insert(e);
        candle_core::Error::Msg(msg)
    }

    fn load(
        &self,
        name: &str,
        want: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(h) = self.headers.get(name) else {
            return Err(self.fail(Error::tensor(
                &self.files,
                name,
                CheckpointErrorKind::Missing,
                format!("missing tensor `{name}`"),
            )));
        };
        if !matches!(h.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            return Err(self.fail(Error::tensor(
                &h.file,
                name,
                CheckpointErrorKind::Dtype {
                    expected: "a float dtype".into(),
                    found: h.dtype.clone(),
                },
                format!(
                    "tensor `{name}` has dtype {}, expected a float dtype",
                    h.dtype
                ),
            )));
        }
        if let Some(want) = want {
            if h.shape != want {
                return Err(self.fail(Error::tensor(
                    &h.file,
                    name,
                    CheckpointErrorKind::Shape {
                        expected: want.to_vec(),
                        found: h.shape.clone(),
                    },
                    format!(
                        "tensor `{name}` has shape {:?}, the config expects {:?}",
                        h.shape, want
                    ),
                )));
            }
        }
        let t = match self.st.load(name, dev) {
            Ok(t) => t.to_dtype(dtype)?,
            Err(e) => {
                return Err(self.fail(Error::tensor(
                    &h.file,
                    name,
                    CheckpointErrorKind::Corrupt,
                    format!("tensor `{name}`: {e}"),
                )))
            }
        };
        let t = match &self.varmap {
            Some(vm) => {
                let var = candle_core::Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                lock(vm.data()).insert(name.to_string(), var);
                t
            }
            None => t,
        };
        lock(&self.log).loaded.push((name.to_string(), t.clone()));
        Ok(t)
    }
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(s.dims()), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.headers.contains_key(name)
    }
}

/// A checked VarBuilder over `files` (tensor names as stored); with `varmap`, every tensor it
/// hands out is a trainable variable registered there. Returns the builder, the log of what it
/// loaded, and the stored tensor names.
pub(crate) fn var_builder(
    files: &[PathBuf],
    opts: &LoadOptions,
    varmap: Option<VarMap>,
) -> Result<(VarBuilder<'static>, SharedLog, Vec<String>)> {
    let mut headers = HashMap::new();
    for f in files {
        headers.extend(read_header(f)?);
    }
    let first = files.first().cloned().unwrap_or_default();
    // SAFETY: the files are memory-mapped read-only; as with every mmap-based loader (candle's
    // own `from_mmaped_safetensors`), they must not be modified while the model is alive.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| Error::checkpoint(&first, format!("cannot map: {e}")))?;
    let mut names: Vec<String> = headers.keys().cloned().collect();
    names.sort();
    let log = SharedLog::default();
    let backend: Box<dyn SimpleBackend> = Box::new(Checked {
        st,
        headers,
        files: first,
        varmap,
        log: log.clone(),
    });
    let vb = VarBuilder::from_backend(backend, opts.dtype, opts.device.clone());
    Ok((vb, log, names))
}

/// Checks that every tensor of the checkpoint was used by the model (a config that disagrees
/// with the weights, e.g. fewer experts than stored, is an error, not a silent drop).
pub(crate) fn check_unused(log: &SharedLog, names: &[String], path: &Path) -> Result<()> {
    let used: std::collections::HashSet<String> =
        lock(log).loaded.iter().map(|(n, _)| n.clone()).collect();
    let extra: Vec<&String> = names
        .iter()
        .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    match extra.first() {
        None => Ok(()),
        Some(x) => Err(Error::tensor(
            path,
            x.as_str(),
            CheckpointErrorKind::Unexpected,
            format!(
                "unexpected tensor `{x}` ({} unused in all): the config does not match the weights",
                extra.len()
            ),
        )),
    }
}

/// The error a model build over a [`var_builder`] failed with: the structured one the backend
/// recorded, or the build's own (a config problem the weights did not cause).
pub(crate) fn build_error(log: &SharedLog, e: candle_core::Error, path: &Path) -> Error {
    match lock(log).error.take() {
        Some(err) => err,
        None => Error::checkpoint(path, e.to_string()),
    }
}
