//! `pdsno-broker`: the MQTT broker embedded in the global controller, so an edge site needs
//! no Mosquitto.
//!
//! rumqttd does the routing (subscriptions, retained messages, last wills, QoS flows). In
//! front of it sits a front door of ours that owns the public sockets:
//! - binds them itself, so port 0 works, the bound address is known, and a busy port is an
//!   error returned to the caller (rumqttd only logs it);
//! - terminates TLS with rustls, with the handshake under a timeout in the connection's own
//!   task (rumqttd runs handshakes inline in its accept loop);
//! - authenticates CONNECT (operator accounts with Argon2id hashes, the caller's credential
//!   check, anonymous access only when switched on) and answers refusals with the proper
//!   CONNACK code;
//! - enforces the caller's topic rights ([`TopicRules`]) on every PUBLISH, SUBSCRIBE and
//!   will (rumqttd has no per-topic ACL);
//! - frames and validates every client packet (see [`codec`]), closing connections that
//!   break the protocol before rumqttd sees a byte of the offending packet;
//! - refuses retained messages where the caller's rules forbid them, and holds every
//!   account to a budget of retained topics and bytes (rumqttd keeps retained messages in
//!   memory for ever);
//! - caps connections (in total and per source address), packet sizes, topic depth and
//!   per-packet counts;
//! - hands the sessions of one client id to rumqttd one at a time: a newer connection
//!   ends the older session itself and waits until rumqttd has closed it (rumqttd's own
//!   take-over races with the old session's clean-up).
//!
//! rumqttd itself listens only on loopback ports and accepts only the front door's random
//! internal credential.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pdsno_broker::BrokerError> {
//! use pdsno_broker::{BrokerConfig, EmbeddedBroker};
//! let mut cfg = BrokerConfig::plain("127.0.0.1:0".parse().unwrap(), None);
//! cfg.allow_anonymous = true;
//! let broker = EmbeddedBroker::start(cfg, None).await?;
//! println!("MQTT on {:?}", broker.listeners());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod codec;
pub mod config;
mod filters;
mod inner;
mod proxy;
mod retained;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pdsno_shared::slots::{AddressSlots, SlotRefusal};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

pub use auth::{
    Access, CredentialCheck, CredentialRequest, ExemptAddresses, Principal, ReservedIds,
    TopicRules, client_id_acceptable,
};
pub use codec::Version;
pub use config::{
    AccountError, BrokerConfig, BrokerLimits, ListenerConfig, OperatorAccount, TlsFiles,
};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No listener configured.
    #[error("the broker needs at least one listener")]
    NoListener,
    /// A listener address could not be bound (in use, no permission, ...).
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A TLS certificate or key could not be loaded.
    #[error("TLS setup for listener {name}: {reason}")]
    Tls {
        /// Listener name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The embedded rumqttd did not come up.
    #[error("{0}")]
    Internal(String),
}

/// Counters of the front door.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted at TCP level.
    pub accepted: AtomicU64,
    /// Connections that passed CONNECT and were handed to the router.
    pub connected: AtomicU64,
    /// Connections currently handed to the router.
    pub active: AtomicU64,
    /// Refused at CONNECT for credentials, client id or anonymity.
    pub refused_auth: AtomicU64,
    /// Refused before or at CONNECT for protocol reasons (not CONNECT, bad version, timeout).
    pub refused_protocol: AtomicU64,
    /// Refused because `max_connections` were open.
    pub refused_busy: AtomicU64,
    /// Closed after CONNECT for a protocol violation or a stalled packet.
    pub violations: AtomicU64,
    /// Client packets forwarded.
    pub packets_in: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: AtomicU64,
    /// Connections refused or closed for a topic outside the client's rights (a PUBLISH,
    /// a SUBSCRIBE, or the will of a CONNECT).
    pub denied: AtomicU64,
    /// CONNECTs refused without a password check: their address is locked out of that
    /// operator account after repeated wrong passwords.
    pub banned: AtomicU64,
    /// Times a controller connection was paused for publishing above its rate.
    pub throttled: AtomicU64,
    /// Connections closed at once because their source address held its share of the
    /// connection slots.
    pub refused_per_address: AtomicU64,
    /// CONNECTs refused for asking for a client id reserved for another account (a
    /// controller's).
    pub refused_client_id: AtomicU64,
    /// Connections closed (or CONNECTs refused) for a retained message on a topic where
    /// nothing may be retained.
    pub retain_forbidden: AtomicU64,
    /// Connections closed (or CONNECTs refused) for a retained message above the
    /// account's retained-message budget.
    pub retained_quota: AtomicU64,
    /// Connections closed for a SUBSCRIBE that would take the account over its number of
    /// new filters ([`BrokerLimits::max_filters_per_client`]).
    pub filter_quota: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::accepted`].
    pub accepted: u64,
    /// See [`Stats::connected`].
    pub connected: u64,
    /// See [`Stats::active`].
    pub active: u64,
    /// See [`Stats::refused_auth`].
    pub refused_auth: u64,
    /// See [`Stats::refused_protocol`].
    pub refused_protocol: u64,
    /// See [`Stats::refused_busy`].
    pub refused_busy: u64,
    /// See [`Stats::violations`].
    pub violations: u64,
    /// See [`Stats::packets_in`].
    pub packets_in: u64,
    /// See [`Stats::tls_failures`].
    pub tls_failures: u64,
    /// See [`Stats::denied`].
    pub denied: u64,
    /// See [`Stats::banned`].
    pub banned: u64,
    /// See [`Stats::throttled`].
    pub throttled: u64,
    /// See [`Stats::refused_per_address`].
    pub refused_per_address: u64,
    /// See [`Stats::refused_client_id`].
    pub refused_client_id: u64,
    /// See [`Stats::retain_forbidden`].
    pub retain_forbidden: u64,
    /// See [`Stats::retained_quota`].
    pub retained_quota: u64,
    /// See [`Stats::filter_quota`].
    pub filter_quota: u64,
    /// Distinct subscription filters the broker holds a log for.
    pub filters: u64,
    /// Retained messages held (as recorded by the front door).
    pub retained_messages: u64,
    /// Bytes (topics and payloads) of those retained messages.
    pub retained_bytes: u64,
}

impl Stats {
    fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: g(&self.accepted),
            connected: g(&self.connected),
            active: g(&self.active),
            refused_auth: g(&self.refused_auth),
            refused_protocol: g(&self.refused_protocol),
            refused_busy: g(&self.refused_busy),
            violations: g(&self.violations),
            packets_in: g(&self.packets_in),
            tls_failures: g(&self.tls_failures),
            denied: g(&self.denied),
            banned: g(&self.banned),
            throttled: g(&self.throttled),
            refused_per_address: g(&self.refused_per_address),
            refused_client_id: g(&self.refused_client_id),
            retain_forbidden: g(&self.retain_forbidden),
            retained_quota: g(&self.retained_quota),
            filter_quota: g(&self.filter_quota),
            filters: 0,
            retained_messages: 0,
            retained_bytes: 0,
        }
    }
}

/// State shared by every connection task.
pub(crate) struct Shared {
    pub(crate) limits: BrokerLimits,
    pub(crate) gate: auth::Gate,
    pub(crate) topic_rules: Option<auth::TopicRules>,
    pub(crate) stats: Arc<Stats>,
    /// Retained messages per account.
    pub(crate) retained: retained::RetainedLedger,
    /// The distinct subscription filters let through (rumqttd keeps a log for each).
    pub(crate) filters: filters::FilterBook,
    /// rumqttd's internal listeners ([`inner::ACCEPT_LANES`] per version).
    pub(crate) inner_v4: Vec<SocketAddr>,
    pub(crate) inner_v5: Vec<SocketAddr>,
    /// Round robin over the internal listeners.
    pub(crate) next_lane: AtomicU64,
    pub(crate) secret: Zeroizing<String>,
    /// Live sessions by client id (a client id can have a session per listener briefly,
    /// while rumqttd takes one over).
    pub(crate) sessions:
        std::sync::Mutex<std::collections::HashMap<String, Vec<(u64, CancellationToken)>>>,
    pub(crate) next_session: AtomicU64,
    /// One turn per client id: the session holding it is the only one of that id inside
    /// rumqttd (see `proxy::take_turn`).
    pub(crate) handovers:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sessions ended because a newer connection took their client id over.
    pub(crate) taken_over: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Shared {
    fn snapshot(&self) -> StatsSnapshot {
        let (messages, bytes) = self.retained.totals();
        StatsSnapshot {
            filters: u64::try_from(self.filters.len()).unwrap_or(u64::MAX),
            retained_messages: u64::try_from(messages).unwrap_or(u64::MAX),
            retained_bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
            ..self.stats.snapshot()
        }
    }

    /// The internal rumqttd listener for the next connection of `version`.
    pub(crate) fn internal_addr(&self, version: Version) -> Option<SocketAddr> {
        let lanes = match version {
            Version::V311 => &self.inner_v4,
            Version::V5 => &self.inner_v5,
        };
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        lanes
            .get(usize::try_from(n).unwrap_or(0) % lanes.len().max(1))
            .copied()
    }

    pub(crate) fn register(&self, client_id: &str, token: CancellationToken) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut g = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.entry(client_id.to_owned()).or_default().push((id, token));
        id
    }

    /// The turn lock of `client_id`.
    pub(crate) fn handover_lock(&self, client_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self
            .handovers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.len() >= 4096 {
            // Forget the ids nobody holds or waits for.
            g.retain(|_, l| Arc::strong_count(l) > 1);
        }
        g.entry(client_id.to_owned()).or_default().clone()
    }

    /// Ends every live session of `client_id`.
    pub(crate) fn end_sessions(&self, client_id: &str) {
        let g = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = g.get(client_id) {
            let mut over = self
                .taken_over
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, t) in v {
                over.insert(*id);
                t.cancel();
            }
        }
    }

    /// Forgets session `id`; true when a take-over ended it.
    pub(crate) fn unregister(&self, client_id: &str, id: u64) -> bool {
        let mut g = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = g.get_mut(client_id) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                g.remove(client_id);
            }
        }
        drop(g);
        self.taken_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id)
    }
}

/// A cloneable control handle of a running broker.
#[derive(Clone)]
pub struct BrokerControl {
    shared: Arc<Shared>,
}

impl BrokerControl {
    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }
}

impl std::fmt::Debug for BrokerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerControl").finish_non_exhaustive()
    }
}

impl BrokerControl {
    /// Closes every session of `client_id` (MQTT 5 clients get DISCONNECT 0x98,
    /// administrative action); returns how many were closed.
    pub fn disconnect(&self, client_id: &str) -> usize {
        let g = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.get(client_id).map_or(0, |v| {
            for (_, t) in v {
                t.cancel();
            }
            v.len()
        })
    }

    /// Client ids with a live session.
    pub fn connected_clients(&self) -> Vec<String> {
        let g = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<String> = g.keys().cloned().collect();
        v.sort();
        v
    }
}

/// A listener as bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundListener {
    /// Its name.
    pub name: String,
    /// The protocol version it serves.
    pub version: Version,
    /// Whether it is TLS.
    pub tls: bool,
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
}

/// The embedded broker.
pub struct EmbeddedBroker;

/// A running broker. Dropping it stops the listeners; [`BrokerHandle::shutdown`] also
/// waits for connections to close.
pub struct BrokerHandle {
    listeners: Vec<BoundListener>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    inner: inner::Inner,
    shared: Arc<Shared>,
}

fn load_tls(name: &str, files: &TlsFiles) -> Result<TlsAcceptor, BrokerError> {
    let err = |reason: String| BrokerError::Tls {
        name: name.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| err(format!("certificate {}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("certificate {}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(err(format!("no certificate in {}", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| err(format!("private key {}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?;
    let builder = match &files.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| err(format!("CA {}: {e}", ca.display())))?
            {
                let c = c.map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let v = if files.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| err(e.to_string()))?)
        }
        None if files.require_client_cert => {
            return Err(err("require_client_cert needs a CA".into()));
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| err(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

impl EmbeddedBroker {
    /// Starts the broker and returns once every listener accepts connections.
    ///
    /// `check` authenticates clients that are not operator accounts (the node passes the
    /// credentials it issued at admission).
    ///
    /// # Errors
    /// A busy or forbidden address, bad TLS files, or an embedded router that did not start.
    pub async fn start(
        config: BrokerConfig,
        check: Option<CredentialCheck>,
    ) -> Result<BrokerHandle, BrokerError> {
        if config.listeners.is_empty() {
            return Err(BrokerError::NoListener);
        }
        // Bind and load everything first, so a mistake is reported before anything runs.
        let mut bound = Vec::new();
        for l in &config.listeners {
            let tls = l.tls.as_ref().map(|f| load_tls(&l.name, f)).transpose()?;
            let listener = TcpListener::bind(l.addr)
                .await
                .map_err(|source| BrokerError::Bind {
                    name: l.name.clone(),
                    addr: l.addr,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
                name: l.name.clone(),
                addr: l.addr,
                source,
            })?;
            bound.push((l.clone(), listener, tls, addr));
        }
        let inner = inner::start(&config.limits).await?;
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            limits: config.limits.clone(),
            gate: auth::Gate {
                allow_anonymous: config.allow_anonymous,
                operators: config.operators.clone(),
                check,
                lockout: auth::OperatorLockout::new(
                    config.limits.operator_lockout_failures,
                    config.limits.operator_lockout_window,
                    config.limits.operator_lockout,
                ),
                reserved: config.reserved_client_ids.clone(),
                password_checks: tokio::sync::Semaphore::new(auth::PASSWORD_CHECKS_AT_ONCE),
            },
            topic_rules: config.topic_rules.clone(),
            stats,
            retained: retained::RetainedLedger::new(
                config.limits.retained_topics_per_client,
                config.limits.retained_bytes_per_client,
            ),
            filters: filters::FilterBook::new(config.limits.max_filters_per_client),
            inner_v4: inner.v4.clone(),
            inner_v5: inner.v5.clone(),
            next_lane: AtomicU64::new(0),
            secret: inner.secret.clone(),
            sessions: std::sync::Mutex::new(std::collections::HashMap::new()),
            next_session: AtomicU64::new(1),
            handovers: std::sync::Mutex::new(std::collections::HashMap::new()),
            taken_over: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        // One set of slots for every listener: the caps hold across them.
        let slots = AddressSlots::new(
            config.limits.max_connections,
            config.limits.max_connections_per_address,
            config.per_address_exempt.as_ref().map(|e| e.0.clone()),
        );
        let mut listeners = Vec::new();
        for (l, listener, tls, addr) in bound {
            listeners.push(BoundListener {
                name: l.name.clone(),
                version: l.version,
                tls: tls.is_some(),
                addr,
            });
            tracing::info!(listener = %l.name, %addr, version = %l.version, tls = tls.is_some(), "MQTT listener ready");
            tracker.spawn(accept_loop(
                listener,
                l.version,
                tls,
                shared.clone(),
                slots.clone(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        Ok(BrokerHandle {
            listeners,
            cancel,
            tracker,
            inner,
            shared,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    version: Version,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    slots: Arc<AddressSlots>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let permit = match slots.try_take(peer.ip()) {
            Ok(p) => p,
            Err(SlotRefusal::Full) => {
                shared.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                tracker.spawn(refuse_busy(
                    stream,
                    version,
                    shared.limits.connect_timeout.min(Duration::from_secs(2)),
                ));
                continue;
            }
            Err(SlotRefusal::PerAddress) => {
                // Closed at once: an address holding its share gets no task and no timer.
                shared
                    .stats
                    .refused_per_address
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "connection cap of the address reached; closing");
                drop(stream);
                continue;
            }
        };
        let shared = shared.clone();
        let cancel = cancel.child_token();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => proxy::serve(stream, peer, version, shared, cancel).await,
                Some(acceptor) => {
                    let hs = tokio::time::timeout(
                        shared.limits.connect_timeout,
                        acceptor.accept(stream),
                    )
                    .await;
                    match hs {
                        Ok(Ok(s)) => proxy::serve(s, peer, version, shared, cancel).await,
                        Ok(Err(e)) => {
                            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

/// Over the connection cap: read the CONNECT briefly and answer "server unavailable".
async fn refuse_busy(mut stream: tokio::net::TcpStream, version: Version, wait: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 64];
    if let Ok(Ok(n)) = tokio::time::timeout(wait, stream.read(&mut buf)).await
        && n > 0
    {
        let _ = stream
            .write_all(&codec::connack_refusal(
                version,
                codec::Refusal::ServerUnavailable,
            ))
            .await;
    }
}

impl BrokerHandle {
    /// The bound listeners.
    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// The first bound address serving `version` without TLS.
    pub fn plain_addr(&self, version: Version) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.version == version && !l.tls)
            .map(|l| l.addr)
    }

    /// The first bound TLS address serving `version`.
    pub fn tls_addr(&self, version: Version) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.version == version && l.tls)
            .map(|l| l.addr)
    }

    /// A control handle (disconnect clients) that outlives borrows of this handle.
    pub fn control(&self) -> BrokerControl {
        BrokerControl {
            shared: self.shared.clone(),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }

    /// True until shutdown begins.
    pub fn is_running(&self) -> bool {
        !self.cancel.is_cancelled()
    }

    /// Stops accepting, closes every client connection (MQTT 5 clients get DISCONNECT
    /// "server shutting down"), waits up to 5 s for them, and stops the embedded router's
    /// listeners.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some MQTT connections did not close within 5 s");
        }
        self.inner.stop();
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}
