//! Trust after admission between real `pdsno` processes: the pairwise key both sides
//! derive, a man in the middle swapping ephemeral keys, rotation under traffic and across
//! restarts, MQTT credentials on the embedded broker, and revocation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pdsno_node::nib::{KeyState, StateKey, StoredKey};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::HmacKey;
use pdsno_shared::signing::sign_hmac;
use pdsno_tests::{Deadline, Lab, NodeProc, Proc, field, mqtt_connect, run};

mod common;
use common::{events, nib, num, status};

const WAIT: Duration = Duration::from_secs(30);

/// The stored pairwise keys `node` holds for `peer`.
fn keys_with(node: &NodeProc, peer: &str) -> Vec<StoredKey> {
    nib(node)
        .pair_keys()
        .expect("pair keys")
        .into_iter()
        .filter(|k| k.peer_id == peer)
        .collect()
}

fn current_key(node: &NodeProc, peer: &str) -> Option<StoredKey> {
    keys_with(node, peer)
        .into_iter()
        .find(|k| k.state == KeyState::Current)
}

fn heartbeats(st: &Value) -> (u64, u64, u64) {
    let h = st.get("heartbeats").expect("heartbeats");
    let n = |k: &str| h.get(k).and_then(Value::as_u64).expect("counter");
    (n("sent"), n("acked"), n("failed"))
}

/// What a node refused so far, by reason (`received.rejected` of its status).
fn gc_refusals(st: &Value) -> Map {
    st.get("received")
        .and_then(|r| r.get("rejected"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| panic!("no received.rejected in {st:?}"))
}

/// The parent's view of `child` in its status.
fn child_row(st: &Value, child: &str) -> Value {
    st.get("children")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .find(|r| r.get("controller_id").and_then(Value::as_str) == Some(child))
        .cloned()
        .unwrap_or_else(|| panic!("{child} not among the children: {st:?}"))
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the CLI to completion; returns (exit code, stdout, stderr).
fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        args,
        Duration::from_secs(60),
    )
}

/// A HEARTBEAT from `from` to `to`, signed by the caller.
fn heartbeat(from: &str, to: &str, key: &HmacKey, key_id: &str) -> Envelope {
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let now = chrono::Utc::now();
    let mut e = Envelope::new(MessageType::Heartbeat, from, to, p, now);
    sign_hmac(&mut e, key, Some(key_id), now);
    e
}

/// True once the broker has closed `s` (EOF or reset).
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn key_lines(p: &Proc) -> Vec<String> {
    p.lines()
        .into_iter()
        .filter(|l| l.starts_with("key "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pair_derives_the_same_key_and_signs_with_it() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let mut rc = lab.child(
        "regional",
        "temp-rc-a",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    let mut lc = lab.child(
        "local",
        "temp-lc-a1",
        &rc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    let rc_line = rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let lc_line = lc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    assert_eq!(field(&rc_line, "peer").as_deref(), Some(gc.id.as_str()));
    assert_eq!(field(&lc_line, "peer").as_deref(), Some(rc.id.as_str()));

    for (child, parent, line) in [(&rc, &gc, &rc_line), (&lc, &rc, &lc_line)] {
        let kid = field(line, "id").expect("key id");
        // The name is key_{min}_{max}.N over the two controller ids.
        let (a, b) = if child.id < parent.id {
            (&child.id, &parent.id)
        } else {
            (&parent.id, &child.id)
        };
        assert!(
            kid.starts_with(&format!("key_{a}_{b}")),
            "{kid} is not named after the pair"
        );
        let mine = current_key(child, &parent.id).expect("the child's current key");
        assert_eq!(mine.key_id, kid);
        // The parent confirms the key once the child has used it; then both sign with it.
        let deadline = Instant::now() + WAIT;
        let theirs = loop {
            if let Some(k) = current_key(parent, &child.id) {
                break k;
            }
            assert!(
                Instant::now() < deadline,
                "the parent never confirmed {kid}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(theirs.key_id, kid);
        assert_eq!(
            theirs.key.expose_bytes(),
            mine.key.expose_bytes(),
            "both ends must hold the same key material"
        );
        // The parent sees the child's heartbeats signed with the pairwise key.
        let cid = child.id.clone();
        let kid2 = kid.clone();
        eventually("heartbeats under the pairwise key", WAIT, || {
            let cid = cid.clone();
            let kid2 = kid2.clone();
            async move {
                let row = child_row(&status(parent).await, &cid);
                row.get("last_key_id").and_then(Value::as_str) == Some(kid2.as_str())
                    && row.get("heartbeats").and_then(Value::as_u64).unwrap_or(0) > 0
            }
        })
        .await;
        let (sent, acked, failed) = heartbeats(&status(child).await);
        assert!(acked > 0 && acked <= sent, "sent {sent} acked {acked}");
        assert_eq!(failed, 0, "no heartbeat may be refused");

        // A message under the pair's key verifies at the parent; a different key with the
        // same key id does not.
        let link = ParentLink::new(&parent.grpc_url()).expect("url");
        link.exchange(&heartbeat(&child.id, &parent.id, &mine.key, &kid))
            .await
            .expect("the pairwise key verifies");
        let wrong = HmacKey::from_bytes(&[7u8; 32]).expect("key");
        match link
            .exchange(&heartbeat(&child.id, &parent.id, &wrong, &kid))
            .await
        {
            Err(LinkError::Status { code, message }) => {
                assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
                assert!(message.contains("Invalid signature"), "{message}");
            }
            other => panic!("a wrong key was accepted: {other:?}"),
        }

        // Key material is never printed: not in output, logs, or `pdsno keys list`.
        let hex = hex::encode(mine.key.expose_bytes());
        for p in [&gc.proc, &rc.proc, &lc.proc] {
            assert!(!p.lines().join("\n").contains(&hex), "key on stdout");
            assert!(!p.stderr().contains(&hex), "key in the log");
        }
        let dir = child.data_dir.display().to_string();
        let (code, out, _) = pdsno(&["keys", "list", "--data-dir", &dir]);
        assert_eq!(code, Some(0));
        assert!(out.contains(&kid) && out.contains("current"), "{out}");
        assert!(!out.contains(&hex));
        let (code, out, _) = pdsno(&["keys", "list", "--data-dir", &dir, "--json"]);
        assert_eq!(code, Some(0));
        assert!(out.contains(&kid) && !out.contains(&hex), "{out}");
    }
}

/// A gRPC proxy between a regional controller and the GC that forwards everything, and
/// swaps the X25519 public key in key agreements (re-signing the envelope with the network
/// key, which an insider of a shared-key deployment has, but which key agreements never
/// accept; the identity signature inside the agreement would catch the swap too).
mod mitm {
    use super::*;
    use pdsno_shared::grpc::{TypedMessage, pb};
    use tonic::{Request, Response, Status};

    pub(crate) const PASS: u8 = 0;
    pub(crate) const SWAP_REQUEST: u8 = 1;
    pub(crate) const SWAP_ANSWER: u8 = 2;

    #[derive(Clone)]
    pub(crate) struct Proxy {
        pub(crate) upstream: ParentLink,
        pub(crate) mode: Arc<AtomicU8>,
        pub(crate) network_key: Arc<HmacKey>,
        /// Key agreements tampered with.
        pub(crate) tampered: Arc<AtomicU64>,
        /// Upstream refusals of tampered agreements naming a signature (the envelope's or
        /// the identity signature inside).
        pub(crate) identity_refusals: Arc<AtomicU64>,
        /// Other upstream refusals (message texts).
        pub(crate) other_refusals: Arc<std::sync::Mutex<Vec<String>>>,
    }

    fn status_of(e: LinkError) -> Status {
        match e {
            LinkError::Status { code, message } => Status::new(code, message),
            other => Status::unavailable(other.to_string()),
        }
    }

    impl Proxy {
        fn swap(&self, msg: pb::KeyAgreement) -> Result<pb::KeyAgreement, Status> {
            let mut env = msg
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let attacker = pdsno_shared::keys::base64_encode(&pdsno_shared::ids::random_bytes_32());
            env.payload.insert("public_key".into(), attacker.into());
            sign_hmac(&mut env, &self.network_key, None, chrono::Utc::now());
            self.tampered.fetch_add(1, Ordering::SeqCst);
            pb::KeyAgreement::from_envelope(&env).map_err(|e| Status::internal(e.to_string()))
        }
    }

    #[tonic::async_trait]
    impl pb::key_exchange_server::KeyExchange for Proxy {
        async fn exchange(
            &self,
            r: Request<pb::KeyAgreement>,
        ) -> Result<Response<pb::KeyAgreement>, Status> {
            let mode = self.mode.load(Ordering::SeqCst);
            let mut msg = r.into_inner();
            if mode == SWAP_REQUEST {
                msg = self.swap(msg)?;
            }
            let env = msg
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let answer = match self.upstream.key_exchange(&env).await {
                Ok(a) => a,
                Err(e) => {
                    if let LinkError::Status { message, .. } = &e {
                        if mode == SWAP_REQUEST && message.contains("signature") {
                            self.identity_refusals.fetch_add(1, Ordering::SeqCst);
                        } else {
                            self.other_refusals
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(message.clone());
                        }
                    }
                    return Err(status_of(e));
                }
            };
            let out = pb::KeyAgreement::from_envelope(&answer)
                .map_err(|e| Status::internal(e.to_string()))?;
            let out = if mode == SWAP_ANSWER {
                self.swap(out)?
            } else {
                out
            };
            Ok(Response::new(out))
        }
    }

    #[tonic::async_trait]
    impl pb::node_server::Node for Proxy {
        async fn get_info(
            &self,
            _r: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::NodeInfo>, Status> {
            self.upstream
                .info()
                .await
                .map(Response::new)
                .map_err(status_of)
        }
    }

    #[tonic::async_trait]
    impl pb::admission_server::Admission for Proxy {
        async fn request_validation(
            &self,
            r: Request<pb::ValidationRequest>,
        ) -> Result<Response<pb::AdmissionStep>, Status> {
            let env = r
                .into_inner()
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let step = self
                .upstream
                .request_validation(&env)
                .await
                .map_err(status_of)?;
            let step = match step.message_type {
                MessageType::Challenge => pb::admission_step::Step::Challenge(
                    pb::Challenge::from_envelope(&step)
                        .map_err(|e| Status::internal(e.to_string()))?,
                ),
                _ => pb::admission_step::Step::Result(
                    pb::ValidationResult::from_envelope(&step)
                        .map_err(|e| Status::internal(e.to_string()))?,
                ),
            };
            Ok(Response::new(pb::AdmissionStep { step: Some(step) }))
        }

        async fn respond_to_challenge(
            &self,
            r: Request<pb::ChallengeResponse>,
        ) -> Result<Response<pb::ValidationResult>, Status> {
            let env = r
                .into_inner()
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let res = self
                .upstream
                .respond_to_challenge(&env)
                .await
                .map_err(status_of)?;
            Ok(Response::new(
                pb::ValidationResult::from_envelope(&res)
                    .map_err(|e| Status::internal(e.to_string()))?,
            ))
        }
    }

    #[tonic::async_trait]
    impl pb::messaging_server::Messaging for Proxy {
        async fn exchange(
            &self,
            r: Request<pb::Envelope>,
        ) -> Result<Response<pb::Envelope>, Status> {
            let env = r
                .into_inner()
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let reply = self.upstream.exchange(&env).await.map_err(status_of)?;
            Ok(Response::new(match reply {
                Some(e) => pb::Envelope::from_envelope(&e),
                None => pb::Envelope::default(),
            }))
        }
    }

    pub(crate) async fn serve(p: Proxy) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::new(p.clone()))
                .add_service(pb::admission_server::AdmissionServer::new(p.clone()))
                .add_service(pb::messaging_server::MessagingServer::new(p.clone()))
                .add_service(pb::key_exchange_server::KeyExchangeServer::new(p))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        addr
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_swapping_ephemeral_keys_is_detected() {
    let lab = Lab::new();
    let secret = "shared-network-secret-for-the-lab";
    let gc = lab.global(&["--secret", secret]);
    let proxy = mitm::Proxy {
        upstream: ParentLink::new(&gc.grpc_url()).expect("url"),
        mode: Arc::new(AtomicU8::new(mitm::SWAP_REQUEST)),
        network_key: Arc::new(HmacKey::from_secret_text(secret)),
        tampered: Arc::default(),
        identity_refusals: Arc::default(),
        other_refusals: Arc::default(),
    };
    let addr = mitm::serve(proxy.clone()).await;
    let token = lab.token("temp-rc-m", "zone-A", "regional");
    let url = format!("http://{addr}");
    let p = lab.spawn(
        "regional",
        "temp-rc-m",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--temp-id",
            "temp-rc-m",
            "--bootstrap-token",
            &token,
            "--secret",
            secret,
            "--heartbeat-interval",
            "0.2",
        ],
    );
    // Admission goes through the proxy untouched.
    let mut rc = lab.ready(p, "temp-rc-m");

    // 1. The initiator's ephemeral key is swapped: the GC refuses every attempt.
    eventually("two refused exchanges", WAIT, || {
        let n = proxy.identity_refusals.load(Ordering::SeqCst);
        async move { n >= 2 }
    })
    .await;
    let others = proxy
        .other_refusals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert!(others.is_empty(), "unexpected refusals: {others:?}");
    assert!(keys_with(&rc, &gc.id).is_empty(), "the RC must hold no key");
    assert!(keys_with(&gc, &rc.id).is_empty(), "the GC must hold no key");
    assert!(key_lines(&rc.proc).is_empty());

    // 2. The responder's ephemeral key is swapped: the RC refuses the answer.
    let before = proxy.tampered.load(Ordering::SeqCst);
    proxy.mode.store(mitm::SWAP_ANSWER, Ordering::SeqCst);
    eventually("two tampered answers", WAIT, || {
        let n = proxy.tampered.load(Ordering::SeqCst);
        async move { n >= before + 2 }
    })
    .await;
    // Let the RC process the last one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        keys_with(&rc, &gc.id).is_empty(),
        "the RC accepted a forged answer"
    );
    assert!(key_lines(&rc.proc).is_empty());
    // The GC agreed to keys, but only ever as pending: never confirmed, never used.
    let gc_keys = keys_with(&gc, &rc.id);
    assert!(!gc_keys.is_empty());
    assert!(
        gc_keys.iter().all(|k| k.state == KeyState::Pending),
        "{gc_keys:?}"
    );
    assert!(
        rc.proc.stderr().contains("signature"),
        "the RC should say why: {}",
        rc.proc.stderr()
    );

    // 3. Without the attacker the same two processes agree at once.
    proxy.mode.store(mitm::PASS, Ordering::SeqCst);
    let line = rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let kid = field(&line, "id").expect("id");
    eventually("the GC confirms the key", WAIT, || {
        let k = current_key(&gc, &rc.id).map(|k| k.key_id);
        let kid = kid.clone();
        async move { k.as_deref() == Some(kid.as_str()) }
    })
    .await;
    rc.proc.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_loses_nothing_and_old_keys_expire() {
    let lab = Lab::new();
    let grace = 3;
    let g = grace.to_string();
    let gc = lab.global(&["--key-grace", &g]);
    let rc = lab.child(
        "regional",
        "temp-rc-r",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.05", "--key-grace", &g],
    );
    let mut rc = rc;
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let first = current_key(&rc, &gc.id).expect("first key");
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    let rc_dir = rc.data_dir.display().to_string();
    let gc_dir = gc.data_dir.display().to_string();

    // The parent's own view: what it refused so far, and how many heartbeats of the RC it
    // recorded (the RC's counters only count what it wrote to its socket).
    let gc_before = status(&gc).await;
    let refused_before = gc_refusals(&gc_before);
    let recorded_before = num(&child_row(&gc_before, &rc.id), &["heartbeats"]).unwrap_or(0);

    let mut seen = vec![first.key_id.clone()];
    let mut previous = first.clone();
    for round in 0..6 {
        // Alternate the initiator: the RC asks, then the GC asks.
        let (dir, peer) = if round % 2 == 0 {
            (&rc_dir, &gc.id)
        } else {
            (&gc_dir, &rc.id)
        };
        let (code, out, err) = pdsno(&["keys", "rotate", "--peer", peer, "--data-dir", dir]);
        assert_eq!(code, Some(0), "rotate: {out} {err}");
        assert!(out.starts_with("rotated: now signing with "), "{out}");
        let now = current_key(&rc, &gc.id).expect("current");
        assert!(!seen.contains(&now.key_id), "round {round}: no new key");
        seen.push(now.key_id.clone());
        // The key just superseded still verifies during its grace period.
        link.exchange(&heartbeat(&rc.id, &gc.id, &previous.key, &previous.key_id))
            .await
            .unwrap_or_else(|e| panic!("round {round}: a key in grace was refused: {e}"));
        previous = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Heartbeats flowed the whole time, and the parent refused none of them: its refusal
    // counters did not move, it recorded the RC's heartbeats all along, and the last one it
    // recorded is signed with the newest key.
    let (sent, acked, failed) = heartbeats(&status(&rc).await);
    assert_eq!(
        failed, 0,
        "heartbeats lost during rotation ({acked}/{sent} acked)"
    );
    let newest = previous.key_id.clone();
    let rc_id = rc.id.clone();
    eventually(
        "the GC records heartbeats under the newest key",
        WAIT,
        || {
            let (gc, rc_id, newest) = (&gc, &rc_id, &newest);
            async move {
                child_row(&status(gc).await, rc_id)
                    .get("last_key_id")
                    .and_then(Value::as_str)
                    == Some(newest.as_str())
            }
        },
    )
    .await;
    let gc_after = status(&gc).await;
    assert_eq!(
        gc_refusals(&gc_after),
        refused_before,
        "the GC refused messages during the rotation"
    );
    let recorded =
        num(&child_row(&gc_after, &rc.id), &["heartbeats"]).unwrap_or(0) - recorded_before;
    assert!(
        recorded >= 20,
        "the GC recorded only {recorded} heartbeats of the RC during the rotation"
    );
    assert_eq!(
        num(&status(&rc).await, &["heartbeats", "rekeys"]),
        Some(0),
        "the RC had to re-key: its parent refused its key"
    );
    // Both ends audited the first agreement and each of the six rotations, under the key
    // ids they agreed.
    for (node, peer) in [(&gc, &rc.id), (&rc, &gc.id)] {
        let established: Vec<_> = events(node, "KEY_ESTABLISHED")
            .into_iter()
            .filter(|(e, _)| e.subject.as_deref() == Some(peer.as_str()))
            .map(|(e, _)| e.decision.unwrap_or_default())
            .collect();
        assert_eq!(established, vec![first.key_id.clone()], "{}", node.id);
        let rotated: Vec<_> = events(node, "KEY_ROTATED")
            .into_iter()
            .filter(|(e, _)| e.subject.as_deref() == Some(peer.as_str()))
            .map(|(e, _)| e.decision.unwrap_or_default())
            .collect();
        assert_eq!(rotated, seen[1..].to_vec(), "{}", node.id);
    }

    // After the grace period the first key (and the other superseded ones) stop verifying.
    tokio::time::sleep(Duration::from_secs(grace + 2)).await;
    match link
        .exchange(&heartbeat(&rc.id, &gc.id, &first.key, &first.key_id))
        .await
    {
        Err(LinkError::Status { code, message }) => {
            assert_eq!(code, tonic::Code::Unauthenticated);
            assert_eq!(
                message,
                "Invalid message signature: Invalid signature: unknown or retired key_id"
            );
        }
        other => panic!("a retired key still verifies: {other:?}"),
    }
    // Both sides dropped the retired material; the newest key still works.
    let gc_ids: Vec<String> = keys_with(&gc, &rc.id)
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert!(!gc_ids.contains(&first.key_id), "{gc_ids:?}");
    assert!(
        keys_with(&rc, &gc.id)
            .iter()
            .all(|k| k.key_id != first.key_id)
    );
    link.exchange(&heartbeat(&rc.id, &gc.id, &previous.key, &previous.key_id))
        .await
        .expect("the current key verifies");
    let (_, _, failed) = heartbeats(&status(&rc).await);
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_happens_by_itself() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let mut rc = lab.child(
        "regional",
        "temp-rc-s",
        &gc,
        "zone-A",
        &["--key-rotation", "1", "--heartbeat-interval", "0.1"],
    );
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let deadline = Instant::now() + WAIT;
    while key_lines(&rc.proc).len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", rc.proc.lines());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Those keys come from the schedule, not from re-keying after refusals (which prints
    // the same line), and the GC takes them: it refused nothing and records heartbeats
    // under the RC's current key.
    let ids: std::collections::BTreeSet<String> = key_lines(&rc.proc)
        .iter()
        .filter_map(|l| field(l, "id"))
        .collect();
    assert!(ids.len() >= 3, "{:?}", rc.proc.lines());
    let st = status(&rc).await;
    assert_eq!(num(&st, &["heartbeats", "rekeys"]), Some(0), "{st:?}");
    assert_eq!(num(&st, &["heartbeats", "failed"]), Some(0), "{st:?}");
    let rc_id = rc.id.clone();
    eventually(
        "the GC records heartbeats under the RC's current key",
        WAIT,
        || {
            let (gc, rc, rc_id) = (&gc, &rc, &rc_id);
            async move {
                let theirs = child_row(&status(gc).await, rc_id)
                    .get("last_key_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                theirs.is_some() && theirs == current_key(rc, &gc.id).map(|k| k.key_id)
            }
        },
    )
    .await;
    let gc_st = status(&gc).await;
    assert!(gc_refusals(&gc_st).is_empty(), "{gc_st:?}");
    assert!(
        num(&child_row(&gc_st, &rc.id), &["heartbeats"]).unwrap_or(0) > 0,
        "{gc_st:?}"
    );
}

/// A GC on a fixed gRPC address (so it can come back on the same one) and an RC of zone-A,
/// heartbeating every 0.1 s, that has agreed its key with it; and that address.
fn gc_and_keyed_rc(lab: &Lab, rc_name: &str) -> (NodeProc, NodeProc, String) {
    let port = pdsno_tests::free_port_for_late_server();
    let listen = format!("127.0.0.1:{port}");
    let gc = lab.global(&["--listen-grpc", &listen]);
    let mut rc = lab.child(
        "regional",
        rc_name,
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    (gc, rc, listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_interrupted_by_restarts_completes() {
    let lab = Lab::new();
    let (mut gc, mut rc, listen) = gc_and_keyed_rc(&lab, "temp-rc-x");
    let first = current_key(&rc, &gc.id).expect("first key");
    let gc_id = gc.id.clone();

    // The GC goes away; the operator asks for a rotation; then the RC dies too.
    gc.proc.kill();
    let rc_dir = rc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&[
        "keys",
        "rotate",
        "--peer",
        &gc_id,
        "--no-wait",
        "--data-dir",
        &rc_dir,
    ]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("requested"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    rc.proc.kill();
    assert_eq!(
        nib(&rc).rotation_requests().expect("requests"),
        vec![gc_id.clone()],
        "the request must survive the crash"
    );
    assert_eq!(current_key(&rc, &gc_id).expect("key").key_id, first.key_id);

    // Both come back: the rotation completes without anyone asking again.
    let gc2 = lab.global(&["--listen-grpc", &listen]);
    let p = lab.spawn("regional", "temp-rc-x", &["--heartbeat-interval", "0.1"]);
    let mut rc2 = lab.ready(p, "temp-rc-x");
    let line = rc2.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let kid = field(&line, "id").expect("id");
    assert_ne!(kid, first.key_id);
    assert!(nib(&rc2).rotation_requests().expect("requests").is_empty());
    assert_eq!(current_key(&rc2, &gc_id).expect("key").key_id, kid);
    let rc_id = rc2.id.clone();
    let k2 = kid.clone();
    eventually("the GC uses the new key", WAIT, || {
        let rc_id = rc_id.clone();
        let k2 = k2.clone();
        let gc2 = &gc2;
        async move {
            child_row(&status(gc2).await, &rc_id)
                .get("last_key_id")
                .and_then(Value::as_str)
                == Some(k2.as_str())
        }
    })
    .await;
    assert_eq!(
        current_key(&gc2, &rc_id).map(|k| k.key_id).as_deref(),
        Some(kid.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_credentials_are_issued_checked_and_revoked() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let broker = gc.mqtt.expect("embedded broker");
    let mut rc = lab.child(
        "regional",
        "temp-rc-c",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    let mut lc = lab.child(
        "local",
        "temp-lc-c1",
        &rc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    lc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let credential = |n: &NodeProc| -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(c) = nib(n).state_str(StateKey::MqttCredential).expect("state") {
                return c;
            }
            assert!(Instant::now() < deadline, "{} got no MQTT credential", n.id);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let rc_cred = credential(&rc);
    let lc_cred = credential(&lc);
    assert_ne!(rc_cred, lc_cred);

    // The broker refuses anything but an issued credential presented by its controller.
    let refused = [
        ("no credentials", rc.id.as_str(), None, None),
        ("user name only", rc.id.as_str(), Some(rc.id.as_str()), None),
        (
            "wrong password",
            rc.id.as_str(),
            Some(rc.id.as_str()),
            Some(b"0000".as_slice()),
        ),
        (
            "another controller's password",
            rc.id.as_str(),
            Some(rc.id.as_str()),
            Some(lc_cred.as_bytes()),
        ),
        (
            "client id is not the user name",
            "someone-else",
            Some(rc.id.as_str()),
            Some(rc_cred.as_bytes()),
        ),
        (
            "unknown controller",
            "local_cntl_zone-A_99",
            Some("local_cntl_zone-A_99"),
            Some(rc_cred.as_bytes()),
        ),
    ];
    for (what, cid, user, pass) in refused {
        let (code, _s) = mqtt_connect(broker, cid, user, pass);
        assert!(
            code == 4 || code == 5,
            "{what}: CONNACK {code}, expected a refusal"
        );
    }
    let (code, _rc_session) = mqtt_connect(broker, &rc.id, Some(&rc.id), Some(rc_cred.as_bytes()));
    assert_eq!(code, 0, "the RC's issued credential");

    // Someone holds the LC's credentials (MQTT password, pairwise key) and the LC is
    // stopped: no real LC reconnects under its client id and takes the session over, so
    // only the revocation can close it.
    let lc_key = current_key(&lc, &rc.id).expect("LC key");
    lc.proc.kill();
    let (code, mut lc_session) =
        mqtt_connect(broker, &lc.id, Some(&lc.id), Some(lc_cred.as_bytes()));
    assert_eq!(
        code, 0,
        "the LC's credential (issued by the GC at the RC's request)"
    );
    assert!(
        !closed_by_peer(&mut lc_session, Duration::from_millis(500)),
        "the session was closed before any revocation"
    );

    // Revoke the LC at the RC that admitted it.
    let rc_dir = rc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["controller", "revoke", &lc.id, "--data-dir", &rc_dir]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains(&format!("revoked {}", lc.id)), "{out}");

    // Its live session is closed, and it cannot come back.
    assert!(
        closed_by_peer(&mut lc_session, Duration::from_secs(10)),
        "the revoked controller's session stays open"
    );
    let (code, _s) = mqtt_connect(broker, &lc.id, Some(&lc.id), Some(lc_cred.as_bytes()));
    assert!(
        matches!(code, 4 | 5),
        "a revoked credential connected: {code}"
    );
    // No message of it is accepted any more, whatever key it signs with.
    assert!(
        keys_with(&rc, &lc.id).is_empty(),
        "the RC kept the LC's keys"
    );
    let link = ParentLink::new(&rc.grpc_url()).expect("url");
    match link
        .exchange(&heartbeat(&lc.id, &rc.id, &lc_key.key, &lc_key.key_id))
        .await
    {
        Err(LinkError::Status { code, .. }) => {
            assert!(
                matches!(
                    code,
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ),
                "{code:?}"
            );
        }
        other => panic!("a revoked controller's message was accepted: {other:?}"),
    }
    // The revoked controller, started again, is told with a notice the RC signs, and
    // stops: exit code 5, the reason and what to do in its log.
    let mut again = lab.spawn("local", "temp-lc-c1", &["--heartbeat-interval", "0.1"]);
    let deadline = Deadline::after(WAIT, "the revoked LC to stop");
    let code = loop {
        if !again.is_alive() {
            break again.terminate(Duration::from_secs(1));
        }
        deadline.check();
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let err = again.stderr();
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains(&format!("controller {} was revoked by {}", lc.id, rc.id))
            && err.contains("new --data-dir"),
        "{err}"
    );
    let row = child_row(&status(&rc).await, &lc.id);
    assert_eq!(row.get("status").and_then(Value::as_str), Some("revoked"));
    let revoked = events(&rc, "CONTROLLER_REVOKED");
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].0.subject.as_deref(), Some(lc.id.as_str()));
    assert_eq!(revoked[0].0.actor, rc.id);

    // The RC itself is unaffected.
    let (code, _s) = mqtt_connect(broker, &rc.id, Some(&rc.id), Some(rc_cred.as_bytes()));
    assert_eq!(code, 0);
    // Revoking at the wrong node is refused with the right pointer.
    let gc_dir = gc.data_dir.display().to_string();
    let (code, _, err) = pdsno(&["controller", "revoke", &lc.id, "--data-dir", &gc_dir]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("revoke it there") || err.contains("no controller"),
        "{err}"
    );
}

/// One raw MQTT 3.1.1 packet: `first` byte, then `body` (short).
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first, u8::try_from(body.len()).expect("short body")];
    p.extend_from_slice(body);
    p
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The embedded broker holds each controller to its own topics: an LC's credential cannot
/// overwrite the retained regional policy, read the whole tree, or leave a will on another
/// controller's status topic; a read-only account reads but cannot publish; and a working
/// topology never trips the rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_stay_inside_their_topic_rights() {
    let lab = Lab::new();
    let gc = lab.global(&["--reader", "mon:mon-password"]);
    let broker = gc.mqtt.expect("embedded broker");
    let mut rc = lab.child("regional", "temp-rc-t", &gc, "zone-A", &[]);
    let mut lc = lab.child("local", "temp-lc-t", &rc, "zone-A", &[]);
    rc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 republished"));
    lc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 applied"));
    let cred = nib(&lc)
        .state_str(StateKey::MqttCredential)
        .expect("state")
        .expect("the LC has an MQTT credential");
    // Stop the LC so its credential can be played without a session take-over fight.
    lc.proc.kill();
    let as_lc = || mqtt_connect(broker, &lc.id, Some(&lc.id), Some(cred.as_bytes()));

    // Overwriting the retained regional policy: closed, not stored.
    let (code, mut s) = as_lc();
    assert_eq!(code, 0);
    let mut body = Vec::new();
    mqtt_str(&mut body, "pdsno/policy/zone-A");
    body.extend_from_slice(b"{\"forged\":true}");
    s.write_all(&packet(0x31, &body)).expect("PUBLISH");
    assert!(
        closed_by_peer(&mut s, WAIT),
        "a forbidden PUBLISH left the LC connected"
    );

    // Reading the whole tree: closed.
    let (code, mut s) = as_lc();
    assert_eq!(code, 0);
    let mut body = vec![0x00, 0x01];
    mqtt_str(&mut body, "pdsno/#");
    body.push(0);
    s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
    assert!(
        closed_by_peer(&mut s, WAIT),
        "a forbidden SUBSCRIBE left the LC connected"
    );

    // A will on the RC's status topic: refused at CONNECT.
    let connect = pdsno_broker::codec::Connect {
        version: pdsno_broker::codec::Version::V311,
        clean: true,
        keep_alive: 30,
        properties: Vec::new(),
        client_id: lc.id.clone(),
        will: Some(pdsno_broker::codec::Will {
            properties: Vec::new(),
            topic: format!("pdsno/status/{}", rc.id),
            payload: b"{}".to_vec(),
            qos: 0,
            retain: true,
        }),
        username: Some(lc.id.clone()),
        password: Some(cred.as_bytes().to_vec()),
        auth_method: false,
    };
    let mut s = TcpStream::connect(broker).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(&connect.encode()).expect("CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05], "not authorized");

    // Its own status topic is fine (QoS 1: PUBACK).
    let (code, mut s) = as_lc();
    assert_eq!(code, 0);
    let mut body = Vec::new();
    mqtt_str(&mut body, &format!("pdsno/status/{}", lc.id));
    body.extend_from_slice(&[0x00, 0x05]);
    body.extend_from_slice(b"{}");
    s.write_all(&packet(0x32, &body)).expect("PUBLISH");
    let mut puback = [0u8; 4];
    s.read_exact(&mut puback).expect("PUBACK");
    assert_eq!(puback, [0x40, 0x02, 0x00, 0x05]);

    // A read-only account cannot publish either.
    let (code, mut s) = mqtt_connect(broker, "mon-1", Some("mon"), Some(b"mon-password"));
    assert_eq!(code, 0);
    let mut body = Vec::new();
    mqtt_str(&mut body, "pdsno/policy/zone-A");
    body.extend_from_slice(b"{}");
    s.write_all(&packet(0x31, &body)).expect("PUBLISH");
    assert!(
        closed_by_peer(&mut s, WAIT),
        "a read-only account published"
    );

    // It reads: the retained regional policy is still the RC's signed copy.
    let (code, mut s) = mqtt_connect(broker, "mon-2", Some("mon"), Some(b"mon-password"));
    assert_eq!(code, 0);
    let mut body = vec![0x00, 0x01];
    mqtt_str(&mut body, "pdsno/policy/zone-A");
    body.push(0);
    s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Deadline::after(WAIT, "the retained policy, whole");
    let retained = loop {
        deadline.check();
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
        if let Some(start) = got.iter().position(|b| *b == b'{')
            && let Ok(v) = pdsno_shared::json::parse(&got[start..])
        {
            break v;
        }
    };
    assert_eq!(
        retained.get("message_type").and_then(Value::as_str),
        Some("POLICY_UPDATE"),
        "{retained:?}"
    );
    assert_eq!(
        retained.get("sender_id").and_then(Value::as_str),
        Some(rc.id.as_str())
    );

    // Exactly the four offences were counted: the running topology tripped nothing.
    let text = common::metrics(&gc);
    assert!(
        text.contains("pdsno_broker_refused_total{reason=\"not_authorized\"} 4\n"),
        "{text}"
    );
}

#[test]
fn every_example_config_checks() {
    let dir = pdsno_tests::workspace_root().join("deploy/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/config") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let tier = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_owned();
        // As on a host: the example's /etc/pdsno and /var/lib/pdsno under a temporary root.
        let root = tempfile::tempdir().expect("tmp");
        let r = root.path().display().to_string();
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("/etc/pdsno/", &format!("{r}/etc/"))
            .replace("/var/lib/pdsno/", &format!("{r}/var/"));
        let conf = root.path().join(format!("{tier}.toml"));
        std::fs::write(&conf, &text).expect("write");
        let p = conf.display().to_string();
        // Before its secret files exist, the check says which one is missing.
        let (code, out, err) = pdsno(&[&tier, "--config", &p, "--check-config"]);
        assert_eq!(code, Some(2), "{p}: {out} {err}");
        assert!(err.contains("does not exist"), "{p}: {err}");
        std::fs::create_dir_all(root.path().join("etc")).expect("etc");
        for (key, content) in [
            ("bootstrap_secret_file", "a-bootstrap-secret-0123456789"),
            ("bootstrap_token_file", "a-token"),
        ] {
            if let Some(line) = text.lines().find(|l| l.starts_with(key)) {
                let f = line.split('"').nth(1).expect("quoted path");
                pdsno_tests::write_private(std::path::Path::new(f), content);
            }
        }
        let (code, out, err) = pdsno(&[&tier, "--config", &p, "--check-config"]);
        assert_eq!(code, Some(0), "{p}: {out} {err}");
        assert!(out.contains("configuration OK"), "{p}: {out}");
        if tier != "global" {
            assert!(out.contains("first start:"), "{p}: {out}");
        }
        n += 1;
    }
    assert_eq!(n, 3, "one example per tier");

    // And a broken one fails with the key path.
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            "unknown key",
            "data_dir = \"/x\"\nlisten_grcp = \"0.0.0.0:1\"\n",
            "listen_grcp",
        ),
        (
            "wrong type",
            "data_dir = \"/x\"\nheartbeat_interval = \"ten\"\n",
            "heartbeat_interval",
        ),
        (
            "bad address",
            "data_dir = \"/x\"\nlisten_grpc = \"nowhere\"\n",
            "listen_grpc",
        ),
    ];
    for (what, text, key) in cases {
        let f = tmp.path().join("bad.toml");
        std::fs::write(&f, text).expect("write");
        let fp = f.display().to_string();
        let (code, out, err) = pdsno(&["global", "--config", &fp, "--check-config"]);
        assert_ne!(code, Some(0), "{what}: accepted: {out}");
        assert!(
            err.contains(key),
            "{what}: the error must name {key}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_regional_controller_at_the_gc_cuts_it_off() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let broker = gc.mqtt.expect("embedded broker");
    let mut rc = lab.child(
        "regional",
        "temp-rc-v",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.1"],
    );
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let deadline = Deadline::after(WAIT, "the RC's MQTT credential");
    let cred = loop {
        if let Some(c) = nib(&rc).state_str(StateKey::MqttCredential).expect("state") {
            break c;
        }
        deadline.check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The RC is stopped and someone holds its credentials: no real RC can take its
    // session over, so only the revocation can close it.
    let rc_key = current_key(&rc, &gc.id).expect("RC key");
    rc.proc.kill();
    let (code, mut session) = mqtt_connect(broker, &rc.id, Some(&rc.id), Some(cred.as_bytes()));
    assert_eq!(code, 0);
    assert!(
        !closed_by_peer(&mut session, Duration::from_millis(500)),
        "the session was closed before any revocation"
    );
    let gc_dir = gc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["controller", "revoke", &rc.id, "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        closed_by_peer(&mut session, Duration::from_secs(10)),
        "the revoked controller's session stays open"
    );
    let (code, _s) = mqtt_connect(broker, &rc.id, Some(&rc.id), Some(cred.as_bytes()));
    assert!(
        matches!(code, 4 | 5),
        "a revoked credential connected: {code}"
    );
    assert!(keys_with(&gc, &rc.id).is_empty());
    // The GC audited the revocation, and the one session it closed (the attacker's).
    let revoked = events(&gc, "CONTROLLER_REVOKED");
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].0.subject.as_deref(), Some(rc.id.as_str()));
    assert_eq!(
        num(&revoked[0].1, &["mqtt_sessions_closed"]),
        Some(1),
        "{revoked:?}"
    );
    // A heartbeat signed with its pairwise key is refused.
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    match link
        .exchange(&heartbeat(&rc.id, &gc.id, &rc_key.key, &rc_key.key_id))
        .await
    {
        Err(LinkError::Status { code, .. }) => assert!(
            matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ),
            "{code:?}"
        ),
        other => panic!("a revoked controller's message was accepted: {other:?}"),
    }
    // Started again, it is refused, and the notice stops it (exit code 5).
    let mut again = lab.spawn("regional", "temp-rc-v", &["--heartbeat-interval", "0.1"]);
    let deadline = Deadline::after(WAIT, "the revoked RC to stop");
    while again.is_alive() {
        deadline.check();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = again.stderr();
    assert_eq!(again.terminate(Duration::from_secs(1)), Some(5), "{err}");
    assert!(
        err.contains(&format!("controller {} was revoked by {}", rc.id, gc.id)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_lost_the_pair_key_gets_a_new_one() {
    let lab = Lab::new();
    let (mut gc, rc, listen) = gc_and_keyed_rc(&lab, "temp-rc-l");
    let first = current_key(&rc, &gc.id).expect("key");
    // The GC comes back from an older copy of its state: it no longer knows the key.
    gc.proc.kill();
    let removed = nib(&gc).delete_pair_keys(&rc.id).expect("delete");
    assert!(removed > 0);
    let gc = lab.global(&["--listen-grpc", &listen]);
    // The RC notices its heartbeats are refused and agrees a new key, signed with its
    // identity; heartbeats flow again under it.
    let deadline = Instant::now() + WAIT;
    while key_lines(&rc.proc).len() < 2 {
        assert!(Instant::now() < deadline, "no re-key: {}", rc.proc.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = current_key(&rc, &gc.id).expect("new key");
    assert_ne!(now.key_id, first.key_id);
    let rc_id = rc.id.clone();
    let kid = now.key_id.clone();
    eventually("heartbeats under the new key", WAIT, || {
        let rc_id = rc_id.clone();
        let kid = kid.clone();
        let gc = &gc;
        async move {
            child_row(&status(gc).await, &rc_id)
                .get("last_key_id")
                .and_then(Value::as_str)
                == Some(kid.as_str())
        }
    })
    .await;
    let st = status(&rc).await;
    let rekeys = st
        .get("heartbeats")
        .and_then(|h| h.get("rekeys"))
        .and_then(Value::as_u64);
    assert_eq!(rekeys, Some(1));
}

/// `POST path` with a JSON body over plain HTTP/1.1; returns (status, body).
fn http_post(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let status: u16 = std::str::from_utf8(&out[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, out[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exchange_over_the_rest_compat_route() {
    use pdsno_shared::keys::PublicKey;
    use pdsno_shared::keyx::{self, KeyAgreement};

    let lab = Lab::new();
    let gc = lab.global(&[]);
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    // Admission over gRPC by a controller the test plays itself.
    let child = common::RawChild::new(&lab, "temp-rest-kx", "zone-A", "regional");
    let ch = link
        .request_validation(&child.request(&gc.id, 0))
        .await
        .expect("challenge");
    let res = link
        .respond_to_challenge(&child.response(&ch, |_| {}))
        .await
        .expect("result");
    let me = res.payload["assigned_id"]
        .as_str()
        .expect("assigned id")
        .to_owned();
    let gc_key = PublicKey::from_base64(&link.info().await.expect("info").public_key).expect("key");

    // KEY_EXCHANGE_INIT over REST, signed with our identity key.
    let key_id = keyx::key_id(&me, &gc.id, 1);
    let now = chrono::Utc::now();
    let pending = keyx::offer(&child.key, &me, &gc.id, &key_id, now);
    let mut init = Envelope::new(
        MessageType::KeyExchangeInit,
        me.clone(),
        gc.id.clone(),
        Map::new(),
        now,
    )
    .with_typed_payload(pending.offer())
    .expect("payload");
    pdsno_shared::signing::sign_ed25519(&mut init, &child.key, None, now);
    let (status, body) = http_post(gc.rest, "/message/key_exchange_init", &init.to_json_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer_env = Envelope::from_slice(&body).expect("an envelope");
    assert_eq!(answer_env.message_type, MessageType::KeyExchangeResponse);
    assert_eq!(
        answer_env.correlation_id.as_deref(),
        Some(init.message_id.as_str())
    );
    let answer: KeyAgreement = answer_env.payload_as().expect("agreement");
    let key = keyx::finish(&pending, &gc_key, &answer, chrono::Utc::now()).expect("finish");

    // The same request again is a replay.
    let (status, body) = http_post(gc.rest, "/message/key_exchange_init", &init.to_json_bytes());
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));

    // A HEARTBEAT under the agreed key over REST: accepted, which confirms the key at the GC.
    let hb = heartbeat(&me, &gc.id, &key, &key_id);
    let (status, body) = http_post(gc.rest, "/message/heartbeat", &hb.to_json_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stored = current_key(&gc, &me).expect("confirmed at the GC");
    assert_eq!(stored.key_id, key_id);
    assert_eq!(stored.key.expose_bytes(), key.expose_bytes());

    // The MQTT credential came wrapped under the new key and opens the embedded broker.
    let wrapped = answer
        .extra
        .get("mqtt_credential")
        .and_then(Value::as_str)
        .expect("wrapped credential");
    let secret = keyx::unwrap(&key, &key_id, "mqtt", wrapped).expect("unwrap");
    let password = hex::encode(*secret);
    let (code, _s) = mqtt_connect(
        gc.mqtt.expect("broker"),
        &me,
        Some(&me),
        Some(password.as_bytes()),
    );
    assert_eq!(code, 0);

    // A tampered offer over REST is refused, naming the identity signature.
    let mut bad = keyx::offer(
        &child.key,
        &me,
        &gc.id,
        &keyx::key_id(&me, &gc.id, 2),
        chrono::Utc::now(),
    )
    .offer()
    .clone();
    bad.public_key = pdsno_shared::keys::base64_encode(&[9u8; 32]);
    let now = chrono::Utc::now();
    let mut env = Envelope::new(
        MessageType::KeyExchangeInit,
        me.clone(),
        gc.id.clone(),
        Map::new(),
        now,
    )
    .with_typed_payload(&bad)
    .expect("payload");
    pdsno_shared::signing::sign_ed25519(&mut env, &child.key, None, now);
    let (status, body) = http_post(gc.rest, "/message/key_exchange_init", &env.to_json_bytes());
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("identity signature"));
}
