//! The controller's Ed25519 identity key (and a regional controller's own bootstrap
//! secret), created on first start in the data directory.
//!
//! The file holds the 32-byte seed as hex and is created with mode 0600; a key file other
//! users can read is refused (like ssh does) rather than silently used.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use pdsno_shared::keys::IdentityKey;
use zeroize::Zeroizing;

/// File name of the identity key inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is readable by others.
    #[error("{0}: key is accessible by other users (mode {1:o}); run chmod 600 on it")]
    Permissions(PathBuf, u32),
    /// The content is not a key.
    #[error("{0}: not a valid key (expected 64 hex characters)")]
    Malformed(PathBuf),
}

/// File name of a regional controller's own bootstrap secret inside its data directory.
pub const BOOTSTRAP_SECRET_FILE: &str = "bootstrap.secret";

/// The permission bits of `path` when group or others may access it (`None`: private, or
/// not a Unix system).
///
/// # Errors
/// When the file's metadata cannot be read.
pub fn loose_mode(path: &Path) -> std::io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Ok(Some(mode));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(None)
}

/// Reads the private file `path`, or creates it (mode 0600, synced) holding `make()` and a
/// newline. Returns the text (without the trailing newline) and whether it was created now.
fn load_or_create_private(
    path: &Path,
    make: impl FnOnce() -> Zeroizing<String>,
) -> Result<(Zeroizing<String>, bool), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            if let Some(mode) = loose_mode(path).map_err(io)? {
                return Err(IdentityError::Permissions(path.to_path_buf(), mode));
            }
            Ok((
                Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned()),
                false,
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = make();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(path).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.write_all(b"\n").map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((text, true))
        }
        Err(e) => Err(io(e)),
    }
}

/// Loads the identity key from `dir`, creating it if absent. Returns the key and whether it
/// was created now.
///
/// # Errors
/// [`IdentityError`] for I/O failures, loose permissions or a malformed file.
pub fn load_or_create(dir: &Path) -> Result<(IdentityKey, bool), IdentityError> {
    let path = dir.join(KEY_FILE);
    let (text, created) = load_or_create_private(&path, || {
        Zeroizing::new(hex::encode(*IdentityKey::generate().seed()))
    })?;
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut seed[..])
        .map_err(|_| IdentityError::Malformed(path.clone()))?;
    Ok((IdentityKey::from_seed(&seed), created))
}

/// Loads a regional controller's own bootstrap secret from `dir`, creating it (32 random
/// bytes as hex, mode 0600) if absent. Local controllers' tokens are minted with it
/// (`pdsno token --data-dir DIR`), so no other controller can mint tokens this one accepts.
///
/// # Errors
/// [`IdentityError`] for I/O failures, loose permissions or an empty file.
pub fn load_or_create_bootstrap_secret(
    dir: &Path,
) -> Result<(pdsno_shared::keys::SecretString, bool), IdentityError> {
    let path = dir.join(BOOTSTRAP_SECRET_FILE);
    let (text, created) = load_or_create_private(&path, || {
        Zeroizing::new(hex::encode(pdsno_shared::ids::random_bytes_32()))
    })?;
    if text.trim().is_empty() {
        return Err(IdentityError::Malformed(path));
    }
    Ok((
        pdsno_shared::keys::SecretString::new(text.to_string()),
        created,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, created) = load_or_create(dir.path()).expect("create");
        assert!(created);
        let (b, created) = load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(KEY_FILE);
            assert_eq!(
                std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(
                load_or_create(dir.path()),
                Err(IdentityError::Permissions(_, 0o644))
            ));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            std::fs::write(&path, "zz").expect("write");
            assert!(matches!(
                load_or_create(dir.path()),
                Err(IdentityError::Malformed(_))
            ));
        }
    }
}
