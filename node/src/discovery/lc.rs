//! A local controller's discovery cycle: scan, merge per MAC, compare with the NIB, write
//! only the differences and queue the report for the regional controller (one NIB
//! transaction), then let the delivery side send it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::envelope::MessageType;
use pdsno_shared::json::{Map, Value};
use pdsno_shared::payload::discovery::{Device, DiscoveryReport};
use pdsno_shared::time::format_iso;
use pdsno_shared::topics::Topic;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::delivery::Delivery;
use super::scanner::{FileScanner, Observation, ProbeScanner, Scanner, SimulatedScanner, Subnet};
use crate::config::{NodeConfig, ScannerKind};
use crate::nib::{CycleDelta, CycleParams, OutboxItem, StateKey};
use crate::trust::Trust;

/// Most reports kept undelivered before they are replaced by one full report.
pub const REPORT_OUTBOX_CAP: u64 = 1000;

/// A stable number from a controller id (default seed and subnet of the simulator).
fn digest_of(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The subnet a local controller scans: configured, or for the simulator a /24 in
/// 10.0.0.0/8 derived from its id (so every LC of a lab has its own).
///
/// # Errors
/// An invalid configured subnet, or none where the scanner needs one.
pub fn subnet_for(cfg: &NodeConfig, me: &str) -> Result<Subnet, String> {
    if let Some(s) = &cfg.subnet {
        return Subnet::parse(s).map_err(|e| format!("subnet: {e}"));
    }
    match cfg.scanner {
        ScannerKind::Probe => Err("subnet: the probe scanner needs --subnet".into()),
        _ => {
            let d = digest_of(me);
            Subnet::parse(&format!("10.{}.{}.0/24", d[0], d[1])).map_err(|e| e.to_string())
        }
    }
}

/// The configured scanner.
///
/// # Errors
/// A configuration problem, named.
pub fn scanner_for(cfg: &NodeConfig, me: &str) -> Result<(Box<dyn Scanner>, Subnet), String> {
    let subnet = subnet_for(cfg, me)?;
    let s: Box<dyn Scanner> = match cfg.scanner {
        ScannerKind::Simulated => {
            let seed = cfg.scan_seed.unwrap_or_else(|| {
                let d = digest_of(me);
                u64::from_be_bytes([d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9]])
            });
            Box::new(SimulatedScanner::new(subnet, seed))
        }
        ScannerKind::Probe => Box::new(
            ProbeScanner::new(subnet)
                .with_ports(cfg.probe_ports.clone())
                .with_timeout(cfg.probe_timeout),
        ),
        ScannerKind::File => {
            let path = cfg
                .scan_file
                .clone()
                .ok_or("scan_file: the file scanner needs --scan-file")?;
            Box::new(FileScanner::new(path))
        }
    };
    Ok((s, subnet))
}

fn device_of(o: Observation, seen: &str) -> Device {
    Device {
        ip: o.ip.to_string(),
        mac: o.mac,
        last_seen: seen.to_owned(),
        protocol: o.protocol,
        reachable: o.reachable,
        rtt_ms: o.rtt_ms,
        hostname: o.hostname,
        vendor: o.vendor,
        model: o.model,
        uptime_seconds: o.uptime_seconds,
        discovery_method: o.method,
        extra: Map::new(),
    }
}

/// Merges observations per MAC: a reachable sighting beats an unreachable one, then the
/// richer method (SNMP over ICMP over ARP).
pub fn merge(observations: Vec<Observation>, seen: &str) -> Vec<Device> {
    use pdsno_shared::payload::discovery::DiscoveryMethod as M;
    let rank = |o: &Observation| {
        (
            o.reachable,
            match o.method {
                M::Snmp => 2,
                M::Icmp => 1,
                M::Arp => 0,
            },
        )
    };
    let mut best: BTreeMap<String, Observation> = BTreeMap::new();
    for o in observations {
        match best.get(&o.mac) {
            Some(b) if rank(b) >= rank(&o) => {}
            _ => {
                best.insert(o.mac.clone(), o);
            }
        }
    }
    best.into_values().map(|o| device_of(o, seen)).collect()
}

/// A local controller's discovery.
pub struct LocalDiscovery {
    trust: Arc<Trust>,
    scanner: Box<dyn Scanner>,
    subnet: Subnet,
    rc_id: String,
    region: String,
    missed_limit: u32,
    delivery: Arc<Delivery>,
    policy_version: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for LocalDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDiscovery")
            .field("scanner", &self.scanner.name())
            .field("subnet", &self.subnet.to_string())
            .finish_non_exhaustive()
    }
}

impl LocalDiscovery {
    /// Discovery for `trust`'s local controller, reporting to `rc_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust: Arc<Trust>,
        scanner: Box<dyn Scanner>,
        subnet: Subnet,
        rc_id: String,
        region: String,
        missed_limit: u32,
        delivery: Arc<Delivery>,
        policy_version: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        LocalDiscovery {
            trust,
            scanner,
            subnet,
            rc_id,
            region,
            missed_limit,
            delivery,
            policy_version,
        }
    }

    /// The scanned subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Runs one cycle; prints
    /// `discovery cycle=N seen=N new=N updated=N inactive=N active=N report=ID|-`.
    ///
    /// # Errors
    /// A scan or NIB failure (no device changes status then).
    pub async fn cycle(&self) -> Result<CycleDelta, String> {
        let nib = self.trust.nib.clone();
        let next = tokio::task::spawn_blocking(move || nib.state(StateKey::DiscoveryCycle))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            + 1;
        let started = std::time::Instant::now();
        let observations = self
            .scanner
            .scan(next)
            .await
            .map_err(|e| format!("{} scan failed: {e}", self.scanner.name()))?;
        let now = self.trust.clock.now();
        let seen = format_iso(now);
        let devices = merge(observations, &seen);
        let me = self.trust.me.clone();
        let region = self.region.clone();
        let rc_id = self.rc_id.clone();
        let subnet = self.subnet.to_string();
        let missed_limit = self.missed_limit;
        let policy_version = self.policy_version.as_ref()();
        let nib = self.trust.nib.clone();
        let mut report_id = None;
        let (delta, rid) = tokio::task::spawn_blocking(move || {
            let params = CycleParams {
                lc_id: &me,
                region: &region,
                missed_limit,
                outbox_cap: REPORT_OUTBOX_CAP,
            };
            let mut rid = None;
            let delta = nib.lc_cycle(&params, &devices, now, |d| {
                let id = format!("rpt-{}-{}", d.cycle, &pdsno_shared::ids::message_id()[4..]);
                let mut extra = Map::new();
                extra.insert("report_id".into(), id.clone().into());
                extra.insert("cycle".into(), d.cycle.into());
                extra.insert("full".into(), d.full_resync.into());
                extra.insert("policy_version".into(), policy_version.into());
                let report = DiscoveryReport {
                    lc_id: me.clone(),
                    subnet: subnet.clone(),
                    region: region.clone(),
                    timestamp: seen.clone(),
                    new_devices: d.new.clone(),
                    updated_devices: d.updated.clone(),
                    inactive_devices: d.inactive.clone(),
                    extra,
                };
                let payload = match pdsno_shared::envelope::typed_to_map(&report) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a discovery report");
                        return None;
                    }
                };
                rid = Some(id.clone());
                Some(OutboxItem {
                    item_id: id,
                    recipient: rc_id.clone(),
                    message_type: MessageType::DiscoveryReport.as_str().into(),
                    topic: Some(
                        Topic::Discovery {
                            region: region.clone(),
                            lc_id: me.clone(),
                        }
                        .to_string(),
                    ),
                    payload,
                })
            });
            delta.map(|d| (d, rid))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if rid.is_some() {
            report_id = rid;
            self.delivery.wake();
        }
        if delta.dropped_reports > 0 {
            tracing::warn!(
                dropped = delta.dropped_reports,
                "undelivered reports replaced by a full report"
            );
        }
        crate::report::emit(&crate::report::Report::DiscoveryCycle {
            cycle: delta.cycle,
            seen: delta.seen as u64,
            new: delta.new.len() as u64,
            updated: delta.updated.len() as u64,
            inactive: delta.inactive.len() as u64,
            active: delta.active,
            report: report_id.clone().unwrap_or_else(|| "-".into()),
        });
        tracing::info!(
            cycle = delta.cycle,
            scanner = self.scanner.name(),
            seen = delta.seen,
            new = delta.new.len(),
            updated = delta.updated.len(),
            inactive = delta.inactive.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "discovery cycle"
        );
        Ok(delta)
    }

    /// Cycles every `interval` until cancelled (the first at once).
    pub async fn run(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.cycle().await {
                tracing::warn!(error = %e, "discovery cycle failed; no device changed status");
            }
        }
    }
}

/// The active devices a local controller knows (for its heartbeat).
pub fn active_count(trust: &Trust) -> u64 {
    trust
        .nib
        .active_devices_by_lc()
        .map(|m| m.values().sum())
        .unwrap_or(0)
}

/// A JSON summary of a cycle (for `--scan-once`).
pub fn delta_value(d: &CycleDelta) -> Value {
    let mut m = Map::new();
    m.insert("cycle".into(), d.cycle.into());
    m.insert("seen".into(), (d.seen as u64).into());
    m.insert("new".into(), (d.new.len() as u64).into());
    m.insert("updated".into(), (d.updated.len() as u64).into());
    m.insert("inactive".into(), (d.inactive.len() as u64).into());
    m.insert("active".into(), d.active.into());
    Value::Object(m)
}
