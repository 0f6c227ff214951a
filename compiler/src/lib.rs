//! cleave-compiler: model frontends, the compilation driver, and the `cleave` command-line tool.
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
//! - [`aot`]: `cleave compile`, standalone training executables (and the `cleave-runner` main).
//! - [`cli`]: the command-line interface (the `cleave` binary is a thin wrapper).

pub mod aot;
pub mod cli;
pub mod compile_gpu;
pub mod device_memory;
pub mod init;
pub mod inspect;
pub mod load;
pub mod loss;
pub mod memory;
pub mod onnx;
pub mod pipeline_train;
pub mod schedule_cmd;
pub mod tensors;
pub mod train;
