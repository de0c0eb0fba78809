//! The replay guard's durable store: nonces survive a restart, so a message accepted
//! before a crash is still refused as a replay after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use pdsno_shared::replay::{NonceStore, Recorded, StoreError};
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::Nib;

/// Nonces in the NIB, keyed by the first 16 bytes of SHA-256 of the nonce text.
#[derive(Debug)]
pub struct SqliteNonceStore {
    nib: Arc<Nib>,
    /// Rows in the table (expired ones included until purged); avoids a COUNT per message.
    rows: AtomicUsize,
}

fn key(nonce: &str) -> [u8; 16] {
    let d = Sha256::digest(nonce.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteNonceStore {
    /// The store inside `nib`.
    ///
    /// # Errors
    /// When the table cannot be read.
    pub fn new(nib: Arc<Nib>) -> Result<Self, StoreError> {
        let rows: i64 = nib
            .conn()
            .query_row("SELECT COUNT(*) FROM replay_nonces", [], |r| r.get(0))
            .map_err(err)?;
        Ok(SqliteNonceStore {
            nib,
            rows: AtomicUsize::new(rows as usize),
        })
    }
}

impl NonceStore for SqliteNonceStore {
    fn contains(&self, nonce: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let conn = self.nib.conn();
        let exp: Option<i64> = conn
            .prepare_cached("SELECT expires_at FROM replay_nonces WHERE nonce_key = ?1")
            .and_then(|mut s| s.query_row(params![key(nonce)], |r| r.get(0)).optional())
            .map_err(err)?;
        Ok(exp.is_some_and(|e| e >= now.timestamp_micros()))
    }

    fn record(
        &self,
        nonce: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        capacity: usize,
    ) -> Result<Recorded, StoreError> {
        let k = key(nonce);
        let now_us = now.timestamp_micros();
        let conn = self.nib.conn();
        let existing: Option<i64> = conn
            .prepare_cached("SELECT expires_at FROM replay_nonces WHERE nonce_key = ?1")
            .and_then(|mut s| s.query_row(params![k], |r| r.get(0)).optional())
            .map_err(err)?;
        match existing {
            Some(e) if e >= now_us => return Ok(Recorded::AlreadySeen),
            Some(_) => {}
            None => {
                if self.rows.load(Ordering::SeqCst) >= capacity {
                    let purged = conn
                        .execute(
                            "DELETE FROM replay_nonces WHERE expires_at < ?1",
                            params![now_us],
                        )
                        .map_err(err)?;
                    self.rows.fetch_sub(purged, Ordering::SeqCst);
                    if self.rows.load(Ordering::SeqCst) >= capacity {
                        return Ok(Recorded::Full);
                    }
                }
            }
        }
        conn.prepare_cached(
            "INSERT INTO replay_nonces (nonce_key, expires_at) VALUES (?1, ?2)
             ON CONFLICT(nonce_key) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .and_then(|mut s| s.execute(params![k, expires_at.timestamp_micros()]))
        .map_err(err)?;
        if existing.is_none() {
            self.rows.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Recorded::Fresh)
    }

    fn purge_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let n = self
            .nib
            .conn()
            .execute(
                "DELETE FROM replay_nonces WHERE expires_at < ?1",
                params![now.timestamp_micros()],
            )
            .map_err(err)?;
        self.rows.fetch_sub(n, Ordering::SeqCst);
        Ok(n)
    }

    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.rows.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use pdsno_shared::envelope::{Envelope, MessageType};
    use pdsno_shared::json::Map;
    use pdsno_shared::keys::{HmacKey, KeyRing};
    use pdsno_shared::signing::{Verifier, VerifyError, VerifyKeys, sign_hmac};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn a_replay_after_restart_is_still_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nib.db");
        let key = HmacKey::from_secret_text("restart-test-secret");
        let ring = KeyRing::single(None, key.clone(), t0());
        let keys = VerifyKeys {
            hmac: Some(&ring),
            ed25519: None,
        };
        let mut e = Envelope::new(MessageType::Heartbeat, "a", "b", Map::new(), t0());
        sign_hmac(&mut e, &key, None, t0());
        {
            let nib = Arc::new(Nib::open(&path).expect("open"));
            let v = Verifier::new(SqliteNonceStore::new(nib).expect("store"));
            assert!(v.verify(&e, keys, None, t0()).is_ok());
            assert_eq!(v.verify(&e, keys, None, t0()), Err(VerifyError::Replay));
        }
        // "Restart": a new process opens the same file.
        let nib = Arc::new(Nib::open(&path).expect("reopen"));
        let store = SqliteNonceStore::new(nib).expect("store");
        assert_eq!(store.len(), Ok(1));
        let v = Verifier::new(store);
        assert_eq!(
            v.verify(&e, keys, None, t0() + Duration::seconds(10)),
            Err(VerifyError::Replay)
        );
    }

    #[test]
    fn bounded_and_purged_by_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Arc::new(Nib::open(dir.path().join("nib.db")).expect("open"));
        let s = SqliteNonceStore::new(nib.clone()).expect("store");
        let exp = t0() + Duration::seconds(300);
        assert_eq!(s.record("a", exp, t0(), 2), Ok(Recorded::Fresh));
        assert_eq!(s.record("a", exp, t0(), 2), Ok(Recorded::AlreadySeen));
        assert_eq!(s.record("b", exp, t0(), 2), Ok(Recorded::Fresh));
        assert_eq!(s.record("c", exp, t0(), 2), Ok(Recorded::Full));
        let later = exp + Duration::seconds(1);
        assert_eq!(s.contains("a", later), Ok(false));
        assert_eq!(
            s.record("c", later + Duration::seconds(300), later, 2),
            Ok(Recorded::Fresh)
        );
        assert_eq!(s.len(), Ok(1));
        // The counter is rebuilt from the table on reopen.
        assert_eq!(SqliteNonceStore::new(nib).expect("store").len(), Ok(1));
    }
}
