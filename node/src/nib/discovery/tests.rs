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
    assert_eq!(nib.retire_devices_of(lc1, t2).expect("retire"), 1);
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

/// One report applied at a regional controller at `at` (made then too).
#[allow(clippy::too_many_arguments)]
fn ingest(
    nib: &Nib,
    key: &IdentityKey,
    lc: &str,
    id: &str,
    new: &[Device],
    inactive: &[InactiveDevice],
    limits: IngestLimits,
    at: DateTime<Utc>,
) -> IngestOutcome {
    nib.rc_ingest(
        lc,
        "zone-A",
        id,
        at,
        new,
        &[],
        inactive,
        limits,
        "regional_cntl_zone-A_1",
        key,
        at,
    )
    .expect("ingest")
}

fn count(nib: &Nib, table: &str) -> i64 {
    nib.conn()
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn macs(prefix: u8, n: u8, at: DateTime<Utc>) -> Vec<Device> {
    (0..n)
        .map(|i| {
            dev(
                &format!("02:00:00:00:{prefix:02x}:{i:02x}"),
                &format!("10.0.{prefix}.{i}"),
                at,
            )
        })
        .collect()
}

#[test]
fn purging_applied_ids_keeps_the_recent_ones_and_who_reported() {
    let (_d, nib) = nib();
    let key = IdentityKey::generate();
    let t0 = Utc::now() - chrono::Duration::hours(3);
    let t1 = t0 + chrono::Duration::hours(2);
    let lc1 = "local_cntl_zone-A_1";
    // lc1's first report: everything it knows, not a spike.
    let first = ingest(&nib, &key, lc1, "r1", &macs(0x10, 5, t0), &[], lim(3), t0);
    assert!(!first.spike && !first.duplicate);
    ingest(&nib, &key, lc1, "r2", &macs(0x11, 1, t1), &[], lim(3), t1);
    // The ids applied before the cut go; the later one stays.
    assert_eq!(
        nib.purge_applied(t1 - chrono::Duration::seconds(1))
            .expect("purge"),
        1
    );
    assert_eq!(count(&nib, "applied_messages"), 1);
    let again = ingest(&nib, &key, lc1, "r2", &macs(0x11, 1, t1), &[], lim(3), t1);
    assert!(again.duplicate, "a retransmission inside the window");
    // That lc1 reported survives the purge of its first report: its next jump is a spike.
    let later = ingest(&nib, &key, lc1, "r3", &macs(0x12, 5, t1), &[], lim(3), t1);
    assert!(later.spike, "lc1 reported before: {later:?}");
    // Purging everything keeps it too, and the summary still names lc1.
    nib.purge_applied(t1 + chrono::Duration::hours(1))
        .expect("purge all");
    assert_eq!(count(&nib, "applied_messages"), 0);
    assert_eq!(count(&nib, "reporters"), 1);
    let w = nib.rc_summary_window(10_000).expect("window").expect("w");
    assert_eq!(w.lcs_reported, [lc1]);
    let spike = ingest(&nib, &key, lc1, "r4", &macs(0x13, 5, t1), &[], lim(3), t1);
    assert!(spike.spike, "still known to have reported");
}

#[test]
fn retention_deletes_only_what_was_inactive_long_enough_and_a_returning_device_is_new() {
    let (_d, nib) = nib();
    let key = IdentityKey::generate();
    let t0 = Utc::now() - chrono::Duration::days(30);
    let (lc1, lc2) = ("local_cntl_zone-A_1", "local_cntl_zone-A_2");
    let a = macs(0x20, 3, t0); // lc1's
    let b = macs(0x21, 2, t0); // lc2's
    ingest(&nib, &key, lc1, "a", &a, &[], lim(100), t0);
    ingest(&nib, &key, lc2, "b", &b, &[], lim(100), t0);
    // lc2 contests a[0] while lc1 still sees it.
    let out = ingest(&nib, &key, lc2, "b2", &a[..1], &[], lim(100), t0);
    assert_eq!(out.collisions, 1);
    // At t1 lc1 reports a[0] and a[1] gone; at t2 lc2 is revoked (its devices retired).
    let t1 = t0 + chrono::Duration::days(1);
    let t2 = t0 + chrono::Duration::days(2);
    let gone = [inactive_of(&a[0]), inactive_of(&a[1])];
    let out = ingest(&nib, &key, lc1, "a2", &[], &gone, lim(100), t1);
    assert_eq!(out.marked_inactive, 2);
    assert_eq!(nib.retire_devices_of(lc2, t2).expect("retire"), 2);
    let events_before = nib.events(0, 100).expect("events").len();

    // Nothing is old enough yet.
    let none = nib
        .expire_devices(t1, 86_400, "regional_cntl_zone-A_1", &key, t1)
        .expect("expire");
    assert_eq!(none, Expired::default());
    assert_eq!(nib.events(0, 100).expect("events").len(), events_before);
    // Inactive since t1: deleted; retired at t2 and a[2], still active: kept.
    let cut = t1 + chrono::Duration::seconds(1);
    let out = nib
        .expire_devices(cut, 86_400, "regional_cntl_zone-A_1", &key, t2)
        .expect("expire");
    assert_eq!(out.devices, 2);
    let left: Vec<String> = nib
        .devices(None)
        .expect("devices")
        .into_iter()
        .map(|d| d.device.mac)
        .collect();
    assert_eq!(left, [a[2].mac.clone(), b[0].mac.clone(), b[1].mac.clone()]);
    let evs = nib.events(0, 100).expect("events");
    assert_eq!(evs.len(), events_before + 1, "one event for the pass");
    let ev = evs.last().expect("event");
    assert_eq!(ev.event_type, "DEVICES_EXPIRED");
    let details = json::parse(ev.details.as_bytes()).expect("details");
    assert_eq!(details.get("devices").and_then(Value::as_u64), Some(2));
    assert_eq!(
        details.get("retention_secs").and_then(Value::as_u64),
        Some(86_400)
    );
    // The retired ones go when their own time comes.
    let out = nib
        .expire_devices(
            t2 + chrono::Duration::seconds(1),
            86_400,
            "regional_cntl_zone-A_1",
            &key,
            t2,
        )
        .expect("expire");
    assert_eq!(out.devices, 2);

    // a[0] comes back, seen by lc2 (which lc1 had kept out while it saw it): a new device,
    // nobody's contender or previous owner any more.
    let t3 = t2 + chrono::Duration::days(1);
    let back = dev(&a[0].mac, "10.0.32.99", t3);
    let out = ingest(
        &nib,
        &key,
        "local_cntl_zone-A_3",
        "c1",
        std::slice::from_ref(&back),
        &[],
        lim(100),
        t3,
    );
    assert_eq!((out.stored_new, out.collisions), (1, 0));
    let row = nib.device(&back.mac).expect("row").expect("back");
    assert_eq!(
        (row.lc_id.as_str(), row.status, row.first_seen.clone()),
        ("local_cntl_zone-A_3", DeviceStatus::Active, format_iso(t3))
    );
    assert_eq!(
        ownership(&nib.conn(), &back.mac).expect("ownership"),
        (None, None)
    );
    let n = nib.events(0, 100).expect("events").len() as u64;
    let walked = crate::nib::verify_chain(&nib.conn(), &key.public()).expect("walk");
    assert_eq!(walked, Ok(n));
}

#[test]
fn change_stamps_never_go_back_when_the_newest_rows_are_deleted() {
    let (_d, rc) = nib();
    let key = IdentityKey::generate();
    let t0 = Utc::now() - chrono::Duration::days(30);
    let lc1 = "local_cntl_zone-A_1";
    let a = macs(0x30, 2, t0);
    ingest(&rc, &key, lc1, "r1", &a, &[], lim(100), t0);
    let gone: Vec<InactiveDevice> = a.iter().map(inactive_of).collect();
    ingest(&rc, &key, lc1, "r2", &[], &gone, lim(100), t0);
    let summarize = |id: &str| {
        let w = rc.rc_summary_window(100).expect("window").expect("changes");
        let item = OutboxItem {
            item_id: id.into(),
            recipient: "global_cntl_1".into(),
            message_type: SUMMARY_TYPE.into(),
            topic: None,
            payload: Map::new(),
        };
        rc.rc_commit_summary(w.to_seq, &item, t0).expect("commit");
        w
    };
    summarize("s1");
    // Every row goes, the newest stamp with them.
    let t1 = t0 + chrono::Duration::days(8);
    let out = rc
        .expire_devices(
            t1 - chrono::Duration::days(7),
            604_800,
            "regional_cntl_zone-A_1",
            &key,
            t1,
        )
        .expect("expire");
    assert_eq!(out.devices, 2);
    // The next change is still after the last summary, so the next one carries it.
    let c = macs(0x31, 1, t1);
    ingest(&rc, &key, lc1, "r3", &c, &[], lim(100), t1);
    let w = summarize("s2");
    assert_eq!(w.devices.len(), 1);
    assert_eq!(
        (w.devices[0].mac.as_str(), w.total_new),
        (c[0].mac.as_str(), 1)
    );
}

#[test]
fn the_global_inventory_keeps_active_rows_and_deletes_long_inactive_ones() {
    let (_d, gc) = nib();
    let key = IdentityKey::generate();
    let t0 = Utc::now() - chrono::Duration::days(30);
    let row = |mac: &str, status: &str| SummaryDevice {
        mac: mac.into(),
        ip: "10.0.0.1".into(),
        hostname: None,
        status: status.into(),
        last_seen: format_iso(t0),
        lc_id: "local_cntl_zone-A_1".into(),
    };
    let summary = [
        row("02:00:00:00:40:01", "active"),
        row("02:00:00:00:40:02", "inactive"),
    ];
    let apply = |id: &str, devices: &[SummaryDevice], at: DateTime<Utc>| {
        gc.gc_ingest_summary(
            "regional_cntl_zone-A_1",
            "zone-A",
            id,
            devices,
            "global_cntl_1",
            &key,
            at,
        )
        .expect("summary")
    };
    apply("s1", &summary, t0);
    // Active rows keep their (old) last_seen: they are never deleted for age.
    let t1 = t0 + chrono::Duration::days(8);
    let out = gc
        .expire_devices(
            t1 - chrono::Duration::days(7),
            604_800,
            "global_cntl_1",
            &key,
            t1,
        )
        .expect("expire");
    assert_eq!(
        out,
        Expired {
            devices: 0,
            inventory: 1
        }
    );
    let inv = gc.inventory().expect("inventory");
    assert_eq!(
        inv.iter().map(|r| r.mac.as_str()).collect::<Vec<_>>(),
        ["02:00:00:00:40:01"]
    );
    // The deleted one comes back: a new row.
    let again = SummaryDevice {
        last_seen: format_iso(t1),
        status: "active".into(),
        ..summary[1].clone()
    };
    let (fresh, _) = apply("s2", std::slice::from_ref(&again), t1);
    assert!(fresh);
    assert_eq!(gc.inventory().expect("inventory").len(), 2);
    // A retired controller's rows are inactive from its revocation.
    assert_eq!(
        gc.retire_devices_of("regional_cntl_zone-A_1", t1)
            .expect("retire"),
        2
    );
    let kept = gc
        .expire_devices(
            t1 - chrono::Duration::seconds(1),
            604_800,
            "global_cntl_1",
            &key,
            t1,
        )
        .expect("expire");
    assert_eq!(kept.inventory, 0, "retired just now");
    let gone = gc
        .expire_devices(
            t1 + chrono::Duration::seconds(1),
            604_800,
            "global_cntl_1",
            &key,
            t1,
        )
        .expect("expire");
    assert_eq!(gone.inventory, 2);
}

#[test]
fn items_unacknowledged_too_long_are_replaced_by_full_ones() {
    let (_d, lc) = nib();
    let t0 = Utc::now() - chrono::Duration::hours(3);
    let a = macs(0x50, 2, t0);
    let d1 = lc.lc_cycle(&LC, &a, t0, report_item).expect("c1");
    assert_eq!(d1.new.len(), 2);
    assert_eq!(
        lc.outbox_expire(t0 - chrono::Duration::seconds(1))
            .expect("expire"),
        (0, 0),
        "not old enough"
    );
    assert_eq!(
        lc.outbox_expire(t0 + chrono::Duration::seconds(1))
            .expect("expire"),
        (1, 0)
    );
    assert_eq!(lc.outbox_len().expect("len"), 0);
    // The next cycle reports everything the dropped report carried, and more.
    let t1 = t0 + chrono::Duration::hours(1);
    let d2 = lc.lc_cycle(&LC, &a, t1, report_item).expect("c2");
    assert!(d2.full_resync);
    assert_eq!(d2.updated.len(), 2);
    assert_eq!(lc.outbox_len().expect("len"), 1);

    // A regional controller's expired summary: the next windows cover every device.
    let (_r, rc) = nib();
    let key = IdentityKey::generate();
    ingest(
        &rc,
        &key,
        "local_cntl_zone-A_1",
        "r1",
        &a,
        &[],
        lim(100),
        t0,
    );
    let w = rc.rc_summary_window(100).expect("window").expect("w");
    let item = OutboxItem {
        item_id: "s1".into(),
        recipient: "global_cntl_1".into(),
        message_type: SUMMARY_TYPE.into(),
        topic: None,
        payload: Map::new(),
    };
    rc.rc_commit_summary(w.to_seq, &item, t0).expect("commit");
    assert_eq!(rc.rc_summary_window(100).expect("window"), None);
    assert_eq!(
        rc.outbox_expire(t0 + chrono::Duration::seconds(1))
            .expect("expire"),
        (0, 1)
    );
    let again = rc.rc_summary_window(100).expect("window").expect("all");
    assert_eq!(again.devices.len(), 2);
}
