use super::*;

fn dev(mac: &str, ip: &str, seen: DateTime<Utc>) -> Device {
    Device {
        ip: ip.into(),
        mac: mac.into(),
        last_seen: format_iso(seen),
        protocol: "SIM".into(),
        reachable: true,
        rtt_ms: Some(1.5),
        hostname: Some(format!("host-{}", &mac[15..])),
        vendor: None,
        model: None,
        uptime_seconds: Some(10),
        discovery_method: DiscoveryMethod::Icmp,
        extra: Map::new(),
    }
}

fn lim(spike_threshold: usize) -> IngestLimits {
    IngestLimits {
        spike_threshold,
        ..IngestLimits::DEFAULT
    }
}

fn nib() -> (tempfile::TempDir, Nib) {
    let dir = tempfile::tempdir().expect("tmp");
    let nib = Nib::open(dir.path().join("nib.db")).expect("open");
    (dir, nib)
}

const LC: CycleParams<'static> = CycleParams {
    lc_id: "local_cntl_zone-A_1",
    region: "zone-A",
    missed_limit: 3,
    outbox_cap: 100,
};

fn report_item(d: &CycleDelta) -> Option<OutboxItem> {
    let mut p = Map::new();
    p.insert("cycle".into(), d.cycle.into());
    Some(OutboxItem {
        item_id: format!("report-{}", d.cycle),
        recipient: "regional_cntl_zone-A_1".into(),
        message_type: REPORT_TYPE.into(),
        topic: None,
        payload: p,
    })
}

#[test]
fn cycles_report_only_changes_and_inactivity_after_three_misses() {
    let (_d, nib) = nib();
    let t = Utc::now();
    let a = dev("02:00:00:00:00:0a", "10.0.0.10", t);
    let b = dev("02:00:00:00:00:0b", "10.0.0.11", t);

    let d1 = nib
        .lc_cycle(&LC, &[a.clone(), b.clone()], t, report_item)
        .expect("c1");
    assert_eq!((d1.cycle, d1.new.len(), d1.active), (1, 2, 2));
    assert_eq!(nib.outbox_len().expect("len"), 1);

    // Unchanged (only rtt/uptime drift): nothing to report, no report queued.
    let mut a2 = a.clone();
    a2.rtt_ms = Some(9.0);
    a2.uptime_seconds = Some(99);
    let d2 = nib
        .lc_cycle(&LC, &[a2, b.clone()], t, report_item)
        .expect("c2");
    assert!(d2.is_empty(), "{d2:?}");
    assert_eq!(nib.outbox_len().expect("len"), 1);

    // b changes address: updated.
    let mut b2 = b.clone();
    b2.ip = "10.0.0.99".into();
    let d3 = nib
        .lc_cycle(&LC, &[a.clone(), b2.clone()], t, report_item)
        .expect("c3");
    assert_eq!(
        d3.updated.iter().map(|d| d.ip.as_str()).collect::<Vec<_>>(),
        ["10.0.0.99"]
    );
    assert_eq!(
        nib.device(&b.mac).expect("row").expect("b").device.ip,
        "10.0.0.99"
    );

    // a disappears: missed twice without a report, inactive on the third miss.
    for n in 1..=2 {
        let d = nib
            .lc_cycle(&LC, &[b2.clone()], t, report_item)
            .expect("miss");
        assert!(d.is_empty(), "miss {n}: {d:?}");
        let row = nib.device(&a.mac).expect("row").expect("a");
        assert_eq!((row.status, row.missed), (DeviceStatus::Active, n));
    }
    let d = nib
        .lc_cycle(&LC, &[b2.clone()], t, report_item)
        .expect("third miss");
    assert_eq!(
        d.inactive
            .iter()
            .map(|i| i.mac.as_str())
            .collect::<Vec<_>>(),
        [a.mac.as_str()]
    );
    assert_eq!(d.active, 1);
    assert_eq!(
        nib.device(&a.mac).expect("row").expect("a").status,
        DeviceStatus::Inactive
    );
    // Still gone: nothing more to say.
    assert!(
        nib.lc_cycle(&LC, &[b2.clone()], t, report_item)
            .expect("c")
            .is_empty()
    );
    // Back: reported as updated, active again, miss count reset.
    let d = nib
        .lc_cycle(&LC, &[a.clone(), b2.clone()], t, report_item)
        .expect("back");
    assert_eq!(d.updated.len(), 1);
    let row = nib.device(&a.mac).expect("row").expect("a");
    assert_eq!((row.status, row.missed), (DeviceStatus::Active, 0));
    // A device missed once then seen again does not go inactive later by accident.
    nib.lc_cycle(&LC, &[b2.clone()], t, report_item)
        .expect("miss once");
    nib.lc_cycle(&LC, &[a.clone(), b2.clone()], t, report_item)
        .expect("seen");
    nib.lc_cycle(&LC, &[b2.clone()], t, report_item)
        .expect("miss 1");
    let d = nib
        .lc_cycle(&LC, &[b2.clone()], t, report_item)
        .expect("miss 2");
    assert!(d.inactive.is_empty(), "only two consecutive misses");
    // The cycle counter survives in the NIB.
    assert_eq!(
        nib.state(StateKey::DiscoveryCycle)
            .expect("state")
            .and_then(|v| v.as_u64()),
        Some(d.cycle)
    );
}

#[test]
fn a_full_outbox_turns_the_next_report_into_a_snapshot() {
    let (_d, nib) = nib();
    let t = Utc::now();
    let p = CycleParams {
        outbox_cap: 2,
        ..LC
    };
    let a = dev("02:00:00:00:00:0a", "10.0.0.10", t);
    let mut ips = ["10.0.0.20", "10.0.0.21", "10.0.0.22"].into_iter();
    nib.lc_cycle(&p, std::slice::from_ref(&a), t, report_item)
        .expect("c1");
    let mut b = dev("02:00:00:00:00:0b", ips.next().expect("ip"), t);
    nib.lc_cycle(&p, &[a.clone(), b.clone()], t, report_item)
        .expect("c2");
    assert_eq!(nib.outbox_len().expect("len"), 2);
    b.ip = ips.next().expect("ip").into();
    let d = nib
        .lc_cycle(&p, &[a.clone(), b.clone()], t, report_item)
        .expect("c3");
    assert!(d.full_resync);
    assert_eq!(d.dropped_reports, 2);
    assert_eq!(d.updated.len(), 2, "everything active is in the snapshot");
    let pending = nib.outbox_pending(10).expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].item.item_id, "report-3");
    // Back to deltas afterwards.
    let d = nib.lc_cycle(&p, &[a, b], t, report_item).expect("c4");
    assert!(!d.full_resync && d.is_empty());
}

#[test]
fn regional_ingest_resolves_collisions_by_last_seen_and_ignores_retransmissions() {
    let (_d, nib) = nib();
    let key = IdentityKey::generate();
    let t0 = Utc::now() - chrono::Duration::seconds(60);
    let t1 = t0 + chrono::Duration::seconds(30);
    let me = "regional_cntl_zone-A_1";
    let (lc1, lc2) = ("local_cntl_zone-A_1", "local_cntl_zone-A_2");
    let a = dev("02:00:00:00:00:0a", "10.0.0.10", t1);
    let out = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "r1",
            t1,
            std::slice::from_ref(&a),
            &[],
            &[],
            lim(100),
            me,
            &key,
            t1,
        )
        .expect("ingest");
    assert_eq!(
        (out.stored_new, out.collisions, out.duplicate),
        (1, 0, false)
    );
    // The same report again: acknowledged with the first outcome, nothing applied.
    let again = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "r1",
            t1,
            std::slice::from_ref(&a),
            &[],
            &[],
            lim(100),
            me,
            &key,
            t1,
        )
        .expect("again");
    assert!(again.duplicate);
    assert_eq!(again.stored_new, 1);

    // lc2 claims the MAC while lc1 still sees it, even with a sighting from the far
    // future: lc1 keeps it, the device is contested (recorded once per contender).
    let future = dev(
        "02:00:00:00:00:0a",
        "10.0.0.77",
        t1 + chrono::Duration::days(3650),
    );
    for (i, r) in ["k2", "k2b", "k2c"].iter().enumerate() {
        let out = nib
            .rc_ingest(
                lc2,
                "zone-A",
                r,
                t1,
                &[],
                std::slice::from_ref(&future),
                &[],
                lim(100),
                me,
                &key,
                t1,
            )
            .expect("contest");
        assert_eq!((out.collisions, out.stored_updated), (1, 0), "report {i}");
    }
    let row = nib.device(&a.mac).expect("row").expect("a");
    assert_eq!(
        (row.lc_id.as_str(), row.device.ip.as_str()),
        (lc1, "10.0.0.10")
    );
    // lc2 cannot retire what it does not own.
    let gone = [inactive_of(&a)];
    let out = nib
        .rc_ingest(
            lc2,
            "zone-A",
            "k3",
            t1,
            &[],
            &[],
            &gone,
            lim(100),
            me,
            &key,
            t1,
        )
        .expect("not owner");
    assert_eq!(out.marked_inactive, 0);
    // lc1 reports it inactive, but in a report older than its last sighting: ignored.
    let out = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "k4",
            t0,
            &[],
            &[],
            &gone,
            lim(100),
            me,
            &key,
            t1,
        )
        .expect("stale");
    assert_eq!(out.marked_inactive, 0);
    // The owner lost it: inactive; now lc2's next sighting moves it.
    let t2 = t1 + chrono::Duration::seconds(5);
    let out = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "k5",
            t2,
            &[],
            &[],
            &gone,
            lim(100),
            me,
            &key,
            t2,
        )
        .expect("owner");
    assert_eq!(out.marked_inactive, 1);
    let moved = dev("02:00:00:00:00:0a", "10.0.0.78", t2);
    let out = nib
        .rc_ingest(
            lc2,
            "zone-A",
            "k6",
            t2,
            &[],
            std::slice::from_ref(&moved),
            &[],
            lim(100),
            me,
            &key,
            t2,
        )
        .expect("move");
    assert_eq!((out.collisions, out.stored_updated), (1, 1));
    let row = nib.device(&a.mac).expect("row").expect("a");
    assert_eq!(
        (row.lc_id.as_str(), row.device.ip.as_str(), row.status),
        (lc2, "10.0.0.78", DeviceStatus::Active)
    );
    // The previous owner sees it again: it takes it back at once.
    let back = dev("02:00:00:00:00:0a", "10.0.0.10", t2);
    let out = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "k7",
            t2,
            &[],
            std::slice::from_ref(&back),
            &[],
            lim(100),
            me,
            &key,
            t2,
        )
        .expect("restore");
    assert_eq!(out.stored_updated, 1);
    assert_eq!(nib.device(&a.mac).expect("row").expect("a").lc_id, lc1);
    let types: Vec<String> = nib
        .events(0, 100)
        .expect("events")
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        [
            "DEVICE_MULTI_LC",
            "DEVICE_LC_REASSIGNED",
            "DEVICE_LC_RESTORED"
        ]
    );
    // Revoking lc1 retires its devices.
    assert_eq!(nib.retire_devices_of(lc1).expect("retire"), 1);
    assert_eq!(
        nib.device(&a.mac).expect("row").expect("a").status,
        DeviceStatus::Inactive
    );

    // A spike is flagged.
    let many: Vec<Device> = (0..5)
        .map(|i| {
            dev(
                &format!("02:00:00:00:01:{i:02x}"),
                &format!("10.0.1.{i}"),
                t2,
            )
        })
        .collect();
    let out = nib
        .rc_ingest(
            lc1,
            "zone-A",
            "r7",
            t2,
            &many,
            &[],
            &[],
            lim(3),
            me,
            &key,
            t2,
        )
        .expect("spike");
    assert!(out.spike);
    // A first report lists everything an LC knows: no spike.
    let first: Vec<Device> = (0..5)
        .map(|i| {
            dev(
                &format!("02:00:00:00:03:{i:02x}"),
                &format!("10.0.3.{i}"),
                t2,
            )
        })
        .collect();
    let out = nib
        .rc_ingest(
            "local_cntl_zone-A_3",
            "zone-A",
            "r8",
            t2,
            &first,
            &[],
            &[],
            lim(3),
            me,
            &key,
            t2,
        )
        .expect("first");
    assert!(!out.spike);
    assert!(
        nib.events(0, 100)
            .expect("events")
            .iter()
            .any(|e| e.event_type == "ANOMALY_DISCOVERY_SPIKE")
    );
    let n = nib.events(0, 100).expect("events").len() as u64;
    let walked = crate::nib::verify_chain(&nib.conn(), &key.public()).expect("walk");
    assert_eq!(walked, Ok(n));
}

#[test]
fn summaries_cover_each_change_once_and_the_gc_flags_cross_region_macs() {
    let (_d, rc) = nib();
    let key = IdentityKey::generate();
    let t = Utc::now();
    let me = "regional_cntl_zone-A_1";
    assert_eq!(rc.rc_summary_window(100).expect("window"), None);
    let devs: Vec<Device> = (0..5)
        .map(|i| {
            dev(
                &format!("02:00:00:00:02:{i:02x}"),
                &format!("10.0.2.{i}"),
                t,
            )
        })
        .collect();
    rc.rc_ingest(
        "local_cntl_zone-A_1",
        "zone-A",
        "r1",
        t,
        &devs[..3],
        &[],
        &[],
        lim(100),
        me,
        &key,
        t,
    )
    .expect("r1");
    rc.rc_ingest(
        "local_cntl_zone-A_2",
        "zone-A",
        "r2",
        t,
        &devs[3..],
        &[],
        &[],
        lim(100),
        me,
        &key,
        t,
    )
    .expect("r2");
    // A limit inside the second transaction's group still takes the whole group.
    let w = rc.rc_summary_window(4).expect("window").expect("changes");
    assert_eq!(w.devices.len(), 5);
    assert_eq!(
        (
            w.total_new,
            w.total_updated,
            w.total_inactive,
            w.total_active
        ),
        (5, 0, 0, 5)
    );
    assert_eq!(
        w.lcs_reported,
        ["local_cntl_zone-A_1", "local_cntl_zone-A_2"]
    );
    // A limit of 1 takes only the first transaction.
    let w1 = rc.rc_summary_window(1).expect("window").expect("changes");
    assert_eq!(w1.devices.len(), 3);
    let item = OutboxItem {
        item_id: "summary-1".into(),
        recipient: "global_cntl_1".into(),
        message_type: "DISCOVERY_SUMMARY".into(),
        topic: None,
        payload: Map::new(),
    };
    rc.rc_commit_summary(w.to_seq, &item, t).expect("commit");
    assert_eq!(
        rc.rc_summary_window(100).expect("window"),
        None,
        "all covered"
    );
    assert_eq!(rc.outbox_len().expect("queued"), 1);

    let (_g, gc) = nib();
    let gkey = IdentityKey::generate();
    let (fresh, cross) = gc
        .gc_ingest_summary(
            "regional_cntl_zone-A_1",
            "zone-A",
            "s1",
            &w.devices,
            "global_cntl_1",
            &gkey,
            t,
        )
        .expect("s1");
    assert!(fresh && cross.is_empty());
    let (fresh, _) = gc
        .gc_ingest_summary(
            "regional_cntl_zone-A_1",
            "zone-A",
            "s1",
            &w.devices,
            "global_cntl_1",
            &gkey,
            t,
        )
        .expect("again");
    assert!(!fresh, "a retransmitted summary is not applied twice");
    // The same MAC appears in zone-B: flagged once.
    let dup = vec![SummaryDevice {
        lc_id: "local_cntl_zone-B_1".into(),
        ..w.devices[0].clone()
    }];
    let (_, cross) = gc
        .gc_ingest_summary(
            "regional_cntl_zone-B_1",
            "zone-B",
            "s2",
            &dup,
            "global_cntl_1",
            &gkey,
            t,
        )
        .expect("s2");
    assert_eq!(cross, vec![(w.devices[0].mac.clone(), "zone-A".to_owned())]);
    let (_, cross) = gc
        .gc_ingest_summary(
            "regional_cntl_zone-B_1",
            "zone-B",
            "s3",
            &dup,
            "global_cntl_1",
            &gkey,
            t,
        )
        .expect("s3");
    assert_eq!(cross.len(), 1, "still both active");
    let flagged = gc
        .events(0, 100)
        .expect("events")
        .into_iter()
        .filter(|e| e.event_type == "ANOMALY_GLOBAL_MAC_COLLISION")
        .count();
    assert_eq!(flagged, 1, "logged when it starts, not on every summary");
    assert_eq!(gc.inventory().expect("inventory").len(), 6);
}

#[test]
fn a_local_controller_owns_at_most_its_cap() {
    let (_d, nib) = nib();
    let key = IdentityKey::generate();
    let t = Utc::now();
    let me = "regional_cntl_zone-A_1";
    let limits = IngestLimits {
        spike_threshold: usize::MAX,
        max_devices_per_lc: 3,
    };
    let devs: Vec<Device> = (0..5)
        .map(|i| {
            dev(
                &format!("02:00:00:00:07:{i:02x}"),
                &format!("10.0.7.{i}"),
                t,
            )
        })
        .collect();
    let out = nib
        .rc_ingest(
            "local_cntl_zone-A_1",
            "zone-A",
            "c1",
            t,
            &devs,
            &[],
            &[],
            limits,
            me,
            &key,
            t,
        )
        .expect("ingest");
    assert_eq!((out.stored_new, out.over_cap), (3, 2));
    // Another controller is not affected by this one's cap.
    let out = nib
        .rc_ingest(
            "local_cntl_zone-A_2",
            "zone-A",
            "c2",
            t,
            &devs[3..],
            &[],
            &[],
            limits,
            me,
            &key,
            t,
        )
        .expect("ingest");
    assert_eq!((out.stored_new, out.over_cap), (2, 0));
    let caps: Vec<_> = nib
        .events(0, 100)
        .expect("events")
        .into_iter()
        .filter(|e| e.event_type == "DEVICE_CAP_REACHED")
        .collect();
    assert_eq!(caps.len(), 1, "one event per report, not per device");
}
