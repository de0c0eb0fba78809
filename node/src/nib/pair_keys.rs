//! Stored pairwise keys (material never leaves the NIB except to sign and verify).

use chrono::{DateTime, Utc};
use pdsno_shared::keys::HmacKey;
use pdsno_shared::time::{format_iso, parse_iso};
use rusqlite::params;

use super::{Nib, NibError};

/// Where a key is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Agreed by us as responder; verifies, but we sign with it only once the peer has
    /// used it (proof that it has it too).
    Pending,
    /// The key we sign with.
    Current,
    /// Superseded; verifies until `retires_at`.
    Retiring,
}

impl KeyState {
    fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Current => "current",
            KeyState::Retiring => "retiring",
        }
    }

    fn parse(s: &str) -> KeyState {
        match s {
            "pending" => KeyState::Pending,
            "current" => KeyState::Current,
            _ => KeyState::Retiring,
        }
    }
}

/// A stored key.
#[derive(Clone, Debug)]
pub struct StoredKey {
    /// Key id.
    pub key_id: String,
    /// The peer.
    pub peer_id: String,
    /// Material.
    pub key: HmacKey,
    /// State.
    pub state: KeyState,
    /// When it was agreed.
    pub created_at: DateTime<Utc>,
    /// When it stops verifying (retiring keys).
    pub retires_at: Option<DateTime<Utc>>,
}

impl Nib {
    /// Every stored pairwise key.
    ///
    /// # Errors
    /// On an SQLite failure or corrupt rows.
    pub fn pair_keys(&self) -> Result<Vec<StoredKey>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT key_id, peer_id, material, state, created_at, retires_at FROM pair_keys ORDER BY created_at")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key_id, peer_id, material, state, created, retires) = row?;
            let key = HmacKey::from_bytes(&material)
                .map_err(|e| NibError::Corrupt(format!("pair key {key_id}: {e}")))?;
            let created_at = parse_iso(&created)
                .map_err(|e| NibError::Corrupt(format!("pair key {key_id}: {e}")))?;
            let retires_at = retires
                .map(|t| parse_iso(&t))
                .transpose()
                .map_err(|e| NibError::Corrupt(format!("pair key {key_id}: {e}")))?;
            out.push(StoredKey {
                key_id,
                peer_id,
                key,
                state: KeyState::parse(&state),
                created_at,
                retires_at,
            });
        }
        Ok(out)
    }

    /// Stores `key` for `peer` in `state`; when it is `Current`, the peer's previous
    /// current key starts retiring at `retire_old_at`. One transaction.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn put_pair_key(
        &self,
        peer: &str,
        key_id: &str,
        key: &HmacKey,
        state: KeyState,
        now: DateTime<Utc>,
        retire_old_at: DateTime<Utc>,
    ) -> Result<(), NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if state == KeyState::Current {
            tx.execute(
                "UPDATE pair_keys SET state = 'retiring', retires_at = ?1, version = version + 1 WHERE peer_id = ?2 AND state = 'current' AND key_id != ?3",
                params![format_iso(retire_old_at), peer, key_id],
            )?;
        }
        tx.execute(
            "INSERT INTO pair_keys (key_id, peer_id, material, state, created_at, retires_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL)
             ON CONFLICT(key_id) DO UPDATE SET peer_id = excluded.peer_id, material = excluded.material, state = excluded.state,
                 created_at = excluded.created_at, retires_at = NULL, version = pair_keys.version + 1",
            params![key_id, peer, key.expose_bytes(), state.as_str(), format_iso(now)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes retiring keys past their time and pending keys older than `pending_before`.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn drop_old_pair_keys(
        &self,
        now: DateTime<Utc>,
        pending_before: DateTime<Utc>,
    ) -> Result<usize, NibError> {
        let stale: Vec<String> = self
            .pair_keys()?
            .into_iter()
            .filter(|k| match k.state {
                KeyState::Retiring => k.retires_at.is_none_or(|t| t < now),
                KeyState::Pending => k.created_at < pending_before,
                KeyState::Current => false,
            })
            .map(|k| k.key_id)
            .collect();
        let conn = self.conn();
        let mut n = 0;
        for id in stale {
            n += conn.execute("DELETE FROM pair_keys WHERE key_id = ?1", params![id])?;
        }
        Ok(n)
    }

    /// Deletes every key shared with `peer` (revocation).
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn delete_pair_keys(&self, peer: &str) -> Result<usize, NibError> {
        Ok(self
            .conn()
            .execute("DELETE FROM pair_keys WHERE peer_id = ?1", params![peer])?)
    }

    /// Records that a rotation with `peer` was asked for (survives a restart).
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn request_rotation(&self, peer: &str, now: DateTime<Utc>) -> Result<(), NibError> {
        self.conn().execute(
            "INSERT INTO rotation_requests (peer_id, requested_at) VALUES (?1, ?2) ON CONFLICT(peer_id) DO NOTHING",
            params![peer, format_iso(now)],
        )?;
        Ok(())
    }

    /// Peers with a rotation outstanding.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn rotation_requests(&self) -> Result<Vec<String>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT peer_id FROM rotation_requests ORDER BY requested_at")?;
        let rows = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// Marks the rotation with `peer` done.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn rotation_done(&self, peer: &str) -> Result<(), NibError> {
        self.conn().execute(
            "DELETE FROM rotation_requests WHERE peer_id = ?1",
            params![peer],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn current_supersedes_and_old_keys_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Nib::open(dir.path().join("nib.db")).expect("open");
        let t0 = Utc::now();
        let (k1, k2) = (HmacKey::random(), HmacKey::random());
        nib.put_pair_key(
            "gc",
            "key_a",
            &k1,
            KeyState::Current,
            t0,
            t0 + Duration::minutes(10),
        )
        .expect("put");
        nib.put_pair_key(
            "gc",
            "key_a.2",
            &k2,
            KeyState::Current,
            t0,
            t0 + Duration::minutes(10),
        )
        .expect("put");
        let keys = nib.pair_keys().expect("read");
        let state = |id: &str| {
            keys.iter()
                .find(|k| k.key_id == id)
                .map(|k| (k.state, k.retires_at.is_some()))
        };
        assert_eq!(state("key_a"), Some((KeyState::Retiring, true)));
        assert_eq!(state("key_a.2"), Some((KeyState::Current, false)));
        assert_eq!(
            keys.iter()
                .find(|k| k.key_id == "key_a.2")
                .map(|k| k.key.clone()),
            Some(k2)
        );
        assert_eq!(
            nib.drop_old_pair_keys(t0 + Duration::minutes(5), t0 - Duration::hours(1))
                .expect("drop"),
            0
        );
        assert_eq!(
            nib.drop_old_pair_keys(t0 + Duration::minutes(11), t0 - Duration::hours(1))
                .expect("drop"),
            1
        );
        nib.request_rotation("gc", t0).expect("request");
        assert_eq!(nib.rotation_requests().expect("read"), ["gc"]);
        nib.rotation_done("gc").expect("done");
        assert!(nib.rotation_requests().expect("read").is_empty());
        assert_eq!(nib.delete_pair_keys("gc").expect("delete"), 1);
    }
}
