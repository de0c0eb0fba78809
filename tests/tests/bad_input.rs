//! A corpus of bad input against running controllers, over every transport a peer can
//! reach: REST (`POST /message/{type}` and the other routes), gRPC (the `pdsno.v1`
//! services) and MQTT (envelopes published on every pdsno topic).
//!
//! Each case names what it guards against, the input, and the answer the contract
//! (PROTOCOL.md and the transport modules' documentation) requires. After every case a
//! well-behaved client must still be served (`GET /health`, gRPC `GetInfo`, a correctly
//! signed message accepted), the process must be alive, and its log must show no panic.
//! Nothing may answer 5xx, and no case may hang: each one runs under a timeout.
//!
//! The raw MQTT packet corpus against the broker itself lives in `mqtt_bad_input.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use pdsno_node::transport::mqtt::{BrokerUrl, MqttClient, MqttSettings};
use pdsno_node::transport::parent::ParentLink;
use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::grpc::pb;
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, SecretString};
use pdsno_shared::payload::discovery::{Device, DiscoveryMethod, DiscoveryReport};
use pdsno_shared::signing::{sign_ed25519, sign_hmac};
use pdsno_shared::time::format_iso;
use pdsno_tests::{Lab, NodeProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{RawChild, eventually, nib, num, status};

/// No single case may take longer than this.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for processes to come up or for an effect to show.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// A controller played by the test: admitted for real, so it can sign correctly.

/// A regional controller admitted by the test itself over gRPC; it signs with its Ed25519
/// identity key, which the GC recorded at admission.
struct Insider {
    id: String,
    key: IdentityKey,
}

async fn admit_insider(lab: &Lab, gc: &NodeProc, temp_id: &str) -> Insider {
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    let child = RawChild::new(lab, temp_id, "zone-A", "regional");
    let ch = link
        .request_validation(&child.request(&gc.id, 0))
        .await
        .expect("challenge");
    let res = link
        .respond_to_challenge(&child.response(&ch, |_| {}))
        .await
        .expect("result");
    assert_eq!(
        res.payload.get("status").and_then(Value::as_str),
        Some("APPROVED"),
        "{res:?}"
    );
    let id = res
        .payload
        .get("assigned_id")
        .and_then(Value::as_str)
        .expect("assigned id")
        .to_owned();
    Insider { id, key: child.key }
}

fn obj(pairs: &[(&str, Value)]) -> Map {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

impl Insider {
    /// An unsigned message of type `t` from us to `to`.
    fn message(&self, t: MessageType, to: &str, payload: Map) -> Envelope {
        Envelope::new(t, self.id.clone(), to, payload, chrono::Utc::now())
    }

    /// Signs `e` with our identity key, now.
    fn sign(&self, mut e: Envelope) -> Envelope {
        sign_ed25519(&mut e, &self.key, None, chrono::Utc::now());
        e
    }

    /// Signs `e` as if at `now + offset_secs`.
    fn sign_at(&self, mut e: Envelope, offset_secs: i64) -> Envelope {
        let at = chrono::Utc::now() + chrono::Duration::seconds(offset_secs);
        sign_ed25519(&mut e, &self.key, None, at);
        e
    }

    /// A HEARTBEAT to `to`, unsigned.
    fn heartbeat(&self, to: &str) -> Envelope {
        self.message(
            MessageType::Heartbeat,
            to,
            obj(&[("status", "online".into())]),
        )
    }

    /// A correctly signed HEARTBEAT to `to`.
    fn signed_heartbeat(&self, to: &str) -> Envelope {
        self.sign(self.heartbeat(to))
    }
}

/// The envelope's JSON object with `key` set to `v` (or removed), as wire bytes.
fn with_field(e: &Envelope, key: &str, v: Option<Value>) -> Vec<u8> {
    let mut m = match e.to_value() {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    match v {
        Some(v) => {
            m.insert(key.to_owned(), v);
        }
        None => {
            m.remove(key);
        }
    }
    json::to_canonical_string(&Value::Object(m)).into_bytes()
}

/// The wire bytes of `e` with the first `from` replaced by `to` (byte-level surgery for
/// input no encoder would produce).
fn splice(e: &Envelope, from: &str, to: &[u8]) -> Vec<u8> {
    let text = e.to_json_bytes();
    let at = text
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} not in {}", String::from_utf8_lossy(&text)));
    let mut out = text[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&text[at + from.len()..]);
    out
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 by hand: nothing between the test and the server's parser.

#[derive(Debug)]
struct HttpReply {
    status: u16,
    body: String,
}

/// Sends `request` as is and reads the answer until the server closes. The body is
/// written while the answer is read, so a server that answers before reading everything
/// (413) is heard.
async fn http_raw(addr: SocketAddr, request: Vec<u8>) -> Result<HttpReply, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        // Keep the write half open until the server is done with us.
        tokio::time::sleep(CASE_TIMEOUT).await;
        drop(wr);
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer (the server did not read our whole body) is fine.
            Err(_) if !out.is_empty() => break,
            Err(e) => {
                writer.abort();
                return Err(format!("read: {e}"));
            }
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(HttpReply { status, body })
}

fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: pdsno\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> HttpReply {
    tokio::time::timeout(CASE_TIMEOUT, http_raw(addr, request("POST", path, body)))
        .await
        .unwrap_or_else(|_| panic!("POST {path}: no answer within {CASE_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn get(addr: SocketAddr, path: &str) -> HttpReply {
    tokio::time::timeout(CASE_TIMEOUT, http_raw(addr, request("GET", path, b"")))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {CASE_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn rejected(st: &Value, reason: &str) -> u64 {
    num(st, &["received", "rejected", reason]).unwrap_or(0)
}

/// What every case must leave intact: the process runs without a panic in its log, its
/// REST and gRPC endpoints answer, and a correctly signed message is still accepted.
async fn still_serving(node: &mut NodeProc, insider: &Insider, case: &str) {
    assert!(node.proc.is_alive(), "{case}: the node died");
    let err = node.proc.stderr();
    assert!(
        !err.contains("panicked"),
        "{case}: the node panicked:\n{err}"
    );
    let h = get(node.rest, "/health").await;
    assert_eq!(h.status, 200, "{case}: /health: {h:?}");
    assert!(h.body.contains("\"healthy\""), "{case}: {h:?}");
    let info = tokio::time::timeout(
        CASE_TIMEOUT,
        ParentLink::new(&node.grpc_url()).expect("url").info(),
    )
    .await
    .unwrap_or_else(|_| panic!("{case}: GetInfo hangs"))
    .unwrap_or_else(|e| panic!("{case}: GetInfo failed: {e}"));
    assert_eq!(info.controller_id, node.id, "{case}");
    let hb = insider.signed_heartbeat(&node.id);
    let r = post(node.rest, "/message/heartbeat", &hb.to_json_bytes()).await;
    assert_eq!(r.status, 200, "{case}: a good message was refused: {r:?}");
}

// ---------------------------------------------------------------------------------------
// REST

enum Send {
    /// `POST path` with this body.
    Post(String, Vec<u8>),
    /// The same `POST` twice: the first must be accepted (200), the second is the case.
    Twice(String, Vec<u8>),
    /// A body-less request with this method.
    Method(&'static str, String),
    /// These bytes, exactly.
    Raw(Vec<u8>),
    /// A request whose body never finishes, held open while another client is served.
    Stalled,
}

struct RestCase {
    guards: &'static str,
    send: Send,
    /// The HTTP status required.
    status: u16,
    /// A text the answer's body must contain ("" for none).
    detail: &'static str,
    /// The receive-path refusal counter that must grow.
    counted: Option<&'static str>,
}

fn rest_cases(gc: &NodeProc, me: &Insider) -> Vec<RestCase> {
    let to = gc.id.as_str();
    let hb_path = || "/message/heartbeat".to_owned();
    let good = || me.signed_heartbeat(to);
    let unsigned = || me.heartbeat(to);
    let p = |guards, body: Vec<u8>, status, detail| RestCase {
        guards,
        send: Send::Post(hb_path(), body),
        status,
        detail,
        counted: None,
    };
    let c = |guards, body: Vec<u8>, status, detail, counted| RestCase {
        guards,
        send: Send::Post(hb_path(), body),
        status,
        detail,
        counted: Some(counted),
    };
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let big_int = "9".repeat(5_000);
    let huge_body = {
        let mut b = br#"{"blob":""#.to_vec();
        b.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        b.extend_from_slice(br#""}"#);
        b
    };
    let mut tampered = good();
    tampered.payload.insert("status".into(), "offline".into());
    let mut extra_after = good();
    extra_after
        .extra
        .insert("x_added_later".into(), "not signed".into());
    let mut extra_signed = unsigned();
    extra_signed
        .extra
        .insert("x_vendor_field".into(), obj(&[("n", 1u64.into())]).into());
    let extra_signed = me.sign(extra_signed);
    let mut not_hex = good();
    not_hex.signature = Some("zz".repeat(64));
    let mut short_sig = good();
    short_sig.signature = Some("ab".into());
    let mut rsa = good();
    rsa.signature_algorithm = Some("RSA-SHA1".into());
    let stranger = IdentityKey::generate();
    let mut by_stranger = unsigned();
    sign_ed25519(&mut by_stranger, &stranger, None, chrono::Utc::now());
    let mut hmac_signed = unsigned();
    sign_hmac(
        &mut hmac_signed,
        &HmacKey::from_bytes(&[7u8; 32]).expect("key"),
        None,
        chrono::Utc::now(),
    );
    let resign = |f: &dyn Fn(&mut Envelope)| {
        // Signed, then a signature field altered and the signature recomputed over it.
        let mut e = good();
        f(&mut e);
        let sig = hex::encode(me.key.sign(&e.canonical_signing_bytes()));
        e.signature = Some(sig);
        e
    };
    let bad_signed_at = resign(&|e| e.signed_at = Some("yesterday at noon".into()));
    let year_9999 = resign(&|e| e.signed_at = Some("9999-12-31T23:59:59+00:00".into()));
    let long_nonce = resign(&|e| e.nonce = Some("a".repeat(200)));
    let empty_nonce = resign(&|e| e.nonce = Some(String::new()));
    let mut no_nonce = good();
    no_nonce.nonce = None;
    let mut ghost = unsigned();
    ghost.sender_id = "regional_cntl_zone-A_999".into();
    sign_ed25519(&mut ghost, &me.key, None, chrono::Utc::now());
    let mut other_recipient = unsigned();
    other_recipient.recipient_id = "global_cntl_2".into();
    let other_recipient = me.sign(other_recipient);
    let no_handler = me.sign(me.message(
        MessageType::DiscoveryReportAck,
        to,
        obj(&[("status", "received".into())]),
    ));
    let mut odd_time = unsigned();
    odd_time.timestamp = "2026-03-01T12:00:00Z".into();
    let odd_time = me.sign(odd_time);
    let mut no_offset = unsigned();
    no_offset.timestamp = "2026-03-01T12:00:00.500000".into();
    let no_offset = me.sign(no_offset);
    let mut unicode = unsigned();
    unicode
        .payload
        .insert("note".into(), "Zürich \u{1F600} \u{0001}\"\\/".into());
    let unicode = me.sign(unicode);
    let summary = |region: &str, devices: Value| {
        me.sign(me.message(
            MessageType::DiscoverySummary,
            to,
            obj(&[
                ("summary_id", "s-bad-input-1".into()),
                ("rc_id", me.id.clone().into()),
                ("region", region.into()),
                ("cycle_start", format_iso(chrono::Utc::now()).into()),
                ("cycle_end", format_iso(chrono::Utc::now()).into()),
                ("total_new", 0u64.into()),
                ("total_updated", 0u64.into()),
                ("total_inactive", 0u64.into()),
                ("total_devices_in_region", 0u64.into()),
                ("devices", devices),
            ]),
        ))
    };
    let summary_wrong_types = me.sign(me.message(
        MessageType::DiscoverySummary,
        to,
        obj(&[("summary_id", 5u64.into()), ("rc_id", me.id.clone().into())]),
    ));

    vec![
        // --- the body is not an envelope: 400 with a detail, before any signature work
        p("an empty body", Vec::new(), 400, "Invalid message"),
        p(
            "a body that is not JSON",
            b"hello".to_vec(),
            400,
            "invalid JSON",
        ),
        p(
            "truncated JSON",
            good().to_json_bytes()[..40].to_vec(),
            400,
            "invalid JSON",
        ),
        p(
            "a JSON array for a body",
            b"[]".to_vec(),
            400,
            "JSON object",
        ),
        p(
            "a JSON string for a body",
            br#""x""#.to_vec(),
            400,
            "JSON object",
        ),
        p("JSON null for a body", b"null".to_vec(), 400, "JSON object"),
        p(
            "data after the envelope",
            [good().to_json_bytes(), b"{}".to_vec()].concat(),
            400,
            "invalid JSON",
        ),
        p(
            "invalid UTF-8 inside a string",
            splice(&good(), "online", b"on\xff\xfeline"),
            400,
            "invalid JSON",
        ),
        p(
            "a lone UTF-16 surrogate escape",
            splice(&good(), "online", br"on\ud800line"),
            400,
            "invalid JSON",
        ),
        p(
            "a raw control character inside a string",
            splice(&good(), "online", b"on\x01line"),
            400,
            "invalid JSON",
        ),
        p(
            "a duplicated key (two parsers could disagree on which copy is signed)",
            splice(&good(), "{", br#"{"recipient_id":"someone_else","#),
            400,
            "duplicate key",
        ),
        p(
            "NaN, which Python accepts but is not JSON",
            splice(&good(), r#""online""#, b"NaN"),
            400,
            "invalid JSON",
        ),
        p(
            "10 000 nested arrays (stack exhaustion)",
            splice(&good(), r#""online""#, deep.as_bytes()),
            400,
            "invalid JSON",
        ),
        p(
            "a 5 000-digit integer (quadratic big-number parsing)",
            splice(&good(), r#""online""#, big_int.as_bytes()),
            400,
            "invalid JSON",
        ),
        p(
            "no message_type",
            with_field(&good(), "message_type", None),
            400,
            "message_type",
        ),
        p(
            "no payload",
            with_field(&good(), "payload", None),
            400,
            "payload",
        ),
        p(
            "no correlation_id (the original always sends null)",
            with_field(&good(), "correlation_id", None),
            400,
            "correlation_id",
        ),
        p(
            "no sender_id",
            with_field(&good(), "sender_id", None),
            400,
            "sender_id",
        ),
        p(
            "timestamp as a number",
            with_field(&good(), "timestamp", Some(1_772_366_400u64.into())),
            400,
            "timestamp",
        ),
        p(
            "payload as a string",
            with_field(&good(), "payload", Some("{}".into())),
            400,
            "payload",
        ),
        p(
            "message_type as a number",
            with_field(&good(), "message_type", Some(7u64.into())),
            400,
            "message_type",
        ),
        p(
            "sender_id null",
            with_field(&good(), "sender_id", Some(Value::Null)),
            400,
            "sender_id",
        ),
        p(
            "nonce as a number",
            with_field(&good(), "nonce", Some(12345u64.into())),
            400,
            "nonce",
        ),
        p(
            "an unknown message_type in the body",
            with_field(&good(), "message_type", Some("SELF_DESTRUCT".into())),
            400,
            "unknown message type",
        ),
        p(
            "an unparseable timestamp",
            with_field(&good(), "timestamp", Some("yesterday".into())),
            400,
            "timestamp",
        ),
        p(
            "an impossible calendar date",
            with_field(
                &good(),
                "timestamp",
                Some("2026-13-45T99:99:99+00:00".into()),
            ),
            400,
            "timestamp",
        ),
        p(
            "a 300-character message_id (unbounded ids)",
            with_field(&good(), "message_id", Some("m".repeat(300).into())),
            400,
            "too long",
        ),
        p(
            "a 300-character nonce (unbounded replay-cache entries)",
            with_field(&good(), "nonce", Some("a".repeat(300).into())),
            400,
            "too long",
        ),
        RestCase {
            guards: "a body over the 1 MiB limit (memory exhaustion)",
            send: Send::Post(hb_path(), huge_body),
            status: 413,
            detail: "larger than",
            counted: None,
        },
        // --- signatures: 401 with the contract's reason
        c(
            "an unsigned message",
            unsigned().to_json_bytes(),
            401,
            "Message signature required but not present",
            "unsigned",
        ),
        c(
            "a signature by a key that is not the sender's",
            by_stranger.to_json_bytes(),
            401,
            "Invalid signature",
            "bad_signature",
        ),
        c(
            "a payload changed after signing",
            tampered.to_json_bytes(),
            401,
            "Invalid signature",
            "bad_signature",
        ),
        c(
            "a top-level field added after signing (unknown keys are covered)",
            extra_after.to_json_bytes(),
            401,
            "Invalid signature",
            "bad_signature",
        ),
        c(
            "a signature that is not hex",
            not_hex.to_json_bytes(),
            401,
            "Invalid signature",
            "bad_signature",
        ),
        c(
            "a truncated signature",
            short_sig.to_json_bytes(),
            401,
            "Invalid signature",
            "bad_signature",
        ),
        c(
            "an unsupported signature algorithm",
            rsa.to_json_bytes(),
            401,
            "Unsupported signature algorithm",
            "bad_signature",
        ),
        c(
            "HMAC with a key this pair never agreed",
            hmac_signed.to_json_bytes(),
            401,
            "Invalid message signature",
            "bad_signature",
        ),
        c(
            "an unparseable signed_at",
            bad_signed_at.to_json_bytes(),
            401,
            "Invalid timestamp format",
            "bad_signature",
        ),
        c(
            "signed_at a day in the future",
            me.sign_at(unsigned(), 86_400).to_json_bytes(),
            401,
            "too old or future-dated",
            "stale",
        ),
        c(
            "signed_at ten years ago",
            me.sign_at(unsigned(), -315_360_000).to_json_bytes(),
            401,
            "too old or future-dated",
            "stale",
        ),
        c(
            "signed_at at the end of the calendar (date arithmetic overflow)",
            year_9999.to_json_bytes(),
            401,
            "too old or future-dated",
            "stale",
        ),
        c(
            "a 200-character nonce (unbounded replay-cache entries)",
            long_nonce.to_json_bytes(),
            401,
            "Invalid nonce",
            "bad_signature",
        ),
        c(
            "an empty nonce",
            empty_nonce.to_json_bytes(),
            401,
            "Invalid nonce",
            "bad_signature",
        ),
        c(
            "a signature without its nonce",
            no_nonce.to_json_bytes(),
            401,
            "Missing required field: nonce",
            "bad_signature",
        ),
        c(
            "a sender nobody admitted",
            ghost.to_json_bytes(),
            401,
            "Invalid message signature",
            "bad_signature",
        ),
        RestCase {
            guards: "the replay of an accepted message",
            send: Send::Twice(hb_path(), good().to_json_bytes()),
            status: 401,
            detail: "Replay attack detected: nonce already seen",
            counted: Some("replay"),
        },
        // --- routing
        c(
            "a message for another controller",
            other_recipient.to_json_bytes(),
            400,
            "does not match controller",
            "wrong_recipient",
        ),
        RestCase {
            guards: "a body whose type differs from the path's",
            send: Send::Post("/message/sync_request".into(), good().to_json_bytes()),
            status: 400,
            detail: "does not match the endpoint",
            counted: Some("type_mismatch"),
        },
        RestCase {
            guards: "a type this controller does not handle",
            send: Send::Post(
                "/message/discovery_report_ack".into(),
                no_handler.to_json_bytes(),
            ),
            status: 404,
            detail: "No handler",
            counted: Some("no_handler"),
        },
        RestCase {
            guards: "an unknown message type in the path",
            send: Send::Post("/message/self_destruct".into(), good().to_json_bytes()),
            status: 404,
            detail: "Unknown message type",
            counted: None,
        },
        RestCase {
            guards: "a path segment that percent-decodes to invalid UTF-8 (answered in JSON)",
            send: Send::Post("/message/%FF%FE".into(), good().to_json_bytes()),
            status: 400,
            detail: "Invalid message type in the path",
            counted: None,
        },
        RestCase {
            guards: "a 5 000-character path segment",
            send: Send::Post(format!("/message/{}", "a".repeat(5_000)), b"{}".to_vec()),
            status: 404,
            detail: "Unknown message type",
            counted: None,
        },
        RestCase {
            guards: "GET on the POST-only message route",
            send: Send::Method("GET", hb_path()),
            status: 405,
            detail: "Method Not Allowed",
            counted: None,
        },
        RestCase {
            guards: "DELETE on /health",
            send: Send::Method("DELETE", "/health".into()),
            status: 405,
            detail: "Method Not Allowed",
            counted: None,
        },
        RestCase {
            guards: "an unknown route",
            send: Send::Method("GET", "/admin/../../etc/passwd".into()),
            status: 404,
            detail: "Not Found",
            counted: None,
        },
        RestCase {
            guards: "the message route without a type",
            send: Send::Post("/message/".into(), good().to_json_bytes()),
            status: 404,
            detail: "",
            counted: None,
        },
        // --- HTTP itself
        RestCase {
            guards: "a request line that is not HTTP",
            send: Send::Raw(b"HELLO WORLD\r\n\r\n".to_vec()),
            status: 400,
            detail: "",
            counted: None,
        },
        RestCase {
            guards: "a Content-Length that is not a number",
            send: Send::Raw(
                b"POST /message/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n{}"
                    .to_vec(),
            ),
            status: 400,
            detail: "",
            counted: None,
        },
        RestCase {
            guards: "a body that never arrives does not hold up other clients",
            send: Send::Stalled,
            status: 200,
            detail: "healthy",
            counted: None,
        },
        // --- payload level: authenticated, but the content is wrong
        RestCase {
            guards: "a summary whose devices are not a list",
            send: Send::Post(
                "/message/discovery_summary".into(),
                summary("zone-A", "all of them".into()).to_json_bytes(),
            ),
            status: 400,
            detail: "devices must be a list",
            counted: Some("malformed"),
        },
        RestCase {
            guards: "a summary device that is not a device",
            send: Send::Post(
                "/message/discovery_summary".into(),
                summary("zone-A", Value::Array(vec![42u64.into()])).to_json_bytes(),
            ),
            status: 400,
            detail: "devices[0] is invalid",
            counted: Some("malformed"),
        },
        RestCase {
            guards: "a summary with fields of the wrong types",
            send: Send::Post(
                "/message/discovery_summary".into(),
                summary_wrong_types.to_json_bytes(),
            ),
            status: 400,
            detail: "invalid discovery summary",
            counted: Some("malformed"),
        },
        RestCase {
            guards: "a regional controller summarising another region",
            send: Send::Post(
                "/message/discovery_summary".into(),
                summary("zone-B", Value::Array(vec![])).to_json_bytes(),
            ),
            status: 403,
            detail: "may not summarise region zone-B",
            counted: Some("forbidden"),
        },
        // --- unusual but valid: accepted
        p(
            "an unknown top-level field, signed: preserved and accepted (PROTOCOL.md §1)",
            extra_signed.to_json_bytes(),
            200,
            "",
        ),
        p(
            "a timestamp with Z instead of +00:00",
            odd_time.to_json_bytes(),
            200,
            "",
        ),
        p(
            "a timestamp without an offset (UTC)",
            no_offset.to_json_bytes(),
            200,
            "",
        ),
        p(
            "non-ASCII, astral and control characters in the payload",
            unicode.to_json_bytes(),
            200,
            "",
        ),
        RestCase {
            guards: "the path's type in upper case",
            send: Send::Post("/message/HEARTBEAT".into(), good().to_json_bytes()),
            status: 200,
            detail: "",
            counted: None,
        },
    ]
}

/// Holds a request open with half its body sent, and checks another client is served
/// meanwhile; returns the other client's answer.
async fn stalled(addr: SocketAddr) -> HttpReply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /message/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"message_id\":",
    )
    .await
    .expect("send");
    let reply = get(addr, "/health").await;
    drop(s);
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_bad_input_is_refused_cleanly() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let me = admit_insider(&lab, &gc, "temp-rest-insider").await;
    still_serving(&mut gc, &me, "before any case").await;
    let cases = rest_cases(&gc, &me);
    // Pinned: a case removed (or added) must change this number on purpose.
    assert_eq!(cases.len(), 68, "REST cases");
    for (i, case) in cases.into_iter().enumerate() {
        let name = format!("REST case {i} ({})", case.guards);
        let before = match case.counted {
            Some(reason) => rejected(&status(&gc).await, reason),
            None => 0,
        };
        // Every answer the application gives (not hyper's to a malformed request) is JSON.
        let app_answer = matches!(
            case.send,
            Send::Post(..) | Send::Twice(..) | Send::Method(..)
        );
        let run = async {
            match case.send {
                Send::Post(path, body) => post(gc.rest, &path, &body).await,
                Send::Twice(path, body) => {
                    let first = post(gc.rest, &path, &body).await;
                    assert_eq!(first.status, 200, "{name}: the first copy: {first:?}");
                    post(gc.rest, &path, &body).await
                }
                Send::Method(m, path) => {
                    tokio::time::timeout(CASE_TIMEOUT, http_raw(gc.rest, request(m, &path, b"")))
                        .await
                        .unwrap_or_else(|_| panic!("{name}: no answer"))
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                }
                Send::Raw(bytes) => tokio::time::timeout(CASE_TIMEOUT, http_raw(gc.rest, bytes))
                    .await
                    .unwrap_or_else(|_| panic!("{name}: no answer"))
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
                Send::Stalled => stalled(gc.rest).await,
            }
        };
        let reply = tokio::time::timeout(CASE_TIMEOUT * 2, run)
            .await
            .unwrap_or_else(|_| panic!("{name}: hangs"));
        assert!(reply.status < 500, "{name}: a server error: {reply:?}");
        assert_eq!(reply.status, case.status, "{name}: {reply:?}");
        assert!(
            reply.body.contains(case.detail),
            "{name}: the answer must say {:?}: {reply:?}",
            case.detail
        );
        if app_answer {
            let v = json::parse(reply.body.as_bytes())
                .unwrap_or_else(|e| panic!("{name}: the answer is not JSON ({e}): {reply:?}"));
            assert!(
                v.get("detail")
                    .or_else(|| v.get("error"))
                    .or_else(|| v.get("status"))
                    .is_some()
                    || reply.status == 200,
                "{name}: {reply:?}"
            );
        }
        if let Some(reason) = case.counted {
            let after = rejected(&status(&gc).await, reason);
            assert!(
                after > before,
                "{name}: the refusal was not counted as {reason}"
            );
        }
        still_serving(&mut gc, &me, &name).await;
    }
}

// ---------------------------------------------------------------------------------------
// gRPC

enum Call {
    Exchange(pb::Envelope),
    /// The same message twice: the first must succeed, the second is the case.
    ExchangeTwice(pb::Envelope),
    Validate(pb::ValidationRequest),
    Respond(pb::ChallengeResponse),
    KeyExchange(pb::KeyAgreement),
    /// HTTP/1.1 bytes on the HTTP/2-only gRPC port: must be closed, not left hanging.
    Http1,
}

struct GrpcCase {
    guards: &'static str,
    call: Call,
    code: tonic::Code,
    /// A text the status message must contain ("" for none).
    message: &'static str,
}

fn pb_of(e: &Envelope) -> pb::Envelope {
    pb::Envelope::from_envelope(e)
}

fn grpc_cases(gc: &NodeProc, me: &Insider) -> Vec<GrpcCase> {
    use tonic::Code;
    let to = gc.id.as_str();
    let good = || pb_of(&me.signed_heartbeat(to));
    let header = |f: &dyn Fn(&mut pb::Header)| {
        let mut m = good();
        if let Some(h) = m.header.as_mut() {
            f(h);
        }
        m
    };
    let ex = |guards, m: pb::Envelope, code, message| GrpcCase {
        guards,
        call: Call::Exchange(m),
        code,
        message,
    };
    let mut tampered = me.signed_heartbeat(to);
    tampered.payload.insert("status".into(), "offline".into());
    let stranger = IdentityKey::generate();
    let mut by_stranger = me.heartbeat(to);
    sign_ed25519(&mut by_stranger, &stranger, None, chrono::Utc::now());
    let mut elsewhere = me.heartbeat(to);
    elsewhere.recipient_id = "global_cntl_2".into();
    let elsewhere = me.sign(elsewhere);
    let no_handler = me.sign(me.message(
        MessageType::DiscoveryReportAck,
        to,
        obj(&[("status", "received".into())]),
    ));
    let oversized = {
        let mut m = good();
        m.payload_json = format!(r#"{{"blob":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
        m
    };
    let mut unsupported_alg = me.signed_heartbeat(to);
    unsupported_alg.signature_algorithm = Some("none".into());
    vec![
        ex(
            "an empty envelope (no type, no header)",
            pb::Envelope::default(),
            Code::InvalidArgument,
            "not a valid envelope",
        ),
        ex(
            "an empty message_type",
            pb::Envelope {
                message_type: String::new(),
                ..good()
            },
            Code::InvalidArgument,
            "unknown message type",
        ),
        ex(
            "an unknown message_type",
            pb::Envelope {
                message_type: "SELF_DESTRUCT".into(),
                ..good()
            },
            Code::InvalidArgument,
            "unknown message type",
        ),
        ex(
            "payload_json that is not JSON",
            pb::Envelope {
                payload_json: "{not json".into(),
                ..good()
            },
            Code::InvalidArgument,
            "payload_json",
        ),
        ex(
            "payload_json that is an array",
            pb::Envelope {
                payload_json: "[1,2,3]".into(),
                ..good()
            },
            Code::InvalidArgument,
            "payload_json",
        ),
        ex(
            "payload_json nested 10 000 deep",
            pb::Envelope {
                payload_json: format!(r#"{{"a":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000)),
                ..good()
            },
            Code::InvalidArgument,
            "payload_json",
        ),
        ex(
            "an unparseable header timestamp",
            header(&|h| h.timestamp = "yesterday".into()),
            Code::InvalidArgument,
            "timestamp",
        ),
        ex(
            "an empty header timestamp",
            header(&|h| h.timestamp = String::new()),
            Code::InvalidArgument,
            "timestamp",
        ),
        ex(
            "header extra_json that is not an object",
            header(&|h| h.extra_json = "[]".into()),
            Code::InvalidArgument,
            "extra_json",
        ),
        ex(
            "header extra_json repeating a typed field",
            header(&|h| h.extra_json = r#"{"sender_id":"global_cntl_1"}"#.into()),
            Code::InvalidArgument,
            "sender_id",
        ),
        ex(
            "a 300-character nonce",
            header(&|h| h.nonce = Some("a".repeat(300))),
            Code::InvalidArgument,
            "too long",
        ),
        ex(
            "an unsigned message",
            pb_of(&me.heartbeat(to)),
            Code::Unauthenticated,
            "Message signature required but not present",
        ),
        ex(
            "a signature by a key that is not the sender's",
            pb_of(&by_stranger),
            Code::Unauthenticated,
            "Invalid signature",
        ),
        ex(
            "a payload changed after signing",
            pb_of(&tampered),
            Code::Unauthenticated,
            "Invalid signature",
        ),
        ex(
            "an unsupported signature algorithm",
            pb_of(&unsupported_alg),
            Code::Unauthenticated,
            "Unsupported signature algorithm",
        ),
        ex(
            "signed_at a day in the future",
            pb_of(&me.sign_at(me.heartbeat(to), 86_400)),
            Code::Unauthenticated,
            "too old or future-dated",
        ),
        ex(
            "a message for another controller",
            pb_of(&elsewhere),
            Code::InvalidArgument,
            "does not match controller",
        ),
        ex(
            "a type this controller does not handle",
            pb_of(&no_handler),
            Code::Unimplemented,
            "No handler",
        ),
        ex(
            "a message over the 1 MiB limit",
            oversized,
            Code::OutOfRange,
            "",
        ),
        GrpcCase {
            guards: "the replay of an accepted message",
            call: Call::ExchangeTwice(good()),
            code: Code::Unauthenticated,
            message: "Replay attack detected: nonce already seen",
        },
        GrpcCase {
            guards: "an empty admission request",
            call: Call::Validate(pb::ValidationRequest::default()),
            code: Code::InvalidArgument,
            message: "not a valid envelope",
        },
        GrpcCase {
            guards: "an admission request without a token (no key to check it with)",
            call: Call::Validate({
                let mut e = Envelope::new(
                    MessageType::ValidationRequest,
                    "temp-no-token",
                    to,
                    obj(&[("temp_id", "temp-no-token".into())]),
                    chrono::Utc::now(),
                );
                sign_hmac(
                    &mut e,
                    &HmacKey::from_bytes(&[3u8; 32]).expect("key"),
                    None,
                    chrono::Utc::now(),
                );
                <pb::ValidationRequest as pdsno_shared::grpc::TypedMessage>::from_envelope(&e)
                    .expect("typed")
            }),
            code: Code::Unauthenticated,
            message: "Invalid message signature",
        },
        GrpcCase {
            guards: "a challenge response for a challenge that was never issued",
            call: Call::Respond({
                let mut e = Envelope::new(
                    MessageType::ChallengeResponse,
                    "temp-no-challenge",
                    to,
                    obj(&[
                        ("challenge_id", "challenge-000000000000".into()),
                        ("temp_id", "temp-no-challenge".into()),
                        ("signed_nonce", "AAAA".into()),
                    ]),
                    chrono::Utc::now(),
                );
                e.correlation_id = Some("msg-000000000000".into());
                sign_hmac(
                    &mut e,
                    &HmacKey::from_bytes(&[4u8; 32]).expect("key"),
                    None,
                    chrono::Utc::now(),
                );
                <pb::ChallengeResponse as pdsno_shared::grpc::TypedMessage>::from_envelope(&e)
                    .expect("typed")
            }),
            code: Code::Unauthenticated,
            message: "Invalid message signature",
        },
        GrpcCase {
            guards: "an empty key agreement",
            call: Call::KeyExchange(pb::KeyAgreement::default()),
            code: Code::InvalidArgument,
            message: "not a valid envelope",
        },
        GrpcCase {
            guards: "HTTP/1.1 on the gRPC port",
            call: Call::Http1,
            code: Code::Ok,
            message: "",
        },
    ]
}

/// Writes an HTTP/1.1 request to the gRPC port; true once the server closed the
/// connection (after whatever it sends), false if it is still open after the timeout.
async fn http1_on_grpc(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + CASE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_is_refused_with_clear_statuses() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let me = admit_insider(&lab, &gc, "temp-grpc-insider").await;
    still_serving(&mut gc, &me, "before any case").await;
    let channel = tonic::transport::Endpoint::from_shared(gc.grpc_url())
        .expect("url")
        .connect_lazy();
    let cases = grpc_cases(&gc, &me);
    // Pinned: a case removed (or added) must change this number on purpose.
    assert_eq!(cases.len(), 25, "gRPC cases");
    for (i, case) in cases.into_iter().enumerate() {
        let name = format!("gRPC case {i} ({})", case.guards);
        let mut messaging = pb::messaging_client::MessagingClient::new(channel.clone());
        let mut admission = pb::admission_client::AdmissionClient::new(channel.clone());
        let mut keyx = pb::key_exchange_client::KeyExchangeClient::new(channel.clone());
        let run = async {
            match case.call {
                Call::Exchange(m) => messaging.exchange(m).await.map(|_| ()),
                Call::ExchangeTwice(m) => {
                    let first = messaging.exchange(m.clone()).await;
                    assert!(first.is_ok(), "{name}: the first copy: {first:?}");
                    messaging.exchange(m).await.map(|_| ())
                }
                Call::Validate(m) => admission.request_validation(m).await.map(|_| ()),
                Call::Respond(m) => admission.respond_to_challenge(m).await.map(|_| ()),
                Call::KeyExchange(m) => keyx.exchange(m).await.map(|_| ()),
                Call::Http1 => {
                    assert!(
                        http1_on_grpc(gc.grpc).await,
                        "{name}: the connection was left open"
                    );
                    Ok(())
                }
            }
        };
        let result = tokio::time::timeout(CASE_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| panic!("{name}: hangs"));
        let (code, message) = match &result {
            Ok(()) => (tonic::Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_owned()),
        };
        assert!(
            !matches!(code, tonic::Code::Internal | tonic::Code::Unknown),
            "{name}: a server error: {result:?}"
        );
        assert_eq!(code, case.code, "{name}: {result:?}");
        assert!(
            message.contains(case.message),
            "{name}: the status must say {:?}: {message:?}",
            case.message
        );
        still_serving(&mut gc, &me, &name).await;
    }
}

// ---------------------------------------------------------------------------------------
// MQTT: envelopes on every pdsno topic, as an operator with broker access could publish.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Gc,
    Rc,
    Lc,
}

struct MqttCase {
    guards: &'static str,
    topic: String,
    payload: Vec<u8>,
    /// The refusal counters that must grow, and where; empty: no controller consumes the
    /// topic, so no counter may move.
    counted: Vec<(Who, &'static str)>,
}

/// An MQTT client logged in with the lab's operator account.
async fn operator(broker: SocketAddr) -> MqttClient {
    let url = BrokerUrl::parse(&format!("mqtt://{broker}")).expect("url");
    let mut s = MqttSettings::new(url, "ops-bad-input");
    s.username = Some("ops".into());
    s.password = Some(SecretString::new("ops-password"));
    let (c, _task) = MqttClient::start(s).expect("client");
    c.wait_connected(WAIT).await.expect("the operator connects");
    c
}

/// The LC's current pairwise key with the RC (what it signs reports with).
fn lc_key(lc: &NodeProc, rc_id: &str) -> (HmacKey, String) {
    let k = nib(lc)
        .pair_keys()
        .expect("keys")
        .into_iter()
        .find(|k| k.peer_id == rc_id && k.state == pdsno_node::nib::KeyState::Current)
        .expect("the LC's current key");
    (k.key, k.key_id)
}

/// A DISCOVERY_REPORT from `lc` to `rc_id` announcing `mac`, unsigned.
fn report(lc: &NodeProc, rc_id: &str, mac: &str) -> Envelope {
    let now = chrono::Utc::now();
    let device = Device {
        ip: "10.77.0.1".into(),
        mac: mac.to_owned(),
        last_seen: format_iso(now),
        protocol: "TEST".into(),
        reachable: true,
        rtt_ms: None,
        hostname: None,
        vendor: None,
        model: None,
        uptime_seconds: None,
        discovery_method: DiscoveryMethod::Icmp,
        extra: Map::new(),
    };
    let mut extra = Map::new();
    extra.insert(
        "report_id".into(),
        format!("bad-input-{}", &pdsno_shared::ids::message_id()[4..]).into(),
    );
    let r = DiscoveryReport {
        lc_id: lc.id.clone(),
        subnet: "10.77.0.0/24".into(),
        region: "zone-A".into(),
        timestamp: format_iso(now),
        new_devices: vec![device],
        updated_devices: vec![],
        inactive_devices: vec![],
        extra,
    };
    Envelope::new(
        MessageType::DiscoveryReport,
        lc.id.clone(),
        rc_id,
        typed_to_map(&r).expect("payload"),
        now,
    )
}

fn signed_report(lc: &NodeProc, rc_id: &str, mac: &str) -> Envelope {
    let (key, kid) = lc_key(lc, rc_id);
    let mut e = report(lc, rc_id, mac);
    sign_hmac(&mut e, &key, Some(&kid), chrono::Utc::now());
    e
}

/// A report from `lc` whose payload `tweak` changed, signed with the LC's real key.
fn signed_report_with(
    lc: &NodeProc,
    rc_id: &str,
    mac: &str,
    tweak: impl FnOnce(&mut Map),
) -> Envelope {
    let (key, kid) = lc_key(lc, rc_id);
    let mut e = report(lc, rc_id, mac);
    tweak(&mut e.payload);
    sign_hmac(&mut e, &key, Some(&kid), chrono::Utc::now());
    e
}

fn rejections(st: &Value) -> Map {
    st.get("received")
        .and_then(|r| r.get("rejected"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn total(m: &Map) -> u64 {
    m.values().filter_map(Value::as_u64).sum()
}

fn mqtt_cases(gc: &NodeProc, rc: &NodeProc, lc: &NodeProc) -> Vec<MqttCase> {
    use Who::{Gc, Lc, Rc};
    let disc = format!("pdsno/discovery/zone-A/{}", lc.id);
    let (lc_k, lc_kid) = lc_key(lc, &rc.id);
    let stranger = IdentityKey::generate();
    let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let mut misaddressed = report(lc, "regional_cntl_zone-A_77", "02:00:00:00:77:01");
    sign_hmac(&mut misaddressed, &lc_k, Some(&lc_kid), chrono::Utc::now());
    let mut wrong_key = report(lc, &rc.id, "02:00:00:00:77:02");
    sign_hmac(
        &mut wrong_key,
        &HmacKey::from_bytes(&[9u8; 32]).expect("key"),
        Some(&lc_kid),
        chrono::Utc::now(),
    );
    let mut stale = report(lc, &rc.id, "02:00:00:00:77:03");
    sign_hmac(
        &mut stale,
        &lc_k,
        Some(&lc_kid),
        chrono::Utc::now() - chrono::Duration::seconds(900),
    );
    let forged_policy = |sender: &str, scope: &str| {
        let mut e = Envelope::new(
            MessageType::PolicyUpdate,
            sender,
            "broadcast",
            obj(&[
                ("policy_id", "pdsno-default".into()),
                ("policy_version", 99u64.into()),
                ("scope", scope.into()),
                ("content", obj(&[("label", "forged".into())]).into()),
            ]),
            chrono::Utc::now(),
        );
        sign_ed25519(&mut e, &stranger, None, chrono::Utc::now());
        e.to_json_bytes()
    };
    let mut forged_hb = Envelope::new(
        MessageType::Heartbeat,
        rc.id.clone(),
        gc.id.clone(),
        obj(&[("status", "offline".into())]),
        chrono::Utc::now(),
    );
    sign_ed25519(&mut forged_hb, &stranger, None, chrono::Utc::now());
    let rc_speaking_for_lc = {
        let mut e = Envelope::new(
            MessageType::Heartbeat,
            rc.id.clone(),
            gc.id.clone(),
            obj(&[("status", "online".into())]),
            chrono::Utc::now(),
        );
        sign_ed25519(&mut e, &stranger, None, chrono::Utc::now());
        e.to_json_bytes()
    };
    let unsigned_ack = Envelope::new(
        MessageType::DiscoveryReportAck,
        lc.id.clone(),
        rc.id.clone(),
        obj(&[("status", "received".into())]),
        chrono::Utc::now(),
    );
    let self_reply = {
        let mut e = Envelope::new(
            MessageType::DiscoveryReportAck,
            lc.id.clone(),
            lc.id.clone(),
            obj(&[("status", "received".into())]),
            chrono::Utc::now(),
        );
        sign_hmac(&mut e, &lc_k, Some(&lc_kid), chrono::Utc::now());
        e.to_json_bytes()
    };
    let case =
        |guards, topic: &str, payload: Vec<u8>, counted: Vec<(Who, &'static str)>| MqttCase {
            guards,
            topic: topic.to_owned(),
            payload,
            counted,
        };
    let policy_global = "pdsno/policy/global";
    let policy_region = "pdsno/policy/zone-A";
    let rc_status = format!("pdsno/status/{}", rc.id);
    let lc_status = format!("pdsno/status/{}", lc.id);
    let rc_reply = format!("pdsno/reply/{}", rc.id);
    let lc_reply = format!("pdsno/reply/{}", lc.id);
    vec![
        case(
            "a report that is not JSON",
            &disc,
            b"garbage".to_vec(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a report that is not UTF-8",
            &disc,
            vec![0xff, 0xfe, 0x00, 0x80],
            vec![(Rc, "malformed")],
        ),
        case(
            "an empty report",
            &disc,
            Vec::new(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a report that is JSON but not an envelope",
            &disc,
            br#"{"lc_id":"x","new_devices":[]}"#.to_vec(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a report nested 10 000 deep",
            &disc,
            deep.clone().into_bytes(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a 100 KiB report of nonsense",
            &disc,
            format!(r#"{{"junk":"{}"}}"#, "z".repeat(100 * 1024)).into_bytes(),
            vec![(Rc, "malformed")],
        ),
        case(
            "an unsigned report",
            &disc,
            report(lc, &rc.id, "02:00:00:00:77:04").to_json_bytes(),
            vec![(Rc, "unsigned")],
        ),
        case(
            "a report signed with a key the pair never agreed",
            &disc,
            wrong_key.to_json_bytes(),
            vec![(Rc, "bad_signature")],
        ),
        case(
            "a report signed 15 minutes ago",
            &disc,
            stale.to_json_bytes(),
            vec![(Rc, "stale")],
        ),
        case(
            "a report for another regional controller",
            &disc,
            misaddressed.to_json_bytes(),
            vec![(Rc, "wrong_recipient")],
        ),
        case(
            "a genuine report announcing an invalid MAC",
            &disc,
            signed_report_with(lc, &rc.id, "zz:zz:zz:zz:zz:zz", |_| {}).to_json_bytes(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a genuine report whose device was last seen 'never'",
            &disc,
            signed_report_with(lc, &rc.id, "02:00:00:00:77:06", |p| {
                if let Some(Value::Array(devs)) = p.get_mut("new_devices")
                    && let Some(Value::Object(d)) = devs.first_mut()
                {
                    d.insert("last_seen".into(), "never".into());
                }
            })
            .to_json_bytes(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a genuine report with new_devices of the wrong type",
            &disc,
            signed_report_with(lc, &rc.id, "02:00:00:00:77:07", |p| {
                p.insert("new_devices".into(), "everything".into());
            })
            .to_json_bytes(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a genuine report speaking for another LC",
            &disc,
            signed_report_with(lc, &rc.id, "02:00:00:00:77:08", |p| {
                p.insert("lc_id".into(), "local_cntl_zone-A_99".into());
            })
            .to_json_bytes(),
            vec![(Rc, "forbidden")],
        ),
        case(
            "a genuine report about another region",
            &disc,
            signed_report_with(lc, &rc.id, "02:00:00:00:77:09", |p| {
                p.insert("region".into(), "zone-B".into());
            })
            .to_json_bytes(),
            vec![(Rc, "forbidden")],
        ),
        case(
            "the LC's report on another LC's topic",
            "pdsno/discovery/zone-A/local_cntl_zone-A_99",
            signed_report(lc, &rc.id, "02:00:00:00:77:05").to_json_bytes(),
            vec![(Rc, "wrong_topic")],
        ),
        case(
            "a discovery topic whose last level is not a controller id",
            "pdsno/discovery/zone-A/not an id!",
            b"{}".to_vec(),
            vec![(Rc, "bad_topic")],
        ),
        case(
            "garbage on the global policy topic",
            policy_global,
            b"\x00\x01policy".to_vec(),
            vec![(Rc, "malformed")],
        ),
        case(
            "a global policy from a regional controller",
            policy_global,
            forged_policy(&rc.id, "global"),
            vec![(Rc, "wrong_topic")],
        ),
        case(
            "a global policy claiming the GC, signed by someone else",
            policy_global,
            forged_policy(&gc.id, "global"),
            vec![(Rc, "policy_refused")],
        ),
        case(
            "garbage on the regional policy topic",
            policy_region,
            b"[1,2,3]".to_vec(),
            vec![(Lc, "malformed")],
        ),
        case(
            "a regional policy claiming the RC, signed by someone else",
            policy_region,
            forged_policy(&rc.id, "regional"),
            vec![(Lc, "policy_refused")],
        ),
        case(
            "garbage on a status topic",
            &rc_status,
            b"online".to_vec(),
            vec![(Gc, "malformed"), (Rc, "malformed")],
        ),
        case(
            "a forged 'offline' heartbeat in the RC's name",
            &rc_status,
            forged_hb.to_json_bytes(),
            vec![(Gc, "bad_signature")],
        ),
        case(
            "the RC speaking on the LC's status topic",
            &lc_status,
            rc_speaking_for_lc,
            vec![(Gc, "wrong_topic"), (Rc, "wrong_topic")],
        ),
        case(
            "a status topic whose last level is not a controller id",
            "pdsno/status/not an id!",
            b"{}".to_vec(),
            vec![(Gc, "bad_topic"), (Rc, "bad_topic")],
        ),
        case(
            "garbage on the RC's reply topic",
            &rc_reply,
            b"{\"".to_vec(),
            vec![(Rc, "malformed")],
        ),
        case(
            "an unsigned reply to the RC",
            &rc_reply,
            unsigned_ack.to_json_bytes(),
            vec![(Rc, "unsigned")],
        ),
        case(
            "garbage on the LC's reply topic",
            &lc_reply,
            b"null".to_vec(),
            vec![(Lc, "malformed")],
        ),
        case(
            "a controller answering itself on its reply topic",
            &lc_reply,
            self_reply,
            vec![(Lc, "wrong_topic")],
        ),
        case(
            "garbage on the system events topic (monitoring only)",
            "pdsno/events/system",
            b"\xff garbage".to_vec(),
            vec![],
        ),
        case(
            "garbage on a regional events topic (monitoring only)",
            "pdsno/events/zone-A",
            deep.into_bytes(),
            vec![],
        ),
    ]
}

/// Heartbeats the parent has recorded from `child`.
fn beats_of(st: &Value, child: &str) -> u64 {
    st.get("children")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|r| r.get("controller_id").and_then(Value::as_str) == Some(child))
        })
        .and_then(|r| r.get("heartbeats"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The tree after a case: every process alive without a panic, the RC still applies a
/// genuine report and acknowledges it to the LC, and the GC still records the RC's
/// heartbeats.
async fn tree_healthy(
    ops: &MqttClient,
    tree: &mut [&mut NodeProc; 3],
    serial: &mut u32,
    name: &str,
) {
    for n in tree.iter_mut() {
        assert!(n.proc.is_alive(), "{name}: {} died", n.id);
        let err = n.proc.stderr();
        assert!(
            !err.contains("panicked"),
            "{name}: {} panicked:\n{err}",
            n.id
        );
    }
    let [gc, rc, lc] = tree;
    let (gc, rc, lc) = (&**gc, &**rc, &**lc);
    *serial += 1;
    let mac = format!("02:00:00:01:{:02x}:{:02x}", *serial / 256, *serial % 256);
    let lc_accepted = num(&status(lc).await, &["received", "accepted"]).unwrap_or(0);
    let beats = beats_of(&status(gc).await, &rc.id);
    let good = signed_report(lc, &rc.id, &mac);
    tokio::time::timeout(
        CASE_TIMEOUT,
        ops.publish_confirmed(
            format!("pdsno/discovery/zone-A/{}", lc.id),
            good.to_json_bytes(),
            1,
            false,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: publishing a good report hangs"))
    .expect("publish");
    eventually(
        &format!("{name}: a good report still applied"),
        WAIT,
        || {
            let ok = nib(rc).device(&mac).expect("row").is_some();
            async move { ok }
        },
    )
    .await;
    eventually(
        &format!("{name}: the LC still takes its acknowledgements"),
        WAIT,
        || async move { num(&status(lc).await, &["received", "accepted"]).unwrap_or(0) > lc_accepted },
    )
    .await;
    eventually(
        &format!("{name}: the GC still records heartbeats"),
        WAIT,
        || async move { beats_of(&status(gc).await, &rc.id) > beats },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_bad_envelopes_are_refused_counted_and_survived() {
    let lab = Lab::new();
    let mut gc = lab.global(&["--user", "ops:ops-password"]);
    let mut rc = lab.child(
        "regional",
        "temp-rc-bad",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.2"],
    );
    let mut lc = lab.child(
        "local",
        "temp-lc-bad",
        &rc,
        "zone-A",
        &[
            "--heartbeat-interval",
            "0.2",
            "--discovery-interval",
            "3600",
        ],
    );
    lc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    rc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    lc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    let ops = operator(gc.mqtt.expect("embedded broker")).await;
    let mut serial = 0u32;
    tree_healthy(
        &ops,
        &mut [&mut gc, &mut rc, &mut lc],
        &mut serial,
        "before any case",
    )
    .await;

    let cases = mqtt_cases(&gc, &rc, &lc);
    // Pinned: a case removed (or added) must change this number on purpose.
    assert_eq!(cases.len(), 32, "MQTT cases");
    for (i, case) in cases.into_iter().enumerate() {
        let name = format!("MQTT case {i} ({} on {})", case.guards, case.topic);
        let before = [
            rejections(&status(&gc).await),
            rejections(&status(&rc).await),
            rejections(&status(&lc).await),
        ];
        tokio::time::timeout(
            CASE_TIMEOUT,
            ops.publish_confirmed(case.topic.clone(), case.payload, 1, false),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: publishing hangs"))
        .unwrap_or_else(|e| panic!("{name}: publish: {e}"));
        for (who, reason) in &case.counted {
            let (node, idx) = match who {
                Who::Gc => (&gc, 0usize),
                Who::Rc => (&rc, 1),
                Who::Lc => (&lc, 2),
            };
            let was = before[idx]
                .get(*reason)
                .and_then(Value::as_u64)
                .unwrap_or(0);
            eventually(
                &format!("{name}: counted as {reason} at {who:?}"),
                CASE_TIMEOUT,
                || async move {
                    rejections(&status(node).await)
                        .get(*reason)
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        > was
                },
            )
            .await;
        }
        if case.counted.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (n, b) in [(&gc, &before[0]), (&rc, &before[1]), (&lc, &before[2])] {
                let now = rejections(&status(n).await);
                assert_eq!(
                    total(&now),
                    total(b),
                    "{name}: {} consumed a topic it does not listen to: {now:?}",
                    n.id
                );
            }
        }
        tree_healthy(&ops, &mut [&mut gc, &mut rc, &mut lc], &mut serial, &name).await;
    }
    ops.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// A child's heartbeat announcing an absurd interval: the parent's liveness arithmetic
// (interval x 3 + 1 s) must not overflow, whatever an authenticated child claims.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_announcing_an_absurd_interval_does_not_break_liveness() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let me = admit_insider(&lab, &gc, "temp-interval-insider").await;
    // interval_ms near u64::MAX overflows `interval * 3`; one near u64::MAX / 3 overflows the
    // chrono addition that follows (in release builds too).
    for interval in [u64::MAX, 3_100_000_000_000_000_000] {
        let mut hb = me.heartbeat(&gc.id);
        hb.payload.insert("interval_ms".into(), interval.into());
        let hb = me.sign(hb);
        let r = post(gc.rest, "/message/heartbeat", &hb.to_json_bytes()).await;
        assert!(
            r.status == 200 || r.status == 400,
            "interval_ms={interval}: {r:?}"
        );
    }
    // The liveness reporter runs every 500 ms; give it a few rounds.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let err = gc.proc.stderr();
    assert!(
        !err.contains("panicked"),
        "a child's heartbeat field panicked the liveness code:\n{err}"
    );
    let key = pdsno_node::admin::read_key(&gc.data_dir).expect("admin key");
    let st = pdsno_node::admin::call(
        &gc.grpc_url(),
        &key,
        "status",
        &Value::Object(Map::new()),
        CASE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("the admin status call fails after the heartbeat: {e}"));
    assert!(
        st.get("children")
            .and_then(Value::as_array)
            .is_some_and(|a| a
                .iter()
                .any(|r| r.get("controller_id").and_then(Value::as_str) == Some(me.id.as_str()))),
        "{st:?}"
    );
    still_serving(&mut gc, &me, "after absurd intervals").await;
}
