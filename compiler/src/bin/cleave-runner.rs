//! `cleave-runner`: the program inside every executable `cleave compile` writes (see
//! `cleave_compiler::aot`). Run bare, it says so and exits.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cleave_compiler::aot::runner_main(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
