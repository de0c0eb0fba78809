//! Key material: HMAC keys, Ed25519 identity keys, text secrets, and the key ring.

mod ring;
mod secret;

pub use ring::{DEFAULT_GRACE, KeyRing, RingKey, RingKeyParts};
pub use secret::{
    HmacKey, IdentityKey, KeyError, MIN_HMAC_KEY_LEN, PublicKey, SecretString, base64_encode,
};
