use std::process::ExitCode;

// Counts tensor memory per pipeline device when asked (`cleave train --memory-report`); untagged
// allocations pay only a thread-local read and a 16-byte header.
#[global_allocator]
static ALLOC: cleave_runtime::alloc::CountingAlloc = cleave_runtime::alloc::CountingAlloc;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`cleave bench … | head`) would panic;
    // a command-line tool should end quietly as other Unix tools do.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match cleave_compiler::cli::main_with_args(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
