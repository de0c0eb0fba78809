//! Discovery: DISCOVERY_REPORT from a local controller to its regional controller (ingested
//! by [`crate::discovery::rc`]), DISCOVERY_SUMMARY from a regional controller to the global
//! one ([`crate::discovery::gc`]), DISCOVERY_REPORT_ACK back to the local controller (its
//! report leaves the outbox).

use pdsno_shared::envelope::MessageType;
use pdsno_shared::ids::Role;
use pdsno_shared::json::Value;

use super::Deps;
use crate::inbound::{Handler, HandlerReply, InboundError};

/// The discovery handlers of `d.role`.
pub fn handlers(d: &Deps) -> Vec<(MessageType, Handler)> {
    let mut out: Vec<(MessageType, Handler)> = Vec::new();
    if let Some(rd) = d.regional.clone() {
        out.push((
            MessageType::DiscoveryReport,
            Box::new(move |m| rd.on_report(m.env)),
        ));
    }
    if d.role == Role::Global {
        let t = d.trust.clone();
        out.push((
            MessageType::DiscoverySummary,
            Box::new(move |m| crate::discovery::gc::on_summary(&t, m.env)),
        ));
    }
    if let (Some(delivery), Some(parent_id)) = (d.local_delivery.clone(), d.parent_id.clone()) {
        out.push((
            MessageType::DiscoveryReportAck,
            Box::new(move |m| {
                let e = m.env;
                if e.sender_id != parent_id {
                    return Err(InboundError::Forbidden(format!(
                        "{} is not our regional controller",
                        e.sender_id
                    )));
                }
                let id = e
                    .payload
                    .get("report_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| InboundError::BadRequest("no report_id".into()))?;
                delivery.acked(id);
                Ok(HandlerReply::Accepted)
            }),
        ));
    }
    out
}
