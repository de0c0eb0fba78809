//! Pairwise keys: agreement, rotation with a grace period, and their use for signing.
//!
//! Life of a key:
//! - the initiator of an exchange stores the new key as *current* when the answer arrives
//!   (its previous key starts *retiring*);
//! - the responder stores it as *pending*: it verifies with it but keeps signing with the
//!   previous key until the initiator uses the new one, which proves the initiator has it;
//!   then the responder promotes it to current (the previous key starts retiring);
//! - a retiring key verifies until its grace period ends, then it is deleted; a pending key
//!   the initiator never used is dropped after an hour.
//!
//! Every transition is written to the NIB before it takes effect, so a restart in the
//! middle of a rotation resumes from a consistent state (and a rotation the operator asked
//! for is remembered until it is done).

pub mod exchange;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, Utc};
use pdsno_shared::keys::{HmacKey, KeyRing, RingKeyParts};

use crate::nib::{KeyState, Nib, NibError, StoredKey};

/// A key's public description (never its material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key id.
    pub key_id: String,
    /// The peer.
    pub peer_id: String,
    /// State.
    pub state: &'static str,
    /// When agreed.
    pub created_at: DateTime<Utc>,
    /// When it stops verifying.
    pub retires_at: Option<DateTime<Utc>>,
}

/// The pairwise keys of one node: the NIB is the truth, memory a cache of it.
pub struct PairKeys {
    nib: Arc<Nib>,
    grace: Duration,
    keys: RwLock<HashMap<String, Vec<StoredKey>>>,
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKeys")
            .field("peers", &self.read().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn state_name(s: KeyState) -> &'static str {
    match s {
        KeyState::Pending => "pending",
        KeyState::Current => "current",
        KeyState::Retiring => "retiring",
    }
}

impl PairKeys {
    /// Loads the keys stored in `nib`; superseded keys verify for `grace`.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn load(nib: Arc<Nib>, grace: Duration) -> Result<Self, NibError> {
        let pk = PairKeys {
            nib,
            grace,
            keys: RwLock::new(HashMap::new()),
        };
        pk.reload()?;
        Ok(pk)
    }

    fn reload(&self) -> Result<(), NibError> {
        let mut map: HashMap<String, Vec<StoredKey>> = HashMap::new();
        for k in self.nib.pair_keys()? {
            map.entry(k.peer_id.clone()).or_default().push(k);
        }
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = map;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<StoredKey>>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Keys that verify messages from `peer` at `now` (pending, current, retiring in grace).
    pub fn verify_ring(&self, peer: &str, now: DateTime<Utc>) -> Option<KeyRing> {
        let g = self.read();
        let keys = g.get(peer)?;
        let mut ring = KeyRing::new(self.grace);
        for k in keys {
            if k.state == KeyState::Retiring && k.retires_at.is_none_or(|r| r < now) {
                continue;
            }
            ring.restore(RingKeyParts {
                id: Some(k.key_id.clone()),
                key: k.key.clone(),
                added_at: k.created_at,
                retires_at: k.retires_at,
            });
        }
        (!ring.is_empty()).then_some(ring)
    }

    /// The key to sign messages for `peer` with.
    pub fn signing_key(&self, peer: &str) -> Option<(String, HmacKey)> {
        let g = self.read();
        g.get(peer)?
            .iter()
            .filter(|k| k.state == KeyState::Current)
            .max_by_key(|k| k.created_at)
            .map(|k| (k.key_id.clone(), k.key.clone()))
    }

    /// A key shared with `peer` by its id (any state).
    pub fn key_by_id(&self, peer: &str, key_id: &str) -> Option<HmacKey> {
        self.read()
            .get(peer)?
            .iter()
            .find(|k| k.key_id == key_id)
            .map(|k| k.key.clone())
    }

    /// The highest key generation shared with `peer` (0: none).
    pub fn generation(&self, peer: &str) -> u32 {
        self.read().get(peer).map_or(0, |v| {
            v.iter()
                .map(|k| pdsno_shared::keyx::generation_of(&k.key_id))
                .max()
                .unwrap_or(0)
        })
    }

    /// Age of the current key with `peer`.
    pub fn current_age(&self, peer: &str, now: DateTime<Utc>) -> Option<Duration> {
        let g = self.read();
        g.get(peer)?
            .iter()
            .filter(|k| k.state == KeyState::Current)
            .map(|k| now - k.created_at)
            .min()
    }

    /// Peers we share a key with.
    pub fn peers(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn put(
        &self,
        peer: &str,
        key_id: &str,
        key: &HmacKey,
        state: KeyState,
        now: DateTime<Utc>,
    ) -> Result<(), NibError> {
        self.nib
            .put_pair_key(peer, key_id, key, state, now, now + self.grace)?;
        self.reload()
    }

    /// Initiator: the agreed key becomes current at once.
    ///
    /// # Errors
    /// On a NIB failure (nothing changes then).
    pub fn install_current(
        &self,
        peer: &str,
        key_id: &str,
        key: &HmacKey,
        now: DateTime<Utc>,
    ) -> Result<(), NibError> {
        self.put(peer, key_id, key, KeyState::Current, now)
    }

    /// Responder: the agreed key waits for the initiator to use it.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn install_pending(
        &self,
        peer: &str,
        key_id: &str,
        key: &HmacKey,
        now: DateTime<Utc>,
    ) -> Result<(), NibError> {
        self.put(peer, key_id, key, KeyState::Pending, now)
    }

    /// A message from `peer` verified with `key_id`: a pending key is thereby confirmed and
    /// becomes current. Returns true when that happened.
    pub fn confirm(&self, peer: &str, key_id: &str, now: DateTime<Utc>) -> bool {
        let pending = {
            let g = self.read();
            g.get(peer).and_then(|v| {
                v.iter()
                    .find(|k| k.key_id == key_id && k.state == KeyState::Pending)
                    .map(|k| k.key.clone())
            })
        };
        let Some(key) = pending else { return false };
        match self.put(peer, key_id, &key, KeyState::Current, now) {
            Ok(()) => {
                tracing::info!(%peer, %key_id, "pairwise key confirmed by the peer; now signing with it");
                true
            }
            Err(e) => {
                tracing::error!(%peer, %key_id, error = %e, "cannot promote a confirmed key");
                false
            }
        }
    }

    /// Drops keys past their grace period and unconfirmed keys older than an hour.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn expire(&self, now: DateTime<Utc>) -> Result<usize, NibError> {
        let n = self.nib.drop_old_pair_keys(now, now - Duration::hours(1))?;
        if n > 0 {
            self.reload()?;
        }
        Ok(n)
    }

    /// Forgets every key shared with `peer`.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn remove_peer(&self, peer: &str) -> Result<usize, NibError> {
        let n = self.nib.delete_pair_keys(peer)?;
        self.reload()?;
        Ok(n)
    }

    /// Every key, described.
    pub fn list(&self) -> Vec<KeyInfo> {
        let mut v: Vec<KeyInfo> = self
            .read()
            .values()
            .flatten()
            .map(|k| KeyInfo {
                key_id: k.key_id.clone(),
                peer_id: k.peer_id.clone(),
                state: state_name(k.state),
                created_at: k.created_at,
                retires_at: k.retires_at,
            })
            .collect();
        v.sort_by(|a, b| (&a.peer_id, a.created_at).cmp(&(&b.peer_id, b.created_at)));
        v
    }
}

/// Describes keys stored in a NIB without loading a node (for `pdsno keys list`).
///
/// # Errors
/// On a NIB failure.
pub fn describe(nib: &Nib) -> Result<Vec<KeyInfo>, NibError> {
    let mut v: Vec<KeyInfo> = nib
        .pair_keys()?
        .into_iter()
        .map(|k| KeyInfo {
            key_id: k.key_id,
            peer_id: k.peer_id,
            state: state_name(k.state),
            created_at: k.created_at,
            retires_at: k.retires_at,
        })
        .collect();
    v.sort_by(|a, b| (&a.peer_id, a.created_at).cmp(&(&b.peer_id, b.created_at)));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_keys_verify_then_take_over_when_confirmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Arc::new(Nib::open(dir.path().join("nib.db")).expect("open"));
        let pk = PairKeys::load(nib.clone(), Duration::minutes(10)).expect("load");
        let t0 = Utc::now();
        let (k1, k2) = (HmacKey::random(), HmacKey::random());
        pk.install_current("rc", "key_gc_rc", &k1, t0)
            .expect("install");
        pk.install_pending("rc", "key_gc_rc.2", &k2, t0)
            .expect("pending");
        assert_eq!(
            pk.signing_key("rc").map(|k| k.0),
            Some("key_gc_rc".into()),
            "still signing with the old key"
        );
        let ring = pk.verify_ring("rc", t0).expect("ring");
        assert_eq!(ring.live(t0).count(), 2, "both verify");
        assert!(pk.confirm("rc", "key_gc_rc.2", t0));
        assert!(!pk.confirm("rc", "key_gc_rc.2", t0), "only once");
        assert_eq!(
            pk.signing_key("rc").map(|k| k.0),
            Some("key_gc_rc.2".into())
        );
        assert_eq!(pk.generation("rc"), 2);
        // After the grace period the old key no longer verifies, and is dropped.
        let later = t0 + Duration::minutes(11);
        assert_eq!(
            pk.verify_ring("rc", later)
                .expect("ring")
                .live(later)
                .count(),
            1
        );
        assert_eq!(pk.expire(later).expect("expire"), 1);
        // Reloading from the NIB gives the same picture (restart).
        let again = PairKeys::load(nib, Duration::minutes(10)).expect("load");
        assert_eq!(
            again.signing_key("rc").map(|k| k.0),
            Some("key_gc_rc.2".into())
        );
        assert!(!format!("{:?}", again.list()).contains(&hex::encode(k2.expose_bytes())));
    }
}
