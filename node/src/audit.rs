//! Security events into the NIB's signed, hash-chained event log.
//!
//! Admission decisions are written by the admission authority in the same transaction as
//! the admitted record. This module adds what arrives from outside at any rate: signature,
//! replay and freshness failures, lockouts, key rotations and policy changes. Refusals are
//! throttled per (reason, claimed sender): the first one is written at once, the ones that
//! follow within [`THROTTLE`] are counted and reported in the next event of that pair
//! (`details.suppressed`), so a flood of forgeries cannot grow the log without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pdsno_shared::json::{Map, Value};

use crate::nib::Event;
use crate::trust::Trust;

/// At most one refusal event per (reason, sender) in this period.
pub const THROTTLE: Duration = Duration::from_secs(10);

/// Most (reason, sender) pairs tracked; beyond it the table is cleared.
const MAX_TRACKED: usize = 10_000;

/// The audit writer of one node.
pub struct Audit {
    trust: Arc<Trust>,
    recent: Mutex<HashMap<(String, String), (Instant, u64)>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("node", &self.trust.me)
            .finish_non_exhaustive()
    }
}

/// Caps a string taken from the network before it enters the log.
fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}

impl Audit {
    /// An audit writer signing with `trust`'s identity key.
    pub fn new(trust: Arc<Trust>) -> Arc<Audit> {
        Arc::new(Audit {
            trust,
            recent: Mutex::new(HashMap::new()),
        })
    }

    /// Appends `ev` now; a failure is logged, never raised (the caller's work goes on).
    pub fn record(&self, ev: &Event) {
        let now = self.trust.clock.now();
        if let Err(e) = self.trust.nib.append_event(ev, &self.trust.identity, now) {
            tracing::error!(error = %e, event = %ev.event_type, "cannot write an audit event");
        }
    }

    /// A message refused for `reason` (bad_signature, replay, stale, unsigned, forbidden,
    /// wrong_topic, ...), throttled per (reason, sender).
    pub fn refusal(
        &self,
        reason: &str,
        message_type: &str,
        sender: &str,
        transport: &str,
        detail: &str,
    ) {
        let key = (reason.to_owned(), clip(sender));
        let now = Instant::now();
        let suppressed = {
            let mut map = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
            match map.get_mut(&key) {
                Some((last, n)) if now.duration_since(*last) < THROTTLE => {
                    *n += 1;
                    return;
                }
                Some((last, n)) => {
                    let s = *n;
                    *last = now;
                    *n = 0;
                    s
                }
                None => {
                    map.insert(key, (now, 0));
                    0
                }
            }
        };
        let mut details = Map::new();
        details.insert("reason".into(), reason.into());
        details.insert("message_type".into(), clip(message_type).into());
        details.insert("transport".into(), transport.into());
        details.insert("detail".into(), clip(detail).into());
        details.insert("suppressed".into(), Value::from(suppressed));
        self.record(&Event {
            event_type: "MESSAGE_REJECTED".into(),
            actor: self.trust.me.clone(),
            subject: Some(clip(sender)),
            action: "Refused a message".into(),
            decision: Some(reason.to_owned()),
            details,
        });
    }

    /// An address locked out after failed admissions.
    pub fn lockout(&self, ip: IpAddr, failures: u32, duration: Duration, last_reason: &str) {
        let mut details = Map::new();
        details.insert("source".into(), ip.to_string().into());
        details.insert("failures".into(), Value::from(u64::from(failures)));
        details.insert("lockout_secs".into(), Value::from(duration.as_secs()));
        details.insert("last_reason".into(), clip(last_reason).into());
        self.record(&Event {
            event_type: "ADMISSION_LOCKOUT".into(),
            actor: self.trust.me.clone(),
            subject: Some(ip.to_string()),
            action: "Locked out an address after failed admission attempts".into(),
            decision: Some("LOCKED_OUT".into()),
            details,
        });
    }
}
