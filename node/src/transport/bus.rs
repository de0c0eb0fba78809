//! The in-process bus: how nodes running in one process (`pdsno edge`) reach each other
//! without a socket.
//!
//! Each node of the process registers its receive path ([`Inbound`]) under the gRPC URLs
//! its children dial. A child whose parent URL is on the bus hands its requests (admission,
//! key exchange, heartbeats, discovery reports, summaries, sync requests) straight to the
//! parent's receive path, exactly as the parent's gRPC service would: the same signature,
//! freshness, replay and recipient checks, the same handler, the same answer and the same
//! refusals (a revoked child gets its signed notice). Only the bytes and sockets are left
//! out; messages carried this way are counted under the transport `bus`. Broadcasts (the
//! policy on its MQTT topic) still go through the broker, which remote controllers share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use pdsno_shared::envelope::Envelope;

use crate::inbound::{Inbound, Reply};
use crate::transport::parent::LinkError;

/// The label of messages carried by the bus (metrics, logs, liveness).
pub const TRANSPORT: &str = "bus";

/// The receive paths of the nodes of this process, by the gRPC URL that reaches them.
#[derive(Clone, Default)]
pub struct Bus {
    peers: Arc<Mutex<HashMap<String, Weak<Inbound>>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        f.debug_struct("Bus").field("urls", &urls).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Registers `inbound` under `url` (a node stopped is forgotten: the bus holds no node
    /// alive).
    pub fn register(&self, url: &str, inbound: &Arc<Inbound>) {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(normalize(url), Arc::downgrade(inbound));
    }

    /// The receive path registered under `url`, if its node runs.
    pub fn lookup(&self, url: &str) -> Option<Weak<Inbound>> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&normalize(url))
            .cloned()
    }
}

fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_ascii_lowercase()
}

/// Hands `env` to `inbound` as its gRPC service would (on a blocking thread: handlers use
/// SQLite), and maps a refusal to the [`LinkError`] the gRPC path gives.
///
/// # Errors
/// [`LinkError::Unavailable`] when the node stopped; else what its receive path refused.
pub async fn deliver(inbound: &Weak<Inbound>, env: &Envelope) -> Result<Reply, LinkError> {
    let inbound = inbound
        .upgrade()
        .ok_or_else(|| LinkError::Unavailable("the co-located node stopped".into()))?;
    let env = env.clone();
    let r =
        tokio::task::spawn_blocking(move || inbound.handle_from(env, None, TRANSPORT, &[], None))
            .await
            .map_err(|_| LinkError::Unavailable("the co-located node's handler failed".into()))?;
    r.map_err(|e| crate::transport::parent::from_status(crate::transport::grpc::status_of(e)))
}
