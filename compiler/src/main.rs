use std::process::ExitCode;

fn main() -> ExitCode {
    match cleave_compiler::cli::main_with_args(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
