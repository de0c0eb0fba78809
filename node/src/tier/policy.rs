//! POLICY_UPDATE pushed over gRPC or REST by the parent (its fallback when the broker is
//! away; over MQTT the same envelope arrives on the policy topic): checked and applied by
//! [`crate::policy::Policy::receive`], then handed on to a regional controller's children.

use crate::inbound::{Handler, HandlerReply, InboundError};
use crate::policy::PolicyOutcome;

use super::Deps;

/// The POLICY_UPDATE handler of a child (none for the global controller, which makes
/// policies).
pub fn handler(d: &Deps) -> Option<Handler> {
    if d.role == pdsno_shared::ids::Role::Global {
        return None;
    }
    let (pol, t, ob) = (d.policy.clone(), d.trust.clone(), d.outbound.clone());
    let rt = tokio::runtime::Handle::try_current().ok()?;
    Some(Box::new(move |m| match pol.receive(m.env) {
        Ok(PolicyOutcome::Applied { version, republish }) => {
            let (t, ob, pol) = (t.clone(), ob.clone(), pol.clone());
            rt.spawn(async move {
                crate::policy::after_applied(&t, &ob, &pol, version, republish).await;
            });
            Ok(HandlerReply::Accepted)
        }
        Ok(PolicyOutcome::Stale { .. }) => Ok(HandlerReply::Accepted),
        Err(err) => Err(InboundError::Forbidden(err.to_string())),
    }))
}
