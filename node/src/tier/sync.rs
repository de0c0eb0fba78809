//! SYNC_REQUEST: a child asks for the policy in force; at the global controller a regional
//! controller also asks for (or withdraws) its local controllers' broker credentials.

use pdsno_shared::envelope::MessageType;
use pdsno_shared::ids::Role;
use pdsno_shared::json::{Map, Value};

use super::Deps;
use crate::inbound::{Handler, HandlerReply, InboundError};

/// The SYNC_REQUEST handler of a parent (none for a local controller).
pub fn handler(d: &Deps) -> Option<Handler> {
    let children = d.children.clone()?;
    let policy = d.policy.clone();
    let trust = d.trust.clone();
    let global = d.role == Role::Global;
    Some(Box::new(move |m| {
        let e = m.env;
        if e.payload.get("kind").and_then(Value::as_str) == Some("policy") {
            if !trust.is_child(&e.sender_id) {
                return Err(InboundError::Forbidden(format!(
                    "{} is not an active child of this controller",
                    e.sender_id
                )));
            }
            let current = policy
                .for_children()
                .map_err(|e| InboundError::Unavailable(e.to_string()))?;
            let mut m = Map::new();
            m.insert("kind".into(), "policy".into());
            m.insert(
                "policy".into(),
                current.map_or(Value::Null, |env| env.to_value()),
            );
            return Ok(HandlerReply::Reply(MessageType::SyncResponse, m));
        }
        if global {
            children.sync(e)
        } else {
            Err(InboundError::BadRequest("unknown sync kind".into()))
        }
    }))
}
