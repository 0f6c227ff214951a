//! Decoding `TensorProto`s (initializers, `Constant` values) into host tensors.
//!
//! Elements come from the typed repeated fields, from `raw_data` (little-endian), or from an
//! external file named by the `location` / `offset` / `length` entries of `external_data`. External
//! locations must be relative paths inside the model's directory (as the ONNX checker requires):
//! a model file never makes cleave read anything outside it.

use std::collections::HashMap;
use std::path::{Component, Path};

use cleave_ir::interp::{Tensor, TensorData};
use cleave_ir::DType;

use super::error::{OnnxError, Result};
use super::proto::{tensor_proto, TensorProto};

/// The most elements a tensor built at import time may have (initializers, folded constants).
/// Larger ones are rejected with an error instead of exhausting memory.
pub const MAX_CONST_ELEMENTS: usize = 1 << 28;

/// The largest number of elements of any static shape the importer accepts.
pub const MAX_ELEMENTS: usize = 1 << 40;

/// The cleave element type of an ONNX `TensorProto.DataType` code.
pub fn dtype_of(code: i32) -> Option<DType> {
    use tensor_proto::DataType as D;
    Some(match D::try_from(code).ok()? {
        D::Float => DType::F32,
        D::Double => DType::F64,
        D::Float16 => DType::F16,
        D::Bfloat16 => DType::BF16,
        D::Int8 => DType::I8,
        D::Int32 => DType::I32,
        D::Int64 => DType::I64,
        D::Bool => DType::Bool,
        _ => return None,
    })
}

/// The name of an ONNX data type code, for errors.
pub fn dtype_code_name(code: i32) -> String {
    tensor_proto::DataType::try_from(code)
        .map(|d| d.as_str_name().to_string())
        .unwrap_or_else(|_| format!("data type {code}"))
}

/// Checks that a shape is within the limits; returns its element count.
pub fn checked_numel(shape: &[usize], limit: usize) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= limit)
}

/// External data files, read once each.
#[derive(Default)]
pub struct ExternalFiles {
    base: Option<std::path::PathBuf>,
    files: HashMap<String, Vec<u8>>,
}

impl ExternalFiles {
    /// External data is resolved against `base` (the model's directory); `None` rejects it.
    pub fn new(base: Option<&Path>) -> Self {
        ExternalFiles {
            base: base.map(Path::to_path_buf),
            files: HashMap::new(),
        }
    }

    fn bytes(&mut self, tensor: &str, location: &str) -> Result<&[u8]> {
        let rel = Path::new(location);
        if location.is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(OnnxError::Model(format!(
                "tensor `{tensor}`: external data location `{location}` must be a relative path \
                 inside the model's directory"
            )));
        }
        let Some(base) = &self.base else {
            return Err(OnnxError::Model(format!(
                "tensor `{tensor}` is stored in external file `{location}`, but the model was \
                 not read from a file"
            )));
        };
        if !self.files.contains_key(location) {
            let path = base.join(rel);
            let data = std::fs::read(&path).map_err(|source| OnnxError::Io { path, source })?;
            self.files.insert(location.to_string(), data);
        }
        Ok(&self.files[location])
    }
}

fn bad(name: &str, message: impl std::fmt::Display) -> OnnxError {
    OnnxError::Model(format!("tensor `{name}`: {message}"))
}

/// Decodes a `TensorProto` into a host tensor.
pub fn decode_tensor(t: &TensorProto, external: &mut ExternalFiles) -> Result<Tensor> {
    let name = t.name.as_deref().unwrap_or("<unnamed>");
    let code = t.data_type.unwrap_or(0);
    let dtype = dtype_of(code).ok_or_else(|| {
        bad(
            name,
            format!("element type {} is not supported", dtype_code_name(code)),
        )
    })?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(name, format!("negative dimension {d}")));
        }
        shape.push(d as usize);
    }
    if shape.len() > cleave_ir::MAX_RANK {
        return Err(bad(
            name,
            format!(
                "rank {} exceeds the maximum {}",
                shape.len(),
                cleave_ir::MAX_RANK
            ),
        ));
    }
    let n = checked_numel(&shape, MAX_CONST_ELEMENTS).ok_or_else(|| {
        bad(
            name,
            format!("shape {shape:?} has more than {MAX_CONST_ELEMENTS} elements"),
        )
    })?;
    let external_loc = t.data_location == Some(tensor_proto::DataLocation::External as i32);
    let raw: Option<Vec<u8>> = if external_loc {
        Some(read_external(t, name, external)?)
    } else {
        t.raw_data.clone()
    };
    let data = match raw {
        Some(raw) => decode_raw(name, dtype, &raw, n)?,
        None => decode_typed(t, name, dtype, n)?,
    };
    Tensor::new(dtype, shape, data).map_err(|e| bad(name, e))
}

fn read_external(t: &TensorProto, name: &str, external: &mut ExternalFiles) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    for e in &t.external_data {
        let key = e.key.as_deref().unwrap_or("");
        let value = e.value.as_deref().unwrap_or("");
        let number = || {
            value.parse::<usize>().map_err(|_| {
                bad(
                    name,
                    format!("external data `{key}` is not a number: `{value}`"),
                )
            })
        };
        match key {
            "location" => location = Some(value.to_string()),
            "offset" => offset = number()?,
            "length" => length = Some(number()?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| bad(name, "external data without a `location` entry"))?;
    let bytes = external.bytes(name, &location)?;
    let end = match length {
        Some(len) => offset.checked_add(len),
        None => Some(bytes.len()),
    };
    match end {
        Some(end) if offset <= end && end <= bytes.len() => Ok(bytes[offset..end].to_vec()),
        _ => Err(bad(
            name,
            format!(
                "external data range offset {offset}, length {length:?} is outside `{location}` \
                 ({} bytes)",
                bytes.len()
            ),
        )),
    }
}

fn decode_raw(name: &str, dtype: DType, raw: &[u8], n: usize) -> Result<TensorData> {
    let size = dtype.size_bytes();
    if raw.len() != n * size {
        return Err(bad(
            name,
            format!(
                "raw data has {} bytes; {n} elements of {dtype} need {}",
                raw.len(),
                n * size
            ),
        ));
    }
    let chunks = raw.chunks_exact(size);
    Ok(match dtype {
        DType::F32 => TensorData::Float(
            chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        ),
        DType::F64 => TensorData::Float(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        DType::F16 => TensorData::Float(
            chunks
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        ),
        DType::BF16 => TensorData::Float(
            chunks
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        ),
        DType::I8 => TensorData::Int(chunks.map(|c| c[0] as i8 as i64).collect()),
        DType::I32 => TensorData::Int(
            chunks
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        DType::I64 => TensorData::Int(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        DType::Bool => TensorData::Bool(chunks.map(|c| c[0] != 0).collect()),
    })
}

fn decode_typed(t: &TensorProto, name: &str, dtype: DType, n: usize) -> Result<TensorData> {
    let count = |len: usize, field: &str| {
        if len == n {
            Ok(())
        } else {
            Err(bad(
                name,
                format!("`{field}` has {len} elements; the shape needs {n}"),
            ))
        }
    };
    Ok(match dtype {
        DType::F32 => {
            count(t.float_data.len(), "float_data")?;
            TensorData::Float(t.float_data.iter().map(|&x| x as f64).collect())
        }
        DType::F64 => {
            count(t.double_data.len(), "double_data")?;
            TensorData::Float(t.double_data.clone())
        }
        DType::F16 | DType::BF16 => {
            count(t.int32_data.len(), "int32_data")?;
            TensorData::Float(
                t.int32_data
                    .iter()
                    .map(|&bits| {
                        let bits = bits as u16;
                        if dtype == DType::F16 {
                            half::f16::from_bits(bits).to_f64()
                        } else {
                            half::bf16::from_bits(bits).to_f64()
                        }
                    })
                    .collect(),
            )
        }
        DType::I8 | DType::I32 => {
            // ONNX keeps int8 elements widened in `int32_data`.
            count(t.int32_data.len(), "int32_data")?;
            TensorData::Int(t.int32_data.iter().map(|&x| x as i64).collect())
        }
        DType::I64 => {
            count(t.int64_data.len(), "int64_data")?;
            TensorData::Int(t.int64_data.clone())
        }
        DType::Bool => {
            count(t.int32_data.len(), "int32_data")?;
            TensorData::Bool(t.int32_data.iter().map(|&x| x != 0).collect())
        }
    })
}
