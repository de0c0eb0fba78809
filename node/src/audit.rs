//! Security events into the NIB's signed, hash-chained event log.
//!
//! Admission decisions are written by the admission authority in the same transaction as
//! the admitted record. This module adds what arrives from outside at any rate: signature,
//! replay and freshness failures, lockouts, key rotations and policy changes. Refusals are
//! throttled per (reason, source address) when the transport knows the address (REST,
//! gRPC), else per (reason, claimed sender): the first one is written at once, the ones that
//! follow within [`THROTTLE`] are counted and reported in the next event of that pair
//! (`details.suppressed`). The claimed sender is the attacker's choice, so on top of that
//! every refusal event spends from one budget for the whole node ([`REFUSALS_PER_SEC`],
//! burst [`REFUSAL_BURST`]): what finds it empty is counted by reason and reported in the
//! next event written (`details.suppressed_by_reason`). Whatever arrives, the log grows by
//! at most `REFUSAL_BURST + 60 × REFUSALS_PER_SEC` refusal events a minute.

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

/// Refusal events the whole node writes per second, on average.
pub const REFUSALS_PER_SEC: f64 = 1.0;
/// Refusal events the node may write in a burst.
pub const REFUSAL_BURST: f64 = 30.0;

/// The node-wide budget of refusal events, and what it had to leave out.
struct Budget {
    tokens: f64,
    at: Instant,
    suppressed: std::collections::BTreeMap<String, u64>,
}

impl Budget {
    /// Takes a token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * REFUSALS_PER_SEC;
        self.tokens = (self.tokens + refill).min(REFUSAL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The audit writer of one node.
pub struct Audit {
    trust: Arc<Trust>,
    recent: Mutex<HashMap<(String, String), (Instant, u64)>>,
    budget: Mutex<Budget>,
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
            budget: Mutex::new(Budget {
                tokens: REFUSAL_BURST,
                at: Instant::now(),
                suppressed: Default::default(),
            }),
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
        self.refusal_from(reason, message_type, sender, None, transport, detail);
    }

    /// As [`Audit::refusal`], for a message from the network address `source` when it is
    /// known (REST, gRPC): throttled per (reason, source address) then, since the claimed
    /// sender is the sender's choice and the address is not.
    pub fn refusal_from(
        &self,
        reason: &str,
        message_type: &str,
        sender: &str,
        source: Option<IpAddr>,
        transport: &str,
        detail: &str,
    ) {
        let key = (
            reason.to_owned(),
            source.map_or_else(|| clip(sender), |ip| ip.to_string()),
        );
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
        let by_reason = {
            let mut b = self
                .budget
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !b.take(now) {
                *b.suppressed.entry(reason.to_owned()).or_default() += 1 + suppressed;
                return;
            }
            std::mem::take(&mut b.suppressed)
        };
        let mut details = Map::new();
        if !by_reason.is_empty() {
            let mut m = Map::new();
            for (r, n) in by_reason {
                m.insert(r, Value::from(n));
            }
            details.insert("suppressed_by_reason".into(), Value::Object(m));
        }
        details.insert("reason".into(), reason.into());
        details.insert("message_type".into(), clip(message_type).into());
        details.insert("transport".into(), transport.into());
        details.insert("detail".into(), clip(detail).into());
        if let Some(ip) = source {
            details.insert("source".into(), ip.to_string().into());
        }
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

    /// An operator lifted the admission lockout of an address.
    pub fn lockout_cleared(&self, ip: IpAddr, was_locked_out: bool) {
        let mut details = Map::new();
        details.insert("source".into(), ip.to_string().into());
        details.insert("was_locked_out".into(), was_locked_out.into());
        self.record(&Event {
            event_type: "ADMISSION_LOCKOUT_CLEARED".into(),
            actor: self.trust.me.clone(),
            subject: Some(ip.to_string()),
            action: "An operator lifted an admission lockout".into(),
            decision: Some("CLEARED".into()),
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
