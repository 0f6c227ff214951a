//! cleave-runner: the runtime of the executables `cleave compile` writes, as a static library
//! (`libcleave_runner.a`).
//!
//! `cleave compile` writes an object file (kernels compiled ahead of time, the embedded payload,
//! the kernel table and `main`; see `cleave_runtime::aot`) and links it with this library. `main`
//! calls [`cleave_runner_main_v1`], which installs the kernel table and runs the training loop of
//! `cleave train` on the embedded model (`aot::runner_main`).
//!
//! **Why the training code lives here.** The static library bundles every dependency of this
//! crate. cleave-compiler depends on cleave-mlir, and with its `mlir` feature (which `cargo test
//! --workspace --features mlir` turns on for the whole build) on melior and LLVM/MLIR's static
//! archives (about 800 MB). So the code a training run needs (model loading, data, the training
//! loop, pipelines, checkpoints, the executables' start-up) is this crate, which never depends on
//! cleave-mlir, and cleave-compiler re-exports its modules under the same names
//! (`cleave_compiler::train`, …) and adds the command line, inspection and the GPU paths.
//!
//! - [`load`]: model files (`.cir`, `.onnx`) → verified [`cleave_ir::Module`]s, with located errors.
//! - [`onnx`]: the ONNX importer.
//! - [`loss`]: adding a loss to a model exported without one.
//! - [`tensors`]: safetensors reading and atomic writing.
//! - [`init`]: deterministic parameter initialisation.
//! - [`train`]: `cleave train` and `cleave bench` on the CPU runtime.
//! - [`pipeline_train`]: pipeline-parallel training on the stage-partitioned executor.
//! - [`session`]: training stepped by its caller with batches from memory (the Python package).
//! - [`aot`]: `cleave compile`, standalone training executables (and their start-up, `runner_main`).

use std::ffi::{c_char, c_int, CStr, OsString};
use std::os::unix::ffi::OsStringExt;

pub mod aot;
pub mod device_memory;
pub mod init;
pub mod load;
pub mod loss;
pub mod onnx;
pub mod pipeline_train;
pub mod session;
pub mod tensors;
pub mod train;

/// Every program that trains through this crate (`cleave`, the executables `cleave compile`
/// writes, the tests) counts tensor memory per pipeline device the same way when asked
/// (`cleave train --memory-report`, `--memory-limit`); untagged allocations pay only a
/// thread-local read and a 16-byte header.
#[global_allocator]
static ALLOC: cleave_runtime::alloc::CountingAlloc = cleave_runtime::alloc::CountingAlloc;

/// The entry point the `main` of a compiled executable calls: `argc`/`argv` as `main` got them,
/// the embedded payload (`payload_len` bytes of JSON) and the kernel table (`table_len` bytes).
/// Returns the exit status.
///
/// # Safety
///
/// `argv` must hold `argc` valid C strings; `payload` must point to `payload_len` readable bytes;
/// `table` must point to `table_len` readable bytes: a kernel table written by
/// `cleave_runtime::aot` and linked into this executable. The object `cleave compile` writes passes exactly these.
#[no_mangle]
pub unsafe extern "C" fn cleave_runner_main_v1(
    argc: c_int,
    argv: *const *const c_char,
    payload: *const u8,
    payload_len: usize,
    table: *const u8,
    table_len: usize,
) -> c_int {
    let args: Vec<OsString> = (0..argc.max(0) as usize)
        .map(|i| {
            // SAFETY: the caller passes `argc` valid C strings.
            let s = unsafe { CStr::from_ptr(*argv.add(i)) };
            OsString::from_vec(s.to_bytes().to_vec())
        })
        .collect();
    // SAFETY: the caller passes `payload_len` readable bytes.
    let payload = unsafe { std::slice::from_raw_parts(payload, payload_len) };
    // SAFETY: the caller passes `table_len` readable bytes.
    let table = unsafe { std::slice::from_raw_parts(table, table_len) };
    // SAFETY: the caller passes the kernel table linked beside the payload.
    match unsafe { aot::runner_main(args, payload, table) } {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
