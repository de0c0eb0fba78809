//! The node's sockets, bound before anything else: a busy port fails the start at once, and
//! children learn the address really bound.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use super::{NodeError, startup};
use crate::config::NodeConfig;
use crate::transport::grpc;

/// The bound listeners of a node and their addresses.
pub(super) struct Listeners {
    pub(super) grpc: TcpListener,
    pub(super) rest: TcpListener,
    pub(super) admin: Option<TcpListener>,
    pub(super) metrics: Option<TcpListener>,
    pub(super) addrs: Addrs,
}

/// Where the node listens.
#[derive(Clone, Copy, Debug)]
pub(super) struct Addrs {
    pub(super) grpc: SocketAddr,
    pub(super) rest: SocketAddr,
    pub(super) admin: Option<SocketAddr>,
    pub(super) metrics: Option<SocketAddr>,
}

impl Listeners {
    /// Binds every listener `cfg` names.
    pub(super) async fn bind(cfg: &NodeConfig) -> Result<Listeners, NodeError> {
        let grpc = grpc::bind(cfg.listen_grpc).await.map_err(startup)?;
        let rest = TcpListener::bind(cfg.listen_rest).await.map_err(|e| {
            startup(format!(
                "cannot listen for REST on {}: {e}",
                cfg.listen_rest
            ))
        })?;
        let admin = match cfg.listen_admin {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
                startup(format!("cannot listen for the admin service on {a}: {e}"))
            })?),
            None => None,
        };
        let metrics = match cfg.listen_metrics {
            Some(a) => Some(
                crate::transport::metrics_http::bind(a)
                    .await
                    .map_err(startup)?,
            ),
            None => None,
        };
        let local = |l: &TcpListener| l.local_addr().map_err(startup);
        let addrs = Addrs {
            grpc: local(&grpc)?,
            rest: local(&rest)?,
            admin: admin.as_ref().map(local).transpose()?,
            metrics: metrics.as_ref().map(local).transpose()?,
        };
        Ok(Listeners {
            grpc,
            rest,
            admin,
            metrics,
            addrs,
        })
    }
}

/// A one-shot run (`--scan-once`) serves nobody: it takes none of the configured addresses
/// (a daemon or another run may hold them), only ephemeral loopback ports for its own
/// services.
pub(super) fn one_shot(cfg: &mut NodeConfig) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.listen_grpc = loopback;
    cfg.listen_rest = loopback;
    cfg.listen_admin = None;
    cfg.listen_metrics = None;
    tracing::info!("scan-once: no listener on the configured addresses");
}
