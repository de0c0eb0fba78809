//! `pdsno token`: mint a bootstrap token for a new child.
//!
//! The bootstrap secret file must be private (mode 0600): a group- or world-readable one
//! is refused. `--init-secret` creates it mode 0600 and `--out` writes the token mode 0600.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use pdsno_shared::bootstrap::bootstrap_token;
use pdsno_shared::ids;
use zeroize::Zeroizing;

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
    /// File holding the parent's bootstrap secret (or PDSNO_BOOTSTRAP_SECRET holds it): the
    /// global controller's, for regional controllers.
    #[arg(long, env = "PDSNO_BOOTSTRAP_SECRET_FILE", value_name = "FILE")]
    pub bootstrap_secret_file: Option<PathBuf>,
    /// A regional controller's data directory: mint a local controller's token with that
    /// controller's own secret (DATA_DIR/bootstrap.secret), which only it accepts.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["bootstrap_secret_file", "init_secret"])]
    pub data_dir: Option<PathBuf>,
    /// The child's temporary id.
    #[arg(long)]
    pub temp_id: String,
    /// The child's region.
    #[arg(long)]
    pub region: String,
    /// The child's type.
    #[arg(long = "type", value_enum)]
    pub kind: ChildType,
    /// Create the bootstrap secret file (32 random bytes, hex, mode 0600) if it does not
    /// exist yet.
    #[arg(long, requires = "bootstrap_secret_file")]
    pub init_secret: bool,
    /// How long the token stays valid: `30m`, `24h`, `7d`, or seconds. `0` mints the
    /// original PDSNO's form, which never expires (for original-PDSNO parents).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: std::time::Duration,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Parses a lifetime: a number with an optional unit `s`, `m`, `h` or `d`.
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (num, mult) = match s.trim().char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s.trim(), 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a lifetime (like 30m, 24h, 7d or seconds)"))?;
    n.checked_mul(mult)
        .filter(|secs| *secs <= 10 * 365 * 86_400)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is longer than ten years"))
}

/// Writes `text` and a newline to `path`, mode 0600 whatever the umask, replacing any
/// earlier content (and tightening an existing file's mode first).
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        // `mode` only applies to a file created now; an existing one keeps its bits.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Reads a bootstrap secret file, refusing one that other users may read.
///
/// # Errors
/// A message naming the file (and the `chmod` that fixes a permissive one).
pub(crate) fn read_private(path: &Path) -> Result<Zeroizing<String>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by other users (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    Ok(Zeroizing::new(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    ))
}

/// Prints the token (or writes it to `--out`).
pub fn run(a: &TokenArgs) -> ExitCode {
    if a.init_secret
        && let Some(p) = &a.bootstrap_secret_file
        && !p.exists()
    {
        let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
        if let Err(e) = write_private(p, &secret) {
            eprintln!("error: cannot create {}: {e}", p.display());
            return ExitCode::from(1);
        }
        eprintln!("created a new bootstrap secret in {}", p.display());
    }
    if a.data_dir.is_some() && matches!(a.kind, ChildType::Regional) {
        eprintln!(
            "error: a regional controller's secret mints local controllers' tokens only; mint a regional token with the global controller's --bootstrap-secret-file"
        );
        return ExitCode::from(2);
    }
    let own = a
        .data_dir
        .as_ref()
        .map(|d| d.join(crate::identity::BOOTSTRAP_SECRET_FILE));
    let secret = match own.as_ref().or(a.bootstrap_secret_file.as_ref()) {
        Some(p) if own.is_some() && !p.exists() => {
            eprintln!(
                "error: {} does not exist: is this a regional controller's data directory, started at least once?",
                p.display()
            );
            return ExitCode::from(2);
        }
        Some(p) => match read_private(p) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: --bootstrap-secret-file {e}");
                return ExitCode::from(2);
            }
        },
        None => match std::env::var("PDSNO_BOOTSTRAP_SECRET") {
            Ok(s) if !s.is_empty() => Zeroizing::new(s),
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
    let token = Zeroizing::new(if a.ttl.is_zero() {
        bootstrap_token(secret.as_bytes(), &a.temp_id, &a.region, kind)
    } else {
        let expires =
            chrono::Utc::now().timestamp() + i64::try_from(a.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        pdsno_shared::bootstrap::expiring_token(
            secret.as_bytes(),
            &a.temp_id,
            &a.region,
            kind,
            expires,
        )
    });
    match &a.out {
        Some(p) => {
            if let Err(e) = write_private(p, &token) {
                eprintln!("error: --out {}: {e}", p.display());
                return ExitCode::from(1);
            }
            eprintln!(
                "wrote the token for {} to {}{}",
                a.temp_id,
                p.display(),
                if a.ttl.is_zero() {
                    " (no expiry)".to_owned()
                } else {
                    format!(" (valid for {} s)", a.ttl.as_secs())
                }
            );
        }
        None => println!("{}", token.as_str()),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        let d = |s| parse_ttl(s).map(|d| d.as_secs());
        assert_eq!(d("90"), Ok(90));
        assert_eq!(d("30m"), Ok(1_800));
        assert_eq!(d("24h"), Ok(86_400));
        assert_eq!(d("7d"), Ok(604_800));
        assert_eq!(d("0"), Ok(0));
        assert!(d("soon").is_err());
        assert!(d("-1h").is_err());
        assert!(d("99999d").is_err());
    }
}
