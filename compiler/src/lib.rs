//! cleave-compiler: the compilation driver and the `cleave` command-line tool.
//!
//! The code a training run needs (model loading, the ONNX importer, data, the training loop,
//! pipelines, standalone executables) lives in cleave-runner, which must stay free of LLVM; it is
//! re-exported here under the same module names.
//!
//! - [`load`]: model files (`.cir`, `.onnx`) → verified [`cleave_ir::Module`]s, with located errors.
//! - [`onnx`]: the ONNX importer.
//! - [`loss`]: adding a loss to a model exported without one.
//! - [`tensors`]: safetensors reading and atomic writing.
//! - [`inspect`]: the `cleave inspect` report.
//! - [`init`]: deterministic parameter initialisation.
//! - [`schedule_cmd`]: `cleave schedule` (pipeline schedules, simulation, timelines).
//! - [`train`]: `cleave train` and `cleave bench` on the CPU runtime.
//! - [`compile_gpu`]: `cleave compile --target cuda` (MLIR → PTX; needs the `mlir` feature).
//! - [`gpu_train`]: `cleave train --target cuda` on one device; [`gpu_pipeline`]: with
//!   `--stages`/`--microbatches`, every stage in this process on backends of its own.
//! - [`aot`]: `cleave compile`, standalone training executables (and their start-up, `runner_main`).
//! - [`cli`]: the command-line interface (the `cleave` binary is a thin wrapper).

pub mod cli;
pub mod compile_gpu;
pub mod gpu_pipeline;
pub mod gpu_train;
pub mod inspect;
pub mod memory;
pub mod schedule_cmd;

pub use cleave_runner::{
    aot, device_memory, init, load, loss, onnx, pipeline_train, session, tensors, train,
};
