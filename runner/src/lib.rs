//! cleave-runner: the runtime of the executables `cleave compile` writes, as a static library
//! (`libcleave_runner.a`).
//!
//! `cleave compile` writes an object file (kernels compiled ahead of time, the embedded payload,
//! the kernel table and `main`; see `cleave_runtime::aot`) and links it with this library. `main`
//! calls [`cleave_runner_main_v1`], which installs the kernel table and runs the training loop of
//! `cleave train` on the embedded model (`aot::runner_main`).
//!
//! **Why the modules are included by path.** The training loop lives in cleave-compiler
//! (`train.rs`, `pipeline_train.rs`, `load.rs`, …). cleave-compiler also depends on cleave-mlir,
//! and with its `mlir` feature (which `cargo test --workspace --features mlir` turns on for every
//! crate that shares the build) on melior and LLVM/MLIR's static archives. A static library
//! bundles every dependency, so depending on cleave-compiler would put ~800 MB of LLVM into
//! `libcleave_runner.a` in that build. Instead this crate compiles the same source files as its
//! own modules (`#[path]`), with the dependencies they need and no other: one copy of the code,
//! two crates. Those modules never name `cli`, `compile_gpu` or cleave-mlir.

use std::ffi::{c_char, c_int, CStr, OsString};
use std::os::unix::ffi::OsStringExt;

#[path = "../../compiler/src/aot.rs"]
pub mod aot;
#[path = "../../compiler/src/init.rs"]
pub mod init;
#[path = "../../compiler/src/load.rs"]
pub mod load;
#[path = "../../compiler/src/loss.rs"]
pub mod loss;
#[path = "../../compiler/src/onnx/mod.rs"]
pub mod onnx;
#[path = "../../compiler/src/pipeline_train.rs"]
pub mod pipeline_train;
#[path = "../../compiler/src/tensors.rs"]
pub mod tensors;
#[path = "../../compiler/src/train.rs"]
pub mod train;

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
