//! Exact conversion between envelopes and the typed gRPC messages.
//!
//! A typed field carries a JSON value only when it can give the very same value back
//! (a string in a string field, a non-empty list of strings in a repeated field, an object
//! in a message field); anything else travels in `extra_json`. Converting an envelope to a
//! message and back therefore reproduces its canonical bytes, and with them its signature.

use super::pb;
use crate::envelope::{Envelope, EnvelopeError, MessageType};
use crate::json::{self, Map, Value};

/// Why a message could not be converted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The message has no header.
    #[error("missing header")]
    MissingHeader,
    /// An `extra_json` field is not a JSON object.
    #[error("{field}: {reason}")]
    BadExtraJson {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A key appears both as a typed field and in `extra_json`.
    #[error("key {0:?} given both as a field and in extra_json")]
    DuplicateKey(String),
    /// The message type does not match the RPC.
    #[error("expected a {expected} message, got {got}")]
    WrongType {
        /// What the RPC carries.
        expected: MessageType,
        /// What the envelope says.
        got: MessageType,
    },
    /// The resulting envelope is invalid.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

fn parse_extra(text: &str, field: &'static str) -> Result<Map, ConvertError> {
    if text.is_empty() {
        return Ok(Map::new());
    }
    match json::parse(text.as_bytes()) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ConvertError::BadExtraJson {
            field,
            reason: format!("must be a JSON object, found {}", other.kind()),
        }),
        Err(e) => Err(ConvertError::BadExtraJson {
            field,
            reason: e.to_string(),
        }),
    }
}

fn extra_text(m: &Map) -> String {
    if m.is_empty() {
        String::new()
    } else {
        json::to_canonical_string(&Value::Object(m.clone()))
    }
}

fn insert(m: &mut Map, key: &str, v: Value) -> Result<(), ConvertError> {
    if m.contains_key(key) {
        return Err(ConvertError::DuplicateKey(key.to_owned()));
    }
    m.insert(key.to_owned(), v);
    Ok(())
}

fn put_str(m: &mut Map, key: &str, v: Option<String>) -> Result<(), ConvertError> {
    match v {
        Some(s) => insert(m, key, Value::String(s)),
        None => Ok(()),
    }
}

fn put_strs(m: &mut Map, key: &str, v: Vec<String>) -> Result<(), ConvertError> {
    if v.is_empty() {
        return Ok(());
    }
    insert(
        m,
        key,
        Value::Array(v.into_iter().map(Value::String).collect()),
    )
}

fn put_obj(m: &mut Map, key: &str, v: Option<Map>) -> Result<(), ConvertError> {
    match v {
        Some(o) => insert(m, key, Value::Object(o)),
        None => Ok(()),
    }
}

/// Removes `key` if it holds a string.
fn take_str(m: &mut Map, key: &str) -> Option<String> {
    match m.get(key) {
        Some(Value::String(_)) => match m.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// Removes `key` if it holds a non-empty array of strings.
fn take_strs(m: &mut Map, key: &str) -> Vec<String> {
    let ok = matches!(m.get(key), Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|v| matches!(v, Value::String(_))));
    if !ok {
        return Vec::new();
    }
    match m.remove(key) {
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| {
                if let Value::String(s) = v {
                    Some(s)
                } else {
                    None
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Removes `key` if it holds an object.
fn take_obj(m: &mut Map, key: &str) -> Option<Map> {
    match m.get(key) {
        Some(Value::Object(_)) => match m.remove(key) {
            Some(Value::Object(o)) => Some(o),
            _ => None,
        },
        _ => None,
    }
}

fn header_of(e: &Envelope) -> pb::Header {
    pb::Header {
        message_id: e.message_id.clone(),
        sender_id: e.sender_id.clone(),
        recipient_id: e.recipient_id.clone(),
        timestamp: e.timestamp.clone(),
        correlation_id: e.correlation_id.clone(),
        nonce: e.nonce.clone(),
        signed_at: e.signed_at.clone(),
        signature: e.signature.clone(),
        signature_algorithm: e.signature_algorithm.clone(),
        key_id: e.key_id.clone(),
        extra_json: extra_text(&e.extra),
    }
}

fn envelope_of(
    h: Option<pb::Header>,
    t: MessageType,
    payload: Map,
) -> Result<Envelope, ConvertError> {
    let h = h.ok_or(ConvertError::MissingHeader)?;
    let mut top = parse_extra(&h.extra_json, "header.extra_json")?;
    insert(&mut top, "message_id", h.message_id.into())?;
    insert(&mut top, "message_type", t.as_str().into())?;
    insert(&mut top, "sender_id", h.sender_id.into())?;
    insert(&mut top, "recipient_id", h.recipient_id.into())?;
    insert(&mut top, "timestamp", h.timestamp.into())?;
    insert(
        &mut top,
        "correlation_id",
        h.correlation_id.map_or(Value::Null, Value::String),
    )?;
    put_str(&mut top, "nonce", h.nonce)?;
    put_str(&mut top, "signed_at", h.signed_at)?;
    put_str(&mut top, "signature", h.signature)?;
    put_str(&mut top, "signature_algorithm", h.signature_algorithm)?;
    put_str(&mut top, "key_id", h.key_id)?;
    insert(&mut top, "payload", Value::Object(payload))?;
    Ok(Envelope::from_value(Value::Object(top))?)
}

fn expect_type(e: &Envelope, t: MessageType) -> Result<(), ConvertError> {
    if e.message_type != t {
        return Err(ConvertError::WrongType {
            expected: t,
            got: e.message_type,
        });
    }
    Ok(())
}

impl pb::Envelope {
    /// Any envelope as the generic message.
    pub fn from_envelope(e: &Envelope) -> Self {
        pb::Envelope {
            header: Some(header_of(e)),
            message_type: e.message_type.as_str().to_owned(),
            payload_json: json::to_canonical_string(&Value::Object(e.payload.clone())),
        }
    }

    /// Back to an envelope.
    ///
    /// # Errors
    /// A [`ConvertError`] naming the problem.
    pub fn into_envelope(self) -> Result<Envelope, ConvertError> {
        let t: MessageType = self.message_type.parse().map_err(EnvelopeError::from)?;
        let payload = match json::parse(self.payload_json.as_bytes()) {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Err(ConvertError::BadExtraJson {
                    field: "payload_json",
                    reason: format!("must be a JSON object, found {}", other.kind()),
                });
            }
            Err(e) => {
                return Err(ConvertError::BadExtraJson {
                    field: "payload_json",
                    reason: e.to_string(),
                });
            }
        };
        envelope_of(self.header, t, payload)
    }
}

fn metadata_from(mut m: Map) -> pb::ControllerMetadata {
    pb::ControllerMetadata {
        hostname: take_str(&mut m, "hostname"),
        ip_address: take_str(&mut m, "ip_address"),
        software_version: take_str(&mut m, "software_version"),
        capabilities: take_strs(&mut m, "capabilities"),
        extra_json: extra_text(&m),
    }
}

fn metadata_to(p: pb::ControllerMetadata) -> Result<Map, ConvertError> {
    let mut m = parse_extra(&p.extra_json, "metadata.extra_json")?;
    put_str(&mut m, "hostname", p.hostname)?;
    put_str(&mut m, "ip_address", p.ip_address)?;
    put_str(&mut m, "software_version", p.software_version)?;
    put_strs(&mut m, "capabilities", p.capabilities)?;
    Ok(m)
}

fn certificate_from(mut m: Map) -> pb::Certificate {
    pb::Certificate {
        assigned_id: take_str(&mut m, "assigned_id"),
        role: take_str(&mut m, "role"),
        region: take_str(&mut m, "region"),
        public_key: take_str(&mut m, "public_key"),
        issued_by: take_str(&mut m, "issued_by"),
        issued_at: take_str(&mut m, "issued_at"),
        expires_at: take_str(&mut m, "expires_at"),
        signature: take_str(&mut m, "signature"),
        extra_json: extra_text(&m),
    }
}

fn certificate_to(p: pb::Certificate) -> Result<Map, ConvertError> {
    let mut m = parse_extra(&p.extra_json, "certificate.extra_json")?;
    put_str(&mut m, "assigned_id", p.assigned_id)?;
    put_str(&mut m, "role", p.role)?;
    put_str(&mut m, "region", p.region)?;
    put_str(&mut m, "public_key", p.public_key)?;
    put_str(&mut m, "issued_by", p.issued_by)?;
    put_str(&mut m, "issued_at", p.issued_at)?;
    put_str(&mut m, "expires_at", p.expires_at)?;
    put_str(&mut m, "signature", p.signature)?;
    Ok(m)
}

fn delegation_from(mut m: Map) -> pb::DelegationCredential {
    pb::DelegationCredential {
        delegatee_id: take_str(&mut m, "delegatee_id"),
        delegatee_public_key: take_str(&mut m, "delegatee_public_key"),
        region: take_str(&mut m, "region"),
        permitted_actions: take_strs(&mut m, "permitted_actions"),
        issued_by: take_str(&mut m, "issued_by"),
        issued_at: take_str(&mut m, "issued_at"),
        expires_at: take_str(&mut m, "expires_at"),
        signature: take_str(&mut m, "signature"),
        extra_json: extra_text(&m),
    }
}

fn delegation_to(p: pb::DelegationCredential) -> Result<Map, ConvertError> {
    let mut m = parse_extra(&p.extra_json, "delegation_credential.extra_json")?;
    put_str(&mut m, "delegatee_id", p.delegatee_id)?;
    put_str(&mut m, "delegatee_public_key", p.delegatee_public_key)?;
    put_str(&mut m, "region", p.region)?;
    put_strs(&mut m, "permitted_actions", p.permitted_actions)?;
    put_str(&mut m, "issued_by", p.issued_by)?;
    put_str(&mut m, "issued_at", p.issued_at)?;
    put_str(&mut m, "expires_at", p.expires_at)?;
    put_str(&mut m, "signature", p.signature)?;
    Ok(m)
}

/// A typed gRPC message that is one envelope type.
pub trait TypedMessage: Sized {
    /// The envelope type it carries.
    const TYPE: MessageType;

    /// The message for `e`.
    ///
    /// # Errors
    /// [`ConvertError::WrongType`] when `e` is another type.
    fn from_envelope(e: &Envelope) -> Result<Self, ConvertError>;

    /// The envelope of this message.
    ///
    /// # Errors
    /// A [`ConvertError`] naming the problem.
    fn into_envelope(self) -> Result<Envelope, ConvertError>;
}

impl TypedMessage for pb::ValidationRequest {
    const TYPE: MessageType = MessageType::ValidationRequest;

    fn from_envelope(e: &Envelope) -> Result<Self, ConvertError> {
        expect_type(e, Self::TYPE)?;
        let mut m = e.payload.clone();
        Ok(pb::ValidationRequest {
            header: Some(header_of(e)),
            temp_id: take_str(&mut m, "temp_id"),
            controller_type: take_str(&mut m, "controller_type"),
            region: take_str(&mut m, "region"),
            public_key: take_str(&mut m, "public_key"),
            bootstrap_token: take_str(&mut m, "bootstrap_token"),
            metadata: take_obj(&mut m, "metadata").map(metadata_from),
            extra_json: extra_text(&m),
        })
    }

    fn into_envelope(self) -> Result<Envelope, ConvertError> {
        let mut m = parse_extra(&self.extra_json, "extra_json")?;
        put_str(&mut m, "temp_id", self.temp_id)?;
        put_str(&mut m, "controller_type", self.controller_type)?;
        put_str(&mut m, "region", self.region)?;
        put_str(&mut m, "public_key", self.public_key)?;
        put_str(&mut m, "bootstrap_token", self.bootstrap_token)?;
        put_obj(
            &mut m,
            "metadata",
            self.metadata.map(metadata_to).transpose()?,
        )?;
        envelope_of(self.header, Self::TYPE, m)
    }
}

impl TypedMessage for pb::Challenge {
    const TYPE: MessageType = MessageType::Challenge;

    fn from_envelope(e: &Envelope) -> Result<Self, ConvertError> {
        expect_type(e, Self::TYPE)?;
        let mut m = e.payload.clone();
        Ok(pb::Challenge {
            header: Some(header_of(e)),
            challenge_id: take_str(&mut m, "challenge_id"),
            nonce: take_str(&mut m, "nonce"),
            expires_at: take_str(&mut m, "expires_at"),
            extra_json: extra_text(&m),
        })
    }

    fn into_envelope(self) -> Result<Envelope, ConvertError> {
        let mut m = parse_extra(&self.extra_json, "extra_json")?;
        put_str(&mut m, "challenge_id", self.challenge_id)?;
        put_str(&mut m, "nonce", self.nonce)?;
        put_str(&mut m, "expires_at", self.expires_at)?;
        envelope_of(self.header, Self::TYPE, m)
    }
}

impl TypedMessage for pb::ChallengeResponse {
    const TYPE: MessageType = MessageType::ChallengeResponse;

    fn from_envelope(e: &Envelope) -> Result<Self, ConvertError> {
        expect_type(e, Self::TYPE)?;
        let mut m = e.payload.clone();
        Ok(pb::ChallengeResponse {
            header: Some(header_of(e)),
            challenge_id: take_str(&mut m, "challenge_id"),
            temp_id: take_str(&mut m, "temp_id"),
            signed_nonce: take_str(&mut m, "signed_nonce"),
            extra_json: extra_text(&m),
        })
    }

    fn into_envelope(self) -> Result<Envelope, ConvertError> {
        let mut m = parse_extra(&self.extra_json, "extra_json")?;
        put_str(&mut m, "challenge_id", self.challenge_id)?;
        put_str(&mut m, "temp_id", self.temp_id)?;
        put_str(&mut m, "signed_nonce", self.signed_nonce)?;
        envelope_of(self.header, Self::TYPE, m)
    }
}

impl TypedMessage for pb::ValidationResult {
    const TYPE: MessageType = MessageType::ValidationResult;

    fn from_envelope(e: &Envelope) -> Result<Self, ConvertError> {
        expect_type(e, Self::TYPE)?;
        let mut m = e.payload.clone();
        Ok(pb::ValidationResult {
            header: Some(header_of(e)),
            status: take_str(&mut m, "status"),
            assigned_id: take_str(&mut m, "assigned_id"),
            certificate: take_obj(&mut m, "certificate").map(certificate_from),
            delegation_credential: take_obj(&mut m, "delegation_credential").map(delegation_from),
            role: take_str(&mut m, "role"),
            region: take_str(&mut m, "region"),
            reason: take_str(&mut m, "reason"),
            extra_json: extra_text(&m),
        })
    }

    fn into_envelope(self) -> Result<Envelope, ConvertError> {
        let mut m = parse_extra(&self.extra_json, "extra_json")?;
        put_str(&mut m, "status", self.status)?;
        put_str(&mut m, "assigned_id", self.assigned_id)?;
        put_obj(
            &mut m,
            "certificate",
            self.certificate.map(certificate_to).transpose()?,
        )?;
        put_obj(
            &mut m,
            "delegation_credential",
            self.delegation_credential.map(delegation_to).transpose()?,
        )?;
        put_str(&mut m, "role", self.role)?;
        put_str(&mut m, "region", self.region)?;
        put_str(&mut m, "reason", self.reason)?;
        envelope_of(self.header, Self::TYPE, m)
    }
}

impl pb::KeyAgreement {
    /// The message for a key agreement envelope (any of its four types).
    ///
    /// # Errors
    /// [`ConvertError::WrongType`] for other types.
    pub fn from_envelope(e: &Envelope) -> Result<Self, ConvertError> {
        use MessageType as T;
        if !matches!(
            e.message_type,
            T::KeyExchangeInit | T::KeyExchangeResponse | T::KeyRotationRequest | T::KeyRotationAck
        ) {
            return Err(ConvertError::WrongType {
                expected: T::KeyExchangeInit,
                got: e.message_type,
            });
        }
        let mut m = e.payload.clone();
        Ok(pb::KeyAgreement {
            header: Some(header_of(e)),
            message_type: e.message_type.as_str().to_owned(),
            initiator_id: take_str(&mut m, "initiator_id"),
            responder_id: take_str(&mut m, "responder_id"),
            public_key: take_str(&mut m, "public_key"),
            key_id: take_str(&mut m, "key_id"),
            exchange_id: take_str(&mut m, "exchange_id"),
            timestamp: take_str(&mut m, "timestamp"),
            signature: take_str(&mut m, "signature"),
            extra_json: extra_text(&m),
        })
    }

    /// Back to an envelope.
    ///
    /// # Errors
    /// A [`ConvertError`] naming the problem.
    pub fn into_envelope(self) -> Result<Envelope, ConvertError> {
        use MessageType as T;
        let t: MessageType = self.message_type.parse().map_err(EnvelopeError::from)?;
        if !matches!(
            t,
            T::KeyExchangeInit | T::KeyExchangeResponse | T::KeyRotationRequest | T::KeyRotationAck
        ) {
            return Err(ConvertError::WrongType {
                expected: T::KeyExchangeInit,
                got: t,
            });
        }
        let mut m = parse_extra(&self.extra_json, "extra_json")?;
        put_str(&mut m, "initiator_id", self.initiator_id)?;
        put_str(&mut m, "responder_id", self.responder_id)?;
        put_str(&mut m, "public_key", self.public_key)?;
        put_str(&mut m, "key_id", self.key_id)?;
        put_str(&mut m, "exchange_id", self.exchange_id)?;
        put_str(&mut m, "timestamp", self.timestamp)?;
        put_str(&mut m, "signature", self.signature)?;
        envelope_of(self.header, t, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::HmacKey;
    use crate::signing::sign_hmac;

    fn signed(t: MessageType, payload: &str) -> Envelope {
        let m = match json::parse(payload.as_bytes()) {
            Ok(Value::Object(m)) => m,
            _ => panic!("payload"),
        };
        let now = chrono::Utc::now();
        let mut e = Envelope::new(t, "temp-rc-zone-a-001", "global_cntl_1", m, now);
        e.extra.insert("x-top".into(), Value::from(1.0));
        sign_hmac(&mut e, &HmacKey::from_secret_text("s"), None, now);
        e
    }

    fn round_trip<T: TypedMessage>(e: &Envelope) {
        let msg = T::from_envelope(e).expect("to proto");
        let back = msg.into_envelope().expect("from proto");
        assert_eq!(back.to_json(), e.to_json(), "exact round trip");
    }

    #[test]
    fn typed_messages_round_trip_exactly() {
        let vr = signed(
            MessageType::ValidationRequest,
            r#"{"temp_id":"temp-rc-zone-a-001","controller_type":"regional","region":"zone-A","public_key":"k","bootstrap_token":"t","metadata":{"hostname":"h","ip_address":"10.0.0.1","software_version":"0.1.0","capabilities":[],"cores":2}, "future":[1,2.5]}"#,
        );
        round_trip::<pb::ValidationRequest>(&vr);
        let typed = pb::ValidationRequest::from_envelope(&vr).expect("typed");
        assert_eq!(typed.temp_id.as_deref(), Some("temp-rc-zone-a-001"));
        assert_eq!(
            typed.metadata.as_ref().and_then(|m| m.hostname.as_deref()),
            Some("h")
        );
        assert!(typed.metadata.as_ref().is_some_and(
            |m| m.capabilities.is_empty() && m.extra_json.contains("\"capabilities\":[]")
        ));
        // Wrongly typed values travel in extra_json, not in typed fields.
        let odd = signed(
            MessageType::ValidationRequest,
            r#"{"temp_id":7,"region":null,"metadata":"not an object"}"#,
        );
        round_trip::<pb::ValidationRequest>(&odd);
        let t = pb::ValidationRequest::from_envelope(&odd).expect("typed");
        assert_eq!((t.temp_id, t.region, t.metadata), (None, None, None));

        round_trip::<pb::Challenge>(&signed(
            MessageType::Challenge,
            r#"{"challenge_id":"challenge-0123456789ab","nonce":"00","expires_at":"2026-01-01T00:00:00+00:00"}"#,
        ));
        round_trip::<pb::ChallengeResponse>(&signed(
            MessageType::ChallengeResponse,
            r#"{"challenge_id":"c","temp_id":"t","signed_nonce":"s"}"#,
        ));
        round_trip::<pb::ValidationResult>(&signed(
            MessageType::ValidationResult,
            r#"{"status":"APPROVED","assigned_id":"local_cntl_zone-A_1","certificate":{"assigned_id":"a","role":"local","region":"zone-A","public_key":"p","issued_by":"r","issued_at":"i","expires_at":"e","signature":"s","v":2},"delegation_credential":null,"role":"local","region":"zone-A","chain":[{"x":1}]}"#,
        ));
        round_trip::<pb::ValidationResult>(&signed(
            MessageType::ValidationResult,
            r#"{"status":"APPROVED","delegation_credential":{"delegatee_id":"d","permitted_actions":["validate_local_controllers"],"region":"zone-A"}}"#,
        ));
        round_trip::<pb::ValidationResult>(&signed(
            MessageType::ValidationResult,
            r#"{"status":"REJECTED","reason":"STALE_TIMESTAMP"}"#,
        ));
    }

    #[test]
    fn generic_envelope_round_trips_and_wrong_types_are_refused() {
        let e = signed(
            MessageType::SyncRequest,
            r#"{"big":123456789012345678901234567890,"f":1e+16}"#,
        );
        let back = pb::Envelope::from_envelope(&e)
            .into_envelope()
            .expect("back");
        assert_eq!(back.to_json(), e.to_json());
        assert!(matches!(
            pb::Challenge::from_envelope(&e),
            Err(ConvertError::WrongType { .. })
        ));
        let mut g = pb::Envelope::from_envelope(&e);
        g.payload_json = "[1]".into();
        assert!(matches!(
            g.into_envelope(),
            Err(ConvertError::BadExtraJson { .. })
        ));
        let mut g = pb::Envelope::from_envelope(&e);
        g.message_type = "NOPE".into();
        assert!(g.into_envelope().is_err());
        let mut g = pb::Envelope::from_envelope(&e);
        g.header = None;
        assert_eq!(g.into_envelope().err(), Some(ConvertError::MissingHeader));
    }

    #[test]
    fn key_agreements_round_trip() {
        for t in [
            MessageType::KeyExchangeInit,
            MessageType::KeyExchangeResponse,
            MessageType::KeyRotationRequest,
            MessageType::KeyRotationAck,
        ] {
            let e = signed(
                t,
                r#"{"initiator_id":"a","responder_id":"b","public_key":"p","key_id":"k","exchange_id":"x","timestamp":"t","signature":"s","mqtt_credential":"00"}"#,
            );
            let back = pb::KeyAgreement::from_envelope(&e)
                .expect("to proto")
                .into_envelope()
                .expect("back");
            assert_eq!(back.to_json(), e.to_json());
        }
        let e = signed(MessageType::Heartbeat, "{}");
        assert!(pb::KeyAgreement::from_envelope(&e).is_err());
    }

    #[test]
    fn a_key_both_typed_and_extra_is_refused() {
        let e = signed(MessageType::ChallengeResponse, r#"{"challenge_id":"c"}"#);
        let mut m = pb::ChallengeResponse::from_envelope(&e).expect("typed");
        m.extra_json = r#"{"challenge_id":"other"}"#.into();
        assert_eq!(
            m.into_envelope().err(),
            Some(ConvertError::DuplicateKey("challenge_id".into()))
        );
    }
}
