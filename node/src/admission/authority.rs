//! The parent's side of admission (PROTOCOL.md §3): the GC admits regional controllers,
//! an RC admits local controllers of its region.
//!
//! VALIDATION_REQUEST: freshness (`STALE_TIMESTAMP`, `FUTURE_TIMESTAMP`), blocklist,
//! bootstrap token (`INVALID_BOOTSTRAP_TOKEN`, `BOOTSTRAP_TOKEN_ALREADY_USED`), then a
//! single-use 30 s challenge. CHALLENGE_RESPONSE: `UNKNOWN_CHALLENGE`,
//! `CHALLENGE_EXPIRED`, `TEMP_ID_MISMATCH`, proof of possession (`INVALID_SIGNATURE`), policy
//! (`CONTROLLER_TYPE_NOT_PERMITTED`, `INVALID_REGION`, `REGION_MISMATCH`,
//! `CONTROLLER_QUOTA_EXCEEDED`, and `REGION_ALREADY_SERVED` for a second regional
//! controller of a region), then one transaction assigns the id, consumes the token and
//! writes the audit event; a failure there is `ERROR IDENTITY_ASSIGNMENT_FAILED`.
//!
//! A spent token is refused, except for the controller it was spent on (same temp id, role,
//! region and identity key, still active): it lost our answer (we crashed before sending
//! it), so after the challenge it gets the same id and stored certificate again
//! (`CONTROLLER_RECOVERED`); nothing new is assigned.
//!
//! Pending challenges live in memory (bounded). After use or expiry an entry is kept a
//! while as a tombstone, so a late response still gets a signed `CHALLENGE_EXPIRED` under
//! the key the child used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use pdsno_shared::bootstrap::{
    TokenCheck, admission_key, check_token, legacy_signed_nonce, token_matches,
};
use pdsno_shared::envelope::Envelope;
use pdsno_shared::ids::{self, Role};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, PublicKey, SecretString};
use pdsno_shared::payload::admission::{
    Certificate, ChallengeResponse, DelegationCredential, VALIDATE_LOCAL_CONTROLLERS,
    ValidationRequest, ValidationResult, ValidationStatus,
};
use pdsno_shared::time::{Clock, format_iso};

use crate::nib::{AdmitError, AdmitRecord, Event, Nib};

/// Reject codes (PROTOCOL.md §3).
pub mod reason {
    /// Envelope timestamp more than 300 s old.
    pub const STALE_TIMESTAMP: &str = "STALE_TIMESTAMP";
    /// Envelope timestamp more than 30 s ahead.
    pub const FUTURE_TIMESTAMP: &str = "FUTURE_TIMESTAMP";
    /// Temp id or key on the blocklist.
    pub const BLOCKLISTED: &str = "BLOCKLISTED";
    /// Token does not match.
    pub const INVALID_BOOTSTRAP_TOKEN: &str = "INVALID_BOOTSTRAP_TOKEN";
    /// Token past its expiry (ours: tokens minted with `pdsno token --ttl`).
    pub const BOOTSTRAP_TOKEN_EXPIRED: &str = "BOOTSTRAP_TOKEN_EXPIRED";
    /// Token consumed by an earlier admission.
    pub const BOOTSTRAP_TOKEN_ALREADY_USED: &str = "BOOTSTRAP_TOKEN_ALREADY_USED";
    /// No such pending challenge.
    pub const UNKNOWN_CHALLENGE: &str = "UNKNOWN_CHALLENGE";
    /// Challenge older than 30 s.
    pub const CHALLENGE_EXPIRED: &str = "CHALLENGE_EXPIRED";
    /// Response from another temp id than the challenge's.
    pub const TEMP_ID_MISMATCH: &str = "TEMP_ID_MISMATCH";
    /// Proof of possession failed.
    pub const INVALID_SIGNATURE: &str = "INVALID_SIGNATURE";
    /// This parent does not admit that type.
    pub const CONTROLLER_TYPE_NOT_PERMITTED: &str = "CONTROLLER_TYPE_NOT_PERMITTED";
    /// Region unknown or malformed.
    pub const INVALID_REGION: &str = "INVALID_REGION";
    /// An RC asked to admit into another region.
    pub const REGION_MISMATCH: &str = "REGION_MISMATCH";
    /// Region full.
    pub const CONTROLLER_QUOTA_EXCEEDED: &str = "CONTROLLER_QUOTA_EXCEEDED";
    /// The region already has an active regional controller (ours: one per region).
    pub const REGION_ALREADY_SERVED: &str = "REGION_ALREADY_SERVED";
    /// The parent failed to record the admission.
    pub const IDENTITY_ASSIGNMENT_FAILED: &str = "IDENTITY_ASSIGNMENT_FAILED";
}

/// Policy and secrets of an admitting parent.
#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// Child roles this parent admits.
    pub permitted: Vec<Role>,
    /// Regions children may ask for (empty: any well-formed region name).
    pub regions: Vec<String>,
    /// For an RC: the one region it serves.
    pub served_region: Option<String>,
    /// Most active children of one role per region.
    pub quota_per_region: u64,
    /// Accept the original's insecure challenge answer (logged each time).
    pub legacy_compat: bool,
    /// Temp ids or public keys refused outright.
    pub blocklist: Vec<String>,
    /// The secret bootstrap tokens are minted with.
    pub bootstrap_secret: SecretString,
    /// Lifetime of issued certificates.
    pub certificate_validity: Duration,
    /// Lifetime of a challenge.
    pub challenge_ttl: Duration,
    /// Most challenges outstanding at once.
    pub max_pending: usize,
}

impl AuthorityConfig {
    /// Defaults for a parent admitting `permitted` roles.
    pub fn new(permitted: Vec<Role>, bootstrap_secret: SecretString) -> Self {
        AuthorityConfig {
            permitted,
            regions: Vec::new(),
            served_region: None,
            quota_per_region: 10,
            legacy_compat: false,
            blocklist: Vec::new(),
            bootstrap_secret,
            certificate_validity: Duration::days(90),
            challenge_ttl: Duration::seconds(30),
            max_pending: 1024,
        }
    }
}

/// What a regional parent shows its children so they can check it: its certificate and
/// delegation credential (both signed by the GC) and the GC's key.
#[derive(Clone, Debug)]
pub struct IssuerChain {
    /// The RC's certificate (JSON object).
    pub certificate: Value,
    /// The RC's delegation credential (JSON object).
    pub delegation_credential: Value,
    /// The GC's public key.
    pub root_public_key: PublicKey,
}

/// A request the authority could not even evaluate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The payload is not the message it claims to be.
    #[error("invalid {kind} payload: {detail}")]
    BadPayload {
        /// Message kind.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Too many challenges outstanding.
    #[error("too many admissions in progress, retry later")]
    Busy,
}

/// The answer to a VALIDATION_REQUEST.
#[derive(Debug)]
pub enum RequestOutcome {
    /// A CHALLENGE payload.
    Challenge(Map),
    /// A VALIDATION_RESULT payload refusing at once.
    Refused(Map),
}

struct Pending {
    temp_id: String,
    nonce: [u8; 32],
    request: ValidationRequest,
    token: String,
    expires_at: DateTime<Utc>,
    admission_key: HmacKey,
    /// The id this token was already spent on: the child lost our APPROVED answer (we
    /// crashed before sending it) and asks again with the same token and key.
    recover: Option<String>,
    used: bool,
    /// Still counted as outstanding (unused and not yet swept as expired).
    outstanding: bool,
}

/// How a challenge was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proof {
    /// An Ed25519 signature by the offered key.
    Ed25519,
    /// The original's answer (`--legacy-compat`): proves nothing about a key.
    Legacy,
    /// Wrong.
    None,
}

/// Tombstones are kept this long after a challenge expires.
const TOMBSTONE: Duration = Duration::minutes(5);
/// Most tombstones kept (oldest dropped first).
const MAX_TOMBSTONES: usize = 16_384;

/// Challenges in issue order: `fresh` (within their lifetime), then `old` (expired
/// tombstones). Issue order is expiry order, so sweeping and eviction are O(1) amortized.
#[derive(Default)]
struct Challenges {
    map: HashMap<String, Pending>,
    fresh: std::collections::VecDeque<String>,
    old: std::collections::VecDeque<String>,
    outstanding: usize,
}

impl Challenges {
    fn sweep(&mut self, now: DateTime<Utc>) {
        while let Some(id) = self.fresh.front() {
            match self.map.get_mut(id) {
                Some(p) if p.expires_at >= now => break,
                Some(p) if p.outstanding => {
                    p.outstanding = false;
                    self.outstanding -= 1;
                }
                _ => {}
            }
            if let Some(id) = self.fresh.pop_front() {
                self.old.push_back(id);
            }
        }
        while let Some(id) = self.old.front() {
            let stale = self
                .map
                .get(id)
                .is_none_or(|p| p.expires_at + TOMBSTONE < now);
            if !stale && self.old.len() <= MAX_TOMBSTONES {
                break;
            }
            if let Some(id) = self.old.pop_front() {
                self.map.remove(&id);
            }
        }
    }

    fn insert(&mut self, id: String, p: Pending) {
        self.outstanding += 1;
        self.fresh.push_back(id.clone());
        self.map.insert(id, p);
    }

    /// Marks a challenge used; returns its data if it was unused.
    fn take(&mut self, id: &str) -> Option<&Pending> {
        let p = self.map.get_mut(id)?;
        if p.used {
            return None;
        }
        p.used = true;
        if p.outstanding {
            p.outstanding = false;
            self.outstanding -= 1;
        }
        Some(p)
    }
}

/// The admitting parent.
pub struct Authority {
    me: String,
    cfg: AuthorityConfig,
    identity: Arc<IdentityKey>,
    nib: Arc<Nib>,
    clock: Arc<dyn Clock>,
    chain: Option<IssuerChain>,
    pending: Mutex<Challenges>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("me", &self.me)
            .field("permitted", &self.cfg.permitted)
            .finish_non_exhaustive()
    }
}

fn refused(status: ValidationStatus, code: &str) -> Map {
    pdsno_shared::envelope::typed_to_map(&ValidationResult::refused(status, code))
        .unwrap_or_default()
}

fn bad(kind: &'static str, e: impl std::fmt::Display) -> AdmissionError {
    AdmissionError::BadPayload {
        kind,
        detail: e.to_string(),
    }
}

impl Authority {
    /// An authority acting as `me`, signing credentials with `identity`. An RC passes the
    /// chain its own admission gave it.
    pub fn new(
        me: String,
        cfg: AuthorityConfig,
        identity: Arc<IdentityKey>,
        nib: Arc<Nib>,
        clock: Arc<dyn Clock>,
        chain: Option<IssuerChain>,
    ) -> Self {
        Authority {
            me,
            cfg,
            identity,
            nib,
            clock,
            chain,
            pending: Mutex::new(Challenges::default()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Challenges> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The HMAC key an unadmitted child signs with (and our replies use): derived from the
    /// token it presents (VALIDATION_REQUEST) or from its pending challenge
    /// (CHALLENGE_RESPONSE). `None` when the message names neither.
    pub fn admission_key_for(&self, env: &Envelope) -> Option<HmacKey> {
        use pdsno_shared::envelope::MessageType as T;
        match env.message_type {
            T::ValidationRequest => env
                .payload
                .get("bootstrap_token")
                .and_then(Value::as_str)
                .map(admission_key),
            T::ChallengeResponse => {
                let id = env.payload.get("challenge_id")?.as_str()?;
                self.pending().map.get(id).map(|p| p.admission_key.clone())
            }
            _ => None,
        }
    }

    fn audit_refusal(&self, temp_id: &str, code: &str, now: DateTime<Utc>) {
        let mut details = Map::new();
        details.insert("temp_id".into(), temp_id.into());
        details.insert("reason".into(), code.into());
        let ev = Event {
            event_type: "VALIDATION_REJECTED".into(),
            actor: self.me.clone(),
            subject: Some(temp_id.to_owned()),
            action: "Refused controller admission".into(),
            decision: Some(code.into()),
            details,
        };
        if let Err(e) = self.nib.append_event(&ev, &self.identity, now) {
            tracing::error!(error = %e, "cannot write the audit event of a refused admission");
        }
    }

    fn refuse(&self, temp_id: &str, code: &str, now: DateTime<Utc>) -> Map {
        tracing::info!(parent = %self.me, %temp_id, reason = code, "admission refused");
        self.audit_refusal(temp_id, code, now);
        refused(ValidationStatus::Rejected, code)
    }

    fn freshness(&self, env: &Envelope, now: DateTime<Utc>) -> Option<&'static str> {
        let ts = env.timestamp_utc()?;
        if now - ts > Duration::seconds(300) {
            return Some(reason::STALE_TIMESTAMP);
        }
        if ts - now > Duration::seconds(30) {
            return Some(reason::FUTURE_TIMESTAMP);
        }
        None
    }

    /// Handles a VALIDATION_REQUEST (already signature-checked by the transport).
    ///
    /// # Errors
    /// [`AdmissionError::BadPayload`] for a payload without the required fields;
    /// [`AdmissionError::Busy`] when too many challenges are outstanding.
    pub fn on_request(&self, env: &Envelope) -> Result<RequestOutcome, AdmissionError> {
        let now = self.clock.now();
        let req: ValidationRequest = env.payload_as().map_err(|e| bad("VALIDATION_REQUEST", e))?;
        if req.temp_id.is_empty() || !ids::is_valid_controller_id(&req.temp_id) {
            return Err(bad(
                "VALIDATION_REQUEST",
                "temp_id must be 1-128 characters of [A-Za-z0-9_.-]",
            ));
        }
        if let Some(code) = self.freshness(env, now) {
            return Ok(RequestOutcome::Refused(self.refuse(
                &req.temp_id,
                code,
                now,
            )));
        }
        if env.sender_id != req.temp_id {
            return Ok(RequestOutcome::Refused(self.refuse(
                &req.temp_id,
                reason::TEMP_ID_MISMATCH,
                now,
            )));
        }
        let blocked = self
            .cfg
            .blocklist
            .iter()
            .any(|b| *b == req.temp_id || *b == req.public_key)
            || self.nib.blocked(&req.temp_id).unwrap_or(true)
            || self.nib.blocked(&req.public_key).unwrap_or(true);
        if blocked {
            return Ok(RequestOutcome::Refused(self.refuse(
                &req.temp_id,
                reason::BLOCKLISTED,
                now,
            )));
        }
        match check_token(
            self.cfg.bootstrap_secret.expose().as_bytes(),
            &req.temp_id,
            &req.region,
            &req.controller_type,
            &req.bootstrap_token,
            now.timestamp(),
        ) {
            TokenCheck::Valid => {}
            TokenCheck::Expired => {
                return Ok(RequestOutcome::Refused(self.refuse(
                    &req.temp_id,
                    reason::BOOTSTRAP_TOKEN_EXPIRED,
                    now,
                )));
            }
            TokenCheck::Invalid => {
                return Ok(RequestOutcome::Refused(self.refuse(
                    &req.temp_id,
                    reason::INVALID_BOOTSTRAP_TOKEN,
                    now,
                )));
            }
        }
        let mut recover = None;
        match self.nib.token_used(&req.bootstrap_token) {
            Ok(false) => {}
            Ok(true) => match self.recoverable(&req) {
                Some(id) => recover = Some(id),
                None => {
                    return Ok(RequestOutcome::Refused(self.refuse(
                        &req.temp_id,
                        reason::BOOTSTRAP_TOKEN_ALREADY_USED,
                        now,
                    )));
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot read consumed tokens");
                return Ok(RequestOutcome::Refused(refused(
                    ValidationStatus::Error,
                    reason::IDENTITY_ASSIGNMENT_FAILED,
                )));
            }
        }
        let challenge_id = ids::challenge_id();
        let nonce = ids::random_bytes_32();
        let expires_at = now + self.cfg.challenge_ttl;
        {
            let mut pending = self.pending();
            pending.sweep(now);
            if pending.outstanding >= self.cfg.max_pending {
                return Err(AdmissionError::Busy);
            }
            pending.insert(
                challenge_id.clone(),
                Pending {
                    temp_id: req.temp_id.clone(),
                    nonce,
                    admission_key: admission_key(&req.bootstrap_token),
                    token: req.bootstrap_token.clone(),
                    recover,
                    request: req,
                    expires_at,
                    used: false,
                    outstanding: true,
                },
            );
        }
        let mut m = Map::new();
        m.insert("challenge_id".into(), challenge_id.into());
        m.insert("nonce".into(), hex::encode(nonce).into());
        m.insert("expires_at".into(), format_iso(expires_at).into());
        Ok(RequestOutcome::Challenge(m))
    }

    /// Handles a CHALLENGE_RESPONSE (already signature-checked by the transport); returns
    /// the VALIDATION_RESULT payload.
    ///
    /// # Errors
    /// [`AdmissionError::BadPayload`] for a payload without the required fields.
    pub fn on_response(&self, env: &Envelope) -> Result<Map, AdmissionError> {
        let now = self.clock.now();
        let resp: ChallengeResponse = env.payload_as().map_err(|e| bad("CHALLENGE_RESPONSE", e))?;
        if let Some(code) = self.freshness(env, now) {
            return Ok(self.refuse(&resp.temp_id, code, now));
        }
        // Take the challenge: single use whatever the outcome.
        let taken = {
            let mut pending = self.pending();
            pending.sweep(now);
            pending.take(&resp.challenge_id).map(|p| {
                (
                    p.temp_id.clone(),
                    p.nonce,
                    p.request.clone(),
                    p.token.clone(),
                    p.expires_at,
                    p.recover.clone(),
                )
            })
        };
        let Some((temp_id, nonce, req, token, expires_at, recover)) = taken else {
            return Ok(self.refuse(&resp.temp_id, reason::UNKNOWN_CHALLENGE, now));
        };
        if now > expires_at {
            return Ok(self.refuse(&resp.temp_id, reason::CHALLENGE_EXPIRED, now));
        }
        if resp.temp_id != temp_id || env.sender_id != temp_id {
            return Ok(self.refuse(&resp.temp_id, reason::TEMP_ID_MISMATCH, now));
        }
        let proof = self.proof_of_possession(&req.public_key, &nonce, &resp.signed_nonce, &temp_id);
        if proof == Proof::None {
            return Ok(self.refuse(&temp_id, reason::INVALID_SIGNATURE, now));
        }
        let role = Role::parse(&req.controller_type);
        let Some(role) = role.filter(|r| self.cfg.permitted.contains(r)) else {
            return Ok(self.refuse(&temp_id, reason::CONTROLLER_TYPE_NOT_PERMITTED, now));
        };
        if let Some(id) = recover {
            // Answering again hands out a stored identity: only to whoever proves the
            // recorded key, never on the legacy answer (whose "key" is any string).
            if proof != Proof::Ed25519 {
                return Ok(self.refuse(&temp_id, reason::BOOTSTRAP_TOKEN_ALREADY_USED, now));
            }
            return Ok(self.reissue(role, &req, &id, now));
        }
        if !ids::is_valid_region(&req.region)
            || (!self.cfg.regions.is_empty() && !self.cfg.regions.contains(&req.region))
        {
            // Ours: say which regions this parent admits (its configuration, not a secret).
            let mut m = self.refuse(&temp_id, reason::INVALID_REGION, now);
            if !self.cfg.regions.is_empty() {
                m.insert(
                    "allowed_regions".into(),
                    Value::Array(self.cfg.regions.iter().map(|r| r.as_str().into()).collect()),
                );
            }
            return Ok(m);
        }
        if self
            .cfg
            .served_region
            .as_ref()
            .is_some_and(|r| *r != req.region)
        {
            return Ok(self.refuse(&temp_id, reason::REGION_MISMATCH, now));
        }
        // One regional controller per region: its local controllers' ids, its retained
        // regional policy and its bootstrap secret are the region's. A replacement is
        // admitted once the old one is revoked.
        let quota = if role == Role::Regional {
            1
        } else {
            self.cfg.quota_per_region
        };
        match self.nib.count_active(role, &req.region) {
            Ok(n) if n >= quota && role == Role::Regional => {
                return Ok(self.refuse(&temp_id, reason::REGION_ALREADY_SERVED, now));
            }
            Ok(n) if n >= quota => {
                return Ok(self.refuse(&temp_id, reason::CONTROLLER_QUOTA_EXCEEDED, now));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot count controllers");
                return Ok(refused(
                    ValidationStatus::Error,
                    reason::IDENTITY_ASSIGNMENT_FAILED,
                ));
            }
        }
        Ok(self.assign(role, req, token, now))
    }

    fn proof_of_possession(
        &self,
        public_key: &str,
        nonce: &[u8; 32],
        signed_nonce: &str,
        temp_id: &str,
    ) -> Proof {
        if let Ok(pk) = PublicKey::from_base64(public_key)
            && pk.verify_base64(nonce, signed_nonce)
        {
            return Proof::Ed25519;
        }
        if self.cfg.legacy_compat && token_matches(&legacy_signed_nonce(nonce), signed_nonce) {
            tracing::warn!(%temp_id, "accepted the legacy challenge answer: it does not prove possession of a key (--legacy-compat)");
            return Proof::Legacy;
        }
        Proof::None
    }

    /// For a spent token: the id it was spent on, when that controller is active and was
    /// admitted here under the same temp id, role, region and identity key (only its holder
    /// can then pass the challenge). Anything else is a reused token.
    fn recoverable(&self, req: &ValidationRequest) -> Option<String> {
        let id = self.nib.token_assignment(&req.bootstrap_token).ok()??;
        let row = self.nib.controller(&id).ok()??;
        let same = row.status == "active"
            && row.temp_id.as_deref() == Some(req.temp_id.as_str())
            && row.public_key.as_deref() == Some(req.public_key.as_str())
            && row.role == req.controller_type
            && row.region.as_deref() == Some(req.region.as_str())
            && row.validated_by.as_deref() == Some(self.me.as_str())
            && row.certificate.is_some();
        same.then_some(id)
    }

    /// Answers a recovering child with the admission it already has: the stored
    /// certificate (and, for a regional controller, a delegation credential with the same
    /// validity). Audited as CONTROLLER_RECOVERED; nothing new is assigned.
    fn reissue(&self, role: Role, req: &ValidationRequest, id: &str, now: DateTime<Utc>) -> Map {
        let fail = |what: String| {
            tracing::error!(parent = %self.me, controller = %id, error = %what, "cannot answer a recovering controller");
            refused(ValidationStatus::Error, reason::IDENTITY_ASSIGNMENT_FAILED)
        };
        let row = match self.nib.controller(id) {
            Ok(Some(r)) => r,
            Ok(None) => return fail("no record".into()),
            Err(e) => return fail(e.to_string()),
        };
        let Some(cert) = row
            .certificate
            .as_deref()
            .and_then(|t| json::parse(t.as_bytes()).ok())
        else {
            return fail("no stored certificate".into());
        };
        let mut delegation = None;
        if role == Role::Regional {
            let (issued_at, expires_at) = match json::from_value::<Certificate>(cert.clone()) {
                Ok(c) => (c.issued_at, c.expires_at),
                Err(e) => return fail(e.to_string()),
            };
            let mut d = DelegationCredential {
                delegatee_id: id.to_owned(),
                delegatee_public_key: req.public_key.clone(),
                region: req.region.clone(),
                permitted_actions: vec![VALIDATE_LOCAL_CONTROLLERS.to_owned()],
                issued_by: self.me.clone(),
                issued_at,
                expires_at,
                signature: String::new(),
                extra: Map::new(),
            };
            if let Err(e) = d.sign(&self.identity) {
                return fail(e.to_string());
            }
            match json::to_value(&d) {
                Ok(v) => delegation = Some(v),
                Err(e) => return fail(e.to_string()),
            }
        }
        let mut details = Map::new();
        details.insert("temp_id".into(), req.temp_id.clone().into());
        details.insert("assigned_id".into(), id.into());
        self.record_event(
            Event {
                event_type: "CONTROLLER_RECOVERED".into(),
                actor: self.me.clone(),
                subject: Some(id.to_owned()),
                action: "Answered again a controller that lost its admission result".into(),
                decision: Some("APPROVED".into()),
                details,
            },
            now,
        );
        tracing::info!(parent = %self.me, temp_id = %req.temp_id, assigned_id = %id, "admission answered again (the controller lost the first answer)");
        self.approved(role, &req.region, id, cert, delegation)
    }

    fn record_event(&self, ev: Event, now: DateTime<Utc>) {
        if let Err(e) = self.nib.append_event(&ev, &self.identity, now) {
            tracing::error!(error = %e, event = %ev.event_type, "cannot write an audit event");
        }
    }

    fn assign(&self, role: Role, req: ValidationRequest, token: String, now: DateTime<Utc>) -> Map {
        let expires = now + self.cfg.certificate_validity;
        let record = AdmitRecord {
            role,
            region: req.region.clone(),
            temp_id: req.temp_id.clone(),
            public_key: req.public_key.clone(),
            token,
            validated_by: self.me.clone(),
            metadata: json::to_value(&req.metadata)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default(),
        };
        let mut delegation: Option<Value> = None;
        let result = self.nib.admit(&record, &self.identity, now, |assigned_id| {
            let mut cert = Certificate {
                assigned_id: assigned_id.to_owned(),
                role: role.as_str().to_owned(),
                region: req.region.clone(),
                public_key: req.public_key.clone(),
                issued_by: self.me.clone(),
                issued_at: format_iso(now),
                expires_at: format_iso(expires),
                signature: String::new(),
                extra: Map::new(),
            };
            cert.sign(&self.identity).map_err(|e| e.to_string())?;
            if role == Role::Regional {
                let mut d = DelegationCredential {
                    delegatee_id: assigned_id.to_owned(),
                    delegatee_public_key: req.public_key.clone(),
                    region: req.region.clone(),
                    permitted_actions: vec![VALIDATE_LOCAL_CONTROLLERS.to_owned()],
                    issued_by: self.me.clone(),
                    issued_at: format_iso(now),
                    expires_at: format_iso(expires),
                    signature: String::new(),
                    extra: Map::new(),
                };
                d.sign(&self.identity).map_err(|e| e.to_string())?;
                delegation = Some(json::to_value(&d).map_err(|e| e.to_string())?);
            }
            json::to_value(&cert).map_err(|e| e.to_string())
        });
        let admitted = match result {
            Ok(a) => a,
            Err(AdmitError::TokenAlreadyUsed) => {
                return self.refuse(&req.temp_id, reason::BOOTSTRAP_TOKEN_ALREADY_USED, now);
            }
            Err(e) => {
                tracing::error!(parent = %self.me, temp_id = %req.temp_id, error = %e, "admission could not be recorded");
                self.audit_refusal(&req.temp_id, reason::IDENTITY_ASSIGNMENT_FAILED, now);
                return refused(ValidationStatus::Error, reason::IDENTITY_ASSIGNMENT_FAILED);
            }
        };
        tracing::info!(parent = %self.me, temp_id = %req.temp_id, assigned_id = %admitted.assigned_id, role = %role, region = %req.region, "controller admitted");
        self.approved(
            role,
            &req.region,
            &admitted.assigned_id,
            admitted.certificate.clone(),
            delegation,
        )
    }

    /// The APPROVED payload.
    fn approved(
        &self,
        role: Role,
        region: &str,
        assigned_id: &str,
        certificate: Value,
        delegation: Option<Value>,
    ) -> Map {
        let mut m = Map::new();
        m.insert("status".into(), "APPROVED".into());
        m.insert("assigned_id".into(), assigned_id.into());
        m.insert("certificate".into(), certificate);
        m.insert(
            "delegation_credential".into(),
            delegation.unwrap_or(Value::Null),
        );
        m.insert("role".into(), role.as_str().into());
        m.insert("region".into(), region.into());
        if role == Role::Regional {
            // Local controller ids already known in the region (admitted by an earlier,
            // revoked RC): the new RC numbers its own above them, so an id is never
            // minted twice in the tree.
            match self.nib.highest_sequence(Role::Local, region) {
                Ok(n) => {
                    m.insert("local_id_floor".into(), n.into());
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the local controller ids of the region");
                }
            }
        }
        m.insert(
            "issuer_public_key".into(),
            self.identity.public().to_base64().into(),
        );
        match &self.chain {
            None => {
                m.insert(
                    "root_public_key".into(),
                    self.identity.public().to_base64().into(),
                );
            }
            Some(chain) => {
                let mut c = Map::new();
                c.insert("certificate".into(), chain.certificate.clone());
                c.insert(
                    "delegation_credential".into(),
                    chain.delegation_credential.clone(),
                );
                c.insert(
                    "root_public_key".into(),
                    chain.root_public_key.to_base64().into(),
                );
                m.insert("chain".into(), Value::Object(c));
                m.insert(
                    "root_public_key".into(),
                    chain.root_public_key.to_base64().into(),
                );
            }
        }
        m
    }

    /// Challenges currently outstanding (for status and tests).
    pub fn pending_challenges(&self) -> usize {
        let now = self.clock.now();
        let mut pending = self.pending();
        pending.sweep(now);
        pending.outstanding
    }

    /// How long a challenge lives.
    pub fn challenge_ttl(&self) -> StdDuration {
        self.cfg
            .challenge_ttl
            .to_std()
            .unwrap_or(StdDuration::from_secs(30))
    }
}

#[cfg(test)]
mod tests;
