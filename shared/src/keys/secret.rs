//! Secret material: types that zeroize on drop and never print.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Minimum length of an HMAC key (PROTOCOL.md §2).
pub const MIN_HMAC_KEY_LEN: usize = 32;

/// Why key material was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Shorter than [`MIN_HMAC_KEY_LEN`].
    #[error("key must be at least 32 bytes, got {0}")]
    TooShort(usize),
    /// Not valid hex.
    #[error("key is not valid hex")]
    BadHex,
    /// Not a valid Ed25519 key.
    #[error("not a valid Ed25519 {0}")]
    BadEd25519(&'static str),
}

/// An HMAC-SHA256 key of at least 32 bytes. Zeroized on drop; prints as `[redacted]`.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct HmacKey(Vec<u8>);

impl HmacKey {
    /// A key from raw bytes.
    ///
    /// # Errors
    /// [`KeyError::TooShort`] below 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_HMAC_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(HmacKey(bytes.to_vec()))
    }

    /// A key from hex text (whitespace around it is ignored).
    ///
    /// # Errors
    /// [`KeyError::BadHex`] or [`KeyError::TooShort`].
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| KeyError::BadHex)?);
        HmacKey::from_bytes(&bytes)
    }

    /// The key SHA-256(`secret`): the original's `PDSNO_MESSAGE_SIGNING_SECRET` convention.
    pub fn from_secret_text(secret: &str) -> Self {
        HmacKey(Sha256::digest(secret.as_bytes()).to_vec())
    }

    /// 32 fresh random bytes.
    pub fn random() -> Self {
        HmacKey(crate::ids::random_bytes_32().to_vec())
    }

    /// The raw key bytes. Handle with care: never log them.
    pub fn expose_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A short, non-secret fingerprint (first 8 hex of SHA-256 of the key) for operators.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(&self.0);
        hex::encode(&d[..4])
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey([redacted])")
    }
}

/// A text secret (bootstrap secret, operator password). Zeroized on drop; prints as
/// `[redacted]`.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }

    /// The secret text. Handle with care: never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        SecretString(s)
    }
}

/// A controller's Ed25519 identity key. Zeroized on drop; prints only its public half.
#[derive(Clone)]
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let seed = Zeroizing::new(crate::ids::random_bytes_32());
        IdentityKey(SigningKey::from_bytes(&seed))
    }

    /// The key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        IdentityKey(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for storing in the key file. Handle with care.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `msg` (64-byte Ed25519 signature).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IdentityKey(public={}, secret=[redacted])",
            self.public().to_base64()
        )
    }
}

/// An Ed25519 public key; travels as standard base64 of its 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub(crate) VerifyingKey);

impl PublicKey {
    /// Parses standard base64 of 32 bytes.
    ///
    /// # Errors
    /// [`KeyError::BadEd25519`] when the text is not such a key.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        if text.len() > 64 {
            return Err(KeyError::BadEd25519("public key"));
        }
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| KeyError::BadEd25519("public key"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadEd25519("public key"))?;
        VerifyingKey::from_bytes(&arr)
            .map(PublicKey)
            .map_err(|_| KeyError::BadEd25519("public key"))
    }

    /// Standard base64 of the 32 bytes.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Verifies a 64-byte signature of `msg` (strict: rejects malleable and small-order
    /// forms).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(arr) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&arr);
        self.0.verify_strict(msg, &sig).is_ok()
    }

    /// Verifies a base64 signature of `msg`.
    pub fn verify_base64(&self, msg: &[u8], sig_b64: &str) -> bool {
        if sig_b64.len() > 128 {
            return false;
        }
        B64.decode(sig_b64.trim())
            .is_ok_and(|s| self.verify(msg, &s))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// Standard base64 (the encoding of keys and signatures in admission payloads).
pub fn base64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(HmacKey::from_bytes(&[0; 31]), Err(KeyError::TooShort(31)));
        assert!(HmacKey::from_bytes(&[0; 32]).is_ok());
        assert_eq!(HmacKey::from_hex("zz"), Err(KeyError::BadHex));
        assert_eq!(HmacKey::from_hex("00ff"), Err(KeyError::TooShort(2)));
    }

    #[test]
    fn secret_text_key_matches_the_vector() {
        let k = HmacKey::from_secret_text("pdsno-message-signing-secret-change-in-production");
        assert_eq!(
            hex::encode(k.expose_bytes()),
            "62ffc28aa8f61524f2f88a23c4927f87c0057dc8f66b5c1b85be7e00d61831ad"
        );
    }

    #[test]
    fn secrets_never_print() {
        let k = HmacKey::from_secret_text("s3cret-value");
        let hexk = hex::encode(k.expose_bytes());
        let dbg = format!("{k:?} {:?}", SecretString::new("hunter2-password"));
        assert!(!dbg.contains(&hexk) && !dbg.contains("hunter2"), "{dbg}");
        let id = IdentityKey::generate();
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&hex::encode(*id.seed())), "{dbg}");
        assert!(!dbg.contains(&base64_encode(&*id.seed())), "{dbg}");
    }

    #[test]
    fn ed25519_round_trip_and_encoding() {
        let id = IdentityKey::generate();
        let pk = PublicKey::from_base64(&id.public().to_base64()).expect("round trip");
        let sig = id.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        assert!(pk.verify_base64(b"hello", &base64_encode(&sig)));
        assert!(!pk.verify_base64(b"hello", "not base64!"));
        assert!(PublicKey::from_base64("ed25519-pubkey-placeholder").is_err());
        let restored = IdentityKey::from_seed(&id.seed());
        assert_eq!(restored.public(), id.public());
    }
}
