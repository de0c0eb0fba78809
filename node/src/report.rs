//! Report lines: one short `key=value` line on stdout per event an operator, a script or a
//! test waits for (`ready ...`, `admitted ...`, `policy version=N applied`, ...). The log on
//! stderr records the same events with their fields.
//!
//! When stdout and stderr lead to the same place (a terminal, `2>&1`, the systemd journal
//! with the default `StandardError=inherit`), the report lines are left out: the log alone
//! tells each event once.

use std::sync::LazyLock;

static ENABLED: LazyLock<bool> = LazyLock::new(|| !same_destination());

/// True when report lines are printed.
pub fn enabled() -> bool {
    *ENABLED
}

/// Prints one report line on stdout (flushed at once), unless stdout and stderr share a
/// destination.
pub fn line(line: &str) {
    if enabled() {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

#[cfg(unix)]
fn same_destination() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let id = |fd: std::os::fd::BorrowedFd<'_>| {
        let f = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let m = f.metadata().ok()?;
        Some((m.dev(), m.ino()))
    };
    match (id(std::io::stdout().as_fd()), id(std::io::stderr().as_fd())) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_destination() -> bool {
    false
}
