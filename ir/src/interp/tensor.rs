//! Host tensors: the interpreter's values, with conversions to and from little-endian bytes.

use half::{bf16, f16};

use super::InterpError;
use crate::types::{fmt_shape, DType, TensorType};

/// The elements of a [`Tensor`], row-major.
///
/// Float tensors of every float dtype store `f64`s, int tensors of both int dtypes store `i64`s.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Elements of a float tensor.
    Float(Vec<f64>),
    /// Elements of an integer tensor.
    Int(Vec<i64>),
    /// Elements of a boolean tensor.
    Bool(Vec<bool>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Float(v) => v.len(),
            TensorData::Int(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this kind of storage is the one `dtype` uses.
    pub fn fits(&self, dtype: DType) -> bool {
        match self {
            TensorData::Float(_) => dtype.is_float(),
            TensorData::Int(_) => dtype.is_int(),
            TensorData::Bool(_) => dtype == DType::Bool,
        }
    }
}

/// A dense row-major tensor on the host.
///
/// Invariants (kept by every constructor and by the interpreter): `data` is the storage kind of
/// `dtype` with exactly `numel(shape)` elements; float elements are exactly representable in
/// `dtype` (see [`round_to_dtype`]); `i32` elements are in `i32` range.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Extents, outermost first.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: TensorData,
}

/// Rounds `x` to the nearest value of a binary float format with `frac_bits` fraction bits,
/// smallest normal exponent `emin` and largest finite value `max` (ties to even, overflow to
/// infinity, gradual underflow).
fn round_to_format(x: f64, frac_bits: i32, emin: i32, max: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    let e = (biased - 1023).max(emin);
    // The spacing of representable values around x; x / quantum and the product are exact.
    let quantum = 2f64.powi(e - frac_bits);
    let r = (x / quantum).round_ties_even() * quantum;
    if r.abs() > max {
        f64::INFINITY.copysign(x)
    } else {
        r
    }
}

/// Rounds a value to the nearest value of a float `dtype` (round to nearest, ties to even,
/// correctly rounded from f64). Non-float dtypes and `f64` return `x` unchanged.
///
/// `half`'s own `f64` conversions are not used for rounding: they ignore the low 32 bits of the
/// f64 when breaking ties (and on x86 go through f32), so they are not always correctly rounded.
pub fn round_to_dtype(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F16 => round_to_format(x, 10, -14, 65504.0),
        DType::BF16 => round_to_format(x, 7, -126, bf16::MAX.to_f64()),
        _ => x,
    }
}

/// Wraps an integer to the range of an int `dtype` (two's complement for `i8` and `i32`).
pub fn wrap_to_dtype(x: i64, dtype: DType) -> i64 {
    match dtype {
        DType::I8 => x as i8 as i64,
        DType::I32 => x as i32 as i64,
        _ => x,
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Builds a tensor, checking the invariants: the storage kind must match `dtype` and the
    /// length must match `shape`. Float elements are rounded to `dtype`, ints wrapped to it.
    pub fn new(dtype: DType, shape: Vec<usize>, data: TensorData) -> Result<Tensor, InterpError> {
        if !data.fits(dtype) {
            return Err(InterpError::Data(format!(
                "storage kind does not match element type {dtype}"
            )));
        }
        if data.len() != numel(&shape) {
            return Err(InterpError::Data(format!(
                "{} elements given for shape {} ({} elements)",
                data.len(),
                fmt_shape(&shape),
                numel(&shape)
            )));
        }
        let mut t = Tensor { dtype, shape, data };
        t.normalize();
        Ok(t)
    }

    /// Rounds float elements to `dtype` and wraps int elements to it (restores the invariants
    /// after the elements were computed in f64 / i64).
    pub(crate) fn normalize(&mut self) {
        let dtype = self.dtype;
        match &mut self.data {
            TensorData::Float(v) if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) => {
                v.iter_mut().for_each(|x| *x = round_to_dtype(*x, dtype));
            }
            TensorData::Int(v) if matches!(dtype, DType::I8 | DType::I32) => {
                v.iter_mut().for_each(|x| *x = wrap_to_dtype(*x, dtype));
            }
            _ => {}
        }
    }

    /// An `f32` tensor. Panics if `data.len()` is not the number of elements of `shape`.
    pub fn from_f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Tensor {
        Tensor::from_float(DType::F32, shape, data.into_iter().map(f64::from).collect())
    }

    /// An `f64` tensor. Panics if `data.len()` is not the number of elements of `shape`.
    pub fn from_f64(shape: impl Into<Vec<usize>>, data: Vec<f64>) -> Tensor {
        Tensor::from_float(DType::F64, shape, data)
    }

    /// A float tensor of any float `dtype`; the elements are rounded to it. Panics if `dtype` is
    /// not a float type or the length does not match `shape`.
    pub fn from_float(dtype: DType, shape: impl Into<Vec<usize>>, data: Vec<f64>) -> Tensor {
        assert!(
            dtype.is_float(),
            "from_float needs a float dtype, got {dtype}"
        );
        Tensor::new(dtype, shape.into(), TensorData::Float(data)).expect("valid float tensor")
    }

    /// An integer tensor (`i32` or `i64`); `i32` elements wrap like two's complement. Panics if
    /// `dtype` is not an int type or the length does not match `shape`.
    pub fn from_i64(dtype: DType, shape: impl Into<Vec<usize>>, data: Vec<i64>) -> Tensor {
        assert!(dtype.is_int(), "from_i64 needs an int dtype, got {dtype}");
        Tensor::new(dtype, shape.into(), TensorData::Int(data)).expect("valid int tensor")
    }

    /// An `i32` tensor. Panics if the length does not match `shape`.
    pub fn from_i32(shape: impl Into<Vec<usize>>, data: Vec<i32>) -> Tensor {
        Tensor::from_i64(DType::I32, shape, data.into_iter().map(i64::from).collect())
    }

    /// A `bool` tensor. Panics if the length does not match `shape`.
    pub fn from_bool(shape: impl Into<Vec<usize>>, data: Vec<bool>) -> Tensor {
        Tensor::new(DType::Bool, shape.into(), TensorData::Bool(data)).expect("valid bool tensor")
    }

    /// A tensor of zeros (`false` for bool) of the given type.
    pub fn zeros(ty: &TensorType) -> Tensor {
        let n = ty.num_elements();
        let data = if ty.dtype.is_float() {
            TensorData::Float(vec![0.0; n])
        } else if ty.dtype.is_int() {
            TensorData::Int(vec![0; n])
        } else {
            TensorData::Bool(vec![false; n])
        };
        Tensor {
            dtype: ty.dtype,
            shape: ty.shape.clone(),
            data,
        }
    }

    /// A rank-0 float tensor holding `x` rounded to `dtype`. Panics if `dtype` is not float.
    pub fn scalar_f(dtype: DType, x: f64) -> Tensor {
        Tensor::from_float(dtype, Vec::new(), vec![x])
    }

    /// A rank-0 int tensor. Panics if `dtype` is not an int type.
    pub fn scalar_i(dtype: DType, x: i64) -> Tensor {
        Tensor::from_i64(dtype, Vec::new(), vec![x])
    }

    /// The tensor's type.
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype, self.shape.clone())
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The elements of a float tensor.
    pub fn as_f64(&self) -> Option<&[f64]> {
        match &self.data {
            TensorData::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an int tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of a bool tensor.
    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// Every element converted to `f64` (ints as `as f64`, bools as 0 or 1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::Float(v) => v.clone(),
            TensorData::Int(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8 as f64).collect(),
        }
    }

    /// Every element converted to `f32` (rounded; ints as `as f32`, bools as 0 or 1).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::Float(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Int(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8 as f32).collect(),
        }
    }

    /// The elements as little-endian bytes in the tensor's dtype (`bool` as one byte, 0 or 1).
    /// Float elements are rounded to the dtype first (a no-op for tensors that keep the
    /// invariants).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * self.dtype.size_bytes());
        match &self.data {
            TensorData::Float(v) => {
                for &x in v {
                    let r = round_to_dtype(x, self.dtype);
                    match self.dtype {
                        DType::F64 => out.extend_from_slice(&r.to_le_bytes()),
                        DType::F32 => out.extend_from_slice(&(r as f32).to_le_bytes()),
                        // `r` is representable, so half's conversion is exact.
                        DType::F16 => out.extend_from_slice(&f16::from_f64(r).to_le_bytes()),
                        DType::BF16 => out.extend_from_slice(&bf16::from_f64(r).to_le_bytes()),
                        _ => unreachable!("float storage with dtype {}", self.dtype),
                    }
                }
            }
            TensorData::Int(v) => {
                for &x in v {
                    match self.dtype {
                        DType::I8 => out.push(x as i8 as u8),
                        DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
                        _ => out.extend_from_slice(&x.to_le_bytes()),
                    }
                }
            }
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        }
        out
    }

    /// Reads a tensor from little-endian bytes in `dtype` (`bool`: one byte each, nonzero is
    /// `true`). The byte count must be exactly `numel(shape) · size(dtype)`.
    pub fn from_le_bytes(
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Tensor, InterpError> {
        let n = numel(shape);
        let size = dtype.size_bytes();
        if bytes.len() != n * size {
            return Err(InterpError::Data(format!(
                "{} bytes given for {}{} ({} elements of {size} bytes = {} bytes)",
                bytes.len(),
                dtype,
                fmt_shape(shape),
                n,
                n * size
            )));
        }
        let chunks = bytes.chunks_exact(size);
        let data = match dtype {
            DType::F64 => TensorData::Float(
                chunks
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::F32 => TensorData::Float(
                chunks
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
            ),
            DType::F16 => TensorData::Float(
                chunks
                    .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())
                    .collect(),
            ),
            DType::BF16 => TensorData::Float(
                chunks
                    .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
                    .collect(),
            ),
            DType::I8 => TensorData::Int(bytes.iter().map(|&b| b as i8 as i64).collect()),
            DType::I32 => TensorData::Int(
                chunks
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            DType::I64 => TensorData::Int(
                chunks
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }
}
