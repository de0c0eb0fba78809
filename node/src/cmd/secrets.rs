//! Secrets handed to commands: files and environment variables instead of the command line.
//!
//! Anything on a command line is visible to every local user (`ps`, `/proc/PID/cmdline`).
//! Every secret flag therefore has a file or environment form, and a secret still given as
//! a command-line argument (accepted for labs) earns a warning on stderr and in the log.

use std::path::{Path, PathBuf};

use clap::Args;
use clap::parser::ValueSource;
use pdsno_broker::OperatorAccount;

/// Broker operator accounts read from files.
#[derive(Debug, Default, Args)]
pub struct AccountFiles {
    /// File of operator accounts, one `NAME:PASSWORD` (or `NAME:$argon2id$...` hash from
    /// `pdsno passwd`) per line; `#` starts a comment. Mode 0600.
    #[arg(long, env = "PDSNO_USER_FILE", value_name = "FILE")]
    pub user_file: Option<PathBuf>,
    /// As --user-file, for read-only accounts (subscribe only).
    #[arg(long, env = "PDSNO_READER_FILE", value_name = "FILE")]
    pub reader_file: Option<PathBuf>,
}

impl AccountFiles {
    /// The accounts of both files.
    ///
    /// # Errors
    /// An unreadable, group/other-readable or malformed file, named with its line.
    pub fn accounts(&self) -> Result<Vec<OperatorAccount>, String> {
        let mut out = Vec::new();
        if let Some(p) = &self.user_file {
            out.extend(read_accounts(p, "--user-file")?);
        }
        if let Some(p) = &self.reader_file {
            out.extend(
                read_accounts(p, "--reader-file")?
                    .into_iter()
                    .map(OperatorAccount::read_only),
            );
        }
        Ok(out)
    }
}

/// Reads `NAME:PASSWORD` / `NAME:$argon2...` lines.
///
/// # Errors
/// A message naming `flag`, the file and the line (never the password).
pub fn read_accounts(path: &Path, flag: &str) -> Result<Vec<OperatorAccount>, String> {
    let text = crate::cmd::token::read_private(path).map_err(|e| format!("{flag} {e}"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad =
            |e: &dyn std::fmt::Display| format!("{flag} {} line {}: {e}", path.display(), i + 1);
        let (name, rest) = line
            .split_once(':')
            .ok_or_else(|| bad(&"expected NAME:PASSWORD"))?;
        let account = if rest.starts_with("$argon2") {
            OperatorAccount::with_hash(name, rest)
        } else {
            OperatorAccount::with_password(name, rest)
        }
        .map_err(|e| bad(&e))?;
        out.push(account);
    }
    Ok(out)
}

/// A secret flag and what to use instead.
#[derive(Clone, Copy, Debug)]
pub struct SecretFlag {
    /// The argument id (the field name).
    pub id: &'static str,
    /// The flag as typed.
    pub flag: &'static str,
    /// The safe alternatives.
    pub instead: &'static str,
}

/// The secret flags of `pdsno global|regional|local`.
pub const NODE_SECRETS: &[SecretFlag] = &[
    SecretFlag {
        id: "bootstrap_token",
        flag: "--bootstrap-token",
        instead: "--bootstrap-token-file FILE or PDSNO_BOOTSTRAP_TOKEN",
    },
    SecretFlag {
        id: "secret",
        flag: "--secret",
        instead: "--secret-file FILE or PDSNO_MESSAGE_SIGNING_SECRET",
    },
    SecretFlag {
        id: "users",
        flag: "--user",
        instead: "--user-file FILE, or [[mqtt_users]] with a `pdsno passwd` hash in --config",
    },
    SecretFlag {
        id: "readers",
        flag: "--reader",
        instead: "--reader-file FILE, or [[mqtt_users]] with read_only = true in --config",
    },
];

/// The secret flags of `pdsno broker`.
pub const BROKER_SECRETS: &[SecretFlag] = &[
    SecretFlag {
        id: "users",
        flag: "--user",
        instead: "--user-file FILE",
    },
    SecretFlag {
        id: "readers",
        flag: "--reader",
        instead: "--reader-file FILE",
    },
];

/// The secret flags of `pdsno bench mqtt`.
pub const BENCH_SECRETS: &[SecretFlag] = &[SecretFlag {
    id: "password",
    flag: "--password",
    instead: "PDSNO_BENCH_MQTT_PASSWORD",
}];

/// One warning per secret in `flags` that `m` got from the command line itself (not from
/// its environment variable).
pub fn command_line_warnings(m: &clap::ArgMatches, flags: &[SecretFlag]) -> Vec<String> {
    flags
        .iter()
        .filter(|f| {
            matches!(
                m.try_get_raw(f.id).ok().flatten().map(|_| m.value_source(f.id)),
                Some(Some(ValueSource::CommandLine))
            )
        })
        .map(|f| {
            format!(
                "{} on the command line is visible to every local user (ps, /proc/PID/cmdline); use {} instead",
                f.flag, f.instead
            )
        })
        .collect()
}

/// Prints the warnings on stderr and logs them at WARN (call after the logger is set up).
pub fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
        tracing::warn!("{w}");
    }
}
