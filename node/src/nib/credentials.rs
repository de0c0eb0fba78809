//! MQTT credentials the global controller issued (only their SHA-256 is stored).

use chrono::{DateTime, Utc};
use pdsno_shared::time::format_iso;
use rusqlite::params;
use sha2::{Digest, Sha256};

use super::{Nib, NibError};

/// SHA-256 hex of a credential secret.
pub fn credential_hash(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

impl Nib {
    /// Stores (or replaces) the credential of `controller_id`.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn put_mqtt_credential(
        &self,
        controller_id: &str,
        secret: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), NibError> {
        self.conn().execute(
            "INSERT INTO mqtt_credentials (controller_id, secret_hash, issued_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(controller_id) DO UPDATE SET secret_hash = excluded.secret_hash, issued_at = excluded.issued_at",
            params![controller_id, credential_hash(secret), format_iso(now)],
        )?;
        Ok(())
    }

    /// Removes the credential of `controller_id`.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn delete_mqtt_credential(&self, controller_id: &str) -> Result<bool, NibError> {
        Ok(self.conn().execute(
            "DELETE FROM mqtt_credentials WHERE controller_id = ?1",
            params![controller_id],
        )? > 0)
    }

    /// Every (controller id, secret hash).
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn mqtt_credentials(&self) -> Result<Vec<(String, String)>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT controller_id, secret_hash FROM mqtt_credentials")?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}
