//! The audit log: append-only, each row hash-chained to the previous one and signed with
//! the node's Ed25519 identity key.
//!
//! `hash` = SHA-256 of the canonical JSON of the row's fields (including `seq` and
//! `prev_hash`); `signature` = base64 Ed25519 over the 32 hash bytes. SQLite triggers
//! refuse UPDATE and DELETE, so a tampered row or a removed one breaks the chain at a
//! known place ([`verify_chain`]).

use chrono::{DateTime, Utc};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::{IdentityKey, PublicKey, base64_encode};
use pdsno_shared::time::format_iso;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::NibError;

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to append.
#[derive(Clone, Debug, Default)]
pub struct Event {
    /// `CONTROLLER_VALIDATED`, `VALIDATION_REJECTED`, ...
    pub event_type: String,
    /// Who acted.
    pub actor: String,
    /// What it concerns.
    pub subject: Option<String>,
    /// What was done.
    pub action: String,
    /// The outcome (`APPROVED`, a reject code, ...).
    pub decision: Option<String>,
    /// Structured details.
    pub details: Map,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// Position in the chain (1-based).
    pub seq: i64,
    /// `event-` + 12 hex.
    pub event_id: String,
    /// Type.
    pub event_type: String,
    /// Actor.
    pub actor: String,
    /// Subject.
    pub subject: Option<String>,
    /// Action.
    pub action: String,
    /// Decision.
    pub decision: Option<String>,
    /// ISO-8601 time.
    pub timestamp: String,
    /// Details (canonical JSON text).
    pub details: String,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
    /// Base64 signature of the hash.
    pub signature: String,
}

fn row_hash(r: &EventRow) -> Result<String, NibError> {
    let details = json::parse(r.details.as_bytes())
        .map_err(|e| NibError::Corrupt(format!("event {} details: {e}", r.seq)))?;
    let mut m = Map::new();
    m.insert("action".into(), r.action.clone().into());
    m.insert("actor".into(), r.actor.clone().into());
    m.insert("decision".into(), r.decision.clone().into());
    m.insert("details".into(), details);
    m.insert("event_id".into(), r.event_id.clone().into());
    m.insert("event_type".into(), r.event_type.clone().into());
    m.insert("prev_hash".into(), r.prev_hash.clone().into());
    m.insert("seq".into(), r.seq.into());
    m.insert("subject".into(), r.subject.clone().into());
    m.insert("timestamp".into(), r.timestamp.clone().into());
    Ok(hex::encode(Sha256::digest(json::to_canonical_bytes(
        &Value::Object(m),
    ))))
}

/// Appends `ev` inside the caller's transaction (or connection); returns the stored row.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn append(
    conn: &Connection,
    ev: &Event,
    signer: &IdentityKey,
    now: DateTime<Utc>,
) -> Result<EventRow, NibError> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev_hash) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, GENESIS_HASH.to_owned()),
    };
    let mut row = EventRow {
        seq,
        event_id: pdsno_shared::ids::event_id(),
        event_type: ev.event_type.clone(),
        actor: ev.actor.clone(),
        subject: ev.subject.clone(),
        action: ev.action.clone(),
        decision: ev.decision.clone(),
        timestamp: format_iso(now),
        details: json::to_canonical_string(&Value::Object(ev.details.clone())),
        prev_hash,
        hash: String::new(),
        signature: String::new(),
    };
    row.hash = row_hash(&row)?;
    let hash_bytes = hex::decode(&row.hash).map_err(|e| NibError::Corrupt(e.to_string()))?;
    row.signature = base64_encode(&signer.sign(&hash_bytes));
    conn.execute(
        "INSERT INTO events (seq, event_id, event_type, actor, subject, action, decision, timestamp, details, prev_hash, hash, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![row.seq, row.event_id, row.event_type, row.actor, row.subject, row.action, row.decision, row.timestamp, row.details, row.prev_hash, row.hash, row.signature],
    )?;
    Ok(row)
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        event_id: r.get(1)?,
        event_type: r.get(2)?,
        actor: r.get(3)?,
        subject: r.get(4)?,
        action: r.get(5)?,
        decision: r.get(6)?,
        timestamp: r.get(7)?,
        details: r.get(8)?,
        prev_hash: r.get(9)?,
        hash: r.get(10)?,
        signature: r.get(11)?,
    })
}

const COLUMNS: &str = "seq, event_id, event_type, actor, subject, action, decision, timestamp, details, prev_hash, hash, signature";

/// Events with `seq > after`, oldest first, at most `limit`.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn list(conn: &Connection, after: i64, limit: usize) -> Result<Vec<EventRow>, NibError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let rows = st
        .query_map(params![after, limit as i64], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The newest `limit` events of `event_type`, newest first.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn latest_of_type(
    conn: &Connection,
    event_type: &str,
    limit: usize,
) -> Result<Vec<EventRow>, NibError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM events WHERE event_type = ?1 ORDER BY seq DESC LIMIT ?2"
    ))?;
    let rows = st
        .query_map(params![event_type, limit as i64], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Where and why a chain is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event chain broken at seq {seq}: {reason}")]
pub struct BrokenLink {
    /// The first bad row.
    pub seq: i64,
    /// What is wrong.
    pub reason: String,
}

/// Walks the whole chain; returns the number of events, or the first broken link.
///
/// # Errors
/// [`NibError`] on an SQLite failure; `Ok(Err(..))` for a broken chain.
pub fn verify_chain(
    conn: &Connection,
    signer: &PublicKey,
) -> Result<Result<u64, BrokenLink>, NibError> {
    let mut st = conn.prepare(&format!("SELECT {COLUMNS} FROM events ORDER BY seq"))?;
    let mut rows = st.query([])?;
    let mut prev = GENESIS_HASH.to_owned();
    let mut expected_seq = 1;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        let row = read_row(r)?;
        let broken = |reason: &str| {
            Ok(Err(BrokenLink {
                seq: row.seq,
                reason: reason.to_owned(),
            }))
        };
        if row.seq != expected_seq {
            return broken("a row is missing before this one");
        }
        if row.prev_hash != prev {
            return broken("prev_hash does not match the previous row's hash");
        }
        match row_hash(&row) {
            Ok(h) if h == row.hash => {}
            _ => return broken("hash does not match the row's contents"),
        }
        let hash_bytes = hex::decode(&row.hash).unwrap_or_default();
        if !signer.verify_base64(&hash_bytes, &row.signature) {
            return broken("signature does not verify");
        }
        prev = row.hash.clone();
        expected_seq += 1;
        n += 1;
    }
    Ok(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nib::Nib;

    #[test]
    fn chain_appends_verifies_and_detects_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Nib::open(dir.path().join("nib.db")).expect("open");
        let key = IdentityKey::generate();
        for i in 0..5 {
            let mut details = Map::new();
            details.insert("i".into(), Value::from(i as i64));
            let ev = Event {
                event_type: "TEST".into(),
                actor: "me".into(),
                action: "test".into(),
                details,
                ..Default::default()
            };
            append(&nib.conn(), &ev, &key, Utc::now()).expect("append");
        }
        let conn = nib.conn();
        assert_eq!(verify_chain(&conn, &key.public()).expect("db"), Ok(5));
        assert_eq!(list(&conn, 2, 10).expect("list").len(), 3);
        // The triggers refuse edits and deletions.
        assert!(
            conn.execute("UPDATE events SET actor = 'x' WHERE seq = 2", [])
                .is_err()
        );
        assert!(
            conn.execute("DELETE FROM events WHERE seq = 2", [])
                .is_err()
        );
        // Someone who drops the triggers and edits a row is caught at that row.
        conn.execute_batch(
            "DROP TRIGGER events_no_update; UPDATE events SET actor = 'mallory' WHERE seq = 3;",
        )
        .expect("tamper");
        let broken = verify_chain(&conn, &key.public())
            .expect("db")
            .expect_err("broken");
        assert_eq!(broken.seq, 3);
        // A wrong key fails at the first row.
        let other = IdentityKey::generate().public();
        assert_eq!(
            verify_chain(&conn, &other)
                .expect("db")
                .expect_err("broken")
                .seq,
            1
        );
    }
}
