//! Delivery of the NIB outbox (discovery reports to the regional controller, summaries to
//! the global controller) until each item is acknowledged.
//!
//! Each attempt signs a fresh envelope around the stored payload (the receiver deduplicates
//! on the report or summary id, so a retransmission is acknowledged, never applied twice).
//! Over gRPC the answer is the acknowledgement; over MQTT it arrives later on our reply
//! topic, and an item not acknowledged within [`ACK_TIMEOUT`] is sent again.
//!
//! An item still unacknowledged [`OUTBOX_MAX_AGE`] after it was queued is given up: it and
//! every report or summary as old are dropped, and what they carried is sent again in full
//! ([`crate::nib::Nib::outbox_expire`]). Receivers forget applied ids after
//! [`crate::node::housekeeping::APPLIED_RETENTION`], so no retransmission may be older.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::Value;
use pdsno_shared::time::parse_iso;
use pdsno_shared::topics::Topic;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::outbound::{Outbound, Path};
use crate::trust::Trust;

/// How long a message published on the broker may wait for its acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Items handed out per pass.
const BATCH: usize = 64;

/// How long a discovery report or summary is retried before it is replaced by a full one.
pub const OUTBOX_MAX_AGE: Duration = Duration::from_secs(3600);

/// The outbox's delivery side.
pub struct Delivery {
    trust: Arc<Trust>,
    outbound: Arc<Outbound>,
    wake: Notify,
    changed: Notify,
    inflight: Mutex<HashMap<String, Instant>>,
    /// Items acknowledged.
    pub delivered: AtomicU64,
    /// Attempts after the first.
    pub resent: AtomicU64,
    /// Attempts that found no working path.
    pub failures: AtomicU64,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivered", &self.delivered.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery side for `trust`'s node.
    pub fn new(trust: Arc<Trust>, outbound: Arc<Outbound>) -> Self {
        Delivery {
            trust,
            outbound,
            wake: Notify::new(),
            changed: Notify::new(),
            inflight: Mutex::new(HashMap::new()),
            delivered: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Something was queued: deliver now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The recipient acknowledged `item_id`: it leaves the outbox. Returns whether it was
    /// still queued (a duplicate acknowledgement is harmless). Blocking (SQLite): for the
    /// handlers; async code calls [`Delivery::acked_async`].
    pub fn acked(&self, item_id: &str) -> bool {
        let removed = self.trust.nib.outbox_done(item_id);
        self.record_ack(item_id, removed)
    }

    /// As [`Delivery::acked`], from async code (the NIB off the executor).
    async fn acked_async(&self, item_id: &str) -> bool {
        let id = item_id.to_owned();
        let removed = self
            .trust
            .nib
            .off_executor(move |nib| nib.outbox_done(&id))
            .await
            .unwrap_or(Ok(false));
        self.record_ack(item_id, removed)
    }

    fn record_ack(&self, item_id: &str, removed: Result<bool, crate::nib::NibError>) -> bool {
        self.inflight().remove(item_id);
        let removed = removed.unwrap_or_else(|e| {
            tracing::error!(error = %e, item_id, "cannot remove an acknowledged item");
            false
        });
        if removed {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
        removed
    }

    /// Waits until the outbox is empty; false on timeout.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let empty = || async {
            self.trust
                .nib
                .off_executor(|nib| nib.outbox_len())
                .await
                .and_then(Result::ok)
                == Some(0)
        };
        loop {
            let changed = self.changed.notified();
            if empty().await {
                return true;
            }
            self.wake();
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return empty().await;
            }
        }
    }

    /// Delivers until cancelled: at once when woken, else every second.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            self.pass().await;
        }
    }

    async fn pass(&self) {
        let me = self.clone_for_blocking();
        let rows = match tokio::task::spawn_blocking(move || me.nib.outbox_pending(BATCH)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return;
            }
            Err(_) => return,
        };
        // Attempts older than the ack timeout say nothing any more; forgetting them keeps
        // the table to what was sent recently (an item dropped from the outbox is never
        // acknowledged).
        forget_old_attempts(&mut self.inflight(), Instant::now());
        let now = self.trust.clock.now();
        let oldest_allowed =
            now - chrono::Duration::from_std(OUTBOX_MAX_AGE).unwrap_or(chrono::Duration::MAX);
        if rows.iter().any(|r| {
            parse_iso(&r.created_at).is_ok_and(|t| t < oldest_allowed)
                && (r.item.message_type == MessageType::DiscoveryReport.as_str()
                    || r.item.message_type == MessageType::DiscoverySummary.as_str())
        }) {
            let me = self.clone_for_blocking();
            match tokio::task::spawn_blocking(move || me.nib.outbox_expire(oldest_allowed)).await {
                Ok(Ok((reports, summaries))) => {
                    tracing::warn!(
                        reports,
                        summaries,
                        max_age_secs = OUTBOX_MAX_AGE.as_secs(),
                        "unacknowledged for too long: dropped, the next one is sent in full"
                    );
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot drop expired outbox items"),
                Err(_) => {}
            }
            return;
        }
        for row in rows {
            let id = row.item.item_id.clone();
            if self
                .inflight()
                .get(&id)
                .is_some_and(|t| t.elapsed() < ACK_TIMEOUT)
            {
                continue;
            }
            let Ok(t) = row.item.message_type.parse::<MessageType>() else {
                tracing::error!(item_id = %id, "outbox item of an unknown type; dropped");
                let drop_id = id.clone();
                let _ = self
                    .trust
                    .nib
                    .off_executor(move |nib| nib.outbox_done(&drop_id))
                    .await;
                continue;
            };
            let mut env = Envelope::new(
                t,
                self.trust.me.clone(),
                row.item.recipient.clone(),
                row.item.payload.clone(),
                self.trust.clock.now(),
            );
            self.trust.sign_for(&row.item.recipient, &mut env);
            let topic = row.item.topic.as_deref().and_then(Topic::parse);
            if row.attempts > 0 {
                self.resent.fetch_add(1, Ordering::Relaxed);
            }
            let (attempt_id, now) = (id.clone(), self.trust.clock.now());
            if let Some(Err(e)) = self
                .trust
                .nib
                .off_executor(move |nib| nib.outbox_attempted(&attempt_id, now))
                .await
            {
                tracing::warn!(error = %e, "cannot record a delivery attempt");
            }
            match self.outbound.send(&env, topic.as_ref()).await {
                Ok(sent) if sent.path == Path::Mqtt => {
                    self.inflight().insert(id, Instant::now());
                }
                Ok(sent) => {
                    if self.direct_answer_acks(&row.item.recipient, &id, sent.reply.as_ref()) {
                        self.acked_async(&id).await;
                    } else {
                        self.inflight().insert(id, Instant::now());
                    }
                }
                Err(e) => {
                    let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 || n.is_power_of_two() {
                        tracing::warn!(item_id = %id, error = %e, "delivery failed; will retry");
                    }
                    // Keep order: stop this pass, try again later.
                    return;
                }
            }
        }
    }

    /// Whether a direct (gRPC) answer acknowledges `item_id`: a signed
    /// DISCOVERY_REPORT_ACK naming it, or a plain acceptance of a summary.
    fn direct_answer_acks(&self, recipient: &str, item_id: &str, reply: Option<&Envelope>) -> bool {
        let Some(r) = reply else {
            return true;
        };
        if self.trust.authenticate(r, Some(recipient)).is_err() {
            tracing::warn!(%recipient, "an answer that does not verify; not taken as an acknowledgement");
            return false;
        }
        match r.message_type {
            MessageType::DiscoveryReportAck => {
                r.payload.get("report_id").and_then(Value::as_str) == Some(item_id)
            }
            _ => true,
        }
    }

    fn clone_for_blocking(&self) -> Arc<Trust> {
        self.trust.clone()
    }
}

/// Forgets the attempts made more than [`ACK_TIMEOUT`] before `now`: they no longer hold
/// an item back, and one whose item left the outbox unacknowledged would stay for ever.
fn forget_old_attempts(inflight: &mut HashMap<String, Instant>, now: Instant) {
    inflight.retain(|_, sent| now.saturating_duration_since(*sent) < ACK_TIMEOUT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_forgotten_after_the_ack_timeout() {
        let t0 = Instant::now();
        let mut m = HashMap::new();
        for i in 0..1000 {
            m.insert(format!("dropped-{i}"), t0);
        }
        m.insert("recent".into(), t0 + ACK_TIMEOUT);
        forget_old_attempts(&mut m, t0 + ACK_TIMEOUT - Duration::from_millis(1));
        assert_eq!(m.len(), 1001, "nothing is forgotten within the timeout");
        forget_old_attempts(&mut m, t0 + ACK_TIMEOUT);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["recent"]);
    }
}
