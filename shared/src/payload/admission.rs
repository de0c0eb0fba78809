//! Admission payloads (PROTOCOL.md §3) and the credentials a parent issues.
//!
//! Certificates and delegation credentials are signed with the issuer's Ed25519 key over
//! the canonical JSON of every field except `signature` (so unknown fields added by a newer
//! issuer are covered too). Signatures are standard base64.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::json::{self, Map, Value};
use crate::keys::{IdentityKey, PublicKey, base64_encode};
use crate::time::parse_iso;

/// `VALIDATION_REQUEST` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationRequest {
    /// The child's temporary id.
    pub temp_id: String,
    /// `"regional"` or `"local"` (kept as text so a bad value gets its reject code).
    pub controller_type: String,
    /// The region the child asks to serve.
    pub region: String,
    /// Base64 Ed25519 public key (legacy: any string).
    pub public_key: String,
    /// The operator-minted bootstrap token.
    pub bootstrap_token: String,
    /// Descriptive metadata.
    #[serde(default)]
    pub metadata: Metadata,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `VALIDATION_REQUEST.metadata`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Host name.
    #[serde(default)]
    pub hostname: String,
    /// Address the child is reachable at.
    #[serde(default)]
    pub ip_address: String,
    /// Software version.
    #[serde(default)]
    pub software_version: String,
    /// Capabilities (`discovery`, `approval`, ...).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `CHALLENGE` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    /// `challenge-` + 12 hex.
    pub challenge_id: String,
    /// 64 hex (32 random bytes) to sign.
    pub nonce: String,
    /// ISO-8601 expiry (30 s after issue).
    pub expires_at: String,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `CHALLENGE_RESPONSE` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// The challenge answered.
    pub challenge_id: String,
    /// The child's temporary id.
    pub temp_id: String,
    /// Base64 Ed25519 signature of the 32 nonce bytes (legacy: hex HMAC).
    pub signed_nonce: String,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `VALIDATION_RESULT.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ValidationStatus {
    /// Admitted.
    Approved,
    /// The requester failed a check.
    Rejected,
    /// The parent failed; an operator must act.
    Error,
}

/// `VALIDATION_RESULT` payload. APPROVED carries identity fields; REJECTED/ERROR a reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationResult {
    /// Outcome.
    pub status: ValidationStatus,
    /// The id the child must use from now on (APPROVED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_id: Option<String>,
    /// The child's certificate (APPROVED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
    /// For a regional child, the credential allowing it to admit local controllers; `null`
    /// for a local child (always present when APPROVED, as in the original).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_credential: Option<Value>,
    /// `regional` / `local` (APPROVED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The region (APPROVED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The reject code (REJECTED/ERROR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unknown fields, preserved (ours: `issuer_public_key`, `chain`, `mqtt`, ...).
    #[serde(flatten)]
    pub extra: Map,
}

impl ValidationResult {
    /// A REJECTED or ERROR result.
    pub fn refused(status: ValidationStatus, reason: impl Into<String>) -> Self {
        ValidationResult {
            status,
            assigned_id: None,
            certificate: None,
            delegation_credential: None,
            role: None,
            region: None,
            reason: Some(reason.into()),
            extra: Map::new(),
        }
    }
}

/// A controller certificate: the parent vouches for a child's id, role, region and key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    /// The child's assigned id.
    pub assigned_id: String,
    /// `regional` / `local`.
    pub role: String,
    /// The child's region.
    pub region: String,
    /// The child's base64 Ed25519 public key.
    pub public_key: String,
    /// The issuing parent's id.
    pub issued_by: String,
    /// ISO-8601 issue time.
    pub issued_at: String,
    /// ISO-8601 expiry.
    pub expires_at: String,
    /// Base64 Ed25519 signature by the issuer.
    #[serde(default)]
    pub signature: String,
    /// Unknown fields, preserved and covered by the signature.
    #[serde(flatten)]
    pub extra: Map,
}

/// A delegation credential: the GC allows a regional controller to admit local controllers
/// of one region.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DelegationCredential {
    /// The regional controller's assigned id.
    pub delegatee_id: String,
    /// The delegatee's base64 Ed25519 public key.
    pub delegatee_public_key: String,
    /// The region it may admit into.
    pub region: String,
    /// What it may do (`validate_local_controllers`).
    pub permitted_actions: Vec<String>,
    /// The issuer (the GC).
    pub issued_by: String,
    /// ISO-8601 issue time.
    pub issued_at: String,
    /// ISO-8601 expiry.
    pub expires_at: String,
    /// Base64 Ed25519 signature by the issuer.
    #[serde(default)]
    pub signature: String,
    /// Unknown fields, preserved and covered by the signature.
    #[serde(flatten)]
    pub extra: Map,
}

/// The action a delegation credential grants.
pub const VALIDATE_LOCAL_CONTROLLERS: &str = "validate_local_controllers";

/// Why a credential did not check out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The signature does not verify under the issuer key.
    #[error("credential signature does not verify")]
    BadSignature,
    /// Outside its validity period.
    #[error("credential expired or not yet valid")]
    Expired,
    /// A time field is not ISO-8601.
    #[error("credential has an invalid time field")]
    BadTime,
    /// The credential does not serialize.
    #[error("credential is malformed: {0}")]
    Malformed(String),
}

/// Canonical bytes of a credential with its `signature` removed.
fn signing_bytes<T: Serialize>(c: &T) -> Result<Vec<u8>, CredentialError> {
    let mut v = json::to_value(c).map_err(|e| CredentialError::Malformed(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.remove("signature");
    }
    Ok(json::to_canonical_bytes(&v))
}

fn check_window(
    issued_at: &str,
    expires_at: &str,
    now: DateTime<Utc>,
) -> Result<(), CredentialError> {
    let from = parse_iso(issued_at).map_err(|_| CredentialError::BadTime)?;
    let until = parse_iso(expires_at).map_err(|_| CredentialError::BadTime)?;
    // Allow 30 s of clock skew on the issue side.
    if now + chrono::Duration::seconds(30) < from || now > until {
        return Err(CredentialError::Expired);
    }
    Ok(())
}

macro_rules! signed_credential {
    ($t:ty) => {
        impl $t {
            /// Signs the credential with the issuer's key (sets `signature`).
            ///
            /// # Errors
            /// When the credential cannot be serialized.
            pub fn sign(&mut self, issuer: &IdentityKey) -> Result<(), CredentialError> {
                self.signature = String::new();
                let bytes = signing_bytes(self)?;
                self.signature = base64_encode(&issuer.sign(&bytes));
                Ok(())
            }

            /// Checks the signature under `issuer` and the validity period at `now`.
            ///
            /// # Errors
            /// The first problem found.
            pub fn verify(
                &self,
                issuer: &PublicKey,
                now: DateTime<Utc>,
            ) -> Result<(), CredentialError> {
                let bytes = signing_bytes(self)?;
                if !issuer.verify_base64(&bytes, &self.signature) {
                    return Err(CredentialError::BadSignature);
                }
                check_window(&self.issued_at, &self.expires_at, now)
            }
        }
    };
}

signed_credential!(Certificate);
signed_credential!(DelegationCredential);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::format_iso;
    use chrono::Duration;

    fn cert(now: DateTime<Utc>, child: &IdentityKey) -> Certificate {
        Certificate {
            assigned_id: "regional_cntl_zone-A_1".into(),
            role: "regional".into(),
            region: "zone-A".into(),
            public_key: child.public().to_base64(),
            issued_by: "global_cntl_1".into(),
            issued_at: format_iso(now),
            expires_at: format_iso(now + Duration::days(90)),
            signature: String::new(),
            extra: Map::new(),
        }
    }

    #[test]
    fn certificates_sign_and_verify() {
        let now = Utc::now();
        let gc = IdentityKey::generate();
        let child = IdentityKey::generate();
        let mut c = cert(now, &child);
        c.sign(&gc).expect("sign");
        assert_eq!(c.verify(&gc.public(), now), Ok(()));
        // Round trip through the wire keeps it verifiable.
        let wire = json::to_value(&c).expect("value");
        let back: Certificate = json::from_value(wire).expect("typed");
        assert_eq!(back.verify(&gc.public(), now), Ok(()));
        // Forgeries and wrong issuers fail.
        let mut forged = c.clone();
        forged.region = "zone-B".into();
        assert_eq!(
            forged.verify(&gc.public(), now),
            Err(CredentialError::BadSignature)
        );
        let mut added = c.clone();
        added.extra.insert("admin".into(), true.into());
        assert_eq!(
            added.verify(&gc.public(), now),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            c.verify(&IdentityKey::generate().public(), now),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            c.verify(&gc.public(), now + Duration::days(91)),
            Err(CredentialError::Expired)
        );
    }

    #[test]
    fn validation_result_shapes() {
        let r = ValidationResult::refused(ValidationStatus::Rejected, "INVALID_BOOTSTRAP_TOKEN");
        assert_eq!(
            json::to_value(&r).expect("value").to_string(),
            r#"{"reason":"INVALID_BOOTSTRAP_TOKEN","status":"REJECTED"}"#
        );
        let parsed: ValidationResult =
            json::from_value(json::parse(br#"{"status":"APPROVED","assigned_id":"local_cntl_zone-A_1","certificate":null,"delegation_credential":null,"role":"local","region":"zone-A","mqtt":{"u":1}}"#).expect("json"))
                .expect("typed");
        assert_eq!(parsed.status, ValidationStatus::Approved);
        assert!(parsed.extra.contains_key("mqtt"));
    }
}
