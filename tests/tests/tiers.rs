//! Admission between real `pdsno` processes over gRPC: the happy path through all three
//! tiers, every reject reason, token reuse, restarts, a child that starts before its
//! parent, and children refusing forged answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pdsno_node::nib::Nib;
use pdsno_node::transport::parent::ParentLink;
use pdsno_shared::bootstrap::admission_key;
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::grpc::{TypedMessage, pb};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::{IdentityKey, base64_encode};
use pdsno_shared::signing::sign_hmac;
use pdsno_shared::time::format_iso;
use pdsno_tests::{Lab, NodeProc, Proc, field};

mod common;
use common::{RawChild, handshake, outcome};

async fn info(node: &NodeProc) -> pb::NodeInfo {
    ParentLink::new(&node.grpc_url())
        .expect("url")
        .info()
        .await
        .expect("info")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_regional_local_admission_end_to_end() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    assert_eq!(gc.id, "global_cntl_1");
    let mut rc = lab.child("regional", "temp-rc-zone-a", &gc, "zone-A", &[]);
    assert_eq!(rc.id, "regional_cntl_zone-A_1");
    let lc = lab.child("local", "temp-lc-zone-a-1", &rc, "zone-A", &[]);
    assert_eq!(lc.id, "local_cntl_zone-A_1");
    let admitted = rc
        .proc
        .wait_line(Duration::from_secs(5), |l| l.starts_with("admitted "));
    assert_eq!(field(&admitted, "parent").as_deref(), Some("global_cntl_1"));
    // Each node answers with its assigned id; the RC admits locals, the LC nobody.
    let (gi, ri, li) = (info(&gc).await, info(&rc).await, info(&lc).await);
    assert_eq!(
        (
            gi.controller_id.as_str(),
            ri.controller_id.as_str(),
            li.controller_id.as_str()
        ),
        (
            "global_cntl_1",
            "regional_cntl_zone-A_1",
            "local_cntl_zone-A_1"
        )
    );
    assert!(ri.handlers.contains(&"VALIDATION_REQUEST".to_owned()));
    assert!(
        !li.handlers.contains(&"VALIDATION_REQUEST".to_owned()),
        "a local controller admits nobody"
    );
    // The GC recorded the RC with its key and a signed event chain; the LC pinned the RC.
    let gc_nib = Nib::open(gc.data_dir.join("nib.db")).expect("open GC NIB");
    let row = gc_nib
        .controller("regional_cntl_zone-A_1")
        .expect("read")
        .expect("row");
    assert_eq!(
        (
            row.status.as_str(),
            row.temp_id.as_deref(),
            row.public_key.as_deref()
        ),
        (
            "active",
            Some("temp-rc-zone-a"),
            Some(ri.public_key.as_str())
        )
    );
    let gc_key = pdsno_shared::keys::PublicKey::from_base64(&gi.public_key).expect("key");
    let n = pdsno_node::nib::verify_chain(&gc_nib.conn(), &gc_key)
        .expect("db")
        .expect("the chain verifies");
    assert!(n >= 1);
    assert!(
        gc_nib
            .events(0, 100)
            .expect("events")
            .iter()
            .any(|e| e.event_type == "CONTROLLER_VALIDATED"
                && e.subject.as_deref() == Some("regional_cntl_zone-A_1"))
    );
    let lc_nib = Nib::open(lc.data_dir.join("nib.db")).expect("open LC NIB");
    use pdsno_node::nib::StateKey;
    assert_eq!(
        lc_nib.state_str(StateKey::ParentPublicKey).expect("read"),
        Some(ri.public_key.clone())
    );
    assert_eq!(
        lc_nib.state_str(StateKey::RootPublicKey).expect("read"),
        Some(gi.public_key.clone())
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lc.data_dir.join("identity.key"))
            .expect("key file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}

/// A whole admission played by `child` at `parent`; the VALIDATION_RESULT.
async fn admit_raw(link: &ParentLink, parent: &str, child: &RawChild) -> Envelope {
    let ch = link
        .request_validation(&child.request(parent, 0))
        .await
        .expect("request");
    child.check(&ch);
    assert_eq!(
        ch.message_type,
        MessageType::Challenge,
        "{:?}",
        outcome(&ch)
    );
    let res = link
        .respond_to_challenge(&child.response(&ch, |_| {}))
        .await
        .expect("response");
    child.check(&res);
    res
}

/// A controller admitted, whose answer was lost (it never stored it), comes back with the
/// same token and key: it gets the same id and certificate again, audited as
/// CONTROLLER_RECOVERED, and nothing new is assigned. Anyone else with that token is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_lost_its_answer_is_recovered_and_audited() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    let child = RawChild::new(&lab, "temp-lost", "zone-A", "regional");
    let first = admit_raw(&link, &gc.id, &child).await;
    assert_eq!(outcome(&first), ("APPROVED".to_owned(), String::new()));
    let id = first.payload["assigned_id"]
        .as_str()
        .expect("assigned id")
        .to_owned();

    // The answer is "lost": the same child asks again.
    let again = admit_raw(&link, &gc.id, &child).await;
    assert_eq!(outcome(&again), ("APPROVED".to_owned(), String::new()));
    assert_eq!(again.payload["assigned_id"], first.payload["assigned_id"]);
    assert_eq!(again.payload["certificate"], first.payload["certificate"]);

    let gc_nib = Nib::open(gc.data_dir.join("nib.db")).expect("open GC NIB");
    let events = gc_nib.events(0, 1000).expect("events");
    let of = |t: &str| -> Vec<&pdsno_node::nib::EventRow> {
        events
            .iter()
            .filter(|e| e.event_type == t && e.subject.as_deref() == Some(id.as_str()))
            .collect()
    };
    assert_eq!(of("CONTROLLER_VALIDATED").len(), 1, "{events:?}");
    let recovered = of("CONTROLLER_RECOVERED");
    assert_eq!(recovered.len(), 1, "{events:?}");
    let details = pdsno_shared::json::parse(recovered[0].details.as_bytes()).expect("details");
    assert_eq!(
        details.get("temp_id").and_then(Value::as_str),
        Some("temp-lost")
    );
    assert_eq!(
        details.get("assigned_id").and_then(Value::as_str),
        Some(id.as_str())
    );
    assert_eq!(recovered[0].decision.as_deref(), Some("APPROVED"));
    assert_eq!(
        gc_nib
            .controllers()
            .expect("controllers")
            .iter()
            .filter(|c| c.role == "regional")
            .count(),
        1,
        "nothing new assigned"
    );

    // Another key with the same token is a reused token, not a recovery.
    let mut thief = RawChild::new(&lab, "temp-lost", "zone-A", "regional");
    thief.token = child.token.clone();
    assert_eq!(
        handshake(&link, &gc.id, &thief, |_| {}).await,
        (
            "REJECTED".to_owned(),
            "BOOTSTRAP_TOKEN_ALREADY_USED".to_owned()
        )
    );
    let after = gc_nib.events(0, 1000).expect("events");
    assert_eq!(
        after
            .iter()
            .filter(|e| e.event_type == "CONTROLLER_RECOVERED")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reject_reason_is_produced() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--regions",
        "zone-A,zone-B,zone-C",
        "--quota-per-region",
        "1",
        "--blocklist",
        "temp-blocked",
        "--challenge-ttl",
        "2",
        // Every refusal comes from this one address; the lockout has its own test.
        "--lockout-failures",
        "0",
    ]);
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    let g = "global_cntl_1";
    let req_outcome = |e: Envelope| {
        let link = link.clone();
        async move { outcome(&link.request_validation(&e).await.expect("answer")) }
    };
    let rejected = |r: &str| ("REJECTED".to_owned(), r.to_owned());

    // Request stage.
    let c = RawChild::new(&lab, "temp-stale", "zone-A", "regional");
    assert_eq!(
        req_outcome(c.request(g, -400)).await,
        rejected("STALE_TIMESTAMP")
    );
    assert_eq!(
        req_outcome(c.request(g, 60)).await,
        rejected("FUTURE_TIMESTAMP")
    );
    let c = RawChild::new(&lab, "temp-blocked", "zone-A", "regional");
    assert_eq!(req_outcome(c.request(g, 0)).await, rejected("BLOCKLISTED"));
    let mut c = RawChild::new(&lab, "temp-badtoken", "zone-A", "regional");
    c.token = "00".repeat(32);
    assert_eq!(
        req_outcome(c.request(g, 0)).await,
        rejected("INVALID_BOOTSTRAP_TOKEN")
    );

    // Response stage.
    let c = RawChild::new(&lab, "temp-tid", "zone-A", "regional");
    assert_eq!(
        handshake(&link, g, &c, |p| {
            p.insert("temp_id".into(), "temp-other".into());
        })
        .await,
        rejected("TEMP_ID_MISMATCH")
    );
    let c = RawChild::new(&lab, "temp-sig", "zone-A", "regional");
    let stranger = IdentityKey::generate();
    assert_eq!(
        handshake(&link, g, &c, |p| {
            p.insert(
                "signed_nonce".into(),
                base64_encode(&stranger.sign(b"x")).into(),
            );
        })
        .await,
        rejected("INVALID_SIGNATURE")
    );
    let c = RawChild::new(&lab, "temp-type", "zone-A", "local");
    assert_eq!(
        handshake(&link, g, &c, |_| {}).await,
        rejected("CONTROLLER_TYPE_NOT_PERMITTED")
    );
    let c = RawChild::new(&lab, "temp-region", "zone-Q", "regional");
    assert_eq!(
        handshake(&link, g, &c, |_| {}).await,
        rejected("INVALID_REGION")
    );
    let ok = RawChild::new(&lab, "temp-first", "zone-A", "regional");
    let ch = link
        .request_validation(&ok.request(g, 0))
        .await
        .expect("challenge");
    let res = link
        .respond_to_challenge(&ok.response(&ch, |_| {}))
        .await
        .expect("result");
    assert_eq!(outcome(&res).0, "APPROVED");
    // The same challenge again: it was single use.
    let again = link
        .respond_to_challenge(&ok.response(&ch, |_| {}))
        .await
        .expect("answer");
    assert_eq!(outcome(&again), rejected("UNKNOWN_CHALLENGE"));
    // The same token again, from another key: refused.
    let thief = RawChild {
        temp_id: ok.temp_id.clone(),
        region: ok.region.clone(),
        kind: ok.kind.clone(),
        token: ok.token.clone(),
        key: pdsno_shared::keys::IdentityKey::generate(),
    };
    assert_eq!(
        req_outcome(thief.request(g, 0)).await,
        rejected("BOOTSTRAP_TOKEN_ALREADY_USED")
    );
    // One regional controller per region.
    let c = RawChild::new(&lab, "temp-second", "zone-A", "regional");
    assert_eq!(
        handshake(&link, g, &c, |_| {}).await,
        rejected("REGION_ALREADY_SERVED")
    );
    // A late response (challenge TTL is 2 s here).
    let c = RawChild::new(&lab, "temp-late", "zone-B", "regional");
    let ch = link
        .request_validation(&c.request(g, 0))
        .await
        .expect("challenge");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let late = link
        .respond_to_challenge(&c.response(&ch, |_| {}))
        .await
        .expect("answer");
    c.check(&late);
    assert_eq!(outcome(&late), rejected("CHALLENGE_EXPIRED"));

    // An RC refuses a local controller of another region.
    let rc = lab.child("regional", "temp-rc-b", &gc, "zone-B", &[]);
    let rlink = ParentLink::new(&rc.grpc_url()).expect("url");
    let mut c = RawChild::new(&lab, "temp-lc-a", "zone-A", "local");
    c.token = lab.token_for(&rc, "temp-lc-a", "zone-A", "local");
    assert_eq!(
        handshake(&rlink, &rc.id, &c, |_| {}).await,
        rejected("REGION_MISMATCH")
    );

    // ERROR: the parent fails to record the admission (a fault injected into its NIB from
    // outside the process: a trigger that aborts the controller insert).
    let nib = Nib::open(gc.data_dir.join("nib.db")).expect("open");
    nib.conn()
        .execute_batch("CREATE TRIGGER inject_fault BEFORE INSERT ON controllers BEGIN SELECT RAISE(ABORT, 'injected fault'); END;")
        .expect("inject");
    let c = RawChild::new(&lab, "temp-err", "zone-C", "regional");
    let (status, reason) = handshake(&link, g, &c, |_| {}).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("ERROR", "IDENTITY_ASSIGNMENT_FAILED")
    );
    nib.conn()
        .execute_batch("DROP TRIGGER inject_fault;")
        .expect("heal");
    // Nothing was half-written: the token is still usable once the fault is gone.
    assert_eq!(handshake(&link, g, &c, |_| {}).await.0, "APPROVED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_token_is_refused_and_the_child_exits() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let _rc = lab.child("regional", "temp-rc-1", &gc, "zone-A", &[]);
    // Another controller (another data dir, another key) presenting the same token.
    let token = lab.token("temp-rc-1", "zone-A", "regional");
    let url = gc.grpc_url();
    let mut copy = lab.spawn(
        "regional",
        "temp-rc-1-copy",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--temp-id",
            "temp-rc-1",
            "--bootstrap-token",
            &token,
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while copy.is_alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!copy.is_alive(), "the refused child stops");
    assert!(
        copy.stderr().contains("BOOTSTRAP_TOKEN_ALREADY_USED"),
        "{}",
        copy.stderr()
    );
    assert!(!copy.lines().iter().any(|l| l.starts_with("admitted")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_identities_and_never_reissue_ids() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let mut rc = lab.child("regional", "temp-rc-a1", &gc, "zone-A", &[]);
    assert_eq!(rc.id, "regional_cntl_zone-A_1");
    let rc_grpc = rc.grpc;

    // The GC dies hard and comes back on the same data directory.
    gc.proc.kill();
    let gc_grpc = gc.grpc.to_string();
    let gc2 = lab.ready(
        lab.spawn(
            "global",
            "global",
            &["--regions", "zone-A,zone-B", "--listen-grpc", &gc_grpc],
        ),
        "global",
    );
    let nib = Nib::open(gc2.data_dir.join("nib.db")).expect("open");
    assert!(
        nib.controller("regional_cntl_zone-A_1")
            .expect("read")
            .is_some(),
        "admitted controller kept"
    );
    // zone-A is still served after the restart: a second RC is refused.
    let link = ParentLink::new(&gc2.grpc_url()).expect("url");
    let second = RawChild::new(&lab, "temp-rc-a2", "zone-A", "regional");
    assert_eq!(
        handshake(&link, &gc2.id, &second, |_| {}).await,
        ("REJECTED".to_owned(), "REGION_ALREADY_SERVED".to_owned())
    );

    // The RC restarts without a token: it keeps its identity and does not re-admit.
    rc.proc.terminate(Duration::from_secs(5));
    let rc_grpc_s = rc_grpc.to_string();
    let url = gc2.grpc_url();
    let mut p = lab.spawn(
        "regional",
        "temp-rc-a1",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--listen-grpc",
            &rc_grpc_s,
        ],
    );
    let restored = p.wait_line(Duration::from_secs(30), |l| l.starts_with("restored "));
    assert_eq!(
        field(&restored, "id").as_deref(),
        Some("regional_cntl_zone-A_1")
    );
    let rc_again = lab.ready(p, "temp-rc-a1");
    assert_eq!(rc_again.id, "regional_cntl_zone-A_1");
    assert!(
        !rc_again
            .proc
            .lines()
            .iter()
            .any(|l| l.starts_with("admitted"))
    );
    // ... and still admits local controllers with its restored delegation.
    let lc = lab.child("local", "temp-lc-a1", &rc_again, "zone-A", &[]);
    assert_eq!(lc.id, "local_cntl_zone-A_1");
    assert_eq!(
        nib.controllers()
            .expect("list")
            .iter()
            .filter(|r| r.role == "regional")
            .count(),
        1,
        "the GC never saw a second admission of the RC"
    );
    // Revoked and replaced: the replacement gets a new id, never the old one.
    let gc_dir = gc2.data_dir.display().to_string();
    let (code, out, err) = pdsno_tests::run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        &["controller", "revoke", &rc_again.id, "--data-dir", &gc_dir],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{out} {err}");
    let rc3 = lab.child("regional", "temp-rc-a3", &gc2, "zone-A", &[]);
    assert_eq!(rc3.id, "regional_cntl_zone-A_2", "ids are never reissued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_started_before_its_parent_waits_and_retries() {
    let lab = Lab::new();
    let port = pdsno_tests::free_port_for_late_server();
    let url = format!("http://127.0.0.1:{port}");
    let token = lab.token("temp-early", "zone-A", "regional");
    let early = lab.spawn(
        "regional",
        "temp-early",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--temp-id",
            "temp-early",
            "--bootstrap-token",
            &token,
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let listen = format!("127.0.0.1:{port}");
    let _gc = lab.ready(
        lab.spawn(
            "global",
            "global",
            &["--regions", "zone-A", "--listen-grpc", &listen],
        ),
        "global",
    );
    let rc = lab.ready(early, "temp-early");
    assert_eq!(rc.id, "regional_cntl_zone-A_1");
    assert!(
        rc.proc.stderr().contains("retrying"),
        "it reported waiting: {}",
        rc.proc.stderr()
    );
}

mod fake_parent {
    //! A rogue regional parent that admits with answers a child must refuse.

    use super::*;
    use pdsno_shared::payload::admission::{
        Certificate, DelegationCredential, VALIDATE_LOCAL_CONTROLLERS,
    };
    use tonic::{Request, Response, Status};

    #[derive(Clone, Copy, Debug)]
    pub(super) enum Trick {
        /// The child's certificate is signed by a key that is not the parent's.
        ForgedCertificate,
        /// The delegation credential (genuinely signed by the root) is for another region.
        DelegationForAnotherRegion,
    }

    #[derive(Clone)]
    pub(super) struct Rogue {
        pub(super) trick: Trick,
        pub(super) root: Arc<IdentityKey>,
        pub(super) me: Arc<IdentityKey>,
        pub(super) id: String,
        pub(super) chain_region: String,
        /// The child's token and public key, remembered from its request (the response
        /// carries neither). Each rogue has its own: tests run in parallel.
        pub(super) seen: Arc<std::sync::Mutex<(String, String)>>,
    }

    fn signed_reply(req: &Envelope, t: MessageType, p: Map, me: &str) -> Envelope {
        let token = req
            .payload
            .get("bootstrap_token")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut e = req.reply(t, me.to_owned(), p, chrono::Utc::now());
        let key = admission_key(&token.unwrap_or_default());
        sign_hmac(&mut e, &key, None, chrono::Utc::now());
        e
    }

    fn cert(
        issuer: &IdentityKey,
        id: &str,
        role: &str,
        region: &str,
        key: &str,
        by: &str,
    ) -> Value {
        let now = chrono::Utc::now();
        let mut c = Certificate {
            assigned_id: id.into(),
            role: role.into(),
            region: region.into(),
            public_key: key.into(),
            issued_by: by.into(),
            issued_at: format_iso(now),
            expires_at: format_iso(now + chrono::Duration::days(1)),
            signature: String::new(),
            extra: Map::new(),
        };
        c.sign(issuer).expect("sign");
        pdsno_shared::json::to_value(&c).expect("value")
    }

    #[tonic::async_trait]
    impl pb::node_server::Node for Rogue {
        async fn get_info(
            &self,
            _r: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::NodeInfo>, Status> {
            Ok(Response::new(pb::NodeInfo {
                controller_id: self.id.clone(),
                role: "regional".into(),
                region: "zone-A".into(),
                public_key: self.me.public().to_base64(),
                handlers: vec![],
                identity_proof: vec![],
            }))
        }
    }

    #[tonic::async_trait]
    impl pb::admission_server::Admission for Rogue {
        async fn request_validation(
            &self,
            r: Request<pb::ValidationRequest>,
        ) -> Result<Response<pb::AdmissionStep>, Status> {
            let req = r
                .into_inner()
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            *self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = (
                req.payload["bootstrap_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                req.payload["public_key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            let mut p = Map::new();
            p.insert("challenge_id".into(), "challenge-000000000001".into());
            p.insert("nonce".into(), "11".repeat(32).into());
            p.insert(
                "expires_at".into(),
                format_iso(chrono::Utc::now() + chrono::Duration::seconds(30)).into(),
            );
            let e = signed_reply(&req, MessageType::Challenge, p, &self.id);
            Ok(Response::new(pb::AdmissionStep {
                step: Some(pb::admission_step::Step::Challenge(
                    pb::Challenge::from_envelope(&e).map_err(|_| Status::internal("x"))?,
                )),
            }))
        }

        async fn respond_to_challenge(
            &self,
            r: Request<pb::ChallengeResponse>,
        ) -> Result<Response<pb::ValidationResult>, Status> {
            let mut req = r
                .into_inner()
                .into_envelope()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let (token, child_key) = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            req.payload.insert("bootstrap_token".into(), token.into());
            let forger = IdentityKey::generate();
            let lc_id = "local_cntl_zone-A_1";
            let signer: &IdentityKey = match self.trick {
                Trick::ForgedCertificate => &forger,
                Trick::DelegationForAnotherRegion => &self.me,
            };
            // Everything is right except the one trick.
            let mut deleg = DelegationCredential {
                delegatee_id: self.id.clone(),
                delegatee_public_key: self.me.public().to_base64(),
                region: self.chain_region.clone(),
                permitted_actions: vec![VALIDATE_LOCAL_CONTROLLERS.into()],
                issued_by: "global_cntl_1".into(),
                issued_at: format_iso(chrono::Utc::now()),
                expires_at: format_iso(chrono::Utc::now() + chrono::Duration::days(1)),
                signature: String::new(),
                extra: Map::new(),
            };
            deleg.sign(&self.root).expect("sign");
            let mut chain = Map::new();
            chain.insert(
                "certificate".into(),
                cert(
                    &self.root,
                    &self.id,
                    "regional",
                    &self.chain_region,
                    &self.me.public().to_base64(),
                    "global_cntl_1",
                ),
            );
            chain.insert(
                "delegation_credential".into(),
                pdsno_shared::json::to_value(&deleg).expect("value"),
            );
            chain.insert(
                "root_public_key".into(),
                self.root.public().to_base64().into(),
            );
            let mut p = Map::new();
            p.insert("status".into(), "APPROVED".into());
            p.insert("assigned_id".into(), lc_id.into());
            p.insert(
                "certificate".into(),
                cert(signer, lc_id, "local", "zone-A", &child_key, &self.id),
            );
            p.insert("delegation_credential".into(), Value::Null);
            p.insert("role".into(), "local".into());
            p.insert("region".into(), "zone-A".into());
            p.insert(
                "issuer_public_key".into(),
                self.me.public().to_base64().into(),
            );
            p.insert("chain".into(), Value::Object(chain));
            let e = signed_reply(&req, MessageType::ValidationResult, p, &self.id);
            Ok(Response::new(
                pb::ValidationResult::from_envelope(&e).map_err(|_| Status::internal("x"))?,
            ))
        }
    }

    pub(super) async fn serve(rogue: Rogue) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::new(rogue.clone()))
                .add_service(pb::admission_server::AdmissionServer::new(rogue))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        addr
    }
}

async fn rogue_admission(trick: fake_parent::Trick, chain_region: &str) -> Proc {
    let lab = Lab::new();
    let rogue = fake_parent::Rogue {
        trick,
        root: Arc::new(IdentityKey::generate()),
        me: Arc::new(IdentityKey::generate()),
        id: "regional_cntl_zone-A_1".into(),
        chain_region: chain_region.into(),
        seen: Arc::default(),
    };
    let addr = fake_parent::serve(rogue).await;
    let token = lab.token("temp-lc-victim", "zone-A", "local");
    let url = format!("http://{addr}");
    let mut lc = lab.spawn(
        "local",
        "temp-lc-victim",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--temp-id",
            "temp-lc-victim",
            "--bootstrap-token",
            &token,
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while lc.is_alive() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !lc.is_alive(),
        "the child gives up on an untrustworthy parent"
    );
    assert!(
        !lc.lines().iter().any(|l| l.starts_with("admitted")),
        "no identity adopted"
    );
    // Nothing was persisted either.
    let nib = Nib::open(lab.data("temp-lc-victim").join("nib.db")).expect("open");
    assert_eq!(
        nib.state_str(pdsno_node::nib::StateKey::AssignedId)
            .expect("read"),
        None
    );
    lc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_certificate_is_refused() {
    let lc = rogue_admission(fake_parent::Trick::ForgedCertificate, "zone-A").await;
    assert!(
        lc.stderr().contains(
            "refusing the parent's answer: certificate: credential signature does not verify"
        ),
        "{}",
        lc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_credential_for_another_region_is_refused() {
    let lc = rogue_admission(fake_parent::Trick::DelegationForAnotherRegion, "zone-B").await;
    assert!(
        lc.stderr().contains(
            "refusing the parent's answer: delegation credential is for region zone-B, not zone-A"
        ),
        "{}",
        lc.stderr()
    );
}
