//! Stored policies: every version a controller accepted, as the signed `POLICY_UPDATE`
//! envelope it came in (so it can be re-published or handed to a child verbatim).
//! Versions only grow: storing one not newer than the current is refused.

use chrono::{DateTime, Utc};
use pdsno_shared::time::format_iso;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Nib, NibError};

impl Nib {
    /// Stores `envelope` (JSON text) as version `version` of `policy_id` if it is newer
    /// than every stored version; returns whether it was stored.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn store_policy(
        &self,
        policy_id: &str,
        version: u64,
        envelope: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, NibError> {
        let version = i64::try_from(version)
            .map_err(|_| NibError::Corrupt(format!("policy version {version} out of range")))?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<i64> = tx.query_row(
            "SELECT MAX(policy_version) FROM policies WHERE policy_id = ?1",
            params![policy_id],
            |r| r.get(0),
        )?;
        if current.is_some_and(|c| c >= version) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO policies (policy_id, policy_version, envelope, received_at) VALUES (?1, ?2, ?3, ?4)",
            params![policy_id, version, envelope, format_iso(now)],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// The newest version of `policy_id`: (version, envelope JSON).
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn current_policy(&self, policy_id: &str) -> Result<Option<(u64, String)>, NibError> {
        let row: Option<(i64, String)> = self
            .conn()
            .query_row(
                "SELECT policy_version, envelope FROM policies WHERE policy_id = ?1
                 ORDER BY policy_version DESC LIMIT 1",
                params![policy_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(v, e)| (u64::try_from(v).unwrap_or(0), e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_grow() {
        let dir = tempfile::tempdir().expect("tmp");
        let nib = Nib::open(dir.path().join("nib.db")).expect("open");
        let now = chrono::Utc::now();
        assert_eq!(nib.current_policy("global").expect("read"), None);
        assert!(
            nib.store_policy("global", 2, "{\"v\":2}", now)
                .expect("store")
        );
        assert!(
            !nib.store_policy("global", 1, "{\"v\":1}", now)
                .expect("older")
        );
        assert!(
            !nib.store_policy("global", 2, "{\"v\":2b}", now)
                .expect("same")
        );
        assert!(
            nib.store_policy("global", 5, "{\"v\":5}", now)
                .expect("newer")
        );
        assert_eq!(
            nib.current_policy("global").expect("read"),
            Some((5, "{\"v\":5}".into()))
        );
        assert!(nib.store_policy("other", 1, "{}", now).expect("other id"));
    }
}
