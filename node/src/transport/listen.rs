//! Accepting connections for the gRPC and REST listeners: a cap on open connections (the
//! connection beyond it is closed at once and counted), TCP_NODELAY, and for REST the TLS
//! handshake under a deadline, then HTTP/1.1 or HTTP/2 with a header-read timeout.

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::metrics::Metrics;

/// Deadline of a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection that holds its place under the cap until dropped.
#[derive(Debug)]
pub struct Capped {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
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

/// Accepts from `listener` while under `max` open connections; the ones above are closed
/// and counted as `connection_cap` refusals of `transport`.
async fn accept_capped(
    listener: &TcpListener,
    sem: &Arc<Semaphore>,
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
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            metrics.refused(transport, "connection_cap");
            tracing::debug!(%peer, transport, "connection cap reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        return Ok((
            Capped {
                inner: stream,
                _permit: permit,
            },
            peer,
        ));
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

/// The gRPC server's incoming connections, capped at `max`.
pub fn grpc_incoming(
    listener: TcpListener,
    max: usize,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Capped>> {
    let (tx, rx) = mpsc::channel(64);
    let sem = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                () = cancel.cancelled() => break,
                r = accept_capped(&listener, &sem, &metrics, "grpc") => r,
            };
            match r {
                Ok((c, _)) => {
                    if tx.send(Ok(c)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `router` on `listener` (TLS when `tls` is given) until `cancel` fires; open
/// connections finish their requests.
///
/// # Errors
/// When accepting fails for good.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    max: usize,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let sem = Arc::new(Semaphore::new(max));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (conn, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = accept_capped(&listener, &sem, &metrics, "rest") => r.map_err(|e| e.to_string())?,
        };
        let router = router.clone();
        let tls = tls.clone();
        let cancel = cancel.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(req)
                },
            );
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
                None => serve_conn(&builder, TokioIo::new(conn), svc, &cancel).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(s)) => serve_conn(&builder, TokioIo::new(s), svc, &cancel).await,
                        Ok(Err(e)) => {
                            metrics.refused("rest", "tls_handshake");
                            tracing::info!(%peer, error = %e, "REST TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.refused("rest", "tls_handshake");
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
