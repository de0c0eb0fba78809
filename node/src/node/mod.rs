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
pub mod mqtt_link;
pub mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pdsno_broker::{BrokerConfig, BrokerHandle, EmbeddedBroker, ListenerConfig, Version};
use pdsno_shared::envelope::MessageType;
use pdsno_shared::ids::{GLOBAL_CONTROLLER_ID, Role};
use pdsno_shared::json::Value;
use pdsno_shared::keys::{IdentityKey, PublicKey};
use pdsno_shared::payload::admission::Metadata;
use pdsno_shared::time::{Clock, SystemClock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admission::child::{self, Admission, ChildConfig, ChildError};
use crate::admission::{Authority, AuthorityConfig, IssuerChain};
use crate::config::NodeConfig;
use crate::credentials::MqttCredentials;
use crate::inbound::Inbound;
use crate::keys::PairKeys;
use crate::keys::exchange::CredentialSource;
use crate::nib::{Nib, StateKey};
use crate::transport::parent::{Backoff, ParentLink};
use crate::transport::{grpc, rest};
use crate::trust::Trust;
use children::Children;
use workers::{HeartbeatStats, ParentSide};

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
fn say(line: &str) {
    crate::report::line(line);
}

/// This node's identity and where it sits in the tree.
struct Identity {
    id: String,
    parent: Option<(String, PublicKey)>,
    chain: Option<IssuerChain>,
}

fn restore(nib: &Nib, role: Role) -> Result<Option<Identity>, NodeError> {
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
fn chain_of(nib: &Nib, role: Role) -> Result<Option<IssuerChain>, NodeError> {
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
fn adopt_admission_state(nib: &Nib, cfg: &mut NodeConfig) -> Result<(), NodeError> {
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

fn persist(nib: &Nib, cfg: &NodeConfig, parent_url: &str, a: &Admission) -> Result<(), NodeError> {
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

async fn admit(
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
    .map_err(startup)?;
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
    say(&format!(
        "admitted id={} parent={} temp_id={} elapsed_ms={}",
        admission.assigned_id,
        admission.parent_id,
        temp_id,
        started.elapsed().as_millis()
    ));
    tracing::info!(id = %admission.assigned_id, parent = %admission.parent_id, "admitted");
    Ok(Identity {
        id: admission.assigned_id.clone(),
        parent: Some((admission.parent_id.clone(), admission.parent_public_key)),
        chain: chain_of(nib, cfg.role)?,
    })
}

fn global_identity(nib: &Nib) -> Result<Identity, NodeError> {
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

async fn start_broker(
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
        if l.tls {
            say(&format!("mqtts {v} {}", l.addr));
        } else {
            say(&format!("mqtt {v} {}", l.addr));
        }
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
fn topic_rules() -> pdsno_broker::TopicRules {
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

fn advertised(cfg: &NodeConfig, addr: std::net::SocketAddr, tls: bool) -> String {
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

fn advertised_mqtt(cfg: &NodeConfig, broker: &BrokerHandle) -> Option<String> {
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
fn readiness(
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

/// Runs the node until `cancel` fires.
///
/// # Errors
/// [`NodeError`] when startup or admission fails.
pub async fn run(mut cfg: NodeConfig, cancel: CancellationToken) -> Result<(), NodeError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    if cfg.scan_once {
        // A one-shot run serves nobody: it takes none of the configured addresses (a
        // daemon or another run may hold them), only ephemeral loopback ports for its own
        // services.
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.listen_grpc = loopback;
        cfg.listen_rest = loopback;
        cfg.listen_admin = None;
        cfg.listen_metrics = None;
        tracing::info!("scan-once: no listener on the configured addresses");
    }
    // Held until the node stops: one node per data directory.
    let _lock = crate::data_dir::lock(&cfg.data_dir).map_err(startup)?;
    let nib = Arc::new(Nib::open(cfg.data_dir.join("nib.db")).map_err(startup)?);
    // An admitted node's key is what its certificate and its peers name: never replaced.
    if let Some(id) = nib.state_str(StateKey::AssignedId).map_err(startup)?
        && !cfg.data_dir.join(crate::identity::KEY_FILE).exists()
    {
        return Err(startup(format!(
            "{}: the identity key of {id} is missing. Restore it from a backup; a new key would not match the certificate its peers know. To start over, revoke {id} on its parent and admit a fresh data directory with a new token",
            cfg.data_dir.join(crate::identity::KEY_FILE).display()
        )));
    }
    let (identity, created) = crate::identity::load_or_create(&cfg.data_dir).map_err(startup)?;
    if created {
        tracing::info!(public_key = %identity.public().to_base64(), "created the identity key");
    }
    let identity = Arc::new(identity);
    let admin_key = crate::admin::load_or_create_key(&cfg.data_dir).map_err(startup)?;
    let tls = crate::tls::TlsMaterial::load(&cfg.tls).map_err(startup)?;
    if let Some(m) = &tls {
        crate::tls::install_client(m.clone());
    }
    // Broker series only where a broker runs.
    let metrics = Arc::new(crate::metrics::Metrics::with_scope(
        if cfg.role == Role::Global && cfg.embedded_broker {
            crate::metrics::Scope::NodeWithBroker
        } else {
            crate::metrics::Scope::Node
        },
    ));

    // Bind first: a busy port fails fast, and children learn our real address.
    let grpc_listener = grpc::bind(cfg.listen_grpc).await.map_err(startup)?;
    let rest_listener = tokio::net::TcpListener::bind(cfg.listen_rest)
        .await
        .map_err(|e| {
            startup(format!(
                "cannot listen for REST on {}: {e}",
                cfg.listen_rest
            ))
        })?;
    let grpc_addr = grpc_listener.local_addr().map_err(startup)?;
    let rest_addr = rest_listener.local_addr().map_err(startup)?;
    let admin_listener =
        match cfg.listen_admin {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
                startup(format!("cannot listen for the admin service on {a}: {e}"))
            })?),
            None => None,
        };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(startup)?),
        None => None,
    };
    let metrics_listener = match cfg.listen_metrics {
        Some(a) => Some(
            crate::transport::metrics_http::bind(a)
                .await
                .map_err(startup)?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(startup)?),
        None => None,
    };
    let grpc_url = advertised(
        &cfg,
        grpc_addr,
        tls.as_ref().is_some_and(|m| m.has_identity()),
    );

    let me = match cfg.role {
        Role::Global => global_identity(&nib)?,
        Role::Regional | Role::Local => match restore(&nib, cfg.role)? {
            Some(me) => {
                say(&format!(
                    "restored id={} parent={}",
                    me.id,
                    me.parent.as_ref().map_or("-", |p| p.0.as_str())
                ));
                tracing::info!(id = %me.id, parent = %me.parent.as_ref().map_or("-", |p| p.0.as_str()), "restored this controller's identity; no admission needed");
                if cfg.bootstrap_token.is_some() || cfg.temp_id.is_some() {
                    tracing::warn!(id = %me.id, "already admitted: --temp-id and the bootstrap token are for the first start only and are ignored (remove them; to admit this host anew, revoke {} on its parent and start from a fresh data directory)", me.id);
                }
                me
            }
            None => admit(&cfg, &nib, &identity, &clock, &grpc_url, &cancel).await?,
        },
    };
    if cfg.role != Role::Global {
        adopt_admission_state(&nib, &mut cfg)?;
    }
    nib.set_state(&[(StateKey::GrpcUrl, Value::from(grpc_url.as_str()))])
        .map_err(startup)?;

    let pair_keys = Arc::new(
        PairKeys::load(
            nib.clone(),
            chrono::Duration::from_std(cfg.key_grace).unwrap_or(chrono::Duration::minutes(10)),
        )
        .map_err(startup)?,
    );
    let trust = Arc::new(Trust {
        me: me.id.clone(),
        role: cfg.role,
        region: cfg.region.clone(),
        identity: identity.clone(),
        network_key: cfg.network_key.clone(),
        pair_keys,
        nib: nib.clone(),
        parent: me.parent.clone(),
        clock: clock.clone(),
    });

    let parent_side = match (&me.parent, &cfg.parent) {
        (Some((id, key)), Some(url)) => Some(ParentSide {
            id: id.clone(),
            key: *key,
            // A pinned parent id holds for the whole life of the link, not only admission.
            link: ParentLink::pinned(
                url,
                crate::tls::installed_client().map(|m| &**m),
                cfg.parent_pin.id.as_deref(),
            )
            .map_err(startup)?,
            revoked: Arc::new(workers::Revoked::new(cancel.clone())),
        }),
        _ => None,
    };
    let outbound = Arc::new(crate::outbound::Outbound::new());
    if let Some(p) = &parent_side {
        outbound.add_peer(&p.id, p.link.clone());
    }
    let policy = Arc::new(crate::policy::Policy::load(trust.clone()).map_err(startup)?);
    if let Some(env) = policy.ensure_default().map_err(startup)? {
        tracing::info!("stored the default policy as version 1");
        let _ = env;
    }
    // A new session per process start: a last will speaks only for its own session.
    let session = pdsno_shared::ids::message_id()[4..].to_owned();

    // The GC's broker authenticates controllers with the credentials it issued.
    let (broker, credentials) = match (cfg.role, cfg.embedded_broker) {
        (Role::Global, true) => {
            let creds = Arc::new(MqttCredentials::load(nib.clone()).map_err(startup)?);
            (Some(start_broker(&cfg, &creds).await?), Some(creds))
        }
        (Role::Global, false) => (
            None,
            Some(Arc::new(
                MqttCredentials::load(nib.clone()).map_err(startup)?,
            )),
        ),
        _ => (None, None),
    };
    if let Some(b) = &broker {
        let control = b.control();
        metrics.add_sampler(move |s| s.broker(&control.stats()));
    }
    {
        let ob = outbound.clone();
        metrics.add_sampler(move |s| {
            if let Some(c) = ob.mqtt() {
                let st = c.stats();
                s.mqtt = Some((
                    st.dropped_qos0 + st.outbox_overflow + st.handler_drops,
                    st.connection_errors,
                ));
            }
        });
    }
    let mqtt_url = broker
        .as_ref()
        .and_then(|b| advertised_mqtt(&cfg, b))
        .or_else(|| cfg.advertise_mqtt.clone())
        .or_else(|| cfg.mqtt_url.clone());

    let authority = match cfg.role {
        Role::Local => None,
        role => {
            let secret = match (cfg.bootstrap_secret.clone(), role) {
                (Some(s), _) => s,
                (None, Role::Regional) => {
                    let (s, created) =
                        crate::identity::load_or_create_bootstrap_secret(&cfg.data_dir)
                            .map_err(startup)?;
                    if created {
                        tracing::info!(file = %cfg.data_dir.join(crate::identity::BOOTSTRAP_SECRET_FILE).display(), "created this regional controller's bootstrap secret (mint local tokens with pdsno token --data-dir)");
                    }
                    s
                }
                (None, _) => return Err(startup("no bootstrap secret")),
            };
            let mut ac = AuthorityConfig::new(
                vec![if role == Role::Global {
                    Role::Regional
                } else {
                    Role::Local
                }],
                secret,
            );
            ac.regions = cfg.regions.clone();
            ac.served_region = if role == Role::Regional {
                cfg.region.clone()
            } else {
                None
            };
            ac.quota_per_region = cfg.quota_per_region;
            ac.legacy_compat = cfg.legacy_compat;
            ac.blocklist = cfg.blocklist.clone();
            ac.challenge_ttl = chrono::Duration::from_std(cfg.challenge_ttl)
                .unwrap_or(chrono::Duration::seconds(30));
            if cfg.legacy_compat {
                tracing::warn!(
                    "legacy compatibility is on: challenge answers that prove nothing are accepted (with a warning each time)"
                );
            }
            Some(Arc::new(Authority::new(
                me.id.clone(),
                ac,
                identity.clone(),
                nib.clone(),
                clock.clone(),
                me.chain.clone(),
            )))
        }
    };

    let children = authority.as_ref().map(|_| {
        Arc::new(Children::new(
            trust.clone(),
            credentials.clone(),
            broker.as_ref().map(BrokerHandle::control),
            mqtt_url.clone(),
            parent_side.as_ref().map(|p| p.link.clone()),
        ))
    });

    let mut inbound = Inbound::new(
        trust.clone(),
        authority,
        pdsno_shared::signing::DEFAULT_REPLAY_CAPACITY,
    )
    .map_err(startup)?;
    let audit = crate::audit::Audit::new(trust.clone());
    inbound.observe(metrics.clone(), Some(audit.clone()));
    let guard = crate::guard::Guard::new(cfg.limits.clone(), Some(audit.clone()), metrics.clone());
    match nib
        .latest_events_of_type("ADMISSION_LOCKOUT", 10_000)
        .and_then(|mut v| {
            v.extend(nib.latest_events_of_type("ADMISSION_LOCKOUT_CLEARED", 10_000)?);
            Ok(v)
        }) {
        Ok(events) => {
            let n = guard.restore_lockouts(&events, clock.now());
            if n > 0 {
                tracing::warn!(
                    addresses = n,
                    "admission lockouts of the previous run still in force"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read earlier lockouts from the audit log"),
    }
    {
        let t = trust.clone();
        let source: Option<Arc<dyn CredentialSource>> =
            children.clone().map(|c| c as Arc<dyn CredentialSource>);
        let handler = move |env: &pdsno_shared::envelope::Envelope| {
            crate::keys::exchange::respond(&t, env, source.as_deref())
        };
        let handler = Arc::new(handler);
        let h1 = handler.clone();
        inbound.register(MessageType::KeyExchangeInit, Box::new(move |e| h1(e)));
        inbound.register(
            MessageType::KeyRotationRequest,
            Box::new(move |e| handler(e)),
        );
    }
    let heartbeat_stats = Some(Arc::new(HeartbeatStats::default()));
    // HEARTBEAT: from children (liveness), and from the parent (it confirms each key it
    // agrees with one).
    if children.is_some() || heartbeat_stats.is_some() {
        let c1 = children.clone();
        let stats = heartbeat_stats.clone();
        let parent_id = me.parent.as_ref().map(|p| p.0.clone());
        let clock = clock.clone();
        inbound.register(
            MessageType::Heartbeat,
            Box::new(move |e| {
                if parent_id.as_deref() == Some(e.sender_id.as_str()) {
                    if let Some(s) = &stats {
                        s.parent_heard(clock.now());
                    }
                    return Ok(crate::inbound::HandlerReply::Accepted);
                }
                match &c1 {
                    Some(c) => c.heartbeat(e),
                    None => Err(crate::inbound::InboundError::Forbidden(format!(
                        "{} is not the parent of this controller",
                        e.sender_id
                    ))),
                }
            }),
        );
    }
    // SYNC_REQUEST: a child asks for the current policy; at the GC an RC also asks for
    // (or withdraws) its local controllers' MQTT credentials.
    if let Some(c) = &children {
        let c2 = c.clone();
        let pol = policy.clone();
        let t = trust.clone();
        let global = cfg.role == Role::Global;
        inbound.register(
            MessageType::SyncRequest,
            Box::new(move |e| {
                if e.payload.get("kind").and_then(Value::as_str) == Some("policy") {
                    if !t.is_active_child(&e.sender_id) {
                        return Err(crate::inbound::InboundError::Forbidden(format!(
                            "{} is not an active child of this controller",
                            e.sender_id
                        )));
                    }
                    let current = pol
                        .for_children()
                        .map_err(|e| crate::inbound::InboundError::Unavailable(e.to_string()))?;
                    let mut m = pdsno_shared::json::Map::new();
                    m.insert("kind".into(), "policy".into());
                    m.insert(
                        "policy".into(),
                        current.map_or(Value::Null, |env| env.to_value()),
                    );
                    return Ok(crate::inbound::HandlerReply::Reply(
                        MessageType::SyncResponse,
                        m,
                    ));
                }
                if global {
                    c2.sync(e)
                } else {
                    Err(crate::inbound::InboundError::BadRequest(
                        "unknown sync kind".into(),
                    ))
                }
            }),
        );
    }
    // POLICY_UPDATE pushed over gRPC by the parent (its fallback when the broker is away).
    if cfg.role != Role::Global {
        let pol = policy.clone();
        let t = trust.clone();
        let ob = outbound.clone();
        let rt = tokio::runtime::Handle::current();
        inbound.register(
            MessageType::PolicyUpdate,
            Box::new(move |e| match pol.receive(e) {
                Ok(crate::policy::PolicyOutcome::Applied { version, republish }) => {
                    let (t, ob, pol) = (t.clone(), ob.clone(), pol.clone());
                    rt.spawn(async move {
                        crate::policy::after_applied(&t, &ob, &pol, version, republish).await;
                    });
                    Ok(crate::inbound::HandlerReply::Accepted)
                }
                Ok(crate::policy::PolicyOutcome::Stale { .. }) => {
                    Ok(crate::inbound::HandlerReply::Accepted)
                }
                Err(err) => Err(crate::inbound::InboundError::Forbidden(err.to_string())),
            }),
        );
    }
    // Discovery.
    let delivery = Arc::new(crate::discovery::delivery::Delivery::new(
        trust.clone(),
        outbound.clone(),
    ));
    let regional = match (cfg.role, &cfg.region) {
        (Role::Regional, Some(region)) => {
            let rd = Arc::new(crate::discovery::rc::RegionalDiscovery::new(
                trust.clone(),
                region.clone(),
                crate::nib::IngestLimits {
                    spike_threshold: cfg.spike_threshold,
                    max_devices_per_lc: cfg.max_devices_per_lc,
                },
            ));
            let r2 = rd.clone();
            inbound.register(
                MessageType::DiscoveryReport,
                Box::new(move |e| r2.on_report(e)),
            );
            Some(rd)
        }
        _ => None,
    };
    if cfg.role == Role::Global {
        let t = trust.clone();
        inbound.register(
            MessageType::DiscoverySummary,
            Box::new(move |e| crate::discovery::gc::on_summary(&t, e)),
        );
    }
    let local = match (cfg.role, &parent_side, &cfg.region) {
        (Role::Local, Some(p), Some(region)) => {
            let (scanner, subnet) =
                crate::discovery::lc::scanner_for(&cfg, &me.id).map_err(startup)?;
            let pol = policy.clone();
            let ld = Arc::new(crate::discovery::lc::LocalDiscovery::new(
                trust.clone(),
                scanner,
                subnet,
                p.id.clone(),
                region.clone(),
                cfg.missed_cycles,
                delivery.clone(),
                Arc::new(move || pol.version()),
            ));
            // Acknowledgements of our reports (over MQTT they come on our reply topic).
            let d = delivery.clone();
            let parent_id = p.id.clone();
            inbound.register(
                MessageType::DiscoveryReportAck,
                Box::new(move |e| {
                    if e.sender_id != parent_id {
                        return Err(crate::inbound::InboundError::Forbidden(format!(
                            "{} is not our regional controller",
                            e.sender_id
                        )));
                    }
                    let id = e
                        .payload
                        .get("report_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            crate::inbound::InboundError::BadRequest("no report_id".into())
                        })?;
                    d.acked(id);
                    Ok(crate::inbound::HandlerReply::Accepted)
                }),
            );
            Some(ld)
        }
        _ => None,
    };
    let inbound = Arc::new(inbound);
    metrics.expect_messages(inbound.handled_types().iter().map(|t| t.as_str()));

    let rotate_wake = Arc::new(Notify::new());
    let rotate_done = Arc::new(Notify::new());
    let admin = Arc::new(
        crate::admin::Admin::new(
            admin_key,
            trust.clone(),
            children.clone(),
            heartbeat_stats.clone(),
            rotate_wake.clone(),
            rotate_done.clone(),
        )
        .map_err(startup)?
        .with_runtime(crate::admin::RuntimeView {
            inbound: inbound.clone(),
            outbound: outbound.clone(),
            policy: policy.clone(),
            delivery: delivery.clone(),
        })
        .with_guard(guard.clone()),
    );

    let tasks = tokio_util::task::TaskTracker::new();
    {
        let c = cancel.clone();
        let api = grpc::GrpcApi::new(inbound.clone()).with_guard(guard.clone());
        let admin_api = crate::admin::AdminApi(admin);
        let tls = tls.clone();
        let limits = crate::transport::listen::ConnectionLimits::of(&cfg.limits);
        // With --listen-admin the admin service is served there only.
        let admin_api = match admin_listener {
            Some(l) => {
                let c = cancel.clone();
                let tls = tls.clone();
                let metrics = metrics.clone();
                let limits = limits.clone();
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
        tasks.spawn(async move {
            if let Err(e) =
                grpc::serve(grpc_listener, api, admin_api, tls.as_deref(), &limits, c).await
            {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
    }
    {
        let c = cancel.clone();
        let ib = inbound.clone();
        let tls = tls.clone();
        let guard = guard.clone();
        let limits = crate::transport::listen::ConnectionLimits::of(&cfg.limits);
        let ready = readiness(
            nib.clone(),
            outbound.clone(),
            heartbeat_stats.clone().filter(|_| me.parent.is_some()),
            cfg.heartbeat_interval,
            cfg.mqtt_url.is_some(),
        );
        // --listen-metrics: /health, /ready and /metrics over plaintext, nothing else.
        if let Some(l) = metrics_listener {
            let (c, m, ready, id) = (
                cancel.clone(),
                metrics.clone(),
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
        tasks.spawn(async move {
            if let Err(e) = rest::serve(
                rest_listener,
                ib,
                Some(guard),
                tls.as_deref(),
                &limits,
                Some(ready),
                c,
            )
            .await
            {
                tracing::error!(error = %e, "REST server stopped");
            }
        });
    }
    // Expired nonces are swept in the background.
    {
        let c = cancel.clone();
        let ib = inbound.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {
                        let ib = ib.clone();
                        let _ = tokio::task::spawn_blocking(move || ib.purge_expired_nonces()).await;
                    }
                }
            }
        });
    }
    if let Some(p) = &parent_side {
        tasks.spawn(workers::first_exchange(
            trust.clone(),
            p.clone(),
            cancel.clone(),
        ));
    }
    // Our status: published on pdsno/status/{me}, and heartbeats to the parent.
    if let Some(stats) = &heartbeat_stats {
        let extras: Arc<dyn Fn() -> pdsno_shared::json::Map + Send + Sync> = {
            let pol = policy.clone();
            let t = trust.clone();
            let ch = children.clone();
            let role = cfg.role;
            Arc::new(move || {
                let mut m = pdsno_shared::json::Map::new();
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
        };
        let status = workers::StatusLoop {
            trust: trust.clone(),
            parent: parent_side.clone(),
            outbound: outbound.clone(),
            interval: cfg.heartbeat_interval,
            session: session.clone(),
            stats: stats.clone(),
            extras,
        };
        tasks.spawn(status.run(cancel.clone()));
    }
    // MQTT: connects once there is a broker and a credential (a child gets both with its
    // first key exchange).
    {
        let node = Arc::new(mqtt_link::MqttNode {
            trust: trust.clone(),
            inbound: inbound.clone(),
            outbound: outbound.clone(),
            children: children.clone(),
            policy: policy.clone(),
            parent_link: parent_side.as_ref().map(|p| p.link.clone()),
            session: session.clone(),
        });
        // At start, catch up with the parent's policy over gRPC once our key is agreed
        // (with or without a broker).
        if let Some(p) = &parent_side {
            let node = node.clone();
            let t = trust.clone();
            let pid = p.id.clone();
            let cancel = cancel.clone();
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
        let embedded = broker.as_ref().and_then(|b| {
            b.plain_addr(Version::V311)
                .map(|a| (a, false))
                .or_else(|| b.tls_addr(Version::V311).map(|a| (a, true)))
        });
        let t = trust.clone();
        let creds = credentials.clone();
        let cfg2 = cfg.clone();
        let info = move || mqtt_link::connect_info(&cfg2, &t, embedded, creds.as_deref());
        tasks.spawn(node.run(info, cancel.clone()));
    }
    if let Some(c) = &children {
        let c = c.clone();
        let cancel = cancel.clone();
        let clock = clock.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        c.report_transitions(clock.now());
                    }
                }
            }
        });
    }
    tasks.spawn(delivery.clone().run(cancel.clone()));
    if let (Some(rd), Some(p)) = (&regional, &parent_side) {
        tasks.spawn(rd.clone().summaries(
            p.id.clone(),
            delivery.clone(),
            cfg.summary_interval,
            cancel.clone(),
        ));
    }
    if let Some(ld) = &local
        && !cfg.scan_once
    {
        tasks.spawn(ld.clone().run(cfg.discovery_interval, cancel.clone()));
    }
    tasks.spawn(workers::rotations(
        trust.clone(),
        parent_side.clone(),
        cfg.key_rotation,
        rotate_wake,
        rotate_done,
        cancel.clone(),
    ));
    tasks.spawn(housekeeping::run(trust.clone(), cfg.device_retention, cancel.clone()));
    tasks.close();

    let rest_scheme = if cfg.tls.serves_tls() {
        "https"
    } else {
        "http"
    };
    let rest_url = format!("{rest_scheme}://{rest_addr}");
    let admin_url = admin_addr.map(|a| format!("{rest_scheme}://{a}"));
    if let Err(e) = crate::admin::write_node_file(
        &cfg.data_dir,
        &me.id,
        cfg.role.as_str(),
        &grpc_url,
        &rest_url,
        admin_url.as_deref(),
        &cfg.tls,
    ) {
        tracing::warn!(error = %e, "cannot write node.json");
    }
    let admin_field = admin_addr
        .map(|a| format!(" admin={a}"))
        .unwrap_or_default();
    let metrics_field = metrics_addr
        .map(|a| format!(" metrics={a}"))
        .unwrap_or_default();
    say(&format!(
        "ready id={} role={} grpc={grpc_addr} rest={rest_addr}{admin_field}{metrics_field} public_key={}",
        me.id,
        cfg.role.as_str(),
        identity.public().to_base64()
    ));
    tracing::info!(id = %me.id, role = %cfg.role, grpc = %grpc_addr, rest = %rest_addr, admin = %admin_addr.map_or("-".into(), |a| a.to_string()), public_key = %identity.public().to_base64(), "controller ready");

    let mut outcome = Ok(());
    if let (true, Some(ld)) = (cfg.scan_once, &local) {
        // One cycle, its report delivered (or left queued for the next run), then exit.
        match ld.cycle().await {
            Ok(_) => {
                let delivered = delivery.wait_drained(Duration::from_secs(30)).await;
                say(&format!("scan-once delivered={delivered}"));
                tracing::info!(delivered, "scan-once: one discovery cycle done");
                if !delivered {
                    outcome = Err(NodeError::Undelivered);
                }
            }
            Err(e) => outcome = Err(NodeError::Startup(format!("discovery cycle failed: {e}"))),
        }
        cancel.cancel();
    }

    cancel.cancelled().await;
    if let Some(m) = parent_side.as_ref().and_then(|p| p.revoked.message()) {
        outcome = Err(NodeError::Revoked(m.to_owned()));
    }
    tracing::info!(id = %me.id, "shutting down");
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 5 s");
    }
    if let Some(c) = outbound.mqtt() {
        c.shutdown().await;
    }
    if let Some(b) = broker {
        b.shutdown().await;
    }
    outcome
}
