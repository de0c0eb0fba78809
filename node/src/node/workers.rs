//! Background tasks of a node: the first key exchange with the parent, heartbeats,
//! rotations (scheduled and asked for), and expiry of old keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::PublicKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::exchange;
use crate::transport::parent::{Backoff, LinkError, ParentLink};
use crate::trust::Trust;

/// Heartbeat counters of a child.
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    /// Sent.
    pub sent: AtomicU64,
    /// Accepted by the parent.
    pub acked: AtomicU64,
    /// Refused or lost.
    pub failed: AtomicU64,
    /// Heartbeats received from the parent (it sends one with each key it agrees).
    pub parent_heard: AtomicU64,
    /// When the parent was last heard from (Unix milliseconds; 0: never).
    pub parent_last_ms: std::sync::atomic::AtomicI64,
    /// Re-keys after the parent stopped accepting our pairwise key.
    pub rekeys: AtomicU64,
    /// Status messages published on the broker.
    pub published: AtomicU64,
    /// When the parent last acknowledged a heartbeat sent to it directly (Unix
    /// milliseconds; 0: never).
    pub parent_ack_ms: std::sync::atomic::AtomicI64,
}

impl HeartbeatStats {
    /// Records the parent's acknowledgement of a heartbeat.
    pub fn parent_acknowledged(&self, at: chrono::DateTime<chrono::Utc>) {
        self.parent_ack_ms
            .store(at.timestamp_millis(), Ordering::Relaxed);
    }

    /// Records a heartbeat from the parent.
    pub fn parent_heard(&self, at: chrono::DateTime<chrono::Utc>) {
        self.parent_heard.fetch_add(1, Ordering::Relaxed);
        self.parent_last_ms
            .store(at.timestamp_millis(), Ordering::Relaxed);
    }
}

/// The parent as a child sees it.
#[derive(Clone, Debug)]
pub struct ParentSide {
    /// Parent id.
    pub id: String,
    /// Its pinned key.
    pub key: PublicKey,
    /// Its gRPC link.
    pub link: ParentLink,
    /// Set when the parent proved it revoked us; the node then stops.
    pub revoked: Arc<Revoked>,
}

/// A revocation the parent proved (its signed notice), and the node's stop.
#[derive(Debug)]
pub struct Revoked {
    message: std::sync::OnceLock<String>,
    stop: CancellationToken,
}

impl Revoked {
    /// Not revoked; `stop` is cancelled when the parent proves a revocation.
    pub fn new(stop: CancellationToken) -> Self {
        Revoked {
            message: std::sync::OnceLock::new(),
            stop,
        }
    }

    /// What the parent said, once it proved a revocation.
    pub fn message(&self) -> Option<&str> {
        self.message.get().map(String::as_str)
    }
}

impl ParentSide {
    /// True when `e` is the parent's signed notice that it revoked `me`: then the node is
    /// told to stop (exit code 5). A refusal that merely claims it, unsigned or signed by
    /// another key, is logged and otherwise ignored: an on-path attacker must not be able
    /// to stop a controller with one forged answer.
    pub fn stop_if_revoked(&self, me: &str, e: &LinkError) -> bool {
        let LinkError::Revoked { message, notice } = e else {
            return false;
        };
        match check_notice(notice, &self.id, &self.key, me) {
            Ok(()) => {
                if self.revoked.message.set(message.clone()).is_ok() {
                    tracing::error!(parent = %self.id, "{message}");
                }
                self.revoked.stop.cancel();
                true
            }
            Err(why) => {
                tracing::warn!(parent = %self.id, reason = %why, "a refusal claimed this controller is revoked, without the parent's signature; ignored");
                false
            }
        }
    }
}

/// Checks a revocation notice: a VALIDATION_RESULT from `parent` to `me`, status REVOKED,
/// signed with the parent's identity key, fresh.
fn check_notice(bytes: &[u8], parent: &str, key: &PublicKey, me: &str) -> Result<(), String> {
    let env = Envelope::from_slice(bytes).map_err(|e| e.to_string())?;
    if env.message_type != MessageType::ValidationResult
        || env.sender_id != parent
        || env.recipient_id != me
        || env.payload.get("status").and_then(Value::as_str) != Some(crate::inbound::REVOKED_STATUS)
    {
        return Err("not a revocation notice for this controller from its parent".into());
    }
    let verifier =
        pdsno_shared::signing::Verifier::new(pdsno_shared::replay::MemoryNonceStore::new());
    let keys = pdsno_shared::signing::VerifyKeys {
        hmac: None,
        ed25519: Some(key),
    };
    verifier
        .verify(&env, keys, Some(parent), chrono::Utc::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs the first key exchange with the parent until it succeeds (or cancellation).
pub async fn first_exchange(trust: Arc<Trust>, parent: ParentSide, cancel: CancellationToken) {
    if trust.pair_keys.signing_key(&parent.id).is_some() {
        return;
    }
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };
    let mut attempt = 0;
    loop {
        match exchange::initiate(&trust, &parent.link, &parent.id, &parent.key, false).await {
            Ok(kid) => {
                crate::report::emit(&crate::report::Report::Key {
                    id: kid,
                    peer: parent.id.clone(),
                });
                return;
            }
            Err(e) => {
                if let exchange::ExchangeError::Link(l) = &e
                    && parent.stop_if_revoked(&trust.me, l)
                {
                    return;
                }
                attempt += 1;
                let wait = backoff.delay(attempt);
                if attempt == 1 || u32::is_power_of_two(attempt) {
                    tracing::warn!(parent = %parent.id, attempt, error = %e, "key exchange with the parent failed; retrying");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Every how many heartbeats one also goes straight to the parent over gRPC while MQTT
/// carries them: it proves the pairwise key still works both ways (and re-keys if not).
const DIRECT_EVERY: u64 = 6;

/// What a node's status loop needs.
pub struct StatusLoop {
    /// The node's keys.
    pub trust: Arc<Trust>,
    /// The parent (none for the GC).
    pub parent: Option<ParentSide>,
    /// Sending.
    pub outbound: Arc<crate::outbound::Outbound>,
    /// Between heartbeats.
    pub interval: Duration,
    /// This process's session id (a will names it).
    pub session: String,
    /// Counters.
    pub stats: Arc<HeartbeatStats>,
    /// More fields for each heartbeat (policy version, devices, children).
    pub extras: Arc<dyn Fn() -> Map + Send + Sync>,
}

impl StatusLoop {
    fn heartbeat(&self, seq: u64, status: &str) -> Envelope {
        let mut p = self.extras.as_ref()();
        p.insert("status".into(), status.into());
        p.insert("session".into(), self.session.clone().into());
        p.insert("seq".into(), Value::from(seq));
        p.insert(
            "interval_ms".into(),
            Value::from(u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)),
        );
        let to = self
            .parent
            .as_ref()
            .map_or(crate::policy::BROADCAST.to_owned(), |p| p.id.clone());
        Envelope::new(
            MessageType::Heartbeat,
            self.trust.me.clone(),
            to,
            p,
            self.trust.clock.now(),
        )
    }

    /// Publishes `pdsno/status/{me}` every interval (retained; signed for the parent, or
    /// with the identity key by the GC) and sends a heartbeat straight to the parent every
    /// few intervals, or every interval while MQTT is down or when the parent runs in this
    /// process (over the in-process bus). On cancellation it publishes
    /// `offline` itself, so a clean stop is not mistaken for a crash.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let topic = pdsno_shared::topics::Topic::Status(self.trust.me.clone());
        let stats = self.stats.clone();
        let mut failing = false;
        // Consecutive refusals of a message signed with our pairwise key, and when we last
        // re-keyed because of them.
        let mut key_refusals = 0u32;
        let mut last_rekey: Option<tokio::time::Instant> = None;
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            seq += 1;
            stats.sent.fetch_add(1, Ordering::Relaxed);
            let mut published = false;
            if self.outbound.mqtt_connected() {
                let mut env = self.heartbeat(seq, "online");
                match &self.parent {
                    Some(p) => self.trust.sign_for(&p.id, &mut env),
                    None => self.trust.sign_identity(&mut env),
                }
                match self.outbound.publish(&env, &topic).await {
                    Ok(()) => {
                        published = true;
                        stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "status not published"),
                }
            }
            let Some(parent) = &self.parent else {
                if published {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            // A parent in this process hears every heartbeat over the bus.
            if published && !parent.link.is_local() && seq % DIRECT_EVERY != 1 {
                stats.acked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut env = self.heartbeat(seq, "online");
            self.trust.sign_for(&parent.id, &mut env);
            match parent.link.exchange(&env).await {
                Ok(_) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    stats.parent_acknowledged(chrono::Utc::now());
                    key_refusals = 0;
                    if failing {
                        tracing::info!(parent = %parent.id, "heartbeats accepted again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if parent.stop_if_revoked(&self.trust.me, &e) {
                        break;
                    }
                    if published {
                        // MQTT carried it; only the direct probe failed.
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if !failing {
                        tracing::warn!(parent = %parent.id, error = %e, "heartbeat refused or lost");
                        failing = true;
                    }
                    let key_refused = env.key_id.is_some()
                        && matches!(&e, LinkError::Status { code, .. } if *code == tonic::Code::Unauthenticated);
                    key_refusals = if key_refused { key_refusals + 1 } else { 0 };
                    // The parent no longer knows our key (its state was restored from an
                    // older copy, a confirmation got lost past the grace period, ...): agree
                    // a new one, authenticated by the identity keys. At most every 10 s.
                    if key_refusals >= 2
                        && last_rekey.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                    {
                        last_rekey = Some(tokio::time::Instant::now());
                        match exchange::initiate(
                            &self.trust,
                            &parent.link,
                            &parent.id,
                            &parent.key,
                            false,
                        )
                        .await
                        {
                            Ok(kid) => {
                                stats.rekeys.fetch_add(1, Ordering::Relaxed);
                                key_refusals = 0;
                                tracing::warn!(parent = %parent.id, key_id = %kid, "the parent refused our pairwise key; agreed a new one");
                                crate::report::emit(&crate::report::Report::Key {
                                    id: kid,
                                    peer: parent.id.clone(),
                                });
                            }
                            Err(e) => {
                                if let exchange::ExchangeError::Link(l) = &e
                                    && parent.stop_if_revoked(&self.trust.me, l)
                                {
                                    break;
                                }
                                tracing::warn!(parent = %parent.id, error = %e, "re-key with the parent failed");
                            }
                        }
                    }
                }
            }
        }
        // A clean stop: say so (retained), before the connection goes.
        if self.outbound.mqtt_connected() {
            let mut env = self.heartbeat(seq + 1, "offline");
            self.trust.sign_identity(&mut env);
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.outbound.publish(&env, &topic))
                    .await;
        }
    }
}

/// How to reach a peer for a rotation.
fn link_for(
    trust: &Trust,
    parent: Option<&ParentSide>,
    peer: &str,
) -> Option<(ParentLink, PublicKey)> {
    if let Some(p) = parent
        && p.id == peer
    {
        return Some((p.link.clone(), p.key));
    }
    let key = trust.identity_of(peer)?;
    let url = trust
        .nib
        .controller_metadata(peer)
        .ok()
        .flatten()?
        .get("grpc_url")?
        .as_str()?
        .to_owned();
    ParentLink::new(&url).ok().map(|l| (l, key))
}

/// Performs rotations: scheduled ones (a child rotates its key with its parent every
/// `period`) and those an operator asked for (kept in the NIB until done). Also expires
/// keys past their grace period.
pub async fn rotations(
    trust: Arc<Trust>,
    parent: Option<ParentSide>,
    period: Duration,
    wake: Arc<Notify>,
    done: Arc<Notify>,
    cancel: CancellationToken,
) {
    let period = chrono::Duration::from_std(period).unwrap_or(chrono::Duration::days(1));
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    // Per peer: failed attempts so far and when to try again.
    let mut failures: std::collections::HashMap<String, (u32, tokio::time::Instant)> =
        std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            // An operator asked: try at once, whatever the backoff says.
            _ = wake.notified() => failures.clear(),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = trust.clock.now();
        let t = trust.clone();
        let parent_id = parent.as_ref().map(|p| p.id.clone());
        // The NIB off the executor: expire old keys, schedule the parent's rotation when
        // due, read what is asked for.
        let requests = tokio::task::spawn_blocking(move || {
            let _ = t.pair_keys.expire(now);
            if let Some(pid) = &parent_id
                && t.pair_keys
                    .current_age(pid, now)
                    .is_some_and(|age| age >= period)
                && let Err(e) = t.nib.request_rotation(pid, now)
            {
                tracing::warn!(error = %e, "cannot schedule a key rotation");
            }
            t.nib.rotation_requests().unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        failures.retain(|p, _| requests.contains(p));
        for peer in requests {
            if failures
                .get(&peer)
                .is_some_and(|(_, next)| tokio::time::Instant::now() < *next)
            {
                continue;
            }
            let Some((link, key)) = link_for(&trust, parent.as_ref(), &peer) else {
                tracing::warn!(%peer, "cannot rotate: the peer is unknown or has no gRPC address");
                continue;
            };
            let rotation = trust.pair_keys.generation(&peer) > 0;
            match exchange::initiate(&trust, &link, &peer, &key, rotation).await {
                Ok(kid) => {
                    let done_peer = peer.clone();
                    let _ = trust
                        .nib
                        .off_executor(move |nib| nib.rotation_done(&done_peer))
                        .await;
                    failures.remove(&peer);
                    crate::report::emit(&crate::report::Report::Key {
                        id: kid,
                        peer: peer.clone(),
                    });
                    done.notify_waiters();
                }
                Err(e) => {
                    let f = failures
                        .entry(peer.clone())
                        .or_insert((0, tokio::time::Instant::now()));
                    f.0 += 1;
                    let wait = backoff.delay(f.0);
                    f.1 = tokio::time::Instant::now() + wait;
                    if f.0 == 1 || f.0.is_power_of_two() {
                        tracing::warn!(%peer, attempt = f.0, retry_in_ms = wait.as_millis() as u64, error = %e, "key rotation failed; will retry");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdsno_shared::keys::IdentityKey;
    use pdsno_shared::signing;

    fn notice(signer: &IdentityKey, from: &str, to: &str, status: &str) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("status".into(), status.into());
        m.insert("reason".into(), crate::inbound::REVOKED_REASON.into());
        let mut env = Envelope::new(
            MessageType::ValidationResult,
            from,
            to,
            m,
            chrono::Utc::now(),
        );
        signing::sign_ed25519(&mut env, signer, None, chrono::Utc::now());
        env.to_json_bytes()
    }

    #[tokio::test]
    async fn only_the_parents_signed_notice_for_this_controller_counts() {
        let parent = IdentityKey::generate();
        let other = IdentityKey::generate();
        let pk = parent.public();
        let (p, me) = ("regional_cntl_zone-A_1", "local_cntl_zone-A_1");
        assert!(check_notice(&notice(&parent, p, me, "REVOKED"), p, &pk, me).is_ok());
        // Signed by another key, from someone else, for someone else, or not a revocation.
        assert!(check_notice(&notice(&other, p, me, "REVOKED"), p, &pk, me).is_err());
        assert!(check_notice(&notice(&parent, "x", me, "REVOKED"), p, &pk, me).is_err());
        assert!(
            check_notice(
                &notice(&parent, p, "local_cntl_zone-A_2", "REVOKED"),
                p,
                &pk,
                me
            )
            .is_err()
        );
        assert!(check_notice(&notice(&parent, p, me, "APPROVED"), p, &pk, me).is_err());
        assert!(check_notice(b"not json", p, &pk, me).is_err());
        // A forged refusal does not stop the node.
        let side = ParentSide {
            id: p.into(),
            key: pk,
            link: ParentLink::new("http://127.0.0.1:1").expect("url"),
            revoked: Arc::new(Revoked::new(CancellationToken::new())),
        };
        let forged = LinkError::Revoked {
            message: "you are revoked".into(),
            notice: notice(&other, p, me, "REVOKED"),
        };
        assert!(!side.stop_if_revoked(me, &forged));
        assert!(side.revoked.message().is_none() && !side.revoked.stop.is_cancelled());
        let real = LinkError::Revoked {
            message: "revoked by the RC".into(),
            notice: notice(&parent, p, me, "REVOKED"),
        };
        assert!(side.stop_if_revoked(me, &real));
        assert_eq!(side.revoked.message(), Some("revoked by the RC"));
        assert!(side.revoked.stop.is_cancelled());
    }
}
