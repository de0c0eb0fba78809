//! HEARTBEAT: from a child, its liveness (see [`crate::node::children::Children::heartbeat`]);
//! from the parent, the confirmation that comes with each key it agrees.

use crate::inbound::{Handler, HandlerReply, InboundError};

use super::Deps;

/// The HEARTBEAT handler.
pub fn heartbeat(d: &Deps) -> Handler {
    let children = d.children.clone();
    let stats = d.heartbeats.clone();
    let parent_id = d.parent_id.clone();
    let clock = d.trust.clock.clone();
    Box::new(move |m| {
        let e = m.env;
        if parent_id.as_deref() == Some(e.sender_id.as_str()) {
            stats.parent_heard(clock.now());
            return Ok(HandlerReply::Accepted);
        }
        match &children {
            Some(c) => c.heartbeat(e, m.transport),
            None => Err(InboundError::Forbidden(format!(
                "{} is not the parent of this controller",
                e.sender_id
            ))),
        }
    })
}
