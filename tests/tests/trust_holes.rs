//! Attacks on the trust between controllers, each performed against real `pdsno`
//! processes: identity takeover in a region (a second RC, a spent token at a replacement,
//! a compromised RC re-binding an id), minting tokens with an RC's secret, device hijack
//! by a compromised local controller, impersonation with the shared network key.

use std::time::Duration;

use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey};
use pdsno_shared::payload::admission::Certificate;
use pdsno_shared::signing::{sign_ed25519, sign_hmac};
use pdsno_shared::time::format_iso;
use pdsno_tests::{Lab, NodeProc, run};

mod common;
use common::{RawChild, eventually, handshake, nib};

const WAIT: Duration = Duration::from_secs(30);

fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        args,
        Duration::from_secs(60),
    )
}

fn rejected(reason: &str) -> (String, String) {
    ("REJECTED".into(), reason.into())
}

/// A raw child admitted by the test itself; returns its assigned id.
async fn admit_raw(link: &ParentLink, parent: &str, child: &RawChild) -> String {
    let ch = link
        .request_validation(&child.request(parent, 0))
        .await
        .expect("request");
    assert_eq!(ch.message_type, MessageType::Challenge, "{:?}", ch.payload);
    let res = link
        .respond_to_challenge(&child.response(&ch, |_| {}))
        .await
        .expect("response");
    assert_eq!(
        res.payload.get("status").and_then(Value::as_str),
        Some("APPROVED"),
        "{:?}",
        res.payload
    );
    res.payload
        .get("assigned_id")
        .and_then(Value::as_str)
        .expect("assigned id")
        .to_owned()
}

/// The identity key in a node's data directory.
fn identity_of(node: &NodeProc) -> IdentityKey {
    let text = std::fs::read_to_string(node.data_dir.join("identity.key")).expect("identity");
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).expect("hex");
    IdentityKey::from_seed(&seed)
}

fn status_code(r: &Result<Option<Envelope>, LinkError>) -> Option<tonic::Code> {
    match r {
        Err(LinkError::Status { code, .. }) => Some(*code),
        _ => None,
    }
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Finding: a spent token reused at a second RC of one region took over a live LC's id.
/// Now a region has one RC (a second is refused at admission), a replacement RC has its
/// own secret (the old RC's tokens, spent or not, mean nothing to it) and numbers its
/// local controllers above the region's, and the GC never re-binds a known id to another
/// key or validator, whatever a (compromised) RC asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_takeover_between_regional_controllers_of_a_region() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A", "--lockout-failures", "0"]);
    let rc1 = lab.child("regional", "temp-rc-a1", &gc, "zone-A", &[]);

    // A second RC for zone-A, with a valid token of its own: refused, with the reason.
    let token = lab.token("temp-rc-a2", "zone-A", "regional");
    let mut args = lab.first_start_args("regional", "temp-rc-a2", &gc.grpc_url(), "zone-A");
    args.extend(["--bootstrap-token".to_owned(), token]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = pdsno(&args);
    assert_eq!(code, Some(3), "{out}\n{err}");
    assert!(
        format!("{out}{err}").contains("REGION_ALREADY_SERVED")
            && err.contains("revoke it on the global controller"),
        "the refusal says what to do: {out}\n{err}"
    );

    // A local controller of rc1, registered at the GC with its MQTT credential.
    let lc1 = lab.child("local", "temp-lc-1", &rc1, "zone-A", &[]);
    let lc1_token = lab.token_for(&rc1, "temp-lc-1", "zone-A", "local");
    let gc_nib = nib(&gc);
    eventually("the GC knows lc1", WAIT, || async {
        gc_nib.controller(&lc1.id).expect("read").is_some()
    })
    .await;
    let lc1_key = gc_nib
        .controller(&lc1.id)
        .expect("read")
        .and_then(|r| r.public_key)
        .expect("lc1 key");

    // rc1 is revoked; a replacement takes the region.
    let gc_dir = gc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["controller", "revoke", &rc1.id, "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{out} {err}");
    let rc2 = lab.child("regional", "temp-rc-a3", &gc, "zone-A", &[]);
    assert_ne!(rc2.id, rc1.id);

    // lc1's spent token, replayed at the replacement by someone who kept it: refused.
    let link2 = ParentLink::new(&rc2.grpc_url()).expect("url");
    let mut thief = RawChild::new(&lab, "temp-lc-1", "zone-A", "local");
    thief.token = lc1_token;
    assert_eq!(
        handshake(&link2, &rc2.id, &thief, |_| {}).await,
        rejected("INVALID_BOOTSTRAP_TOKEN")
    );
    // The replacement's own local controllers never get an id the region used before.
    let lc2 = lab.child("local", "temp-lc-2", &rc2, "zone-A", &[]);
    assert_ne!(lc2.id, lc1.id);
    let seq = pdsno_shared::ids::ControllerId::parse(&lc2.id)
        .expect("assigned id")
        .seq;
    assert!(seq > 1, "{} reuses the region's numbering", lc2.id);

    // A compromised rc2 asks the GC to bind lc1's id to a key it holds: refused, and the
    // GC's record of lc1 is unchanged.
    let rc2_key = identity_of(&rc2);
    let attacker = IdentityKey::generate();
    let now = chrono::Utc::now();
    let mut cert = Certificate {
        assigned_id: lc1.id.clone(),
        role: "local".into(),
        region: "zone-A".into(),
        public_key: attacker.public().to_base64(),
        issued_by: rc2.id.clone(),
        issued_at: format_iso(now),
        expires_at: format_iso(now + chrono::Duration::days(1)),
        signature: String::new(),
        extra: Map::new(),
    };
    cert.sign(&rc2_key).expect("sign");
    let mut p = Map::new();
    p.insert("kind".into(), "mqtt_credential".into());
    p.insert("controller_id".into(), lc1.id.clone().into());
    p.insert(
        "certificate".into(),
        pdsno_shared::json::to_value(&cert).expect("cert"),
    );
    let mut env = Envelope::new(MessageType::SyncRequest, rc2.id.clone(), &gc.id, p, now);
    sign_ed25519(&mut env, &rc2_key, None, now);
    let link_gc = ParentLink::new(&gc.grpc_url()).expect("url");
    let r = link_gc.exchange(&env).await;
    assert_eq!(
        status_code(&r),
        Some(tonic::Code::PermissionDenied),
        "{r:?}"
    );
    let row = gc_nib.controller(&lc1.id).expect("read").expect("lc1");
    assert_eq!(row.public_key.as_deref(), Some(lc1_key.as_str()));
    assert_eq!(row.validated_by.as_deref(), Some(rc1.id.as_str()));
    assert!(
        gc_nib
            .mqtt_credentials()
            .expect("credentials")
            .iter()
            .all(|(id, _)| *id != lc1.id),
        "lc1 keeps a broker credential after its RC was revoked"
    );
}

/// Finding: every RC held the GC's bootstrap secret, so any RC host could mint regional
/// tokens, and one region's RC could mint tokens for another's. Now each RC has its own
/// secret (mode 0600 in its data directory), refuses to run with the GC's, and secret
/// files readable by other users are refused (also by --check-config).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rc_secret_mints_nothing_the_gc_or_another_region_accepts() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--regions",
        "zone-A,zone-B,zone-C",
        "--lockout-failures",
        "0",
    ]);
    let rc_a = lab.child(
        "regional",
        "temp-rc-a",
        &gc,
        "zone-A",
        &["--lockout-failures", "0"],
    );
    let rc_b = lab.child(
        "regional",
        "temp-rc-b",
        &gc,
        "zone-B",
        &["--lockout-failures", "0"],
    );
    let secret_a = rc_a.data_dir.join("bootstrap.secret");
    assert_eq!(mode_of(&secret_a), 0o600);
    let secret_a = std::fs::read_to_string(&secret_a).expect("secret");
    let secret_b = std::fs::read_to_string(rc_b.data_dir.join("bootstrap.secret")).expect("b");
    assert_ne!(secret_a, secret_b, "each RC has its own secret");
    assert_ne!(secret_a.trim(), lab.secret);
    let mint = |temp: &str, region: &str, kind: &str| {
        pdsno_shared::bootstrap::bootstrap_token(secret_a.trim().as_bytes(), temp, region, kind)
    };
    let raw = |temp: &str, region: &str, kind: &str| {
        let mut c = RawChild::new(&lab, temp, region, kind);
        c.token = mint(temp, region, kind);
        c
    };
    // A regional token minted on RC-A's host: the GC refuses it.
    let gc_link = ParentLink::new(&gc.grpc_url()).expect("url");
    assert_eq!(
        handshake(
            &gc_link,
            &gc.id,
            &raw("temp-rogue-rc", "zone-C", "regional"),
            |_| {}
        )
        .await,
        rejected("INVALID_BOOTSTRAP_TOKEN")
    );
    // A local token for zone-B: zone-B's RC refuses it.
    let b_link = ParentLink::new(&rc_b.grpc_url()).expect("url");
    assert_eq!(
        handshake(
            &b_link,
            &rc_b.id,
            &raw("temp-rogue-lc", "zone-B", "local"),
            |_| {}
        )
        .await,
        rejected("INVALID_BOOTSTRAP_TOKEN")
    );
    // What RC-A's secret is for: its own local controllers, minted on its host with
    // `pdsno token --data-dir`.
    let a_link = ParentLink::new(&rc_a.grpc_url()).expect("url");
    let a_dir = rc_a.data_dir.display().to_string();
    let (code, token, err) = pdsno(&[
        "token",
        "--data-dir",
        &a_dir,
        "--temp-id",
        "temp-lc-a",
        "--region",
        "zone-A",
        "--type",
        "local",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let mut lc_a = RawChild::new(&lab, "temp-lc-a", "zone-A", "local");
    lc_a.token = token.trim().to_owned();
    admit_raw(&a_link, &rc_a.id, &lc_a).await;
    // ...and never regional tokens.
    let (code, _, err) = pdsno(&[
        "token",
        "--data-dir",
        &a_dir,
        "--temp-id",
        "temp-x",
        "--region",
        "zone-A",
        "--type",
        "regional",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("local controllers' tokens only"), "{err}");

    // An RC given the GC's secret refuses to start, naming the setting.
    let token = lab.token("temp-rc-c", "zone-C", "regional");
    let mut args = lab.first_start_args("regional", "temp-rc-c", &gc.grpc_url(), "zone-C");
    args.extend([
        "--bootstrap-secret-file".to_owned(),
        lab.secret_file.display().to_string(),
        "--bootstrap-token".to_owned(),
        token,
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = pdsno(&args);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("bootstrap_secret_file") && err.contains("global controller's"),
        "{err}"
    );
    // ...and that token was not spent: the RC started properly is admitted with it.
    let rc_c = lab.child("regional", "temp-rc-c", &gc, "zone-C", &[]);
    assert!(rc_c.id.starts_with("regional_cntl_zone-C_"));

    // A secret file other local users can read is refused, at start and by --check-config.
    let loose = lab.dir.path().join("loose.secret");
    std::fs::write(&loose, "another-bootstrap-secret-0123456789\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let loose_s = loose.display().to_string();
    let data = lab.data("loose-gc").display().to_string();
    for extra in [&["--check-config"][..], &[][..]] {
        let mut args = vec![
            "global",
            "--data-dir",
            &data,
            "--bootstrap-secret-file",
            &loose_s,
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--listen-mqtt",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = pdsno(&args);
        assert_ne!(code, Some(0), "{extra:?}: {out}");
        assert!(
            format!("{out}{err}").contains(&format!("chmod 600 {loose_s}")),
            "{extra:?}: {out}\n{err}"
        );
    }
}

/// A DISCOVERY_REPORT from `lc` (signed with its identity key) about `new`/`updated`
/// devices and `inactive` MACs.
fn report(
    lc: &str,
    key: &IdentityKey,
    rc: &str,
    new: &[Value],
    updated: &[Value],
    inactive: &[&str],
    extra: &[(&str, Value)],
) -> Envelope {
    let now = chrono::Utc::now();
    let mut p = Map::new();
    p.insert("lc_id".into(), lc.into());
    p.insert("subnet".into(), "10.0.0.0/24".into());
    p.insert("region".into(), "zone-A".into());
    p.insert("timestamp".into(), format_iso(now).into());
    p.insert("new_devices".into(), Value::Array(new.to_vec()));
    p.insert("updated_devices".into(), Value::Array(updated.to_vec()));
    p.insert(
        "inactive_devices".into(),
        Value::Array(
            inactive
                .iter()
                .map(|m| {
                    let mut d = Map::new();
                    d.insert("mac".into(), (*m).into());
                    d.insert("ip".into(), "10.0.0.1".into());
                    Value::Object(d)
                })
                .collect(),
        ),
    );
    for (k, v) in extra {
        p.insert((*k).into(), v.clone());
    }
    let mut env = Envelope::new(MessageType::DiscoveryReport, lc, rc, p, now);
    sign_ed25519(&mut env, key, None, now);
    env
}

fn device(mac: &str, ip: &str, last_seen: &str) -> Value {
    let mut d = Map::new();
    d.insert("ip".into(), ip.into());
    d.insert("mac".into(), mac.into());
    d.insert("last_seen".into(), last_seen.into());
    d.insert("protocol".into(), "SIM".into());
    d.insert("reachable".into(), true.into());
    d.insert("discovery_method".into(), "icmp".into());
    Value::Object(d)
}

/// Findings: a compromised LC stole a sibling's device for good with a `last_seen` in
/// 2099, and could insert unlimited devices with the spike detector off (`"full": true`).
/// Now reporter times are clamped, a device changes hands only after its owner reports
/// it inactive, revoking a controller retires its devices, each LC has a device cap, and
/// `full` does not silence the spike detector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_local_controller_cannot_hijack_or_flood_devices() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A"]);
    let rc = lab.child(
        "regional",
        "temp-rc-d",
        &gc,
        "zone-A",
        &["--max-devices-per-lc", "20", "--spike-threshold", "5"],
    );
    let link = ParentLink::new(&rc.grpc_url()).expect("url");
    let mk = |temp: &str| {
        let mut c = RawChild::new(&lab, temp, "zone-A", "local");
        c.token = lab.token_for(&rc, temp, "zone-A", "local");
        c
    };
    let (honest, evil) = (mk("temp-lc-honest"), mk("temp-lc-evil"));
    let honest_id = admit_raw(&link, &rc.id, &honest).await;
    let evil_id = admit_raw(&link, &rc.id, &evil).await;
    let send = |env: Envelope| {
        let link = link.clone();
        async move { link.exchange(&env).await.expect("report accepted") }
    };
    let mac = "02:aa:00:00:00:01";
    let now = format_iso(chrono::Utc::now());
    send(report(
        &honest_id,
        &honest.key,
        &rc.id,
        &[device(mac, "10.0.0.5", &now)],
        &[],
        &[],
        &[],
    ))
    .await;
    // The attacker claims it from the far future, then says it is gone.
    send(report(
        &evil_id,
        &evil.key,
        &rc.id,
        &[],
        &[device(mac, "10.0.0.66", "2099-01-01T00:00:00+00:00")],
        &[],
        &[],
    ))
    .await;
    send(report(&evil_id, &evil.key, &rc.id, &[], &[], &[mac], &[])).await;
    let rc_nib = nib(&rc);
    let row = rc_nib.device(mac).expect("read").expect("device");
    assert_eq!(row.lc_id, honest_id, "the device was taken");
    assert_eq!(row.device.ip, "10.0.0.5");
    assert_eq!(row.status, pdsno_node::nib::DeviceStatus::Active);
    // A device of its own from the future is stored with a clamped time.
    let own = "02:aa:00:00:00:02";
    send(report(
        &evil_id,
        &evil.key,
        &rc.id,
        &[device(own, "10.0.0.67", "2099-01-01T00:00:00+00:00")],
        &[],
        &[],
        &[],
    ))
    .await;
    let seen = rc_nib
        .device(own)
        .expect("read")
        .expect("device")
        .device
        .last_seen;
    let seen = pdsno_shared::time::parse_iso(&seen).expect("time");
    assert!(
        seen <= chrono::Utc::now() + chrono::Duration::seconds(301),
        "last_seen not clamped: {seen}"
    );

    // Flood: 100 new devices with `full: true` — at most the cap is stored, and the spike
    // is flagged anyway.
    let flood: Vec<Value> = (0..100)
        .map(|i| device(&format!("02:bb:00:00:00:{i:02x}"), "10.0.1.1", &now))
        .collect();
    send(report(
        &evil_id,
        &evil.key,
        &rc.id,
        &flood,
        &[],
        &[],
        &[("full", true.into())],
    ))
    .await;
    let owned = rc_nib.devices(Some(&evil_id)).expect("devices").len();
    assert_eq!(owned, 20, "the device cap holds");
    let types: Vec<String> = rc_nib
        .events(0, 10_000)
        .expect("events")
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(types.iter().any(|t| t == "DEVICE_CAP_REACHED"), "{types:?}");
    assert!(
        types.iter().any(|t| t == "ANOMALY_DISCOVERY_SPIKE"),
        "{types:?}"
    );
    assert!(types.iter().any(|t| t == "DEVICE_MULTI_LC"), "{types:?}");
    assert!(
        !types.iter().any(|t| t == "DEVICE_LC_REASSIGNED"),
        "{types:?}"
    );

    // Revoked: what it reported is retired.
    let rc_dir = rc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["controller", "revoke", &evil_id, "--data-dir", &rc_dir]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        rc_nib
            .devices(Some(&evil_id))
            .expect("devices")
            .iter()
            .all(|d| d.status == pdsno_node::nib::DeviceStatus::Inactive),
        "a revoked controller's devices are still active"
    );
    // The honest controller's device never moved.
    assert_eq!(
        rc_nib.device(mac).expect("read").expect("device").lc_id,
        honest_id
    );
}

/// Finding: in network-key mode the key stayed valid for every sender after pairwise keys
/// existed, so an LC could sign as its RC (revoking a sibling at the GC) or as a sibling
/// (forging its reports). Now the network key is refused from a peer we share a pairwise
/// key with, and never accepted for privileged messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_key_cannot_impersonate_a_controller() {
    let lab = Lab::new();
    let secret = "shared-network-secret-for-the-lab";
    let net = ["--secret", secret];
    let gc = lab.global(&net);
    let mut rc = lab.child("regional", "temp-rc-n", &gc, "zone-A", &net);
    rc.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let mut lc1 = lab.child("local", "temp-lc-n1", &rc, "zone-A", &net);
    let mut lc2 = lab.child("local", "temp-lc-n2", &rc, "zone-A", &net);
    lc1.proc.wait_line(WAIT, |l| l.starts_with("key "));
    lc2.proc.wait_line(WAIT, |l| l.starts_with("key "));
    let gc_nib = nib(&gc);
    eventually("the GC knows lc2", WAIT, || async {
        gc_nib.controller(&lc2.id).expect("read").is_some()
    })
    .await;
    let key = HmacKey::from_secret_text(secret);
    let forged = |t: MessageType, from: &str, to: &str, p: Map| {
        let now = chrono::Utc::now();
        let mut e = Envelope::new(t, from, to, p, now);
        sign_hmac(&mut e, &key, None, now);
        e
    };
    let gc_link = ParentLink::new(&gc.grpc_url()).expect("url");
    // lc1, holding the network key, revokes its sibling at the GC in the RC's name.
    let mut p = Map::new();
    p.insert("kind".into(), "revoke_mqtt_credential".into());
    p.insert("controller_id".into(), lc2.id.clone().into());
    let r = gc_link
        .exchange(&forged(MessageType::SyncRequest, &rc.id, &gc.id, p))
        .await;
    assert_eq!(status_code(&r), Some(tonic::Code::Unauthenticated), "{r:?}");
    assert_eq!(
        gc_nib
            .controller(&lc2.id)
            .expect("read")
            .expect("lc2")
            .status,
        "active"
    );
    // ...or just a heartbeat as the RC (the RC and the GC share a pairwise key).
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let r = gc_link
        .exchange(&forged(MessageType::Heartbeat, &rc.id, &gc.id, p))
        .await;
    assert_eq!(status_code(&r), Some(tonic::Code::Unauthenticated), "{r:?}");
    // A report in lc2's name at the RC.
    let mut p = Map::new();
    p.insert("lc_id".into(), lc2.id.clone().into());
    p.insert("subnet".into(), "10.0.0.0/24".into());
    p.insert("region".into(), "zone-A".into());
    p.insert("timestamp".into(), format_iso(chrono::Utc::now()).into());
    p.insert(
        "new_devices".into(),
        Value::Array(vec![device(
            "02:cc:00:00:00:01",
            "10.0.0.9",
            &format_iso(chrono::Utc::now()),
        )]),
    );
    p.insert("updated_devices".into(), Value::Array(vec![]));
    p.insert("inactive_devices".into(), Value::Array(vec![]));
    let rc_link = ParentLink::new(&rc.grpc_url()).expect("url");
    let r = rc_link
        .exchange(&forged(MessageType::DiscoveryReport, &lc2.id, &rc.id, p))
        .await;
    assert_eq!(status_code(&r), Some(tonic::Code::Unauthenticated), "{r:?}");
    assert!(
        nib(&rc)
            .device("02:cc:00:00:00:01")
            .expect("read")
            .is_none()
    );
    // The deployment itself still works on its pairwise keys: lc2's heartbeats are
    // acknowledged.
    let before = common::num(&common::status(&lc2).await, &["heartbeats", "acked"]);
    eventually("lc2's heartbeats go on", WAIT, || async {
        common::num(&common::status(&lc2).await, &["heartbeats", "acked"]) > before
    })
    .await;
}

/// Finding: admin requests could be replayed after a restart (their nonces were kept in
/// memory). Now they are kept in the NIB's replay store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_cannot_be_replayed_after_a_restart() {
    use pdsno_shared::grpc::pb::admin_client::AdminClient;
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let key = pdsno_node::admin::read_key(&gc.data_dir).expect("admin key");
    let captured = pdsno_node::admin::request(&key, &gc.id, "status", &Value::Object(Map::new()));
    let send = |url: String, req: pdsno_shared::grpc::pb::AdminRequest| async move {
        let ch = tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut c = AdminClient::new(ch);
        c.command(req).await
    };
    send(gc.grpc_url(), captured.clone())
        .await
        .expect("the request itself is accepted");
    let again = send(gc.grpc_url(), captured.clone()).await;
    assert_eq!(
        again.as_ref().map_err(tonic::Status::code).err(),
        Some(tonic::Code::Unauthenticated)
    );
    // Restart on the same data directory: still spent.
    gc.proc.terminate(Duration::from_secs(10));
    let gc = lab.global(&[]);
    let replay = send(gc.grpc_url(), captured).await;
    match replay {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
            assert!(s.message().contains("replayed"), "{s:?}");
        }
        Ok(_) => panic!("a captured admin request was accepted again after a restart"),
    }
    // A fresh request works.
    let fresh = pdsno_node::admin::request(&key, &gc.id, "status", &Value::Object(Map::new()));
    send(gc.grpc_url(), fresh).await.expect("fresh request");
    // A request names its node: another node refuses it, even one given the same admin key.
    let rc_dir = lab.data("temp-rc-same-key");
    std::fs::create_dir_all(&rc_dir).expect("dir");
    std::fs::copy(gc.data_dir.join("admin.key"), rc_dir.join("admin.key"))
        .expect("copy the admin key");
    let rc = lab.child("regional", "temp-rc-same-key", &gc, "zone-A", &[]);
    let for_gc = pdsno_node::admin::request(&key, &gc.id, "status", &Value::Object(Map::new()));
    match send(rc.grpc_url(), for_gc).await {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
            assert!(s.message().contains("is for \"global_cntl_1\""), "{s:?}");
        }
        Ok(_) => panic!("a request for the GC was accepted by the RC"),
    }
    let for_rc = pdsno_node::admin::request(&key, &rc.id, "status", &Value::Object(Map::new()));
    send(rc.grpc_url(), for_rc)
        .await
        .expect("the RC's own request");
}

/// An admin request for `node` signed by hand with `key`, with its own nonce and signing
/// time (the wire format of `pdsno_node::admin::request`).
fn admin_request(
    key: &HmacKey,
    node: &str,
    command: &str,
    nonce: &str,
    signed_at: chrono::DateTime<chrono::Utc>,
) -> pdsno_shared::grpc::pb::AdminRequest {
    let signed_at = format_iso(signed_at);
    let mut m = Map::new();
    m.insert("args".into(), Value::Object(Map::new()));
    m.insert("command".into(), command.into());
    m.insert("node_id".into(), node.into());
    m.insert("nonce".into(), nonce.into());
    m.insert("signed_at".into(), signed_at.clone().into());
    let signature = pdsno_shared::signing::hmac_hex(
        key.expose_bytes(),
        &pdsno_shared::json::to_canonical_bytes(&Value::Object(m)),
    );
    pdsno_shared::grpc::pb::AdminRequest {
        command: command.into(),
        args_json: "{}".into(),
        nonce: nonce.into(),
        signed_at,
        signature,
        node_id: node.into(),
    }
}

/// The node's own admin service refuses what a client-side check would never send: a wrong
/// admin key, a tampered request, a request signed more than 5 minutes ago or ahead, a bad
/// nonce, a replay. Each is Unauthenticated with its own message, changes nothing, and the
/// node keeps serving proper requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_refuses_a_wrong_key_a_stale_time_and_a_replay() {
    use pdsno_shared::grpc::pb::admin_client::AdminClient;
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let key = pdsno_node::admin::read_key(&gc.data_dir).expect("admin key");
    let ch = tonic::transport::Endpoint::from_shared(gc.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let send = |req: pdsno_shared::grpc::pb::AdminRequest| {
        let mut c = AdminClient::new(ch.clone());
        async move { c.command(req).await }
    };
    let refused =
        |r: Result<tonic::Response<pdsno_shared::grpc::pb::AdminResponse>, tonic::Status>,
         message: &str,
         what: &str| match r {
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unauthenticated, "{what}: {s:?}");
                assert_eq!(s.message(), message, "{what}");
            }
            Ok(_) => panic!("{what}: accepted"),
        };
    let now = chrono::Utc::now();
    let nonce = |n: u32| format!("{n:032x}");

    // A key that is not the node's (the tool's own client, and by hand).
    let wrong = HmacKey::random();
    let err = pdsno_node::admin::call(
        &gc.grpc_url(),
        &wrong,
        "status",
        &Value::Object(Map::new()),
        Duration::from_secs(10),
    )
    .await
    .expect_err("a wrong admin key");
    assert!(
        err.contains("admin signature does not verify (wrong admin key?)"),
        "{err}"
    );
    let bad_sig = "admin signature does not verify (wrong admin key?)";
    refused(
        send(admin_request(&wrong, &gc.id, "status", &nonce(1), now)).await,
        bad_sig,
        "wrong key",
    );
    // The right key, but the command changed after signing.
    let mut tampered = admin_request(&key, &gc.id, "status", &nonce(2), now);
    tampered.command = "keys".into();
    refused(send(tampered).await, bad_sig, "tampered");
    // Signed too long ago, or ahead of the node's clock.
    let stale = "admin request too old or future-dated";
    let old = now - chrono::Duration::seconds(360);
    refused(
        send(admin_request(&key, &gc.id, "status", &nonce(3), old)).await,
        stale,
        "stale",
    );
    let ahead = now + chrono::Duration::seconds(360);
    refused(
        send(admin_request(&key, &gc.id, "status", &nonce(4), ahead)).await,
        stale,
        "future",
    );
    // Nonces: none, or longer than 128 characters.
    refused(
        send(admin_request(&key, &gc.id, "status", "", now)).await,
        "bad nonce",
        "empty nonce",
    );
    let long = "n".repeat(129);
    refused(
        send(admin_request(&key, &gc.id, "status", &long, now)).await,
        "bad nonce",
        "long nonce",
    );
    // Inside the window a request is served once; the same bytes again are a replay.
    let recent = now - chrono::Duration::seconds(200);
    let once = admin_request(&key, &gc.id, "status", &nonce(5), recent);
    send(once.clone())
        .await
        .expect("a request signed 200 s ago is in time");
    refused(send(once).await, "admin request replayed", "replay");
    // A refused request spent nothing: its nonce, properly signed and in time, is served.
    send(admin_request(&key, &gc.id, "status", &nonce(3), now))
        .await
        .expect("a stale request's nonce is not spent");
    let st = common::status(&gc).await;
    assert_eq!(
        st.get("controller_id").and_then(Value::as_str),
        Some(gc.id.as_str())
    );
}

/// One forged HEARTBEAT over REST from the local address `from`; returns the HTTP status.
async fn forged_rest(rest: std::net::SocketAddr, from: &str, sender: &str, to: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = HmacKey::from_secret_text("a key nobody in this deployment has");
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let now = chrono::Utc::now();
    let mut env = Envelope::new(MessageType::Heartbeat, sender, to, p, now);
    sign_hmac(&mut env, &key, None, now);
    let body = pdsno_shared::json::to_canonical_string(&env.to_value());
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind");
    let mut s = sock.connect(rest).await.expect("connect");
    let req = format!(
        "POST /message/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    std::str::from_utf8(out.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Finding: refusals were throttled per claimed sender, which the attacker chooses: ~880
/// signed audit rows a second from 4 addresses. Now they are throttled per source address,
/// and the node has one budget of refusal events (burst 30, then 1 a second) that reports
/// what it left out, by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgery_flood_grows_the_audit_log_by_a_bounded_amount() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--rate-limit-rps",
        "0",
        "--max-connections-per-address",
        "0",
    ]);
    let rest = gc.rest;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    // 1,000 forgeries with random senders from 100 addresses, 4 at a time.
    for w in 0..4u32 {
        let to = gc.id.clone();
        tasks.push(tokio::spawn(async move {
            for a in (1..=100u32).filter(|a| a % 4 == w) {
                let from = format!("127.0.0.{a}");
                for i in 0..10 {
                    let sender = format!("regional_cntl_zone-{a}_{i}");
                    assert_eq!(forged_rest(rest, &from, &sender, &to).await, 401);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("flood");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rows: Vec<Value> = nib(&gc)
        .events(0, 100_000)
        .expect("events")
        .into_iter()
        .filter(|e| e.event_type == "MESSAGE_REJECTED")
        .map(|e| pdsno_shared::json::parse(e.details.as_bytes()).expect("details"))
        .collect();
    let refused = rows.len();
    let bound = 30 + elapsed.ceil() as usize + 1;
    assert!(
        refused <= bound,
        "{refused} refusal events for 1,000 forgeries in {elapsed:.1} s (bound {bound})"
    );
    assert!(refused >= 30, "the first refusals are written: {refused}");
    // One event per address at most: the claimed sender changes nothing.
    let mut sources: Vec<&str> = rows
        .iter()
        .map(|d| d.get("source").and_then(Value::as_str).expect("source"))
        .collect();
    sources.sort_unstable();
    let n = sources.len();
    sources.dedup();
    assert_eq!(sources.len(), n, "an address written twice: {sources:?}");
    // What the budget left out is reported, by reason, in the next event written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        forged_rest(rest, "127.0.1.1", "regional_cntl_zone-9_1", &gc.id).await,
        401
    );
    let last = nib(&gc)
        .events(0, 100_000)
        .expect("events")
        .into_iter()
        .rev()
        .find(|e| e.event_type == "MESSAGE_REJECTED")
        .expect("an event");
    let details = pdsno_shared::json::parse(last.details.as_bytes()).expect("details");
    let left_out = details
        .get("suppressed_by_reason")
        .and_then(|m| m.get("bad_signature"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        left_out as usize + refused >= 100,
        "the budget left out {left_out}, {refused} written, of 100 addresses: {details:?}"
    );
}

/// Low finding: a local controller could agree a pairwise key directly with the GC,
/// around its RC. Keys are now agreed along the tree only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_controller_cannot_key_around_its_regional_controller() {
    use pdsno_shared::keyx;
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let rc = lab.child("regional", "temp-rc-k", &gc, "zone-A", &[]);
    let lc = lab.child("local", "temp-lc-k", &rc, "zone-A", &[]);
    let gc_nib = nib(&gc);
    eventually("the GC knows the LC", WAIT, || async {
        gc_nib.controller(&lc.id).expect("read").is_some()
    })
    .await;
    let key = identity_of(&lc);
    let now = chrono::Utc::now();
    let key_id = keyx::key_id(&lc.id, &gc.id, 1);
    let pending = keyx::offer(&key, &lc.id, &gc.id, &key_id, now);
    let mut env = Envelope::new(
        MessageType::KeyExchangeInit,
        lc.id.clone(),
        &gc.id,
        Map::new(),
        now,
    )
    .with_typed_payload(pending.offer())
    .expect("payload");
    sign_ed25519(&mut env, &key, None, now);
    let link = ParentLink::new(&gc.grpc_url()).expect("url");
    match link.key_exchange(&env).await {
        Err(LinkError::Status { code, message }) => {
            assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
            assert!(message.contains("neither our parent"), "{message}");
        }
        other => panic!("the GC agreed a key with an LC: {other:?}"),
    }
    assert!(
        gc_nib
            .pair_keys()
            .expect("keys")
            .iter()
            .all(|k| k.peer_id != lc.id)
    );
}
