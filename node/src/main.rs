//! The `pdsno` binary: every tier and tool (see `pdsno --help`).

fn main() -> std::process::ExitCode {
    pdsno_node::cli::run_with(std::env::args_os())
}
