//! The envelope: the one message model every transport carries (PROTOCOL.md §1).
//!
//! An [`Envelope`] is decoded from a JSON object, keeps every field exactly as received
//! (including unknown top-level keys and the original `timestamp` text) and re-encodes to
//! the same canonical bytes, so a signature made by any peer verifies here and a message
//! can be relayed between transports without re-signing.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids;
use crate::json::{self, Map, Value};
use crate::time::{format_iso, parse_iso};

macro_rules! message_types {
    ($($variant:ident => $text:literal),+ $(,)?) => {
        /// The message types of PROTOCOL.md §1 (upper case on the wire).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum MessageType {
            $(
                #[doc = concat!("`", $text, "`")]
                #[serde(rename = $text)]
                $variant,
            )+
        }

        impl MessageType {
            /// Every message type, in protocol order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$variant),+];

            /// The wire name (`"VALIDATION_REQUEST"`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(MessageType::$variant => $text,)+
                }
            }
        }

        impl FromStr for MessageType {
            type Err = UnknownMessageType;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(MessageType::$variant),)+
                    _ => Err(UnknownMessageType(s.chars().take(64).collect())),
                }
            }
        }
    };
}

message_types! {
    ValidationRequest => "VALIDATION_REQUEST",
    Challenge => "CHALLENGE",
    ChallengeResponse => "CHALLENGE_RESPONSE",
    ValidationResult => "VALIDATION_RESULT",
    DiscoveryRequest => "DISCOVERY_REQUEST",
    DiscoveryReport => "DISCOVERY_REPORT",
    DiscoveryReportAck => "DISCOVERY_REPORT_ACK",
    DiscoverySummary => "DISCOVERY_SUMMARY",
    ConfigProposal => "CONFIG_PROPOSAL",
    ConfigApproval => "CONFIG_APPROVAL",
    ConfigRejection => "CONFIG_REJECTION",
    ExecutionInstruction => "EXECUTION_INSTRUCTION",
    ExecutionResult => "EXECUTION_RESULT",
    PolicyUpdate => "POLICY_UPDATE",
    PolicyAck => "POLICY_ACK",
    Heartbeat => "HEARTBEAT",
    SyncRequest => "SYNC_REQUEST",
    SyncResponse => "SYNC_RESPONSE",
    KeyExchangeInit => "KEY_EXCHANGE_INIT",
    KeyExchangeResponse => "KEY_EXCHANGE_RESPONSE",
    KeyRotationRequest => "KEY_ROTATION_REQUEST",
    KeyRotationAck => "KEY_ROTATION_ACK",
}

impl MessageType {
    /// The REST path segment (`validation_request`), as in `POST /message/{type}`.
    pub fn path_segment(self) -> String {
        self.as_str().to_ascii_lowercase()
    }

    /// The type named by a REST path segment (case-insensitive).
    pub fn from_path_segment(seg: &str) -> Option<Self> {
        if seg.len() > 64 {
            return None;
        }
        seg.to_ascii_uppercase().parse().ok()
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `message_type` that is not one of the protocol's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown message type {0:?}")]
pub struct UnknownMessageType(pub String);

/// Why a JSON value is not an envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The text is not JSON.
    #[error(transparent)]
    Json(#[from] json::ParseError),
    /// The JSON is not an object.
    #[error("an envelope must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        found: &'static str,
    },
    /// `message_type` is not a protocol type.
    #[error(transparent)]
    UnknownType(#[from] UnknownMessageType),
    /// `timestamp` is not an ISO-8601 time.
    #[error("field `timestamp` is not an ISO-8601 time: {0:?}")]
    BadTimestamp(String),
    /// A field is longer than any legitimate value.
    #[error("field `{field}` is too long ({len} bytes, at most {max})")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Longest accepted id-like field (message, sender, recipient, correlation, key ids).
pub const MAX_ID_LEN: usize = 256;
/// Longest accepted `nonce`, `signed_at`, `signature`, `signature_algorithm` field.
pub const MAX_SIG_FIELD_LEN: usize = 256;

/// A protocol message.
///
/// Fields are kept as received; [`Envelope::canonical_signing_bytes`] reproduces exactly what
/// the sender signed.
#[derive(Clone, PartialEq)]
pub struct Envelope {
    /// `msg-` + 12 hex (not enforced on receipt: a peer's format is its own business).
    pub message_id: String,
    /// The type.
    pub message_type: MessageType,
    /// The sender's controller id.
    pub sender_id: String,
    /// The recipient's controller id, or `"broadcast"`.
    pub recipient_id: String,
    /// ISO-8601 text, kept verbatim (it is covered by the signature).
    pub timestamp: String,
    /// The payload object.
    pub payload: Map,
    /// On a reply, the request's `message_id`.
    pub correlation_id: Option<String>,
    /// 64 hex random bytes (signed messages).
    pub nonce: Option<String>,
    /// When it was signed (signed messages).
    pub signed_at: Option<String>,
    /// The signature (signed messages).
    pub signature: Option<String>,
    /// `"HMAC-SHA256"` or `"Ed25519"` (signed messages).
    pub signature_algorithm: Option<String>,
    /// Optional name of the signing key (covered by the signature).
    pub key_id: Option<String>,
    /// Unknown top-level keys, preserved (they are covered by the signature).
    pub extra: Map,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("message_id", &self.message_id)
            .field("message_type", &self.message_type)
            .field("sender_id", &self.sender_id)
            .field("recipient_id", &self.recipient_id)
            .field("timestamp", &self.timestamp)
            .field("correlation_id", &self.correlation_id)
            .field("signature_algorithm", &self.signature_algorithm)
            .field("key_id", &self.key_id)
            .field("payload_keys", &self.payload.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A borrowed top-level field, for encoding without copying.
enum Field<'a> {
    Str(&'a str),
    Null,
    Obj(&'a Map),
    Val(&'a Value),
}

/// The recipient used for MQTT fan-out.
pub const BROADCAST: &str = "broadcast";

/// Top-level keys the envelope knows by name.
const KNOWN: [&str; 12] = [
    "correlation_id",
    "key_id",
    "message_id",
    "message_type",
    "nonce",
    "payload",
    "recipient_id",
    "sender_id",
    "signature",
    "signature_algorithm",
    "signed_at",
    "timestamp",
];

impl Envelope {
    /// A new unsigned envelope stamped now, with a fresh `message_id`.
    pub fn new(
        message_type: MessageType,
        sender_id: impl Into<String>,
        recipient_id: impl Into<String>,
        payload: Map,
        now: DateTime<Utc>,
    ) -> Self {
        Envelope {
            message_id: ids::message_id(),
            message_type,
            sender_id: sender_id.into(),
            recipient_id: recipient_id.into(),
            timestamp: format_iso(now),
            payload,
            correlation_id: None,
            nonce: None,
            signed_at: None,
            signature: None,
            signature_algorithm: None,
            key_id: None,
            extra: Map::new(),
        }
    }

    /// A reply to `self`: sender and recipient swapped, `correlation_id` = our `message_id`.
    pub fn reply(
        &self,
        message_type: MessageType,
        sender_id: impl Into<String>,
        payload: Map,
        now: DateTime<Utc>,
    ) -> Self {
        let mut e = Envelope::new(
            message_type,
            sender_id,
            self.sender_id.clone(),
            payload,
            now,
        );
        e.correlation_id = Some(self.message_id.clone());
        e
    }

    /// Builds the payload from a typed struct.
    ///
    /// # Errors
    /// When the struct does not serialize to a JSON object.
    pub fn with_typed_payload<T: Serialize>(mut self, payload: &T) -> Result<Self, json::Error> {
        self.payload = typed_to_map(payload)?;
        Ok(self)
    }

    /// Decodes an envelope from JSON bytes.
    ///
    /// # Errors
    /// [`EnvelopeError`] naming the first problem.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Envelope::from_value(json::parse(bytes)?)
    }

    /// Decodes an envelope from a JSON value.
    ///
    /// # Errors
    /// [`EnvelopeError`] naming the first problem.
    pub fn from_value(v: Value) -> Result<Self, EnvelopeError> {
        let kind = v.kind();
        let Value::Object(mut m) = v else {
            return Err(EnvelopeError::NotAnObject(kind));
        };
        let message_id = take_string(&mut m, "message_id", MAX_ID_LEN)?;
        let type_text = take_string(&mut m, "message_type", MAX_ID_LEN)?;
        let message_type = type_text.parse()?;
        let sender_id = take_string(&mut m, "sender_id", MAX_ID_LEN)?;
        let recipient_id = take_string(&mut m, "recipient_id", MAX_ID_LEN)?;
        let timestamp = take_string(&mut m, "timestamp", MAX_SIG_FIELD_LEN)?;
        parse_iso(&timestamp).map_err(|e| EnvelopeError::BadTimestamp(e.0))?;
        let payload = match m.remove("payload") {
            None => return Err(EnvelopeError::MissingField("payload")),
            Some(Value::Object(p)) => p,
            Some(other) => {
                return Err(EnvelopeError::WrongType {
                    field: "payload",
                    expected: "an object",
                    found: other.kind(),
                });
            }
        };
        let correlation_id = match m.remove("correlation_id") {
            None => return Err(EnvelopeError::MissingField("correlation_id")),
            Some(v) => opt_string(v, "correlation_id", MAX_ID_LEN)?,
        };
        let nonce = take_opt(&mut m, "nonce", MAX_SIG_FIELD_LEN)?;
        let signed_at = take_opt(&mut m, "signed_at", MAX_SIG_FIELD_LEN)?;
        let signature = take_opt(&mut m, "signature", MAX_SIG_FIELD_LEN)?;
        let signature_algorithm = take_opt(&mut m, "signature_algorithm", MAX_SIG_FIELD_LEN)?;
        let key_id = take_opt(&mut m, "key_id", MAX_ID_LEN)?;
        Ok(Envelope {
            message_id,
            message_type,
            sender_id,
            recipient_id,
            timestamp,
            payload,
            correlation_id,
            nonce,
            signed_at,
            signature,
            signature_algorithm,
            key_id,
            extra: m,
        })
    }

    /// The envelope as a JSON object (every field, signature included).
    pub fn to_value(&self) -> Value {
        let mut m = self.extra.clone();
        for (k, f) in self.fields(true) {
            let v = match f {
                Field::Str(s) => Value::from(s),
                Field::Null => Value::Null,
                Field::Obj(o) => Value::Object(o.clone()),
                Field::Val(v) => v.clone(),
            };
            m.insert(k.to_owned(), v);
        }
        Value::Object(m)
    }

    /// The envelope as compact JSON text: the wire form (canonical, so it is ASCII).
    pub fn to_json(&self) -> String {
        String::from_utf8(self.to_json_bytes()).unwrap_or_default()
    }

    /// The envelope as wire bytes (see [`Envelope::to_json`]).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_canonical(true, &mut out);
        out
    }

    /// The bytes a signature covers: the canonical JSON of every field except `signature`
    /// and `signature_algorithm` (PROTOCOL.md §2).
    pub fn canonical_signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_canonical(false, &mut out);
        out
    }

    /// Appends the canonical bytes, with or without the signature fields, to `out`.
    pub fn write_canonical(&self, with_signature: bool, out: &mut Vec<u8>) {
        let mut all = self.fields(with_signature);
        all.extend(self.extra.iter().map(|(k, v)| (k.as_str(), Field::Val(v))));
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out.push(b'{');
        for (i, (k, f)) in all.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::write_str(k, out);
            out.push(b':');
            match f {
                Field::Str(s) => json::write_str(s, out),
                Field::Null => out.extend_from_slice(b"null"),
                Field::Obj(o) => json::write_canonical_map(o, out),
                Field::Val(v) => json::write_canonical(v, out),
            }
        }
        out.push(b'}');
    }

    fn fields(&self, with_signature: bool) -> Vec<(&str, Field<'_>)> {
        let mut v = Vec::with_capacity(12 + self.extra.len());
        let corr = self
            .correlation_id
            .as_deref()
            .map_or(Field::Null, Field::Str);
        v.push(("correlation_id", corr));
        if let Some(k) = &self.key_id {
            v.push(("key_id", Field::Str(k)));
        }
        v.push(("message_id", Field::Str(&self.message_id)));
        v.push(("message_type", Field::Str(self.message_type.as_str())));
        if let Some(n) = &self.nonce {
            v.push(("nonce", Field::Str(n)));
        }
        v.push(("payload", Field::Obj(&self.payload)));
        v.push(("recipient_id", Field::Str(&self.recipient_id)));
        v.push(("sender_id", Field::Str(&self.sender_id)));
        if with_signature {
            if let Some(s) = &self.signature {
                v.push(("signature", Field::Str(s)));
            }
            if let Some(a) = &self.signature_algorithm {
                v.push(("signature_algorithm", Field::Str(a)));
            }
        }
        if let Some(s) = &self.signed_at {
            v.push(("signed_at", Field::Str(s)));
        }
        v.push(("timestamp", Field::Str(&self.timestamp)));
        v
    }

    /// The parsed `timestamp` (it was validated when decoding).
    pub fn timestamp_utc(&self) -> Option<DateTime<Utc>> {
        parse_iso(&self.timestamp).ok()
    }

    /// The payload as a typed struct.
    ///
    /// # Errors
    /// When the payload does not have the struct's shape; the message names the field.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, json::Error> {
        json::from_value(Value::Object(self.payload.clone()))
    }

    /// True when the envelope carries a signature.
    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// Removes the signature fields (before re-signing).
    pub fn clear_signature(&mut self) {
        self.nonce = None;
        self.signed_at = None;
        self.signature = None;
        self.signature_algorithm = None;
        self.key_id = None;
    }
}

/// A typed struct as a JSON object.
///
/// # Errors
/// When `t` does not serialize to an object.
pub fn typed_to_map<T: Serialize>(t: &T) -> Result<Map, json::Error> {
    match json::to_value(t)? {
        Value::Object(m) => Ok(m),
        other => Err(<json::Error as serde::ser::Error>::custom(format!(
            "payload must be an object, found {}",
            other.kind()
        ))),
    }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), EnvelopeError> {
    if s.len() > max {
        return Err(EnvelopeError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn take_string(m: &mut Map, field: &'static str, max: usize) -> Result<String, EnvelopeError> {
    match m.remove(field) {
        None => Err(EnvelopeError::MissingField(field)),
        Some(Value::String(s)) => {
            check_len(field, &s, max)?;
            Ok(s)
        }
        Some(other) => Err(EnvelopeError::WrongType {
            field,
            expected: "a string",
            found: other.kind(),
        }),
    }
}

fn opt_string(v: Value, field: &'static str, max: usize) -> Result<Option<String>, EnvelopeError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            check_len(field, &s, max)?;
            Ok(Some(s))
        }
        other => Err(EnvelopeError::WrongType {
            field,
            expected: "a string or null",
            found: other.kind(),
        }),
    }
}

fn take_opt(m: &mut Map, field: &'static str, max: usize) -> Result<Option<String>, EnvelopeError> {
    match m.remove(field) {
        None => Ok(None),
        // A present-but-null signature field would be dropped by re-encoding and break the
        // sender's signature; refuse it as the wrong type instead.
        Some(v @ Value::Null) => Err(EnvelopeError::WrongType {
            field,
            expected: "a string",
            found: v.kind(),
        }),
        Some(v) => opt_string(v, field, max),
    }
}

/// True if `key` is a top-level key the envelope models by name.
pub fn is_known_key(key: &str) -> bool {
    KNOWN.binary_search(&key).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"correlation_id":null,"message_id":"msg-0123456789ab","message_type":"HEARTBEAT","payload":{"n":1},"recipient_id":"global_cntl_1","sender_id":"regional_cntl_zone-A_1","timestamp":"2026-03-01T12:00:00Z","x-trace":{"hop":1.0}}"#;

    #[test]
    fn all_22_types_round_trip_their_names() {
        assert_eq!(MessageType::ALL.len(), 22);
        for t in MessageType::ALL {
            assert_eq!(t.as_str().parse::<MessageType>(), Ok(*t));
            assert_eq!(MessageType::from_path_segment(&t.path_segment()), Some(*t));
        }
        assert!("validation_request".parse::<MessageType>().is_err());
        assert!(MessageType::from_path_segment("nope").is_none());
    }

    #[test]
    fn decode_keeps_everything_and_reencodes_identically() {
        let e = Envelope::from_slice(SAMPLE.as_bytes()).expect("valid");
        assert_eq!(e.message_type, MessageType::Heartbeat);
        assert_eq!(
            e.timestamp, "2026-03-01T12:00:00Z",
            "timestamp text kept verbatim"
        );
        assert!(e.extra.contains_key("x-trace"));
        assert_eq!(e.to_json(), SAMPLE);
        assert_eq!(
            String::from_utf8(e.canonical_signing_bytes()).expect("ascii"),
            SAMPLE
        );
    }

    #[test]
    fn decode_errors_are_specific() {
        let cases: &[(&str, &str)] = &[
            ("[]", "an envelope must be a JSON object, found an array"),
            (
                r#"{"message_type":"HEARTBEAT"}"#,
                "missing field `message_id`",
            ),
            (
                r#"{"message_id":1,"message_type":"HEARTBEAT"}"#,
                "field `message_id` must be a string, found an integer",
            ),
            (
                r#"{"message_id":"m","message_type":"NOPE","sender_id":"a","recipient_id":"b","timestamp":"2026-03-01T12:00:00","payload":{},"correlation_id":null}"#,
                "unknown message type \"NOPE\"",
            ),
            (
                r#"{"message_id":"m","message_type":"HEARTBEAT","sender_id":"a","recipient_id":"b","timestamp":"soon","payload":{},"correlation_id":null}"#,
                "field `timestamp` is not an ISO-8601 time: \"soon\"",
            ),
            (
                r#"{"message_id":"m","message_type":"HEARTBEAT","sender_id":"a","recipient_id":"b","timestamp":"2026-03-01T12:00:00","payload":[],"correlation_id":null}"#,
                "field `payload` must be an object, found an array",
            ),
            (
                r#"{"message_id":"m","message_type":"HEARTBEAT","sender_id":"a","recipient_id":"b","timestamp":"2026-03-01T12:00:00","payload":{}}"#,
                "missing field `correlation_id`",
            ),
            (
                r#"{"message_id":"m","message_type":"HEARTBEAT","sender_id":"a","recipient_id":"b","timestamp":"2026-03-01T12:00:00","payload":{},"correlation_id":null,"nonce":null}"#,
                "field `nonce` must be a string, found null",
            ),
        ];
        for (input, want) in cases {
            let e = Envelope::from_slice(input.as_bytes()).expect_err(input);
            assert_eq!(e.to_string(), *want, "{input}");
        }
        let long = format!(
            r#"{{"message_id":"{}","message_type":"HEARTBEAT","sender_id":"a","recipient_id":"b","timestamp":"2026-03-01T12:00:00","payload":{{}},"correlation_id":null}}"#,
            "m".repeat(300)
        );
        assert!(matches!(
            Envelope::from_slice(long.as_bytes()),
            Err(EnvelopeError::TooLong {
                field: "message_id",
                ..
            })
        ));
    }

    #[test]
    fn reply_correlates() {
        let req = Envelope::from_slice(SAMPLE.as_bytes()).expect("valid");
        let now = Utc::now();
        let rep = req.reply(MessageType::Heartbeat, "global_cntl_1", Map::new(), now);
        assert_eq!(rep.recipient_id, "regional_cntl_zone-A_1");
        assert_eq!(rep.correlation_id.as_deref(), Some("msg-0123456789ab"));
        assert!(ids::is_message_id(&rep.message_id));
    }

    #[test]
    fn known_keys_sorted_for_lookup() {
        let mut sorted = KNOWN;
        sorted.sort_unstable();
        assert_eq!(sorted, KNOWN);
        assert!(is_known_key("nonce"));
        assert!(!is_known_key("x-trace"));
    }
}
