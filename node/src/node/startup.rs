//! Starting a node: its identity (restored, or admitted by its parent), the embedded
//! broker, the addresses it advertises and what `/ready` checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pdsno_broker::{BrokerConfig, BrokerHandle, EmbeddedBroker, ListenerConfig, Version};
use pdsno_shared::ids::{GLOBAL_CONTROLLER_ID, Role};
use pdsno_shared::json::Value;
use pdsno_shared::keys::{IdentityKey, PublicKey};
use pdsno_shared::payload::admission::Metadata;
use pdsno_shared::time::Clock;
use tokio_util::sync::CancellationToken;

use super::workers::HeartbeatStats;
use crate::admission::IssuerChain;
use crate::admission::child::{self, Admission, ChildConfig};
use crate::config::NodeConfig;
use crate::credentials::MqttCredentials;
use crate::nib::{Nib, StateKey};
use crate::transport::parent::{Backoff, ParentLink};
use crate::transport::rest;

use super::{NodeError, say, startup};

/// This node's identity and where it sits in the tree.
pub(super) struct Identity {
    pub(super) id: String,
    pub(super) parent: Option<(String, PublicKey)>,
    pub(super) chain: Option<IssuerChain>,
}

pub(super) fn restore(nib: &Nib, role: Role) -> Result<Option<Identity>, NodeError> {
    let Some(id) = nib.state_str(StateKey::AssignedId).map_err(startup)? else {
        return Ok(None);
    };
    if nib.state_str(StateKey::Role).map_err(startup)?.as_deref() != Some(role.as_str()) {
        return Err(startup(format!(
            "the data directory belongs to controller {id} of another tier; use a separate --data-dir"
        )));
    }
    let parent = match (
        nib.state_str(StateKey::ParentId).map_err(startup)?,
        nib.state_str(StateKey::ParentPublicKey).map_err(startup)?,
    ) {
        (Some(pid), Some(pk)) => Some((pid, PublicKey::from_base64(&pk).map_err(startup)?)),
        _ => None,
    };
    let chain = chain_of(nib, role)?;
    Ok(Some(Identity { id, parent, chain }))
}

/// For a regional controller: the chain it shows its children.
pub(super) fn chain_of(nib: &Nib, role: Role) -> Result<Option<IssuerChain>, NodeError> {
    if role != Role::Regional {
        return Ok(None);
    }
    let cert = nib.state(StateKey::Certificate).map_err(startup)?;
    let deleg = nib.state(StateKey::DelegationCredential).map_err(startup)?;
    let root = nib.state_str(StateKey::RootPublicKey).map_err(startup)?;
    match (cert, deleg, root) {
        (Some(certificate), Some(delegation_credential), Some(root)) => Ok(Some(IssuerChain {
            certificate,
            delegation_credential,
            root_public_key: PublicKey::from_base64(&root).map_err(startup)?,
        })),
        _ => Err(startup(
            "incomplete admission state in the NIB (certificate, delegation credential or root key missing)",
        )),
    }
}

/// A restored controller keeps the region it was admitted for, and reaches its parent at
/// the URL it was admitted through unless the configuration names another.
pub(super) fn adopt_admission_state(nib: &Nib, cfg: &mut NodeConfig) -> Result<(), NodeError> {
    let stored = nib.state_str(StateKey::Region).map_err(startup)?;
    match (&cfg.region, stored) {
        (Some(configured), Some(stored)) if *configured != stored => {
            return Err(startup(format!(
                "region: this controller was admitted for region {stored:?}, not {configured:?}; \
                 use a separate --data-dir for another region"
            )));
        }
        (None, Some(stored)) => cfg.region = Some(stored),
        _ => {}
    }
    if cfg.parent.is_none() {
        cfg.parent = nib.state_str(StateKey::ParentUrl).map_err(startup)?;
    }
    if cfg.parent.is_none() {
        return Err(startup(
            "parent: no parent URL configured and none stored; give --parent",
        ));
    }
    Ok(())
}

pub(super) fn persist(
    nib: &Nib,
    cfg: &NodeConfig,
    parent_url: &str,
    a: &Admission,
) -> Result<(), NodeError> {
    let mut values = vec![
        (StateKey::AssignedId, Value::from(a.assigned_id.as_str())),
        (StateKey::Role, Value::from(cfg.role.as_str())),
        (StateKey::Region, Value::from(cfg.region.clone())),
        (StateKey::TempId, Value::from(cfg.temp_id.clone())),
        (StateKey::ParentUrl, Value::from(parent_url)),
        (StateKey::Certificate, a.certificate.clone()),
        (StateKey::ParentId, Value::from(a.parent_id.as_str())),
        (
            StateKey::ParentPublicKey,
            Value::from(a.parent_public_key.to_base64()),
        ),
        (
            StateKey::RootPublicKey,
            Value::from(a.root_public_key.to_base64()),
        ),
    ];
    if let Some(d) = &a.delegation_credential {
        values.push((StateKey::DelegationCredential, d.clone()));
    }
    if let Some(c) = &a.chain {
        values.push((StateKey::Chain, c.clone()));
    }
    if cfg.role == Role::Regional
        && a.local_id_floor > 0
        && let Some(region) = &cfg.region
    {
        nib.raise_sequence(Role::Local, region, a.local_id_floor)
            .map_err(startup)?;
    }
    nib.set_state(&values).map_err(startup)
}

pub(super) async fn admit(
    cfg: &NodeConfig,
    nib: &Nib,
    identity: &IdentityKey,
    clock: &Arc<dyn Clock>,
    grpc_url: &str,
    cancel: &CancellationToken,
) -> Result<Identity, NodeError> {
    let parent_url = cfg
        .parent
        .clone()
        .unwrap_or_else(|| crate::config::default_parent(cfg.role));
    let parent_url = parent_url.as_str();
    let (temp_id, token, region) = cfg.first_start_inputs().map_err(startup)?;
    // A regional controller holding the secret its own token was minted with holds the
    // global controller's secret: anyone on this host could mint regional tokens.
    if cfg.role == Role::Regional
        && let Some(secret) = &cfg.bootstrap_secret
        && pdsno_shared::bootstrap::check_token(
            secret.expose().as_bytes(),
            &temp_id,
            &region,
            Role::Regional.as_str(),
            token.expose(),
            i64::MIN,
        ) != pdsno_shared::bootstrap::TokenCheck::Invalid
    {
        return Err(startup(
            "bootstrap_secret_file: this is the global controller's bootstrap secret (it minted this controller's own token), and a regional controller must not hold it: anyone on this host could mint regional tokens. Remove bootstrap_secret_file / PDSNO_BOOTSTRAP_SECRET here; the regional controller then creates its own in its data directory",
        ));
    }
    let link = ParentLink::pinned(
        parent_url,
        crate::tls::installed_client().map(|m| &**m),
        cfg.parent_pin.id.as_deref(),
    )
    .map_err(startup)?
    .over(cfg.bus.as_ref());
    let child_cfg = ChildConfig {
        temp_id: temp_id.clone(),
        role: cfg.role,
        region,
        bootstrap_token: token,
        network_key: cfg.network_key.clone(),
        metadata: Metadata {
            hostname: std::env::var("HOSTNAME").unwrap_or_default(),
            ip_address: cfg.listen_grpc.ip().to_string(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: match cfg.role {
                Role::Regional => vec![
                    "discovery".into(),
                    "approval".into(),
                    "policy_enforcement".into(),
                ],
                _ => vec!["discovery".into()],
            },
            extra: {
                let mut m = pdsno_shared::json::Map::new();
                m.insert("grpc_url".into(), grpc_url.into());
                m
            },
        },
        root_public_key: cfg.root_public_key,
        parent_pin: cfg.parent_pin.clone(),
    };
    let started = Instant::now();
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };
    let mut attempt = 0u32;
    let admission = loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return Err(startup("stopped before admission")),
            r = child::admit(&link, &child_cfg, identity, clock) => r,
        };
        match r {
            Ok(a) => break a,
            Err(e) if e.is_retryable() => {
                attempt += 1;
                let wait = backoff.delay(attempt);
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::info!(parent = %parent_url, attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "admission not done yet, retrying");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Err(startup("stopped before admission")),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(NodeError::Admission(e)),
        }
    };
    persist(nib, cfg, parent_url, &admission)?;
    say(&crate::report::Report::Admitted {
        id: admission.assigned_id.clone(),
        parent: admission.parent_id.clone(),
        temp_id: temp_id.clone(),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    tracing::info!(id = %admission.assigned_id, parent = %admission.parent_id, "admitted");
    Ok(Identity {
        id: admission.assigned_id.clone(),
        parent: Some((admission.parent_id.clone(), admission.parent_public_key)),
        chain: chain_of(nib, cfg.role)?,
    })
}

pub(super) fn global_identity(nib: &Nib) -> Result<Identity, NodeError> {
    match nib.state_str(StateKey::AssignedId).map_err(startup)? {
        Some(id) if id == GLOBAL_CONTROLLER_ID => {}
        Some(other) => {
            return Err(startup(format!(
                "the data directory belongs to controller {other}; use a separate --data-dir"
            )));
        }
        None => nib
            .set_state(&[
                (StateKey::AssignedId, GLOBAL_CONTROLLER_ID.into()),
                (StateKey::Role, Role::Global.as_str().into()),
            ])
            .map_err(startup)?,
    }
    Ok(Identity {
        id: GLOBAL_CONTROLLER_ID.to_owned(),
        parent: None,
        chain: None,
    })
}

pub(super) async fn start_broker(
    cfg: &NodeConfig,
    creds: &Arc<MqttCredentials>,
) -> Result<BrokerHandle, NodeError> {
    let tls_files = cfg
        .tls
        .cert
        .as_ref()
        .zip(cfg.tls.key.as_ref())
        .map(|(c, k)| pdsno_broker::TlsFiles {
            cert: c.clone(),
            key: k.clone(),
            ca: cfg.tls.ca.clone(),
            require_client_cert: cfg.tls.require_client_cert,
        });
    let mut bc = BrokerConfig::default();
    bc.listeners.clear();
    // Under require_tls there is no plaintext listener at all.
    if !cfg.tls.require_tls {
        bc.listeners.push(ListenerConfig {
            name: "v4".into(),
            addr: cfg.listen_mqtt,
            version: Version::V311,
            tls: None,
        });
    }
    if let Some(files) = &tls_files {
        let addr = cfg.listen_mqtts.unwrap_or_else(|| {
            if cfg.tls.require_tls {
                cfg.listen_mqtt
            } else {
                std::net::SocketAddr::new(cfg.listen_mqtt.ip(), 8883)
            }
        });
        bc.listeners.push(ListenerConfig {
            name: "v4-tls".into(),
            addr,
            version: Version::V311,
            tls: Some(files.clone()),
        });
    }
    if let Some(v5) = cfg.listen_mqtt_v5 {
        bc.listeners.push(ListenerConfig {
            name: "v5".into(),
            addr: v5,
            version: Version::V5,
            tls: if cfg.tls.require_tls {
                tls_files.clone()
            } else {
                None
            },
        });
    }
    bc.operators = cfg.users.clone();
    bc.limits.controller_publish_rate = cfg.mqtt_publish_rate;
    bc.limits.controller_publish_burst = cfg.mqtt_publish_burst;
    bc.limits.max_connections = cfg.limits.max_connections;
    bc.limits.max_connections_per_address = cfg.limits.max_connections_per_address;
    if !cfg.limits.rate_limit_exempt.is_empty() {
        let nets = cfg.limits.rate_limit_exempt.clone();
        bc.per_address_exempt = Some(pdsno_broker::ExemptAddresses::new(move |ip| {
            nets.iter().any(|n| n.contains(&ip))
        }));
    }
    bc.topic_rules = Some(topic_rules());
    // A controller's client id belongs to its credential alone.
    let issued = creds.clone();
    bc.reserved_client_ids = Some(pdsno_broker::ReservedIds::new(move |id| {
        pdsno_shared::topics::is_controller_client_id(id) || issued.has(id)
    }));
    let broker = EmbeddedBroker::start(bc, Some(creds.broker_check()))
        .await
        .map_err(startup)?;
    for l in broker.listeners() {
        let v = match l.version {
            Version::V311 => "v4",
            Version::V5 => "v5",
        };
        say(&crate::report::Report::MqttListener {
            tls: l.tls,
            version: v.to_owned(),
            addr: l.addr.to_string(),
        });
    }
    Ok(broker)
}

/// The embedded broker's topic rights: a controller (its MQTT user name is its id) may
/// publish only on the topics it owns and subscribe only to what its tier reads
/// (PROTOCOL.md §5); operator accounts, and anonymous clients where the operator allowed
/// them, are not restricted (read-only accounts never publish: the broker sees to that).
///
/// Retained messages: inside the pdsno tree only on the topics PROTOCOL.md §5 retains
/// (policies and statuses), for every account; outside it (operators' own topics) within
/// the broker's per-account budget.
pub(super) fn topic_rules() -> pdsno_broker::TopicRules {
    use pdsno_broker::{Access, Principal};
    use pdsno_shared::topics;
    pdsno_broker::TopicRules::new(|who: &Principal, access: Access, topic: &str| match who {
        Principal::Credential(id) => match access {
            Access::Publish => topics::may_publish_on(id, topic),
            Access::Subscribe => topics::may_subscribe(id, topic),
        },
        Principal::Operator(_) | Principal::Reader(_) | Principal::Anonymous => true,
    })
    .with_retain(|who: &Principal, topic: &str| match who {
        Principal::Credential(_) => topics::may_retain_on(topic),
        _ => !topics::in_pdsno_tree(topic) || topics::may_retain_on(topic),
    })
}

pub(super) fn advertised(cfg: &NodeConfig, addr: std::net::SocketAddr, tls: bool) -> String {
    if let Some(u) = &cfg.advertise_grpc {
        return u.clone();
    }
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        tracing::warn!(%addr, "listening on all interfaces: children and tools are told 127.0.0.1; set --advertise-grpc");
        return format!("{scheme}://127.0.0.1:{}", addr.port());
    }
    format!("{scheme}://{addr}")
}

pub(super) fn advertised_mqtt(cfg: &NodeConfig, broker: &BrokerHandle) -> Option<String> {
    if let Some(u) = &cfg.advertise_mqtt {
        return Some(u.clone());
    }
    // Children are told the TLS listener when there is one.
    let (scheme, a) = match broker.tls_addr(Version::V311) {
        Some(a) => ("mqtts", a),
        None => ("mqtt", broker.plain_addr(Version::V311)?),
    };
    Some(if a.ip().is_unspecified() {
        format!("{scheme}://127.0.0.1:{}", a.port())
    } else {
        format!("{scheme}://{a}")
    })
}

/// What `GET /ready` checks: the NIB takes writes; the broker connection is up (when the
/// node uses one: configured, or handed over by its parent with its credential); the parent
/// acknowledged a heartbeat recently (children; the limit leaves room for heartbeats that go
/// over MQTT, of which every sixth also goes to the parent directly).
pub(super) fn readiness(
    nib: Arc<Nib>,
    outbound: Arc<crate::outbound::Outbound>,
    heartbeats: Option<Arc<HeartbeatStats>>,
    interval: Duration,
    mqtt_configured: bool,
) -> rest::ReadyCheck {
    let limit = interval * 13 + Duration::from_secs(5);
    Arc::new(move || {
        let mut v = vec![("nib", nib.check_writable().map_err(|e| e.to_string()))];
        if mqtt_configured || outbound.mqtt().is_some() {
            v.push((
                "mqtt",
                if outbound.mqtt_connected() {
                    Ok(())
                } else {
                    Err("not connected to the broker".into())
                },
            ));
        }
        if let Some(h) = &heartbeats {
            let at = h.parent_ack_ms.load(std::sync::atomic::Ordering::Relaxed);
            let age = chrono::Utc::now().timestamp_millis() - at;
            let r = if at == 0 {
                Err("no heartbeat acknowledged by the parent yet".to_owned())
            } else if age > i64::try_from(limit.as_millis()).unwrap_or(i64::MAX) {
                Err(format!(
                    "the parent last acknowledged a heartbeat {:.0} s ago",
                    age as f64 / 1000.0
                ))
            } else {
                Ok(())
            };
            v.push(("parent", r));
        }
        v
    })
}
