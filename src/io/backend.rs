//! The checked VarBuilder backend: safetensors whose every tensor is checked against the
//! headers ([`read_header`]) before it is read, with a log of what was loaded and the
//! first structured error, so a build over it fails with a precise [`Error`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

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
        let t = if h.dtype == "F8_E4M3" {
            self.load_fp8(name, h, want, dev)?.to_dtype(dtype)?
        } else {
            self.load_float(name, h, want, dev)?.to_dtype(dtype)?
        };
        // Buffers (DeepSeek-V3's `e_score_correction_bias`) are never trainable variables.
        let buffer = name.ends_with("e_score_correction_bias");
        let t = match &self.varmap {
            Some(vm) if !buffer => {
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
    let mut names: Vec<String> = headers.keys().cloned().collect();
    names.sort();
    let log = SharedLog::default();
    let backend: Box<dyn SimpleBackend> = Box::new(Checked {
        headers,
        files: first,
        varmap,
        log: log.clone(),
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

/// One tensor's stored bytes, with a positioned read.
fn read_bytes(h: &HeaderEntry) -> candle_core::Result<Vec<u8>> {
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
