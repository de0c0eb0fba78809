//! Authenticated key agreement between two admitted controllers (DESIGN.md "Trust model").
//!
//! Each side makes an ephemeral X25519 key and signs it, with its Ed25519 identity key,
//! together with both ids, the proposed key id and an exchange id (the answer also covers
//! the offer's ephemeral key). A man in the middle who swaps an ephemeral key cannot
//! produce the identity signature, so the swap is detected even if he can sign envelopes
//! (for example with a shared network key). The pairwise HMAC key is
//! HKDF-SHA256(salt = SHA-256 of the canonical transcript, ikm = X25519 shared secret,
//! info = `pdsno-pairwise-key`), 32 bytes.
//!
//! [`wrap`] protects a 32-byte secret (an MQTT credential) for delivery over a channel
//! keyed by a pairwise key: it is XORed with a one-time HKDF stream bound to the key id.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::ids;
use crate::json::{self, Map, Value};
use crate::keys::{HmacKey, IdentityKey, PublicKey, base64_encode};
use crate::time::{format_iso, parse_iso};

/// HKDF `info` of the pairwise key.
const PAIR_INFO: &[u8] = b"pdsno-pairwise-key";

/// An offer or an answer (the payload of KEY_EXCHANGE_INIT / KEY_EXCHANGE_RESPONSE and
/// KEY_ROTATION_REQUEST / KEY_ROTATION_ACK).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyAgreement {
    /// Who started the exchange.
    pub initiator_id: String,
    /// Who answers.
    pub responder_id: String,
    /// The sender's ephemeral X25519 public key (base64).
    pub public_key: String,
    /// The name the new key will have.
    pub key_id: String,
    /// Unique id of this exchange.
    pub exchange_id: String,
    /// ISO-8601 time of this step.
    pub timestamp: String,
    /// Base64 Ed25519 identity signature of the transcript.
    pub signature: String,
    /// Unknown fields, preserved (ours: `mqtt_credential`, `mqtt_url`).
    #[serde(flatten)]
    pub extra: Map,
}

/// Why an agreement step was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyxError {
    /// The identity signature does not verify (a swapped ephemeral key, a forgery).
    #[error("identity signature does not verify")]
    BadSignature,
    /// A field is malformed.
    #[error("malformed key agreement: {0}")]
    Malformed(&'static str),
    /// The answer does not belong to our offer.
    #[error("answer does not match the offer")]
    Mismatch,
    /// The peer's ephemeral key is a low-order point (no shared secret).
    #[error("the peer's ephemeral key contributes nothing")]
    NonContributory,
    /// Older than the freshness window.
    #[error("key agreement too old or future-dated")]
    Stale,
}

fn transcript(purpose: &str, a: &KeyAgreement, offer_key: Option<&str>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("purpose".into(), purpose.into());
    m.insert("initiator_id".into(), a.initiator_id.clone().into());
    m.insert("responder_id".into(), a.responder_id.clone().into());
    m.insert("public_key".into(), a.public_key.clone().into());
    m.insert("key_id".into(), a.key_id.clone().into());
    m.insert("exchange_id".into(), a.exchange_id.clone().into());
    m.insert("timestamp".into(), a.timestamp.clone().into());
    if let Some(k) = offer_key {
        m.insert("offer_public_key".into(), k.into());
    }
    json::to_canonical_bytes(&Value::Object(m))
}

const OFFER: &str = "pdsno-key-exchange/offer";
const ANSWER: &str = "pdsno-key-exchange/answer";

fn x_public(b64: &str) -> Result<XPublic, KeyxError> {
    let raw = B64
        .decode(b64)
        .map_err(|_| KeyxError::Malformed("public_key is not base64"))?;
    let arr: [u8; 32] = raw
        .try_into()
        .map_err(|_| KeyxError::Malformed("public_key is not 32 bytes"))?;
    Ok(XPublic::from(arr))
}

fn fresh(a: &KeyAgreement, now: DateTime<Utc>) -> Result<(), KeyxError> {
    let t = parse_iso(&a.timestamp).map_err(|_| KeyxError::Malformed("timestamp"))?;
    if (now - t).abs() > chrono::Duration::seconds(300) {
        return Err(KeyxError::Stale);
    }
    Ok(())
}

/// The initiator's secret half, kept until the answer arrives.
pub struct Pending {
    secret: StaticSecret,
    offer: KeyAgreement,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("key_id", &self.offer.key_id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl Pending {
    /// The offer sent.
    pub fn offer(&self) -> &KeyAgreement {
        &self.offer
    }
}

/// Starts an exchange: a signed offer and the secret to finish it with.
pub fn offer(
    identity: &IdentityKey,
    initiator_id: &str,
    responder_id: &str,
    key_id: &str,
    now: DateTime<Utc>,
) -> Pending {
    let secret = StaticSecret::from(*Zeroizing::new(ids::random_bytes_32()));
    let public = XPublic::from(&secret);
    let mut o = KeyAgreement {
        initiator_id: initiator_id.into(),
        responder_id: responder_id.into(),
        public_key: base64_encode(public.as_bytes()),
        key_id: key_id.into(),
        exchange_id: format!("kx-{}", hex::encode(&ids::random_bytes_32()[..8])),
        timestamp: format_iso(now),
        signature: String::new(),
        extra: Map::new(),
    };
    o.signature = base64_encode(&identity.sign(&transcript(OFFER, &o, None)));
    Pending { secret, offer: o }
}

fn derive(shared: &[u8; 32], offer: &KeyAgreement, answer: &KeyAgreement) -> HmacKey {
    let mut t = transcript(OFFER, offer, None);
    t.extend_from_slice(&transcript(ANSWER, answer, Some(&offer.public_key)));
    let salt = Sha256::digest(&t);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut okm = Zeroizing::new([0u8; 32]);
    if hk.expand(PAIR_INFO, &mut okm[..]).is_err() {
        // 32 bytes is far below HKDF-SHA256's limit.
        return HmacKey::random();
    }
    HmacKey::from_bytes(&okm[..]).unwrap_or_else(|_| HmacKey::random())
}

/// Answers an offer: checks the initiator's identity signature with `initiator_key`, and
/// returns the signed answer and the derived key.
///
/// # Errors
/// [`KeyxError`] when the offer is malformed, stale, or not signed by the initiator.
pub fn answer(
    identity: &IdentityKey,
    initiator_key: &PublicKey,
    offer: &KeyAgreement,
    now: DateTime<Utc>,
) -> Result<(KeyAgreement, HmacKey), KeyxError> {
    fresh(offer, now)?;
    if !initiator_key.verify_base64(&transcript(OFFER, offer, None), &offer.signature) {
        return Err(KeyxError::BadSignature);
    }
    let their = x_public(&offer.public_key)?;
    let secret = StaticSecret::from(*Zeroizing::new(ids::random_bytes_32()));
    let shared = secret.diffie_hellman(&their);
    if !shared.was_contributory() {
        return Err(KeyxError::NonContributory);
    }
    let mut a = KeyAgreement {
        initiator_id: offer.initiator_id.clone(),
        responder_id: offer.responder_id.clone(),
        public_key: base64_encode(XPublic::from(&secret).as_bytes()),
        key_id: offer.key_id.clone(),
        exchange_id: offer.exchange_id.clone(),
        timestamp: format_iso(now),
        signature: String::new(),
        extra: Map::new(),
    };
    a.signature = base64_encode(&identity.sign(&transcript(ANSWER, &a, Some(&offer.public_key))));
    let key = derive(shared.as_bytes(), offer, &a);
    Ok((a, key))
}

/// Finishes an exchange with the responder's answer, checked with `responder_key`.
///
/// # Errors
/// [`KeyxError`] when the answer is forged, stale, or for another exchange.
pub fn finish(
    p: &Pending,
    responder_key: &PublicKey,
    answer: &KeyAgreement,
    now: DateTime<Utc>,
) -> Result<HmacKey, KeyxError> {
    fresh(answer, now)?;
    if answer.exchange_id != p.offer.exchange_id
        || answer.key_id != p.offer.key_id
        || answer.initiator_id != p.offer.initiator_id
        || answer.responder_id != p.offer.responder_id
    {
        return Err(KeyxError::Mismatch);
    }
    if !responder_key.verify_base64(
        &transcript(ANSWER, answer, Some(&p.offer.public_key)),
        &answer.signature,
    ) {
        return Err(KeyxError::BadSignature);
    }
    let their = x_public(&answer.public_key)?;
    let shared = p.secret.diffie_hellman(&their);
    if !shared.was_contributory() {
        return Err(KeyxError::NonContributory);
    }
    Ok(derive(shared.as_bytes(), &p.offer, answer))
}

fn wrap_stream(key: &HmacKey, key_id: &str, purpose: &str) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(key_id.as_bytes()), key.expose_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(format!("pdsno-wrap|{purpose}").as_bytes(), &mut okm[..]);
    okm
}

/// Protects a 32-byte secret for delivery under `key` (named `key_id`); returns hex.
/// Each (key, key_id, purpose) must wrap one secret only.
pub fn wrap(key: &HmacKey, key_id: &str, purpose: &str, secret: &[u8; 32]) -> String {
    let s = wrap_stream(key, key_id, purpose);
    let out: Vec<u8> = secret.iter().zip(s.iter()).map(|(a, b)| a ^ b).collect();
    hex::encode(out)
}

/// Reverses [`wrap`].
///
/// # Errors
/// [`KeyxError::Malformed`] for text that is not 64 hex characters.
pub fn unwrap(
    key: &HmacKey,
    key_id: &str,
    purpose: &str,
    wrapped: &str,
) -> Result<Zeroizing<[u8; 32]>, KeyxError> {
    let mut buf = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(wrapped, &mut buf[..])
        .map_err(|_| KeyxError::Malformed("wrapped secret"))?;
    let s = wrap_stream(key, key_id, purpose);
    for (b, k) in buf.iter_mut().zip(s.iter()) {
        *b ^= k;
    }
    Ok(buf)
}

/// The name of generation `generation` of the pair's key: `key_{min}_{max}` first, then
/// `key_{min}_{max}.2`, `.3`, ...
pub fn key_id(a: &str, b: &str, generation: u32) -> String {
    let base = ids::pair_key_id(a, b);
    if generation <= 1 {
        base
    } else {
        format!("{base}.{generation}")
    }
}

/// The generation encoded in a key id (1 when there is no suffix).
pub fn generation_of(key_id: &str) -> u32 {
    key_id
        .rsplit_once('.')
        .and_then(|(_, g)| g.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_key() {
        let now = Utc::now();
        let (rc, gc) = (IdentityKey::generate(), IdentityKey::generate());
        let kid = key_id("regional_cntl_zone-A_1", "global_cntl_1", 1);
        assert_eq!(kid, "key_global_cntl_1_regional_cntl_zone-A_1");
        let p = offer(&rc, "regional_cntl_zone-A_1", "global_cntl_1", &kid, now);
        let (ans, k_responder) = answer(&gc, &rc.public(), p.offer(), now).expect("answer");
        let k_initiator = finish(&p, &gc.public(), &ans, now).expect("finish");
        assert_eq!(k_initiator, k_responder);
        // Another run gives another key.
        let p2 = offer(&rc, "regional_cntl_zone-A_1", "global_cntl_1", &kid, now);
        let (ans2, k2) = answer(&gc, &rc.public(), p2.offer(), now).expect("answer");
        assert_ne!(k2, k_responder);
        assert_eq!(finish(&p2, &gc.public(), &ans2, now), Ok(k2));
    }

    #[test]
    fn a_swapped_ephemeral_key_is_detected_in_either_direction() {
        let now = Utc::now();
        let (rc, gc, mallory) = (
            IdentityKey::generate(),
            IdentityKey::generate(),
            IdentityKey::generate(),
        );
        let p = offer(&rc, "rc", "gc", "key_gc_rc", now);
        // Mallory replaces the initiator's ephemeral key with hers.
        let evil = offer(&mallory, "rc", "gc", "key_gc_rc", now);
        let mut swapped = p.offer().clone();
        swapped.public_key = evil.offer().public_key.clone();
        assert_eq!(
            answer(&gc, &rc.public(), &swapped, now).err(),
            Some(KeyxError::BadSignature)
        );
        // ... or re-signs it with her own identity: still not the initiator's.
        assert_eq!(
            answer(&gc, &rc.public(), evil.offer(), now).err(),
            Some(KeyxError::BadSignature)
        );
        // She replaces the responder's ephemeral key in the answer.
        let (mut ans, _) = answer(&gc, &rc.public(), p.offer(), now).expect("answer");
        let (evil_ans, _) = answer(&mallory, &rc.public(), p.offer(), now).expect("answer");
        ans.public_key = evil_ans.public_key;
        assert_eq!(
            finish(&p, &gc.public(), &ans, now).err(),
            Some(KeyxError::BadSignature)
        );
        // An answer to another exchange does not finish this one.
        let other = offer(&rc, "rc", "gc", "key_gc_rc", now);
        let (other_ans, _) = answer(&gc, &rc.public(), other.offer(), now).expect("answer");
        assert_eq!(
            finish(&p, &gc.public(), &other_ans, now).err(),
            Some(KeyxError::Mismatch)
        );
        // A stale offer.
        let old = offer(
            &rc,
            "rc",
            "gc",
            "key_gc_rc",
            now - chrono::Duration::seconds(600),
        );
        assert_eq!(
            answer(&gc, &rc.public(), old.offer(), now).err(),
            Some(KeyxError::Stale)
        );
    }

    #[test]
    fn wrapping_round_trips_and_depends_on_the_key() {
        let k = HmacKey::random();
        let secret = ids::random_bytes_32();
        let w = wrap(&k, "key_a_b", "mqtt", &secret);
        assert_eq!(*unwrap(&k, "key_a_b", "mqtt", &w).expect("unwrap"), secret);
        assert_ne!(
            *unwrap(&HmacKey::random(), "key_a_b", "mqtt", &w).expect("unwrap"),
            secret
        );
        assert_ne!(
            *unwrap(&k, "key_a_b.2", "mqtt", &w).expect("unwrap"),
            secret
        );
        assert!(unwrap(&k, "key_a_b", "mqtt", "zz").is_err());
    }

    #[test]
    fn key_generations() {
        assert_eq!(key_id("b", "a", 3), "key_a_b.3");
        assert_eq!(generation_of("key_a_b.3"), 3);
        assert_eq!(generation_of("key_a_b"), 1);
        assert_eq!(generation_of("key_a.b_c"), 1);
    }
}
