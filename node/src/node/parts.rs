//! The parts a node is made of, each built by its own function, in the order they depend
//! on each other: keys ([`Trust`]), the parent link, sending ([`Outbound`]), the policy, the
//! embedded broker, admission ([`Authority`]), children, the receive path with the tier's
//! handler table, discovery, and the admin service.

use std::sync::Arc;

use pdsno_broker::BrokerHandle;
use pdsno_shared::ids::Role;
use pdsno_shared::keys::{HmacKey, IdentityKey};
use pdsno_shared::time::Clock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::children::Children;
use super::startup::{Identity, advertised_mqtt, start_broker};
use super::workers::{self, HeartbeatStats, ParentSide};
use super::{NodeError, startup};
use crate::admission::{Authority, AuthorityConfig};
use crate::config::NodeConfig;
use crate::credentials::MqttCredentials;
use crate::discovery::delivery::Delivery;
use crate::discovery::lc::LocalDiscovery;
use crate::discovery::rc::RegionalDiscovery;
use crate::guard::Guard;
use crate::inbound::Inbound;
use crate::keys::PairKeys;
use crate::metrics::Metrics;
use crate::nib::Nib;
use crate::outbound::Outbound;
use crate::policy::Policy;
use crate::tls::TlsMaterial;
use crate::transport::parent::ParentLink;
use crate::trust::Trust;

/// What a node has before it knows who it is: its data directory's contents and its
/// process-wide services.
pub(super) struct Base {
    pub(super) nib: Arc<Nib>,
    pub(super) identity: Arc<IdentityKey>,
    pub(super) admin_key: HmacKey,
    pub(super) tls: Option<Arc<TlsMaterial>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) clock: Arc<dyn Clock>,
}

impl Base {
    /// Opens the NIB and the keys of `cfg.data_dir`, and loads the TLS files.
    pub(super) fn open(cfg: &NodeConfig, clock: Arc<dyn Clock>) -> Result<Base, NodeError> {
        let nib = Arc::new(Nib::open(cfg.data_dir.join("nib.db")).map_err(startup)?);
        // An admitted node's key is what its certificate and its peers name: never replaced.
        let key_file = cfg.data_dir.join(crate::identity::KEY_FILE);
        if let Some(id) = nib
            .state_str(crate::nib::StateKey::AssignedId)
            .map_err(startup)?
            && !key_file.exists()
        {
            return Err(startup(format!(
                "{}: the identity key of {id} is missing. Restore it from a backup; a new key would not match the certificate its peers know. To start over, revoke {id} on its parent and admit a fresh data directory with a new token",
                key_file.display()
            )));
        }
        let (identity, created) =
            crate::identity::load_or_create(&cfg.data_dir).map_err(startup)?;
        if created {
            tracing::info!(public_key = %identity.public().to_base64(), "created the identity key");
        }
        let admin_key = crate::admin::load_or_create_key(&cfg.data_dir).map_err(startup)?;
        let tls = TlsMaterial::load(&cfg.tls).map_err(startup)?;
        if let Some(m) = &tls {
            crate::tls::install_client(m.clone());
        }
        // Broker series only where a broker runs.
        let metrics = Arc::new(Metrics::with_scope(
            if cfg.role == Role::Global && cfg.embedded_broker {
                crate::metrics::Scope::NodeWithBroker
            } else {
                crate::metrics::Scope::Node
            },
        ));
        Ok(Base {
            nib,
            identity: Arc::new(identity),
            admin_key,
            tls,
            metrics,
            clock,
        })
    }
}

/// Everything a running node is made of.
pub(super) struct Parts {
    pub(super) trust: Arc<Trust>,
    pub(super) parent: Option<ParentSide>,
    pub(super) outbound: Arc<Outbound>,
    pub(super) policy: Arc<Policy>,
    /// This process's session id (a last will speaks only for its own session).
    pub(super) session: String,
    pub(super) broker: Option<BrokerHandle>,
    pub(super) credentials: Option<Arc<MqttCredentials>>,
    pub(super) children: Option<Arc<Children>>,
    pub(super) inbound: Arc<Inbound>,
    pub(super) guard: Arc<Guard>,
    pub(super) delivery: Arc<Delivery>,
    pub(super) regional: Option<Arc<RegionalDiscovery>>,
    pub(super) local: Option<Arc<LocalDiscovery>>,
    pub(super) admin: Arc<crate::admin::Admin>,
    pub(super) heartbeats: Arc<HeartbeatStats>,
    pub(super) rotate_wake: Arc<Notify>,
    pub(super) rotate_done: Arc<Notify>,
}

/// Builds the parts of the node `me`, configured by `cfg`.
pub(super) async fn build(
    cfg: &NodeConfig,
    base: &Base,
    me: &Identity,
    cancel: &CancellationToken,
) -> Result<Parts, NodeError> {
    let trust = trust(cfg, base, me)?;
    let parent = parent_side(cfg, me, cancel)?;
    let outbound = Arc::new(Outbound::new());
    if let Some(p) = &parent {
        outbound.add_peer(&p.id, p.link.clone());
    }
    let policy = Arc::new(Policy::load(trust.clone()).map_err(startup)?);
    if policy.ensure_default().map_err(startup)?.is_some() {
        tracing::info!("stored the default policy as version 1");
    }
    let session = pdsno_shared::ids::message_id()[4..].to_owned();
    let (broker, credentials) = broker(cfg, base).await?;
    add_samplers(&base.metrics, broker.as_ref(), &outbound);
    let mqtt_url = broker
        .as_ref()
        .and_then(|b| advertised_mqtt(cfg, b))
        .or_else(|| cfg.advertise_mqtt.clone())
        .or_else(|| cfg.mqtt_url.clone());
    let authority = authority(cfg, base, me)?;
    let children = authority.as_ref().map(|_| {
        Arc::new(Children::new(
            trust.clone(),
            credentials.clone(),
            broker.as_ref().map(BrokerHandle::control),
            mqtt_url.clone(),
            parent.as_ref().map(|p| p.link.clone()),
        ))
    });
    let mut inbound = Inbound::new(
        trust.clone(),
        authority,
        pdsno_shared::signing::DEFAULT_REPLAY_CAPACITY,
    )
    .map_err(startup)?;
    let audit = crate::audit::Audit::new(trust.clone());
    inbound.observe(base.metrics.clone(), Some(audit.clone()));
    let guard = guard(cfg, base, audit);
    let delivery = Arc::new(Delivery::new(trust.clone(), outbound.clone()));
    let regional = match (cfg.role, &cfg.region) {
        (Role::Regional, Some(region)) => Some(Arc::new(RegionalDiscovery::new(
            trust.clone(),
            region.clone(),
            crate::nib::IngestLimits {
                spike_threshold: cfg.spike_threshold,
                max_devices_per_lc: cfg.max_devices_per_lc,
            },
        ))),
        _ => None,
    };
    let local = local_discovery(cfg, &trust, parent.as_ref(), &policy, &delivery, me)?;
    let heartbeats = Arc::new(HeartbeatStats::default());
    let deps = crate::tier::Deps {
        role: cfg.role,
        trust: trust.clone(),
        parent_id: me.parent.as_ref().map(|p| p.0.clone()),
        children: children.clone(),
        heartbeats: heartbeats.clone(),
        policy: policy.clone(),
        outbound: outbound.clone(),
        regional: regional.clone(),
        local_delivery: local.as_ref().map(|_| delivery.clone()),
    };
    for (t, h) in crate::tier::table(&deps) {
        inbound.register(t, h);
    }
    let inbound = Arc::new(inbound);
    base.metrics
        .expect_messages(inbound.handled_types().iter().map(|t| t.as_str()));
    let rotate_wake = Arc::new(Notify::new());
    let rotate_done = Arc::new(Notify::new());
    let admin = Arc::new(
        crate::admin::Admin::new(
            base.admin_key.clone(),
            trust.clone(),
            children.clone(),
            Some(heartbeats.clone()),
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
    Ok(Parts {
        trust,
        parent,
        outbound,
        policy,
        session,
        broker,
        credentials,
        children,
        inbound,
        guard,
        delivery,
        regional,
        local,
        admin,
        heartbeats,
        rotate_wake,
        rotate_done,
    })
}

fn trust(cfg: &NodeConfig, base: &Base, me: &Identity) -> Result<Arc<Trust>, NodeError> {
    let pair_keys = Arc::new(
        PairKeys::load(
            base.nib.clone(),
            chrono::Duration::from_std(cfg.key_grace).unwrap_or(chrono::Duration::minutes(10)),
        )
        .map_err(startup)?,
    );
    Ok(Arc::new(Trust {
        me: me.id.clone(),
        role: cfg.role,
        region: cfg.region.clone(),
        identity: base.identity.clone(),
        network_key: cfg.network_key.clone(),
        pair_keys,
        nib: base.nib.clone(),
        parent: me.parent.clone(),
        clock: base.clock.clone(),
    }))
}

fn parent_side(
    cfg: &NodeConfig,
    me: &Identity,
    cancel: &CancellationToken,
) -> Result<Option<ParentSide>, NodeError> {
    let (Some((id, key)), Some(url)) = (&me.parent, &cfg.parent) else {
        return Ok(None);
    };
    Ok(Some(ParentSide {
        id: id.clone(),
        key: *key,
        // A pinned parent id holds for the whole life of the link, not only admission.
        link: ParentLink::pinned(
            url,
            crate::tls::installed_client().map(|m| &**m),
            cfg.parent_pin.id.as_deref(),
        )
        .map_err(startup)?
        .over(cfg.bus.as_ref()),
        revoked: Arc::new(workers::Revoked::new(cancel.clone())),
    }))
}

/// The GC's embedded broker, and the credentials it issues controllers (issued even with an
/// external broker, whose operator provisions them).
async fn broker(
    cfg: &NodeConfig,
    base: &Base,
) -> Result<(Option<BrokerHandle>, Option<Arc<MqttCredentials>>), NodeError> {
    if cfg.role != Role::Global {
        return Ok((None, None));
    }
    let creds = Arc::new(MqttCredentials::load(base.nib.clone()).map_err(startup)?);
    let broker = match cfg.embedded_broker {
        true => Some(start_broker(cfg, &creds).await?),
        false => None,
    };
    Ok((broker, Some(creds)))
}

fn add_samplers(metrics: &Metrics, broker: Option<&BrokerHandle>, outbound: &Arc<Outbound>) {
    if let Some(b) = broker {
        let control = b.control();
        metrics.add_sampler(move |s| s.broker(&control.stats()));
    }
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

/// A parent's admission authority (none for a local controller).
fn authority(
    cfg: &NodeConfig,
    base: &Base,
    me: &Identity,
) -> Result<Option<Arc<Authority>>, NodeError> {
    let child_role = match cfg.role {
        Role::Local => return Ok(None),
        Role::Global => Role::Regional,
        Role::Regional => Role::Local,
    };
    let secret = match (cfg.bootstrap_secret.clone(), cfg.role) {
        (Some(s), _) => s,
        (None, Role::Regional) => {
            let (s, created) =
                crate::identity::load_or_create_bootstrap_secret(&cfg.data_dir).map_err(startup)?;
            if created {
                tracing::info!(file = %cfg.data_dir.join(crate::identity::BOOTSTRAP_SECRET_FILE).display(), "created this regional controller's bootstrap secret (mint local tokens with pdsno token --data-dir)");
            }
            s
        }
        (None, _) => return Err(startup("no bootstrap secret")),
    };
    let mut ac = AuthorityConfig::new(vec![child_role], secret);
    ac.regions = cfg.regions.clone();
    ac.served_region = if cfg.role == Role::Regional {
        cfg.region.clone()
    } else {
        None
    };
    ac.quota_per_region = cfg.quota_per_region;
    ac.legacy_compat = cfg.legacy_compat;
    ac.blocklist = cfg.blocklist.clone();
    ac.challenge_ttl =
        chrono::Duration::from_std(cfg.challenge_ttl).unwrap_or(chrono::Duration::seconds(30));
    if cfg.legacy_compat {
        tracing::warn!(
            "legacy compatibility is on: challenge answers that prove nothing are accepted (with a warning each time)"
        );
    }
    Ok(Some(Arc::new(Authority::new(
        me.id.clone(),
        ac,
        base.identity.clone(),
        base.nib.clone(),
        base.clock.clone(),
        me.chain.clone(),
    ))))
}

/// Rate limits and admission lockouts, with the lockouts of the previous run still in force.
fn guard(cfg: &NodeConfig, base: &Base, audit: Arc<crate::audit::Audit>) -> Arc<Guard> {
    let guard = Guard::new(cfg.limits.clone(), Some(audit), base.metrics.clone());
    let nib = &base.nib;
    match nib
        .latest_events_of_type("ADMISSION_LOCKOUT", 10_000)
        .and_then(|mut v| {
            v.extend(nib.latest_events_of_type("ADMISSION_LOCKOUT_CLEARED", 10_000)?);
            Ok(v)
        }) {
        Ok(events) => {
            let n = guard.restore_lockouts(&events, base.clock.now());
            if n > 0 {
                tracing::warn!(
                    addresses = n,
                    "admission lockouts of the previous run still in force"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read earlier lockouts from the audit log"),
    }
    guard
}

/// A local controller's scanning and reporting.
fn local_discovery(
    cfg: &NodeConfig,
    trust: &Arc<Trust>,
    parent: Option<&ParentSide>,
    policy: &Arc<Policy>,
    delivery: &Arc<Delivery>,
    me: &Identity,
) -> Result<Option<Arc<LocalDiscovery>>, NodeError> {
    let (Role::Local, Some(p), Some(region)) = (cfg.role, parent, &cfg.region) else {
        return Ok(None);
    };
    let (scanner, subnet) = crate::discovery::lc::scanner_for(cfg, &me.id).map_err(startup)?;
    let pol = policy.clone();
    Ok(Some(Arc::new(LocalDiscovery::new(
        trust.clone(),
        scanner,
        subnet,
        p.id.clone(),
        region.clone(),
        cfg.missed_cycles,
        delivery.clone(),
        Arc::new(move || pol.version()),
    ))))
}
