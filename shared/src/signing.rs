//! Signing and verifying envelopes (PROTOCOL.md §2).
//!
//! HMAC-SHA256 over the canonical JSON is the compat scheme (byte-compatible with the Python
//! original); Ed25519 over the same bytes signs broadcasts, so many readers can verify
//! without sharing a secret. Ed25519 signatures travel as 128 lowercase hex characters, like
//! the HMAC's 64.
//!
//! Verification runs the checks in the contract's order and reports the first failure with
//! the contract's reason text (part of the REST contract); the nonce is recorded only after
//! everything else passed.

use chrono::{DateTime, Duration, Utc};
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::envelope::Envelope;
use crate::ids;
use crate::keys::{HmacKey, IdentityKey, KeyRing, PublicKey};
use crate::replay::{NonceStore, Recorded, StoreError};
use crate::time::{format_iso, parse_iso, truncate_micros};

type HmacSha256 = hmac::Hmac<Sha256>;

/// `signature_algorithm` of the HMAC scheme.
pub const HMAC_SHA256: &str = "HMAC-SHA256";
/// `signature_algorithm` of the Ed25519 scheme.
pub const ED25519: &str = "Ed25519";
/// Freshness window: |now - signed_at| may not exceed this many seconds.
pub const MAX_AGE_SECS: i64 = 300;
/// Longest nonce accepted (a 64-hex nonce is the norm; this bounds the replay cache).
pub const MAX_NONCE_LEN: usize = 128;
/// Default number of nonces the replay cache may hold.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1_000_000;

/// Hex HMAC-SHA256 of `msg` under `key`.
pub fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    hex::encode(hmac_raw(key, msg))
}

fn hmac_raw(key: &[u8], msg: &[u8]) -> [u8; 32] {
    #[allow(clippy::expect_used)]
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .expect("HMAC-SHA256 accepts keys of every length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// True for lowercase hex only: signatures are written as Python's `hexdigest()` writes
/// them, and one signature has exactly one accepted spelling (an uppercase copy of a valid
/// signature is refused, as Python's `compare_digest` on the hex strings refuses it).
fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Constant-time check of a hex HMAC-SHA256 (lowercase hex).
pub fn hmac_verify_hex(key: &[u8], msg: &[u8], sig_hex: &str) -> bool {
    let mut sig = [0u8; 32];
    if sig_hex.len() != 64
        || !is_lower_hex(sig_hex)
        || hex::decode_to_slice(sig_hex, &mut sig).is_err()
    {
        return false;
    }
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else {
        return false;
    };
    mac.update(msg);
    mac.verify_slice(&sig).is_ok()
}

fn stamp(env: &mut Envelope, algorithm: &str, key_id: Option<&str>, now: DateTime<Utc>) {
    env.signature = None;
    env.nonce = Some(ids::nonce_hex());
    env.signed_at = Some(format_iso(truncate_micros(now)));
    env.signature_algorithm = Some(algorithm.to_owned());
    env.key_id = key_id.map(str::to_owned);
}

/// Signs `env` with HMAC-SHA256 under `key`: fresh `nonce`, `signed_at` = `now`, optional
/// `key_id`, then `signature` and `signature_algorithm`.
pub fn sign_hmac(env: &mut Envelope, key: &HmacKey, key_id: Option<&str>, now: DateTime<Utc>) {
    stamp(env, HMAC_SHA256, key_id, now);
    env.signature = Some(hmac_hex(key.expose_bytes(), &env.canonical_signing_bytes()));
}

/// Signs `env` with the ring's newest key (naming it when the ring announces key ids).
///
/// # Errors
/// [`SignError::NoKey`] when the ring is empty.
pub fn sign_with_ring(
    env: &mut Envelope,
    ring: &KeyRing,
    now: DateTime<Utc>,
) -> Result<(), SignError> {
    let k = ring.current().ok_or(SignError::NoKey)?;
    let id = if ring.announces_key_id() {
        k.id.as_deref()
    } else {
        None
    };
    sign_hmac(env, k.key(), id, now);
    Ok(())
}

/// Signs `env` with an Ed25519 identity key.
pub fn sign_ed25519(
    env: &mut Envelope,
    key: &IdentityKey,
    key_id: Option<&str>,
    now: DateTime<Utc>,
) {
    stamp(env, ED25519, key_id, now);
    env.signature = Some(hex::encode(key.sign(&env.canonical_signing_bytes())));
}

/// Why signing failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// No key to sign with.
    #[error("no signing key available")]
    NoKey,
}

/// Why a message was rejected. `Display` is the contract's reason text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Step 1.
    #[error("Missing required field: {0}")]
    MissingField(&'static str),
    /// Step 2.
    #[error("Sender mismatch: expected {expected}, got {got}")]
    SenderMismatch {
        /// Who we expected.
        expected: String,
        /// Who it says it is.
        got: String,
    },
    /// Step 3 (also: no key of that kind is known for the sender).
    #[error("Unsupported signature algorithm")]
    UnsupportedAlgorithm,
    /// Step 4, unparsable.
    #[error("Invalid timestamp format: {0}")]
    InvalidTimestamp(String),
    /// Step 4, outside the window.
    #[error("Message too old or future-dated: {age_secs}s (max {max_secs}s)")]
    Stale {
        /// |now - signed_at| in whole seconds.
        age_secs: i64,
        /// The window.
        max_secs: i64,
    },
    /// Ours, before step 5: the nonce is empty or absurdly long.
    #[error("Invalid nonce: must be 1 to 128 characters")]
    InvalidNonce,
    /// Step 5 (and step 7 if a copy won the race).
    #[error("Replay attack detected: nonce already seen")]
    Replay,
    /// Step 6.
    #[error("Invalid signature: message may have been tampered with")]
    BadSignature,
    /// Ours: `key_id` names no live key.
    #[error("Invalid signature: unknown or retired key_id")]
    UnknownKeyId,
    /// Ours: the replay cache is full of live nonces, so nothing new can be accepted safely.
    #[error("Replay cache full: message rejected, retry later")]
    ReplayCacheFull,
    /// Ours: the replay store failed.
    #[error("Replay store unavailable")]
    Store(StoreError),
}

impl VerifyError {
    /// True for failures of ours rather than of the message (map to 503, not 401).
    pub fn is_internal(&self) -> bool {
        matches!(self, VerifyError::ReplayCacheFull | VerifyError::Store(_))
    }
}

impl From<StoreError> for VerifyError {
    fn from(e: StoreError) -> Self {
        VerifyError::Store(e)
    }
}

/// The keys a message from one sender may be signed with.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyKeys<'a> {
    /// HMAC keys shared with the sender (pairwise ring, or the network key).
    pub hmac: Option<&'a KeyRing>,
    /// The sender's Ed25519 public key.
    pub ed25519: Option<&'a PublicKey>,
}

/// What verified a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `HMAC-SHA256` or `Ed25519`.
    pub algorithm: &'static str,
    /// The id of the ring key that matched, if it has one.
    pub key_id: Option<String>,
}

/// Verifies envelopes against keys, a freshness window and a replay store.
#[derive(Debug)]
pub struct Verifier<S> {
    store: S,
    capacity: usize,
    window: Duration,
}

impl<S: NonceStore> Verifier<S> {
    /// A verifier with the default window (300 s) and replay capacity.
    pub fn new(store: S) -> Self {
        Verifier {
            store,
            capacity: DEFAULT_REPLAY_CAPACITY,
            window: Duration::seconds(MAX_AGE_SECS),
        }
    }

    /// Sets how many live nonces the replay cache may hold.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The replay store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Checks `env` as PROTOCOL.md §2 orders; on success the nonce is recorded.
    ///
    /// # Errors
    /// The first failing check, as a [`VerifyError`] whose text is the contract's reason.
    pub fn verify(
        &self,
        env: &Envelope,
        keys: VerifyKeys<'_>,
        expected_sender: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Verified, VerifyError> {
        // 1-3: required fields, expected sender, algorithm
        let (signature, nonce, signed_at, algorithm) = precheck(env, keys, expected_sender)?;
        // 4. freshness
        let at = parse_iso(signed_at).map_err(|e| VerifyError::InvalidTimestamp(e.to_string()))?;
        let age = (now - at).abs();
        if age > self.window {
            let secs = age.num_milliseconds() as f64 / 1000.0;
            return Err(VerifyError::Stale {
                age_secs: secs.round() as i64,
                max_secs: self.window.num_seconds(),
            });
        }
        // 5. replay (a cheap early answer; step 7 is the authoritative check)
        if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
            return Err(VerifyError::InvalidNonce);
        }
        if self.store.contains(nonce, now)? {
            return Err(VerifyError::Replay);
        }
        // 6. signature
        let key_id = check_signature(env, keys, algorithm, signature, now)?;
        // 7. accept: record the nonce until the message could no longer pass step 4
        match self
            .store
            .record(nonce, at + self.window, now, self.capacity)?
        {
            Recorded::Fresh => Ok(Verified { algorithm, key_id }),
            Recorded::AlreadySeen => Err(VerifyError::Replay),
            Recorded::Full => Err(VerifyError::ReplayCacheFull),
        }
    }
}

/// Steps 1-3: the fields every signed envelope needs, the expected sender, an algorithm we
/// hold a key for. Returns (signature, nonce, signed_at, algorithm).
fn precheck<'e>(
    env: &'e Envelope,
    keys: VerifyKeys<'_>,
    expected_sender: Option<&str>,
) -> Result<(&'e str, &'e str, &'e str, &'static str), VerifyError> {
    let signature = env
        .signature
        .as_deref()
        .ok_or(VerifyError::MissingField("signature"))?;
    let nonce = env
        .nonce
        .as_deref()
        .ok_or(VerifyError::MissingField("nonce"))?;
    let signed_at = env
        .signed_at
        .as_deref()
        .ok_or(VerifyError::MissingField("signed_at"))?;
    if env.sender_id.is_empty() {
        return Err(VerifyError::MissingField("sender_id"));
    }
    if let Some(expected) = expected_sender
        && expected != env.sender_id
    {
        return Err(VerifyError::SenderMismatch {
            expected: expected.to_owned(),
            got: env.sender_id.clone(),
        });
    }
    // absent means the compat default
    let algorithm = match env.signature_algorithm.as_deref() {
        None | Some(HMAC_SHA256) if keys.hmac.is_some() => HMAC_SHA256,
        Some(ED25519) if keys.ed25519.is_some() => ED25519,
        _ => return Err(VerifyError::UnsupportedAlgorithm),
    };
    Ok((signature, nonce, signed_at, algorithm))
}

/// Step 6: the signature itself. Returns the id of the ring key that matched.
fn check_signature(
    env: &Envelope,
    keys: VerifyKeys<'_>,
    algorithm: &'static str,
    signature: &str,
    now: DateTime<Utc>,
) -> Result<Option<String>, VerifyError> {
    let canonical = env.canonical_signing_bytes();
    match algorithm {
        HMAC_SHA256 => {
            let ring = keys.hmac.ok_or(VerifyError::UnsupportedAlgorithm)?;
            verify_hmac(ring, env.key_id.as_deref(), &canonical, signature, now)
        }
        _ => {
            let pk = keys.ed25519.ok_or(VerifyError::UnsupportedAlgorithm)?;
            let mut sig = [0u8; 64];
            if signature.len() != 128
                || !is_lower_hex(signature)
                || hex::decode_to_slice(signature, &mut sig).is_err()
            {
                return Err(VerifyError::BadSignature);
            }
            if !pk.verify(&canonical, &sig) {
                return Err(VerifyError::BadSignature);
            }
            Ok(env.key_id.clone())
        }
    }
}

/// Checks only that `env` is authentic: its fields, sender, algorithm and signature —
/// neither freshness nor replay, and nothing is recorded. For content whose receivers
/// order it by other means, e.g. a retained policy (versions only grow) or a last will
/// published by the broker long after it was signed. `signed_at` must still parse.
///
/// # Errors
/// The first failing check.
pub fn authenticate(
    env: &Envelope,
    keys: VerifyKeys<'_>,
    expected_sender: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Verified, VerifyError> {
    let (signature, _nonce, signed_at, algorithm) = precheck(env, keys, expected_sender)?;
    parse_iso(signed_at).map_err(|e| VerifyError::InvalidTimestamp(e.to_string()))?;
    let key_id = check_signature(env, keys, algorithm, signature, now)?;
    Ok(Verified { algorithm, key_id })
}

fn verify_hmac(
    ring: &KeyRing,
    key_id: Option<&str>,
    canonical: &[u8],
    signature: &str,
    now: DateTime<Utc>,
) -> Result<Option<String>, VerifyError> {
    match key_id {
        Some(id) => {
            let k = ring
                .live(now)
                .find(|k| k.id.as_deref() == Some(id))
                .ok_or(VerifyError::UnknownKeyId)?;
            if hmac_verify_hex(k.key().expose_bytes(), canonical, signature) {
                Ok(k.id.clone())
            } else {
                Err(VerifyError::BadSignature)
            }
        }
        None => ring
            .live(now)
            .find(|k| hmac_verify_hex(k.key().expose_bytes(), canonical, signature))
            .map(|k| k.id.clone())
            .ok_or(VerifyError::BadSignature),
    }
}

#[cfg(test)]
mod tests;
