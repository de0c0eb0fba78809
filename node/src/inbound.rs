//! The receive path every transport shares: verify, check the recipient, dispatch to the
//! tier, sign the reply.
//!
//! Order (PROTOCOL.md §4): the transport decoded the envelope; then a missing signature is
//! refused, the signature is verified (fields, sender, algorithm, freshness, replay,
//! HMAC/Ed25519; the nonce is recorded only on success), the recipient must be this node,
//! and on REST the body's type must match the path. Only then does a handler run.
//!
//! Keys: the shared network key when the deployment uses one; for an unadmitted child, the
//! key derived from its bootstrap token or pending challenge; for an admitted child or our
//! parent, their Ed25519 identity key. Replies are signed the way the request was.

use std::collections::HashMap;
use std::sync::Arc;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::Map;
use pdsno_shared::keys::{HmacKey, PublicKey};
use pdsno_shared::signing::{self, Verifier, VerifyError};

use crate::admission::{AdmissionError, Authority, RequestOutcome};
use crate::nib::SqliteNonceStore;
use crate::trust::{ADMISSION_KEY_ID, Trust};

/// Why an inbound message was not handled. Each maps to one HTTP status / gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// Not a valid envelope or payload (400 / INVALID_ARGUMENT).
    #[error("{0}")]
    BadRequest(String),
    /// No signature (401 / UNAUTHENTICATED).
    #[error("Message signature required but not present")]
    Unsigned,
    /// Verification failed (401 / UNAUTHENTICATED).
    #[error("Invalid message signature: {0}")]
    BadSignature(VerifyError),
    /// Authenticated, but not allowed (403 / PERMISSION_DENIED).
    #[error("{0}")]
    Forbidden(String),
    /// Our replay store is full or failed, or a dependency is down (503 / UNAVAILABLE).
    #[error("Service unavailable: {0}")]
    Unavailable(String),
    /// Addressed to someone else (400 / INVALID_ARGUMENT).
    #[error("Message recipient '{recipient}' does not match controller '{me}'")]
    WrongRecipient {
        /// The envelope's recipient.
        recipient: String,
        /// This node.
        me: String,
    },
    /// The body's type differs from the path's (400 / INVALID_ARGUMENT).
    #[error("Message type {body} does not match the endpoint for {path}")]
    TypeMismatch {
        /// Type in the body.
        body: MessageType,
        /// Type of the endpoint.
        path: MessageType,
    },
    /// This node does not handle the type (404 / UNIMPLEMENTED).
    #[error("No handler for message type {0} on this controller")]
    NoHandler(MessageType),
    /// Too much in progress (429 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Busy(String),
    /// The client certificate of the connection names other controllers than the
    /// envelope's sender (401 / UNAUTHENTICATED).
    #[error(
        "TLS identity mismatch: the client certificate belongs to {peer} but the message is from {sender}"
    )]
    PeerMismatch {
        /// The controllers the certificate names.
        peer: String,
        /// The envelope's sender.
        sender: String,
    },
    /// The sender proved its identity, but this node revoked it (403 / PERMISSION_DENIED,
    /// with `notice` for the controller to verify: see [`revocation_notice`]).
    #[error("{message}")]
    Revoked {
        /// What happened and what to do.
        message: String,
        /// A VALIDATION_RESULT saying so, signed with this node's identity key.
        notice: Box<Envelope>,
    },
}

/// The `status` of a revocation notice's payload.
pub const REVOKED_STATUS: &str = "REVOKED";
/// The `reason` of a revocation notice's payload.
pub const REVOKED_REASON: &str = "CONTROLLER_REVOKED";

/// The notice a parent gives a controller it revoked: a VALIDATION_RESULT addressed to it,
/// status `REVOKED`, signed with the parent's identity key, so the controller can tell a
/// real revocation from a forged refusal before it stops.
pub fn revocation_notice(trust: &Trust, to: &str, message: &str, revoked_at: &str) -> Envelope {
    let mut m = Map::new();
    m.insert("status".into(), REVOKED_STATUS.into());
    m.insert("reason".into(), REVOKED_REASON.into());
    m.insert("message".into(), message.into());
    m.insert("revoked_by".into(), trust.me.clone().into());
    m.insert("revoked_at".into(), revoked_at.into());
    let mut env = Envelope::new(
        MessageType::ValidationResult,
        trust.me.clone(),
        to,
        m,
        trust.clock.now(),
    );
    trust.sign_identity(&mut env);
    env
}

/// What a handler answers.
#[derive(Debug)]
pub enum HandlerReply {
    /// A reply envelope of this type with this payload (signed and correlated for you).
    Reply(MessageType, Map),
    /// Accepted, nothing to say (`{"status":"accepted"}` on REST).
    Accepted,
}

/// A verified message as its handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    /// The envelope (signature, freshness and recipient checked).
    pub env: &'a Envelope,
    /// The transport that carried it: `grpc`, `rest` or `mqtt`.
    pub transport: &'static str,
}

/// A tier's handler for one message type.
pub type Handler = Box<dyn Fn(Received<'_>) -> Result<HandlerReply, InboundError> + Send + Sync>;

/// The result of handling.
#[derive(Debug)]
pub enum Reply {
    /// A signed reply envelope.
    Envelope(Box<Envelope>),
    /// Accepted without a reply.
    Accepted,
}

/// Counts of what the receive path accepted and refused (by reason), for operators.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Messages handled.
    pub accepted: std::sync::atomic::AtomicU64,
    rejected: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl InboundStats {
    /// Counts one refusal.
    pub fn reject(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// Refusals so far, by reason.
    pub fn rejected(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// As JSON.
    pub fn to_value(&self) -> pdsno_shared::json::Value {
        let mut m = Map::new();
        m.insert(
            "accepted".into(),
            self.accepted
                .load(std::sync::atomic::Ordering::Relaxed)
                .into(),
        );
        let mut r = Map::new();
        for (k, v) in self.rejected() {
            r.insert(k.into(), v.into());
        }
        m.insert("rejected".into(), pdsno_shared::json::Value::Object(r));
        pdsno_shared::json::Value::Object(m)
    }
}

impl InboundError {
    /// A short label for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            InboundError::BadRequest(_) => "malformed",
            InboundError::Unsigned => "unsigned",
            InboundError::BadSignature(VerifyError::Replay) => "replay",
            InboundError::BadSignature(VerifyError::Stale { .. }) => "stale",
            InboundError::BadSignature(_) => "bad_signature",
            InboundError::Forbidden(_) => "forbidden",
            InboundError::Unavailable(_) => "unavailable",
            InboundError::WrongRecipient { .. } => "wrong_recipient",
            InboundError::TypeMismatch { .. } => "type_mismatch",
            InboundError::NoHandler(_) => "no_handler",
            InboundError::Busy(_) => "busy",
            InboundError::PeerMismatch { .. } => "tls_identity_mismatch",
            InboundError::Revoked { .. } => "revoked",
        }
    }
}

/// The refusal of a message whose sender is not a controller the connection's client
/// certificate names (see [`Inbound::handle_from`]).
fn peer_mismatch(env: &Envelope, peer: &[String]) -> Option<InboundError> {
    if peer.is_empty()
        || matches!(
            env.message_type,
            MessageType::ValidationRequest | MessageType::ChallengeResponse
        )
        || peer.contains(&env.sender_id)
    {
        return None;
    }
    Some(InboundError::PeerMismatch {
        peer: peer.join(","),
        sender: env.sender_id.chars().take(128).collect(),
    })
}

/// The shared receive path of one node.
pub struct Inbound {
    trust: Arc<Trust>,
    verifier: Verifier<SqliteNonceStore>,
    authority: Option<Arc<Authority>>,
    handlers: HashMap<MessageType, Handler>,
    /// What was accepted and refused.
    pub stats: InboundStats,
    metrics: Arc<crate::metrics::Metrics>,
    audit: Option<Arc<crate::audit::Audit>>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("id", &self.trust.me)
            .field("handlers", &self.handled_types())
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Builds the receive path.
    ///
    /// # Errors
    /// When the replay store cannot be opened.
    pub fn new(
        trust: Arc<Trust>,
        authority: Option<Arc<Authority>>,
        replay_capacity: usize,
    ) -> Result<Self, String> {
        let store = SqliteNonceStore::new(trust.nib.clone()).map_err(|e| e.to_string())?;
        Ok(Inbound {
            trust,
            verifier: Verifier::new(store).with_capacity(replay_capacity),
            authority,
            handlers: HashMap::new(),
            stats: InboundStats::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            audit: None,
        })
    }

    /// Counts into `metrics` and writes security refusals to `audit`.
    pub fn observe(
        &mut self,
        metrics: Arc<crate::metrics::Metrics>,
        audit: Option<Arc<crate::audit::Audit>>,
    ) {
        self.metrics = metrics;
        self.audit = audit;
    }

    /// A message refused before the shared path (by a transport or a tier's own check):
    /// counted like the others, and written to the audit log when security-relevant.
    pub fn refused(
        &self,
        reason: &'static str,
        transport: &'static str,
        kind: &str,
        sender: &str,
        detail: &str,
    ) {
        self.stats.reject(reason);
        self.metrics.message(kind, transport, reason);
        if let Some(a) = &self.audit
            && matches!(
                reason,
                "bad_signature" | "wrong_topic" | "policy_refused" | "forbidden"
            )
        {
            a.refusal(reason, kind, sender, transport, detail);
        }
    }

    /// The metrics this receive path counts into.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Registers a handler (a tier's own message types).
    pub fn register(&mut self, t: MessageType, h: Handler) {
        self.handlers.insert(t, h);
    }

    /// The node's keys.
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.trust.me
    }

    /// This node's role.
    pub fn role(&self) -> pdsno_shared::ids::Role {
        self.trust.role
    }

    /// This node's region.
    pub fn region(&self) -> Option<&str> {
        self.trust.region.as_deref()
    }

    /// The identity public key.
    pub fn public_key(&self) -> PublicKey {
        self.trust.identity.public()
    }

    /// The message types handled here, sorted.
    pub fn handled_types(&self) -> Vec<MessageType> {
        let mut v: Vec<MessageType> = self.handlers.keys().copied().collect();
        if self.authority.is_some() {
            v.push(MessageType::ValidationRequest);
            v.push(MessageType::ChallengeResponse);
        }
        v.sort();
        v
    }

    fn handles(&self, t: MessageType) -> bool {
        self.handlers.contains_key(&t)
            || (self.authority.is_some()
                && matches!(
                    t,
                    MessageType::ValidationRequest | MessageType::ChallengeResponse
                ))
    }

    /// Drops replay-cache entries whose messages can no longer pass the freshness check.
    pub fn purge_expired_nonces(&self) {
        use pdsno_shared::replay::NonceStore;
        if let Err(e) = self.verifier.store().purge_expired(self.trust.clock.now()) {
            tracing::warn!(error = %e, "cannot purge the replay cache");
        }
    }

    /// Handles one decoded envelope. `path_type` is the type named by the REST path.
    /// Blocking (SQLite, signature checks): call from a blocking thread.
    ///
    /// # Errors
    /// An [`InboundError`] for the transport to map.
    pub fn handle(
        &self,
        env: Envelope,
        path_type: Option<MessageType>,
        transport: &'static str,
    ) -> Result<Reply, InboundError> {
        self.handle_from(env, path_type, transport, &[], None)
    }

    /// As [`Inbound::handle`], for a message that came over a TLS connection whose client
    /// certificate names the controllers `peer` (`urn:pdsno:controller:` names). When it
    /// names any, the sender must be one of them: a controller cannot use its own
    /// certificate to send as another, even holding a key that signs for it (the shared
    /// network key). `source` is the peer's address when the transport knows it: refusals
    /// are audited per address then. Admission requests are exempt (their sender is a temporary id,
    /// authenticated by the bootstrap token), and so is a certificate that names no
    /// controller (an operator's or a tool's).
    ///
    /// # Errors
    /// An [`InboundError`] for the transport to map.
    pub fn handle_from(
        &self,
        env: Envelope,
        path_type: Option<MessageType>,
        transport: &'static str,
        peer: &[String],
        source: Option<std::net::IpAddr>,
    ) -> Result<Reply, InboundError> {
        let kind = env.message_type;
        let sender = if self.audit.is_some() {
            env.sender_id.clone()
        } else {
            String::new()
        };
        let started = std::time::Instant::now();
        let r = match peer_mismatch(&env, peer) {
            Some(e) => Err(e),
            None => self.handle_inner(env, path_type, transport),
        };
        if matches!(
            kind,
            MessageType::ValidationRequest | MessageType::ChallengeResponse
        ) {
            self.metrics.admission_time(started.elapsed());
        }
        match &r {
            Ok(_) => {
                self.stats
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics.message(kind.as_str(), transport, "accepted");
            }
            Err(e) => {
                let reason = e.reason();
                self.stats.reject(reason);
                self.metrics.message(kind.as_str(), transport, reason);
                if let Some(a) = &self.audit
                    && matches!(
                        reason,
                        "unsigned"
                            | "replay"
                            | "stale"
                            | "bad_signature"
                            | "forbidden"
                            | "tls_identity_mismatch"
                    )
                {
                    a.refusal_from(
                        reason,
                        kind.as_str(),
                        &sender,
                        source,
                        transport,
                        &e.to_string(),
                    );
                }
            }
        }
        r
    }

    /// When `env` fails verification because its sender is a controller we revoked, and it
    /// is signed with that controller's identity key: the refusal that tells it so.
    fn revoked_sender(&self, env: &Envelope) -> Option<InboundError> {
        let nib = &self.trust.nib;
        let row = nib.controller(&env.sender_id).ok().flatten()?;
        if row.status != "revoked" {
            return None;
        }
        let key = PublicKey::from_base64(row.public_key.as_deref()?).ok()?;
        let keys = pdsno_shared::signing::VerifyKeys {
            hmac: None,
            ed25519: Some(&key),
        };
        self.verifier
            .verify(env, keys, None, self.trust.clock.now())
            .ok()?;
        let (why, at) = nib
            .block_entry(&env.sender_id)
            .ok()
            .flatten()
            .unwrap_or_else(|| ("revoked".into(), String::new()));
        let message = format!(
            "controller {} was revoked by {} at {at} ({why}); it cannot rejoin with this \
             identity: to re-admit the host, start it with a new --data-dir, --temp-id and \
             bootstrap token",
            env.sender_id, self.trust.me
        );
        let notice = revocation_notice(&self.trust, &env.sender_id, &message, &at);
        Some(InboundError::Revoked {
            message,
            notice: Box::new(notice),
        })
    }

    fn handle_inner(
        &self,
        env: Envelope,
        path_type: Option<MessageType>,
        transport: &'static str,
    ) -> Result<Reply, InboundError> {
        if env.signature.is_none() {
            return Err(InboundError::Unsigned);
        }
        let admission: Option<HmacKey> = self
            .authority
            .as_ref()
            .and_then(|a| a.admission_key_for(&env));
        let verified = match self
            .trust
            .verify(&self.verifier, &env, admission.clone(), None)
        {
            Ok(v) => v,
            Err(e) if e.is_internal() => return Err(InboundError::Unavailable(e.to_string())),
            Err(e) => {
                return Err(self
                    .revoked_sender(&env)
                    .unwrap_or(InboundError::BadSignature(e)));
            }
        };
        // A policy is a broadcast: pushed over gRPC when the broker is away, it still
        // names no single recipient.
        let broadcast = env.message_type == MessageType::PolicyUpdate
            && env.recipient_id == crate::policy::BROADCAST;
        if env.recipient_id != self.trust.me && !broadcast {
            return Err(InboundError::WrongRecipient {
                recipient: env.recipient_id.clone(),
                me: self.trust.me.clone(),
            });
        }
        if let Some(path) = path_type
            && path != env.message_type
        {
            return Err(InboundError::TypeMismatch {
                body: env.message_type,
                path,
            });
        }
        if !self.handles(env.message_type) {
            return Err(InboundError::NoHandler(env.message_type));
        }
        let reply = match (env.message_type, &self.authority) {
            (MessageType::ValidationRequest | MessageType::ChallengeResponse, Some(auth)) => {
                let map_err = |e: AdmissionError| match e {
                    AdmissionError::BadPayload { .. } => InboundError::BadRequest(e.to_string()),
                    AdmissionError::Busy => InboundError::Busy(e.to_string()),
                };
                if env.message_type == MessageType::ValidationRequest {
                    match auth.on_request(&env).map_err(map_err)? {
                        RequestOutcome::Challenge(m) => {
                            HandlerReply::Reply(MessageType::Challenge, m)
                        }
                        RequestOutcome::Refused(m) => {
                            HandlerReply::Reply(MessageType::ValidationResult, m)
                        }
                    }
                } else {
                    HandlerReply::Reply(
                        MessageType::ValidationResult,
                        auth.on_response(&env).map_err(map_err)?,
                    )
                }
            }
            (t, _) => match self.handlers.get(&t) {
                Some(h) => h(Received {
                    env: &env,
                    transport,
                })?,
                None => return Err(InboundError::NoHandler(t)),
            },
        };
        match reply {
            HandlerReply::Accepted => Ok(Reply::Accepted),
            HandlerReply::Reply(t, payload) => {
                let now = self.trust.clock.now();
                let mut out = env.reply(t, self.trust.me.clone(), payload, now);
                match (verified.key_id.as_deref(), admission) {
                    // An unadmitted child can only check our answer with its admission key.
                    (Some(ADMISSION_KEY_ID), Some(k)) => {
                        signing::sign_hmac(&mut out, &k, None, now)
                    }
                    _ => self.trust.sign_for(&env.sender_id, &mut out),
                }
                Ok(Reply::Envelope(Box::new(out)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(t: MessageType, sender: &str) -> Envelope {
        Envelope::new(t, sender, "global_cntl_1", Map::new(), chrono::Utc::now())
    }

    #[test]
    fn a_certificate_naming_a_controller_carries_only_its_messages() {
        let a = ["regional_cntl_zone-A_1".to_owned()];
        assert!(
            peer_mismatch(&env(MessageType::Heartbeat, "regional_cntl_zone-A_1"), &a).is_none()
        );
        let e = peer_mismatch(&env(MessageType::Heartbeat, "regional_cntl_zone-B_1"), &a)
            .expect("refused");
        assert_eq!(e.reason(), "tls_identity_mismatch");
        assert!(e.to_string().contains("regional_cntl_zone-B_1"), "{e}");
        // Admission requests come from a temporary id; certificates naming no controller
        // (operators, older lab certificates) are not bound.
        assert!(peer_mismatch(&env(MessageType::ValidationRequest, "temp-rc"), &a).is_none());
        assert!(peer_mismatch(&env(MessageType::Heartbeat, "anyone"), &[]).is_none());
    }
}
