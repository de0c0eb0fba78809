//! The `pdsno` program, built as part of the test package so end-to-end tests always run
//! the current code with the test build's features (`CARGO_BIN_EXE_pdsno-e2e`).

fn main() -> std::process::ExitCode {
    pdsno_node::cli::run_with(std::env::args_os())
}
