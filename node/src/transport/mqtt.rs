//! The node's MQTT client: a supervisor around rumqttc that survives the network.
//!
//! rumqttc reconnects only while polled, with no backoff, no resubscription, and (with a
//! clean session) silently drops every unacknowledged publish on reconnect. This
//! supervisor owns the rumqttc event loop in one task and adds:
//! - reconnection with exponential backoff and full jitter;
//! - resubscription of every filter at its own QoS after every CONNACK;
//! - an outbox: QoS 1/2 publishes are kept until the broker acknowledges them and re-sent
//!   after a reconnect (at-least-once; receivers drop duplicates by nonce). While offline
//!   the outbox is bounded; a publish that does not fit is refused with an error and
//!   counted, never dropped silently;
//! - routing of incoming messages to subscribers by filter (`+`/`#`), each through a
//!   bounded queue (a full queue drops the message and counts it: a slow handler cannot
//!   stall keep-alives);
//! - a last will, credentials, `mqtt://` and `mqtts://` URLs.
//!
//! rumqttc reports written publishes in order (`Outgoing::Publish(pkid)`) and acks by
//! packet id; the supervisor pairs them FIFO, which is exact because it never lets
//! rumqttc keep requests across a connection (its pending queue and state are reset after
//! every error, and our outbox re-sends instead).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pdsno_shared::keys::SecretString;
use pdsno_shared::topics;
use rand::RngExt;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, MqttState, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// A broker address: `mqtt://host:port` or `mqtts://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS or not.
    pub tls: bool,
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]`, `mqtts://host[:port]`, `tcp://...`, `ssl://...` or a
    /// bare `host:port` (plain). IPv6 hosts go in brackets.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("ssl://"))
        {
            (true, r)
        } else if let Some(r) = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
        {
            (false, r)
        } else if s.contains("://") {
            return Err(format!(
                "unsupported broker URL scheme in {s:?} (use mqtt:// or mqtts://)"
            ));
        } else {
            (false, s)
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in {s:?}"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port in {s:?}"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("unexpected text after the host in {s:?}")),
            };
            (h.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("bad port in {s:?}"))?,
                ),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("no host in broker URL {s:?}"));
        }
        Ok(BrokerUrl { tls, host, port })
    }
}

impl BrokerUrl {
    /// Parses a comma-separated list of broker URLs (the members of a broker cluster, tried
    /// in turn): at least one.
    ///
    /// # Errors
    /// An empty list, or the first URL that does not parse.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        let urls = s
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(BrokerUrl::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(format!("no broker URL in {s:?}"));
        }
        Ok(urls)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A last will message.
#[derive(Clone, Debug)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0..=2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

/// Client settings.
#[derive(Clone)]
pub struct MqttSettings {
    /// The broker.
    pub url: BrokerUrl,
    /// Other members of the same broker cluster: after a failed or lost connection the
    /// client moves on to the next one (then back to `url`), keeping its subscriptions and
    /// its queue of unconfirmed messages.
    pub alternates: Vec<BrokerUrl>,
    /// MQTT client id.
    pub client_id: String,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<SecretString>,
    /// Keep alive.
    pub keep_alive: Duration,
    /// Last will.
    pub will: Option<Will>,
    /// CA certificates (PEM) for `mqtts://`; without it the system roots are used.
    pub ca_file: Option<PathBuf>,
    /// Largest packet sent or received (rumqttc's default is only 10 KiB).
    pub max_packet_size: usize,
    /// Most unacknowledged QoS 1/2 publishes on the wire.
    pub max_inflight: u16,
    /// Most publishes held while offline or waiting for room on the wire.
    pub outbox_limit: usize,
    /// Queue length of each subscription's handler.
    pub handler_queue: usize,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSettings")
            .field("url", &self.url.to_string())
            .field(
                "alternates",
                &self
                    .alternates
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("keep_alive", &self.keep_alive)
            .field("outbox_limit", &self.outbox_limit)
            .finish_non_exhaustive()
    }
}

impl MqttSettings {
    /// Defaults for a client of `url` named `client_id`.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>) -> Self {
        MqttSettings {
            url,
            alternates: Vec::new(),
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            will: None,
            ca_file: None,
            max_packet_size: 1024 * 1024,
            max_inflight: 100,
            outbox_limit: 10_000,
            handler_queue: 4096,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One incoming message.
#[derive(Clone, Debug)]
pub struct Message {
    /// Topic it was published on.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was delivered at.
    pub qos: u8,
    /// Retain flag (a retained message delivered on subscription).
    pub retain: bool,
}

/// Why a publish was refused or not delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The outbox is full (offline for long, or the broker is slow).
    #[error("MQTT outbox full ({0} messages): publish refused")]
    OutboxFull(usize),
    /// QoS 0 while disconnected: nothing would carry it.
    #[error("not connected: QoS 0 message dropped")]
    NotConnected,
    /// The connection dropped with this QoS 0 message unsent or unconfirmed.
    #[error("connection lost before the message was sent")]
    Lost,
    /// The topic is not a valid topic name.
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    /// The client is shut down.
    #[error("MQTT client stopped")]
    Stopped,
}

/// Connection state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting or waiting to reconnect.
    Disconnected {
        /// The last error, if any.
        last_error: Option<String>,
    },
    /// Connected (after CONNACK and resubscription requests).
    Connected,
    /// Stopped.
    Stopped,
}

/// Counters of one client.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Successful connections (CONNACK accepted).
    pub connects: AtomicU64,
    /// Connection attempts or connections that failed.
    pub connection_errors: AtomicU64,
    /// Publishes accepted into the outbox.
    pub published: AtomicU64,
    /// QoS 1/2 publishes acknowledged by the broker.
    pub acked: AtomicU64,
    /// QoS 1/2 publishes re-sent after a reconnect.
    pub resent: AtomicU64,
    /// Publishes refused because the outbox was full.
    pub outbox_overflow: AtomicU64,
    /// QoS 0 publishes dropped (offline, or lost with a connection).
    pub dropped_qos0: AtomicU64,
    /// Messages received.
    pub received: AtomicU64,
    /// Messages dropped because a subscriber's queue was full.
    pub handler_drops: AtomicU64,
}

/// A copy of [`ClientStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStatsSnapshot {
    /// See [`ClientStats::connects`].
    pub connects: u64,
    /// See [`ClientStats::connection_errors`].
    pub connection_errors: u64,
    /// See [`ClientStats::published`].
    pub published: u64,
    /// See [`ClientStats::acked`].
    pub acked: u64,
    /// See [`ClientStats::resent`].
    pub resent: u64,
    /// See [`ClientStats::outbox_overflow`].
    pub outbox_overflow: u64,
    /// See [`ClientStats::dropped_qos0`].
    pub dropped_qos0: u64,
    /// See [`ClientStats::received`].
    pub received: u64,
    /// See [`ClientStats::handler_drops`].
    pub handler_drops: u64,
}

impl ClientStats {
    fn snapshot(&self) -> ClientStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStatsSnapshot {
            connects: g(&self.connects),
            connection_errors: g(&self.connection_errors),
            published: g(&self.published),
            acked: g(&self.acked),
            resent: g(&self.resent),
            outbox_overflow: g(&self.outbox_overflow),
            dropped_qos0: g(&self.dropped_qos0),
            received: g(&self.received),
            handler_drops: g(&self.handler_drops),
        }
    }
}

/// Resolves when a publish is confirmed: QoS 0 when written to the socket, QoS 1 on
/// PUBACK, QoS 2 on PUBCOMP.
pub type Delivery = oneshot::Receiver<Result<(), PublishError>>;

enum Cmd {
    Publish {
        msg: OutMsg,
        accepted: oneshot::Sender<Result<(), PublishError>>,
    },
    Subscribe {
        filter: String,
        qos: u8,
        tx: mpsc::Sender<Message>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

struct OutMsg {
    seq: u64,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    done: Option<oneshot::Sender<Result<(), PublishError>>>,
}

impl OutMsg {
    fn finish(mut self, r: Result<(), PublishError>) {
        if let Some(d) = self.done.take() {
            let _ = d.send(r);
        }
    }
}

struct Sub {
    filter: String,
    qos: u8,
    tx: mpsc::Sender<Message>,
}

/// A cloneable handle to the client.
#[derive(Clone)]
pub struct MqttClient {
    cmd: mpsc::Sender<Cmd>,
    state: watch::Receiver<LinkState>,
    stats: Arc<ClientStats>,
    client_id: Arc<str>,
    broker: Arc<std::sync::Mutex<BrokerUrl>>,
}

impl fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttClient")
            .field("client_id", &self.client_id)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    crate::tls::client_config_for(
        crate::tls::installed_client().map(|m| &**m),
        ca_file.map(PathBuf::as_path),
    )
    .map_err(|e| e.to_string())
}

/// rumqttc options for `url` with the rest of `settings`.
fn options(settings: &MqttSettings, url: &BrokerUrl) -> Result<MqttOptions, String> {
    let mut opts = MqttOptions::new(settings.client_id.clone(), url.host.clone(), url.port);
    opts.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
    opts.set_clean_session(true);
    opts.set_max_packet_size(settings.max_packet_size, settings.max_packet_size);
    opts.set_inflight(settings.max_inflight.max(1));
    if let Some(u) = &settings.username {
        let p = settings
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        opts.set_credentials(u.clone(), p);
    }
    if let Some(w) = &settings.will {
        opts.set_last_will(LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            qos_of(w.qos),
            w.retain,
        ));
    }
    if url.tls {
        let cfg = tls_config(settings.ca_file.as_ref())?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(cfg),
        )));
    }
    Ok(opts)
}

impl MqttClient {
    /// Starts the supervisor; it connects in the background.
    ///
    /// # Errors
    /// Invalid settings (TLS files, ids).
    pub fn start(settings: MqttSettings) -> Result<(MqttClient, JoinHandle<()>), String> {
        if settings.client_id.is_empty() {
            return Err("MQTT client id must not be empty".into());
        }
        let opts = options(&settings, &settings.url)?;
        // Alternates are checked now, so a bad one is an error here, not at failover.
        for u in &settings.alternates {
            options(&settings, u)?;
        }
        // Room for every inflight publish plus resubscriptions; the supervisor never hands
        // more than that.
        let cap = usize::from(settings.max_inflight) + 1024;
        let (client, eventloop) = AsyncClient::new(opts, cap);
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (state_tx, state_rx) = watch::channel(LinkState::Disconnected { last_error: None });
        let stats = Arc::new(ClientStats::default());
        let broker = Arc::new(std::sync::Mutex::new(settings.url.clone()));
        let sup = Supervisor {
            client,
            settings: settings.clone(),
            stats: stats.clone(),
            state: state_tx,
            subs: Vec::new(),
            outbox: VecDeque::new(),
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            connected: false,
            next_seq: 0,
            failures: 0,
            broker: 0,
            current: broker.clone(),
        };
        let task = tokio::spawn(sup.run(eventloop, cmd_rx));
        Ok((
            MqttClient {
                cmd: cmd_tx,
                state: state_rx,
                stats,
                client_id: settings.client_id.into(),
                broker,
            },
            task,
        ))
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Queues a publish. Returns once the outbox accepted it; the [`Delivery`] resolves
    /// when the broker confirmed it (drop it if you do not care).
    ///
    /// # Errors
    /// [`PublishError::OutboxFull`] when offline too long, [`PublishError::NotConnected`]
    /// for QoS 0 while offline, [`PublishError::InvalidTopic`], [`PublishError::Stopped`].
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: u8,
        retain: bool,
    ) -> Result<Delivery, PublishError> {
        let topic = topic.into();
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(PublishError::InvalidTopic(topic));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let (acc_tx, acc_rx) = oneshot::channel();
        let msg = OutMsg {
            seq: 0,
            topic,
            payload: payload.into(),
            qos: qos.min(2),
            retain,
            done: Some(done_tx),
        };
        self.cmd
            .send(Cmd::Publish {
                msg,
                accepted: acc_tx,
            })
            .await
            .map_err(|_| PublishError::Stopped)?;
        acc_rx.await.map_err(|_| PublishError::Stopped)??;
        Ok(done_rx)
    }

    /// Publishes and waits for the broker's confirmation.
    ///
    /// # Errors
    /// As [`MqttClient::publish`], plus [`PublishError::Lost`] for QoS 0.
    pub async fn publish_confirmed(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: u8,
        retain: bool,
    ) -> Result<(), PublishError> {
        let d = self.publish(topic, payload, qos, retain).await?;
        d.await.map_err(|_| PublishError::Stopped)?
    }

    /// Subscribes to `filter` at `qos` (kept across reconnects). Messages arrive on the
    /// returned receiver.
    ///
    /// # Errors
    /// An invalid filter, or the client is stopped.
    pub async fn subscribe(
        &self,
        filter: impl Into<String>,
        qos: u8,
    ) -> Result<mpsc::Receiver<Message>, PublishError> {
        let filter = filter.into();
        if !topics::is_valid_filter(&filter) {
            return Err(PublishError::InvalidTopic(filter));
        }
        let (tx, rx) = mpsc::channel(1024);
        self.cmd
            .send(Cmd::Subscribe {
                filter,
                qos: qos.min(2),
                tx,
            })
            .await
            .map_err(|_| PublishError::Stopped)?;
        Ok(rx)
    }

    /// The connection state, as a watch channel.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        *self.state.borrow() == LinkState::Connected
    }

    /// Waits until connected, at most `limit`.
    ///
    /// # Errors
    /// The last connection error when the time is up.
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), String> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(limit, rx.wait_for(|s| *s == LinkState::Connected)).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(match &*self.state.borrow() {
                LinkState::Disconnected {
                    last_error: Some(e),
                } => e.clone(),
                LinkState::Stopped => "client stopped".into(),
                _ => format!("not connected after {limit:?}"),
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ClientStatsSnapshot {
        self.stats.snapshot()
    }

    /// The broker the client uses (or tries) now: the first URL, or the member of the
    /// cluster it failed over to.
    pub fn broker(&self) -> BrokerUrl {
        self.broker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Disconnects cleanly (no last will) and stops the supervisor.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Shutdown { done: tx }).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

struct Supervisor {
    client: AsyncClient,
    settings: MqttSettings,
    stats: Arc<ClientStats>,
    state: watch::Sender<LinkState>,
    subs: Vec<Sub>,
    /// Waiting to be handed to rumqttc, in publish order.
    outbox: VecDeque<OutMsg>,
    /// Handed to rumqttc, not yet written (awaiting `Outgoing::Publish`).
    handed: VecDeque<OutMsg>,
    /// Written with QoS 1/2, awaiting the broker's acknowledgement.
    inflight: HashMap<u16, OutMsg>,
    connected: bool,
    next_seq: u64,
    failures: u32,
    /// Which broker the event loop is pointed at: 0 = `settings.url`, i = `alternates[i-1]`.
    broker: usize,
    /// The same, for [`MqttClient::broker`].
    current: Arc<std::sync::Mutex<BrokerUrl>>,
}

enum Step {
    Event(Result<Event, rumqttc::ConnectionError>),
    Stop(Option<oneshot::Sender<()>>),
}

impl Supervisor {
    async fn run(mut self, mut eventloop: EventLoop, mut cmds: mpsc::Receiver<Cmd>) {
        let mut backoff_until: Option<tokio::time::Instant> = None;
        loop {
            // Wait out a backoff while still serving commands.
            if let Some(until) = backoff_until.take() {
                let sleep = tokio::time::sleep_until(until);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = cmds.recv() => {
                            if let Some(stop) = self.command(cmd) {
                                self.stop(&mut eventloop, stop).await;
                                return;
                            }
                        }
                    }
                }
            }
            // Poll without ever cancelling the poll future (rumqttc's poll is not cancel
            // safe): commands are served alongside it.
            let step = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        ev = &mut poll => break Step::Event(ev),
                        cmd = cmds.recv() => {
                            if let Some(stop) = self.command(cmd) {
                                break Step::Stop(stop);
                            }
                        }
                    }
                }
            };
            match step {
                Step::Stop(done) => {
                    self.stop(&mut eventloop, done).await;
                    return;
                }
                Step::Event(Ok(ev)) => self.event(ev),
                Step::Event(Err(e)) => {
                    self.connection_lost(&mut eventloop, e.to_string());
                    backoff_until = Some(tokio::time::Instant::now() + self.backoff());
                }
            }
            self.pump();
        }
    }

    /// Handles a command; `Some` means stop (with the caller to notify, if any).
    fn command(&mut self, cmd: Option<Cmd>) -> Option<Option<oneshot::Sender<()>>> {
        match cmd {
            None => return Some(None),
            Some(Cmd::Shutdown { done }) => return Some(Some(done)),
            Some(Cmd::Publish { mut msg, accepted }) => {
                if msg.qos == 0 && !self.connected {
                    self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                    let _ = accepted.send(Err(PublishError::NotConnected));
                    return None;
                }
                if self.outbox.len() >= self.settings.outbox_limit {
                    let n = self.stats.outbox_overflow.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(client_id = %self.settings.client_id, refused = n, limit = self.settings.outbox_limit, "MQTT outbox full: refusing publishes");
                    }
                    let _ =
                        accepted.send(Err(PublishError::OutboxFull(self.settings.outbox_limit)));
                    return None;
                }
                msg.seq = self.next_seq;
                self.next_seq += 1;
                self.outbox.push_back(msg);
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                let _ = accepted.send(Ok(()));
            }
            Some(Cmd::Subscribe { filter, qos, tx }) => {
                if self.connected {
                    let _ = self.client.try_subscribe(filter.clone(), qos_of(qos));
                }
                self.subs.push(Sub { filter, qos, tx });
            }
        }
        self.pump();
        None
    }

    /// Hands queued publishes to rumqttc while connected and there is room on the wire.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        let room = usize::from(self.settings.max_inflight);
        while self.handed.len() + self.inflight.len() < room {
            let Some(msg) = self.outbox.pop_front() else {
                break;
            };
            match self.client.try_publish(
                msg.topic.clone(),
                qos_of(msg.qos),
                msg.retain,
                msg.payload.clone(),
            ) {
                Ok(()) => self.handed.push_back(msg),
                Err(_) => {
                    // Cannot happen with the channel sized above; keep the message.
                    self.outbox.push_front(msg);
                    break;
                }
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != ConnectReturnCode::Success {
                    // rumqttc turns refusals into errors; nothing else to do here.
                    return;
                }
                self.connected = true;
                self.failures = 0;
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                for s in &self.subs {
                    let _ = self.client.try_subscribe(s.filter.clone(), qos_of(s.qos));
                }
                self.subs.retain(|s| !s.tx.is_closed());
                tracing::info!(client_id = %self.settings.client_id, url = %self.current_url(), subscriptions = self.subs.len(), queued = self.outbox.len(), "MQTT connected");
                let _ = self.state.send(LinkState::Connected);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(msg) = self.handed.pop_front() else {
                    return;
                };
                if msg.qos == 0 {
                    msg.finish(Ok(()));
                } else if let Some(old) = self.inflight.insert(pkid, msg) {
                    // A packet id reused before its ack: only possible if the broker acked out
                    // of order. Re-queue the older message rather than lose it.
                    self.outbox.push_front(old);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => self.acked(ack.pkid),
            Event::Incoming(Packet::PubComp(c)) => self.acked(c.pkid),
            Event::Incoming(Packet::Publish(p)) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                let msg = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos as u8,
                    retain: p.retain,
                };
                let mut closed = false;
                for s in &self.subs {
                    if topics::filter_matches(&s.filter, &p.topic) {
                        match s.tx.try_send(msg.clone()) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.stats.handler_drops.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                        }
                    }
                }
                if closed {
                    self.subs.retain(|s| !s.tx.is_closed());
                }
            }
            _ => {}
        }
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(msg) = self.inflight.remove(&pkid) {
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
            msg.finish(Ok(()));
        }
    }

    /// After any connection error: reset rumqttc's per-connection state and put every
    /// unconfirmed QoS 1/2 message back at the head of the outbox, in publish order.
    fn connection_lost(&mut self, eventloop: &mut EventLoop, error: String) {
        let was_connected = self.connected;
        self.connected = false;
        self.failures = self.failures.saturating_add(1);
        self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
        eventloop.pending.clear();
        eventloop.state = MqttState::new(self.settings.max_inflight.max(1), false);
        let mut unconfirmed: Vec<OutMsg> = self
            .inflight
            .drain()
            .map(|(_, m)| m)
            .chain(self.handed.drain(..))
            .collect();
        unconfirmed.sort_by_key(|m| m.seq);
        for m in unconfirmed.into_iter().rev() {
            if m.qos == 0 {
                self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                m.finish(Err(PublishError::Lost));
            } else {
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
                self.outbox.push_front(m);
            }
        }
        if was_connected {
            tracing::warn!(client_id = %self.settings.client_id, url = %self.current_url(), %error, queued = self.outbox.len(), "MQTT connection lost");
        } else {
            tracing::debug!(client_id = %self.settings.client_id, url = %self.current_url(), %error, attempt = self.failures, "MQTT connect failed");
        }
        let _ = self.state.send(LinkState::Disconnected {
            last_error: Some(error),
        });
        self.next_broker(eventloop);
    }

    /// The broker the event loop is pointed at.
    fn current_url(&self) -> &BrokerUrl {
        match self.broker {
            0 => &self.settings.url,
            i => self
                .settings
                .alternates
                .get(i - 1)
                .unwrap_or(&self.settings.url),
        }
    }

    /// After a failed or lost connection: point the event loop at the next broker of the
    /// cluster (subscriptions and the outbox are the supervisor's, so they carry over).
    fn next_broker(&mut self, eventloop: &mut EventLoop) {
        let n = self.settings.alternates.len() + 1;
        if n < 2 {
            return;
        }
        let next = (self.broker + 1) % n;
        let url = match next {
            0 => self.settings.url.clone(),
            i => self.settings.alternates[i - 1].clone(),
        };
        match options(&self.settings, &url) {
            Ok(opts) => {
                eventloop.mqtt_options = opts;
                eventloop.network = None;
                self.broker = next;
                *self
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = url.clone();
                tracing::info!(client_id = %self.settings.client_id, url = %url, "trying the next broker");
            }
            Err(e) => tracing::warn!(url = %url, error = %e, "cannot use the next broker"),
        }
    }

    /// Exponential backoff with full jitter.
    fn backoff(&self) -> Duration {
        let min = self.settings.backoff_min.as_millis().max(1) as u64;
        let max = self.settings.backoff_max.as_millis().max(1) as u64;
        let exp = min
            .saturating_mul(1u64 << self.failures.saturating_sub(1).min(20))
            .min(max);
        let lo = exp / 2;
        Duration::from_millis(rand::rng().random_range(lo..=exp))
    }

    async fn stop(&mut self, eventloop: &mut EventLoop, done: Option<oneshot::Sender<()>>) {
        if self.connected {
            let _ = self.client.try_disconnect();
            // Let the event loop write the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(ev) => self.event(ev),
                    }
                }
            })
            .await;
        }
        for m in self
            .outbox
            .drain(..)
            .chain(self.handed.drain(..))
            .chain(self.inflight.drain().map(|(_, m)| m))
        {
            m.finish(Err(PublishError::Stopped));
        }
        self.connected = false;
        let _ = self.state.send(LinkState::Stopped);
        if let Some(d) = done {
            let _ = d.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1883").expect("url");
        assert_eq!(
            u,
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example")
                .expect("url")
                .port,
            8883
        );
        assert_eq!(BrokerUrl::parse("localhost:1999").expect("url").port, 1999);
        let v6 = BrokerUrl::parse("mqtt://[::1]:1884").expect("url");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1884));
        assert_eq!(v6.to_string(), "mqtt://[::1]:1884");
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("mqtt://:1883").is_err());
        assert!(BrokerUrl::parse("mqtt://host:notaport").is_err());
    }

    #[test]
    fn url_lists_name_a_cluster() {
        let l =
            BrokerUrl::parse_list("mqtts://a:8883, mqtts://b ,mqtts://[::1]:9000").expect("list");
        let shown: Vec<String> = l.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["mqtts://a:8883", "mqtts://b:8883", "mqtts://[::1]:9000"]
        );
        assert_eq!(BrokerUrl::parse_list("mqtt://one").expect("one").len(), 1);
        assert!(BrokerUrl::parse_list("").is_err());
        assert!(BrokerUrl::parse_list(" , ").is_err());
        let e = BrokerUrl::parse_list("mqtt://a,http://b").expect_err("bad member");
        assert!(e.contains("http://b"), "{e}");
    }

    #[test]
    fn settings_debug_hides_password() {
        let mut s = MqttSettings::new(BrokerUrl::parse("mqtt://h").expect("url"), "c");
        s.password = Some(SecretString::new("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
