//! Fixtures and invariants shared by the fuzz targets.
//!
//! Every key here is a fixed, public test key: the fuzz targets must be deterministic so a
//! crashing input replays exactly, and seeds signed with these keys reach the code behind
//! signature verification.

use chrono::{DateTime, TimeZone, Utc};
use pdsno_shared::json::{self, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey};

/// The compat network secret of PROTOCOL.md §2 (its SHA-256 is the HMAC key).
pub const NETWORK_SECRET: &str = "pdsno-message-signing-secret-change-in-production";

/// The bootstrap secret of the PROTOCOL.md §3 vector.
pub const BOOTSTRAP_SECRET: &str = "pdsno-bootstrap-secret-change-in-production";

/// Seed of the fixed Ed25519 identity that signs the Ed25519 seeds.
pub const ED25519_SEED: [u8; 32] = [7; 32];

/// The fixed "now" of every target: the time of the PROTOCOL.md vectors, so the signed
/// seeds are fresh.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

/// The network HMAC key.
pub fn hmac_key() -> HmacKey {
    HmacKey::from_secret_text(NETWORK_SECRET)
}

/// The fixed Ed25519 identity.
pub fn identity() -> IdentityKey {
    IdentityKey::from_seed(&ED25519_SEED)
}

/// Canonical encoding is a fixed point: encoding a parsed value, parsing that and encoding
/// again gives the same value and the same bytes. Returns the canonical bytes.
///
/// # Panics
/// When the invariant does not hold (that is the finding).
pub fn assert_canonical_fixed_point(v: &Value) -> Vec<u8> {
    let first = json::to_canonical_bytes(v);
    assert!(first.is_ascii(), "canonical text must be ASCII");
    let again = match json::parse(&first) {
        Ok(x) => x,
        Err(e) => panic!("canonical output does not parse: {e}"),
    };
    assert!(again == *v, "parse(encode(v)) != v");
    let second = json::to_canonical_bytes(&again);
    assert_eq!(first, second, "canonical encoding is not idempotent");
    first
}
