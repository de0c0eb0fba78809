//! The NIB: one SQLite file per controller (WAL mode, migrations in code).
//!
//! Every table lives in this one file so a single transaction can cover, for example, an
//! admitted child's record and its audit event. SQLite calls block; async code reaches the
//! NIB through `spawn_blocking` or a dedicated thread, never directly on the executor.
//!
//! Durability: WAL with `synchronous=NORMAL` survives a process crash (`kill -9`) without
//! losing a committed transaction; only an OS crash or power loss can drop the last
//! commits. Set `PDSNO_SQLITE_SYNC=FULL` to fsync every commit.

mod controllers;
mod credentials;
mod discovery;
pub(crate) mod events;
mod outbox;
mod pair_keys;
mod policies;
mod replay;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

pub use controllers::{
    AdmitError, AdmitRecord, Admitted, Conflict, ControllerRow, Rebind, token_hash,
};
pub use credentials::credential_hash;
pub use discovery::{
    CycleDelta, CycleParams, DeviceRow, DeviceStatus, Expired, IngestLimits, IngestOutcome,
    InventoryRow, SummaryDevice, SummaryWindow,
};
pub use events::{BrokenLink, Event, EventRow, GENESIS_HASH, verify_chain};
pub use outbox::{OutboxItem, OutboxRow};
pub use pair_keys::{KeyState, StoredKey};
pub use replay::SqliteNonceStore;
pub use state::StateKey;

/// Errors of the NIB layer.
#[derive(Debug, thiserror::Error)]
pub enum NibError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer pdsno.
    #[error("database schema version {found} is newer than this pdsno understands ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// Stored data does not parse.
    #[error("corrupt data in the NIB: {0}")]
    Corrupt(String),
    /// The data directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit a released migration: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: replay guard
    "CREATE TABLE replay_nonces (
         nonce_key  BLOB PRIMARY KEY,
         expires_at INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX replay_nonces_expiry ON replay_nonces(expires_at);",
    // 2: identity, admitted controllers, tokens, sequences, blocklist, audit events
    "CREATE TABLE node_state (
         key     TEXT PRIMARY KEY,
         value   TEXT NOT NULL,
         version INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE controllers (
         controller_id TEXT PRIMARY KEY,
         role          TEXT NOT NULL,
         region        TEXT,
         status        TEXT NOT NULL DEFAULT 'active',
         temp_id       TEXT,
         public_key    TEXT,
         certificate   TEXT,
         validated_by  TEXT,
         validated_at  TEXT,
         capabilities  TEXT NOT NULL DEFAULT '[]',
         metadata      TEXT NOT NULL DEFAULT '{}',
         version       INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX controllers_by_region ON controllers(role, region, status);
     CREATE TABLE consumed_tokens (
         token_hash  TEXT PRIMARY KEY,
         temp_id     TEXT NOT NULL,
         assigned_id TEXT,
         consumed_at TEXT NOT NULL
     );
     CREATE TABLE id_sequences (
         kind TEXT PRIMARY KEY,
         last INTEGER NOT NULL
     );
     CREATE TABLE blocklist (
         subject  TEXT PRIMARY KEY,
         reason   TEXT NOT NULL,
         added_at TEXT NOT NULL
     );
     CREATE TABLE events (
         seq        INTEGER PRIMARY KEY AUTOINCREMENT,
         event_id   TEXT NOT NULL UNIQUE,
         event_type TEXT NOT NULL,
         actor      TEXT NOT NULL,
         subject    TEXT,
         action     TEXT NOT NULL,
         decision   TEXT,
         timestamp  TEXT NOT NULL,
         details    TEXT NOT NULL,
         prev_hash  TEXT NOT NULL,
         hash       TEXT NOT NULL,
         signature  TEXT NOT NULL
     );
     CREATE INDEX events_by_type ON events(event_type);
     CREATE TRIGGER events_no_update BEFORE UPDATE ON events
         BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
     CREATE TRIGGER events_no_delete BEFORE DELETE ON events
         BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;",
    // 3: pairwise keys, issued MQTT credentials, pending rotation requests
    "CREATE TABLE pair_keys (
         key_id     TEXT PRIMARY KEY,
         peer_id    TEXT NOT NULL,
         material   BLOB NOT NULL,
         state      TEXT NOT NULL,
         created_at TEXT NOT NULL,
         retires_at TEXT,
         version    INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX pair_keys_by_peer ON pair_keys(peer_id);
     CREATE TABLE mqtt_credentials (
         controller_id TEXT PRIMARY KEY,
         secret_hash   TEXT NOT NULL,
         issued_at     TEXT NOT NULL
     );
     CREATE TABLE rotation_requests (
         peer_id      TEXT PRIMARY KEY,
         requested_at TEXT NOT NULL
     );",
    // 4: discovery (devices, the GC's inventory, applied reports), policies, the outbox
    "CREATE TABLE devices (
         mac              TEXT PRIMARY KEY,
         ip               TEXT NOT NULL,
         hostname         TEXT,
         vendor           TEXT,
         model            TEXT,
         protocol         TEXT NOT NULL,
         reachable        INTEGER NOT NULL,
         rtt_ms           REAL,
         uptime_seconds   INTEGER,
         discovery_method TEXT NOT NULL,
         status           TEXT NOT NULL,
         lc_id            TEXT NOT NULL,
         region           TEXT NOT NULL,
         first_seen       TEXT NOT NULL,
         last_seen        TEXT NOT NULL,
         missed           INTEGER NOT NULL DEFAULT 0,
         created_seq      INTEGER NOT NULL,
         changed_seq      INTEGER NOT NULL,
         extra            TEXT NOT NULL DEFAULT '{}',
         version          INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX devices_by_lc ON devices(lc_id, status);
     CREATE INDEX devices_by_change ON devices(changed_seq);
     CREATE TABLE inventory (
         mac        TEXT NOT NULL,
         region     TEXT NOT NULL,
         rc_id      TEXT NOT NULL,
         lc_id      TEXT,
         ip         TEXT,
         hostname   TEXT,
         status     TEXT NOT NULL,
         last_seen  TEXT NOT NULL,
         updated_at TEXT NOT NULL,
         version    INTEGER NOT NULL DEFAULT 0,
         PRIMARY KEY (mac, region)
     );
     CREATE TABLE applied_messages (
         item_id    TEXT PRIMARY KEY,
         sender_id  TEXT NOT NULL,
         kind       TEXT NOT NULL,
         applied_at TEXT NOT NULL,
         result     TEXT NOT NULL
     );
     CREATE INDEX applied_by_time ON applied_messages(applied_at);
     CREATE TABLE policies (
         policy_id      TEXT NOT NULL,
         policy_version INTEGER NOT NULL,
         envelope       TEXT NOT NULL,
         received_at    TEXT NOT NULL,
         PRIMARY KEY (policy_id, policy_version)
     );
     CREATE TABLE outbox (
         seq          INTEGER PRIMARY KEY AUTOINCREMENT,
         item_id      TEXT NOT NULL UNIQUE,
         recipient    TEXT NOT NULL,
         message_type TEXT NOT NULL,
         topic        TEXT,
         payload      TEXT NOT NULL,
         created_at   TEXT NOT NULL,
         attempts     INTEGER NOT NULL DEFAULT 0,
         last_attempt TEXT
     );",
    // 5: device ownership: a contender while the owner still sees the device, and the
    // owner a device moved away from (whose own sighting takes it back)
    "ALTER TABLE devices ADD COLUMN claimant TEXT;
     ALTER TABLE devices ADD COLUMN previous_lc TEXT;",
    // 6: bounded state. Who has ever reported (and when last), which `applied_messages`
    // answered until its ids are purged; when each device went inactive (rows inactive
    // at the upgrade count from the upgrade), so the retention rule can delete it; the
    // indexes that rule and the purge use.
    "CREATE TABLE reporters (
         sender_id TEXT NOT NULL,
         kind      TEXT NOT NULL,
         first_at  TEXT NOT NULL,
         last_at   TEXT NOT NULL,
         PRIMARY KEY (sender_id, kind)
     ) WITHOUT ROWID;
     INSERT INTO reporters (sender_id, kind, first_at, last_at)
         SELECT sender_id, kind, MIN(applied_at), MAX(applied_at) FROM applied_messages
         GROUP BY sender_id, kind;
     ALTER TABLE devices ADD COLUMN inactive_since TEXT;
     UPDATE devices SET inactive_since = strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')
         WHERE status = 'inactive';
     CREATE INDEX devices_by_inactive_since ON devices(inactive_since)
         WHERE inactive_since IS NOT NULL;
     CREATE INDEX inventory_by_status ON inventory(status, updated_at);
     CREATE INDEX outbox_by_type ON outbox(message_type, created_at);",
];

/// An open NIB.
#[derive(Debug)]
pub struct Nib {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Nib {
    /// Opens (creating if needed) the NIB at `path` and brings its schema up to date.
    ///
    /// # Errors
    /// When the file cannot be opened or migrated, or was written by a newer version.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NibError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| NibError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let existed = path.exists();
        let mut conn = Connection::open(&path)?;
        // The NIB holds key material: readable by the owner only.
        #[cfg(unix)]
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match std::env::var("PDSNO_SQLITE_SYNC").ok().as_deref() {
            Some("FULL" | "full") => "FULL",
            _ => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Nib {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the store takes writes now: takes the write lock and lets it go.
    ///
    /// # Errors
    /// When SQLite refuses (read-only file or disk, locked by another process, ...).
    pub fn check_writable(&self) -> Result<(), NibError> {
        self.conn().execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    /// Runs `f` with the NIB on the blocking pool and waits for it: async code must not
    /// wait for SQLite (and the connection's lock, held by a large transaction) on an
    /// executor thread. Handlers, which run on the blocking pool already, call the NIB
    /// directly. `None` only when the runtime is shutting down.
    pub async fn off_executor<T, F>(self: &std::sync::Arc<Self>, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(&Nib) -> T + Send + 'static,
    {
        let nib = self.clone();
        match tokio::task::spawn_blocking(move || f(&nib)).await {
            Ok(v) => Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }

    /// Locks the connection for a unit of work.
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic elsewhere while holding the lock does
        // not corrupt the connection, so recover it.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The schema version of the open file.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn schema_version(&self) -> Result<i64, NibError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), NibError> {
    let known = MIGRATIONS.len() as i64;
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > known {
        return Err(NibError::TooNew {
            found: current,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;

    #[test]
    fn migrations_apply_once_and_refuse_newer_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/nib.db");
        let nib = Nib::open(&path).expect("open");
        assert_eq!(
            nib.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        drop(nib);
        let nib = Nib::open(&path).expect("reopen");
        assert_eq!(
            nib.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        nib.conn()
            .pragma_update(None, "user_version", 999)
            .expect("bump");
        drop(nib);
        assert!(matches!(
            Nib::open(&path),
            Err(NibError::TooNew { found: 999, .. })
        ));
    }

    /// A file of the release before migration 6: who reported is taken over from the
    /// applied ids, and devices already inactive count as inactive from the upgrade.
    #[test]
    fn upgrading_keeps_who_reported_and_dates_inactive_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nib.db");
        {
            let conn = Connection::open(&path).expect("open");
            for sql in &MIGRATIONS[..5] {
                conn.execute_batch(sql).expect("migration");
            }
            conn.pragma_update(None, "user_version", 5)
                .expect("version");
            conn.execute_batch(
                "INSERT INTO applied_messages VALUES
                     ('r1', 'lc1', 'discovery_report', '2026-01-01T00:00:00+00:00', '{}'),
                     ('r2', 'lc1', 'discovery_report', '2026-01-02T00:00:00+00:00', '{}'),
                     ('s1', 'rc1', 'discovery_summary', '2026-01-03T00:00:00+00:00', '{}');
                 INSERT INTO devices (mac, ip, protocol, reachable, discovery_method, status, lc_id,
                         region, first_seen, last_seen, created_seq, changed_seq)
                     VALUES ('02:00:00:00:00:01', '10.0.0.1', 'SIM', 1, 'icmp', 'active', 'lc1',
                         'zone-A', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', 1, 1),
                     ('02:00:00:00:00:02', '10.0.0.2', 'SIM', 1, 'icmp', 'inactive', 'lc1',
                         'zone-A', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', 1, 2);",
            )
            .expect("rows");
        }
        let before = chrono::Utc::now() - chrono::Duration::seconds(1);
        let nib = Nib::open(&path).expect("upgrade");
        assert_eq!(nib.schema_version().expect("version"), 6);
        let conn = nib.conn();
        let reporters: Vec<(String, String, String, String)> = conn
            .prepare("SELECT sender_id, kind, first_at, last_at FROM reporters ORDER BY sender_id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            reporters,
            [
                (
                    "lc1".to_owned(),
                    "discovery_report".to_owned(),
                    "2026-01-01T00:00:00+00:00".to_owned(),
                    "2026-01-02T00:00:00+00:00".to_owned()
                ),
                (
                    "rc1".to_owned(),
                    "discovery_summary".to_owned(),
                    "2026-01-03T00:00:00+00:00".to_owned(),
                    "2026-01-03T00:00:00+00:00".to_owned()
                )
            ]
        );
        let since: Vec<Option<String>> = conn
            .prepare("SELECT inactive_since FROM devices ORDER BY mac")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(since[0], None, "active");
        let t = pdsno_shared::time::parse_iso(since[1].as_deref().expect("inactive"))
            .expect("our time format");
        assert!(t >= before.with_nanosecond(0).expect("whole second"), "{t}");
    }
}
