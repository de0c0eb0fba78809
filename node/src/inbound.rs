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
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing, PublicKey};
use pdsno_shared::signing::{self, Verified, Verifier, VerifyError, VerifyKeys};
use pdsno_shared::time::Clock;

use crate::admission::{AdmissionError, Authority, RequestOutcome};
use crate::nib::{Nib, SqliteNonceStore};

/// Ring key id of the shared network key (never announced on the wire).
const NETWORK_KEY_ID: &str = "network";
/// Ring key id of an admission key (never announced on the wire).
const ADMISSION_KEY_ID: &str = "admission";

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
    /// Our replay store is full or failed (503 / UNAVAILABLE).
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
}

/// What a handler answers.
#[derive(Debug)]
pub enum HandlerReply {
    /// A reply envelope of this type with this payload (signed and correlated for you).
    Reply(MessageType, Map),
    /// Accepted, nothing to say (`{"status":"accepted"}` on REST).
    Accepted,
}

/// A tier's handler for one message type.
pub type Handler = Box<dyn Fn(&Envelope) -> Result<HandlerReply, InboundError> + Send + Sync>;

/// The result of handling.
#[derive(Debug)]
pub enum Reply {
    /// A signed reply envelope.
    Envelope(Box<Envelope>),
    /// Accepted without a reply.
    Accepted,
}

enum SignWith {
    Hmac(HmacKey),
    Identity,
}

/// The shared receive path of one node.
pub struct Inbound {
    id: String,
    role: pdsno_shared::ids::Role,
    region: Option<String>,
    verifier: Verifier<SqliteNonceStore>,
    network_key: Option<HmacKey>,
    nib: Arc<Nib>,
    identity: Arc<IdentityKey>,
    authority: Option<Arc<Authority>>,
    parent: Option<(String, PublicKey)>,
    clock: Arc<dyn Clock>,
    handlers: HashMap<MessageType, Handler>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("id", &self.id)
            .field("handlers", &self.handled_types())
            .finish_non_exhaustive()
    }
}

/// Everything [`Inbound::new`] needs.
pub struct InboundParts {
    /// This node's id.
    pub id: String,
    /// Its role.
    pub role: pdsno_shared::ids::Role,
    /// Its region.
    pub region: Option<String>,
    /// The NIB (replay store, controllers).
    pub nib: Arc<Nib>,
    /// The identity key (signs replies to admitted controllers).
    pub identity: Arc<IdentityKey>,
    /// The shared network key, if the deployment uses one.
    pub network_key: Option<HmacKey>,
    /// The admission authority (parents only).
    pub authority: Option<Arc<Authority>>,
    /// The parent's id and pinned key (children only).
    pub parent: Option<(String, PublicKey)>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Most live nonces in the replay cache.
    pub replay_capacity: usize,
}

impl Inbound {
    /// Builds the receive path.
    ///
    /// # Errors
    /// When the replay store cannot be opened.
    pub fn new(p: InboundParts) -> Result<Self, String> {
        let store = SqliteNonceStore::new(p.nib.clone()).map_err(|e| e.to_string())?;
        Ok(Inbound {
            id: p.id,
            role: p.role,
            region: p.region,
            verifier: Verifier::new(store).with_capacity(p.replay_capacity),
            network_key: p.network_key,
            nib: p.nib,
            identity: p.identity,
            authority: p.authority,
            parent: p.parent,
            clock: p.clock,
            handlers: HashMap::new(),
        })
    }

    /// Registers a handler (a tier's own message types).
    pub fn register(&mut self, t: MessageType, h: Handler) {
        self.handlers.insert(t, h);
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This node's role.
    pub fn role(&self) -> pdsno_shared::ids::Role {
        self.role
    }

    /// This node's region.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The identity public key.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public()
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

    /// The Ed25519 key of a sender we know: an active admitted child, or our parent.
    fn identity_of(&self, sender: &str) -> Option<PublicKey> {
        if let Some((pid, pk)) = &self.parent
            && pid == sender
        {
            return Some(*pk);
        }
        let row = self.nib.controller(sender).ok().flatten()?;
        if row.status != "active" {
            return None;
        }
        row.public_key
            .as_deref()
            .and_then(|k| PublicKey::from_base64(k).ok())
    }

    fn verify(&self, env: &Envelope) -> Result<Verified, InboundError> {
        let now = self.clock.now();
        let mut ring = KeyRing::new(pdsno_shared::keys::DEFAULT_GRACE);
        ring.set_announce_key_id(false);
        if let Some(k) = &self.network_key {
            ring.add(Some(NETWORK_KEY_ID.into()), k.clone(), now);
        }
        if let Some(a) = &self.authority
            && let Some(k) = a.admission_key_for(env)
        {
            ring.add(Some(ADMISSION_KEY_ID.into()), k, now);
        }
        let ed = self.identity_of(&env.sender_id);
        let keys = VerifyKeys {
            hmac: (!ring.is_empty()).then_some(&ring),
            ed25519: ed.as_ref(),
        };
        let v = self.verifier.verify(env, keys, None, now).map_err(|e| {
            if e.is_internal() {
                InboundError::Unavailable(e.to_string())
            } else {
                InboundError::BadSignature(e)
            }
        })?;
        Ok(v)
    }

    fn reply_key(&self, v: &Verified, env: &Envelope) -> SignWith {
        if v.algorithm == signing::ED25519 {
            return SignWith::Identity;
        }
        match v.key_id.as_deref() {
            Some(ADMISSION_KEY_ID) => self
                .authority
                .as_ref()
                .and_then(|a| a.admission_key_for(env))
                .map_or(SignWith::Identity, SignWith::Hmac),
            _ => self
                .network_key
                .clone()
                .map_or(SignWith::Identity, SignWith::Hmac),
        }
    }

    /// Drops replay-cache entries whose messages can no longer pass the freshness check.
    pub fn purge_expired_nonces(&self) {
        use pdsno_shared::replay::NonceStore;
        if let Err(e) = self.verifier.store().purge_expired(self.clock.now()) {
            tracing::warn!(error = %e, "cannot purge the replay cache");
        }
    }

    /// Signs an outgoing envelope as this node: with the network key when the deployment
    /// has one, else with the identity key.
    pub fn sign_outgoing(&self, env: &mut Envelope) {
        let now = self.clock.now();
        match &self.network_key {
            Some(k) => signing::sign_hmac(env, k, None, now),
            None => signing::sign_ed25519(env, &self.identity, None, now),
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
    ) -> Result<Reply, InboundError> {
        if env.signature.is_none() {
            return Err(InboundError::Unsigned);
        }
        let verified = self.verify(&env)?;
        if env.recipient_id != self.id {
            return Err(InboundError::WrongRecipient {
                recipient: env.recipient_id.clone(),
                me: self.id.clone(),
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
        let sign_with = self.reply_key(&verified, &env);
        let reply = match env.message_type {
            MessageType::ValidationRequest | MessageType::ChallengeResponse
                if self.authority.is_some() =>
            {
                let Some(auth) = &self.authority else {
                    return Err(InboundError::NoHandler(env.message_type));
                };
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
            t => match self.handlers.get(&t) {
                Some(h) => h(&env)?,
                None => return Err(InboundError::NoHandler(t)),
            },
        };
        match reply {
            HandlerReply::Accepted => Ok(Reply::Accepted),
            HandlerReply::Reply(t, payload) => {
                let mut out = env.reply(t, self.id.clone(), payload, self.clock.now());
                let now = self.clock.now();
                match sign_with {
                    SignWith::Hmac(k) => signing::sign_hmac(&mut out, &k, None, now),
                    SignWith::Identity => {
                        signing::sign_ed25519(&mut out, &self.identity, None, now)
                    }
                }
                Ok(Reply::Envelope(Box::new(out)))
            }
        }
    }
}
