//! A key ring: sign with the newest key, verify with any key still inside its grace period.
//!
//! Adding a key makes it the signing key and starts the previous signing key's grace period;
//! once that period has passed the old key no longer verifies (and [`KeyRing::prune`] drops
//! it). This lets two peers rotate a shared key without losing a message in flight.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use super::secret::HmacKey;

/// Default grace period of a superseded key (10 minutes).
pub const DEFAULT_GRACE: Duration = Duration::minutes(10);

/// One key of a ring.
#[derive(Clone)]
pub struct RingKey {
    /// The key's name (`key_id` on the wire), if it has one.
    pub id: Option<String>,
    key: HmacKey,
    /// When it joined the ring.
    pub added_at: DateTime<Utc>,
    /// When it stops verifying (set when a newer key supersedes it).
    pub retires_at: Option<DateTime<Utc>>,
}

impl RingKey {
    /// The key material.
    pub fn key(&self) -> &HmacKey {
        &self.key
    }

    /// True while the key verifies.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.retires_at.is_none_or(|r| now <= r)
    }
}

impl fmt::Debug for RingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingKey")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("added_at", &self.added_at)
            .field("retires_at", &self.retires_at)
            .finish()
    }
}

/// An ordered set of HMAC keys (oldest first; the last one signs).
#[derive(Clone, Debug)]
pub struct KeyRing {
    keys: Vec<RingKey>,
    grace: Duration,
    announce_key_id: bool,
}

impl KeyRing {
    /// An empty ring whose superseded keys verify for `grace`.
    pub fn new(grace: Duration) -> Self {
        KeyRing {
            keys: Vec::new(),
            grace,
            announce_key_id: true,
        }
    }

    /// A ring holding one key.
    ///
    /// A key without an id is the compat network key: messages signed with it carry no
    /// `key_id`, exactly like the original's.
    pub fn single(id: Option<String>, key: HmacKey, now: DateTime<Utc>) -> Self {
        let mut r = KeyRing::new(DEFAULT_GRACE);
        r.add(id, key, now);
        r
    }

    /// Whether signing adds a `key_id` field (default true for keys that have an id).
    pub fn set_announce_key_id(&mut self, on: bool) {
        self.announce_key_id = on;
    }

    /// True when signing should name the key.
    pub fn announces_key_id(&self) -> bool {
        self.announce_key_id
    }

    /// The grace period of superseded keys.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Adds `key` as the newest (signing) key; the previous signing key now retires after
    /// the grace period. A key with an id already in the ring replaces that entry.
    pub fn add(&mut self, id: Option<String>, key: HmacKey, now: DateTime<Utc>) {
        if id.is_some() {
            self.keys.retain(|k| k.id != id);
        }
        let retire = now + self.grace;
        for k in &mut self.keys {
            if k.retires_at.is_none_or(|r| r > retire) {
                k.retires_at = Some(retire);
            }
        }
        self.keys.push(RingKey {
            id,
            key,
            added_at: now,
            retires_at: None,
        });
    }

    /// Restores a key exactly as stored (used when loading a ring from disk).
    pub fn restore(&mut self, entry: RingKeyParts) {
        self.keys.push(RingKey {
            id: entry.id,
            key: entry.key,
            added_at: entry.added_at,
            retires_at: entry.retires_at,
        });
        self.keys.sort_by_key(|k| k.added_at);
    }

    /// The signing key: the newest one.
    pub fn current(&self) -> Option<&RingKey> {
        self.keys.last()
    }

    /// Keys that verify at `now`, newest first.
    pub fn live(&self, now: DateTime<Utc>) -> impl Iterator<Item = &RingKey> {
        self.keys.iter().rev().filter(move |k| k.is_live(now))
    }

    /// Every key, oldest first (for listing; never print the material).
    pub fn entries(&self) -> &[RingKey] {
        &self.keys
    }

    /// Drops keys whose grace period has passed; returns how many.
    pub fn prune(&mut self, now: DateTime<Utc>) -> usize {
        let before = self.keys.len();
        self.keys.retain(|k| k.is_live(now));
        before - self.keys.len()
    }

    /// True when the ring has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The stored form of a ring key (see [`KeyRing::restore`]).
#[derive(Debug)]
pub struct RingKeyParts {
    /// The key's name.
    pub id: Option<String>,
    /// The material.
    pub key: HmacKey,
    /// When it joined.
    pub added_at: DateTime<Utc>,
    /// When it stops verifying.
    pub retires_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> HmacKey {
        HmacKey::from_bytes(&[b; 32]).expect("32 bytes")
    }

    #[test]
    fn newest_signs_old_verifies_until_grace_ends() {
        let t0 = Utc::now();
        let mut ring = KeyRing::new(Duration::minutes(10));
        ring.add(Some("k1".into()), key(1), t0);
        ring.add(Some("k2".into()), key(2), t0 + Duration::minutes(1));
        assert_eq!(ring.current().and_then(|k| k.id.as_deref()), Some("k2"));
        let live = |t| {
            ring.live(t)
                .filter_map(|k| k.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(live(t0 + Duration::minutes(5)), ["k2", "k1"]);
        assert_eq!(
            live(t0 + Duration::minutes(11)),
            ["k2", "k1"],
            "grace is inclusive"
        );
        assert_eq!(live(t0 + Duration::minutes(12)), ["k2"]);
        let mut pruned = ring.clone();
        assert_eq!(pruned.prune(t0 + Duration::minutes(12)), 1);
        assert_eq!(pruned.entries().len(), 1);
    }

    #[test]
    fn debug_hides_material() {
        let ring = KeyRing::single(Some("k".into()), key(0xAB), Utc::now());
        let dbg = format!("{ring:?}");
        assert!(!dbg.to_lowercase().contains(&"ab".repeat(32)), "{dbg}");
        assert!(dbg.contains("redacted"));
    }
}
