//! Replay protection: every accepted nonce is remembered until its message could no longer
//! pass the freshness check.
//!
//! Rules (PROTOCOL.md §2, "ours"):
//! - a nonce is kept until `signed_at + window` (never a wholesale clear, never forgotten
//!   early);
//! - the cache is bounded: when it is full of unexpired nonces a new message is rejected
//!   (fail closed) instead of evicting one that could then be replayed;
//! - a nonce is recorded only after the message fully verified, and recording is an atomic
//!   insert-if-absent, so two copies racing through verification cannot both be accepted;
//! - storage is a trait: [`MemoryNonceStore`] here, an SQLite store in the node, so the
//!   cache survives a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// Outcome of recording a nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// First time seen; now remembered.
    Fresh,
    /// Already remembered: a replay.
    AlreadySeen,
    /// The cache is full of live nonces; the message must be rejected.
    Full,
}

/// A storage failure (for example an SQLite I/O error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("replay store failure: {0}")]
pub struct StoreError(pub String);

/// Where nonces are remembered.
pub trait NonceStore: Send + Sync {
    /// True if `nonce` is remembered and not yet expired at `now`.
    ///
    /// # Errors
    /// A [`StoreError`] if the store cannot be read.
    fn contains(&self, nonce: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Remembers `nonce` until `expires_at`, atomically refusing a nonce already present,
    /// and refusing anything when `capacity` live nonces are stored (expired ones may be
    /// dropped to make room).
    ///
    /// # Errors
    /// A [`StoreError`] if the store cannot be written.
    fn record(
        &self,
        nonce: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        capacity: usize,
    ) -> Result<Recorded, StoreError>;

    /// Drops expired nonces; returns how many.
    ///
    /// # Errors
    /// A [`StoreError`] if the store cannot be written.
    fn purge_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError>;

    /// Number of nonces stored (expired ones included until purged).
    ///
    /// # Errors
    /// A [`StoreError`] if the store cannot be read.
    fn len(&self) -> Result<usize, StoreError>;

    /// True when nothing is stored.
    ///
    /// # Errors
    /// A [`StoreError`] if the store cannot be read.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

impl<T: NonceStore + ?Sized> NonceStore for std::sync::Arc<T> {
    fn contains(&self, nonce: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        (**self).contains(nonce, now)
    }
    fn record(
        &self,
        nonce: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        capacity: usize,
    ) -> Result<Recorded, StoreError> {
        (**self).record(nonce, expires_at, now, capacity)
    }
    fn purge_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        (**self).purge_expired(now)
    }
    fn len(&self) -> Result<usize, StoreError> {
        (**self).len()
    }
}

/// An in-memory nonce store (single process, lost on restart).
#[derive(Debug, Default)]
pub struct MemoryNonceStore {
    inner: Mutex<MemInner>,
}

/// Nonces are remembered by a 128-bit digest: fixed-size entries keep the cache compact
/// (a million live nonces fit in well under 100 MB) and a false "replay" would need a
/// SHA-256 collision.
type NonceKey = [u8; 16];

fn nonce_key(nonce: &str) -> NonceKey {
    use sha2::Digest;
    let d = sha2::Sha256::digest(nonce.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

#[derive(Debug, Default)]
struct MemInner {
    by_nonce: HashMap<NonceKey, i64>,
    by_expiry: BTreeSet<(i64, NonceKey)>,
}

impl MemInner {
    fn purge(&mut self, now_us: i64) -> usize {
        let mut n = 0;
        while let Some((exp, _)) = self.by_expiry.first() {
            if *exp >= now_us {
                break;
            }
            if let Some((_, nonce)) = self.by_expiry.pop_first() {
                self.by_nonce.remove(&nonce);
                n += 1;
            }
        }
        n
    }
}

impl MemoryNonceStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters for safety (worst case a nonce is remembered twice), so recover.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl NonceStore for MemoryNonceStore {
    fn contains(&self, nonce: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let key = nonce_key(nonce);
        let g = self.lock();
        Ok(g.by_nonce
            .get(&key)
            .is_some_and(|exp| *exp >= now.timestamp_micros()))
    }

    fn record(
        &self,
        nonce: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        capacity: usize,
    ) -> Result<Recorded, StoreError> {
        let key = nonce_key(nonce);
        let mut g = self.lock();
        let now_us = now.timestamp_micros();
        if g.by_nonce.get(&key).is_some_and(|exp| *exp >= now_us) {
            return Ok(Recorded::AlreadySeen);
        }
        if g.by_nonce.len() >= capacity {
            g.purge(now_us);
            if g.by_nonce.len() >= capacity {
                return Ok(Recorded::Full);
            }
        }
        let exp = expires_at.timestamp_micros();
        if let Some(old) = g.by_nonce.insert(key, exp) {
            g.by_expiry.remove(&(old, key));
        }
        g.by_expiry.insert((exp, key));
        Ok(Recorded::Fresh)
    }

    fn purge_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        Ok(self.lock().purge(now.timestamp_micros()))
    }

    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.lock().by_nonce.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn memory_store_semantics() {
        let s = MemoryNonceStore::new();
        let t0 = Utc::now();
        let exp = t0 + Duration::seconds(300);
        assert_eq!(s.record("a", exp, t0, 2), Ok(Recorded::Fresh));
        assert_eq!(s.record("a", exp, t0, 2), Ok(Recorded::AlreadySeen));
        assert_eq!(s.contains("a", t0), Ok(true));
        assert_eq!(s.record("b", exp, t0, 2), Ok(Recorded::Fresh));
        assert_eq!(
            s.record("c", exp, t0, 2),
            Ok(Recorded::Full),
            "full of live nonces"
        );
        // At the expiry instant the nonce is still live (freshness accepts age == window).
        assert_eq!(s.record("c", exp, exp, 2), Ok(Recorded::Full));
        let later = exp + Duration::microseconds(1);
        assert_eq!(s.contains("a", later), Ok(false));
        assert_eq!(
            s.record("c", later + Duration::seconds(300), later, 2),
            Ok(Recorded::Fresh)
        );
        assert_eq!(s.len(), Ok(1), "expired entries were purged to make room");
    }
}
