//! What a node runs: its servers (gRPC with the admin service, REST, metrics) and its
//! background work (heartbeats, MQTT, key exchange and rotation, discovery, liveness, nonce
//! sweeping), each spawned on the node's task tracker and stopped by its cancellation token.

use std::sync::Arc;
use std::time::Duration;

use pdsno_broker::Version;
use pdsno_shared::ids::Role;
use pdsno_shared::json::Map;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::listeners::Listeners;
use super::parts::{Base, Parts};
use super::startup::{Identity, readiness};
use super::{mqtt_link, workers};
use crate::config::NodeConfig;
use crate::transport::listen::ConnectionLimits;
use crate::transport::{grpc, rest};

/// Serves gRPC (and the admin service, there or on `--listen-admin`), REST and, with
/// `--listen-metrics`, health and metrics over plaintext.
pub(super) fn serve(
    cfg: &NodeConfig,
    base: &Base,
    parts: &Parts,
    me: &Identity,
    listeners: Listeners,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let limits = ConnectionLimits::of(&cfg.limits);
    let api = grpc::GrpcApi::new(parts.inbound.clone()).with_guard(parts.guard.clone());
    let admin_api = crate::admin::AdminApi(parts.admin.clone());
    // With --listen-admin the admin service is served there only.
    let admin_api = match listeners.admin {
        Some(l) => {
            let (c, tls, metrics, limits) = (
                cancel.clone(),
                base.tls.clone(),
                base.metrics.clone(),
                limits.clone(),
            );
            tasks.spawn(async move {
                if let Err(e) =
                    grpc::serve_admin(l, admin_api, tls.as_deref(), &limits, metrics, c).await
                {
                    tracing::error!(error = %e, "admin server stopped");
                }
            });
            None
        }
        None => Some(admin_api),
    };
    {
        let (c, tls, limits, l) = (
            cancel.clone(),
            base.tls.clone(),
            limits.clone(),
            listeners.grpc,
        );
        tasks.spawn(async move {
            if let Err(e) = grpc::serve(l, api, admin_api, tls.as_deref(), &limits, c).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
    }
    let ready = readiness(
        base.nib.clone(),
        parts.outbound.clone(),
        Some(parts.heartbeats.clone()).filter(|_| me.parent.is_some()),
        cfg.heartbeat_interval,
        cfg.mqtt_url.is_some(),
    );
    // --listen-metrics: /health, /ready and /metrics over plaintext, nothing else.
    if let Some(l) = listeners.metrics {
        let (c, m, ready, id) = (
            cancel.clone(),
            base.metrics.clone(),
            ready.clone(),
            me.id.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) =
                crate::transport::metrics_http::serve(l, Some(&id), m, Some(ready), c).await
            {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let (c, ib, tls, guard, l) = (
        cancel.clone(),
        parts.inbound.clone(),
        base.tls.clone(),
        parts.guard.clone(),
        listeners.rest,
    );
    tasks.spawn(async move {
        if let Err(e) =
            rest::serve(l, ib, Some(guard), tls.as_deref(), &limits, Some(ready), c).await
        {
            tracing::error!(error = %e, "REST server stopped");
        }
    });
}

/// Runs `every` each `period` until `cancel` fires.
fn every(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    period: Duration,
    mut work: impl FnMut() + Send + 'static,
) {
    let c = cancel.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                _ = tokio::time::sleep(period) => work(),
            }
        }
    });
}

/// The node's background work.
pub(super) fn spawn_workers(
    cfg: &NodeConfig,
    base: &Base,
    parts: &Parts,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    // Expired nonces are swept off the executor.
    let ib = parts.inbound.clone();
    every(tasks, cancel, Duration::from_secs(60), move || {
        let ib = ib.clone();
        tokio::task::spawn_blocking(move || ib.purge_expired_nonces());
    });
    if let Some(p) = &parts.parent {
        tasks.spawn(workers::first_exchange(
            parts.trust.clone(),
            p.clone(),
            cancel.clone(),
        ));
    }
    // Our status: published on pdsno/status/{me}, and heartbeats to the parent.
    let status = workers::StatusLoop {
        trust: parts.trust.clone(),
        parent: parts.parent.clone(),
        outbound: parts.outbound.clone(),
        interval: cfg.heartbeat_interval,
        session: parts.session.clone(),
        stats: parts.heartbeats.clone(),
        extras: status_extras(cfg.role, parts),
    };
    tasks.spawn(status.run(cancel.clone()));
    spawn_mqtt(cfg, parts, tasks, cancel);
    if let Some(c) = &parts.children {
        let (c, clock) = (c.clone(), base.clock.clone());
        every(tasks, cancel, Duration::from_millis(500), move || {
            c.report_transitions(clock.now());
        });
    }
    tasks.spawn(parts.delivery.clone().run(cancel.clone()));
    if let (Some(rd), Some(p)) = (&parts.regional, &parts.parent) {
        tasks.spawn(rd.clone().summaries(
            p.id.clone(),
            parts.delivery.clone(),
            cfg.summary_interval,
            cancel.clone(),
        ));
    }
    if let Some(ld) = &parts.local
        && !cfg.scan_once
    {
        tasks.spawn(ld.clone().run(cfg.discovery_interval, cancel.clone()));
    }
    tasks.spawn(workers::rotations(
        parts.trust.clone(),
        parts.parent.clone(),
        cfg.key_rotation,
        parts.rotate_wake.clone(),
        parts.rotate_done.clone(),
        cancel.clone(),
    ));
    tasks.spawn(super::housekeeping::run(
        parts.trust.clone(),
        cfg.device_retention,
        cancel.clone(),
    ));
}

/// What each status message carries besides liveness: the policy version, and below the
/// GC the devices and children this node answers for.
fn status_extras(role: Role, parts: &Parts) -> Arc<dyn Fn() -> Map + Send + Sync> {
    let (pol, t, ch) = (
        parts.policy.clone(),
        parts.trust.clone(),
        parts.children.clone(),
    );
    Arc::new(move || {
        let mut m = Map::new();
        m.insert("policy_version".into(), pol.version().into());
        if role != Role::Global {
            let by_lc = t.nib.active_devices_by_lc().unwrap_or_default();
            m.insert("devices".into(), by_lc.values().sum::<u64>().into());
            if let Some(c) = &ch {
                m.insert("children".into(), c.summary_for_parent(&by_lc));
            }
        }
        m
    })
}

/// MQTT: connects once there is a broker and a credential (a child gets both with its first
/// key exchange); a child also catches up with its parent's policy over gRPC once its key is
/// agreed (with or without a broker).
fn spawn_mqtt(cfg: &NodeConfig, parts: &Parts, tasks: &TaskTracker, cancel: &CancellationToken) {
    let node = Arc::new(mqtt_link::MqttNode {
        trust: parts.trust.clone(),
        inbound: parts.inbound.clone(),
        outbound: parts.outbound.clone(),
        children: parts.children.clone(),
        policy: parts.policy.clone(),
        parent_link: parts.parent.as_ref().map(|p| p.link.clone()),
        session: parts.session.clone(),
    });
    if let Some(p) = &parts.parent {
        let (node, t, pid, cancel) = (
            node.clone(),
            parts.trust.clone(),
            p.id.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            while t.pair_keys.signing_key(&pid).is_none() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            node.sync_policy().await;
        });
    }
    let embedded = parts.broker.as_ref().and_then(|b| {
        b.plain_addr(Version::V311)
            .map(|a| (a, false))
            .or_else(|| b.tls_addr(Version::V311).map(|a| (a, true)))
    });
    let (t, creds, cfg2) = (parts.trust.clone(), parts.credentials.clone(), cfg.clone());
    let info = move || mqtt_link::connect_info(&cfg2, &t, embedded, creds.as_deref());
    tasks.spawn(node.run(info, cancel.clone()));
}
