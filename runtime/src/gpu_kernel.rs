//! Descriptors of compiled GPU kernels: what a CUDA runtime needs to launch a PTX kernel that the
//! MLIR backend (`cleave-mlir`) produced, with no dependency on MLIR or CUDA.
//!
//! Kernels use the bare-pointer calling convention: each parameter of the PTX `.entry` is exactly
//! one device pointer, in the order of [`GpuKernel::args`], to a dense row-major buffer of the
//! given dtype and shape. Launch geometry is static (shapes are static), so it is recorded here.
//! The JSON form (serde) is what `cleave compile --target cuda` writes as `kernels.json`.
//!
//! Running a function's groups, in order, on one stream:
//!
//! 1. once: a device buffer per distinct [`KernelArg::name`] of roles input/output (function
//!    arguments are uploaded; `%N` values are intermediates), and per constant, uploaded from
//!    [`KernelArg::data`];
//! 2. per group: allocate its [`GpuKernelGroup::scratch`] buffers; if [`GpuKernelGroup::gemm`] is
//!    set, either call cuBLAS with it (the default of the design) or run the launches; launch each
//!    [`GpuKernel`] (load `ptx`, get `entry`, pass one device pointer per arg, `grid` × `block`,
//!    no shared memory); then run the [`GpuKernelGroup::copies`];
//! 3. read back the function's outputs ([`GpuFunction::outputs`] names their buffers).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a buffer passed to a kernel is, relative to the cleave function the kernel came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgRole {
    /// Read-only: a function argument or a value computed by an earlier kernel group.
    Input,
    /// Written by the group (and maybe read by a later launch of the same group).
    Output,
    /// A temporary of the group: the runtime allocates it (uninitialised) for the group's launches.
    Scratch,
    /// A dense constant of the function: the runtime uploads [`KernelArg::data`] once.
    Constant,
}

/// One buffer parameter of a kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelArg {
    /// The buffer: a function argument's name, `%N` for an intermediate value of the function
    /// (numbered as the printer numbers it), `%N.const` for the data of a dense constant, or
    /// `scratchN` for a temporary of the group.
    pub name: String,
    /// Input, output or scratch.
    pub role: ArgRole,
    /// Element type, as the IR text writes it (`f32`, `i32`, `bool`, …); `bool` is one byte.
    pub dtype: String,
    /// The buffer's logical shape (row-major, dense).
    pub shape: Vec<usize>,
    /// For [`ArgRole::Constant`]: the elements (bools as 0/1, integers exactly up to 2^53).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<f64>,
}

/// One PTX kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuKernel {
    /// A unique name: the group's name and the launch's position, `k3_0`.
    pub name: String,
    /// The PTX `.entry` symbol to load.
    pub entry: String,
    /// The PTX module text that defines `entry`.
    pub ptx: String,
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Blocks per grid (x, y, z).
    pub grid: [u32; 3],
    /// The kernel parameters, one device pointer each, in order.
    pub args: Vec<KernelArg>,
}

/// The launches of one kernel group (one fused kernel of a function), in order, plus the
/// temporaries they share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuKernelGroup {
    /// The group's name (`k3`).
    pub name: String,
    /// The cleave ops the group computes, in order (for reports).
    pub ops: Vec<String>,
    /// The launches, to run in this order on one stream.
    pub launches: Vec<GpuKernel>,
    /// Temporaries the launches read and write (role [`ArgRole::Scratch`]).
    pub scratch: Vec<KernelArg>,
    /// For a group that is one `matmul`: the GEMM, so that a runtime can call cuBLAS (the default
    /// of the design) instead of the group's MLIR kernel (the option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm: Option<GemmSpec>,
    /// Device-to-device copies to run after the launches (`from` → `to`, buffer names as in
    /// [`KernelArg::name`]): MLIR leaves one where an output is a plain copy of an input or a
    /// constant.
    pub copies: Vec<(String, String)>,
}

/// A (batched) GEMM: `out[b] = op(lhs[b]) · op(rhs[b])`, row-major, `op` the optional transpose of
/// the last two dimensions; `out[b]` is `m × n` and the inner dimension is `k`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmSpec {
    /// Buffer name of the left operand.
    pub lhs: String,
    /// Buffer name of the right operand.
    pub rhs: String,
    /// Buffer name of the result.
    pub out: String,
    /// Element type (`f32`, …).
    pub dtype: String,
    /// Number of independent products (the product of the batch dimensions; 1 if none).
    pub batch: usize,
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The contracted extent.
    pub k: usize,
    /// `lhs[b]` is stored `k × m` (use its transpose).
    pub transpose_lhs: bool,
    /// `rhs[b]` is stored `n × k` (use its transpose).
    pub transpose_rhs: bool,
}

/// A whole function for the GPU: what `kernels.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuFunction {
    /// The cleave function's name.
    pub function: String,
    /// Its arguments (role [`ArgRole::Input`]), in order; their buffers are named after them.
    pub args: Vec<KernelArg>,
    /// Its outputs, in order: `(output name, buffer name)`.
    pub outputs: Vec<(String, String)>,
    /// The kernel groups, in execution order.
    pub groups: Vec<GpuKernelGroup>,
}

/// A tensor as plain data (element type name, shape, elements as f64; bools 0/1): the form GPU
/// check cases carry their inputs and expected outputs in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlainTensor {
    /// Element type name (`f32`, `i32`, `bool`).
    pub dtype: String,
    /// Extents.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

impl PlainTensor {
    /// From an interpreter tensor.
    pub fn from_tensor(t: &cleave_ir::Tensor) -> PlainTensor {
        PlainTensor {
            dtype: t.dtype.name().to_string(),
            shape: t.shape.clone(),
            data: t.to_f64_vec(),
        }
    }

    /// To an interpreter tensor; `None` for an unknown element type name.
    pub fn to_tensor(&self) -> Option<cleave_ir::Tensor> {
        let d = cleave_ir::DType::from_name(&self.dtype)?;
        let shape = self.shape.clone();
        Some(match d {
            cleave_ir::DType::Bool => {
                cleave_ir::Tensor::from_bool(shape, self.data.iter().map(|&x| x != 0.0).collect())
            }
            d if d.is_float() => cleave_ir::Tensor::from_float(d, shape, self.data.clone()),
            d => {
                cleave_ir::Tensor::from_i64(d, shape, self.data.iter().map(|&x| x as i64).collect())
            }
        })
    }
}

/// One GPU check: a compiled function, its inputs and the interpreter's outputs; with `steps` >
/// 1, a training step run `steps` times, each step's outputs named in `carry` fed back as the
/// next step's arguments, and `losses` the interpreter's loss of every step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuCase {
    /// A name for reports.
    pub name: String,
    /// The kernels.
    pub function: GpuFunction,
    /// Every argument, by name.
    pub inputs: BTreeMap<String, PlainTensor>,
    /// The interpreter's outputs of one run, by name.
    pub expected: BTreeMap<String, PlainTensor>,
    /// Steps to run (1: a plain comparison of `expected`).
    pub steps: usize,
    /// Outputs fed back into the same-named arguments between steps.
    pub carry: Vec<String>,
    /// The interpreter's `loss` output of each step.
    pub losses: Vec<f64>,
}
