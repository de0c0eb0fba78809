//! The child's side of admission: the handshake with the parent and the checks a child
//! makes before it trusts what the parent issued.
//!
//! The child signs its admission messages with the shared network key if the deployment
//! has one, else with the key derived from its bootstrap token, and expects the parent's
//! replies under the same key. On APPROVED it checks:
//! - the certificate is signed by the parent's key, names the assigned id, our key, role
//!   and region;
//! - a regional child: the delegation credential is signed by the same (global) key and
//!   allows admitting local controllers of our region;
//! - a local child: the parent's chain: its certificate and delegation credential are
//!   signed by the root (global) key, name the parent and its key, and cover our region.
//!
//! The root key is pinned from the first admission unless configured (`root_public_key`).
//! A result that fails these checks is refused: the child does not adopt the identity.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use pdsno_shared::bootstrap::admission_key;
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing, PublicKey, SecretString, base64_encode};
use pdsno_shared::payload::admission::{
    Certificate, Challenge, DelegationCredential, Metadata, VALIDATE_LOCAL_CONTROLLERS,
    ValidationRequest, ValidationResult, ValidationStatus,
};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{self, Verifier, VerifyKeys};
use pdsno_shared::time::Clock;

use crate::transport::parent::{LinkError, ParentLink, ParentPin};

/// What the child needs for the handshake.
#[derive(Clone, Debug)]
pub struct ChildConfig {
    /// Temporary id.
    pub temp_id: String,
    /// Role asked for.
    pub role: Role,
    /// Region asked for.
    pub region: String,
    /// The operator-minted bootstrap token.
    pub bootstrap_token: SecretString,
    /// The shared network key, if the deployment uses one.
    pub network_key: Option<HmacKey>,
    /// Metadata sent along.
    pub metadata: Metadata,
    /// A configured root (global controller) key: the parent's chain must lead to it.
    pub root_public_key: Option<PublicKey>,
    /// What the parent must prove before the bootstrap token is sent (a regional child
    /// with a configured root key pins that key as its parent's).
    pub parent_pin: ParentPin,
}

impl ChildConfig {
    /// The identity key the parent must prove it holds, if any.
    pub fn pinned_parent_key(&self) -> Option<PublicKey> {
        self.parent_pin.public_key.or(match self.role {
            Role::Regional => self.root_public_key,
            _ => None,
        })
    }
}

/// What a successful admission gives the child.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The assigned id.
    pub assigned_id: String,
    /// Our certificate (JSON object).
    pub certificate: Value,
    /// A regional child's delegation credential (JSON object).
    pub delegation_credential: Option<Value>,
    /// The parent's id.
    pub parent_id: String,
    /// The parent's key (pinned).
    pub parent_public_key: PublicKey,
    /// The root key.
    pub root_public_key: PublicKey,
    /// A local child: the parent's chain (JSON object).
    pub chain: Option<Value>,
    /// A regional child: the highest local controller sequence already used in its region
    /// (its own local ids start above it).
    pub local_id_floor: u64,
}

/// Why admission did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The parent refused: we failed a check (final). Shown with what to do about it.
    #[error("admission REJECTED: {0}{hint}", hint = rejection_hint(.0).map(|h| format!(" ({h})")).unwrap_or_default())]
    Rejected(String),
    /// The parent failed (retry later).
    #[error("admission ERROR at the parent: {0}")]
    ParentError(String),
    /// The parent's answer cannot be trusted (final: a forged certificate or credential).
    #[error("refusing the parent's answer: {0}")]
    Untrusted(String),
    /// The parent could not be reached or answered off-protocol.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The parent's answer does not verify or is malformed.
    #[error("invalid answer from the parent: {0}")]
    Protocol(String),
    /// The parent and this controller sign admission differently (final: a setting must
    /// change on one side).
    #[error("admission REJECTED: {0}")]
    SigningSetup(String),
}

/// What a refused signature on our admission request means, given how we signed it.
/// With a shared message-signing secret we sign with it; a parent with another secret (or
/// none, so it checks the bootstrap token's key) cannot verify that, and retrying cannot help.
fn explain_refused_signature(e: ChildError, signed_with_network_key: bool) -> ChildError {
    match &e {
        ChildError::Link(LinkError::Status {
            code: tonic::Code::Unauthenticated,
            message,
        }) if signed_with_network_key && message.contains("signature") => {
            ChildError::SigningSetup(format!(
                "the parent could not verify our admission request ({message}). This controller \
                 signs it with the shared message-signing secret (--secret-file, \
                 PDSNO_MESSAGE_SIGNING_SECRET_FILE or PDSNO_MESSAGE_SIGNING_SECRET); the parent \
                 has another secret or none. Give every controller of the deployment the same \
                 secret, or remove it here (then admission is signed with the bootstrap token)"
            ))
        }
        _ => e,
    }
}

/// What an operator can do about a refused admission, by reason code.
pub fn rejection_hint(reason: &str) -> Option<&'static str> {
    Some(match reason.split(' ').next().unwrap_or(reason) {
        "INVALID_BOOTSTRAP_TOKEN" => {
            "the token does not match this --temp-id, --region and tier, or was minted with another parent's secret: mint it again on the parent's host (pdsno token)"
        }
        "BOOTSTRAP_TOKEN_EXPIRED" => {
            "the token's time ran out: mint a new one on the parent's host (pdsno token --ttl)"
        }
        "BOOTSTRAP_TOKEN_ALREADY_USED" => {
            "this token was spent by another admission: mint a new token for a new --temp-id"
        }
        "REGION_ALREADY_SERVED" => {
            "the region already has a regional controller; to replace it, revoke it on the global controller (pdsno controller revoke ID) and try again"
        }
        "REGION_MISMATCH" => {
            "this regional controller serves another region: point --parent at the regional controller of your --region"
        }
        "INVALID_REGION" => {
            "the parent does not admit this region: check --region against the global controller's --regions"
        }
        "CONTROLLER_QUOTA_EXCEEDED" => {
            "the region is full: raise quota_per_region on the parent or revoke an unused controller"
        }
        "CONTROLLER_TYPE_NOT_PERMITTED" => {
            "a global controller admits regional controllers and a regional one local controllers: check --parent"
        }
        "BLOCKLISTED" => {
            "this temp id or key is blocklisted (a revoked controller): start from a new data directory with a new --temp-id and token"
        }
        "STALE_TIMESTAMP" | "FUTURE_TIMESTAMP" => {
            "this host's clock and the parent's disagree: synchronise them (NTP)"
        }
        "TEMP_ID_MISMATCH" | "INVALID_SIGNATURE" | "UNKNOWN_CHALLENGE" | "CHALLENGE_EXPIRED" => {
            "the challenge failed: try again; if it persists, check that nothing between this host and the parent alters traffic"
        }
        _ => return None,
    })
}

impl ChildError {
    /// True when trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChildError::ParentError(_) | ChildError::Protocol(_) => true,
            ChildError::Link(e) => {
                e.is_retryable()
                    || matches!(
                        e,
                        LinkError::Status {
                            code: tonic::Code::ResourceExhausted
                                | tonic::Code::Unavailable
                                | tonic::Code::Cancelled
                                | tonic::Code::DeadlineExceeded,
                            ..
                        }
                    )
            }
            ChildError::Rejected(_) | ChildError::Untrusted(_) | ChildError::SigningSetup(_) => {
                false
            }
        }
    }
}

struct Handshake<'a> {
    cfg: &'a ChildConfig,
    clock: &'a Arc<dyn Clock>,
    key: HmacKey,
    verifier: Verifier<MemoryNonceStore>,
}

impl Handshake<'_> {
    fn sign(&self, env: &mut Envelope) {
        signing::sign_hmac(env, &self.key, None, self.clock.now());
    }

    fn check_reply(&self, env: &Envelope, parent_id: &str) -> Result<(), ChildError> {
        let mut ring = KeyRing::single(None, self.key.clone(), self.clock.now());
        ring.set_announce_key_id(false);
        self.verifier
            .verify(
                env,
                VerifyKeys {
                    hmac: Some(&ring),
                    ed25519: None,
                },
                Some(parent_id),
                self.clock.now(),
            )
            .map_err(|e| ChildError::Protocol(format!("reply does not verify: {e}")))?;
        if env.recipient_id != self.cfg.temp_id {
            return Err(ChildError::Protocol(format!(
                "reply addressed to {}",
                env.recipient_id
            )));
        }
        Ok(())
    }
}

fn refusal(env: &Envelope) -> Result<ChildError, ChildError> {
    let r: ValidationResult = env
        .payload_as()
        .map_err(|e| ChildError::Protocol(e.to_string()))?;
    let mut reason = r.reason.unwrap_or_else(|| "no reason given".into());
    if let Some(Value::Array(allowed)) = r.extra.get("allowed_regions") {
        let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).take(64).collect();
        reason = format!("{reason} [this parent admits: {}]", names.join(", "));
    }
    Ok(match r.status {
        ValidationStatus::Rejected => ChildError::Rejected(reason),
        _ => ChildError::ParentError(reason),
    })
}

fn key_field(m: &Map, field: &str) -> Result<PublicKey, ChildError> {
    let s = m
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ChildError::Untrusted(format!("missing {field}")))?;
    PublicKey::from_base64(s)
        .map_err(|_| ChildError::Untrusted(format!("{field} is not an Ed25519 key")))
}

/// Runs one admission handshake against `link`.
///
/// # Errors
/// A [`ChildError`]; see [`ChildError::is_retryable`].
pub async fn admit(
    link: &ParentLink,
    cfg: &ChildConfig,
    identity: &IdentityKey,
    clock: &Arc<dyn Clock>,
) -> Result<Admission, ChildError> {
    // The parent proves who it is before anything secret is sent (the token travels in
    // the first admission message).
    let pinned_key = cfg.pinned_parent_key();
    let info = match &pinned_key {
        Some(k) => link.info_proved(k).await?,
        None => link.info().await?,
    };
    let parent_id = info.controller_id;
    if let Some(expected) = &cfg.parent_pin.id
        && *expected != parent_id
    {
        return Err(ChildError::Untrusted(format!(
            "the parent describes itself as {} but {expected} was expected (--parent-id)",
            parent_id.chars().take(128).collect::<String>()
        )));
    }
    let key = match &cfg.network_key {
        Some(k) => k.clone(),
        None => admission_key(cfg.bootstrap_token.expose()),
    };
    let hs = Handshake {
        cfg,
        clock,
        key,
        verifier: Verifier::new(MemoryNonceStore::new()),
    };

    // One fresh start when the challenge was lost at the parent (restart, expiry); a
    // second loss is final (each loss counts against this address's admission lockout).
    let mut lost = None;
    for _ in 0..2 {
        let outcome = attempt(link, cfg, identity, clock, &hs, &parent_id)
            .await
            .map_err(|e| explain_refused_signature(e, cfg.network_key.is_some()))?;
        match outcome {
            Attempt::Done(result) => {
                let a = trust(&result.payload, cfg, identity, &parent_id, clock.now())?;
                if pinned_key.is_some_and(|k| k != a.parent_public_key) {
                    return Err(ChildError::Untrusted(
                        "the parent's certificate is issued by another key than the pinned one"
                            .into(),
                    ));
                }
                return Ok(a);
            }
            Attempt::ChallengeLost(why) => {
                tracing::info!(reason = %why, "the parent lost our challenge; starting the handshake again");
                lost = Some(why);
            }
        }
    }
    Err(ChildError::Rejected(format!(
        "the parent lost the challenge twice: {}",
        lost.unwrap_or_default()
    )))
}

enum Attempt {
    Done(Box<Envelope>),
    ChallengeLost(String),
}

async fn attempt(
    link: &ParentLink,
    cfg: &ChildConfig,
    identity: &IdentityKey,
    clock: &Arc<dyn Clock>,
    hs: &Handshake<'_>,
    parent_id: &str,
) -> Result<Attempt, ChildError> {
    let parent_id = parent_id.to_owned();
    let req = ValidationRequest {
        temp_id: cfg.temp_id.clone(),
        controller_type: cfg.role.as_str().to_owned(),
        region: cfg.region.clone(),
        public_key: identity.public().to_base64(),
        bootstrap_token: cfg.bootstrap_token.expose().to_owned(),
        metadata: cfg.metadata.clone(),
        extra: Map::new(),
    };
    let mut env = Envelope::new(
        MessageType::ValidationRequest,
        cfg.temp_id.clone(),
        parent_id.clone(),
        Map::new(),
        clock.now(),
    )
    .with_typed_payload(&req)
    .map_err(|e| ChildError::Protocol(e.to_string()))?;
    hs.sign(&mut env);
    let reply = link.request_validation(&env).await?;
    hs.check_reply(&reply, &parent_id)?;
    if reply.message_type == MessageType::ValidationResult {
        return Err(refusal(&reply)?);
    }
    if reply.message_type != MessageType::Challenge {
        return Err(ChildError::Protocol(format!(
            "expected CHALLENGE, got {}",
            reply.message_type
        )));
    }
    let ch: Challenge = reply
        .payload_as()
        .map_err(|e| ChildError::Protocol(e.to_string()))?;
    let mut nonce = [0u8; 32];
    hex::decode_to_slice(&ch.nonce, &mut nonce)
        .map_err(|_| ChildError::Protocol("challenge nonce is not 64 hex".into()))?;

    let mut p = Map::new();
    p.insert("challenge_id".into(), ch.challenge_id.clone().into());
    p.insert("temp_id".into(), cfg.temp_id.clone().into());
    p.insert(
        "signed_nonce".into(),
        base64_encode(&identity.sign(&nonce)).into(),
    );
    let mut resp = reply.reply(
        MessageType::ChallengeResponse,
        cfg.temp_id.clone(),
        p,
        clock.now(),
    );
    hs.sign(&mut resp);
    let result = match link.respond_to_challenge(&resp).await {
        // A parent restarted between our request and our response no longer knows the
        // challenge (nor the key to check our answer with): the token is still unspent.
        Err(LinkError::Status {
            code: tonic::Code::Unauthenticated,
            message,
        }) => return Ok(Attempt::ChallengeLost(message)),
        r => r?,
    };
    hs.check_reply(&result, &parent_id)?;
    if result.message_type != MessageType::ValidationResult {
        return Err(ChildError::Protocol(format!(
            "expected VALIDATION_RESULT, got {}",
            result.message_type
        )));
    }
    if result.payload.get("status").and_then(Value::as_str) != Some("APPROVED") {
        let reason = result.payload.get("reason").and_then(Value::as_str);
        if matches!(reason, Some("UNKNOWN_CHALLENGE" | "CHALLENGE_EXPIRED")) {
            return Ok(Attempt::ChallengeLost(
                reason.unwrap_or_default().to_owned(),
            ));
        }
        return Err(refusal(&result)?);
    }
    Ok(Attempt::Done(Box::new(result)))
}

/// Checks an APPROVED result (see the module docs).
///
/// # Errors
/// [`ChildError::Untrusted`] naming the failed check.
pub fn trust(
    m: &Map,
    cfg: &ChildConfig,
    identity: &IdentityKey,
    parent_id: &str,
    now: DateTime<Utc>,
) -> Result<Admission, ChildError> {
    let untrusted = |s: String| ChildError::Untrusted(s);
    let assigned_id = m
        .get("assigned_id")
        .and_then(Value::as_str)
        .ok_or_else(|| untrusted("no assigned_id".into()))?
        .to_owned();
    let issuer = key_field(m, "issuer_public_key")?;
    let cert_value = m
        .get("certificate")
        .cloned()
        .ok_or_else(|| untrusted("no certificate".into()))?;
    let cert: Certificate =
        json::from_value(cert_value.clone()).map_err(|e| untrusted(format!("certificate: {e}")))?;
    cert.verify(&issuer, now)
        .map_err(|e| untrusted(format!("certificate: {e}")))?;
    if cert.assigned_id != assigned_id
        || cert.public_key != identity.public().to_base64()
        || cert.role != cfg.role.as_str()
        || cert.region != cfg.region
        || cert.issued_by != parent_id
    {
        return Err(untrusted(
            "certificate does not describe this controller".into(),
        ));
    }
    match cfg.role {
        Role::Regional => {
            // The parent is the root.
            if let Some(root) = cfg.root_public_key
                && root != issuer
            {
                return Err(untrusted(
                    "the parent's key is not the configured root key".into(),
                ));
            }
            let d_value = m
                .get("delegation_credential")
                .cloned()
                .unwrap_or(Value::Null);
            let d: DelegationCredential = json::from_value(d_value.clone())
                .map_err(|e| untrusted(format!("delegation credential: {e}")))?;
            d.verify(&issuer, now)
                .map_err(|e| untrusted(format!("delegation credential: {e}")))?;
            if d.delegatee_id != assigned_id
                || d.region != cfg.region
                || d.delegatee_public_key != identity.public().to_base64()
                || !d
                    .permitted_actions
                    .iter()
                    .any(|a| a == VALIDATE_LOCAL_CONTROLLERS)
            {
                return Err(untrusted(
                    "delegation credential does not cover this controller and region".into(),
                ));
            }
            Ok(Admission {
                assigned_id,
                certificate: cert_value,
                delegation_credential: Some(d_value),
                parent_id: parent_id.to_owned(),
                parent_public_key: issuer,
                root_public_key: issuer,
                chain: None,
                local_id_floor: m.get("local_id_floor").and_then(Value::as_u64).unwrap_or(0),
            })
        }
        Role::Local | Role::Global => {
            let chain = m
                .get("chain")
                .and_then(Value::as_object)
                .ok_or_else(|| untrusted("no chain from the regional parent".into()))?;
            let root = key_field(chain, "root_public_key")?;
            if let Some(configured) = cfg.root_public_key
                && configured != root
            {
                return Err(untrusted(
                    "the chain does not lead to the configured root key".into(),
                ));
            }
            let rc_cert: Certificate =
                json::from_value(chain.get("certificate").cloned().unwrap_or(Value::Null))
                    .map_err(|e| untrusted(format!("parent certificate: {e}")))?;
            rc_cert
                .verify(&root, now)
                .map_err(|e| untrusted(format!("parent certificate: {e}")))?;
            if rc_cert.assigned_id != parent_id
                || rc_cert.public_key != issuer.to_base64()
                || rc_cert.role != Role::Regional.as_str()
            {
                return Err(untrusted(
                    "parent certificate does not describe the parent".into(),
                ));
            }
            let d: DelegationCredential = json::from_value(
                chain
                    .get("delegation_credential")
                    .cloned()
                    .unwrap_or(Value::Null),
            )
            .map_err(|e| untrusted(format!("delegation credential: {e}")))?;
            d.verify(&root, now)
                .map_err(|e| untrusted(format!("delegation credential: {e}")))?;
            if d.delegatee_id != parent_id
                || d.delegatee_public_key != issuer.to_base64()
                || !d
                    .permitted_actions
                    .iter()
                    .any(|a| a == VALIDATE_LOCAL_CONTROLLERS)
            {
                return Err(untrusted(
                    "delegation credential does not belong to the parent".into(),
                ));
            }
            if d.region != cfg.region {
                return Err(untrusted(format!(
                    "delegation credential is for region {}, not {}",
                    d.region, cfg.region
                )));
            }
            Ok(Admission {
                assigned_id,
                certificate: cert_value,
                delegation_credential: None,
                parent_id: parent_id.to_owned(),
                parent_public_key: issuer,
                root_public_key: root,
                chain: Some(Value::Object(chain.clone())),
                local_id_floor: 0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdsno_shared::time::format_iso;

    fn cert(
        issuer: &IdentityKey,
        id: &str,
        role: &str,
        region: &str,
        key: &PublicKey,
        by: &str,
        now: DateTime<Utc>,
    ) -> Value {
        let mut c = Certificate {
            assigned_id: id.into(),
            role: role.into(),
            region: region.into(),
            public_key: key.to_base64(),
            issued_by: by.into(),
            issued_at: format_iso(now),
            expires_at: format_iso(now + chrono::Duration::days(1)),
            signature: String::new(),
            extra: Map::new(),
        };
        c.sign(issuer).expect("sign");
        json::to_value(&c).expect("value")
    }

    fn deleg(
        issuer: &IdentityKey,
        id: &str,
        region: &str,
        key: &PublicKey,
        now: DateTime<Utc>,
    ) -> Value {
        let mut d = DelegationCredential {
            delegatee_id: id.into(),
            delegatee_public_key: key.to_base64(),
            region: region.into(),
            permitted_actions: vec![VALIDATE_LOCAL_CONTROLLERS.into()],
            issued_by: "global_cntl_1".into(),
            issued_at: format_iso(now),
            expires_at: format_iso(now + chrono::Duration::days(1)),
            signature: String::new(),
            extra: Map::new(),
        };
        d.sign(issuer).expect("sign");
        json::to_value(&d).expect("value")
    }

    fn cfg(role: Role, region: &str) -> ChildConfig {
        ChildConfig {
            temp_id: "temp".into(),
            role,
            region: region.into(),
            bootstrap_token: SecretString::new("t"),
            network_key: None,
            metadata: Metadata::default(),
            root_public_key: None,
            parent_pin: ParentPin::default(),
        }
    }

    /// A local child's APPROVED result from RC `rc_id` (key `rc`), whose chain was issued by
    /// `root` for `chain_region`.
    fn lc_result(
        root: &IdentityKey,
        rc: &IdentityKey,
        rc_id: &str,
        chain_region: &str,
        me: &IdentityKey,
        now: DateTime<Utc>,
    ) -> Map {
        let mut chain = Map::new();
        chain.insert(
            "certificate".into(),
            cert(
                root,
                rc_id,
                "regional",
                chain_region,
                &rc.public(),
                "global_cntl_1",
                now,
            ),
        );
        chain.insert(
            "delegation_credential".into(),
            deleg(root, rc_id, chain_region, &rc.public(), now),
        );
        chain.insert("root_public_key".into(), root.public().to_base64().into());
        let mut m = Map::new();
        m.insert("status".into(), "APPROVED".into());
        m.insert("assigned_id".into(), "local_cntl_zone-A_1".into());
        m.insert(
            "certificate".into(),
            cert(
                rc,
                "local_cntl_zone-A_1",
                "local",
                "zone-A",
                &me.public(),
                rc_id,
                now,
            ),
        );
        m.insert("issuer_public_key".into(), rc.public().to_base64().into());
        m.insert("chain".into(), Value::Object(chain));
        m
    }

    #[test]
    fn a_local_child_trusts_a_proper_chain_only() {
        let now = Utc::now();
        let (root, rc, me) = (
            IdentityKey::generate(),
            IdentityKey::generate(),
            IdentityKey::generate(),
        );
        let rc_id = "regional_cntl_zone-A_1";
        let good = lc_result(&root, &rc, rc_id, "zone-A", &me, now);
        let a = trust(&good, &cfg(Role::Local, "zone-A"), &me, rc_id, now).expect("trusted");
        assert_eq!(
            (
                a.assigned_id.as_str(),
                a.root_public_key,
                a.parent_public_key
            ),
            ("local_cntl_zone-A_1", root.public(), rc.public())
        );

        // A delegation credential for another region is refused.
        let other_region = lc_result(&root, &rc, rc_id, "zone-B", &me, now);
        let e = trust(&other_region, &cfg(Role::Local, "zone-A"), &me, rc_id, now)
            .expect_err("refused");
        assert!(e.to_string().contains("region zone-B"), "{e}");
        // A certificate forged (signed by someone else) is refused.
        let forger = IdentityKey::generate();
        let mut forged = good.clone();
        forged.insert(
            "certificate".into(),
            cert(
                &forger,
                "local_cntl_zone-A_1",
                "local",
                "zone-A",
                &me.public(),
                rc_id,
                now,
            ),
        );
        assert!(matches!(
            trust(&forged, &cfg(Role::Local, "zone-A"), &me, rc_id, now),
            Err(ChildError::Untrusted(_))
        ));
        // A chain signed by a root other than the configured one is refused.
        let mut strict = cfg(Role::Local, "zone-A");
        strict.root_public_key = Some(IdentityKey::generate().public());
        assert!(matches!(
            trust(&good, &strict, &me, rc_id, now),
            Err(ChildError::Untrusted(_))
        ));
        // A certificate for someone else's key is refused.
        let stranger = IdentityKey::generate();
        assert!(matches!(
            trust(&good, &cfg(Role::Local, "zone-A"), &stranger, rc_id, now),
            Err(ChildError::Untrusted(_))
        ));
    }

    #[test]
    fn a_regional_child_checks_its_delegation() {
        let now = Utc::now();
        let (gc, me) = (IdentityKey::generate(), IdentityKey::generate());
        let id = "regional_cntl_zone-A_1";
        let mut m = Map::new();
        m.insert("assigned_id".into(), id.into());
        m.insert(
            "certificate".into(),
            cert(
                &gc,
                id,
                "regional",
                "zone-A",
                &me.public(),
                "global_cntl_1",
                now,
            ),
        );
        m.insert("issuer_public_key".into(), gc.public().to_base64().into());
        m.insert(
            "delegation_credential".into(),
            deleg(&gc, id, "zone-A", &me.public(), now),
        );
        assert!(
            trust(
                &m,
                &cfg(Role::Regional, "zone-A"),
                &me,
                "global_cntl_1",
                now
            )
            .is_ok()
        );
        let mut wrong = m.clone();
        wrong.insert(
            "delegation_credential".into(),
            deleg(&gc, id, "zone-B", &me.public(), now),
        );
        assert!(matches!(
            trust(
                &wrong,
                &cfg(Role::Regional, "zone-A"),
                &me,
                "global_cntl_1",
                now
            ),
            Err(ChildError::Untrusted(_))
        ));
        let mut no_deleg = m.clone();
        no_deleg.insert("delegation_credential".into(), Value::Null);
        assert!(
            trust(
                &no_deleg,
                &cfg(Role::Regional, "zone-A"),
                &me,
                "global_cntl_1",
                now
            )
            .is_err()
        );
    }
}
