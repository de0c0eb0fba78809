//! Bounded state between real processes: with a short `--device-retention`, devices that
//! stay inactive are deleted at the local controller, the regional controller and in the
//! global inventory (one `DEVICES_EXPIRED` event per pass), devices still seen are kept
//! however old their last change, and a deleted device that comes back is stored as new.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use pdsno_node::nib::{DeviceStatus, Nib};
use pdsno_shared::json::Value;
use pdsno_shared::time::{format_iso, parse_iso};
use pdsno_tests::{Lab, NodeProc};

mod common;
use common::{eventually, nib};

const WAIT: Duration = Duration::from_secs(40);

/// The retention the test runs with (seconds).
const RETENTION: &str = "2";

/// Writes a device list for the file scanner (write then rename: a scan never reads half
/// a file).
fn write_devices(path: &Path, macs: &[&str]) {
    let list: Vec<String> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| format!(r#"{{"mac":"{mac}","ip":"10.9.0.{}"}}"#, i + 1))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("[{}]", list.join(","))).expect("write devices");
    std::fs::rename(&tmp, path).expect("rename");
}

fn set(macs: &[&str]) -> BTreeSet<String> {
    macs.iter().map(|m| (*m).to_owned()).collect()
}

/// Every device row `node` stores (any status), and the active ones.
fn devices(node: &NodeProc) -> (BTreeSet<String>, BTreeSet<String>) {
    let rows = nib(node).devices(None).expect("devices");
    let all = rows.iter().map(|d| d.device.mac.clone()).collect();
    let active = rows
        .iter()
        .filter(|d| d.status == DeviceStatus::Active)
        .map(|d| d.device.mac.clone())
        .collect();
    (all, active)
}

/// Every inventory row of the GC (any status), and the active ones.
fn inventory(gc: &NodeProc) -> (BTreeSet<String>, BTreeSet<String>) {
    let rows = nib(gc).inventory().expect("inventory");
    let all = rows.iter().map(|r| r.mac.clone()).collect();
    let active = rows
        .iter()
        .filter(|r| r.status == "active")
        .map(|r| r.mac.clone())
        .collect();
    (all, active)
}

/// What the `DEVICES_EXPIRED` events of `nib` deleted: (events, devices, inventory rows).
fn expired(nib: &Nib) -> (usize, u64, u64) {
    let evs: Vec<Value> = nib
        .events(0, 10_000)
        .expect("events")
        .into_iter()
        .filter(|e| e.event_type == "DEVICES_EXPIRED")
        .map(|e| pdsno_shared::json::parse(e.details.as_bytes()).expect("details"))
        .collect();
    let sum = |k: &str| evs.iter().filter_map(|d| d.get(k)?.as_u64()).sum();
    (evs.len(), sum("devices"), sum("inventory"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_devices_are_deleted_after_the_retention_and_come_back_as_new() {
    let lab = Lab::new();
    let retention = ["--device-retention", RETENTION];
    let gc = lab.global(&retention);
    let rc = lab.child(
        "regional",
        "temp-rc-b",
        &gc,
        "zone-A",
        &[
            "--device-retention",
            RETENTION,
            "--summary-interval",
            "0.3",
            "--heartbeat-interval",
            "0.3",
        ],
    );
    let file = lab.dir.path().join("devices.json");
    let (a, b, c) = (
        "02:00:00:00:b0:0a",
        "02:00:00:00:b0:0b",
        "02:00:00:00:b0:0c",
    );
    write_devices(&file, &[a, b, c]);
    let f = file.display().to_string();
    let lc = lab.child(
        "local",
        "temp-lc-b",
        &rc,
        "zone-A",
        &[
            "--device-retention",
            RETENTION,
            "--scanner",
            "file",
            "--scan-file",
            &f,
            "--discovery-interval",
            "0.3",
            "--missed-cycles",
            "1",
            "--heartbeat-interval",
            "0.3",
        ],
    );
    eventually("all three devices in the GC inventory", WAIT, || {
        let ok = inventory(&gc).1 == set(&[a, b, c]) && devices(&rc).1 == set(&[a, b, c]);
        async move { ok }
    })
    .await;

    // b and c disappear: inactive at once (one missed cycle), then deleted everywhere
    // after the retention; a, still seen, stays (its row has not changed since it was
    // first reported, longer ago than the retention).
    write_devices(&file, &[a]);
    let gone_at = chrono::Utc::now();
    eventually("b and c deleted at the LC, the RC and the GC", WAIT, || {
        let ok = devices(&lc).0 == set(&[a])
            && devices(&rc).0 == set(&[a])
            && inventory(&gc).0 == set(&[a]);
        async move { ok }
    })
    .await;
    let waited = chrono::Utc::now() - gone_at;
    assert!(
        waited >= chrono::Duration::seconds(2),
        "deleted after {waited} only"
    );
    assert_eq!(devices(&lc).1, set(&[a]));
    assert_eq!(devices(&rc).1, set(&[a]));
    assert_eq!(inventory(&gc).1, set(&[a]), "the inventory stays right");
    let first_seen_a = nib(&rc).device(a).expect("row").expect("a").first_seen;
    assert!(
        parse_iso(&first_seen_a).expect("time")
            <= chrono::Utc::now() - chrono::Duration::seconds(2),
        "a's row is older than the retention"
    );
    // Counted in one event per pass, never one per device.
    let (events, n, _) = expired(&nib(&lc));
    assert_eq!(n, 2, "the LC deleted b and c");
    assert!((1..=2).contains(&events), "{events} events");
    assert_eq!(expired(&nib(&rc)).1, 2, "the RC deleted b and c");
    assert_eq!(expired(&nib(&gc)).2, 2, "the GC deleted b and c");

    // b comes back: a new device at every tier.
    let back_at = chrono::Utc::now();
    write_devices(&file, &[a, b]);
    eventually("b back in the GC inventory", WAIT, || {
        let ok = inventory(&gc).1 == set(&[a, b]);
        async move { ok }
    })
    .await;
    let row = nib(&rc).device(b).expect("row").expect("b");
    assert_eq!(row.status, DeviceStatus::Active);
    assert!(
        parse_iso(&row.first_seen).expect("time") >= back_at,
        "b is new again: first seen {} (back at {})",
        row.first_seen,
        format_iso(back_at)
    );
    assert_eq!(devices(&rc).0, set(&[a, b]));
    assert_eq!(devices(&lc).1, set(&[a, b]));
    // Who reported survives the rows: the RC still knows its LC reported.
    let reporters: i64 = nib(&rc)
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM reporters WHERE sender_id = ?1",
            [&lc.id],
            |r| r.get(0),
        )
        .expect("reporters");
    assert_eq!(reporters, 1);
}
