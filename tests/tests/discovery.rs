//! Discovery, policy and liveness between real processes over the embedded broker (and an
//! external Mosquitto): devices reaching the RC and the GC inventory, the three-missed-cycles
//! rule, policy propagation with both signatures, refusal of forged and replayed reports,
//! a broker outage, and what an operator sees with mosquitto_sub.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use pdsno_node::transport::mqtt::{BrokerUrl, MqttClient, MqttSettings};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::SecretString;
use pdsno_shared::payload::discovery::{Device, DiscoveryMethod, DiscoveryReport};
use pdsno_shared::signing::sign_hmac;
use pdsno_shared::time::format_iso;
use pdsno_tests::{Lab, Mosquitto, NodeProc, run};

mod common;
use common::{events, eventually, metrics, nib, num, status};

const WAIT: Duration = Duration::from_secs(40);

/// Writes a device list for the file scanner.
fn write_devices(path: &Path, devices: &[(&str, &str)]) {
    let list: Vec<String> = devices
        .iter()
        .map(|(mac, ip)| {
            format!(
                r#"{{"mac":"{mac}","ip":"{ip}","hostname":"h-{}"}}"#,
                &mac[12..]
            )
        })
        .collect();
    // Write then rename: a scan never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("[{}]", list.join(","))).expect("write devices");
    std::fs::rename(&tmp, path).expect("rename");
}

fn file_args(file: &Path) -> Vec<String> {
    vec![
        "--scanner".into(),
        "file".into(),
        "--scan-file".into(),
        file.display().to_string(),
        "--discovery-interval".into(),
        "0.3".into(),
        "--heartbeat-interval".into(),
        "0.2".into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Active MACs `node` stores, optionally only those `lc` reports.
fn active(node: &NodeProc, lc: Option<&str>) -> BTreeSet<String> {
    nib(node)
        .devices(lc)
        .expect("devices")
        .into_iter()
        .filter(|d| d.status == pdsno_node::nib::DeviceStatus::Active)
        .map(|d| d.device.mac)
        .collect()
}

fn inventory(gc: &NodeProc, status: &str) -> BTreeSet<String> {
    nib(gc)
        .inventory()
        .expect("inventory")
        .into_iter()
        .filter(|r| r.status == status)
        .map(|r| r.mac)
        .collect()
}

fn set(macs: &[&str]) -> BTreeSet<String> {
    macs.iter().map(|m| (*m).to_owned()).collect()
}

async fn regional(lab: &Lab, gc: &NodeProc) -> NodeProc {
    lab.child(
        "regional",
        "temp-rc-a",
        gc,
        "zone-A",
        &["--heartbeat-interval", "0.2", "--summary-interval", "0.3"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reach_the_rc_and_the_global_inventory() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let rc = regional(&lab, &gc).await;
    let f1 = lab.dir.path().join("lc1.json");
    let f2 = lab.dir.path().join("lc2.json");
    let one = [
        ("02:00:00:00:10:01", "10.1.0.1"),
        ("02:00:00:00:10:02", "10.1.0.2"),
        ("02:00:00:00:10:03", "10.1.0.3"),
    ];
    let two = [
        ("02:00:00:00:20:01", "10.2.0.1"),
        ("02:00:00:00:20:02", "10.2.0.2"),
    ];
    write_devices(&f1, &one);
    write_devices(&f2, &two);
    let a1 = file_args(&f1);
    let a2 = file_args(&f2);
    let mut lc1 = lab.child("local", "temp-lc-1", &rc, "zone-A", &strs(&a1));
    let lc2 = lab.child("local", "temp-lc-2", &rc, "zone-A", &strs(&a2));
    let want1 = set(&one.map(|d| d.0));
    let want2 = set(&two.map(|d| d.0));
    eventually("the RC has both LCs' devices", WAIT, || {
        let ok = active(&rc, Some(&lc1.id)) == want1 && active(&rc, Some(&lc2.id)) == want2;
        async move { ok }
    })
    .await;
    let all: BTreeSet<String> = want1.union(&want2).cloned().collect();
    eventually("the GC inventory has them", WAIT, || {
        let ok = inventory(&gc, "active") == all;
        async move { ok }
    })
    .await;
    // The LC stores what it found.
    assert_eq!(active(&lc1, None), want1);
    assert_eq!(num(&status(&lc1).await, &["discovery", "outbox"]), Some(0));
    lc1.proc
        .wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    let mqtt_before = num(&status(&lc1).await, &["transport", "sent", "mqtt"]).unwrap_or(0);

    // A change at the edge travels up: an address change and a new device.
    let one_b = [
        ("02:00:00:00:10:01", "10.1.0.101"),
        ("02:00:00:00:10:02", "10.1.0.2"),
        ("02:00:00:00:10:03", "10.1.0.3"),
        ("02:00:00:00:10:04", "10.1.0.4"),
    ];
    write_devices(&f1, &one_b);
    eventually("the change reaches the GC", WAIT, || {
        let inv = nib(&gc).inventory().expect("inventory");
        let ok = inv
            .iter()
            .any(|r| r.mac == "02:00:00:00:10:01" && r.ip.as_deref() == Some("10.1.0.101"))
            && inv.iter().any(|r| r.mac == "02:00:00:00:10:04");
        async move { ok }
    })
    .await;
    // That report went over the broker, and was acknowledged there.
    let st = status(&lc1).await;
    assert!(
        num(&st, &["transport", "sent", "mqtt"]).unwrap_or(0) > mqtt_before,
        "{st:?}"
    );
    let row = nib(&rc)
        .device("02:00:00:00:10:01")
        .expect("row")
        .expect("device");
    assert_eq!(row.device.ip, "10.1.0.101");
    assert_eq!(row.lc_id, lc1.id);
    // The operator's view: `pdsno status` against the GC's gRPC URL.
    eventually(
        "the status tree shows both LCs online with devices",
        WAIT,
        || {
            let (gc, lc1, lc2) = (&gc, &lc1, &lc2);
            async move {
                let (code, out, _) = run(
                    &pdsno_tests::pdsno_bin().display().to_string(),
                    &[
                        "status",
                        "--connect",
                        &gc.grpc_url(),
                        "--admin-key-file",
                        &gc.data_dir.join("admin.key").display().to_string(),
                    ],
                    Duration::from_secs(20),
                );
                code == Some(0)
                    && out.lines().any(|l| {
                        l.contains(&lc1.id) && l.contains(" online ") && l.contains("devices 4")
                    })
                    && out.lines().any(|l| {
                        l.contains(&lc2.id) && l.contains(" online ") && l.contains("devices 2")
                    })
                    && out.contains("inventory zone-A=6")
            }
        },
    )
    .await;
    // Without the admin key it is refused.
    let (code, _, err) = run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        &["status", "--connect", &gc.grpc_url()],
        Duration::from_secs(20),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("admin key"), "{err}");
    // Nothing was refused on the way.
    let rst = status(&rc).await;
    let rejected = rst
        .get("received")
        .and_then(|r| r.get("rejected"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    assert!(rejected.is_empty(), "{rejected:?}");
    // Reports, acknowledgements, heartbeats and policy all stayed inside the controllers'
    // topic rights on the embedded broker.
    let text = metrics(&gc);
    assert!(
        text.contains("pdsno_broker_refused_total{reason=\"not_authorized\"} 0\n"),
        "{text}"
    );
}

/// Runs `pdsno local ... --scan-once`; returns its stdout.
fn scan_once(lab: &Lab, rc: &NodeProc, file: &Path) -> String {
    let token = lab.token_for(rc, "temp-lc-once", "zone-A", "local");
    let (code, out, err) = scan_once_run(lab, &rc.grpc_url(), &token, file);
    assert_eq!(code, Some(0), "scan-once failed:\n{out}\n{err}");
    assert!(out.contains("scan-once delivered=true"), "{out}");
    out
}

/// Runs `pdsno local ... --scan-once` under the parent at `url`; returns (exit code, stdout,
/// stderr).
fn scan_once_run(lab: &Lab, url: &str, token: &str, file: &Path) -> (Option<i32>, String, String) {
    let data = lab.data("temp-lc-once").display().to_string();
    let f = file.display().to_string();
    // The configured addresses are taken (say, by the daemon of this controller on another
    // data directory): a one-shot run binds none of them.
    let held_grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held_rest = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let g = held_grpc.local_addr().expect("addr").to_string();
    let r = held_rest.local_addr().expect("addr").to_string();
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        &[
            "local",
            "--data-dir",
            &data,
            "--listen-grpc",
            &g,
            "--listen-rest",
            &r,
            "--parent",
            url,
            "--region",
            "zone-A",
            "--temp-id",
            "temp-lc-once",
            "--bootstrap-token",
            token,
            "--scanner",
            "file",
            "--scan-file",
            &f,
            "--scan-once",
        ],
        Duration::from_secs(90),
    )
}

fn cycle_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("discovery cycle="))
        .unwrap_or_else(|| panic!("no cycle line in {out}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_goes_inactive_after_exactly_three_missed_cycles() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let rc = regional(&lab, &gc).await;
    let file = lab.dir.path().join("once.json");
    let (a, b) = ("02:00:00:00:30:0a", "02:00:00:00:30:0b");
    write_devices(&file, &[(a, "10.3.0.10"), (b, "10.3.0.11")]);
    let out = scan_once(&lab, &rc, &file);
    assert!(cycle_line(&out).contains("cycle=1 seen=2 new=2"), "{out}");
    let lc_id = out
        .lines()
        .find_map(|l| l.strip_prefix("admitted id="))
        .and_then(|l| l.split(' ').next())
        .expect("admitted")
        .to_owned();
    assert_eq!(active(&rc, Some(&lc_id)), set(&[a, b]));

    // b is gone: two missed cycles change nothing upstream...
    write_devices(&file, &[(a, "10.3.0.10")]);
    for cycle in 2..=3 {
        let out = scan_once(&lab, &rc, &file);
        let line = cycle_line(&out);
        assert!(
            line.contains(&format!("cycle={cycle} "))
                && line.contains("inactive=0")
                && line.ends_with("report=-"),
            "{line}"
        );
        assert_eq!(active(&rc, Some(&lc_id)), set(&[a, b]), "cycle {cycle}");
    }
    // ...the third one reports it inactive, and the RC marks it so.
    let out = scan_once(&lab, &rc, &file);
    let line = cycle_line(&out);
    assert!(
        line.contains("cycle=4 ") && line.contains("inactive=1"),
        "{line}"
    );
    assert_eq!(active(&rc, Some(&lc_id)), set(&[a]));
    let row = nib(&rc).device(b).expect("row").expect("b");
    assert_eq!(row.status, pdsno_node::nib::DeviceStatus::Inactive);
    eventually("the GC inventory marks it inactive", WAIT, || {
        let ok = inventory(&gc, "inactive").contains(b) && inventory(&gc, "active").contains(a);
        async move { ok }
    })
    .await;
    // Back again: active at once.
    write_devices(&file, &[(a, "10.3.0.10"), (b, "10.3.0.11")]);
    let out = scan_once(&lab, &rc, &file);
    assert!(cycle_line(&out).contains("updated=1"), "{out}");
    assert_eq!(active(&rc, Some(&lc_id)), set(&[a, b]));
}

/// `--scan-once` whose report nobody acknowledges (the RC is down) exits with code 4,
/// says so, and keeps the report queued; the next run, with the RC back, delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_once_exits_4_and_keeps_an_undelivered_report_queued() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let listen = format!("127.0.0.1:{}", pdsno_tests::free_port_for_late_server());
    let mut rc = lab.child(
        "regional",
        "temp-rc-a",
        &gc,
        "zone-A",
        &["--listen-grpc", &listen],
    );
    let url = rc.grpc_url();
    let token = lab.token_for(&rc, "temp-lc-once", "zone-A", "local");
    let file = lab.dir.path().join("once.json");
    let (a, b) = ("02:00:00:00:31:0a", "02:00:00:00:31:0b");
    write_devices(&file, &[(a, "10.3.1.10")]);
    let out = scan_once(&lab, &rc, &file);
    assert!(cycle_line(&out).contains("cycle=1 seen=1 new=1"), "{out}");

    // The RC goes away; the next cycle sees b, and nobody acknowledges its report.
    rc.proc.kill();
    write_devices(&file, &[(a, "10.3.1.10"), (b, "10.3.1.11")]);
    let (code, out, err) = scan_once_run(&lab, &url, &token, &file);
    assert_eq!(code, Some(4), "{out}\n{err}");
    assert!(out.contains("scan-once delivered=false"), "{out}");
    assert!(cycle_line(&out).contains("cycle=2 seen=2 new=1"), "{out}");
    assert!(
        err.contains("the discovery report was not acknowledged; it stays queued for the next run"),
        "{err}"
    );
    let lc_nib = pdsno_node::nib::Nib::open(lab.data("temp-lc-once").join("nib.db")).expect("nib");
    assert!(
        lc_nib.outbox_len().expect("outbox") >= 1,
        "the report is queued"
    );
    drop(lc_nib);

    // The RC is back: the next run delivers what was queued.
    let p = lab.spawn("regional", "temp-rc-a", &["--listen-grpc", &listen]);
    let rc = lab.ready(p, "temp-rc-a");
    let out = scan_once(&lab, &rc, &file);
    assert!(cycle_line(&out).contains("cycle=3 "), "{out}");
    let lc_nib = pdsno_node::nib::Nib::open(lab.data("temp-lc-once").join("nib.db")).expect("nib");
    assert_eq!(
        lc_nib.outbox_len().expect("outbox"),
        0,
        "nothing left queued"
    );
    assert!(active(&rc, None).contains(b), "b reached the RC");
}

/// An MQTT client logged in as the lab operator.
async fn operator(broker: std::net::SocketAddr) -> MqttClient {
    let url = BrokerUrl::parse(&format!("mqtt://{broker}")).expect("url");
    let mut s = MqttSettings::new(url, "ops-test");
    s.username = Some("ops".into());
    s.password = Some(SecretString::new("ops-password"));
    let (c, _t) = MqttClient::start(s).expect("client");
    c.wait_connected(Duration::from_secs(10))
        .await
        .expect("operator connects");
    c
}

/// `pdsno policy set` with `policy` (JSON text) at the GC; its standard output.
fn policy_set(lab: &Lab, gc: &NodeProc, policy: &str) -> String {
    let file = lab.dir.path().join("policy.json");
    std::fs::write(&file, policy).expect("write the policy file");
    let (code, out, err) = run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        &[
            "policy",
            "set",
            &file.display().to_string(),
            "--data-dir",
            &gc.data_dir.display().to_string(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{out} {err}");
    out
}

fn applied_versions(p: &pdsno_tests::Proc) -> Vec<u64> {
    p.lines()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("policy version=")
                .and_then(|r| r.strip_suffix(" applied"))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reaches_every_lc_and_stale_or_forged_copies_are_refused() {
    let lab = Lab::new();
    let gc = lab.global(&["--user", "ops:ops-password"]);
    let rc = regional(&lab, &gc).await;
    let hb = ["--heartbeat-interval", "0.2", "--discovery-interval", "5"];
    let lc1 = lab.child("local", "temp-lc-p1", &rc, "zone-A", &hb);
    let lc2 = lab.child("local", "temp-lc-p2", &rc, "zone-A", &hb);
    for lc in [&lc1, &lc2] {
        eventually("the default policy (v1) at the LC", WAIT, || {
            let ok = applied_versions(&lc.proc).contains(&1);
            async move { ok }
        })
        .await;
    }
    // A new version from the operator reaches every LC, both signatures checked.
    let v2 = r#"{"discovery":{"missed_cycles_before_inactive":3},"label":"v2"}"#;
    let out = policy_set(&lab, &gc, v2);
    assert!(out.contains("policy version 2 published"), "{out}");
    for lc in [&lc1, &lc2] {
        eventually("v2 at the LC", WAIT, || {
            let ok = applied_versions(&lc.proc).contains(&2);
            async move { ok }
        })
        .await;
        let st = status(lc).await;
        assert_eq!(num(&st, &["policy_version"]), Some(2));
    }
    let lc_policy = nib(&lc1)
        .current_policy("regional")
        .expect("nib")
        .expect("stored");
    assert_eq!(lc_policy.0, 2);
    let stored = Envelope::from_slice(lc_policy.1.as_bytes()).expect("envelope");
    assert_eq!(stored.sender_id, rc.id, "the LC keeps the RC's copy");
    let origin = Envelope::from_value(stored.payload["origin"].clone()).expect("origin");
    assert_eq!(
        origin.sender_id, gc.id,
        "...with the GC's signed original inside"
    );
    assert_eq!(origin.payload["content"], stored.payload["content"]);

    // Old versions, re-published by someone with broker access, change nothing.
    let ops = operator(gc.mqtt.expect("broker")).await;
    let old_regional = {
        let n = nib(&rc);
        let c = n.conn();
        let text: String = c
            .query_row(
                "SELECT envelope FROM policies WHERE policy_id = 'regional' AND policy_version = 1",
                [],
                |r| r.get(0),
            )
            .expect("v1 regional copy");
        text
    };
    let old_global = {
        let n = nib(&gc);
        let c = n.conn();
        let text: String = c
            .query_row(
                "SELECT envelope FROM policies WHERE policy_id = 'global' AND policy_version = 1",
                [],
                |r| r.get(0),
            )
            .expect("v1");
        text
    };
    // The counters already moved at start (a node gets its policy through more than one
    // path): only growth from here is evidence.
    let stale_at = |st: &Value| num(st, &["policy", "ignored_stale"]).unwrap_or(0);
    let (rc_stale, lc_stale) = (stale_at(&status(&rc).await), stale_at(&status(&lc1).await));
    ops.publish_confirmed("pdsno/policy/global", old_global.clone(), 1, false)
        .await
        .expect("publish");
    ops.publish_confirmed("pdsno/policy/zone-A", old_regional.clone(), 1, false)
        .await
        .expect("publish");
    eventually("the stale copies are seen and ignored", WAIT, || {
        let (rc, lc1) = (&rc, &lc1);
        async move {
            stale_at(&status(rc).await) > rc_stale && stale_at(&status(lc1).await) > lc_stale
        }
    })
    .await;
    let refused_at = |st: &Value| num(st, &["policy", "refused"]).unwrap_or(0);
    let refused_before = [
        refused_at(&status(&lc1).await),
        refused_at(&status(&lc2).await),
    ];

    // A tampered copy (content changed after signing) is refused.
    let mut forged = stored.clone();
    let mut content = forged.payload["content"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    content.insert("label".into(), "v3-forged".into());
    forged
        .payload
        .insert("content".into(), Value::Object(content));
    forged.payload.insert("policy_version".into(), 3u64.into());
    ops.publish_confirmed("pdsno/policy/zone-A", forged.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // A copy properly signed by the RC's own key but whose "GC original" is forged: the
    // provenance check refuses it.
    let rc_key = pdsno_node::identity::load_or_create(&rc.data_dir)
        .expect("rc identity")
        .0;
    let rogue_root = pdsno_shared::keys::IdentityKey::generate();
    let mut fake_origin = origin.clone();
    fake_origin
        .payload
        .insert("policy_version".into(), 4u64.into());
    pdsno_shared::signing::sign_ed25519(&mut fake_origin, &rogue_root, None, chrono::Utc::now());
    let mut copy = stored.clone();
    copy.payload.insert("policy_version".into(), 4u64.into());
    copy.payload.insert("origin".into(), fake_origin.to_value());
    pdsno_shared::signing::sign_ed25519(&mut copy, &rc_key, None, chrono::Utc::now());
    ops.publish_confirmed("pdsno/policy/zone-A", copy.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // A compromised RC wraps the GC's genuine v2 original but signs a copy that says
    // something else: other content at a higher version, or the same content at a higher
    // version. Both signatures verify; the copy differs from the original, so it is refused.
    for (label, version) in [("v5-rc-content", 5u64), ("v2", 6)] {
        let mut lie = stored.clone();
        let mut content = lie.payload["content"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        content.insert("label".into(), label.into());
        lie.payload.insert("content".into(), Value::Object(content));
        lie.payload.insert("policy_version".into(), version.into());
        assert_eq!(lie.payload["origin"], stored.payload["origin"]);
        pdsno_shared::signing::sign_ed25519(&mut lie, &rc_key, None, chrono::Utc::now());
        ops.publish_confirmed("pdsno/policy/zone-A", lie.to_json_bytes(), 1, false)
            .await
            .expect("publish");
    }
    eventually("all four forgeries refused at each LC", WAIT, || {
        let (lc1, lc2) = (&lc1, &lc2);
        async move {
            refused_at(&status(lc1).await) >= refused_before[0] + 4
                && refused_at(&status(lc2).await) >= refused_before[1] + 4
        }
    })
    .await;
    for lc in [&lc1, &lc2] {
        assert_eq!(num(&status(lc).await, &["policy_version"]), Some(2));
        assert!(!applied_versions(&lc.proc).iter().any(|v| *v > 2));
    }
    // Audited: the GC published v2, the RC received it, each LC applied it once (and none
    // of the forgeries).
    let versions = |n: &NodeProc, t: &str| -> Vec<String> {
        events(n, t)
            .into_iter()
            .filter_map(|(e, _)| e.decision)
            .collect()
    };
    assert!(versions(&gc, "POLICY_PUBLISHED").contains(&"2".to_owned()));
    assert_eq!(
        versions(&rc, "POLICY_RECEIVED")
            .iter()
            .filter(|v| *v == "2")
            .count(),
        1
    );
    for lc in [&lc1, &lc2] {
        let applied = versions(lc, "POLICY_APPLIED");
        assert_eq!(
            applied.iter().filter(|v| *v == "2").count(),
            1,
            "{applied:?}"
        );
        assert!(applied.iter().all(|v| v == "1" || v == "2"), "{applied:?}");
    }
    // The four refusals are audited, throttled per sender: one event now, and the next
    // refusal after the throttle window reports the three it left out.
    let refusals = |n: &NodeProc| -> Vec<Value> {
        events(n, "MESSAGE_REJECTED")
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.get("reason").and_then(Value::as_str) == Some("policy_refused"))
            .collect()
    };
    let first = refusals(&lc1);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(num(&first[0], &["suppressed"]), Some(0), "{first:?}");
    tokio::time::sleep(pdsno_node::audit::THROTTLE + Duration::from_millis(500)).await;
    ops.publish_confirmed("pdsno/policy/zone-A", forged.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    eventually("the next policy refusal is audited", WAIT, || {
        let n = refusals(&lc1).len();
        async move { n == 2 }
    })
    .await;
    let next = refusals(&lc1);
    assert_eq!(num(&next[1], &["suppressed"]), Some(3), "{next:?}");
    ops.shutdown().await;

    // A controller that was away gets the current policy when it comes back.
    let mut lc2 = lc2;
    lc2.proc.kill();
    policy_set(&lab, &gc, v2);
    let p = lab.spawn("local", "temp-lc-p2", &hb);
    let back = lab.ready(p, "temp-lc-p2");
    eventually("v3 after the restart", WAIT, || {
        let ok = applied_versions(&back.proc).contains(&3);
        async move { ok }
    })
    .await;
}

/// A report from `lc` signed with its pairwise key (read from its NIB).
fn signed_report(lc: &NodeProc, rc_id: &str, macs: &[&str]) -> Envelope {
    let key = nib(lc)
        .pair_keys()
        .expect("keys")
        .into_iter()
        .find(|k| k.peer_id == rc_id && k.state == pdsno_node::nib::KeyState::Current)
        .expect("the LC's current key");
    let now = chrono::Utc::now();
    let devices = macs
        .iter()
        .enumerate()
        .map(|(i, m)| Device {
            ip: format!("10.9.0.{}", i + 1),
            mac: (*m).to_owned(),
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
        })
        .collect();
    let mut extra = Map::new();
    extra.insert(
        "report_id".into(),
        format!("test-{}", &pdsno_shared::ids::message_id()[4..]).into(),
    );
    let report = DiscoveryReport {
        lc_id: lc.id.clone(),
        subnet: "10.9.0.0/24".into(),
        region: "zone-A".into(),
        timestamp: format_iso(now),
        new_devices: devices,
        updated_devices: vec![],
        inactive_devices: vec![],
        extra,
    };
    let mut env = Envelope::new(
        MessageType::DiscoveryReport,
        lc.id.clone(),
        rc_id,
        typed_to_map(&report).expect("payload"),
        now,
    );
    sign_hmac(&mut env, &key.key, Some(&key.key_id), now);
    env
}

fn rejected(st: &Value, reason: &str) -> u64 {
    num(st, &["received", "rejected", reason]).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_misrouted_unsigned_and_replayed_reports_are_refused_and_counted() {
    let lab = Lab::new();
    let gc = lab.global(&["--user", "ops:ops-password"]);
    let rc = regional(&lab, &gc).await;
    let quiet = [
        "--heartbeat-interval",
        "0.2",
        "--discovery-interval",
        "3600",
    ];
    let mut rc = rc;
    let mut lc1 = lab.child("local", "temp-lc-f1", &rc, "zone-A", &quiet);
    let lc2 = lab.child("local", "temp-lc-f2", &rc, "zone-A", &quiet);
    lc1.proc.wait_line(WAIT, |l| l.starts_with("key "));
    // Non-retained messages reach only subscribers that are there.
    rc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    let ops = operator(gc.mqtt.expect("broker")).await;
    let topic1 = format!("pdsno/discovery/zone-A/{}", lc1.id);
    let topic2 = format!("pdsno/discovery/zone-A/{}", lc2.id);

    // A good one, for reference: accepted.
    let good = signed_report(&lc1, &rc.id, &["02:00:00:00:40:01"]);
    ops.publish_confirmed(topic1.clone(), good.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    let deadline = Instant::now() + WAIT;
    while nib(&rc).device("02:00:00:00:40:01").expect("row").is_none() {
        assert!(
            Instant::now() < deadline,
            "the good report was not applied: {:?}\n{}",
            status(&rc).await,
            rc.proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. LC1's report on LC2's topic.
    let misrouted = signed_report(&lc1, &rc.id, &["02:00:00:00:40:02"]);
    ops.publish_confirmed(topic2.clone(), misrouted.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // 2. Unsigned.
    let mut unsigned = signed_report(&lc1, &rc.id, &["02:00:00:00:40:03"]);
    unsigned.clear_signature();
    ops.publish_confirmed(topic1.clone(), unsigned.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // 3. Tampered after signing.
    let mut tampered = signed_report(&lc1, &rc.id, &["02:00:00:00:40:04"]);
    tampered
        .payload
        .insert("subnet".into(), "10.66.0.0/16".into());
    ops.publish_confirmed(topic1.clone(), tampered.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // 4. The good report again, byte for byte.
    ops.publish_confirmed(topic1.clone(), good.to_json_bytes(), 1, false)
        .await
        .expect("publish");
    // 5. Not even an envelope.
    ops.publish_confirmed(
        topic1.clone(),
        b"{\"not\": \"an envelope\"".to_vec(),
        1,
        false,
    )
    .await
    .expect("publish");

    eventually("every refusal counted", WAIT, || {
        let rc = &rc;
        async move {
            let st = status(rc).await;
            rejected(&st, "wrong_topic") >= 1
                && rejected(&st, "unsigned") >= 1
                && rejected(&st, "bad_signature") >= 1
                && rejected(&st, "replay") >= 1
                && rejected(&st, "malformed") >= 1
        }
    })
    .await;
    for mac in [
        "02:00:00:00:40:02",
        "02:00:00:00:40:03",
        "02:00:00:00:40:04",
    ] {
        assert!(
            nib(&rc).device(mac).expect("row").is_none(),
            "{mac} was stored"
        );
    }
    // The same checks on the direct path: a tampered report over gRPC is refused.
    let mut t2 = signed_report(&lc1, &rc.id, &["02:00:00:00:40:05"]);
    t2.payload.insert("region".into(), "zone-B".into());
    let link = ParentLink::new(&rc.grpc_url()).expect("url");
    match link.exchange(&t2).await {
        Err(LinkError::Status { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => panic!("a tampered report was accepted: {other:?}"),
    }
    // ...and a genuine one through the same path is acknowledged.
    let fine = signed_report(&lc1, &rc.id, &["02:00:00:00:40:06"]);
    let ack = link
        .exchange(&fine)
        .await
        .expect("accepted")
        .expect("an ack");
    assert_eq!(ack.message_type, MessageType::DiscoveryReportAck);
    assert_eq!(ack.payload["devices_processed"].as_u64(), Some(1));
    ops.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_broker_outage_loses_no_report_and_policy_resyncs() {
    let port = pdsno_tests::free_port_for_late_server();
    let mut broker = Mosquitto::start(port);
    let url = format!("mqtt://127.0.0.1:{port}");
    let lab = Lab::new();
    let rc_port = pdsno_tests::free_port_for_late_server();
    let rc_listen = format!("127.0.0.1:{rc_port}");
    let gc = lab.global(&["--no-embedded-broker", "--mqtt-url", &url]);
    let rc_args = [
        "--heartbeat-interval",
        "0.2",
        "--summary-interval",
        "0.3",
        "--listen-grpc",
        &rc_listen,
    ];
    let mut rc = lab.child("regional", "temp-rc-o", &gc, "zone-A", &rc_args);
    let file = lab.dir.path().join("o.json");
    let mut devices: Vec<(String, String)> = vec![("02:00:00:00:50:00".into(), "10.5.0.1".into())];
    let view = |d: &[(String, String)]| {
        d.iter()
            .map(|(m, i)| (m.clone(), i.clone()))
            .collect::<Vec<_>>()
    };
    let write = |d: &[(String, String)]| {
        let v: Vec<(&str, &str)> = d.iter().map(|(m, i)| (m.as_str(), i.as_str())).collect();
        write_devices(&file, &v);
    };
    write(&devices);
    let a = file_args(&file);
    let mut lc = lab.child("local", "temp-lc-o", &rc, "zone-A", &strs(&a));
    for p in [&mut rc.proc, &mut lc.proc] {
        p.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    }
    eventually("the first device at the RC", WAIT, || {
        let ok = active(&rc, None).contains("02:00:00:00:50:00");
        async move { ok }
    })
    .await;

    // 1. The broker goes away: reports go straight to the RC over gRPC.
    broker.proc.kill();
    devices.push(("02:00:00:00:50:01".into(), "10.5.0.2".into()));
    write(&view(&devices));
    eventually("delivered over gRPC while the broker is down", WAIT, || {
        let ok = active(&rc, None).contains("02:00:00:00:50:01");
        async move { ok }
    })
    .await;
    assert!(num(&status(&lc).await, &["transport", "sent", "grpc"]).unwrap_or(0) > 0);

    // 2. The RC goes away too: reports queue in the LC's NIB, none is lost.
    rc.proc.kill();
    for i in 2..6 {
        devices.push((format!("02:00:00:00:50:0{i}"), format!("10.5.0.{}", i + 1)));
        write(&view(&devices));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let queued = num(&status(&lc).await, &["discovery", "outbox"]).unwrap_or(0);
    assert!(
        queued >= 2,
        "reports should wait in the outbox, found {queued}"
    );
    // Meanwhile the operator publishes a policy: the GC cannot reach anyone.
    policy_set(&lab, &gc, r#"{"label":"during the outage"}"#);

    // 3. Both come back: the queue drains, every device arrives, the policy re-syncs.
    let _broker = Mosquitto::start(port);
    let p = lab.spawn("regional", "temp-rc-o", &rc_args);
    let rc = lab.ready(p, "temp-rc-o");
    let want: BTreeSet<String> = devices.iter().map(|d| d.0.clone()).collect();
    eventually("every queued report delivered", WAIT, || {
        let ok = active(&rc, Some(&lc.id)) == want;
        async move { ok }
    })
    .await;
    eventually("the outbox drains", WAIT, || {
        let lc = &lc;
        async move { num(&status(lc).await, &["discovery", "outbox"]) == Some(0) }
    })
    .await;
    eventually("the policy reaches the LC", WAIT, || {
        let ok = applied_versions(&lc.proc).contains(&2);
        async move { ok }
    })
    .await;
    eventually("the GC inventory is complete", WAIT, || {
        let ok = inventory(&gc, "active") == want;
        async move { ok }
    })
    .await;
}

/// With the broker down but the controllers up, a policy travels the whole tree over gRPC:
/// the GC pushes it to its RC, which applies it and pushes its own signed copy to its LC
/// (the same hand-on as after an MQTT delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_is_pushed_down_the_tree_over_grpc_while_the_broker_is_down() {
    let port = pdsno_tests::free_port_for_late_server();
    let mut broker = Mosquitto::start(port);
    let url = format!("mqtt://127.0.0.1:{port}");
    let lab = Lab::new();
    let gc = lab.global(&["--no-embedded-broker", "--mqtt-url", &url]);
    let mut rc = lab.child("regional", "temp-rc-g", &gc, "zone-A", &[]);
    let mut lc = lab.child("local", "temp-lc-g", &rc, "zone-A", &[]);
    for p in [&mut rc.proc, &mut lc.proc] {
        p.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    }
    eventually("the default policy at the LC", WAIT, || {
        let ok = applied_versions(&lc.proc).contains(&1);
        async move { ok }
    })
    .await;

    broker.proc.kill();
    policy_set(&lab, &gc, r#"{"label":"pushed"}"#);
    eventually("the RC applies and hands on version 2", WAIT, || {
        let ok = rc
            .proc
            .lines()
            .iter()
            .any(|l| l.starts_with("policy version=2 republished region=zone-A"));
        async move { ok }
    })
    .await;
    eventually(
        "the LC applies version 2 with the broker still down",
        WAIT,
        || {
            let ok = applied_versions(&lc.proc).contains(&2);
            async move { ok }
        },
    )
    .await;
    assert!(
        num(&status(&rc).await, &["transport", "sent", "grpc"]).unwrap_or(0) > 0,
        "the RC pushed over gRPC"
    );
}

/// Controllers pointed at a broker cluster fail over to its next member when theirs dies,
/// and reports keep flowing over MQTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_fail_over_to_the_next_broker_of_a_cluster() {
    let mut a = Mosquitto::start(0);
    let b = Mosquitto::start(0);
    let cluster = format!("mqtt://{},mqtt://{}", a.addr, b.addr);
    let lab = Lab::new();
    let gc = lab.global(&["--no-embedded-broker", "--mqtt-url", &cluster]);
    let rc_args = ["--heartbeat-interval", "0.2", "--summary-interval", "0.3"];
    let mut rc = lab.child("regional", "temp-rc-f", &gc, "zone-A", &rc_args);
    let file = lab.dir.path().join("f.json");
    let mut devices = vec![("02:00:00:00:70:01", "10.7.0.1")];
    write_devices(&file, &devices);
    let a_args = file_args(&file);
    let mut lc = lab.child("local", "temp-lc-f", &rc, "zone-A", &strs(&a_args));
    let on = |addr: std::net::SocketAddr| format!("mqtt connected broker={addr}");
    for p in [&mut rc.proc, &mut lc.proc] {
        p.wait_line(WAIT, |l| l == on(a.addr));
    }
    eventually("the first device at the RC", WAIT, || {
        let ok = active(&rc, None).contains("02:00:00:00:70:01");
        async move { ok }
    })
    .await;

    a.proc.kill();
    for p in [&mut rc.proc, &mut lc.proc] {
        p.wait_line(WAIT, |l| l == on(b.addr));
    }
    let mqtt_before = num(&status(&lc).await, &["transport", "sent", "mqtt"]).unwrap_or(0);
    devices.push(("02:00:00:00:70:02", "10.7.0.2"));
    write_devices(&file, &devices);
    eventually(
        "the new device at the RC, sent over MQTT via b",
        WAIT,
        || {
            let lc = &lc;
            let ok = active(&rc, None).contains("02:00:00:00:70:02");
            async move {
                ok && num(&status(lc).await, &["transport", "sent", "mqtt"]).unwrap_or(0)
                    > mqtt_before
            }
        },
    )
    .await;
}

/// A lab with no broker at all: admission, discovery up to the GC inventory, a policy to
/// the LC and liveness (heartbeats), over gRPC alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_free_topology_works_over_grpc_alone() {
    let lab = Lab::new();
    let gc = lab.global(&["--no-embedded-broker"]);
    assert!(gc.mqtt.is_none());
    let mut rc = lab.child(
        "regional",
        "temp-rc-n",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.2", "--summary-interval", "0.3"],
    );
    let file = lab.dir.path().join("n.json");
    let devices = [
        ("02:00:00:00:60:01", "10.6.0.1"),
        ("02:00:00:00:60:02", "10.6.0.2"),
    ];
    write_devices(&file, &devices);
    let a = file_args(&file);
    let mut lc = lab.child("local", "temp-lc-n", &rc, "zone-A", &strs(&a));
    let want = set(&devices.map(|d| d.0));
    eventually("devices at the RC and in the GC inventory", WAIT, || {
        let ok = active(&rc, Some(&lc.id)) == want && inventory(&gc, "active") == want;
        async move { ok }
    })
    .await;
    assert!(num(&status(&lc).await, &["transport", "sent", "grpc"]).unwrap_or(0) > 0);
    assert_eq!(
        num(&status(&lc).await, &["transport", "sent", "mqtt"]).unwrap_or(0),
        0
    );

    policy_set(&lab, &gc, r#"{"label":"no broker"}"#);
    eventually("the LC applies version 2", WAIT, || {
        let ok = applied_versions(&lc.proc).contains(&2);
        async move { ok }
    })
    .await;

    rc.proc
        .wait_line(WAIT, |l| l == format!("liveness id={} state=online", lc.id));
    // No broker, no last will: a silent child shows as stale after three intervals.
    lc.proc.kill();
    rc.proc
        .wait_line(WAIT, |l| l == format!("liveness id={} state=stale", lc.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_shows_the_traffic_as_signed_envelopes() {
    let lab = Lab::new();
    let gc = lab.global(&["--user", "ops:ops-password"]);
    let rc = regional(&lab, &gc).await;
    let _lc = lab.child(
        "local",
        "temp-lc-s",
        &rc,
        "zone-A",
        &["--heartbeat-interval", "0.2", "--discovery-interval", "0.5"],
    );
    let broker = gc.mqtt.expect("broker");
    let port = broker.port().to_string();
    let started = Instant::now();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut types: BTreeSet<String> = BTreeSet::new();
    while started.elapsed() < WAIT {
        let (_, out, err) = run(
            "mosquitto_sub",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-u",
                "ops",
                "-P",
                "ops-password",
                "-t",
                "pdsno/#",
                "-v",
                "-W",
                "3",
            ],
            Duration::from_secs(10),
        );
        assert!(!err.contains("refused"), "{err}");
        for line in out.lines() {
            let (topic, payload) = line.split_once(' ').expect("topic and payload");
            let env = Envelope::from_slice(payload.as_bytes())
                .unwrap_or_else(|e| panic!("not an envelope on {topic}: {e}: {payload}"));
            assert!(env.signature.is_some(), "unsigned on {topic}");
            let kind = topic.split('/').nth(1).unwrap_or_default().to_owned();
            seen.insert(kind);
            types.insert(env.message_type.as_str().to_owned());
        }
        if ["status", "policy", "discovery"]
            .iter()
            .all(|k| seen.contains(*k))
        {
            break;
        }
    }
    for k in ["status", "policy", "discovery"] {
        assert!(seen.contains(k), "no {k} traffic seen: {seen:?}");
    }
    for t in ["HEARTBEAT", "POLICY_UPDATE", "DISCOVERY_REPORT"] {
        assert!(types.contains(t), "no {t}: {types:?}");
    }
}
