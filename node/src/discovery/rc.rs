//! A regional controller's side of discovery: it checks and applies its local
//! controllers' reports, acknowledges them, and sends the global controller a summary of
//! each window of changes.

use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::payload::discovery::{
    DiscoveryReport, DiscoveryReportAck, DiscoverySummary, normalize_mac,
};
use pdsno_shared::time::{format_iso, parse_iso};
use tokio_util::sync::CancellationToken;

use super::delivery::Delivery;
use crate::inbound::{HandlerReply, InboundError};
use crate::nib::{IngestLimits, OutboxItem};
use crate::trust::Trust;

/// How far ahead of our clock a reporter's times may be (the signature freshness window);
/// later ones are clamped to it.
const MAX_AHEAD_SECS: i64 = pdsno_shared::signing::MAX_AGE_SECS;

/// Most devices in one summary (a bigger window is split).
const SUMMARY_DEVICES: usize = 5000;

/// The regional side of discovery.
pub struct RegionalDiscovery {
    trust: Arc<Trust>,
    region: String,
    limits: IngestLimits,
}

impl std::fmt::Debug for RegionalDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionalDiscovery")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Checks that `sender` is an active local controller this node admitted for `region`.
fn check_lc(trust: &Trust, sender: &str, region: &str) -> Result<(), InboundError> {
    let row = trust
        .nib
        .controller(sender)
        .map_err(|e| InboundError::Unavailable(e.to_string()))?
        .ok_or_else(|| InboundError::Forbidden(format!("{sender} is not a known controller")))?;
    if row.status != "active" {
        return Err(InboundError::Forbidden(format!(
            "{sender} is {}",
            row.status
        )));
    }
    if row.role != "local" || row.region.as_deref() != Some(region) {
        return Err(InboundError::Forbidden(format!(
            "{sender} is not a local controller of {region}"
        )));
    }
    if row.validated_by.as_deref() != Some(trust.me.as_str()) {
        return Err(InboundError::Forbidden(format!(
            "{sender} was not admitted by this controller"
        )));
    }
    Ok(())
}

impl RegionalDiscovery {
    /// The regional side for `trust`'s node.
    pub fn new(trust: Arc<Trust>, region: String, limits: IngestLimits) -> Self {
        RegionalDiscovery {
            trust,
            region,
            limits,
        }
    }

    /// DISCOVERY_REPORT (already verified: signature, freshness, replay, recipient; over
    /// MQTT also topic ownership). Blocking (SQLite).
    ///
    /// # Errors
    /// [`InboundError::Forbidden`] for a sender that is not an active local controller of
    /// ours, [`InboundError::BadRequest`] for a malformed report.
    pub fn on_report(&self, env: &Envelope) -> Result<HandlerReply, InboundError> {
        let sender = env.sender_id.as_str();
        check_lc(&self.trust, sender, &self.region)?;
        let mut report: DiscoveryReport = env
            .payload_as()
            .map_err(|e| InboundError::BadRequest(format!("invalid discovery report: {e}")))?;
        if report.lc_id != sender {
            return Err(InboundError::Forbidden(format!(
                "a report about {} from {sender}",
                report.lc_id
            )));
        }
        if report.region != self.region {
            return Err(InboundError::Forbidden(format!(
                "a report for region {} sent to {}",
                report.region, self.region
            )));
        }
        // A reporter's clock is not trusted beyond the freshness skew: no time from it is
        // later than when we received it, plus that skew.
        let now = self.trust.clock.now();
        let latest = now + chrono::Duration::seconds(MAX_AHEAD_SECS);
        let report_time = parse_iso(&report.timestamp)
            .map_err(|e| InboundError::BadRequest(format!("timestamp: {e}")))?
            .min(latest);
        let mut clamped = 0usize;
        for d in report
            .new_devices
            .iter_mut()
            .chain(report.updated_devices.iter_mut())
        {
            d.mac = normalize_mac(&d.mac)
                .ok_or_else(|| InboundError::BadRequest(format!("invalid MAC {:?}", d.mac)))?;
            let seen = parse_iso(&d.last_seen).map_err(|e| {
                InboundError::BadRequest(format!("device {}: last_seen: {e}", d.mac))
            })?;
            if seen > latest {
                d.last_seen = format_iso(latest);
                clamped += 1;
            }
        }
        if clamped > 0 {
            tracing::warn!(lc = %sender, devices = clamped, "discovery report from the future: last_seen clamped to the receive time");
        }
        for d in &mut report.inactive_devices {
            d.mac = normalize_mac(&d.mac)
                .ok_or_else(|| InboundError::BadRequest(format!("invalid MAC {:?}", d.mac)))?;
        }
        // Compat senders have no report id: the message id is unique per message.
        let report_id = report
            .extra
            .get("report_id")
            .and_then(Value::as_str)
            .unwrap_or(env.message_id.as_str())
            .to_owned();
        if report_id.is_empty() || report_id.len() > 128 {
            return Err(InboundError::BadRequest("invalid report_id".into()));
        }
        let out = self
            .trust
            .nib
            .rc_ingest(
                sender,
                &self.region,
                &report_id,
                report_time,
                &report.new_devices,
                &report.updated_devices,
                &report.inactive_devices,
                // `full` (a resync) never switches the spike detector off: an LC's first
                // report is exempt on its own, later resyncs are flagged like any jump.
                self.limits,
                &self.trust.me,
                &self.trust.identity,
                self.trust.clock.now(),
            )
            .map_err(|e| InboundError::Unavailable(e.to_string()))?;
        if !out.duplicate {
            crate::report::emit(&crate::report::Report::ReportIngested {
                from: sender.to_string(),
                new: report.new_devices.len() as u64,
                updated: report.updated_devices.len() as u64,
                inactive: out.marked_inactive as u64,
                collisions: out.collisions as u64,
                id: report_id.to_string(),
            });
            tracing::info!(lc = %sender, new = report.new_devices.len(), updated = report.updated_devices.len(), inactive = out.marked_inactive, collisions = out.collisions, report = %report_id, "discovery report ingested");
            if out.spike {
                tracing::warn!(lc = %sender, new = report.new_devices.len(), "discovery spike");
            }
        }
        let mut extra = Map::new();
        extra.insert("report_id".into(), report_id.into());
        extra.insert("duplicate".into(), out.duplicate.into());
        let ack = DiscoveryReportAck {
            status: "received".into(),
            devices_processed: out.processed,
            collisions_detected: out.collisions,
            extra,
        };
        Ok(HandlerReply::Reply(
            MessageType::DiscoveryReportAck,
            typed_to_map(&ack).map_err(|e| InboundError::BadRequest(e.to_string()))?,
        ))
    }

    /// Queues summaries of what changed since the previous one (whole NIB transactions,
    /// split above [`SUMMARY_DEVICES`]); returns how many. Blocking (SQLite).
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn queue_summaries(&self, gc_id: &str, admitted_lcs: &[String]) -> Result<usize, String> {
        let mut n = 0;
        while let Some(w) = self
            .trust
            .nib
            .rc_summary_window(SUMMARY_DEVICES)
            .map_err(|e| e.to_string())?
        {
            let now = self.trust.clock.now();
            let id = format!("sum-{}", &pdsno_shared::ids::message_id()[4..]);
            let mut extra = Map::new();
            extra.insert(
                "devices".into(),
                Value::Array(w.devices.iter().map(|d| d.to_value()).collect()),
            );
            let summary = DiscoverySummary {
                summary_id: id.clone(),
                rc_id: self.trust.me.clone(),
                region: self.region.clone(),
                cycle_start: w.since.clone().unwrap_or_else(|| format_iso(now)),
                cycle_end: format_iso(now),
                total_new: w.total_new,
                total_updated: w.total_updated,
                total_inactive: w.total_inactive,
                total_devices_in_region: w.total_active,
                anomalies_flagged: Vec::new(),
                lcs_reported: w.lcs_reported.clone(),
                lcs_missing: admitted_lcs
                    .iter()
                    .filter(|l| !w.lcs_reported.contains(l))
                    .cloned()
                    .collect(),
                extra,
            };
            let item = OutboxItem {
                item_id: id,
                recipient: gc_id.to_owned(),
                message_type: MessageType::DiscoverySummary.as_str().into(),
                topic: None,
                payload: typed_to_map(&summary).map_err(|e| e.to_string())?,
            };
            self.trust
                .nib
                .rc_commit_summary(w.to_seq, &item, now)
                .map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(n)
    }

    /// Sends a summary every `interval` when something changed.
    pub async fn summaries(
        self: Arc<Self>,
        gc_id: String,
        delivery: Arc<Delivery>,
        interval: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let gc = gc_id.clone();
            let r = tokio::task::spawn_blocking(move || {
                let lcs: Vec<String> = me
                    .trust
                    .nib
                    .controllers()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| {
                        c.status == "active"
                            && c.role == "local"
                            && c.validated_by.as_deref() == Some(me.trust.me.as_str())
                    })
                    .map(|c| c.controller_id)
                    .collect();
                me.queue_summaries(&gc, &lcs)
            })
            .await;
            match r {
                Ok(Ok(n)) if n > 0 => delivery.wake(),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot build a discovery summary"),
                Err(e) => tracing::warn!(error = %e, "summary task failed"),
            }
        }
    }
}
