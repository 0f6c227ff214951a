//! cleave-mlir: the MLIR backend. Kernel groups of a cleave function (the CPU backend's fusion
//! rule) are emitted as `linalg.generic`s on tensors and lowered with MLIR's pass pipelines:
//!
//! - **GPU** (`gpu`, feature `mlir`): bufferization → parallel loops → `gpu` → NVVM → PTX with
//!   `gpu-module-to-binary`, plus a [`cleave_runtime::gpu_kernel::GpuKernel`] descriptor per
//!   launch (entry symbol, grid, block, one device pointer per buffer) for the CUDA runtime.
//! - **CPU** (`cpu`, feature `mlir`): the same kernels through MLIR's LLVM lowering, run with
//!   melior's ExecutionEngine, so CI checks their numbers against the interpreter without a GPU.
//!
//! The partition ([`partition()`]), the emitter ([`emit`]) and the pipelines ([`pipeline`]) are
//! plain Rust and always built, so the emitted MLIR is snapshot-tested without LLVM; everything
//! that calls MLIR needs the `mlir` feature (melior 0.27, LLVM/MLIR 22 from
//! `scripts/install-llvm.sh`).

pub mod body;
pub mod emit;
mod gather;
mod mathlib;
pub mod partition;
pub mod pipeline;

#[cfg(feature = "mlir")]
pub mod context;
#[cfg(feature = "mlir")]
pub mod cpu;
#[cfg(feature = "mlir")]
pub mod gpu;

pub use emit::{emit_function, emit_kernel, module_text, EmitError, EmittedKernel};
pub use partition::{partition, KernelGroup};
