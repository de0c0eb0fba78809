//! The node's MQTT side: which broker and credential to use, the last will, the topics
//! each tier listens to, and the receive path of every topic.
//!
//! Receiving: the topic must be a pdsno topic, the payload an envelope, and its sender must
//! own the topic (PROTOCOL.md §5). Then, by topic:
//! - discovery reports and replies take the full receive path (signature, freshness,
//!   replay, recipient) and their handlers; a report's acknowledgement is published on the
//!   reporter's reply topic;
//! - policy updates are checked by the policy module (signatures, provenance, versions);
//! - status messages (heartbeats, wills) update the parent's view of its children.
//!
//! Every refusal is counted in the receive path's statistics under its reason.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::json::Map;
use pdsno_shared::topics::{self, Topic};
use tokio_util::sync::CancellationToken;

use super::children::{Children, StatusOutcome};
use crate::config::NodeConfig;
use crate::credentials::MqttCredentials;
use crate::inbound::{Inbound, Reply};
use crate::nib::StateKey;
use crate::outbound::Outbound;
use crate::policy::{BROADCAST, Policy, PolicyOutcome};
use crate::transport::mqtt::{BrokerUrl, LinkState, Message, MqttClient, MqttSettings, Will};
use crate::transport::parent::ParentLink;
use crate::trust::Trust;

/// Everything the receive side needs.
pub struct MqttNode {
    /// Keys and identity.
    pub trust: Arc<Trust>,
    /// The shared receive path.
    pub inbound: Arc<Inbound>,
    /// Sending.
    pub outbound: Arc<Outbound>,
    /// Parent side (GC, RC).
    pub children: Option<Arc<Children>>,
    /// Policy state.
    pub policy: Arc<Policy>,
    /// The link to the parent (for policy re-sync).
    pub parent_link: Option<ParentLink>,
    /// This process's session id.
    pub session: String,
}

impl std::fmt::Debug for MqttNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttNode")
            .field("me", &self.trust.me)
            .finish_non_exhaustive()
    }
}

/// Where and as whom a node connects.
#[derive(Clone)]
pub struct ConnectInfo {
    /// The broker.
    pub url: BrokerUrl,
    /// Other members of its cluster, tried in turn when it fails.
    pub alternates: Vec<BrokerUrl>,
    /// User name.
    pub username: String,
    /// Password (none: user name only).
    pub password: Option<pdsno_shared::keys::SecretString>,
    /// CA file for mqtts.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Where the GC's own client reaches its embedded broker: the address it listens on, or
/// loopback when it listens on every address.
fn embedded_url(a: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "mqtts" } else { "mqtt" };
    if a.ip().is_unspecified() {
        format!("{scheme}://127.0.0.1:{}", a.port())
    } else {
        format!("{scheme}://{a}")
    }
}

/// The broker a node uses and its credential, if it can connect yet: configuration wins;
/// a child otherwise uses what the GC issued (URL and credential, kept in the NIB); the GC
/// uses its embedded broker with a credential it issues itself.
///
/// # Errors
/// A configured URL that does not parse.
pub fn connect_info(
    cfg: &NodeConfig,
    trust: &Trust,
    embedded: Option<(std::net::SocketAddr, bool)>,
    credentials: Option<&MqttCredentials>,
) -> Result<Option<ConnectInfo>, String> {
    if !cfg.mqtt {
        return Ok(None);
    }
    let url = match (&cfg.mqtt_url, embedded) {
        (Some(u), _) => Some(u.clone()),
        (None, Some((a, tls))) => Some(embedded_url(a, tls)),
        (None, None) => trust
            .nib
            .state_str(StateKey::MqttUrl)
            .map_err(|e| e.to_string())?,
    };
    let Some(url) = url else { return Ok(None) };
    // A broker named in our configuration is the operator's: connect with what the
    // configuration gives (maybe no password). One the GC told us about is its embedded
    // broker: wait for the credential it issues.
    let configured = cfg.mqtt_url.is_some();
    let mut urls = BrokerUrl::parse_list(&url)?;
    if let Some(plain) = urls.iter().find(|u| !u.tls)
        && crate::tls::plaintext_refused()
    {
        return Err(format!(
            "plaintext MQTT ({plain}) is refused under require_tls; use an mqtts:// broker"
        ));
    }
    let url = urls.remove(0);
    let alternates = urls;
    let username = cfg
        .mqtt_username
        .clone()
        .unwrap_or_else(|| trust.me.clone());
    let password = match (&cfg.mqtt_password, embedded, credentials) {
        (Some(p), _, _) => Some(p.clone()),
        (None, Some(_), Some(c)) => {
            let secret = c.issue(&trust.me).map_err(|e| e.to_string())?;
            Some(pdsno_shared::keys::SecretString::new(hex::encode(secret)))
        }
        _ => trust
            .nib
            .state_str(StateKey::MqttCredential)
            .map_err(|e| e.to_string())?
            .map(pdsno_shared::keys::SecretString::new),
    };
    if password.is_none() && !configured {
        return Ok(None);
    }
    Ok(Some(ConnectInfo {
        url,
        alternates,
        username,
        password,
        ca_file: cfg.mqtt_ca_file.clone(),
    }))
}

/// The filters a tier subscribes to, with their QoS.
pub fn filters(trust: &Trust) -> Vec<(String, u8)> {
    let me = trust.me.clone();
    let region = trust.region.clone().unwrap_or_default();
    match trust.role {
        Role::Global => vec![(topics::status_filter(), 0)],
        Role::Regional => vec![
            (topics::discovery_filter(&region), 1),
            (Topic::PolicyGlobal.to_string(), 1),
            (topics::status_filter(), 0),
            (Topic::Reply(me).to_string(), 1),
        ],
        Role::Local => vec![
            (Topic::PolicyRegion(region).to_string(), 1),
            (Topic::Reply(me).to_string(), 1),
        ],
    }
}

/// The last will: `offline` for this session, signed with the identity key (a will is
/// published long after it was signed, so it is judged by its session, not its age).
pub fn will(trust: &Trust, session: &str) -> Will {
    let mut p = Map::new();
    p.insert("status".into(), "offline".into());
    p.insert("session".into(), session.into());
    p.insert("reason".into(), "connection lost".into());
    let to = trust
        .parent
        .as_ref()
        .map_or(BROADCAST.to_owned(), |(id, _)| id.clone());
    let mut env = Envelope::new(
        MessageType::Heartbeat,
        trust.me.clone(),
        to,
        p,
        trust.clock.now(),
    );
    trust.sign_identity(&mut env);
    Will {
        topic: Topic::Status(trust.me.clone()).to_string(),
        payload: Bytes::from(env.to_json_bytes()),
        qos: 1,
        retain: true,
    }
}

impl MqttNode {
    /// Connects (once a credential exists), subscribes, and serves messages until
    /// cancelled. `info` is asked again every second until it yields a broker.
    pub async fn run(
        self: Arc<Self>,
        info: impl Fn() -> Result<Option<ConnectInfo>, String> + Send + Sync + 'static,
        cancel: CancellationToken,
    ) {
        // It reads the NIB: off the executor.
        let info = Arc::new(info);
        let ci = loop {
            let f = info.clone();
            let got = tokio::task::spawn_blocking(move || f())
                .await
                .unwrap_or_else(|_| Err("the MQTT settings could not be read".into()));
            match got {
                Ok(Some(ci)) => break ci,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "no usable MQTT settings; running without MQTT");
                    return;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        };
        let mut s = MqttSettings::new(ci.url.clone(), self.trust.me.clone());
        s.alternates = ci.alternates.clone();
        s.username = Some(ci.username.clone());
        s.password = ci.password.clone();
        s.ca_file = ci.ca_file.clone();
        s.will = Some(will(&self.trust, &self.session));
        s.keep_alive = Duration::from_secs(30);
        s.max_packet_size = 4 << 20;
        let client = match MqttClient::start(s) {
            Ok((c, _task)) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the MQTT client; running without MQTT");
                return;
            }
        };
        tracing::info!(broker = %format!("{}:{}", ci.url.host, ci.url.port), "MQTT client started");
        self.outbound.set_mqtt(client.clone());
        for (filter, qos) in filters(&self.trust) {
            match client.subscribe(filter.clone(), qos).await {
                Ok(mut rx) => {
                    let me = self.clone();
                    let c = cancel.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                _ = c.cancelled() => return,
                                m = rx.recv() => match m {
                                    Some(m) => me.on_message(m).await,
                                    None => return,
                                },
                            }
                        }
                    });
                }
                Err(e) => tracing::error!(%filter, error = %e, "cannot subscribe"),
            }
        }
        // On every (re)connection: publish our policy for the children (retained), and
        // re-sync ours from the parent (what changed while we were away).
        let mut state = client.state();
        loop {
            let connected = *state.borrow_and_update() == LinkState::Connected;
            if connected {
                let b = client.broker();
                crate::report::emit(&crate::report::Report::MqttConnected {
                    broker: format!("{}:{}", b.host, b.port),
                });
                self.on_connected().await;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = state.changed() => if r.is_err() { return },
            }
        }
    }

    async fn on_connected(&self) {
        if let (Ok(Some(env)), Some(topic)) = (self.policy.for_children(), self.policy.topic())
            && let Err(e) = self.outbound.publish(&env, &topic).await
        {
            tracing::warn!(error = %e, "cannot publish the policy");
        }
        self.sync_policy().await;
    }

    /// Asks the parent for its current policy over gRPC (SYNC_REQUEST kind `policy`).
    pub async fn sync_policy(&self) {
        let (Some(link), Some((parent, _))) = (&self.parent_link, &self.trust.parent) else {
            return;
        };
        let mut p = Map::new();
        p.insert("kind".into(), "policy".into());
        let mut env = Envelope::new(
            MessageType::SyncRequest,
            self.trust.me.clone(),
            parent.clone(),
            p,
            self.trust.clock.now(),
        );
        self.trust.sign_for(parent, &mut env);
        match link.exchange(&env).await {
            Ok(Some(reply)) => {
                if self.trust.authenticate(&reply, Some(parent)).is_err() {
                    tracing::warn!("policy sync answer does not verify");
                    return;
                }
                let Some(v) = reply.payload.get("policy").cloned() else {
                    return;
                };
                if v.is_null() {
                    return;
                }
                match Envelope::from_value(v) {
                    // Fetched over gRPC: counted as such.
                    Ok(pol) => self.apply_policy(pol, "grpc").await,
                    Err(e) => tracing::warn!(error = %e, "policy sync answer is malformed"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "policy sync failed"),
        }
    }

    async fn apply_policy(&self, env: Envelope, transport: &'static str) {
        let policy = self.policy.clone();
        let sender = env.sender_id.clone();
        let r = tokio::task::spawn_blocking(move || policy.receive(&env)).await;
        let metrics = self.inbound.metrics();
        match r {
            Ok(Ok(PolicyOutcome::Applied { version, republish })) => {
                metrics.message("POLICY_UPDATE", transport, "accepted");
                crate::policy::after_applied(
                    &self.trust,
                    &self.outbound,
                    &self.policy,
                    version,
                    republish,
                )
                .await;
            }
            Ok(Ok(PolicyOutcome::Stale { .. })) => {
                metrics.message("POLICY_UPDATE", transport, "stale_policy")
            }
            Ok(Err(e)) => self.inbound.refused(
                "policy_refused",
                transport,
                "POLICY_UPDATE",
                &sender,
                &e.to_string(),
            ),
            Err(e) => tracing::error!(error = %e, "policy task failed"),
        }
    }

    async fn on_message(&self, m: Message) {
        let Some(topic) = Topic::parse(&m.topic) else {
            self.inbound
                .refused("bad_topic", "mqtt", "-", "-", &m.topic);
            return;
        };
        let env = match Envelope::from_slice(&m.payload) {
            Ok(e) => e,
            Err(e) => {
                self.inbound
                    .refused("malformed", "mqtt", "-", "-", &topic.to_string());
                tracing::debug!(topic = %topic, error = %e, "not an envelope");
                return;
            }
        };
        if !topic.may_publish(&env.sender_id) {
            self.inbound.refused(
                "wrong_topic",
                "mqtt",
                env.message_type.as_str(),
                &env.sender_id,
                &topic.to_string(),
            );
            tracing::warn!(topic = %topic, sender = %env.sender_id, "sender does not own the topic; dropped");
            return;
        }
        match &topic {
            Topic::Discovery { lc_id, .. } => {
                let lc = lc_id.clone();
                let inbound = self.inbound.clone();
                let r =
                    tokio::task::spawn_blocking(move || inbound.handle(env, None, "mqtt")).await;
                match r {
                    Ok(Ok(Reply::Envelope(ack))) => {
                        if let Err(e) = self.outbound.publish(&ack, &Topic::Reply(lc)).await {
                            tracing::debug!(error = %e, "acknowledgement not published; the LC will resend");
                        }
                    }
                    Ok(Ok(Reply::Accepted)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(lc = %lc_id, error = %e, "discovery report refused");
                    }
                    Err(e) => tracing::error!(error = %e, "report task failed"),
                }
            }
            Topic::Reply(id) if *id == self.trust.me => {
                let inbound = self.inbound.clone();
                let r =
                    tokio::task::spawn_blocking(move || inbound.handle(env, None, "mqtt")).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "reply refused");
                }
            }
            Topic::PolicyGlobal | Topic::PolicyRegion(_) => {
                if self.trust.role == Role::Global {
                    return; // our own retained copy
                }
                self.apply_policy(env, "mqtt").await;
            }
            Topic::Status(id) => {
                if *id == self.trust.me {
                    return;
                }
                let Some(children) = &self.children else {
                    return;
                };
                let c = children.clone();
                let kind = env.message_type.as_str();
                let r = tokio::task::spawn_blocking(move || c.on_status(&env)).await;
                match r {
                    Ok(Ok(StatusOutcome::Recorded)) => {
                        self.inbound
                            .stats
                            .accepted
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.inbound.metrics().message(kind, "mqtt", "accepted");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        self.inbound
                            .refused("bad_signature", "mqtt", "STATUS", id, &e.to_string());
                        tracing::warn!(child = %id, error = %e, "status message does not verify");
                    }
                    Err(e) => tracing::error!(error = %e, "status task failed"),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::embedded_url;
    use crate::transport::mqtt::BrokerUrl;

    #[test]
    fn the_gc_reaches_its_embedded_broker_where_it_listens() {
        let url = |a: &str, tls| embedded_url(a.parse().expect("address"), tls);
        assert_eq!(url("0.0.0.0:1883", false), "mqtt://127.0.0.1:1883");
        assert_eq!(url("[::]:8883", true), "mqtts://127.0.0.1:8883");
        // A broker bound to one address is not on loopback.
        assert_eq!(url("10.0.0.5:1883", false), "mqtt://10.0.0.5:1883");
        assert_eq!(url("127.0.0.5:1883", false), "mqtt://127.0.0.5:1883");
        assert_eq!(url("[fd00::5]:8883", true), "mqtts://[fd00::5]:8883");
        let v6 = BrokerUrl::parse(&url("[fd00::5]:8883", true)).expect("parses");
        assert_eq!((v6.host.as_str(), v6.port, v6.tls), ("fd00::5", 8883, true));
    }
}
