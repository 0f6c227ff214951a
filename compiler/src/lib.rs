//! cleave-compiler: model frontends, the compilation driver, and the `cleave` command-line tool.
//!
//! - [`load`]: model files → verified [`cleave_ir::Module`]s, with located errors.
//! - [`tensors`]: safetensors reading and atomic writing.
//! - [`inspect`]: the `cleave inspect` report.
//! - [`init`]: deterministic parameter initialisation.
//! - [`train`]: `cleave train` and `cleave bench` on the CPU runtime.
//! - [`cli`]: the command-line interface (the `cleave` binary is a thin wrapper).

pub mod cli;
pub mod init;
pub mod inspect;
pub mod load;
pub mod tensors;
pub mod train;
