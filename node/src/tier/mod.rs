//! The tier layer: what a controller does with each message it receives.
//!
//! One module per message family, each message type with exactly one handler, and one table
//! ([`table`]) saying which handlers a tier registers. The receive path ([`crate::inbound`])
//! verifies an envelope, checks its recipient and calls the handler of its type, whatever
//! transport carried it (gRPC, REST or MQTT). Admission (VALIDATION_REQUEST,
//! CHALLENGE_RESPONSE) is the parent's [`crate::admission::Authority`], called by the
//! receive path itself because its replies are signed with the child's admission key.
//!
//! | family | message types | tiers |
//! |---|---|---|
//! | [`keys`] | KEY_EXCHANGE_INIT, KEY_ROTATION_REQUEST | all |
//! | [`liveness`] | HEARTBEAT | all |
//! | [`sync`] | SYNC_REQUEST | global, regional |
//! | [`policy`] | POLICY_UPDATE | regional, local |
//! | [`discovery`] | DISCOVERY_REPORT (regional), DISCOVERY_SUMMARY (global), DISCOVERY_REPORT_ACK (local) | per tier |

pub mod discovery;
pub mod keys;
pub mod liveness;
pub mod policy;
pub mod sync;

use std::sync::Arc;

use pdsno_shared::envelope::MessageType;
use pdsno_shared::ids::Role;

use crate::discovery::delivery::Delivery;
use crate::discovery::rc::RegionalDiscovery;
use crate::inbound::Handler;
use crate::node::children::Children;
use crate::node::workers::HeartbeatStats;
use crate::outbound::Outbound;
use crate::trust::Trust;

/// What the handlers of a tier work with.
pub struct Deps {
    /// This node's tier.
    pub role: Role,
    /// Keys and the NIB.
    pub trust: Arc<Trust>,
    /// The parent's id (regional and local controllers).
    pub parent_id: Option<String>,
    /// The controllers this node admitted (global and regional controllers).
    pub children: Option<Arc<Children>>,
    /// Heartbeat counters (the parent's heartbeats are counted here).
    pub heartbeats: Arc<HeartbeatStats>,
    /// The policy in force.
    pub policy: Arc<crate::policy::Policy>,
    /// Sending.
    pub outbound: Arc<Outbound>,
    /// A regional controller's discovery (ingests its local controllers' reports).
    pub regional: Option<Arc<RegionalDiscovery>>,
    /// A local controller's report delivery (acknowledged by its regional controller).
    pub local_delivery: Option<Arc<Delivery>>,
}

/// The handlers `d.role` registers, one per message type.
pub fn table(d: &Deps) -> Vec<(MessageType, Handler)> {
    let mut t = keys::handlers(d);
    t.push((MessageType::Heartbeat, liveness::heartbeat(d)));
    t.extend(sync::handler(d).map(|h| (MessageType::SyncRequest, h)));
    t.extend(policy::handler(d).map(|h| (MessageType::PolicyUpdate, h)));
    t.extend(discovery::handlers(d));
    t
}

#[cfg(test)]
mod bus_tests;
#[cfg(test)]
mod tests;
