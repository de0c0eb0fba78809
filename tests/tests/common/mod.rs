//! Pieces shared by the integration tests: a child played by the test itself.
#![allow(dead_code, unreachable_pub)]

use pdsno_node::transport::parent::ParentLink;
use pdsno_shared::bootstrap::admission_key;
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing, base64_encode};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{Verifier, VerifyKeys, sign_hmac};
use pdsno_shared::time::format_iso;
use pdsno_tests::Lab;

/// A child played by the test itself, speaking the wire protocol directly.
pub struct RawChild {
    pub temp_id: String,
    pub region: String,
    pub kind: String,
    pub token: String,
    pub key: IdentityKey,
}

impl RawChild {
    pub fn new(lab: &Lab, temp_id: &str, region: &str, kind: &str) -> Self {
        RawChild {
            temp_id: temp_id.into(),
            region: region.into(),
            kind: kind.into(),
            token: lab.token(temp_id, region, kind),
            key: IdentityKey::generate(),
        }
    }

    pub fn hkey(&self) -> HmacKey {
        admission_key(&self.token)
    }

    pub fn request(&self, parent: &str, timestamp_offset: i64) -> Envelope {
        let mut p = Map::new();
        p.insert("temp_id".into(), self.temp_id.clone().into());
        p.insert("controller_type".into(), self.kind.clone().into());
        p.insert("region".into(), self.region.clone().into());
        p.insert("public_key".into(), self.key.public().to_base64().into());
        p.insert("bootstrap_token".into(), self.token.clone().into());
        let now = chrono::Utc::now();
        let mut e = Envelope::new(
            MessageType::ValidationRequest,
            self.temp_id.clone(),
            parent,
            p,
            now,
        );
        e.timestamp = format_iso(now + chrono::Duration::seconds(timestamp_offset));
        sign_hmac(&mut e, &self.hkey(), None, now);
        e
    }

    pub fn response(&self, challenge: &Envelope, tamper: impl FnOnce(&mut Map)) -> Envelope {
        let nonce =
            hex::decode(challenge.payload["nonce"].as_str().unwrap_or_default()).expect("nonce");
        let mut p = Map::new();
        p.insert(
            "challenge_id".into(),
            challenge.payload["challenge_id"].clone(),
        );
        p.insert("temp_id".into(), self.temp_id.clone().into());
        p.insert(
            "signed_nonce".into(),
            base64_encode(&self.key.sign(&nonce)).into(),
        );
        tamper(&mut p);
        let mut e = challenge.reply(
            MessageType::ChallengeResponse,
            self.temp_id.clone(),
            p,
            chrono::Utc::now(),
        );
        sign_hmac(&mut e, &self.hkey(), None, chrono::Utc::now());
        e
    }

    /// Checks the parent signed its reply with our admission key, for us.
    pub fn check(&self, reply: &Envelope) {
        let ring = KeyRing::single(None, self.hkey(), chrono::Utc::now());
        let v = Verifier::new(MemoryNonceStore::new());
        v.verify(
            reply,
            VerifyKeys {
                hmac: Some(&ring),
                ed25519: None,
            },
            None,
            chrono::Utc::now(),
        )
        .expect("the parent's reply verifies under the admission key");
        assert_eq!(reply.recipient_id, self.temp_id);
    }
}

pub fn outcome(e: &Envelope) -> (String, String) {
    let s = |k: &str| {
        e.payload
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    match e.message_type {
        MessageType::Challenge => ("CHALLENGE".into(), String::new()),
        _ => (s("status"), s("reason")),
    }
}

/// Runs a full handshake, tampering the response; returns (status, reason).
pub async fn handshake(
    link: &ParentLink,
    parent: &str,
    child: &RawChild,
    tamper: impl FnOnce(&mut Map),
) -> (String, String) {
    let ch = link
        .request_validation(&child.request(parent, 0))
        .await
        .expect("request");
    child.check(&ch);
    if ch.message_type != MessageType::Challenge {
        return outcome(&ch);
    }
    let res = link
        .respond_to_challenge(&child.response(&ch, tamper))
        .await
        .expect("response");
    child.check(&res);
    outcome(&res)
}

/// The node's status through its admin API.
pub async fn status(node: &pdsno_tests::NodeProc) -> Value {
    let key = pdsno_node::admin::read_key(&node.data_dir).expect("admin key");
    pdsno_node::admin::call(
        &node.grpc_url(),
        &key,
        "status",
        &Value::Object(Map::new()),
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("status")
}

/// The node's `/metrics` text (OpenMetrics), over plain HTTP.
pub fn metrics(node: &pdsno_tests::NodeProc) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(node.rest).expect("connect to REST");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Polls `f` every 50 ms until it holds.
///
/// # Panics
/// With `what` when `timeout` passes first.
pub async fn eventually<F, Fut>(what: &str, timeout: std::time::Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The node's NIB (opened next to the running process; SQLite WAL allows it).
pub fn nib(node: &pdsno_tests::NodeProc) -> pdsno_node::nib::Nib {
    pdsno_node::nib::Nib::open(node.data_dir.join("nib.db")).expect("open the node's NIB")
}

/// A number at a JSON path in a status (`None` when absent).
pub fn num(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_u64()
}

/// The node's audit events of `event_type`, oldest first, with their details parsed.
pub fn events(
    node: &pdsno_tests::NodeProc,
    event_type: &str,
) -> Vec<(pdsno_node::nib::EventRow, Value)> {
    nib(node)
        .events(0, 100_000)
        .expect("the node's audit events")
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .map(|e| {
            let details = pdsno_shared::json::parse(e.details.as_bytes()).expect("details");
            (e, details)
        })
        .collect()
}
