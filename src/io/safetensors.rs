//! Safetensors files: a checked header reader, parsing and serialising named tensors. The
//! VarBuilder backend that checks every tensor against the headers lives in `io::backend` and
//! is re-exported here; atomic writes are in `io::atomic`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::Value;

use crate::error::{CheckpointErrorKind, Error, Result};
use crate::ops::lock;

pub(crate) use super::backend::{build_error, check_unused, var_builder, SharedLog};

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

/// Reads a whole weights file, naming it on error; only a regular file (links followed) is
/// read: a device such as `/dev/zero` or a FIFO is refused before it is opened.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    regular_weights(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Checks, without opening it, that a weights file is a regular file (links followed); returns
/// its size.
fn regular_weights(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::checkpoint(
            path,
            "not a regular file (a directory, device, FIFO or socket): refused",
        ));
    }
    Ok(meta.len())
}

/// Bits per element of a safetensors dtype name (`None` for an unknown one).
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "E8M0" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" | "C64" => 64,
        _ => return None,
    })
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
    pub(crate) file: PathBuf,
    pub(crate) dtype: String,
    pub(crate) shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub(crate) offset: u64,
    /// Byte length of the data.
    pub(crate) len: u64,
}

/// The largest safetensors header the reader accepts (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Reads a safetensors header (without the tensor data) and checks it against the file: a
/// regular file (links followed, checked before opening), a header within the file, and for
/// every tensor `start <= end`, its data inside the file (overflow-checked) and a byte length of
/// exactly `elem_count × dtype size` (overflow-checked).
pub(crate) fn read_header(path: &Path) -> Result<HashMap<String, HeaderEntry>> {
    regular_weights(path)?;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::checkpoint(path, "not a regular file: refused"));
    }
    let size = meta.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::checkpoint(path, "truncated: shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    let data_start = n.checked_add(8).filter(|&e| n <= MAX_HEADER && e <= size);
    let Some(data_start) = data_start else {
        return Err(Error::checkpoint(
            path,
            format!("corrupt or truncated: header of {n} bytes in a file of {size}"),
        ));
    };
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
    let file = FileSpan {
        path,
        data_start,
        size,
    };
    let mut out = HashMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        out.insert(name.clone(), header_entry(&file, name, info)?);
    }
    Ok(out)
}

/// Where a safetensors file's tensor data lies: from byte `data_start` to the file's `size`.
struct FileSpan<'a> {
    path: &'a Path,
    data_start: u64,
    size: u64,
}

/// Parses and checks one tensor's header entry `info` (dtype, shape, data offsets) against the
/// file.
fn header_entry(file: &FileSpan, name: &str, info: &Value) -> Result<HeaderEntry> {
    let bad = |m: &str| Error::checkpoint(file.path, format!("tensor `{name}`: {m}"));
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
                .and_then(|u| usize::try_from(u).ok())
                .ok_or_else(|| bad("bad shape"))
        })
        .collect::<Result<_>>()?;
    let offsets: Vec<u64> = info
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .and_then(|o| o.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad("no data_offsets (two non-negative integers)"))?;
    let (start, end) = (offsets[0], offsets[1]);
    let size = file.size;
    if start > end {
        return Err(bad(&format!(
            "corrupt header: data_offsets start {start} is after end {end}"
        )));
    }
    match file.data_start.checked_add(end) {
        Some(stop) if stop <= size => {}
        Some(stop) => {
            return Err(bad(&format!(
                "data ends at byte {stop} but the file has {size}: truncated"
            )))
        }
        None => {
            return Err(bad(&format!(
                "corrupt header: data_offsets end {end} overflows (file of {size} bytes): truncated or corrupt"
            )))
        }
    }
    let bits = dtype_bits(dtype).ok_or_else(|| bad(&format!("unknown dtype `{dtype}`")))?;
    let want = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|elems| elems.checked_mul(bits))
        .map(|b| b.div_ceil(8));
    let Some(want) = want else {
        return Err(bad(&format!(
            "corrupt header: shape {shape:?} of {dtype} overflows"
        )));
    };
    if end - start != want {
        return Err(bad(&format!(
            "corrupt header: data_offsets [{start}, {end}] hold {} bytes, but shape {shape:?} of {dtype} needs {want}",
            end - start
        )));
    }
    Ok(HeaderEntry {
        file: file.path.to_path_buf(),
        dtype: dtype.to_string(),
        shape,
        offset: file.data_start + start,
        len: want,
    })
}
