//! `pdsno token`: mint a bootstrap token for a new child.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use pdsno_shared::bootstrap::bootstrap_token;
use pdsno_shared::ids;

/// The child's type.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ChildType {
    /// A regional controller (admitted by the global controller).
    Regional,
    /// A local controller (admitted by its regional controller).
    Local,
}

/// `pdsno token` arguments.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// File holding the parent's bootstrap secret (or PDSNO_BOOTSTRAP_SECRET holds it).
    #[arg(long, env = "PDSNO_BOOTSTRAP_SECRET_FILE", value_name = "FILE")]
    pub bootstrap_secret_file: Option<PathBuf>,
    /// The child's temporary id.
    #[arg(long)]
    pub temp_id: String,
    /// The child's region.
    #[arg(long)]
    pub region: String,
    /// The child's type.
    #[arg(long = "type", value_enum)]
    pub kind: ChildType,
}

/// Prints the token.
pub fn run(a: &TokenArgs) -> ExitCode {
    let secret = match &a.bootstrap_secret_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => s.trim_end_matches(['\n', '\r']).to_owned(),
            Err(e) => {
                eprintln!("error: --bootstrap-secret-file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => match std::env::var("PDSNO_BOOTSTRAP_SECRET") {
            Ok(s) if !s.is_empty() => s,
            _ => {
                eprintln!("error: give --bootstrap-secret-file or set PDSNO_BOOTSTRAP_SECRET");
                return ExitCode::from(2);
            }
        },
    };
    if secret.is_empty() {
        eprintln!("error: the bootstrap secret is empty");
        return ExitCode::from(2);
    }
    if !ids::is_valid_controller_id(&a.temp_id) {
        eprintln!("error: --temp-id must be 1-128 characters of [A-Za-z0-9_.-]");
        return ExitCode::from(2);
    }
    if !ids::is_valid_region(&a.region) {
        eprintln!("error: --region must be 1-64 characters of [A-Za-z0-9_.-]");
        return ExitCode::from(2);
    }
    let kind = match a.kind {
        ChildType::Regional => "regional",
        ChildType::Local => "local",
    };
    println!(
        "{}",
        bootstrap_token(secret.as_bytes(), &a.temp_id, &a.region, kind)
    );
    ExitCode::SUCCESS
}
