//! Discovery state: devices (at a local controller, what its scans found; at a regional
//! controller, its region), the global controller's inventory (one row per MAC and
//! region), and the ids of reports and summaries already applied (retransmissions are
//! acknowledged again, never applied twice).
//!
//! Every operation is one transaction. A local controller's cycle writes only what
//! changed, its cycle counter and the report describing the change together, so a crash
//! loses neither. Each transaction that changes devices stamps them with the next
//! `changed_seq`, which is how a regional controller knows what its next summary covers.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::IdentityKey;
use pdsno_shared::payload::discovery::{Device, DiscoveryMethod, InactiveDevice};
use pdsno_shared::time::{format_iso, parse_iso};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::events::{self, Event};
use super::outbox::{self, OutboxItem};
use super::state::{StateKey, get_state, put_state};
use super::{Nib, NibError};

/// The outbox type of discovery reports.
const REPORT_TYPE: &str = "DISCOVERY_REPORT";

/// The outbox type of discovery summaries.
const SUMMARY_TYPE: &str = "DISCOVERY_SUMMARY";

/// The `id_sequences` kind holding the highest change stamp of deleted devices: stamps
/// never go back when the newest rows are deleted (a summary would miss the next change).
const CHANGE_FLOOR: &str = "device_change";

/// Whether a device is currently seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Seen recently.
    Active,
    /// Missed for the configured number of cycles.
    Inactive,
}

impl DeviceStatus {
    /// Stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Inactive => "inactive",
        }
    }

    fn parse(s: &str) -> DeviceStatus {
        if s == "active" {
            DeviceStatus::Active
        } else {
            DeviceStatus::Inactive
        }
    }
}

/// A stored device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRow {
    /// The device as reported.
    pub device: Device,
    /// Active or inactive.
    pub status: DeviceStatus,
    /// The local controller that reports it.
    pub lc_id: String,
    /// Its region.
    pub region: String,
    /// When it was first stored (ISO-8601).
    pub first_seen: String,
    /// Consecutive cycles it was missed (local controllers).
    pub missed: u32,
    /// The change stamp of the transaction that last changed it.
    pub changed_seq: i64,
}

/// What one discovery cycle found, relative to the NIB.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CycleDelta {
    /// The cycle number.
    pub cycle: u64,
    /// Devices never stored before.
    pub new: Vec<Device>,
    /// Devices whose address, name, vendor, model, reachability or method changed, or that
    /// came back after being inactive (all of them on a full resync).
    pub updated: Vec<Device>,
    /// Devices missed for the limit of cycles just now (all inactive ones on a resync).
    pub inactive: Vec<InactiveDevice>,
    /// Devices the scan returned.
    pub seen: usize,
    /// Active devices after the cycle.
    pub active: u64,
    /// True when this cycle reports everything (queued reports had to be dropped).
    pub full_resync: bool,
    /// Queued reports dropped to make room (they are covered by this full report).
    pub dropped_reports: usize,
}

impl CycleDelta {
    /// Nothing to report.
    pub fn is_empty(&self) -> bool {
        self.new.is_empty() && self.updated.is_empty() && self.inactive.is_empty()
    }
}

/// What a regional controller did with one report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IngestOutcome {
    /// The report was applied before (a retransmission): nothing changed now.
    pub duplicate: bool,
    /// `len(new) + len(updated)` of the report.
    pub processed: u64,
    /// Devices another local controller also claims.
    pub collisions: u64,
    /// Devices stored for the first time.
    pub stored_new: u64,
    /// Devices whose row changed.
    pub stored_updated: u64,
    /// Devices marked inactive.
    pub marked_inactive: u64,
    /// More new devices than the spike threshold.
    pub spike: bool,
    /// New devices refused because the reporter reached its device cap.
    pub over_cap: u64,
}

/// Bounds a regional controller applies to each local controller's reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestLimits {
    /// More new devices than this in one report (after the first) is an anomaly.
    pub spike_threshold: usize,
    /// Most devices one local controller may own.
    pub max_devices_per_lc: u64,
}

impl IngestLimits {
    /// The defaults: spike above 100 new devices, at most 65,536 devices per LC.
    pub const DEFAULT: IngestLimits = IngestLimits {
        spike_threshold: 100,
        max_devices_per_lc: 65_536,
    };
}

impl IngestOutcome {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("processed".into(), self.processed.into());
        m.insert("collisions".into(), self.collisions.into());
        m.insert("stored_new".into(), self.stored_new.into());
        m.insert("stored_updated".into(), self.stored_updated.into());
        m.insert("marked_inactive".into(), self.marked_inactive.into());
        m.insert("spike".into(), self.spike.into());
        m.insert("over_cap".into(), self.over_cap.into());
        Value::Object(m)
    }

    fn from_value(v: &Value) -> IngestOutcome {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        IngestOutcome {
            duplicate: true,
            processed: n("processed"),
            collisions: n("collisions"),
            stored_new: n("stored_new"),
            stored_updated: n("stored_updated"),
            marked_inactive: n("marked_inactive"),
            spike: v.get("spike").and_then(Value::as_bool).unwrap_or(false),
            over_cap: n("over_cap"),
        }
    }
}

/// A device as a summary carries it to the global controller.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryDevice {
    /// MAC.
    pub mac: String,
    /// Address.
    pub ip: String,
    /// Host name.
    pub hostname: Option<String>,
    /// `active` / `inactive`.
    pub status: String,
    /// ISO-8601.
    pub last_seen: String,
    /// The local controller that reports it.
    pub lc_id: String,
}

impl SummaryDevice {
    /// As JSON.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("mac".into(), self.mac.clone().into());
        m.insert("ip".into(), self.ip.clone().into());
        m.insert("hostname".into(), self.hostname.clone().into());
        m.insert("status".into(), self.status.clone().into());
        m.insert("last_seen".into(), self.last_seen.clone().into());
        m.insert("lc_id".into(), self.lc_id.clone().into());
        Value::Object(m)
    }

    /// From JSON; `None` when a field is missing or malformed.
    pub fn from_value(v: &Value) -> Option<SummaryDevice> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let mac = pdsno_shared::payload::discovery::normalize_mac(&s("mac")?)?;
        let status = s("status")?;
        if status != "active" && status != "inactive" {
            return None;
        }
        let last_seen = s("last_seen")?;
        parse_iso(&last_seen).ok()?;
        Some(SummaryDevice {
            mac,
            ip: s("ip")?,
            hostname: s("hostname"),
            status,
            last_seen,
            lc_id: s("lc_id")?,
        })
    }
}

/// The devices a regional controller's next summary covers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SummaryWindow {
    /// Changes after this stamp...
    pub from_seq: i64,
    /// ...up to this one.
    pub to_seq: i64,
    /// When the previous summary was made (ISO-8601), if any.
    pub since: Option<String>,
    /// The changed devices.
    pub devices: Vec<SummaryDevice>,
    /// Of which new.
    pub total_new: u64,
    /// Of which updated (and active).
    pub total_updated: u64,
    /// Of which inactive.
    pub total_inactive: u64,
    /// Active devices in the region now.
    pub total_active: u64,
    /// Local controllers whose reports were applied since the previous summary.
    pub lcs_reported: Vec<String>,
}

/// One row of the global inventory.
#[derive(Clone, Debug, PartialEq)]
pub struct InventoryRow {
    /// MAC.
    pub mac: String,
    /// Region.
    pub region: String,
    /// Reporting regional controller.
    pub rc_id: String,
    /// Reporting local controller.
    pub lc_id: Option<String>,
    /// Address.
    pub ip: Option<String>,
    /// Host name.
    pub hostname: Option<String>,
    /// `active` / `inactive`.
    pub status: String,
    /// ISO-8601.
    pub last_seen: String,
}

const DEVICE_COLUMNS: &str = "mac, ip, hostname, vendor, model, protocol, reachable, rtt_ms, uptime_seconds, discovery_method, status, lc_id, region, first_seen, last_seen, missed, changed_seq, extra";

fn method_of(s: &str) -> DiscoveryMethod {
    match s {
        "snmp" => DiscoveryMethod::Snmp,
        "arp" => DiscoveryMethod::Arp,
        _ => DiscoveryMethod::Icmp,
    }
}

fn read_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<(DeviceRow, String)> {
    let extra: String = r.get(17)?;
    let missed: i64 = r.get(15)?;
    let uptime: Option<i64> = r.get(8)?;
    Ok((
        DeviceRow {
            device: Device {
                mac: r.get(0)?,
                ip: r.get(1)?,
                hostname: r.get(2)?,
                vendor: r.get(3)?,
                model: r.get(4)?,
                protocol: r.get(5)?,
                reachable: r.get::<_, i64>(6)? != 0,
                rtt_ms: r.get(7)?,
                uptime_seconds: uptime.and_then(|u| u64::try_from(u).ok()),
                discovery_method: method_of(&r.get::<_, String>(9)?),
                last_seen: r.get(14)?,
                extra: Map::new(),
            },
            status: DeviceStatus::parse(&r.get::<_, String>(10)?),
            lc_id: r.get(11)?,
            region: r.get(12)?,
            first_seen: r.get(13)?,
            missed: u32::try_from(missed).unwrap_or(u32::MAX),
            changed_seq: r.get(16)?,
        },
        extra,
    ))
}

fn finish_row((mut row, extra): (DeviceRow, String)) -> Result<DeviceRow, NibError> {
    if extra != "{}" {
        match json::parse(extra.as_bytes()) {
            Ok(Value::Object(m)) => row.device.extra = m,
            _ => {
                return Err(NibError::Corrupt(format!(
                    "device {}: extra fields",
                    row.device.mac
                )));
            }
        }
    }
    Ok(row)
}

fn device_by_mac(conn: &Connection, mac: &str) -> Result<Option<DeviceRow>, NibError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE mac = ?1"
    ))?;
    st.query_row(params![mac], read_device)
        .optional()?
        .map(finish_row)
        .transpose()
}

/// A device's contender and previous owner (see [`Nib::rc_ingest`]).
fn ownership(conn: &Connection, mac: &str) -> Result<(Option<String>, Option<String>), NibError> {
    Ok(conn
        .query_row(
            "SELECT claimant, previous_lc FROM devices WHERE mac = ?1",
            params![mac],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((None, None)))
}

fn next_seq(conn: &Connection) -> Result<i64, NibError> {
    Ok(conn.query_row(
        "SELECT MAX(COALESCE((SELECT MAX(changed_seq) FROM devices), 0),
                    COALESCE((SELECT last FROM id_sequences WHERE kind = ?1), 0)) + 1",
        params![CHANGE_FLOOR],
        |r| r.get(0),
    )?)
}

#[allow(clippy::too_many_arguments)]
fn write_device(
    conn: &Connection,
    d: &Device,
    status: DeviceStatus,
    lc_id: &str,
    region: &str,
    first_seen: &str,
    created_seq: Option<i64>,
    changed_seq: i64,
) -> Result<(), NibError> {
    let extra = if d.extra.is_empty() {
        "{}".to_owned()
    } else {
        json::to_canonical_string(&Value::Object(d.extra.clone()))
    };
    let uptime = d.uptime_seconds.and_then(|u| i64::try_from(u).ok());
    // One statement for both cases: a new row gets its first sighting and creation stamp;
    // an existing one keeps them and everything else is replaced.
    let mut st = conn.prepare_cached(
        "INSERT INTO devices (mac, ip, hostname, vendor, model, protocol, reachable, rtt_ms, uptime_seconds,
             discovery_method, status, lc_id, region, first_seen, last_seen, missed, created_seq, changed_seq, extra)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 0, ?16, ?17, ?18)
         ON CONFLICT(mac) DO UPDATE SET ip = excluded.ip, hostname = excluded.hostname,
             vendor = excluded.vendor, model = excluded.model, protocol = excluded.protocol,
             reachable = excluded.reachable, rtt_ms = excluded.rtt_ms,
             uptime_seconds = excluded.uptime_seconds, discovery_method = excluded.discovery_method,
             status = excluded.status, lc_id = excluded.lc_id, region = excluded.region,
             last_seen = excluded.last_seen, missed = 0, changed_seq = excluded.changed_seq,
             extra = excluded.extra, inactive_since = NULL, version = devices.version + 1",
    )?;
    st.execute(params![
        d.mac,
        d.ip,
        d.hostname,
        d.vendor,
        d.model,
        d.protocol,
        i64::from(d.reachable),
        d.rtt_ms,
        uptime,
        d.discovery_method.as_str(),
        status.as_str(),
        lc_id,
        region,
        first_seen,
        d.last_seen,
        created_seq.unwrap_or(changed_seq),
        changed_seq,
        extra
    ])?;
    Ok(())
}

/// True when what a report compares differs (not rtt or uptime, which drift every scan).
fn differs(a: &Device, b: &Device) -> bool {
    a.ip != b.ip
        || a.hostname != b.hostname
        || a.vendor != b.vendor
        || a.model != b.model
        || a.reachable != b.reachable
        || a.discovery_method != b.discovery_method
}

fn later(a: &str, b: &str) -> bool {
    match (parse_iso(a), parse_iso(b)) {
        (Ok(x), Ok(y)) => x > y,
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

fn inactive_of(d: &Device) -> InactiveDevice {
    InactiveDevice {
        mac: d.mac.clone(),
        ip: d.ip.clone(),
        hostname: d.hostname.clone(),
        extra: Map::new(),
    }
}

fn is_applied(conn: &Connection, item_id: &str) -> Result<Option<Value>, NibError> {
    let r: Option<String> = conn
        .query_row(
            "SELECT result FROM applied_messages WHERE item_id = ?1",
            params![item_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(r.and_then(|t| json::parse(t.as_bytes()).ok()))
}

fn mark_applied(
    conn: &Connection,
    item_id: &str,
    sender: &str,
    kind: &str,
    result: &Value,
    now: DateTime<Utc>,
) -> Result<(), NibError> {
    let now_s = format_iso(now);
    conn.execute(
        "INSERT INTO applied_messages (item_id, sender_id, kind, applied_at, result) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![item_id, sender, kind, now_s, json::to_canonical_string(result)],
    )?;
    // Whether (and when last) a sender reported: kept apart from the ids, which are purged.
    conn.prepare_cached(
        "INSERT INTO reporters (sender_id, kind, first_at, last_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT(sender_id, kind) DO UPDATE SET last_at = excluded.last_at",
    )?
    .execute(params![sender, kind, now_s])?;
    Ok(())
}

/// A local controller's cycle: its identity and limits.
#[derive(Clone, Debug)]
pub struct CycleParams<'a> {
    /// The local controller.
    pub lc_id: &'a str,
    /// Its region.
    pub region: &'a str,
    /// Cycles a device may be missed before it is inactive.
    pub missed_limit: u32,
    /// Most reports kept undelivered; beyond it they are replaced by one full report.
    pub outbox_cap: u64,
}

impl Nib {
    /// Runs the NIB side of one discovery cycle of a local controller: compares `seen`
    /// with the stored devices, writes the differences, advances the cycle counter and, if
    /// there is anything to report, queues the report `report` builds — all in one
    /// transaction.
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    pub fn lc_cycle(
        &self,
        p: &CycleParams<'_>,
        seen: &[Device],
        now: DateTime<Utc>,
        report: impl FnOnce(&CycleDelta) -> Option<OutboxItem>,
    ) -> Result<CycleDelta, NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cycle = get_state(&tx, StateKey::DiscoveryCycle)?
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            + 1;
        let mut delta = CycleDelta {
            cycle,
            seen: seen.len(),
            full_resync: get_state(&tx, StateKey::DiscoveryResync)?
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            ..CycleDelta::default()
        };
        // Too many reports waiting: replace them by this one, made complete.
        if outbox::count_of(&tx, REPORT_TYPE)? >= p.outbox_cap {
            delta.dropped_reports = outbox::drop_all_of(&tx, REPORT_TYPE)?;
            delta.full_resync = true;
        }
        let mut stored: HashMap<String, DeviceRow> = {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE lc_id = ?1"
            ))?;
            let rows = st.query_map(params![p.lc_id], read_device)?;
            let mut m = HashMap::new();
            for r in rows {
                let row = finish_row(r?)?;
                m.insert(row.device.mac.clone(), row);
            }
            m
        };
        let seq = next_seq(&tx)?;
        let now_s = format_iso(now);
        for d in seen {
            match stored.remove(&d.mac) {
                None => {
                    write_device(
                        &tx,
                        d,
                        DeviceStatus::Active,
                        p.lc_id,
                        p.region,
                        &now_s,
                        Some(seq),
                        seq,
                    )?;
                    delta.new.push(d.clone());
                }
                Some(row) if row.status == DeviceStatus::Inactive || differs(&row.device, d) => {
                    write_device(
                        &tx,
                        d,
                        DeviceStatus::Active,
                        p.lc_id,
                        p.region,
                        &row.first_seen,
                        None,
                        seq,
                    )?;
                    delta.updated.push(d.clone());
                }
                Some(row) => {
                    if row.missed > 0 {
                        tx.execute(
                            "UPDATE devices SET missed = 0 WHERE mac = ?1",
                            params![d.mac],
                        )?;
                    }
                    if delta.full_resync {
                        delta.updated.push(d.clone());
                    }
                }
            }
        }
        for row in stored.values() {
            match row.status {
                DeviceStatus::Active => {
                    let missed = row.missed.saturating_add(1);
                    if missed >= p.missed_limit {
                        tx.execute(
                            "UPDATE devices SET status = 'inactive', missed = ?2, changed_seq = ?3,
                                 inactive_since = ?4, version = version + 1 WHERE mac = ?1",
                            params![row.device.mac, missed, seq, now_s],
                        )?;
                        delta.inactive.push(inactive_of(&row.device));
                    } else {
                        tx.execute(
                            "UPDATE devices SET missed = ?2 WHERE mac = ?1",
                            params![row.device.mac, missed],
                        )?;
                    }
                }
                DeviceStatus::Inactive if delta.full_resync => {
                    delta.inactive.push(inactive_of(&row.device));
                }
                DeviceStatus::Inactive => {}
            }
        }
        delta.new.sort_by(|a, b| a.mac.cmp(&b.mac));
        delta.updated.sort_by(|a, b| a.mac.cmp(&b.mac));
        delta.inactive.sort_by(|a, b| a.mac.cmp(&b.mac));
        delta.active = tx.query_row(
            "SELECT COUNT(*) FROM devices WHERE lc_id = ?1 AND status = 'active'",
            params![p.lc_id],
            |r| r.get::<_, i64>(0),
        )? as u64;
        put_state(&tx, StateKey::DiscoveryCycle, &Value::from(cycle))?;
        if delta.full_resync {
            put_state(&tx, StateKey::DiscoveryResync, &Value::from(false))?;
        }
        if !delta.is_empty()
            && let Some(item) = report(&delta)
        {
            outbox::push(&tx, &item, now)?;
        }
        tx.commit()?;
        Ok(delta)
    }

    /// Marks that undelivered reports were lost (e.g. dropped by an operator): the next
    /// cycle reports everything.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn request_discovery_resync(&self) -> Result<(), NibError> {
        put_state(&self.conn(), StateKey::DiscoveryResync, &Value::from(true))
    }

    /// Applies one discovery report at a regional controller. New and updated devices are
    /// upserted, within the reporter's device cap (`limits.max_devices_per_lc` rows; more
    /// are refused, counted and audited once per report as `DEVICE_CAP_REACHED`).
    ///
    /// Ownership: a MAC stays with the local controller that reported it first until that
    /// controller itself reports it inactive (it missed it for its miss limit) or is
    /// revoked (its devices are retired). Until then another controller's sightings only
    /// mark the device contested (`DEVICE_MULTI_LC`, once per contender); after it, the
    /// next sighting moves it (`DEVICE_LC_REASSIGNED`), and the previous owner's own
    /// sighting takes it back at once (`DEVICE_LC_RESTORED`). A reporter's clock cannot
    /// win a device: times are compared only within one owner's reports (and are clamped
    /// to the receive time by the caller). Inactive devices are marked so only if this
    /// local controller owns them and has not seen them since the report was made. A
    /// report id applied before returns its first outcome, marked duplicate.
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    #[allow(clippy::too_many_arguments)]
    pub fn rc_ingest(
        &self,
        lc_id: &str,
        region: &str,
        report_id: &str,
        report_time: DateTime<Utc>,
        new: &[Device],
        updated: &[Device],
        inactive: &[InactiveDevice],
        limits: IngestLimits,
        me: &str,
        signer: &IdentityKey,
        now: DateTime<Utc>,
    ) -> Result<IngestOutcome, NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(prev) = is_applied(&tx, report_id)? {
            return Ok(IngestOutcome::from_value(&prev));
        }
        let seq = next_seq(&tx)?;
        let now_s = format_iso(now);
        let mut out = IngestOutcome {
            processed: (new.len() + updated.len()) as u64,
            ..IngestOutcome::default()
        };
        let mut owned: u64 = tx.query_row(
            "SELECT COUNT(*) FROM devices WHERE lc_id = ?1",
            params![lc_id],
            |r| r.get::<_, i64>(0),
        )? as u64;
        let audit = |ev: &str, mac: &str, action: &str, decision: &str, details: Map| {
            events::append(
                &tx,
                &Event {
                    event_type: ev.into(),
                    actor: me.into(),
                    subject: Some(mac.to_owned()),
                    action: action.into(),
                    decision: Some(decision.to_owned()),
                    details,
                },
                signer,
                now,
            )
            .map(|_| ())
        };
        for d in new.iter().chain(updated) {
            match device_by_mac(&tx, &d.mac)? {
                None => {
                    if owned >= limits.max_devices_per_lc {
                        out.over_cap += 1;
                        continue;
                    }
                    write_device(
                        &tx,
                        d,
                        DeviceStatus::Active,
                        lc_id,
                        region,
                        &now_s,
                        Some(seq),
                        seq,
                    )?;
                    owned += 1;
                    out.stored_new += 1;
                }
                Some(row) if row.lc_id != lc_id => {
                    out.collisions += 1;
                    let (claimant, previous) = ownership(&tx, &d.mac)?;
                    let mut details = Map::new();
                    details.insert("mac".into(), d.mac.clone().into());
                    details.insert("stored_lc".into(), row.lc_id.clone().into());
                    details.insert("stored_status".into(), row.status.as_str().into());
                    details.insert("reporting_lc".into(), lc_id.into());
                    let restore = previous.as_deref() == Some(lc_id);
                    let vacated = row.status == DeviceStatus::Inactive;
                    if !restore && !vacated {
                        // Contested: the owner still sees it. Recorded once per contender.
                        if claimant.as_deref() != Some(lc_id) {
                            tx.execute(
                                "UPDATE devices SET claimant = ?2 WHERE mac = ?1",
                                params![d.mac, lc_id],
                            )?;
                            audit(
                                "DEVICE_MULTI_LC",
                                &d.mac,
                                "Another local controller reports a device its owner still sees",
                                &row.lc_id,
                                details,
                            )?;
                        }
                        continue;
                    }
                    if owned >= limits.max_devices_per_lc {
                        out.over_cap += 1;
                        continue;
                    }
                    write_device(
                        &tx,
                        d,
                        DeviceStatus::Active,
                        lc_id,
                        region,
                        &row.first_seen,
                        None,
                        seq,
                    )?;
                    tx.execute(
                        "UPDATE devices SET claimant = NULL, previous_lc = ?2 WHERE mac = ?1",
                        params![
                            d.mac,
                            if restore {
                                None
                            } else {
                                Some(row.lc_id.as_str())
                            }
                        ],
                    )?;
                    owned += 1;
                    out.stored_updated += 1;
                    let (ev, action) = if restore {
                        (
                            "DEVICE_LC_RESTORED",
                            "The previous owner sees the device again and takes it back",
                        )
                    } else {
                        (
                            "DEVICE_LC_REASSIGNED",
                            "The owner reported the device inactive; another local controller sees it",
                        )
                    };
                    audit(ev, &d.mac, action, lc_id, details)?;
                }
                Some(row) => {
                    if !later(&row.device.last_seen, &d.last_seen) {
                        write_device(
                            &tx,
                            d,
                            DeviceStatus::Active,
                            lc_id,
                            region,
                            &row.first_seen,
                            None,
                            seq,
                        )?;
                        out.stored_updated += 1;
                    }
                }
            }
        }
        if out.over_cap > 0 {
            let mut details = Map::new();
            details.insert("refused".into(), out.over_cap.into());
            details.insert("cap".into(), limits.max_devices_per_lc.into());
            details.insert("report_id".into(), report_id.into());
            audit(
                "DEVICE_CAP_REACHED",
                lc_id,
                "A local controller reported more devices than its cap",
                "refused",
                details,
            )?;
        }
        for i in inactive {
            if let Some(row) = device_by_mac(&tx, &i.mac)?
                && row.lc_id == lc_id
                && row.status == DeviceStatus::Active
                && parse_iso(&row.device.last_seen).is_ok_and(|t| t <= report_time)
            {
                tx.execute(
                    "UPDATE devices SET status = 'inactive', changed_seq = ?2, inactive_since = ?3,
                         version = version + 1 WHERE mac = ?1",
                    params![i.mac, seq, now_s],
                )?;
                out.marked_inactive += 1;
            }
        }
        // An LC's first report (or a full resync) lists everything it knows: not a spike.
        let reported_before: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM reporters WHERE sender_id = ?1 AND kind = 'discovery_report')",
                params![lc_id],
                |r| r.get(0),
            )?;
        if reported_before && new.len() > limits.spike_threshold {
            out.spike = true;
            let mut details = Map::new();
            details.insert("new_devices".into(), (new.len() as u64).into());
            details.insert("threshold".into(), (limits.spike_threshold as u64).into());
            details.insert("report_id".into(), report_id.into());
            events::append(
                &tx,
                &Event {
                    event_type: "ANOMALY_DISCOVERY_SPIKE".into(),
                    actor: me.into(),
                    subject: Some(lc_id.into()),
                    action: "More new devices in one report than the threshold".into(),
                    decision: Some("flagged".into()),
                    details,
                },
                signer,
                now,
            )?;
        }
        mark_applied(
            &tx,
            report_id,
            lc_id,
            "discovery_report",
            &out.to_value(),
            now,
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// Retires what a revoked controller reported: its devices (a regional controller's
    /// rows, which the next summary carries up as inactive, and which any other local
    /// controller that sees them may then claim) and the inventory rows it stands behind
    /// (the global controller's, as local or regional controller). Returns how many rows.
    /// Retired rows are inactive from `now`: the retention rule deletes them like any other
    /// ([`Nib::expire_devices`]).
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    pub fn retire_devices_of(
        &self,
        controller_id: &str,
        now: DateTime<Utc>,
    ) -> Result<usize, NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = next_seq(&tx)?;
        let now_s = format_iso(now);
        let devices = tx.execute(
            "UPDATE devices SET status = 'inactive', claimant = NULL, changed_seq = ?2,
                 inactive_since = ?3, version = version + 1
             WHERE lc_id = ?1 AND status = 'active'",
            params![controller_id, seq, now_s],
        )?;
        tx.execute(
            "UPDATE devices SET previous_lc = NULL WHERE previous_lc = ?1",
            params![controller_id],
        )?;
        let inventory = tx.execute(
            "UPDATE inventory SET status = 'inactive', updated_at = ?2, version = version + 1
             WHERE (lc_id = ?1 OR rc_id = ?1) AND status = 'active'",
            params![controller_id, now_s],
        )?;
        tx.commit()?;
        Ok(devices + inventory)
    }

    /// The devices changed since the previous summary (whole transactions, at least one,
    /// about `limit` devices at most); `None` when nothing changed.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn rc_summary_window(&self, limit: usize) -> Result<Option<SummaryWindow>, NibError> {
        let conn = self.conn();
        let mark = get_state(&conn, StateKey::SummaryMark)?;
        let from_seq = mark
            .as_ref()
            .and_then(|m| m.get("seq"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let since = mark
            .as_ref()
            .and_then(|m| m.get("at"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        // The stamp of the limit-th change, so that a transaction is never split.
        let to_seq: Option<i64> = conn
            .query_row(
                "SELECT changed_seq FROM devices WHERE changed_seq > ?1 ORDER BY changed_seq
                 LIMIT 1 OFFSET ?2",
                params![from_seq, limit.saturating_sub(1) as i64],
                |r| r.get(0),
            )
            .optional()?;
        let to_seq = match to_seq {
            Some(s) => s,
            None => match conn.query_row(
                "SELECT MAX(changed_seq) FROM devices WHERE changed_seq > ?1",
                params![from_seq],
                |r| r.get::<_, Option<i64>>(0),
            )? {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let mut w = SummaryWindow {
            from_seq,
            to_seq,
            since: since.clone(),
            ..SummaryWindow::default()
        };
        let mut st = conn.prepare_cached(
            "SELECT mac, ip, hostname, status, last_seen, lc_id, created_seq FROM devices
             WHERE changed_seq > ?1 AND changed_seq <= ?2 ORDER BY changed_seq, mac",
        )?;
        let rows = st.query_map(params![from_seq, to_seq], |r| {
            Ok((
                SummaryDevice {
                    mac: r.get(0)?,
                    ip: r.get(1)?,
                    hostname: r.get(2)?,
                    status: r.get(3)?,
                    last_seen: r.get(4)?,
                    lc_id: r.get(5)?,
                },
                r.get::<_, i64>(6)?,
            ))
        })?;
        for row in rows {
            let (d, created) = row?;
            if d.status == "inactive" {
                w.total_inactive += 1;
            } else if created > from_seq {
                w.total_new += 1;
            } else {
                w.total_updated += 1;
            }
            w.devices.push(d);
        }
        w.total_active = conn.query_row(
            "SELECT COUNT(*) FROM devices WHERE status = 'active'",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64;
        let mut st = conn.prepare_cached(
            "SELECT sender_id FROM reporters
             WHERE kind = 'discovery_report' AND last_at > ?1 ORDER BY sender_id",
        )?;
        w.lcs_reported = st
            .query_map(params![since.unwrap_or_default()], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(Some(w))
    }

    /// Records that a summary covering changes up to `to_seq` was made and queues it, in
    /// one transaction.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn rc_commit_summary(
        &self,
        to_seq: i64,
        item: &OutboxItem,
        now: DateTime<Utc>,
    ) -> Result<(), NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut m = Map::new();
        m.insert("seq".into(), to_seq.into());
        m.insert("at".into(), format_iso(now).into());
        put_state(&tx, StateKey::SummaryMark, &Value::Object(m))?;
        outbox::push(&tx, item, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Applies a regional controller's summary to the global inventory. Returns whether it
    /// was new (not a retransmission) and the MACs now active in another region too (each
    /// logged as `ANOMALY_GLOBAL_MAC_COLLISION` when it starts).
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    #[allow(clippy::too_many_arguments)]
    pub fn gc_ingest_summary(
        &self,
        rc_id: &str,
        region: &str,
        summary_id: &str,
        devices: &[SummaryDevice],
        me: &str,
        signer: &IdentityKey,
        now: DateTime<Utc>,
    ) -> Result<(bool, Vec<(String, String)>), NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_applied(&tx, summary_id)?.is_some() {
            return Ok((false, Vec::new()));
        }
        let now_s = format_iso(now);
        let mut cross = Vec::new();
        for d in devices {
            let stored: Option<(String, String)> = tx
                .query_row(
                    "SELECT status, last_seen FROM inventory WHERE mac = ?1 AND region = ?2",
                    params![d.mac, region],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if stored
                .as_ref()
                .is_some_and(|(_, seen)| later(seen, &d.last_seen))
            {
                continue;
            }
            let was_active = stored.as_ref().is_some_and(|(s, _)| s == "active");
            tx.execute(
                "INSERT INTO inventory (mac, region, rc_id, lc_id, ip, hostname, status, last_seen, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(mac, region) DO UPDATE SET rc_id = excluded.rc_id, lc_id = excluded.lc_id,
                     ip = excluded.ip, hostname = excluded.hostname, status = excluded.status,
                     last_seen = excluded.last_seen, updated_at = excluded.updated_at,
                     version = inventory.version + 1",
                params![d.mac, region, rc_id, d.lc_id, d.ip, d.hostname, d.status, d.last_seen, now_s],
            )?;
            if d.status != "active" {
                continue;
            }
            let mut st = tx.prepare_cached(
                "SELECT region FROM inventory WHERE mac = ?1 AND region != ?2 AND status = 'active'",
            )?;
            let others = st
                .query_map(params![d.mac, region], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            for other in others {
                if !was_active {
                    let mut details = Map::new();
                    details.insert("mac".into(), d.mac.clone().into());
                    details.insert(
                        "regions".into(),
                        Value::Array(vec![other.clone().into(), region.into()]),
                    );
                    details.insert("reported_by".into(), rc_id.into());
                    events::append(
                        &tx,
                        &Event {
                            event_type: "ANOMALY_GLOBAL_MAC_COLLISION".into(),
                            actor: me.into(),
                            subject: Some(d.mac.clone()),
                            action: "One MAC active in two regions".into(),
                            decision: Some("flagged".into()),
                            details,
                        },
                        signer,
                        now,
                    )?;
                }
                cross.push((d.mac.clone(), other));
            }
        }
        let mut result = Map::new();
        result.insert("devices".into(), (devices.len() as u64).into());
        mark_applied(
            &tx,
            summary_id,
            rc_id,
            "discovery_summary",
            &Value::Object(result),
            now,
        )?;
        tx.commit()?;
        Ok((true, cross))
    }

    /// Devices stored here, optionally only those of one local controller.
    ///
    /// # Errors
    /// On an SQLite failure or a corrupt row.
    pub fn devices(&self, lc_id: Option<&str>) -> Result<Vec<DeviceRow>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE ?1 IS NULL OR lc_id = ?1 ORDER BY mac"
        ))?;
        let rows = st.query_map(params![lc_id], read_device)?;
        rows.map(|r| finish_row(r?)).collect()
    }

    /// One device by MAC.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn device(&self, mac: &str) -> Result<Option<DeviceRow>, NibError> {
        device_by_mac(&self.conn(), mac)
    }

    /// Active devices per local controller.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn active_devices_by_lc(&self) -> Result<HashMap<String, u64>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT lc_id, COUNT(*) FROM devices WHERE status = 'active' GROUP BY lc_id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut m = HashMap::new();
        for r in rows {
            let (lc, n) = r?;
            m.insert(lc, u64::try_from(n).unwrap_or(0));
        }
        Ok(m)
    }

    /// The global inventory.
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn inventory(&self) -> Result<Vec<InventoryRow>, NibError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT mac, region, rc_id, lc_id, ip, hostname, status, last_seen FROM inventory ORDER BY mac, region",
        )?;
        let rows = st.query_map([], |r| {
            Ok(InventoryRow {
                mac: r.get(0)?,
                region: r.get(1)?,
                rc_id: r.get(2)?,
                lc_id: r.get(3)?,
                ip: r.get(4)?,
                hostname: r.get(5)?,
                status: r.get(6)?,
                last_seen: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Forgets the ids of reports and summaries applied before `before`. A retransmission
    /// arriving later would be applied again, so `before` must be older than any
    /// retransmission can be: senders give up on an item after
    /// [`crate::discovery::delivery::OUTBOX_MAX_AGE`] ([`Nib::outbox_expire`]), and the
    /// housekeeping task keeps the ids for
    /// [`crate::node::housekeeping::APPLIED_RETENTION`], that age plus both clock skews.
    /// Whether a sender ever reported is kept apart (the `reporters` table).
    ///
    /// # Errors
    /// On an SQLite failure.
    pub fn purge_applied(&self, before: DateTime<Utc>) -> Result<usize, NibError> {
        Ok(self.conn().execute(
            "DELETE FROM applied_messages WHERE applied_at < ?1",
            params![format_iso(before)],
        )?)
    }

    /// Gives up on discovery reports and summaries queued before `before`: they are
    /// dropped, and what they carried is sent again in full, as when the outbox overflows
    /// (a local controller's next cycle reports every device; a regional controller's next
    /// summaries cover every device). A receiver keeps the ids it applied only so long,
    /// so an older item must never reach it (it would be applied twice). Returns the
    /// reports and summaries dropped; one transaction.
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    pub fn outbox_expire(&self, before: DateTime<Utc>) -> Result<(usize, usize), NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = format_iso(before);
        let drop_of = |kind: &str| {
            tx.execute(
                "DELETE FROM outbox WHERE message_type = ?1 AND created_at < ?2",
                params![kind, before],
            )
        };
        let reports = drop_of(REPORT_TYPE)?;
        let summaries = drop_of(SUMMARY_TYPE)?;
        if reports > 0 {
            put_state(&tx, StateKey::DiscoveryResync, &Value::from(true))?;
        }
        if summaries > 0 {
            // From stamp 0 the next windows cover every device; `at` (the previous
            // summary's time) stays for the reporters list.
            let mut mark = match get_state(&tx, StateKey::SummaryMark)? {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            mark.insert("seq".into(), 0.into());
            put_state(&tx, StateKey::SummaryMark, &Value::Object(mark))?;
        }
        tx.commit()?;
        Ok((reports, summaries))
    }

    /// The retention rule: deletes the devices inactive since before `before` (a local or
    /// regional controller's rows, retired ones included) and the global inventory rows
    /// inactive and unchanged since then, and records one `DEVICES_EXPIRED` event counting
    /// them (none when nothing was deleted), in one transaction. Nothing refers to a
    /// device's row from elsewhere (its contender and previous owner are columns of it),
    /// so a deleted device that is seen again is stored as new.
    ///
    /// # Errors
    /// On an SQLite failure (nothing is written then).
    pub fn expire_devices(
        &self,
        before: DateTime<Utc>,
        retention_secs: u64,
        me: &str,
        signer: &IdentityKey,
        now: DateTime<Utc>,
    ) -> Result<Expired, NibError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before_s = format_iso(before);
        let newest_gone: Option<i64> = tx.query_row(
            "SELECT MAX(changed_seq) FROM devices
             WHERE status = 'inactive' AND inactive_since < ?1",
            params![before_s],
            |r| r.get(0),
        )?;
        if let Some(seq) = newest_gone {
            tx.execute(
                "INSERT INTO id_sequences (kind, last) VALUES (?1, ?2)
                 ON CONFLICT(kind) DO UPDATE SET last = MAX(last, excluded.last)",
                params![CHANGE_FLOOR, seq],
            )?;
        }
        let out = Expired {
            devices: tx.execute(
                "DELETE FROM devices WHERE status = 'inactive' AND inactive_since < ?1",
                params![before_s],
            )?,
            inventory: tx.execute(
                "DELETE FROM inventory WHERE status = 'inactive' AND updated_at < ?1",
                params![before_s],
            )?,
        };
        if out.devices + out.inventory > 0 {
            let mut details = Map::new();
            details.insert("devices".into(), (out.devices as u64).into());
            details.insert("inventory".into(), (out.inventory as u64).into());
            details.insert("retention_secs".into(), retention_secs.into());
            details.insert("inactive_before".into(), before_s.into());
            events::append(
                &tx,
                &Event {
                    event_type: "DEVICES_EXPIRED".into(),
                    actor: me.into(),
                    subject: None,
                    action: "Deleted devices inactive for longer than the retention".into(),
                    decision: Some("deleted".into()),
                    details,
                },
                signer,
                now,
            )?;
        }
        tx.commit()?;
        Ok(out)
    }
}

/// What one run of the retention rule deleted ([`Nib::expire_devices`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Rows of `devices` (a local or regional controller's).
    pub devices: usize,
    /// Rows of the global inventory.
    pub inventory: usize,
}

#[cfg(test)]
mod tests;
