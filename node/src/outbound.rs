//! One way to send a message: to a recipient running in this process over the in-process
//! bus ([`crate::transport::bus`]); else over MQTT when the node is connected and the message
//! is pub/sub by nature (it has a topic); else straight to the recipient's gRPC address. The
//! path taken is logged and counted.
//!
//! Nothing here buffers: callers that must not lose a message keep it in the NIB outbox
//! until it is acknowledged, and retry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pdsno_shared::envelope::Envelope;
use pdsno_shared::json::{Map, Value};
use pdsno_shared::topics::Topic;

use crate::transport::mqtt::MqttClient;
use crate::transport::parent::{LinkError, ParentLink};

/// How long a QoS 1 publish may wait for the broker's PUBACK before we try another path.
const PUBACK_WAIT: Duration = Duration::from_secs(10);

/// The path a message took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Published on the broker.
    Mqtt,
    /// Sent to the peer's gRPC endpoint.
    Grpc,
    /// Handed to the peer's receive path in this process.
    Bus,
}

impl Path {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Mqtt => "mqtt",
            Path::Grpc => "grpc",
            Path::Bus => "bus",
        }
    }
}

/// A message sent.
#[derive(Debug)]
pub struct Sent {
    /// How.
    pub path: Path,
    /// The peer's direct answer (gRPC and bus; over MQTT answers arrive on our reply topic).
    pub reply: Option<Envelope>,
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Not connected to the broker and no address for the recipient.
    #[error("no route to {0}: broker not connected and no gRPC address")]
    NoRoute(String),
    /// The recipient refused it or could not be reached.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Counters per path.
#[derive(Debug, Default)]
pub struct PathStats {
    /// Published on the broker.
    pub mqtt: AtomicU64,
    /// Sent over gRPC.
    pub grpc: AtomicU64,
    /// Handed over the in-process bus.
    pub bus: AtomicU64,
    /// Publishes that failed and went another way.
    pub mqtt_fallbacks: AtomicU64,
    /// Not sent at all.
    pub failed: AtomicU64,
}

impl PathStats {
    /// As JSON.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        let r = |a: &AtomicU64| Value::from(a.load(Ordering::Relaxed));
        m.insert("mqtt".into(), r(&self.mqtt));
        m.insert("grpc".into(), r(&self.grpc));
        m.insert("bus".into(), r(&self.bus));
        m.insert("mqtt_fallbacks".into(), r(&self.mqtt_fallbacks));
        m.insert("failed".into(), r(&self.failed));
        Value::Object(m)
    }
}

/// The node's sending side.
#[derive(Debug, Default)]
pub struct Outbound {
    mqtt: OnceLock<MqttClient>,
    links: Mutex<HashMap<String, ParentLink>>,
    /// Counters.
    pub stats: PathStats,
}

impl Outbound {
    /// Nothing connected yet.
    pub fn new() -> Self {
        Outbound::default()
    }

    /// Attaches the MQTT client (once).
    pub fn set_mqtt(&self, client: MqttClient) {
        let _ = self.mqtt.set(client);
    }

    /// The MQTT client, once attached.
    pub fn mqtt(&self) -> Option<&MqttClient> {
        self.mqtt.get()
    }

    /// True while the broker connection is up.
    pub fn mqtt_connected(&self) -> bool {
        self.mqtt.get().is_some_and(MqttClient::is_connected)
    }

    /// Registers the gRPC link of a peer.
    pub fn add_peer(&self, id: &str, link: ParentLink) {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), link);
    }

    fn link(&self, id: &str) -> Option<ParentLink> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Publishes `env` on `topic` (its QoS and retain flag) and waits for the broker to
    /// take it.
    ///
    /// # Errors
    /// A message when not connected or the broker did not confirm in time.
    pub async fn publish(&self, env: &Envelope, topic: &Topic) -> Result<(), String> {
        let client = self.mqtt.get().ok_or("no MQTT client")?;
        if !client.is_connected() {
            return Err("not connected to the broker".into());
        }
        let d = topic.delivery();
        let done = client
            .publish(topic.to_string(), env.to_json_bytes(), d.qos, d.retain)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(PUBACK_WAIT, done).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) => Err("MQTT client stopped".into()),
            Err(_) => Err(format!("no PUBACK within {PUBACK_WAIT:?}")),
        }
    }

    /// Sends `env`: over the bus to a recipient in this process; else published on `topic`
    /// when one is given and the broker is connected; else to the recipient's gRPC address.
    ///
    /// # Errors
    /// [`SendError`] when neither path works.
    pub async fn send(&self, env: &Envelope, topic: Option<&Topic>) -> Result<Sent, SendError> {
        let link = self.link(&env.recipient_id);
        if let Some(l) = link.as_ref().filter(|l| l.is_local()) {
            return self.direct(l, env, Path::Bus).await;
        }
        if let Some(t) = topic
            && self.mqtt_connected()
        {
            match self.publish(env, t).await {
                Ok(()) => {
                    self.stats.mqtt.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(path = "mqtt", topic = %t, message_type = %env.message_type, "sent");
                    return Ok(Sent {
                        path: Path::Mqtt,
                        reply: None,
                    });
                }
                Err(e) => {
                    self.stats.mqtt_fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(topic = %t, error = %e, "publish failed; trying gRPC");
                }
            }
        }
        let Some(link) = link else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return Err(SendError::NoRoute(env.recipient_id.clone()));
        };
        self.direct(&link, env, Path::Grpc).await
    }

    /// Sends `env` over `link` (the bus or gRPC, as `path` says) and counts it.
    async fn direct(
        &self,
        link: &ParentLink,
        env: &Envelope,
        path: Path,
    ) -> Result<Sent, SendError> {
        match link.exchange(env).await {
            Ok(reply) => {
                let counter = match path {
                    Path::Bus => &self.stats.bus,
                    _ => &self.stats.grpc,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path = path.as_str(), recipient = %env.recipient_id, message_type = %env.message_type, "sent");
                Ok(Sent { path, reply })
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Err(SendError::Link(e))
            }
        }
    }
}
