//! The node's own durable facts: its assigned id, certificate, parent and trust anchors.

use pdsno_shared::json::{self, Value};
use rusqlite::{OptionalExtension, params};

use super::{Nib, NibError};

/// Keys of the `node_state` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKey {
    /// The id this node uses (assigned by its parent, or `global_cntl_1`).
    AssignedId,
    /// The temporary id it was admitted under.
    TempId,
    /// Its role.
    Role,
    /// Its region.
    Region,
    /// Its certificate (JSON object).
    Certificate,
    /// A regional controller's delegation credential (JSON object).
    DelegationCredential,
    /// The parent's id.
    ParentId,
    /// The parent's Ed25519 public key (base64), pinned at admission.
    ParentPublicKey,
    /// The global controller's public key (base64): the root of trust.
    RootPublicKey,
    /// For a local controller: the chain its parent presented (JSON object).
    Chain,
    /// Our MQTT credential (hex), issued by the global controller.
    MqttCredential,
    /// The broker URL the global controller suggested.
    MqttUrl,
    /// Our gRPC URL, as children and tools should reach it.
    GrpcUrl,
    /// The parent's gRPC URL we were admitted through (used when none is configured).
    ParentUrl,
    /// A local controller's last completed discovery cycle (number).
    DiscoveryCycle,
    /// Set when undelivered reports were dropped: the next report is a full snapshot.
    DiscoveryResync,
    /// A regional controller's last summary: the `changed_seq` it covered.
    SummaryMark,
}

impl StateKey {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StateKey::AssignedId => "assigned_id",
            StateKey::TempId => "temp_id",
            StateKey::Role => "role",
            StateKey::Region => "region",
            StateKey::Certificate => "certificate",
            StateKey::DelegationCredential => "delegation_credential",
            StateKey::ParentId => "parent_id",
            StateKey::ParentPublicKey => "parent_public_key",
            StateKey::RootPublicKey => "root_public_key",
            StateKey::Chain => "chain",
            StateKey::MqttCredential => "mqtt_credential",
            StateKey::MqttUrl => "mqtt_url",
            StateKey::GrpcUrl => "grpc_url",
            StateKey::ParentUrl => "parent_url",
            StateKey::DiscoveryCycle => "discovery_cycle",
            StateKey::DiscoveryResync => "discovery_resync",
            StateKey::SummaryMark => "summary_mark",
        }
    }
}

impl Nib {
    /// Reads a state value.
    ///
    /// # Errors
    /// On an SQLite failure or a corrupt value.
    pub fn state(&self, key: StateKey) -> Result<Option<Value>, NibError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT value FROM node_state WHERE key = ?1",
                params![key.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| {
            json::parse(t.as_bytes())
                .map_err(|e| NibError::Corrupt(format!("node_state {}: {e}", key.as_str())))
        })
        .transpose()
    }

    /// Reads a state value that is a string.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn state_str(&self, key: StateKey) -> Result<Option<String>, NibError> {
        Ok(self.state(key)?.and_then(|v| v.as_str().map(str::to_owned)))
    }

    /// Writes several state values in one transaction.
    ///
    /// (See [`put_state`] to write inside a larger transaction.)
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    pub fn set_state(&self, values: &[(StateKey, Value)]) -> Result<(), NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (k, v) in values {
            tx.execute(
                "INSERT INTO node_state (key, value, version) VALUES (?1, ?2, 0)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = node_state.version + 1",
                params![k.as_str(), json::to_canonical_string(v)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Writes a state value inside the caller's transaction.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn put_state(
    conn: &rusqlite::Connection,
    key: StateKey,
    value: &Value,
) -> Result<(), NibError> {
    conn.execute(
        "INSERT INTO node_state (key, value, version) VALUES (?1, ?2, 0)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = node_state.version + 1",
        params![key.as_str(), json::to_canonical_string(value)],
    )?;
    Ok(())
}

/// Reads a state value inside the caller's transaction.
///
/// # Errors
/// On an SQLite failure or a corrupt value.
pub(crate) fn get_state(
    conn: &rusqlite::Connection,
    key: StateKey,
) -> Result<Option<Value>, NibError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM node_state WHERE key = ?1",
            params![key.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    text.map(|t| {
        json::parse(t.as_bytes())
            .map_err(|e| NibError::Corrupt(format!("node_state {}: {e}", key.as_str())))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nib.db");
        {
            let nib = Nib::open(&path).expect("open");
            assert_eq!(nib.state(StateKey::AssignedId).expect("read"), None);
            nib.set_state(&[
                (StateKey::AssignedId, "regional_cntl_zone-A_1".into()),
                (StateKey::Region, "zone-A".into()),
            ])
            .expect("write");
            nib.set_state(&[(StateKey::AssignedId, "regional_cntl_zone-A_2".into())])
                .expect("overwrite");
        }
        let nib = Nib::open(&path).expect("reopen");
        assert_eq!(
            nib.state_str(StateKey::AssignedId)
                .expect("read")
                .as_deref(),
            Some("regional_cntl_zone-A_2")
        );
        assert_eq!(
            nib.state_str(StateKey::Region).expect("read").as_deref(),
            Some("zone-A")
        );
    }
}
