//! The data directory belongs to one running node: an exclusive lock on `DATA_DIR/lock`
//! (holding the owner's pid) for as long as the node runs, so a second node started on the
//! same directory stops with the holder's pid instead of sharing the NIB and keys.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

/// File name of the lock inside the data directory.
pub const LOCK_FILE: &str = "lock";

/// The held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the data directory `dir` for this process.
///
/// # Errors
/// A message for the operator: the directory is in use (with the holder's pid), or the lock
/// file cannot be created.
pub fn lock(dir: &Path) -> Result<DataDirLock, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another pdsno process".to_owned()
            } else {
                format!("another pdsno process (pid {holder})")
            };
            return Err(format!(
                "data directory {} is in use by {who}: stop it first, or give this node its own --data-dir",
                dir.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(DataDirLock { _file: file })
}

/// Whether a node holds `dir` now: `Some(false)` when the lock file is there but nobody
/// holds it (the node that wrote `node.json` has stopped), `None` when it cannot be told.
pub fn in_use(dir: &Path) -> Option<bool> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .open(dir.join(LOCK_FILE))
        .ok()?;
    match file.try_lock_shared() {
        Ok(()) => Some(false),
        Err(std::fs::TryLockError::WouldBlock) => Some(true),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock(dir.path()).expect("first");
        let e = lock(dir.path()).expect_err("second");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert_eq!(in_use(dir.path()), Some(true));
        drop(first);
        assert_eq!(in_use(dir.path()), Some(false));
        lock(dir.path()).expect("free again");
    }
}
