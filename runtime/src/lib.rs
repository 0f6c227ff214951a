//! cleave-runtime: a CPU executor for verified cleave IR functions.
//!
//! [`compile`] lowers a [`Function`](cleave_ir::Function) whose values are `f32`, `i32` or
//! `bool` into a [`Plan`]: a linear list of kernels over buffers with static shapes.
//!
//! - **Elementwise fusion.** Elementwise nodes of one element count (unary, binary, compare,
//!   select, cast, dropout, and the data-movement ops broadcast, transpose and slice) form one
//!   *fused loop* wherever that keeps the kernel graph acyclic, also across unrelated kernels
//!   between them (`fusion.rs`, with petgraph): it runs over the elements in chunks, keeps intermediates in chunk-sized
//!   registers and stores only the values that later kernels or the outputs read. Broadcasts,
//!   transposes and slices whose consumers are all elementwise are not materialised at all: they
//!   become strided loads inside the consumer's loop. Splat constants become register splats.
//!   `reshape` and `stop_gradient` are free (they share their operand's buffer).
//! - **JIT.** With [`CompileOptions::jit`] (the default) every fused loop whose ops the JIT
//!   supports is compiled with Cranelift to native code that runs 4 lanes at a time in 128-bit
//!   SIMD registers (`jit.rs` lists what is native, what calls Rust helpers per lane and what
//!   stays interpreted); [`Plan::jit_kernels`] counts them. `exp`, `erf` and GELU are
//!   polynomial approximations (`vmath.rs`, within a few ulp of f64 references), inline in the
//!   JIT or, on CPUs with FMA, in interpreted loops over AVX-512/AVX2 slice functions
//!   ([`Plan::vector_math_kernels`]). [`aot`] writes the same compiled loops into an object file
//!   ahead of time (cranelift-object) for `cleave compile`'s executables, whose plans then take
//!   that code instead of compiling it. With [`CompileOptions::codegen`] set to
//!   [`Codegen::Llvm`] (cargo feature `llvm`) the same loops are compiled by LLVM instead, at the
//!   host's full vector width (`llvm.rs`), loops with `exp`, `erf` or GELU included.
//! - **GEMM.** `matmul` (batched, with transpose flags, via strides) and the convolutions
//!   (im2col + GEMM) call the `gemm` crate, with its `x86-v4` feature for AVX-512 (`gemm.rs`
//!   says why this crate).
//! - **Static memory planning.** Buffers are assigned by liveness at compile time: a buffer whose
//!   last reader has run is reused for a later value of the same or smaller size (best fit), and a
//!   fused loop writes its result in place of an operand that dies there (when that operand is read
//!   contiguously). [`Plan::peak_bytes`] reports the planned bytes.
//!
//! Running: set every argument ([`Plan::set_input`]), [`Plan::run`], read outputs
//! ([`Plan::output`]). Argument buffers take part in planning, so their contents are consumed by a
//! run: set every argument again before the next run, or use [`Plan::carry`], which copies each
//! output into the argument of the same name (a training step's parameters and optimizer state),
//! or compile with [`CompileOptions::preserve_args`].
//!
//! Numerics: `f32` arithmetic throughout (reductions over rows accumulate in `f64`); results
//! agree with the reference interpreter (which rounds once per op from `f64`) to a relative error
//! of about 1e-5.

pub mod alloc;
pub mod aot;
mod bf16gemm;
mod compile;
#[cfg(feature = "cuda")]
pub mod cuda;
mod f32gemm;
mod fused;
mod fusion;
mod gemm;
pub mod gpu_kernel;
mod jit;
mod kernels;
#[cfg(feature = "llvm")]
mod llvm;
#[cfg(feature = "mpi")]
pub mod mpi_remote;
pub mod pipeline;
mod plan;
mod pool;
pub mod remote;
mod rows;
mod vmath;

pub use compile::{compile, compile_with, Codegen, CompileOptions};
pub use plan::{ArgInfo, KernelTime, NanReport, OutputInfo, Plan};

use cleave_ir::DType;

/// A compile-time failure: something the runtime does not support.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// A value has an element type the runtime has no buffers for.
    #[error("`{op}` at {value}: element type {dtype} is not supported by the CPU runtime (f32, i32 and bool are)")]
    UnsupportedDType {
        /// The op's name.
        op: &'static str,
        /// The value as printed (`%7`).
        value: String,
        /// The element type.
        dtype: DType,
    },
    /// The function is malformed (an operand defined nowhere, an output never computed).
    #[error("{0}")]
    Malformed(String),
    /// The code generator is not in this build, or rejected the generated code.
    #[error("{0}")]
    Codegen(String),
}

/// A run-time failure: bad arguments or data (an index out of range, a zero integer divisor).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RunError {
    /// An argument was given with the wrong type, or an unknown name.
    #[error("{0}")]
    Argument(String),
    /// A kernel failed on its data.
    #[error("`{op}` at {value}: {message}")]
    Node {
        /// The op's name.
        op: &'static str,
        /// The value as printed (`%7`).
        value: String,
        /// What went wrong.
        message: String,
    },
}

/// Host data of one tensor, in the runtime's element types.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `bf16` elements as bit patterns (a storage type only: the `--compress bf16` stash).
    BF16(Vec<u16>),
    /// `i8` elements (a storage type only: the `--compress int8` stash).
    I8(Vec<i8>),
    /// IEEE binary16 elements as bit patterns (a storage type only: `--precision f16`).
    F16(Vec<u16>),
}

impl HostData {
    /// Charges the data's buffer to an allocator tag ([`alloc::retag_vec`]).
    pub fn retag(&self, tag: u32) {
        match self {
            HostData::F32(v) => alloc::retag_vec(v, tag),
            HostData::I32(v) => alloc::retag_vec(v, tag),
            HostData::Bool(v) => alloc::retag_vec(v, tag),
            HostData::BF16(v) => alloc::retag_vec(v, tag),
            HostData::I8(v) => alloc::retag_vec(v, tag),
            HostData::F16(v) => alloc::retag_vec(v, tag),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::I32(_) => DType::I32,
            HostData::Bool(_) => DType::Bool,
            HostData::BF16(_) => DType::BF16,
            HostData::I8(_) => DType::I8,
            HostData::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::Bool(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::I8(v) => v.len(),
            HostData::F16(v) => v.len(),
        }
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A borrowed view of argument data.
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `i32` elements.
    I32(&'a [i32]),
    /// `bool` elements.
    Bool(&'a [bool]),
    /// `bf16` bit patterns.
    BF16(&'a [u16]),
    /// `i8` elements.
    I8(&'a [i8]),
    /// IEEE binary16 bit patterns.
    F16(&'a [u16]),
}

impl HostSlice<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F32(_) => DType::F32,
            HostSlice::I32(_) => DType::I32,
            HostSlice::Bool(_) => DType::Bool,
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::I8(_) => DType::I8,
            HostSlice::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(v) => v.len(),
            HostSlice::I32(v) => v.len(),
            HostSlice::Bool(v) => v.len(),
            HostSlice::BF16(v) => v.len(),
            HostSlice::I8(v) => v.len(),
            HostSlice::F16(v) => v.len(),
        }
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl HostData {
    /// A borrowed view.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostData::F32(v) => HostSlice::F32(v),
            HostData::I32(v) => HostSlice::I32(v),
            HostData::Bool(v) => HostSlice::Bool(v),
            HostData::BF16(v) => HostSlice::BF16(v),
            HostData::I8(v) => HostSlice::I8(v),
            HostData::F16(v) => HostSlice::F16(v),
        }
    }
}

/// Converts an interpreter tensor (`f32`, `i32`, `bool`, `bf16`, `f16` or `i8`) to host data.
pub fn host_from_tensor(t: &cleave_ir::Tensor) -> Option<HostData> {
    use cleave_ir::TensorData;
    Some(match (&t.data, t.dtype) {
        (TensorData::Float(v), DType::F32) => HostData::F32(v.iter().map(|&x| x as f32).collect()),
        (TensorData::Int(v), DType::I32) => HostData::I32(v.iter().map(|&x| x as i32).collect()),
        (TensorData::Bool(v), DType::Bool) => HostData::Bool(v.clone()),
        (TensorData::Float(v), DType::BF16) => HostData::BF16(
            v.iter()
                .map(|&x| (crate::fused::round_bf16(x as f32).to_bits() >> 16) as u16)
                .collect(),
        ),
        (TensorData::Int(v), DType::I8) => HostData::I8(v.iter().map(|&x| x as i8).collect()),
        (TensorData::Float(v), DType::F16) => HostData::F16(
            v.iter()
                .map(|&x| crate::fused::round_f16(x as f32))
                .collect(),
        ),
        _ => return None,
    })
}

/// Converts host data to an interpreter tensor of the given shape.
pub fn tensor_from_host(shape: &[usize], data: &HostData) -> cleave_ir::Tensor {
    match data {
        HostData::F32(v) => cleave_ir::Tensor::from_f32(shape.to_vec(), v.clone()),
        HostData::I32(v) => cleave_ir::Tensor::from_i32(shape.to_vec(), v.clone()),
        HostData::Bool(v) => cleave_ir::Tensor::from_bool(shape.to_vec(), v.clone()),
        HostData::BF16(v) => cleave_ir::Tensor::from_float(
            DType::BF16,
            shape.to_vec(),
            v.iter()
                .map(|&h| crate::fused::bf16_to_f32(h) as f64)
                .collect(),
        ),
        HostData::F16(v) => cleave_ir::Tensor::from_float(
            DType::F16,
            shape.to_vec(),
            v.iter()
                .map(|&h| crate::fused::f16_to_f32(h) as f64)
                .collect(),
        ),
        HostData::I8(v) => cleave_ir::Tensor::from_i64(
            DType::I8,
            shape.to_vec(),
            v.iter().map(|&x| i64::from(x)).collect(),
        ),
    }
}
