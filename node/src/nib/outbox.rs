//! The outbox: messages that must reach a peer (discovery reports, summaries), kept until
//! the peer acknowledges them. Rows are written in the same transaction as the state change
//! they describe, so a crash can neither lose a report nor send one for a change that was
//! not committed.

use chrono::{DateTime, Utc};
use pdsno_shared::json::{self, Map};
use pdsno_shared::time::format_iso;
use rusqlite::{Connection, params};

use super::{Nib, NibError};

/// A message to queue.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxItem {
    /// Stable id (the report or summary id): the receiver deduplicates on it.
    pub item_id: String,
    /// Who must receive it.
    pub recipient: String,
    /// Its envelope type (`DISCOVERY_REPORT`, ...).
    pub message_type: String,
    /// The MQTT topic when it is a pub/sub message.
    pub topic: Option<String>,
    /// The payload; a fresh envelope is signed around it at each attempt.
    pub payload: Map,
}

/// A queued message.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    /// Queue position.
    pub seq: i64,
    /// The message.
    pub item: OutboxItem,
    /// When it was queued.
    pub created_at: String,
    /// Delivery attempts so far.
    pub attempts: u32,
}

/// Queues `item` inside the caller's transaction.
///
/// # Errors
/// On an SQLite failure (a duplicate id is one).
pub(crate) fn push(
    conn: &Connection,
    item: &OutboxItem,
    now: DateTime<Utc>,
) -> Result<(), NibError> {
    conn.execute(
        "INSERT INTO outbox (item_id, recipient, message_type, topic, payload, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            item.item_id,
            item.recipient,
            item.message_type,
            item.topic,
            json::to_canonical_string(&json::Value::Object(item.payload.clone())),
            format_iso(now)
        ],
    )?;
    Ok(())
}

impl Nib {
    /// Queues one message on its own.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn outbox_push(&self, item: &OutboxItem, now: DateTime<Utc>) -> Result<(), NibError> {
        push(&self.conn(), item, now)
    }

    /// The oldest `limit` queued messages.
    ///
    /// # Errors
    /// On an SQLite failure or a corrupt row.
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT seq, item_id, recipient, message_type, topic, payload, created_at, attempts
             FROM outbox ORDER BY seq LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, item_id, recipient, message_type, topic, payload, created_at, attempts) =
                row?;
            let payload = match json::parse(payload.as_bytes()) {
                Ok(json::Value::Object(m)) => m,
                _ => return Err(NibError::Corrupt(format!("outbox {item_id}: payload"))),
            };
            out.push(OutboxRow {
                seq,
                item: OutboxItem {
                    item_id,
                    recipient,
                    message_type,
                    topic,
                    payload,
                },
                created_at,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            });
        }
        Ok(out)
    }

    /// Removes a delivered message; true when it was queued.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn outbox_done(&self, item_id: &str) -> Result<bool, NibError> {
        Ok(self
            .conn()
            .execute("DELETE FROM outbox WHERE item_id = ?1", params![item_id])?
            > 0)
    }

    /// Records a delivery attempt.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn outbox_attempted(&self, item_id: &str, now: DateTime<Utc>) -> Result<(), NibError> {
        self.conn().execute(
            "UPDATE outbox SET attempts = attempts + 1, last_attempt = ?2 WHERE item_id = ?1",
            params![item_id, format_iso(now)],
        )?;
        Ok(())
    }

    /// How many messages are queued.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn outbox_len(&self) -> Result<u64, NibError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Number of queued messages of one type, inside a transaction.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn count_of(conn: &Connection, message_type: &str) -> Result<u64, NibError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE message_type = ?1",
        params![message_type],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Drops every queued message of one type, inside a transaction; returns how many.
///
/// # Errors
/// On an SQLite failure.
pub(crate) fn drop_all_of(conn: &Connection, message_type: &str) -> Result<usize, NibError> {
    Ok(conn.execute(
        "DELETE FROM outbox WHERE message_type = ?1",
        params![message_type],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> OutboxItem {
        let mut p = Map::new();
        p.insert("report_id".into(), id.into());
        OutboxItem {
            item_id: id.into(),
            recipient: "regional_cntl_zone-A_1".into(),
            message_type: "DISCOVERY_REPORT".into(),
            topic: Some("pdsno/discovery/zone-A/local_cntl_zone-A_1".into()),
            payload: p,
        }
    }

    #[test]
    fn queue_survives_reopen_in_order_until_done() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("nib.db");
        let now = chrono::Utc::now();
        {
            let nib = Nib::open(&path).expect("open");
            nib.outbox_push(&item("r1"), now).expect("push");
            nib.outbox_push(&item("r2"), now).expect("push");
            assert!(nib.outbox_push(&item("r1"), now).is_err(), "ids are unique");
            nib.outbox_attempted("r1", now).expect("attempt");
        }
        let nib = Nib::open(&path).expect("reopen");
        let rows = nib.outbox_pending(10).expect("pending");
        assert_eq!(
            rows.iter()
                .map(|r| r.item.item_id.as_str())
                .collect::<Vec<_>>(),
            ["r1", "r2"]
        );
        assert_eq!(rows[0].attempts, 1);
        assert_eq!(rows[0].item, item("r1"));
        assert!(nib.outbox_done("r1").expect("done"));
        assert!(!nib.outbox_done("r1").expect("done twice"));
        assert_eq!(nib.outbox_len().expect("len"), 1);
        let conn = nib.conn();
        assert_eq!(count_of(&conn, "DISCOVERY_REPORT").expect("count"), 1);
        assert_eq!(drop_all_of(&conn, "DISCOVERY_REPORT").expect("drop"), 1);
    }
}
