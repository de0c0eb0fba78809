//! Bootstrap tokens and the keys an unadmitted child can use (PROTOCOL.md §3).

use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ids::Role;
use crate::keys::HmacKey;
use crate::signing::hmac_hex;

/// Prefix of a token that carries its expiry (ours; the original's tokens have none).
pub const EXPIRING_PREFIX: &str = "pdsno1.";

/// HKDF `info` of the admission key derived from a bootstrap token.
pub const ADMISSION_KEY_INFO: &[u8] = b"pdsno-admission";

/// The bootstrap token an operator mints for a new child:
/// hex HMAC-SHA256(secret, `"{temp_id}|{region}|{controller_type}"`).
pub fn bootstrap_token(
    secret: &[u8],
    temp_id: &str,
    region: &str,
    controller_type: &str,
) -> String {
    hmac_hex(
        secret,
        format!("{temp_id}|{region}|{controller_type}").as_bytes(),
    )
}

/// [`bootstrap_token`] for a typed role.
pub fn bootstrap_token_for(secret: &[u8], temp_id: &str, region: &str, role: Role) -> String {
    bootstrap_token(secret, temp_id, region, role.as_str())
}

/// A bootstrap token valid until `expires_at` (Unix seconds):
/// `pdsno1.{expires_at}.{hex HMAC-SHA256(secret, "{temp_id}|{region}|{type}|{expires_at}")}`.
/// The expiry is covered by the HMAC, so it cannot be moved.
pub fn expiring_token(
    secret: &[u8],
    temp_id: &str,
    region: &str,
    controller_type: &str,
    expires_at: i64,
) -> String {
    let mac = hmac_hex(
        secret,
        format!("{temp_id}|{region}|{controller_type}|{expires_at}").as_bytes(),
    );
    format!("{EXPIRING_PREFIX}{expires_at}.{mac}")
}

/// What a presented token is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    /// Minted with this secret for this child, and not expired.
    Valid,
    /// Minted with this secret for this child, but its expiry has passed.
    Expired,
    /// Not minted with this secret for this child.
    Invalid,
}

/// Checks `presented` (an expiring token, or the original's form without expiry) against
/// `secret` for the child `temp_id|region|type`, at `now` (Unix seconds). Constant time in
/// the MAC.
pub fn check_token(
    secret: &[u8],
    temp_id: &str,
    region: &str,
    controller_type: &str,
    presented: &str,
    now: i64,
) -> TokenCheck {
    let Some(rest) = presented.strip_prefix(EXPIRING_PREFIX) else {
        let expected = bootstrap_token(secret, temp_id, region, controller_type);
        return if token_matches(&expected, presented) {
            TokenCheck::Valid
        } else {
            TokenCheck::Invalid
        };
    };
    let Some((at, _)) = rest.split_once('.') else {
        return TokenCheck::Invalid;
    };
    let Ok(expires_at) = at.parse::<i64>() else {
        return TokenCheck::Invalid;
    };
    // The canonical spelling only (no "+1", leading zeros or other copies of one expiry).
    if expires_at.to_string() != at {
        return TokenCheck::Invalid;
    }
    let expected = expiring_token(secret, temp_id, region, controller_type, expires_at);
    if !token_matches(&expected, presented) {
        TokenCheck::Invalid
    } else if now > expires_at {
        TokenCheck::Expired
    } else {
        TokenCheck::Valid
    }
}

/// Constant-time check of a presented token against the expected one.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// The HMAC key an unadmitted child signs its admission messages with when the deployment
/// has no shared network key: HKDF-SHA256 (no salt) over the token's text, info
/// `pdsno-admission`. The parent, knowing the bootstrap secret, derives the same key.
pub fn admission_key(token: &str) -> HmacKey {
    let hk = Hkdf::<Sha256>::new(None, token.as_bytes());
    let mut okm = zeroize::Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's output limit, so expansion cannot fail.
    if hk.expand(ADMISSION_KEY_INFO, &mut okm[..]).is_err() {
        return HmacKey::random();
    }
    HmacKey::from_bytes(&okm[..]).unwrap_or_else(|_| HmacKey::random())
}

/// The legacy (insecure) challenge answer: hex HMAC-SHA256(key = nonce bytes,
/// `"signed_by_controller"`). Anyone who saw the nonce can compute it; accepted only with
/// legacy compatibility switched on.
pub fn legacy_signed_nonce(nonce: &[u8]) -> String {
    hmac_hex(nonce, b"signed_by_controller")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_tokens_hold_until_their_time_and_cannot_be_moved() {
        let s = b"secret-of-the-parent-0123456789";
        let t = expiring_token(s, "temp-a", "zone-A", "local", 1_000);
        assert!(t.starts_with("pdsno1.1000."));
        let check = |tok: &str, now| check_token(s, "temp-a", "zone-A", "local", tok, now);
        assert_eq!(check(&t, 999), TokenCheck::Valid);
        assert_eq!(check(&t, 1_000), TokenCheck::Valid);
        assert_eq!(check(&t, 1_001), TokenCheck::Expired);
        // Another child, another secret, a moved or respelled expiry: invalid.
        assert_eq!(
            check_token(s, "temp-b", "zone-A", "local", &t, 0),
            TokenCheck::Invalid
        );
        assert_eq!(
            check_token(
                b"another-secret-0123456789abcdef",
                "temp-a",
                "zone-A",
                "local",
                &t,
                0
            ),
            TokenCheck::Invalid
        );
        let moved = t.replacen("1000", "9999", 1);
        assert_eq!(check(&moved, 0), TokenCheck::Invalid);
        let respelled = t.replacen("1000", "01000", 1);
        assert_eq!(check(&respelled, 0), TokenCheck::Invalid);
        assert_eq!(check("pdsno1.", 0), TokenCheck::Invalid);
        assert_eq!(check("pdsno1.x.y", 0), TokenCheck::Invalid);
        // The original's form still works, forever.
        let legacy = bootstrap_token(s, "temp-a", "zone-A", "local");
        assert_eq!(check(&legacy, i64::MAX), TokenCheck::Valid);
    }

    #[test]
    fn bootstrap_token_vector() {
        let t = bootstrap_token(
            b"pdsno-bootstrap-secret-change-in-production",
            "temp-rc-zone-a-001",
            "zone-A",
            "regional",
        );
        assert_eq!(
            t,
            "7006d9080e3adf2401928f3c275c39b17bb4feeb61cd74b2faa7da7038216d1e"
        );
        assert!(token_matches(&t, &t));
        assert!(!token_matches(&t, &t[..63]));
        assert!(!token_matches(&t, &t.replace('7', "8")));
        assert_eq!(
            bootstrap_token_for(
                b"pdsno-bootstrap-secret-change-in-production",
                "temp-rc-zone-a-001",
                "zone-A",
                Role::Regional
            ),
            t
        );
    }

    #[test]
    fn legacy_challenge_vector() {
        assert_eq!(
            legacy_signed_nonce(&[0x22; 32]),
            "03952337a0b40924e1e46a1eb2133b1dd40f6f8466d14724b120d30e4a1f0736"
        );
    }

    #[test]
    fn admission_key_is_deterministic_and_token_bound() {
        let a = admission_key("7006d908");
        assert_eq!(a, admission_key("7006d908"));
        assert_ne!(a, admission_key("7006d909"));
        assert_eq!(a.expose_bytes().len(), 32);
    }
}
