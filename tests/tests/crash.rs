//! Crash durability with real processes: `kill -9` of a controller while it admits
//! children or ingests discovery, then a restart on the same data directory and ports.
//!
//! What must hold afterwards: every admission that was answered APPROVED is still on
//! record, no id is ever issued twice, a bootstrap token is consumed exactly when its
//! admission was recorded, the signed audit chain verifies, the replay cache remembers what
//! it accepted, no discovered device is lost, and children find their way back by
//! themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pdsno_node::nib::{DeviceStatus, Nib};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::ControllerId;
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::PublicKey;
use pdsno_shared::signing::sign_ed25519;
use pdsno_tests::{Lab, NodeProc, Proc, run};

mod common;
use common::{RawChild, eventually, nib, outcome, status};

const WAIT: Duration = Duration::from_secs(40);

/// Two distinct ports below the ephemeral range, for servers restarted on the same
/// address while their clients keep retrying.
fn two_ports() -> (u16, u16) {
    let a = pdsno_tests::free_port_for_late_server();
    loop {
        let b = pdsno_tests::free_port_for_late_server();
        if b != a {
            return (a, b);
        }
    }
}

/// The node's identity public key, as it announces it.
async fn public_key(node: &NodeProc) -> PublicKey {
    let info = ParentLink::new(&node.grpc_url())
        .expect("url")
        .info()
        .await
        .expect("info");
    PublicKey::from_base64(&info.public_key).expect("key")
}

/// Checks the node's signed audit chain with the library, and with `pdsno audit verify`
/// when this build has that command. Returns the number of events.
async fn chain_verifies(node: &NodeProc) -> u64 {
    let key = public_key(node).await;
    let n = pdsno_node::nib::verify_chain(&nib(node).conn(), &key)
        .expect("read the chain")
        .unwrap_or_else(|broken| panic!("{}: {broken}", node.id));
    let bin = pdsno_tests::pdsno_bin().display().to_string();
    let (_, help, _) = run(&bin, &["--help"], Duration::from_secs(20));
    if help.lines().any(|l| l.trim_start().starts_with("audit")) {
        let dir = node.data_dir.display().to_string();
        let (code, out, err) = run(
            &bin,
            &["audit", "verify", "--data-dir", &dir],
            Duration::from_secs(30),
        );
        assert_eq!(
            code,
            Some(0),
            "pdsno audit verify on {}: {out} {err}",
            node.id
        );
    }
    n
}

/// A HEARTBEAT from `node` to `to`, signed with `node`'s identity key.
fn identity_heartbeat(node: &NodeProc, to: &str) -> Envelope {
    let key = pdsno_node::identity::load_or_create(&node.data_dir)
        .expect("identity")
        .0;
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let now = chrono::Utc::now();
    let mut e = Envelope::new(MessageType::Heartbeat, node.id.clone(), to, p, now);
    sign_ed25519(&mut e, &key, None, now);
    e
}

fn assert_replay(r: Result<impl std::fmt::Debug, LinkError>, what: &str) {
    match r {
        Err(LinkError::Status { code, message }) => {
            assert_eq!(code, tonic::Code::Unauthenticated, "{what}: {message}");
            assert!(
                message.contains("Replay attack detected"),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: accepted again after the restart: {other:?}"),
    }
}

/// Lines of `p` starting with `prefix`.
fn count_lines(p: &Proc, prefix: &str) -> usize {
    p.lines().iter().filter(|l| l.starts_with(prefix)).count()
}

/// The parent's status row of `child`.
fn child_row(st: &Value, child: &str) -> Option<Value> {
    st.get("children")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller_id").and_then(Value::as_str) == Some(child))
        .cloned()
}

async fn online_at(parent: &NodeProc, child: &str) -> bool {
    child_row(&status(parent).await, child)
        .and_then(|r| r.get("liveness").and_then(Value::as_str).map(str::to_owned))
        .as_deref()
        == Some("online")
}

// ---------------------------------------------------------------------------------------
// 1. The GC dies while children are being admitted.

#[derive(Clone, Debug)]
enum Outcome {
    /// APPROVED with this id, before the crash.
    Approved(String),
    /// An answer other than APPROVED.
    Refused(String),
    /// No final answer: the parent went away mid-handshake.
    Lost(String),
}

/// Runs admission handshakes one after the other until `stop` is set or a call fails;
/// returns what happened to each child it tried and the ones it never tried.
async fn admit_until_stopped(
    link: ParentLink,
    parent: String,
    children: Vec<RawChild>,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(String, Outcome)>>>,
) -> (Vec<(RawChild, Outcome)>, Vec<RawChild>) {
    let mut tried = Vec::new();
    let mut untried = Vec::new();
    let mut parent_gone = false;
    for child in children {
        if parent_gone || stop.load(Ordering::SeqCst) {
            untried.push(child);
            continue;
        }
        let result = match link.request_validation(&child.request(&parent, 0)).await {
            Err(e) => Outcome::Lost(e.to_string()),
            Ok(ch) if ch.message_type != MessageType::Challenge => Outcome::Refused(outcome(&ch).1),
            Ok(ch) => match link
                .respond_to_challenge(&child.response(&ch, |_| {}))
                .await
            {
                Err(e) => Outcome::Lost(e.to_string()),
                Ok(res) => {
                    child.check(&res);
                    let (s, reason) = outcome(&res);
                    match res.payload.get("assigned_id").and_then(Value::as_str) {
                        Some(id) if s == "APPROVED" => Outcome::Approved(id.to_owned()),
                        _ => Outcome::Refused(format!("{s} {reason}")),
                    }
                }
            },
        };
        let lost = matches!(result, Outcome::Lost(_));
        done.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((child.temp_id.clone(), result.clone()));
        tried.push((child, result));
        parent_gone |= lost;
    }
    (tried, untried)
}

fn seq_of(id: &str) -> (String, u64) {
    let c = ControllerId::parse(id).unwrap_or_else(|| panic!("{id} is not an assigned id"));
    (c.region.unwrap_or_default(), c.seq)
}

fn regional(lab: &Lab, name: &str, parent_url: &str, region: &str) -> Proc {
    let token = lab.token(name, region, "regional");
    lab.spawn(
        "regional",
        name,
        &[
            "--parent",
            parent_url,
            "--region",
            region,
            "--temp-id",
            name,
            "--bootstrap-token",
            &token,
            "--heartbeat-interval",
            "0.2",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_killed_during_admissions_keeps_every_approval_and_never_reissues_an_id() {
    let lab = Lab::new();
    let (grpc_port, mqtt_port) = two_ports();
    let grpc = format!("127.0.0.1:{grpc_port}");
    let mqtt = format!("127.0.0.1:{mqtt_port}");
    // One regional controller per region: a region for each.
    let mut regions: Vec<String> = (1..=4).map(|i| format!("zone-r{i}")).collect();
    regions.push("zone-h".into());
    for w in 0..4 {
        regions.extend((0..15).map(|n| format!("zone-k{w}-{n}")));
    }
    let regions = regions.join(",");
    let gc_args = [
        "--listen-grpc",
        grpc.as_str(),
        "--listen-mqtt",
        mqtt.as_str(),
        "--regions",
        regions.as_str(),
    ];
    let mut gc = lab.global(&gc_args);
    let url = gc.grpc_url();
    let gc_id = gc.id.clone();

    // Four regional controllers admitted at once, running when the crash comes.
    let starting: Vec<(String, Proc)> = (1..=4)
        .map(|i| {
            let name = format!("temp-rc-k{i}");
            let p = regional(&lab, &name, &url, &format!("zone-r{i}"));
            (name, p)
        })
        .collect();
    let mut running: Vec<NodeProc> = starting
        .into_iter()
        .map(|(name, p)| lab.ready(p, &name))
        .collect();
    for rc in &mut running {
        rc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    }
    let link = ParentLink::new(&url).expect("url");
    // A message accepted before the crash...
    let accepted_hb = identity_heartbeat(&running[0], &gc_id);
    link.exchange(&accepted_hb)
        .await
        .expect("the heartbeat is accepted before the crash");
    // ...and an admission left half-way: challenged, not yet answered.
    let halfway = RawChild::new(&lab, "temp-halfway", "zone-h", "regional");
    let halfway_request = halfway.request(&gc_id, 0);
    let halfway_challenge = link
        .request_validation(&halfway_request)
        .await
        .expect("challenge");
    assert_eq!(halfway_challenge.message_type, MessageType::Challenge);

    // Many admissions at once, cut by the crash.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let children: Vec<RawChild> = (0..15)
            .map(|n| {
                // One regional controller per region.
                let region = format!("zone-k{w}-{n}");
                RawChild::new(&lab, &format!("temp-k-{w}-{n}"), &region, "regional")
            })
            .collect();
        workers.push(tokio::spawn(admit_until_stopped(
            link.clone(),
            gc_id.clone(),
            children,
            stop.clone(),
            done.clone(),
        )));
    }
    // Kill the GC in the middle of it.
    let deadline = Instant::now() + WAIT;
    loop {
        let approved = done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Approved(_)))
            .count();
        if approved >= 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admissions do not progress: {:?}",
            done.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(t, o)| format!("{t}: {o:?}"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gc.proc.kill();
    stop.store(true, Ordering::SeqCst);
    let mut tried = Vec::new();
    let mut untried = Vec::new();
    for w in workers {
        let (t, u) = w.await.expect("worker");
        tried.extend(t);
        untried.extend(u);
    }
    let approved_before: Vec<(&RawChild, String)> = tried
        .iter()
        .filter_map(|(c, o)| match o {
            Outcome::Approved(id) => Some((c, id.clone())),
            _ => None,
        })
        .collect();
    for (c, o) in &tried {
        if let Outcome::Refused(r) = o {
            panic!("{} was refused before the crash: {r}", c.temp_id);
        }
    }
    assert!(approved_before.len() >= 12);

    // Back on the same data directory and ports.
    let gc = lab.global(&gc_args);
    assert_eq!(gc.id, gc_id);
    let gc_nib = nib(&gc);

    // Every APPROVED answer survived, with the key and temp id it was given for.
    for (child, id) in &approved_before {
        let row = gc_nib
            .controller(id)
            .expect("read")
            .unwrap_or_else(|| panic!("{id} ({}) was approved but is gone", child.temp_id));
        assert_eq!(row.status, "active", "{id}");
        assert_eq!(row.temp_id.as_deref(), Some(child.temp_id.as_str()), "{id}");
        assert_eq!(
            row.public_key.as_deref(),
            Some(child.key.public().to_base64().as_str()),
            "{id} is recorded with another key"
        );
    }
    for rc in &running {
        assert!(
            gc_nib.controller(&rc.id).expect("read").is_some(),
            "{} is gone",
            rc.id
        );
    }

    // What was accepted before the crash is still a replay after it.
    assert_replay(
        link.exchange(&accepted_hb).await,
        "a heartbeat accepted before the crash",
    );
    assert_replay(
        link.request_validation(&halfway_request).await,
        "an admission request accepted before the crash",
    );
    // The half-way admission: its challenge died with the process (the new process cannot
    // even tell which admission key the answer is signed with), its token did not.
    match link
        .respond_to_challenge(&halfway.response(&halfway_challenge, |_| {}))
        .await
    {
        Err(LinkError::Status {
            code: tonic::Code::Unauthenticated,
            ..
        }) => {}
        Ok(late) => {
            halfway.check(&late);
            assert_eq!(
                outcome(&late),
                ("REJECTED".to_owned(), "UNKNOWN_CHALLENGE".to_owned())
            );
        }
        Err(e) => panic!("an answer to a challenge from before the crash: {e}"),
    }
    // What the NIB held when the restarted GC came up.
    let by_temp: BTreeMap<String, String> = gc_nib
        .controllers()
        .expect("controllers")
        .iter()
        .filter_map(|r| Some((r.temp_id.clone()?, r.controller_id.clone())))
        .collect();
    let mut approved_after = 0usize;
    let redo = common::handshake(&link, &gc_id, &halfway, |_| {}).await;
    assert_eq!(
        redo.0, "APPROVED",
        "the token was consumed without an admission: {redo:?}"
    );
    approved_after += 1;

    // Handshakes cut by the crash: the token is spent exactly when the admission was
    // recorded. Retrying tells which.
    for (child, o) in &tried {
        let Outcome::Lost(why) = o else { continue };
        if let Some(recorded) = by_temp.get(&child.temp_id) {
            // Recorded, but the child never saw the answer: the same token and key get
            // the same admission again (nothing new is assigned).
            let ch = link
                .request_validation(&child.request(&gc_id, 0))
                .await
                .expect("request");
            assert_eq!(
                common::outcome(&ch).0,
                "CHALLENGE",
                "{} (cut: {why})",
                child.temp_id
            );
            let res = link
                .respond_to_challenge(&child.response(&ch, |_| {}))
                .await
                .expect("response");
            assert_eq!(common::outcome(&res).0, "APPROVED", "{}", child.temp_id);
            assert_eq!(
                res.payload.get("assigned_id").and_then(|v| v.as_str()),
                Some(recorded.as_str()),
                "{}: answered with its recorded id",
                child.temp_id
            );
        } else {
            let (s, reason) = common::handshake(&link, &gc_id, child, |_| {}).await;
            approved_after += 1;
            assert_eq!(
                s, "APPROVED",
                "{}: not recorded, so its token must still work ({reason}; cut: {why})",
                child.temp_id
            );
        }
    }
    // Admissions go on after the restart, with fresh ids.
    for child in untried.iter().take(6) {
        let (s, reason) = common::handshake(&link, &gc_id, child, |_| {}).await;
        assert_eq!(s, "APPROVED", "{}: {reason}", child.temp_id);
        approved_after += 1;
    }

    // No id was ever issued twice, and numbering resumed past every id issued before.
    let controllers = gc_nib.controllers().expect("controllers");
    let mut seen = BTreeSet::new();
    for r in &controllers {
        assert!(
            seen.insert(r.controller_id.clone()),
            "{} twice",
            r.controller_id
        );
    }
    let temps: BTreeSet<&str> = controllers
        .iter()
        .filter_map(|r| r.temp_id.as_deref())
        .collect();
    assert_eq!(temps.len(), controllers.len(), "a temp id admitted twice");
    let recorded_before: BTreeSet<&String> = by_temp.values().collect();
    let mut max_before: BTreeMap<String, u64> = BTreeMap::new();
    for id in &recorded_before {
        let (region, seq) = seq_of(id);
        let m = max_before.entry(region).or_default();
        *m = (*m).max(seq);
    }
    let after: Vec<&String> = controllers
        .iter()
        .map(|r| &r.controller_id)
        .filter(|id| !recorded_before.contains(id))
        .collect();
    assert_eq!(
        after.len(),
        approved_after,
        "admissions recorded after the restart: {after:?}"
    );
    for id in after {
        let (region, seq) = seq_of(id);
        let top = max_before.get(&region).copied().unwrap_or(0);
        assert!(
            seq > top,
            "{id} issued after the restart, but {region} had reached {top} before it"
        );
    }
    // Each admission wrote exactly one CONTROLLER_VALIDATED event, and the chain verifies.
    let events = gc_nib.events(0, 100_000).expect("events");
    let mut validated: BTreeMap<String, u32> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.event_type == "CONTROLLER_VALIDATED")
    {
        *validated
            .entry(e.subject.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for r in &controllers {
        assert_eq!(
            validated.get(&r.controller_id),
            Some(&1),
            "{}: one admission, one event",
            r.controller_id
        );
    }
    assert_eq!(validated.len(), controllers.len(), "{validated:?}");
    let n = chain_verifies(&gc).await;
    assert!(n as usize >= controllers.len());

    // The children that were running reconnect by themselves: MQTT to the restarted
    // embedded broker, and heartbeats the new GC process records.
    for rc in &running {
        let rc_proc = &rc.proc;
        eventually(&format!("{} reconnects to the broker", rc.id), WAIT, || {
            let n = count_lines(rc_proc, "mqtt connected");
            async move { n >= 2 }
        })
        .await;
    }
    for id in running.iter().map(|r| r.id.clone()) {
        let gc = &gc;
        eventually(&format!("{id} online at the restarted GC"), WAIT, || {
            let id = id.clone();
            async move { online_at(gc, &id).await }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. The ingesting tiers die while discovery reports keep coming.

/// Writes the file scanner's device list atomically.
fn write_devices(path: &Path, macs: &[String]) {
    let items: Vec<String> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            format!(
                r#"{{"mac":"{mac}","ip":"10.{}.{}.{}","hostname":"dev-{i}"}}"#,
                u8::from_str_radix(&mac[9..11], 16).unwrap_or(0),
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("[{}]", items.join(","))).expect("write devices");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Grows each LC's device list by one device every `every` until stopped; the lists it
/// wrote are in `written`.
struct Feeder {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Vec<Vec<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(files: Vec<PathBuf>, every: Duration) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(vec![Vec::new(); files.len()]));
        let (s, w) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u32;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let mut g = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (lc, file) in files.iter().enumerate() {
                    g[lc].push(format!(
                        "02:00:00:{:02x}:{:02x}:{:02x}",
                        lc + 1,
                        n / 256,
                        n % 256
                    ));
                    write_devices(file, &g[lc]);
                }
                drop(g);
                std::thread::sleep(every);
            }
        });
        Feeder {
            stop,
            written,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(Vec::len)
            .sum()
    }

    /// Stops feeding; returns every MAC written, per LC.
    fn finish(mut self) -> Vec<BTreeSet<String>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("feeder");
        }
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|v| v.iter().cloned().collect())
            .collect()
    }
}

fn active(node: &NodeProc, lc: Option<&str>) -> BTreeSet<String> {
    Nib::open(node.data_dir.join("nib.db"))
        .expect("open")
        .devices(lc)
        .expect("devices")
        .into_iter()
        .filter(|d| d.status == DeviceStatus::Active)
        .map(|d| d.device.mac)
        .collect()
}

fn inventory(gc: &NodeProc) -> BTreeSet<String> {
    nib(gc)
        .inventory()
        .expect("inventory")
        .into_iter()
        .filter(|r| r.status == "active")
        .map(|r| r.mac)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_ingesting_tiers_mid_discovery_loses_no_device() {
    let lab = Lab::new();
    let (gc_grpc, gc_mqtt) = two_ports();
    let rc_grpc = loop {
        let p = pdsno_tests::free_port_for_late_server();
        if p != gc_grpc && p != gc_mqtt {
            break p;
        }
    };
    let (g, m, r) = (
        format!("127.0.0.1:{gc_grpc}"),
        format!("127.0.0.1:{gc_mqtt}"),
        format!("127.0.0.1:{rc_grpc}"),
    );
    let gc_args = ["--listen-grpc", g.as_str(), "--listen-mqtt", m.as_str()];
    let mut gc = lab.global(&gc_args);
    let rc_args = [
        "--heartbeat-interval",
        "0.2",
        "--summary-interval",
        "0.3",
        "--listen-grpc",
        r.as_str(),
    ];
    let mut rc = lab.child("regional", "temp-rc-d", &gc, "zone-A", &rc_args);
    let files: Vec<PathBuf> = (1..=2)
        .map(|i| lab.dir.path().join(format!("lc{i}.json")))
        .collect();
    for f in &files {
        write_devices(f, &[]);
    }
    let mut lcs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let file = f.display().to_string();
        let args = [
            "--scanner",
            "file",
            "--scan-file",
            file.as_str(),
            "--discovery-interval",
            "0.3",
            "--heartbeat-interval",
            "0.2",
        ];
        lcs.push(lab.child("local", &format!("temp-lc-d{i}"), &rc, "zone-A", &args));
    }
    for n in lcs.iter_mut().chain([&mut rc]) {
        n.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    }
    let feeder = Feeder::start(files.clone(), Duration::from_millis(120));

    // 1. The RC, which ingests the LCs' reports, dies while they keep coming.
    eventually("reports flowing into the RC", WAIT, || {
        let ok = active(&rc, None).len() >= 6;
        async move { ok }
    })
    .await;
    rc.proc.kill();
    let at_kill = feeder.count();
    eventually(
        "the LCs keep discovering while the RC is down",
        WAIT,
        || {
            let ok = feeder.count() >= at_kill + 10;
            async move { ok }
        },
    )
    .await;
    // Unacknowledged reports wait in the LCs' outboxes.
    eventually("reports queue at the LCs", WAIT, || {
        let lcs = &lcs;
        async move {
            let mut queued = 0;
            for lc in lcs {
                queued += common::num(&status(lc).await, &["discovery", "outbox"]).unwrap_or(0);
            }
            queued >= 2
        }
    })
    .await;
    let rc = lab.ready(lab.spawn("regional", "temp-rc-d", &rc_args), "temp-rc-d");
    assert!(
        rc.proc.lines().iter().any(|l| l.starts_with("restored ")),
        "the RC keeps its identity"
    );

    // 2. The GC, which ingests the RC's summaries (and hosts the broker), dies too.
    let before = inventory(&gc).len();
    eventually("summaries flowing into the GC", WAIT, || {
        let ok = inventory(&gc).len() > before;
        async move { ok }
    })
    .await;
    gc.proc.kill();
    let at_kill = feeder.count();
    eventually(
        "the LCs keep discovering while the GC is down",
        WAIT,
        || {
            let ok = feeder.count() >= at_kill + 10;
            async move { ok }
        },
    )
    .await;
    let gc = lab.global(&gc_args);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let want = feeder.finish();

    // Nothing any LC saw is lost on the way up.
    for (lc, macs) in lcs.iter().zip(&want) {
        eventually(&format!("{} saw every device", lc.id), WAIT, || {
            let ok = &active(lc, None) == macs;
            async move { ok }
        })
        .await;
        eventually(
            &format!("every device of {} at the RC", lc.id),
            WAIT,
            || {
                let ok = &active(&rc, Some(&lc.id)) == macs;
                async move { ok }
            },
        )
        .await;
    }
    let all: BTreeSet<String> = want.iter().flatten().cloned().collect();
    eventually("every device in the GC inventory", WAIT, || {
        let ok = inventory(&gc) == all;
        async move { ok }
    })
    .await;
    for lc in &lcs {
        eventually(&format!("{}'s outbox drains", lc.id), WAIT, || async move {
            common::num(&status(lc).await, &["discovery", "outbox"]) == Some(0)
        })
        .await;
    }
    chain_verifies(&gc).await;
    chain_verifies(&rc).await;

    // Everyone found their way back: the LCs and the RC reconnected to the restarted
    // broker, and each parent sees its children online.
    for n in lcs.iter() {
        let p = &n.proc;
        eventually(&format!("{} reconnects to the broker", n.id), WAIT, || {
            let k = count_lines(p, "mqtt connected");
            async move { k >= 2 }
        })
        .await;
    }
    eventually("the RC online at the GC", WAIT, || online_at(&gc, &rc.id)).await;
    for lc in &lcs {
        eventually(&format!("{} online at the RC", lc.id), WAIT, || {
            online_at(&rc, &lc.id)
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. A child whose parent crashes in the middle of one of its admission calls: a broken
//    connection is the parent being unreachable, so the child must try again.

/// Copies bytes both ways between a child and its parent. With `trip`, the first bytes
/// the child sends once the parent has answered a first call (the HTTP/2 connection is up
/// and working: more than the bare settings exchange came back) are held back and `trip`
/// is signalled; when the parent's side then dies, the child's side is reset. That is
/// exactly what a child sees when its parent is killed while serving its next call.
async fn pipe(
    mut child: tokio::net::TcpStream,
    mut parent: tokio::net::TcpStream,
    trip: Option<Arc<tokio::sync::Notify>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cb = vec![0u8; 16 * 1024];
    let mut pb = vec![0u8; 16 * 1024];
    let mut from_parent = 0usize;
    loop {
        tokio::select! {
            r = child.read(&mut cb) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if from_parent >= 150 && let Some(t) = &trip {
                    t.notify_one();
                    while let Ok(n) = parent.read(&mut pb).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = child.set_zero_linger();
                    return;
                }
                if parent.write_all(&cb[..n]).await.is_err() {
                    return;
                }
            }
            r = parent.read(&mut pb) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                from_parent += n;
                if child.write_all(&pb[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A relay to `upstream` whose first connection trips (see [`pipe`]); returns its address
/// and the signal.
async fn crash_relay(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tripped = Arc::new(tokio::sync::Notify::new());
    let signal = tripped.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((child, _)) = listener.accept().await {
            let Ok(parent) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let trip = std::mem::take(&mut first).then(|| signal.clone());
            tokio::spawn(pipe(child, parent, trip));
        }
    });
    (addr, tripped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_parent_crashes_mid_call_retries_until_admitted() {
    let lab = Lab::new();
    let port = pdsno_tests::free_port_for_late_server();
    let listen = format!("127.0.0.1:{port}");
    let mut gc = lab.global(&["--listen-grpc", &listen]);
    let (relay, tripped) = crash_relay(gc.grpc).await;
    let mut child = regional(
        &lab,
        "temp-rc-midcall",
        &format!("http://{relay}"),
        "zone-A",
    );
    tokio::time::timeout(WAIT, tripped.notified())
        .await
        .expect("the child calls its parent");
    // The parent dies while the child's call is in flight, and comes back.
    gc.proc.kill();
    let gc = lab.global(&["--listen-grpc", &listen]);
    let deadline = Instant::now() + WAIT;
    while !child.lines().iter().any(|l| l.starts_with("ready ")) {
        assert!(
            child.is_alive(),
            "the child gave up on its parent instead of retrying once it was back:\n{}",
            child.stderr()
        );
        assert!(Instant::now() < deadline, "the child was never admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rc = lab.ready(child, "temp-rc-midcall");
    let row = nib(&gc)
        .controller(&rc.id)
        .expect("read")
        .expect("the child is on record");
    assert_eq!(row.temp_id.as_deref(), Some("temp-rc-midcall"));
}
