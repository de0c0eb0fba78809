//! Admitted controllers, consumed bootstrap tokens and durable id sequences.
//!
//! Admission is one transaction: the token is checked and consumed, the next sequence
//! number of the role is taken (never reused, even across restarts), the controller row
//! and its certificate are written and a signed `CONTROLLER_VALIDATED` event is appended.
//! Either all of it happens or none.

use chrono::{DateTime, Utc};
use pdsno_shared::ids::{ControllerId, Role};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::IdentityKey;
use pdsno_shared::time::format_iso;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use super::events::{self, Event, EventRow};
use super::{Nib, NibError};

/// What the parent knows about a child it is admitting.
#[derive(Clone, Debug)]
pub struct AdmitRecord {
    /// The child's role.
    pub role: Role,
    /// Its region.
    pub region: String,
    /// Its temporary id.
    pub temp_id: String,
    /// Its identity public key (base64).
    pub public_key: String,
    /// The bootstrap token it presented.
    pub token: String,
    /// Who admits it (this node's id).
    pub validated_by: String,
    /// Its metadata.
    pub metadata: Map,
}

/// The result of a successful admission.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// The id assigned.
    pub assigned_id: String,
    /// The certificate stored (as built by the caller).
    pub certificate: Value,
    /// The audit event written.
    pub event: EventRow,
}

/// Why admission could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The token was consumed before (maybe by a concurrent admission).
    #[error("bootstrap token already used")]
    TokenAlreadyUsed,
    /// Building the certificate failed.
    #[error("cannot issue a certificate: {0}")]
    Certificate(String),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] NibError),
}

impl From<rusqlite::Error> for AdmitError {
    fn from(e: rusqlite::Error) -> Self {
        AdmitError::Db(NibError::Sqlite(e))
    }
}

/// A stored controller.
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerRow {
    /// Assigned id.
    pub controller_id: String,
    /// Role.
    pub role: String,
    /// Region.
    pub region: Option<String>,
    /// `active`, `revoked`, ...
    pub status: String,
    /// The temporary id it was admitted under.
    pub temp_id: Option<String>,
    /// Identity public key (base64).
    pub public_key: Option<String>,
    /// Certificate (JSON text).
    pub certificate: Option<String>,
    /// Who admitted it.
    pub validated_by: Option<String>,
    /// When.
    pub validated_at: Option<String>,
    /// Row version for compare-and-swap updates.
    pub version: i64,
}

/// A compare-and-swap update lost: the row changed (or vanished) since it was read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("conflict: {id} is at version {found:?}, expected {expected}")]
pub struct Conflict {
    /// The row.
    pub id: String,
    /// The version the caller read.
    pub expected: i64,
    /// The version now stored (None: no such row).
    pub found: Option<i64>,
}

/// A descendant's id is already bound to another identity key or another validating parent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{id} already belongs to a controller validated by {} (status {status})", validated_by.as_deref().unwrap_or("unknown"))]
pub struct Rebind {
    /// The id.
    pub id: String,
    /// Who validated the existing row.
    pub validated_by: Option<String>,
    /// The existing row's status.
    pub status: String,
}

/// SHA-256 of a token (tokens themselves are never stored).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

const COLUMNS: &str = "controller_id, role, region, status, temp_id, public_key, certificate, validated_by, validated_at, version";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ControllerRow> {
    Ok(ControllerRow {
        controller_id: r.get(0)?,
        role: r.get(1)?,
        region: r.get(2)?,
        status: r.get(3)?,
        temp_id: r.get(4)?,
        public_key: r.get(5)?,
        certificate: r.get(6)?,
        validated_by: r.get(7)?,
        validated_at: r.get(8)?,
        version: r.get(9)?,
    })
}

impl Nib {
    /// Records an admission atomically (see the module docs). `certificate` builds the
    /// child's certificate once its id is known.
    ///
    /// # Errors
    /// [`AdmitError::TokenAlreadyUsed`], a certificate failure, or a store failure; nothing
    /// is written in any of these cases.
    pub fn admit(
        &self,
        rec: &AdmitRecord,
        signer: &IdentityKey,
        now: DateTime<Utc>,
        certificate: impl FnOnce(&str) -> Result<Value, String>,
    ) -> Result<Admitted, AdmitError> {
        let hash = token_hash(&rec.token);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let used: Option<String> = tx
            .query_row(
                "SELECT temp_id FROM consumed_tokens WHERE token_hash = ?1",
                params![hash],
                |r| r.get(0),
            )
            .optional()?;
        if used.is_some() {
            return Err(AdmitError::TokenAlreadyUsed);
        }
        let kind = rec.role.as_str();
        // One sequence per role and region: `regional_cntl_zone-B_1` is zone B's first RC.
        let seq_kind = format!("{kind}/{}", rec.region);
        let last: Option<i64> = tx
            .query_row(
                "SELECT last FROM id_sequences WHERE kind = ?1",
                params![seq_kind],
                |r| r.get(0),
            )
            .optional()?;
        let mut seq = last.unwrap_or(0) + 1;
        // Never hand out an id that exists (for example one imported by an operator).
        let mut assigned_id = ControllerId::assigned(rec.role, &rec.region, seq as u64);
        while tx
            .query_row(
                "SELECT 1 FROM controllers WHERE controller_id = ?1",
                params![assigned_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some()
        {
            seq += 1;
            assigned_id = ControllerId::assigned(rec.role, &rec.region, seq as u64);
        }
        tx.execute(
            "INSERT INTO id_sequences (kind, last) VALUES (?1, ?2) ON CONFLICT(kind) DO UPDATE SET last = excluded.last",
            params![seq_kind, seq],
        )?;
        let cert = certificate(&assigned_id).map_err(AdmitError::Certificate)?;
        let when = format_iso(now);
        tx.execute(
            "INSERT INTO controllers (controller_id, role, region, status, temp_id, public_key, certificate, validated_by, validated_at, metadata)
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                assigned_id,
                kind,
                rec.region,
                rec.temp_id,
                rec.public_key,
                json::to_canonical_string(&cert),
                rec.validated_by,
                when,
                json::to_canonical_string(&Value::Object(rec.metadata.clone())),
            ],
        )?;
        tx.execute(
            "INSERT INTO consumed_tokens (token_hash, temp_id, assigned_id, consumed_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash, rec.temp_id, assigned_id, when],
        )?;
        let mut details = Map::new();
        details.insert("assigned_id".into(), assigned_id.clone().into());
        details.insert("role".into(), kind.into());
        details.insert("region".into(), rec.region.clone().into());
        details.insert("temp_id".into(), rec.temp_id.clone().into());
        let event = events::append(
            &tx,
            &Event {
                event_type: "CONTROLLER_VALIDATED".into(),
                actor: rec.validated_by.clone(),
                subject: Some(assigned_id.clone()),
                action: "Assigned controller identity".into(),
                decision: Some("APPROVED".into()),
                details,
            },
            signer,
            now,
        )?;
        tx.commit()?;
        Ok(Admitted {
            assigned_id,
            certificate: cert,
            event,
        })
    }

    /// Appends an audit event on its own.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn append_event(
        &self,
        ev: &Event,
        signer: &IdentityKey,
        now: DateTime<Utc>,
    ) -> Result<EventRow, NibError> {
        let conn = self.conn();
        events::append(&conn, ev, signer, now)
    }

    /// Events after `after` (oldest first), at most `limit`.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, NibError> {
        events::list(&self.conn(), after, limit)
    }

    /// The newest `limit` audit events of `event_type`, newest first.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn latest_events_of_type(
        &self,
        event_type: &str,
        limit: usize,
    ) -> Result<Vec<EventRow>, NibError> {
        events::latest_of_type(&self.conn(), event_type, limit)
    }

    /// The id a consumed token was spent on, if it was.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn token_assignment(&self, token: &str) -> Result<Option<String>, NibError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT assigned_id FROM consumed_tokens WHERE token_hash = ?1",
                params![token_hash(token)],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// True if the token was consumed.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn token_used(&self, token: &str) -> Result<bool, NibError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM consumed_tokens WHERE token_hash = ?1",
                params![token_hash(token)],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Active controllers of `role` in `region`.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn count_active(&self, role: Role, region: &str) -> Result<u64, NibError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM controllers WHERE role = ?1 AND region = ?2 AND status = 'active'",
            params![role.as_str(), region],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// One controller.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn controller(&self, id: &str) -> Result<Option<ControllerRow>, NibError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM controllers WHERE controller_id = ?1"),
                params![id],
                read_row,
            )
            .optional()?)
    }

    /// A controller's metadata (JSON object), if the controller exists.
    ///
    /// # Errors
    /// On an SQLite failure or corrupt JSON.
    pub fn controller_metadata(&self, id: &str) -> Result<Option<Map>, NibError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT metadata FROM controllers WHERE controller_id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        match text {
            None => Ok(None),
            Some(t) => match json::parse(t.as_bytes()) {
                Ok(Value::Object(m)) => Ok(Some(m)),
                _ => Err(NibError::Corrupt(format!("metadata of {id}"))),
            },
        }
    }

    /// Records (or refreshes) a controller admitted by one of our children, so this node
    /// knows the whole tree below it. The row is active; an existing revoked row stays
    /// revoked.
    ///
    /// An id is never re-bound: a row validated by another controller, or holding another
    /// identity key, is left as it is and [`Rebind`] says whose it is.
    ///
    /// # Errors
    /// `Ok(Err(Rebind))` when the id belongs to another key or validator; `Err` on an
    /// SQLite failure.
    pub fn register_descendant(
        &self,
        row: &ControllerRow,
        now: DateTime<Utc>,
    ) -> Result<Result<(), Rebind>, NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(Option<String>, Option<String>, String)> = tx
            .query_row(
                "SELECT validated_by, public_key, status FROM controllers WHERE controller_id = ?1",
                params![row.controller_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((validated_by, public_key, status)) = existing
            && (validated_by != row.validated_by
                || public_key != row.public_key
                || status == "revoked")
        {
            return Ok(Err(Rebind {
                id: row.controller_id.clone(),
                validated_by,
                status,
            }));
        }
        tx.execute(
            "INSERT INTO controllers (controller_id, role, region, status, temp_id, public_key, certificate, validated_by, validated_at)
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(controller_id) DO UPDATE SET certificate = excluded.certificate,
                 version = controllers.version + 1 WHERE controllers.status != 'revoked'",
            params![row.controller_id, row.role, row.region, row.temp_id, row.public_key, row.certificate, row.validated_by, format_iso(now)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// The highest sequence number among the assigned ids of `role` in `region` (0: none),
    /// counting every row whatever its status, and the id sequence itself.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn highest_sequence(&self, role: Role, region: &str) -> Result<u64, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT controller_id FROM controllers WHERE role = ?1")?;
        let ids = st
            .query_map(params![role.as_str()], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let from_rows = ids
            .iter()
            .filter_map(|id| ControllerId::parse(id))
            .filter(|c| c.region.as_deref() == Some(region))
            .map(|c| c.seq)
            .max()
            .unwrap_or(0);
        let seq: Option<i64> = conn
            .query_row(
                "SELECT last FROM id_sequences WHERE kind = ?1",
                params![format!("{}/{region}", role.as_str())],
                |r| r.get(0),
            )
            .optional()?;
        Ok(from_rows.max(seq.unwrap_or(0).max(0) as u64))
    }

    /// Makes the next id of `role` in `region` start above `floor` (the ids an earlier
    /// holder of this role already used); never lowers the sequence.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn raise_sequence(&self, role: Role, region: &str, floor: u64) -> Result<(), NibError> {
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        self.conn().execute(
            "INSERT INTO id_sequences (kind, last) VALUES (?1, ?2)
             ON CONFLICT(kind) DO UPDATE SET last = MAX(last, excluded.last)",
            params![format!("{}/{region}", role.as_str()), floor],
        )?;
        Ok(())
    }

    /// Every controller, by id.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn controllers(&self) -> Result<Vec<ControllerRow>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM controllers ORDER BY controller_id"
        ))?;
        let rows = st.query_map([], read_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Sets a controller's status if its row is still at `expected_version`; returns the
    /// new version.
    ///
    /// # Errors
    /// `Ok(Err(Conflict))` when the row changed or is missing; `Err` on SQLite failure.
    pub fn set_controller_status(
        &self,
        id: &str,
        status: &str,
        expected_version: i64,
    ) -> Result<Result<i64, Conflict>, NibError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE controllers SET status = ?1, version = version + 1 WHERE controller_id = ?2 AND version = ?3",
            params![status, id, expected_version],
        )?;
        if n == 1 {
            return Ok(Ok(expected_version + 1));
        }
        let found: Option<i64> = conn
            .query_row(
                "SELECT version FROM controllers WHERE controller_id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Err(Conflict {
            id: id.to_owned(),
            expected: expected_version,
            found,
        }))
    }

    /// True if `subject` (a temp id or a public key) is on the blocklist.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn blocked(&self, subject: &str) -> Result<bool, NibError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM blocklist WHERE subject = ?1",
                params![subject],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Why and when `subject` was blocklisted, if it is.
    ///
    /// # Errors
    /// Database errors.
    pub fn block_entry(&self, subject: &str) -> Result<Option<(String, String)>, NibError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT reason, added_at FROM blocklist WHERE subject = ?1",
                params![subject],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Adds `subject` to the blocklist.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn block(&self, subject: &str, reason: &str, now: DateTime<Utc>) -> Result<(), NibError> {
        self.conn().execute(
            "INSERT INTO blocklist (subject, reason, added_at) VALUES (?1, ?2, ?3) ON CONFLICT(subject) DO NOTHING",
            params![subject, reason, format_iso(now)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nib::verify_chain;

    fn rec(temp: &str, token: &str) -> AdmitRecord {
        AdmitRecord {
            role: Role::Regional,
            region: "zone-A".into(),
            temp_id: temp.into(),
            public_key: "pk".into(),
            token: token.into(),
            validated_by: "global_cntl_1".into(),
            metadata: Map::new(),
        }
    }

    #[test]
    fn ids_are_durable_tokens_single_use_and_events_chained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nib.db");
        let key = IdentityKey::generate();
        let cert = |id: &str| Ok(Value::from(format!("cert-of-{id}")));
        {
            let nib = Nib::open(&path).expect("open");
            let a = nib
                .admit(&rec("t1", "tok1"), &key, Utc::now(), cert)
                .expect("admit");
            assert_eq!(a.assigned_id, "regional_cntl_zone-A_1");
            let b = nib
                .admit(&rec("t2", "tok2"), &key, Utc::now(), cert)
                .expect("admit");
            assert_eq!(b.assigned_id, "regional_cntl_zone-A_2");
            assert!(matches!(
                nib.admit(&rec("t3", "tok1"), &key, Utc::now(), cert),
                Err(AdmitError::TokenAlreadyUsed)
            ));
            // A failed certificate leaves nothing behind (and burns no id).
            assert!(matches!(
                nib.admit(&rec("t4", "tok4"), &key, Utc::now(), |_| Err("no".into())),
                Err(AdmitError::Certificate(_))
            ));
            assert!(!nib.token_used("tok4").expect("read"));
            assert_eq!(
                nib.count_active(Role::Regional, "zone-A").expect("count"),
                2
            );
        }
        // After a "restart" the sequence continues; ids are never reissued.
        let nib = Nib::open(&path).expect("reopen");
        let c = nib
            .admit(&rec("t5", "tok5"), &key, Utc::now(), cert)
            .expect("admit");
        assert_eq!(c.assigned_id, "regional_cntl_zone-A_3");
        assert!(nib.token_used("tok1").expect("read"));
        assert_eq!(verify_chain(&nib.conn(), &key.public()).expect("db"), Ok(3));
        let row = nib
            .controller("regional_cntl_zone-A_1")
            .expect("read")
            .expect("exists");
        assert_eq!(
            (row.status.as_str(), row.temp_id.as_deref(), row.version),
            ("active", Some("t1"), 0)
        );
    }

    #[test]
    fn status_updates_are_compare_and_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Nib::open(dir.path().join("nib.db")).expect("open");
        let key = IdentityKey::generate();
        let a = nib
            .admit(&rec("t1", "tok1"), &key, Utc::now(), |id| {
                Ok(Value::from(id))
            })
            .expect("admit");
        assert_eq!(
            nib.set_controller_status(&a.assigned_id, "revoked", 0)
                .expect("db"),
            Ok(1)
        );
        let lost = nib
            .set_controller_status(&a.assigned_id, "active", 0)
            .expect("db");
        assert_eq!(
            lost,
            Err(Conflict {
                id: a.assigned_id.clone(),
                expected: 0,
                found: Some(1)
            })
        );
        assert_eq!(
            nib.count_active(Role::Regional, "zone-A").expect("count"),
            0
        );
        assert!(
            nib.set_controller_status("nope", "x", 0)
                .expect("db")
                .is_err()
        );
    }
}
