//! Housekeeping: the background task that keeps a long-running node's NIB bounded.
//!
//! Every tier runs it, at start and then every [`period`] (a tenth of the device retention,
//! between 1 s and an hour). Each pass:
//! - forgets the ids of applied discovery reports and summaries older than
//!   [`APPLIED_RETENTION`] (`applied_messages`; whether a sender ever reported is kept in
//!   `reporters`, one row per sender);
//! - deletes devices inactive for longer than `--device-retention` (`devices` at a local or
//!   regional controller, retired ones included; `inventory` at the global controller),
//!   with one `DEVICES_EXPIRED` audit event counting them.
//!
//! See "State and its bounds" in docs/DESIGN.md for every table and what bounds it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::discovery::delivery::OUTBOX_MAX_AGE;
use crate::nib::{Expired, NibError};
use crate::trust::Trust;

/// How long the ids of applied reports and summaries are kept: a sender retries an item
/// for at most [`OUTBOX_MAX_AGE`] by its own clock, and the signature freshness window
/// (300 s) bounds how far that clock and the envelope's travel may be off, once when the
/// item was first applied and once when the last retransmission arrives; plus a minute
/// for the sender's delivery pass. 71 minutes.
pub const APPLIED_RETENTION: Duration = Duration::from_secs(
    OUTBOX_MAX_AGE.as_secs() + 2 * pdsno_shared::signing::MAX_AGE_SECS.unsigned_abs() + 60,
);

/// The default device retention: 7 days.
pub const DEFAULT_DEVICE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Time between passes for a device retention of `retention`: a tenth of it, between
/// 1 s and an hour (so a device is deleted at most a tenth late, and a node writes at
/// most one `DEVICES_EXPIRED` event an hour with the default).
pub fn period(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// What one pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Applied-message ids forgotten.
    pub applied: usize,
    /// Devices and inventory rows deleted.
    pub expired: Expired,
}

fn before(now: DateTime<Utc>, age: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One pass at the node's clock's current time. Blocking (SQLite).
///
/// # Errors
/// On a NIB failure (each step is its own transaction; what failed is retried next pass).
pub fn pass(trust: &Trust, device_retention: Duration) -> Result<Removed, NibError> {
    let now = trust.clock.now();
    let applied = trust.nib.purge_applied(before(now, APPLIED_RETENTION))?;
    let expired = trust.nib.expire_devices(
        before(now, device_retention),
        device_retention.as_secs(),
        &trust.me,
        &trust.identity,
        now,
    )?;
    Ok(Removed { applied, expired })
}

/// Runs [`pass`] now and every [`period`] until `cancel`.
pub async fn run(trust: Arc<Trust>, device_retention: Duration, cancel: CancellationToken) {
    let every = period(device_retention);
    loop {
        let t = trust.clone();
        match tokio::task::spawn_blocking(move || pass(&t, device_retention)).await {
            Ok(Ok(r)) if r != Removed::default() => tracing::info!(
                applied_ids = r.applied,
                devices = r.expired.devices,
                inventory = r.expired.inventory,
                "housekeeping: old state removed"
            ),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "housekeeping failed; retried at the next pass")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nib::{CycleParams, Nib, OutboxItem};
    use pdsno_shared::ids::Role;
    use pdsno_shared::keys::IdentityKey;
    use pdsno_shared::payload::discovery::{Device, DiscoveryMethod};
    use pdsno_shared::time::{Clock, ManualClock, format_iso};

    fn trust(dir: &std::path::Path, clock: &ManualClock, role: Role, me: &str) -> Trust {
        let nib = Arc::new(Nib::open(dir.join("nib.db")).expect("open"));
        Trust {
            me: me.into(),
            role,
            region: Some("zone-A".into()),
            identity: Arc::new(IdentityKey::generate()),
            network_key: None,
            pair_keys: Arc::new(
                crate::keys::PairKeys::load(nib.clone(), chrono::Duration::minutes(10))
                    .expect("keys"),
            ),
            nib,
            parent: None,
            clock: Arc::new(clock.clone()),
        }
    }

    fn dev(i: u8, seen: DateTime<Utc>) -> Device {
        Device {
            ip: format!("10.0.0.{i}"),
            mac: format!("02:00:00:00:00:{i:02x}"),
            last_seen: format_iso(seen),
            protocol: "SIM".into(),
            reachable: true,
            rtt_ms: None,
            hostname: None,
            vendor: None,
            model: None,
            uptime_seconds: None,
            discovery_method: DiscoveryMethod::Icmp,
            extra: Default::default(),
        }
    }

    /// A regional controller keeps each applied id exactly as long as a retransmission can
    /// come, then forgets it.
    #[test]
    fn a_pass_keeps_applied_ids_for_the_replay_window_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let clock = ManualClock::new(Utc::now());
        let t = trust(dir.path(), &clock, Role::Regional, "regional_cntl_zone-A_1");
        let ingest = |id: &str| {
            let now = clock.now();
            t.nib
                .rc_ingest(
                    "local_cntl_zone-A_1",
                    "zone-A",
                    id,
                    now,
                    &[dev(1, now)],
                    &[],
                    &[],
                    crate::nib::IngestLimits::DEFAULT,
                    &t.me,
                    &t.identity,
                    now,
                )
                .expect("ingest")
        };
        assert!(!ingest("r1").duplicate);
        // The sender gives up on r1 after OUTBOX_MAX_AGE; until then (and the skews) a
        // retransmission is recognised.
        clock.advance(
            chrono::Duration::from_std(APPLIED_RETENTION).expect("d")
                - chrono::Duration::seconds(1),
        );
        let r = pass(&t, DEFAULT_DEVICE_RETENTION).expect("pass");
        assert_eq!(r, Removed::default());
        assert!(ingest("r1").duplicate);
        clock.advance(chrono::Duration::seconds(2));
        let r = pass(&t, DEFAULT_DEVICE_RETENTION).expect("pass");
        assert_eq!(r.applied, 1);
        let left: i64 = t
            .nib
            .conn()
            .query_row("SELECT COUNT(*) FROM applied_messages", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 0);
        assert!(OUTBOX_MAX_AGE < APPLIED_RETENTION);
    }

    /// A local controller's device inactive longer than the retention is deleted, once,
    /// and comes back as new.
    #[test]
    fn a_pass_deletes_devices_inactive_longer_than_the_retention() {
        let dir = tempfile::tempdir().expect("tmp");
        let clock = ManualClock::new(Utc::now());
        let t = trust(dir.path(), &clock, Role::Local, "local_cntl_zone-A_1");
        let p = CycleParams {
            lc_id: "local_cntl_zone-A_1",
            region: "zone-A",
            missed_limit: 1,
            outbox_cap: 100,
        };
        let report = |_: &crate::nib::CycleDelta| -> Option<OutboxItem> { None };
        let retention = Duration::from_secs(3600);
        let now = clock.now();
        t.nib
            .lc_cycle(&p, &[dev(1, now), dev(2, now)], now, report)
            .expect("c1");
        clock.advance(chrono::Duration::seconds(30));
        let now = clock.now();
        let d = t.nib.lc_cycle(&p, &[dev(1, now)], now, report).expect("c2");
        assert_eq!(d.inactive.len(), 1, "device 2 missed");
        // Seen every cycle, device 1 stays however long; device 2 goes after the retention.
        clock.advance(chrono::Duration::seconds(3599));
        assert_eq!(pass(&t, retention).expect("pass").expired.devices, 0);
        clock.advance(chrono::Duration::seconds(2));
        assert_eq!(pass(&t, retention).expect("pass").expired.devices, 1);
        assert_eq!(pass(&t, retention).expect("pass"), Removed::default());
        let evs = t.nib.events(0, 10).expect("events");
        assert_eq!(
            evs.iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
            ["DEVICES_EXPIRED"]
        );
        let now = clock.now();
        let d = t
            .nib
            .lc_cycle(&p, &[dev(1, now), dev(2, now)], now, report)
            .expect("back");
        assert_eq!(d.new.len(), 1, "{d:?}");
        assert_eq!(d.new[0].mac, dev(2, now).mac);
    }

    #[test]
    fn the_numbers() {
        assert_eq!(APPLIED_RETENTION, Duration::from_secs(4260));
        assert_eq!(period(DEFAULT_DEVICE_RETENTION), Duration::from_secs(3600));
        assert_eq!(period(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(600)), Duration::from_secs(60));
        let now = Utc::now();
        assert_eq!(before(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
    }
}
