//! The front door: one task per client connection.
//!
//! 1. TLS handshake (if the listener has TLS) and the CONNECT, both under the connect
//!    timeout (a stalled client costs one task, never the accept loop).
//! 2. Version, client id and credentials are checked; a refusal gets the CONNACK code the
//!    spec defines (rumqttd would drop the socket without one).
//! 3. Once no other session of the client id is left inside rumqttd (an older one is ended
//!    here, see `take_turn`), a loopback connection to rumqttd is opened and the CONNECT
//!    forwarded with the internal credential in place of the client's.
//! 4. Both directions are pumped. Every packet from the client is framed and validated
//!    before it is forwarded; a violation closes the connection (MQTT 5: after a
//!    DISCONNECT with the reason code) and rumqttd then publishes the client's will, as the
//!    spec requires for a server-side close.
//!
//! A client that goes away without DISCONNECT makes us close the internal connection the
//! same way, so its will is published.
//!
//! Every refusal of a PUBLISH closes the connection, whatever the reason (MQTT 5: after a
//! DISCONNECT saying why: 0x87 outside the topic rights, 0x9A retained where nothing may
//! be retained, 0x97 over the account's retained-message budget); nothing is dropped
//! silently, so a misconfigured client learns at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, Principal, TopicRules, permitted, retain_permitted};
use crate::codec::{self, Checked, ConnectError, Frame, Refusal, Version, Violation};
use crate::inner::INTERNAL_USER;
use crate::{Shared, Stats};

/// Keep alive given to rumqttd when the client asked for none (rumqttd refuses 0).
const KEEP_ALIVE_OFF: u16 = u16::MAX;

/// Why a connection ended (for logs and stats).
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientDisconnected,
    BrokerClosed,
    Shutdown,
    Violation(Violation),
    /// A PUBLISH or SUBSCRIBE outside the client's topic rights.
    Denied(Access, String),
    /// A retained PUBLISH on a topic where nothing may be retained.
    RetainForbidden(String),
    /// A retained PUBLISH above the account's retained-message budget.
    RetainQuota(String),
    /// A SUBSCRIBE that would take the account over its number of new filters.
    FilterQuota(String),
    Io(std::io::Error),
    FrameTimeout,
}

/// Reads until one complete frame is buffered; `Ok(None)` on a clean EOF before any byte.
async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Frame>, Result<Violation, std::io::Error>> {
    loop {
        match codec::peek_frame(buf, max_packet_size) {
            Err(v) => return Err(Ok(v)),
            Ok(Some(f)) if buf.len() >= f.len() => return Ok(Some(f)),
            Ok(f) => {
                let want = f.map_or(64, |f| f.len() - buf.len());
                buf.reserve(want.min(64 * 1024));
                match s.read_buf(buf).await {
                    Ok(0) if buf.is_empty() => return Ok(None),
                    Ok(0) => {
                        return Err(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "connection closed inside a packet",
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(Err(e)),
                }
            }
        }
    }
}

/// Serves one accepted client connection to its end.
pub(crate) async fn serve<S>(
    mut client: S,
    peer: SocketAddr,
    listener_version: Version,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let stats = &shared.stats;
    let limits = shared.limits.codec();
    let mut inbuf = BytesMut::with_capacity(512);

    // 1. CONNECT under the connect timeout.
    let first = tokio::select! {
        _ = cancel.cancelled() => return,
        r = timeout(shared.limits.connect_timeout, read_frame(&mut client, &mut inbuf, limits.max_packet_size)) => r,
    };
    let frame = match first {
        Err(_) => {
            stats.refused_protocol.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
            return;
        }
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return,
        Ok(Err(Ok(v))) => {
            stats.refused_protocol.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, violation = %v, "refused: bad first packet");
            return;
        }
        Ok(Err(Err(e))) => {
            tracing::debug!(%peer, error = %e, "connection failed before CONNECT");
            return;
        }
    };
    let frame_bytes = inbuf.split_to(frame.len());
    let connect = match codec::decode_connect(&frame, &frame_bytes[frame.header_len..], &limits) {
        Ok(c) => c,
        Err(ConnectError::NotConnect) => {
            stats.refused_protocol.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, kind = ?frame.kind, "refused: first packet is not CONNECT");
            return;
        }
        Err(ConnectError::UnsupportedVersion(level)) => {
            stats.refused_protocol.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, level, "refused: unsupported protocol level");
            let v = if level >= codec::LEVEL_V5 {
                Version::V5
            } else {
                Version::V311
            };
            let _ = client
                .write_all(&codec::connack_refusal(v, Refusal::UnsupportedVersion))
                .await;
            return;
        }
        Err(ConnectError::Invalid(v)) => {
            stats.refused_protocol.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, violation = %v, "refused: malformed CONNECT");
            if listener_version == Version::V5 {
                let _ = client
                    .write_all(&codec::connack_refusal(Version::V5, Refusal::Malformed))
                    .await;
            }
            return;
        }
    };
    // Every listener serves both MQTT 3.1.1 and 5, as Mosquitto does: the CONNECT's
    // protocol level picks rumqttd's internal listener (step 3).

    // 2. Who is it?
    let admitted = tokio::select! {
        _ = cancel.cancelled() => return,
        r = timeout(shared.limits.connect_timeout, shared.gate.admit(&connect, peer)) => r,
    };
    let principal = match admitted {
        Ok(Ok(p)) => p,
        Ok(Err(refusal)) => {
            match refusal {
                Refusal::Banned => stats.banned.fetch_add(1, Ordering::Relaxed),
                Refusal::ReservedId => stats.refused_client_id.fetch_add(1, Ordering::Relaxed),
                _ => stats.refused_auth.fetch_add(1, Ordering::Relaxed),
            };
            tracing::info!(%peer, client_id = %connect.client_id, user = %connect.username.as_deref().unwrap_or("-"), ?refusal, "refused connection");
            let _ = client
                .write_all(&codec::connack_refusal(connect.version, refusal))
                .await;
            return;
        }
        Err(_) => {
            stats.refused_auth.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, client_id = %connect.client_id, "credential check timed out");
            let _ = client
                .write_all(&codec::connack_refusal(
                    connect.version,
                    Refusal::ServerUnavailable,
                ))
                .await;
            return;
        }
    };

    // A will is a publish made later on the client's behalf: it needs the same right.
    if let Some(w) = &connect.will
        && !permitted(
            shared.topic_rules.as_ref(),
            &principal,
            Access::Publish,
            &w.topic,
        )
    {
        stats.denied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, client_id = %connect.client_id, %principal, topic = %w.topic, "refused: will on a topic the client may not publish on");
        let _ = client
            .write_all(&codec::connack_refusal(
                connect.version,
                Refusal::NotAuthorized,
            ))
            .await;
        return;
    }

    // A retained will must be allowed there, and fit the account's budget: it may be
    // published after the client is gone, so it counts from now.
    if let Some(w) = connect.will.as_ref().filter(|w| w.retain) {
        let refusal = if !retain_permitted(shared.topic_rules.as_ref(), &principal, &w.topic) {
            stats.retain_forbidden.fetch_add(1, Ordering::Relaxed);
            Some(Refusal::RetainForbidden)
        } else if !w.payload.is_empty()
            && shared
                .retained
                .record(&principal.account(), &w.topic, w.payload.len())
                .is_err()
        {
            stats.retained_quota.fetch_add(1, Ordering::Relaxed);
            Some(Refusal::RetainQuota)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            tracing::info!(%peer, client_id = %connect.client_id, %principal, topic = %w.topic, ?refusal, "refused: retained will");
            let _ = client
                .write_all(&codec::connack_refusal(connect.version, refusal))
                .await;
            return;
        }
    }

    // 3. Hand over to rumqttd with the internal credential, once no other session of this
    //    client id is left there.
    let Some(_turn) = take_turn(&shared, &connect.client_id, &cancel).await else {
        tracing::warn!(%peer, client_id = %connect.client_id, "the previous session of this client id did not end in time");
        let _ = client
            .write_all(&codec::connack_refusal(
                connect.version,
                Refusal::ServerUnavailable,
            ))
            .await;
        return;
    };
    let session = shared.register(&connect.client_id, cancel.clone());
    let internal = match shared.internal_addr(connect.version) {
        Some(addr) => timeout(shared.limits.connect_timeout, TcpStream::connect(addr)).await,
        None => Ok(Err(std::io::Error::other("no internal listener"))),
    };
    let mut internal = match internal {
        Ok(Ok(s)) => s,
        _ => {
            tracing::error!(%peer, "embedded broker unreachable");
            shared.unregister(&connect.client_id, session);
            let _ = client
                .write_all(&codec::connack_refusal(
                    connect.version,
                    Refusal::ServerUnavailable,
                ))
                .await;
            return;
        }
    };
    let _ = internal.set_nodelay(true);
    let mut forwarded = connect.clone();
    forwarded.username = Some(INTERNAL_USER.to_owned());
    forwarded.password = Some(shared.secret.as_bytes().to_vec());
    if let Some(w) = forwarded.will.as_mut() {
        // Will properties would reach subscribers as publish properties, which crash
        // rumqttd's MQTT 3.1.1 connections (see `forward_v5_publish`).
        w.properties.clear();
    }
    if forwarded.keep_alive == 0 {
        forwarded.keep_alive = KEEP_ALIVE_OFF;
    }
    if let Err(e) = internal.write_all(&forwarded.encode()).await {
        tracing::error!(%peer, error = %e, "embedded broker refused the connection");
        shared.unregister(&connect.client_id, session);
        return;
    }
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, client_id = %connect.client_id, %principal, version = %connect.version, "client connected");

    // 4. Pump.
    let rights = Rights {
        rules: shared.topic_rules.as_ref(),
        principal: &principal,
        last_publish: None,
        ledger: &shared.retained,
        account: principal.account(),
        filters: &shared.filters,
    };
    let rate = shared.limits.controller_publish_rate;
    let bucket = (rate > 0 && matches!(principal, Principal::Credential(_))).then(|| {
        Bucket::new(
            f64::from(rate),
            f64::from(shared.limits.controller_publish_burst.max(1)),
        )
    });
    let mut link = Link {
        version: connect.version,
        rights,
        outgoing: OutgoingFrames::default(),
        bucket,
    };
    let end = pump(
        &mut client,
        internal,
        &mut inbuf,
        &mut link,
        &shared,
        &cancel,
    )
    .await;
    // Our own DISCONNECT may only go between rumqttd's packets; in the middle of one the
    // client just sees the connection close.
    let say_why = connect.version == Version::V5 && link.outgoing.at_boundary();
    let taken_over = shared.unregister(&connect.client_id, session);
    stats.active.fetch_sub(1, Ordering::Relaxed);
    match &end {
        End::Violation(v) => {
            stats.violations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, client_id = %connect.client_id, violation = %v, "closed a client that broke the protocol");
            if say_why {
                let _ = client
                    .write_all(&codec::disconnect_v5(v.reason_code()))
                    .await;
            }
        }
        End::Denied(access, topic) => {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, client_id = %connect.client_id, %principal, %access, %topic, "closed a client that went outside its topic rights");
            if say_why {
                // 0x87: not authorized.
                let _ = client.write_all(&codec::disconnect_v5(0x87)).await;
            }
        }
        End::RetainForbidden(topic) => {
            stats.retain_forbidden.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, client_id = %connect.client_id, %principal, %topic, "closed a client that retained a message where nothing may be retained");
            if say_why {
                // 0x9A: retain not supported.
                let _ = client.write_all(&codec::disconnect_v5(0x9A)).await;
            }
        }
        End::RetainQuota(topic) => {
            stats.retained_quota.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, client_id = %connect.client_id, %principal, %topic, "closed a client over its retained-message budget");
            if say_why {
                // 0x97: quota exceeded.
                let _ = client.write_all(&codec::disconnect_v5(0x97)).await;
            }
        }
        End::FilterQuota(filter) => {
            stats.filter_quota.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, client_id = %connect.client_id, %principal, %filter, max_filters_per_client = shared.limits.max_filters_per_client, "closed a client whose subscription would add more filters than its account may");
            if say_why {
                // 0x97: quota exceeded.
                let _ = client.write_all(&codec::disconnect_v5(0x97)).await;
            }
        }
        End::FrameTimeout => {
            stats.violations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, client_id = %connect.client_id, "closed a client that stalled inside a packet");
        }
        End::Shutdown if taken_over => {
            tracing::info!(%peer, client_id = %connect.client_id, "a newer connection took the session over");
            if say_why {
                // 0x8E: session taken over.
                let _ = client.write_all(&codec::disconnect_v5(0x8E)).await;
            }
        }
        End::Shutdown => {
            tracing::info!(%peer, client_id = %connect.client_id, "closing the session (shutdown or revocation)");
            if say_why {
                // 0x8B: server shutting down.
                let _ = client.write_all(&codec::disconnect_v5(0x8B)).await;
            }
        }
        End::Io(e) => {
            tracing::debug!(%peer, client_id = %connect.client_id, error = %e, "client connection failed")
        }
        other => {
            tracing::debug!(%peer, client_id = %connect.client_id, end = ?other, "client connection ended")
        }
    }
    let _ = client.shutdown().await;
}

/// Time left to rumqttd after it closed a session's internal connection, for the rest of
/// its clean-up of that client id (its will bookkeeping follows the close by a timer tick).
const HANDOVER_GRACE: std::time::Duration = std::time::Duration::from_millis(10);

/// Waits until no other session of `client_id` is inside rumqttd, ending the ones there
/// (a client id has one session: the newer connection takes over). rumqttd's own take-over
/// races with the old session's clean-up when both overlap (it can then drop the new
/// session, or panic in the listener task and refuse every later client of that
/// listener), so the front door never lets two sessions of one id overlap. Returns the
/// turn to hold for the session's life; `None` when the old session did not end within
/// the connect timeout. An empty id (rumqttd assigns a fresh one) needs no turn.
async fn take_turn(
    shared: &Shared,
    client_id: &str,
    cancel: &CancellationToken,
) -> Option<Option<tokio::sync::OwnedMutexGuard<()>>> {
    if client_id.is_empty() {
        return Some(None);
    }
    let lock = shared.handover_lock(client_id);
    let deadline = Instant::now() + shared.limits.connect_timeout;
    loop {
        if let Ok(turn) = lock.clone().try_lock_owned() {
            return Some(Some(turn));
        }
        // End the current session (it registers right after taking its turn, so a
        // session between the two is caught on the next round).
        shared.end_sessions(client_id);
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = timeout(std::time::Duration::from_millis(100), lock.clone().lock_owned()) => {
                if let Ok(turn) = r {
                    return Some(Some(turn));
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// One client connection's state in the pump.
struct Link<'a> {
    version: Version,
    rights: Rights<'a>,
    outgoing: OutgoingFrames,
    /// The publish budget of a controller connection.
    bucket: Option<Bucket>,
}

/// A token bucket of PUBLISH packets.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), std::time::Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - self.tokens) / self.rate,
            ))
        }
    }
}

/// A connection's topic rights; the last topic it was allowed to publish on is remembered
/// (a controller publishes on a handful of topics, again and again).
struct Rights<'a> {
    rules: Option<&'a TopicRules>,
    principal: &'a Principal,
    last_publish: Option<String>,
    /// Retained messages per account, and the account this connection charges.
    ledger: &'a crate::retained::RetainedLedger,
    account: String,
    /// The broker's distinct filters.
    filters: &'a crate::filters::FilterBook,
}

impl Rights<'_> {
    /// Whether anything is checked at all for this connection.
    fn restricted(&self) -> bool {
        self.rules.is_some() || matches!(self.principal, Principal::Reader(_))
    }

    fn publish(&mut self, topic: &str) -> Result<(), End> {
        if !self.restricted() || self.last_publish.as_deref() == Some(topic) {
            return Ok(());
        }
        if !permitted(self.rules, self.principal, Access::Publish, topic) {
            return Err(End::Denied(Access::Publish, topic.to_owned()));
        }
        self.last_publish = Some(topic.to_owned());
        Ok(())
    }

    /// A retained PUBLISH of `payload_len` bytes on `topic` (already allowed by
    /// [`Rights::publish`]): allowed there, and within the account's budget.
    fn retain(&self, topic: &str, payload_len: usize) -> Result<(), End> {
        if !retain_permitted(self.rules, self.principal, topic) {
            return Err(End::RetainForbidden(topic.to_owned()));
        }
        self.ledger
            .record(&self.account, topic, payload_len)
            .map_err(|_| End::RetainQuota(topic.to_owned()))
    }

    /// A SUBSCRIBE: within the rights (when restricted), and within the account's budget of
    /// new filters (for everyone).
    fn subscribe(&self, filters: &[&str]) -> Result<(), End> {
        if self.restricted()
            && let Some(f) = filters
                .iter()
                .find(|f| !permitted(self.rules, self.principal, Access::Subscribe, f))
        {
            return Err(End::Denied(Access::Subscribe, (*f).to_owned()));
        }
        self.filters
            .record(&self.account, filters)
            .map_err(|crate::filters::OverQuota(f)| End::FilterQuota(f))
    }
}

/// Validates, authorizes and forwards one client packet into `batch`.
fn forward(
    f: &Frame,
    frame: &[u8],
    version: Version,
    limits: &codec::Limits,
    rights: &mut Rights<'_>,
    aliases: &mut Aliases,
    batch: &mut Vec<u8>,
) -> Result<Checked, End> {
    let body = &frame[f.header_len..];
    let checked = codec::check_client_packet(f, body, version, limits).map_err(End::Violation)?;
    match f.kind {
        codec::PacketType::Publish if version == Version::V5 => {
            forward_v5_publish(f, frame, aliases, limits, rights, batch)?;
            return Ok(checked);
        }
        codec::PacketType::Publish if rights.restricted() || f.flags & 0x01 != 0 => {
            let topic = codec::publish_topic_v311(body).map_err(End::Violation)?;
            rights.publish(topic)?;
            if f.flags & 0x01 != 0 {
                // Topic (2 + length), packet identifier (QoS > 0), then the payload.
                let id_len = if f.flags & 0x06 != 0 { 2 } else { 0 };
                let payload_len = body.len().saturating_sub(2 + topic.len() + id_len);
                rights.retain(topic, payload_len)?;
            }
        }
        codec::PacketType::Subscribe => {
            rights.subscribe(
                &codec::subscribe_filters(body, version, limits).map_err(End::Violation)?,
            )?;
        }
        _ => {}
    }
    batch.extend_from_slice(frame);
    Ok(checked)
}

async fn pump<S>(
    client: &mut S,
    internal: TcpStream,
    inbuf: &mut BytesMut,
    link: &mut Link<'_>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limits = shared.limits.codec();
    let stats: &Stats = &shared.stats;
    let (mut ir, mut iw) = internal.into_split();
    let mut out = vec![0u8; 4096];
    let mut batch: Vec<u8> = Vec::new();
    let mut partial_since: Option<Instant> = None;
    let mut saw_disconnect = false;
    let mut aliases = Aliases::default();
    let mut paused_until: Option<Instant> = None;
    let end = async { loop {
        // Validate every complete frame already buffered; forward them in one write. The
        // packets before a bad one are still forwarded.
        let mut stop = None;
        while paused_until.is_none() {
            let f = match codec::peek_frame(inbuf, limits.max_packet_size) {
                Err(v) => {
                    stop = Some(End::Violation(v));
                    break;
                }
                Ok(Some(f)) if inbuf.len() >= f.len() => f,
                Ok(_) => break,
            };
            // A controller over its publish rate: leave this PUBLISH (and what follows)
            // in the buffer and stop reading until the budget is back (back-pressure).
            if f.kind == codec::PacketType::Publish
                && let Some(b) = link.bucket.as_mut()
                && let Err(wait) = b.take(Instant::now())
            {
                stats.throttled.fetch_add(1, Ordering::Relaxed);
                paused_until = Some(Instant::now() + wait);
                break;
            }
            let frame = inbuf.split_to(f.len());
            stats.packets_in.fetch_add(1, Ordering::Relaxed);
            match forward(
                &f,
                &frame,
                link.version,
                &limits,
                &mut link.rights,
                &mut aliases,
                &mut batch,
            ) {
                Ok(Checked::Forward) => {}
                Ok(Checked::Disconnect) => {
                    saw_disconnect = true;
                    break;
                }
                Err(end) => {
                    stop = Some(end);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = iw.write_all(&batch).await {
                return End::Io(e);
            }
            batch.clear();
            if batch.capacity() > 64 * 1024 {
                batch.shrink_to(4096);
            }
        }
        if let Some(end) = stop {
            return end;
        }
        if saw_disconnect {
            // The client said goodbye; rumqttd drops its will on DISCONNECT. Let it see EOF.
            let _ = iw.shutdown().await;
            return End::ClientDisconnected;
        }
        partial_since = match (inbuf.is_empty(), partial_since) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
        // No frame deadline while we are the ones not reading.
        let deadline = match paused_until {
            Some(_) => None,
            None => partial_since.map(|t| t + shared.limits.frame_timeout),
        };
        if inbuf.capacity() - inbuf.len() < 512 {
            let want = codec::peek_frame(inbuf, limits.max_packet_size)
                .ok()
                .flatten()
                .map_or(4096, |f| f.len().saturating_sub(inbuf.len()).max(512));
            inbuf.reserve(want.min(64 * 1024));
        }
        tokio::select! {
            _ = cancel.cancelled() => return End::Shutdown,
            r = client.read_buf(inbuf), if paused_until.is_none() => match r {
                Ok(0) => return End::ClientClosed,
                Ok(_) => {}
                Err(e) => return End::Io(e),
            },
            () = async {
                match paused_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                paused_until = None;
                partial_since = None;
            },
            r = ir.read(&mut out) => match r {
                Ok(0) => return End::BrokerClosed,
                Ok(n) => {
                    link.outgoing.feed(&out[..n]);
                    if let Err(e) = client.write_all(&out[..n]).await {
                        return End::Io(e);
                    }
                }
                Err(e) => return End::Io(e),
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                return End::FrameTimeout;
            }
        }
    } }.await;
    // Close the internal connection and wait until rumqttd has closed its side too (it
    // has then ended the session), so the next session of this client id starts clean.
    let _ = iw.shutdown().await;
    let _ = timeout(std::time::Duration::from_secs(1), async {
        let mut sink = [0u8; 1024];
        while matches!(ir.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    tokio::time::sleep(HANDOVER_GRACE).await;
    end
}

/// Where the broker-to-client byte stream stands. rumqttd's output is forwarded in chunks
/// that may end inside a packet; the front door tracks packet boundaries (fixed headers
/// only) so that a packet of its own is never spliced into one of rumqttd's.
#[derive(Default)]
struct OutgoingFrames {
    /// Bytes of the current packet still to come after its fixed header.
    left: usize,
    /// Fixed-header bytes of the next packet read so far.
    header: [u8; 5],
    header_len: usize,
    /// A header we could not read (never from rumqttd): boundaries are unknown from here.
    lost: bool,
}

impl OutgoingFrames {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if self.header_len >= 2 && self.header[self.header_len - 1] & 0x80 == 0 {
                self.left = self.header[1..self.header_len]
                    .iter()
                    .enumerate()
                    .fold(0usize, |v, (i, b)| v | (usize::from(b & 0x7F) << (7 * i)));
                self.header_len = 0;
            } else if self.header_len == self.header.len() {
                self.lost = true;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        !self.lost && self.left == 0 && self.header_len == 0
    }
}

/// Most bytes of topic names a connection may bind to aliases.
const MAX_ALIAS_BYTES: usize = 64 * 1024;

/// The client's topic aliases (MQTT 5), resolved here.
#[derive(Default)]
struct Aliases {
    map: std::collections::HashMap<u16, String>,
    bytes: usize,
}

/// Forwards an MQTT 5 PUBLISH. One carrying properties is re-encoded without them, its
/// topic alias resolved: rumqttd 0.20 hits `unreachable!()` and kills the connection of
/// every MQTT 3.1.1 subscriber that receives a publish with properties, so they must not
/// reach it. MQTT 5 subscribers therefore do not see publishers' properties.
fn forward_v5_publish(
    f: &Frame,
    frame: &[u8],
    aliases: &mut Aliases,
    limits: &codec::Limits,
    rights: &mut Rights<'_>,
    out: &mut Vec<u8>,
) -> Result<(), End> {
    let parts =
        codec::split_publish_v5(f, &frame[f.header_len..], limits).map_err(End::Violation)?;
    let retain = f.flags & 0x01 != 0;
    if !parts.has_properties {
        rights.publish(parts.topic)?;
        if retain {
            rights.retain(parts.topic, parts.payload.len())?;
        }
        out.extend_from_slice(frame);
        return Ok(());
    }
    let topic: String = match (parts.topic.is_empty(), parts.alias) {
        (false, Some(a)) => {
            let new = parts.topic.len();
            let old = aliases.map.get(&a).map_or(0, String::len);
            if aliases.bytes - old + new > MAX_ALIAS_BYTES {
                return Err(End::Violation(Violation::Quota(
                    "topic alias table too large",
                )));
            }
            aliases.bytes = aliases.bytes - old + new;
            aliases.map.insert(a, parts.topic.to_owned());
            parts.topic.to_owned()
        }
        (true, Some(a)) => aliases
            .map
            .get(&a)
            .cloned()
            .ok_or(End::Violation(Violation::Protocol("unknown topic alias")))?,
        (false, None) => parts.topic.to_owned(),
        (true, None) => {
            return Err(End::Violation(Violation::TopicNameInvalid("empty topic")));
        }
    };
    rights.publish(&topic)?;
    if retain {
        rights.retain(&topic, parts.payload.len())?;
    }
    out.extend_from_slice(&codec::encode_publish_v5(
        frame[0],
        &topic,
        parts.packet_id,
        parts.payload,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Bucket, OutgoingFrames};
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn the_publish_budget_refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, 50.0);
        b.last = t0;
        for _ in 0..50 {
            assert_eq!(b.take(t0), Ok(()), "the burst is free");
        }
        let wait = b.take(t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-9, "{wait:?}");
        assert_eq!(
            b.take(t0 + Duration::from_millis(10)),
            Ok(()),
            "one per 10 ms"
        );
        // A long idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..50 {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn outgoing_boundaries_are_tracked_across_any_split() {
        // PINGRESP, a PUBLISH with a two-byte remaining length (200), a SUBACK.
        let mut stream = vec![0xD0, 0x00, 0x30, 0xC8, 0x01];
        stream.extend(std::iter::repeat_n(0xAB, 200));
        stream.extend([0x90, 0x03, 0x00, 0x01, 0x00]);
        let ends = [2, 205, stream.len()];
        for split in 0..=stream.len() {
            let mut o = OutgoingFrames::default();
            o.feed(&stream[..split]);
            assert_eq!(
                o.at_boundary(),
                split == 0 || ends.contains(&split),
                "split at {split}"
            );
            o.feed(&stream[split..]);
            assert!(o.at_boundary(), "whole stream, split at {split}");
        }
        // Byte by byte.
        let mut o = OutgoingFrames::default();
        for (i, b) in stream.iter().enumerate() {
            o.feed(&[*b]);
            assert_eq!(o.at_boundary(), ends.contains(&(i + 1)), "after byte {i}");
        }
        // A length that never ends: boundaries are lost for good.
        let mut o = OutgoingFrames::default();
        o.feed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]);
        assert!(!o.at_boundary());
    }
}
