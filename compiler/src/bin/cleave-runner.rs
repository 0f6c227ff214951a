//! `cleave-runner`: the program inside every executable `cleave compile` writes (see
//! `cleave_compiler::aot`). Run bare, it says so and exits.

use std::process::ExitCode;

// The same allocator as `cleave`, so that a compiled executable measures memory the same way.
#[global_allocator]
static ALLOC: cleave_runtime::alloc::CountingAlloc = cleave_runtime::alloc::CountingAlloc;

fn main() -> ExitCode {
    match cleave_compiler::aot::runner_main(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
