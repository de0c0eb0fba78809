//! Running a controller of any tier: open the NIB and identity, get admitted (children),
//! start the servers, report readiness, and stop cleanly on cancellation.
//!
//! A node prints a few machine-readable lines on stdout for operators, the demo and tests:
//! - `admitted id=ID parent=PARENT temp_id=TEMP elapsed_ms=N` (first start of a child) or
//!   `restored id=ID parent=PARENT` (a restarted child keeps its identity);
//! - `mqtt v4|v5 ADDR` for each embedded broker listener;
//! - `ready id=ID role=ROLE grpc=ADDR rest=ADDR [admin=ADDR] [metrics=ADDR]
//!   public_key=BASE64` (the identity key a child pins with `--parent-public-key`;
//!   `admin` and `metrics` with `--listen-admin` and `--listen-metrics`). Readers take
//!   the `key=value` fields they know and ignore the others.
//!
//! Logs go to stderr.

pub mod children;
pub mod housekeeping;
mod listeners;
pub mod mqtt_link;
mod parts;
mod startup;
mod tasks;
pub mod workers;

use startup::{Identity, admit, adopt_admission_state, advertised, global_identity, restore};

use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::ids::Role;
use pdsno_shared::json::Value;
use pdsno_shared::time::SystemClock;
use tokio_util::sync::CancellationToken;

use crate::admission::child::ChildError;
use crate::config::NodeConfig;
use crate::nib::StateKey;
use crate::report::Report;

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Startup failed (data directory, NIB, identity, sockets).
    #[error("{0}")]
    Startup(String),
    /// The parent refused us or gave us something we cannot trust.
    #[error(transparent)]
    Admission(ChildError),
    /// `--scan-once`: the report could not be delivered (it stays queued).
    #[error("the discovery report was not acknowledged; it stays queued for the next run")]
    Undelivered,
    /// The parent proved it revoked this controller.
    #[error("{0}")]
    Revoked(String),
}

impl NodeError {
    /// The process exit code for this error: 3 for a refused admission, 4 for an
    /// undelivered `--scan-once` report, 5 for a revoked controller, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            NodeError::Admission(_) => 3,
            NodeError::Undelivered => 4,
            NodeError::Revoked(_) => 5,
            NodeError::Startup(_) => 1,
        }
    }
}

fn startup(e: impl std::fmt::Display) -> NodeError {
    NodeError::Startup(e.to_string())
}

/// Writes a report line on stdout (see [`crate::report`]).
fn say(r: &Report) {
    crate::report::emit(r);
}

/// Where a started node serves, told to whoever runs it in process ([`run_with`]).
#[derive(Clone, Debug)]
pub struct Started {
    /// The controller id.
    pub id: String,
    /// The gRPC listener.
    pub grpc: std::net::SocketAddr,
    /// The REST listener.
    pub rest: std::net::SocketAddr,
    /// The embedded broker's MQTT 3.1.1/5 listener (a GC with its broker).
    pub mqtt: Option<std::net::SocketAddr>,
}

/// Runs the node until `cancel` fires.
///
/// # Errors
/// [`NodeError`] when startup or admission fails.
pub async fn run(cfg: NodeConfig, cancel: CancellationToken) -> Result<(), NodeError> {
    run_with(cfg, cancel, None).await
}

/// As [`run`], telling `started` where the node serves once it is ready (several nodes can
/// run in one process this way: `pdsno edge`).
///
/// # Errors
/// [`NodeError`] when startup or admission fails.
pub async fn run_with(
    mut cfg: NodeConfig,
    cancel: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<Started>>,
) -> Result<(), NodeError> {
    if cfg.scan_once {
        listeners::one_shot(&mut cfg);
    }
    // Held until the node stops: one node per data directory.
    let _lock = crate::data_dir::lock(&cfg.data_dir).map_err(startup)?;
    let base = parts::Base::open(&cfg, Arc::new(SystemClock))?;
    let listeners = listeners::Listeners::bind(&cfg).await?;
    let addrs = listeners.addrs;
    let grpc_url = advertised(
        &cfg,
        addrs.grpc,
        base.tls.as_ref().is_some_and(|m| m.has_identity()),
    );
    let me = identify(&mut cfg, &base, &grpc_url, &cancel).await?;
    let parts = parts::build(&cfg, &base, &me, &cancel).await?;
    if let Some(bus) = &cfg.bus {
        // Children in this process reach us at the URL they are given (loopback) or the
        // one we advertise.
        let mut local = addrs.grpc;
        if local.ip().is_unspecified() {
            local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        bus.register(&format!("http://{local}"), &parts.inbound);
        bus.register(&grpc_url, &parts.inbound);
    }
    let tasks = tokio_util::task::TaskTracker::new();
    tasks::serve(&cfg, &base, &parts, &me, listeners, &tasks, &cancel);
    tasks::spawn_workers(&cfg, &base, &parts, &tasks, &cancel);
    tasks.close();
    announce(&cfg, &base, &me, &addrs, &grpc_url);
    if let Some(tx) = started {
        let _ = tx.send(Started {
            id: me.id.clone(),
            grpc: addrs.grpc,
            rest: addrs.rest,
            mqtt: parts
                .broker
                .as_ref()
                .and_then(|b| b.plain_addr(pdsno_broker::Version::V311)),
        });
    }

    let mut outcome = Ok(());
    if cfg.scan_once {
        outcome = scan_once(&parts).await;
        cancel.cancel();
    }
    cancel.cancelled().await;
    if let Some(m) = parts.parent.as_ref().and_then(|p| p.revoked.message()) {
        outcome = Err(NodeError::Revoked(m.to_owned()));
    }
    tracing::info!(id = %me.id, "shutting down");
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 5 s");
    }
    if let Some(c) = parts.outbound.mqtt() {
        c.shutdown().await;
    }
    if let Some(b) = parts.broker {
        b.shutdown().await;
    }
    outcome
}

/// Who this node is: the global controller, or a child restored from its data directory or
/// admitted by its parent now; the data directory records it and the URL it is reached at.
async fn identify(
    cfg: &mut NodeConfig,
    base: &parts::Base,
    grpc_url: &str,
    cancel: &CancellationToken,
) -> Result<Identity, NodeError> {
    let nib = &base.nib;
    let me = match cfg.role {
        Role::Global => global_identity(nib)?,
        Role::Regional | Role::Local => match restore(nib, cfg.role)? {
            Some(me) => {
                let parent = me.parent.as_ref().map_or("-", |p| p.0.as_str());
                say(&Report::Restored {
                    id: me.id.clone(),
                    parent: parent.to_owned(),
                });
                tracing::info!(id = %me.id, %parent, "restored this controller's identity; no admission needed");
                if cfg.bootstrap_token.is_some() || cfg.temp_id.is_some() {
                    tracing::warn!(id = %me.id, "already admitted: --temp-id and the bootstrap token are for the first start only and are ignored (remove them; to admit this host anew, revoke {} on its parent and start from a fresh data directory)", me.id);
                }
                me
            }
            None => admit(cfg, nib, &base.identity, &base.clock, grpc_url, cancel).await?,
        },
    };
    if cfg.role != Role::Global {
        adopt_admission_state(nib, cfg)?;
    }
    nib.set_state(&[(StateKey::GrpcUrl, Value::from(grpc_url))])
        .map_err(startup)?;
    Ok(me)
}

/// Tells operators and tools where the node is: `DATA_DIR/node.json`, the `ready` report
/// line and its log event.
fn announce(
    cfg: &NodeConfig,
    base: &parts::Base,
    me: &Identity,
    addrs: &listeners::Addrs,
    grpc_url: &str,
) {
    let scheme = if cfg.tls.serves_tls() {
        "https"
    } else {
        "http"
    };
    let rest_url = format!("{scheme}://{}", addrs.rest);
    let admin_url = addrs.admin.map(|a| format!("{scheme}://{a}"));
    if let Err(e) = crate::admin::write_node_file(
        &cfg.data_dir,
        &me.id,
        cfg.role.as_str(),
        grpc_url,
        &rest_url,
        admin_url.as_deref(),
        &cfg.tls,
    ) {
        tracing::warn!(error = %e, "cannot write node.json");
    }
    let public_key = base.identity.public().to_base64();
    say(&Report::Ready {
        id: me.id.clone(),
        role: cfg.role.as_str().to_owned(),
        grpc: addrs.grpc.to_string(),
        rest: addrs.rest.to_string(),
        admin: addrs.admin.map(|a| a.to_string()),
        metrics: addrs.metrics.map(|a| a.to_string()),
        public_key: public_key.clone(),
    });
    tracing::info!(id = %me.id, role = %cfg.role, grpc = %addrs.grpc, rest = %addrs.rest, admin = %addrs.admin.map_or("-".into(), |a| a.to_string()), %public_key, "controller ready");
}

/// `--scan-once`: one cycle, its report delivered (or left queued for the next run).
async fn scan_once(parts: &parts::Parts) -> Result<(), NodeError> {
    let Some(ld) = &parts.local else {
        return Ok(());
    };
    match ld.cycle().await {
        Ok(_) => {
            let delivered = parts.delivery.wait_drained(Duration::from_secs(30)).await;
            say(&Report::ScanOnce { delivered });
            tracing::info!(delivered, "scan-once: one discovery cycle done");
            if delivered {
                Ok(())
            } else {
                Err(NodeError::Undelivered)
            }
        }
        Err(e) => Err(NodeError::Startup(format!("discovery cycle failed: {e}"))),
    }
}
