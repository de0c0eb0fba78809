//! Accepting connections for the gRPC, REST and metrics listeners: a cap on open
//! connections and one per source address, with the last quarter of the slots kept for
//! addresses holding little ([`pdsno_shared::slots`]; a connection beyond a cap is closed
//! at once, before TLS, and counted as `connection_cap` or `per_address_limit`),
//! TCP_NODELAY, the TLS handshake under a deadline (failures counted), and for REST and
//! metrics HTTP/1.1 or HTTP/2 with a header-read timeout.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use pdsno_shared::slots::{AddressSlots, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::metrics::Metrics;

/// Deadline of a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a new connection has to send its first bytes.
pub const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence on an open connection (children ping every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The connection caps of one listener.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimits {
    /// Open connections at once.
    pub max: usize,
    /// Open connections one source address may hold (0 = no per-address rules).
    pub per_address: usize,
    /// Networks held to `max` only (a NAT gateway in front of many controllers).
    pub exempt: Vec<ipnet::IpNet>,
}

impl ConnectionLimits {
    /// The limits of `limits` (the node's configuration).
    pub fn of(limits: &crate::guard::Limits) -> ConnectionLimits {
        ConnectionLimits {
            max: limits.max_connections,
            per_address: limits.max_connections_per_address,
            exempt: limits.rate_limit_exempt.clone(),
        }
    }

    fn slots(&self) -> Arc<AddressSlots> {
        let exempt: Option<pdsno_shared::slots::Exempt> = if self.exempt.is_empty() {
            None
        } else {
            let nets = self.exempt.clone();
            Some(Arc::new(move |ip| nets.iter().any(|n| n.contains(&ip))))
        };
        AddressSlots::new(self.max, self.per_address, exempt)
    }
}

/// An accepted connection that holds its place under the caps until dropped, and fails a
/// read that waits longer than [`FIRST_READ_TIMEOUT`] for the first bytes or
/// [`IDLE_TIMEOUT`] after them (a silent peer cannot hold a slot for ever).
#[derive(Debug)]
pub struct Capped {
    inner: TcpStream,
    _slot: Slot,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Capped {
    fn new(inner: TcpStream, slot: Slot) -> Capped {
        Capped {
            inner,
            _slot: slot,
            deadline: Box::pin(tokio::time::sleep(FIRST_READ_TIMEOUT)),
        }
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + IDLE_TIMEOUT;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing in time",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Capped {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts from `listener` within the caps of `slots`; a connection above one is closed at
/// once and counted as a `connection_cap` or `per_address_limit` refusal of `transport`.
async fn accept_capped(
    listener: &TcpListener,
    slots: &Arc<AddressSlots>,
    metrics: &Metrics,
    transport: &'static str,
) -> io::Result<(Capped, SocketAddr)> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_transient(&e) => {
                tracing::debug!(error = %e, transport, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let slot = match slots.try_take(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                metrics.refused(transport, why.reason());
                tracing::debug!(%peer, transport, reason = why.reason(), "connection cap reached; closing");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        return Ok((Capped::new(stream, slot), peer));
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// A gRPC connection: plain, or TLS finished by [`grpc_incoming`] under
/// [`HANDSHAKE_TIMEOUT`] (so failed handshakes are counted like REST's and the broker's).
#[derive(Debug)]
pub enum GrpcConn {
    /// Plaintext.
    Plain(Capped),
    /// After a completed TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<Capped>>),
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_read(cx, buf),
            GrpcConn::Tls(c) => Pin::new(c.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_write(cx, b),
            GrpcConn::Tls(c) => Pin::new(c.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_flush(cx),
            GrpcConn::Tls(c) => Pin::new(c.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_shutdown(cx),
            GrpcConn::Tls(c) => Pin::new(c.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            GrpcConn::Tls(c) => Pin::new(c.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            GrpcConn::Plain(c) => c.is_write_vectored(),
            GrpcConn::Tls(c) => c.is_write_vectored(),
        }
    }
}

/// What the gRPC handlers learn about a connection: its addresses and the controllers
/// the client certificate names (empty without TLS, without a client certificate, or for
/// one that names no controller).
#[derive(Clone, Debug)]
pub struct GrpcConnectInfo {
    /// The addresses.
    pub tcp: tonic::transport::server::TcpConnectInfo,
    /// The client certificate's `urn:pdsno:controller:` names.
    pub peer_controllers: Vec<String>,
}

/// The controllers named by the client certificate of a server-side TLS connection.
pub fn peer_controllers(conn: &rustls::ServerConnection) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::tls::controller_ids(c))
        .unwrap_or_default()
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            GrpcConn::Plain(c) => GrpcConnectInfo {
                tcp: c.connect_info(),
                peer_controllers: Vec::new(),
            },
            GrpcConn::Tls(c) => GrpcConnectInfo {
                tcp: c.get_ref().0.connect_info(),
                peer_controllers: peer_controllers(c.get_ref().1),
            },
        }
    }
}

/// The gRPC server's incoming connections, within `limits`. With `tls`, each handshake
/// runs in its own task under [`HANDSHAKE_TIMEOUT`]; a failed or stalled one is closed and
/// counted as a `tls_handshake` refusal of `grpc`.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<GrpcConn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = limits.slots();
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                () = cancel.cancelled() => break,
                r = accept_capped(&listener, &slots, &metrics, "grpc") => r,
            };
            match (r, &tls) {
                (Ok((c, _)), None) => {
                    if tx.send(Ok(GrpcConn::Plain(c))).await.is_err() {
                        break;
                    }
                }
                (Ok((c, peer)), Some(acceptor)) => {
                    let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(c)).await {
                            Ok(Ok(s)) => {
                                let _ = tx.send(Ok(GrpcConn::Tls(Box::new(s)))).await;
                            }
                            Ok(Err(e)) => {
                                metrics.refused("grpc", "tls_handshake");
                                tracing::info!(%peer, error = %e, "gRPC TLS handshake failed");
                            }
                            Err(_) => {
                                metrics.refused("grpc", "tls_handshake");
                                tracing::info!(%peer, "gRPC TLS handshake timed out");
                            }
                        }
                    });
                }
                (Err(e), _) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A REST request's extension: the controllers named by the connection's client
/// certificate (see [`GrpcConnectInfo::peer_controllers`]).
#[derive(Clone, Debug, Default)]
pub struct PeerControllers(pub Arc<Vec<String>>);

/// Serves `router` on `listener` (TLS when `tls` is given) until `cancel` fires; open
/// connections finish their requests. Refusals are counted under `transport`.
///
/// # Errors
/// When accepting fails for good.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: &ConnectionLimits,
    metrics: Arc<Metrics>,
    transport: &'static str,
    cancel: CancellationToken,
) -> Result<(), String> {
    let slots = limits.slots();
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (conn, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = accept_capped(&listener, &slots, &metrics, transport) => r.map_err(|e| e.to_string())?,
        };
        let router = router.clone();
        let tls = tls.clone();
        let cancel = cancel.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let svc = |ids: Vec<String>| {
                let ids = PeerControllers(Arc::new(ids));
                hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(ids.clone());
                    router.clone().oneshot(req)
                })
            };
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(128)
                .keep_alive_interval(Some(Duration::from_secs(30)));
            match tls {
                None => serve_conn(&builder, TokioIo::new(conn), svc(Vec::new()), &cancel).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(s)) => {
                            let ids = peer_controllers(s.get_ref().1);
                            serve_conn(&builder, TokioIo::new(s), svc(ids), &cancel).await;
                        }
                        Ok(Err(e)) => {
                            metrics.refused(transport, "tls_handshake");
                            tracing::info!(%peer, error = %e, "REST TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.refused(transport, "tls_handshake");
                            tracing::info!(%peer, "REST TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    Ok(())
}

async fn serve_conn<I, S>(
    builder: &Builder<TokioExecutor>,
    io: I,
    svc: S,
    cancel: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "REST connection ended with an error");
            }
        }
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(
        max: usize,
    ) -> (
        TcpListener,
        Arc<AddressSlots>,
        Arc<Metrics>,
        std::net::SocketAddr,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        (
            l,
            AddressSlots::new(max, 0, None),
            Arc::new(Metrics::new()),
            a,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_a_talking_one_is_read() {
        let (l, sem, m, addr) = pair(4).await;
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let (mut c, _) = accept_capped(&l, &sem, &m, "rest").await.expect("accept");
        let mut buf = [0u8; 8];
        let e = c.read(&mut buf).await.expect_err("times out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let mut talker = TcpStream::connect(addr).await.expect("connect");
        let (mut c, _) = accept_capped(&l, &sem, &m, "rest").await.expect("accept");
        talker.write_all(b"hello").await.expect("write");
        let n = c.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
    }

    #[tokio::test]
    async fn connections_above_the_cap_are_closed_and_counted() {
        let (l, sem, m, addr) = pair(1).await;
        let _first = TcpStream::connect(addr).await.expect("connect");
        let (held, _) = accept_capped(&l, &sem, &m, "grpc").await.expect("accept");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut third = TcpStream::connect(addr).await.expect("connect");
        // The acceptor closes the second at once and hands out the third once the first
        // is gone.
        let accept = tokio::spawn(async move {
            let r = accept_capped(&l, &sem, &m, "grpc").await.map(|_| ());
            (r, m)
        });
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection above the cap is closed");
        drop(held);
        drop(third.write_all(b"x").await);
        // The third was also above the cap while the first was held, or it is accepted now.
        let (r, m) = tokio::time::timeout(Duration::from_secs(5), async {
            // A fourth connection is accepted now that the slot is free.
            let _fourth = TcpStream::connect(addr).await.expect("connect");
            accept.await.expect("task")
        })
        .await
        .expect("accepted");
        assert!(r.is_ok());
        assert!(
            m.render()
                .contains(r#"pdsno_refused_total{transport="grpc",reason="connection_cap"}"#)
        );
    }
}
