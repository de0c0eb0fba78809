//! The global controller's side of discovery: regional summaries feed the global
//! inventory, and a MAC active in two regions is flagged.

use std::sync::Arc;

use pdsno_shared::envelope::Envelope;
use pdsno_shared::json::Value;
use pdsno_shared::payload::discovery::DiscoverySummary;

use crate::inbound::{HandlerReply, InboundError};
use crate::nib::SummaryDevice;
use crate::trust::Trust;

/// DISCOVERY_SUMMARY from a regional controller (already verified). Blocking (SQLite).
///
/// # Errors
/// [`InboundError::Forbidden`] for a sender that is not an active regional controller of
/// the summary's region, [`InboundError::BadRequest`] for a malformed summary.
pub fn on_summary(trust: &Arc<Trust>, env: &Envelope) -> Result<HandlerReply, InboundError> {
    let sender = env.sender_id.as_str();
    let row = trust
        .nib
        .controller(sender)
        .map_err(|e| InboundError::Unavailable(e.to_string()))?
        .ok_or_else(|| InboundError::Forbidden(format!("{sender} is not a known controller")))?;
    if row.status != "active" || row.role != "regional" {
        return Err(InboundError::Forbidden(format!(
            "{sender} is not an active regional controller"
        )));
    }
    let s: DiscoverySummary = env
        .payload_as()
        .map_err(|e| InboundError::BadRequest(format!("invalid discovery summary: {e}")))?;
    if s.rc_id != sender || row.region.as_deref() != Some(s.region.as_str()) {
        return Err(InboundError::Forbidden(format!(
            "{sender} may not summarise region {}",
            s.region
        )));
    }
    if s.summary_id.is_empty() || s.summary_id.len() > 128 {
        return Err(InboundError::BadRequest("invalid summary_id".into()));
    }
    let devices = match s.extra.get("devices") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, d)| {
                SummaryDevice::from_value(d)
                    .ok_or_else(|| InboundError::BadRequest(format!("devices[{i}] is invalid")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(InboundError::BadRequest("devices must be a list".into())),
    };
    let (fresh, cross) = trust
        .nib
        .gc_ingest_summary(
            sender,
            &s.region,
            &s.summary_id,
            &devices,
            &trust.me,
            &trust.identity,
            trust.clock.now(),
        )
        .map_err(|e| InboundError::Unavailable(e.to_string()))?;
    if fresh {
        crate::report::emit(&crate::report::Report::Summary {
            from: sender.to_string(),
            region: s.region.clone(),
            new: s.total_new,
            updated: s.total_updated,
            inactive: s.total_inactive,
            region_total: s.total_devices_in_region,
        });
        tracing::info!(rc = %sender, region = %s.region, new = s.total_new, updated = s.total_updated, inactive = s.total_inactive, region_total = s.total_devices_in_region, "regional summary");
        for (mac, other) in &cross {
            crate::report::emit(&crate::report::Report::CrossRegion {
                mac: mac.to_string(),
                regions: format!("{other},{}", s.region),
            });
            tracing::warn!(%mac, regions = %format!("{other},{}", s.region), "a device is reported in two regions");
        }
    }
    Ok(HandlerReply::Accepted)
}
