//! The checked VarBuilder backend: safetensors whose every tensor is checked against the
//! headers ([`read_header`]) before it is read, with a log of what was loaded and the
//! first structured error, so a build over it fails with a precise [`Error`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use super::hf::layout::{self, FusedMap, Slice, Source};
use super::safetensors::{read_header, HeaderEntry};
use crate::error::{CheckpointErrorKind, Error, Result};
use crate::io::hub::LoadOptions;
use crate::ops::lock;

/// What a loading backend recorded: every tensor it handed out under its stored name (the
/// model's parameters, for saving), and the first structured error.
#[derive(Debug, Default)]
pub(crate) struct LoadLog {
    /// `(stored name, tensor)` in request order.
    pub loaded: Vec<(String, Tensor)>,
    /// The first problem found, with its kind.
    pub error: Option<Error>,
    /// Stored tensors read to serve other names (fused experts sliced per expert).
    pub consumed: std::collections::HashSet<String>,
}

/// Shared handle on a [`LoadLog`].
pub(crate) type SharedLog = Arc<Mutex<LoadLog>>;

/// A VarBuilder backend over safetensors files (each tensor read with one positioned read, no
/// memory map) that checks every tensor against the headers before reading it (so a config that disagrees with the weights allocates nothing),
/// names the file and tensor in its errors, and records what it loaded. With a `VarMap` every
/// tensor becomes a trainable variable registered under its stored name.
struct Checked {
    headers: HashMap<String, HeaderEntry>,
    files: PathBuf,
    varmap: Option<VarMap>,
    log: SharedLog,
    /// Per-expert names served as slices of fused tensors, and aliases.
    fused: FusedMap,
    /// Fused tensors read so far, with the number of slices still to serve from each.
    cache: Mutex<HashMap<String, (Tensor, usize)>>,
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
            if let Some(stored) = self.fused.aliases.get(name) {
                return self.load(stored, want, dtype, dev);
            }
            if let Some(s) = self.fused.slices.get(name) {
                return self.load_slice(name, s, want, dtype, dev);
            }
            return Err(self.fail(Error::tensor(
                &self.files,
                name,
                CheckpointErrorKind::Missing,
                format!("missing tensor `{name}`"),
            )));
        };
        let t = if h.dtype == "F8_E4M3" {
            self.load_fp8(name, h, want, dev)?.to_dtype(dtype)?
        } else {
            self.load_float(name, h, want, dev)?.to_dtype(dtype)?
        };
        self.register(name, t)
    }

    /// The error for a tensor whose stored shape is not `want`.
    fn check_shape(
        &self,
        name: &str,
        h: &HeaderEntry,
        want: Option<&[usize]>,
    ) -> candle_core::Result<()> {
        match want {
            Some(want) if h.shape != want => Err(self.fail(Error::tensor(
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
            ))),
            _ => Ok(()),
        }
    }

    /// A float tensor, checked and read as stored.
    fn load_float(
        &self,
        name: &str,
        h: &HeaderEntry,
        want: Option<&[usize]>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
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
        self.check_shape(name, h, want)?;
        read_tensor(h, dev).map_err(|e| {
            self.fail(Error::tensor(
                &h.file,
                name,
                CheckpointErrorKind::Corrupt,
                format!("tensor `{name}`: {e}"),
            ))
        })
    }

    /// An FP8 e4m3 weight dequantised with its `<name>_scale_inv` block scales (which are
    /// recorded as used); a weight without its scale is an error naming both.
    fn load_fp8(
        &self,
        name: &str,
        h: &HeaderEntry,
        want: Option<&[usize]>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.check_shape(name, h, want)?;
        let scale_name = format!("{name}_scale_inv");
        let Some(sh) = self.headers.get(&scale_name) else {
            return Err(self.fail(Error::tensor(
                &h.file,
                name,
                CheckpointErrorKind::Missing,
                format!("FP8 tensor `{name}` has no block scales `{scale_name}`"),
            )));
        };
        let scale = self
            .load_float(&scale_name, sh, None, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q = read_bytes(h).map_err(|e| {
            self.fail(Error::tensor(
                &h.file,
                name,
                CheckpointErrorKind::Corrupt,
                format!("tensor `{name}`: {e}"),
            ))
        })?;
        let w = crate::io::quant::fp8::dequantize(name, &h.file, &q, &h.shape, &scale, &sh.shape)
            .map_err(|e| self.fail(e))?;
        lock(&self.log)
            .loaded
            .push((scale_name, Tensor::zeros(0, DType::F32, &Device::Cpu)?));
        Tensor::from_vec(w, h.shape.as_slice(), &Device::Cpu)?.to_device(dev)
    }

    /// Makes `t` a variable registered as `name` when training, and logs it.
    fn register(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let t = match &self.varmap {
            // DeepSeek-V3's `e_score_correction_bias` is a variable too: AdamW skips it, the
            // trainer's bias update (`TrainConfig::bias_update_rate`) moves it.
            Some(vm) => {
                let var = candle_core::Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                lock(vm.data()).insert(name.to_string(), var);
                t
            }
            _ => t,
        };
        lock(&self.log).loaded.push((name.to_string(), t.clone()));
        Ok(t)
    }

    /// Serves per-expert tensor `name` as slice `s` of a fused tensor (read once, cached until
    /// its last slice is served).
    fn load_slice(
        &self,
        name: &str,
        s: &Slice,
        want: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let key = s.source.key().to_string();
        let full = self.fused_tensor(&s.source, dtype, dev)?;
        let t = layout::slice(&full, s)?;
        if let Some(want) = want {
            if t.dims() != want {
                return Err(self.fail(Error::tensor(
                    &self.files,
                    key.as_str(),
                    CheckpointErrorKind::Shape {
                        expected: want.to_vec(),
                        found: t.dims().to_vec(),
                    },
                    format!(
                        "`{name}` sliced from fused tensor `{key}` has shape {:?}, the config expects {want:?}",
                        t.dims()
                    ),
                )));
            }
        }
        lock(&self.log).consumed.extend(s.source.names());
        self.register(name, t)
    }

    /// The whole fused tensor of `src` in `dtype` on `dev`: from the cache, or read (MXFP4
    /// dequantised) and cached for its remaining slices.
    fn fused_tensor(
        &self,
        src: &Source,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let key = src.key().to_string();
        let mut cache = lock(&self.cache);
        if let Some((t, left)) = cache.get_mut(&key) {
            let t = t.clone();
            *left = left.saturating_sub(1);
            if *left == 0 {
                cache.remove(&key);
            }
            return Ok(t);
        }
        let t = match self.read_source(src, dev) {
            Ok(t) => t.to_dtype(dtype)?,
            Err(e) => return Err(self.fail(e)),
        };
        let uses = self.fused.uses.get(&key).copied().unwrap_or(1);
        if uses > 1 {
            cache.insert(key, (t.clone(), uses - 1));
        }
        Ok(t)
    }

    /// Reads a fused source from disk.
    fn read_source(&self, src: &Source, dev: &Device) -> Result<Tensor> {
        let entry = |n: &str| {
            self.headers.get(n).ok_or_else(|| {
                Error::tensor(
                    &self.files,
                    n,
                    CheckpointErrorKind::Missing,
                    format!("missing tensor `{n}`"),
                )
            })
        };
        let corrupt = |h: &HeaderEntry, n: &str, e: String| {
            Error::tensor(
                &h.file,
                n,
                CheckpointErrorKind::Corrupt,
                format!("tensor `{n}`: {e}"),
            )
        };
        match src {
            Source::Plain(n) => {
                let h = entry(n)?;
                if !matches!(h.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
                    return Err(Error::tensor(
                        &h.file,
                        n.as_str(),
                        CheckpointErrorKind::Dtype {
                            expected: "a float dtype".into(),
                            found: h.dtype.clone(),
                        },
                        format!(
                            "fused tensor `{n}` has dtype {}, expected a float dtype",
                            h.dtype
                        ),
                    ));
                }
                read_tensor(h, dev).map_err(|e| corrupt(h, n, e.to_string()))
            }
            Source::Mxfp4 { blocks, scales } => {
                let (hb, hs) = (entry(blocks)?, entry(scales)?);
                let b = read_bytes(hb).map_err(|e| corrupt(hb, blocks, e.to_string()))?;
                let s = read_bytes(hs).map_err(|e| corrupt(hs, scales, e.to_string()))?;
                let v = super::quant::mxfp4::dequantize(&b, &hb.shape, &s)
                    .map_err(|e| corrupt(hb, blocks, e))?;
                let (e, r, g) = (hb.shape[0], hb.shape[1], hb.shape[2]);
                Tensor::from_vec(v, (e, 32 * g, r), &Device::Cpu)
                    .and_then(|t| t.to_device(dev))
                    .map_err(|e| corrupt(hb, blocks, e.to_string()))
            }
        }
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
    var_builder_mapped(files, opts, varmap, |_, _| Ok(FusedMap::default()))
}

/// [`var_builder`] that also serves the names `map` finds for the headers (fused experts
/// sliced per expert, aliases); `map` gets the headers and the first file (for errors).
pub(crate) fn var_builder_mapped(
    files: &[PathBuf],
    opts: &LoadOptions,
    varmap: Option<VarMap>,
    map: impl FnOnce(&HashMap<String, HeaderEntry>, &Path) -> Result<FusedMap>,
) -> Result<(VarBuilder<'static>, SharedLog, Vec<String>)> {
    let mut headers: HashMap<String, HeaderEntry> = HashMap::new();
    for f in files {
        for (name, h) in read_header(f)? {
            if let Some(prev) = headers.get(&name) {
                return Err(Error::tensor(
                    f,
                    name.as_str(),
                    CheckpointErrorKind::Corrupt,
                    format!(
                        "tensor `{name}` is stored twice, in {} and in {}",
                        prev.file.display(),
                        f.display()
                    ),
                ));
            }
            headers.insert(name, h);
        }
    }
    let first = files.first().cloned().unwrap_or_default();
    let fused = map(&headers, &first)?;
    let mut names: Vec<String> = headers.keys().cloned().collect();
    names.sort();
    let log = SharedLog::default();
    let backend: Box<dyn SimpleBackend> = Box::new(Checked {
        headers,
        files: first,
        varmap,
        log: log.clone(),
        fused,
        cache: Mutex::new(HashMap::new()),
    });
    let vb = VarBuilder::from_backend(backend, opts.dtype, opts.device.clone());
    Ok((vb, log, names))
}

/// Reads one tensor's bytes with a positioned read (no memory map: the file's pages are not
/// kept resident next to the loaded copy) and makes the tensor on `dev`.
fn read_tensor(h: &HeaderEntry, dev: &Device) -> candle_core::Result<Tensor> {
    let dt = match h.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        other => candle_core::bail!("unsupported dtype {other}"),
    };
    let buf = read_bytes(h)?;
    Tensor::from_raw_buffer(&buf, dt, &h.shape, &Device::Cpu)?.to_device(dev)
}

/// A tensor's raw bytes, with one positioned read.
pub(crate) fn read_bytes(h: &HeaderEntry) -> candle_core::Result<Vec<u8>> {
    let len = usize::try_from(h.len).map_err(candle_core::Error::wrap)?;
    let mut buf = vec![0u8; len];
    let f = std::fs::File::open(&h.file)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut buf, h.offset)?;
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = f;
        f.seek(SeekFrom::Start(h.offset))?;
        f.read_exact(&mut buf)?;
    }
    Ok(buf)
}

/// Checks that every tensor of the checkpoint was used by the model (a config that disagrees
/// with the weights, e.g. fewer experts than stored, is an error, not a silent drop).
pub(crate) fn check_unused(log: &SharedLog, names: &[String], path: &Path) -> Result<()> {
    let used: std::collections::HashSet<String> = {
        let log = lock(log);
        log.loaded
            .iter()
            .map(|(n, _)| n.clone())
            .chain(log.consumed.iter().cloned())
            .collect()
    };
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
