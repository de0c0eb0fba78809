//! The `--listen-metrics` listener: plaintext HTTP serving only `GET /health`, `GET /ready`
//! and `GET /metrics` (the same answers as on the REST listener; any other path is a 404,
//! another method a 405), so Prometheus can scrape a process whose REST and gRPC listeners
//! require TLS or client certificates. Nothing it serves changes state or carries a
//! secret; bind it to loopback or a management network all the same.
//!
//! Bounded like the REST listener ([`super::listen`]): at most [`MAX_CONNECTIONS`] open
//! connections and [`MAX_CONNECTIONS_PER_ADDRESS`] from one address (a connection above is
//! closed at once and counted as `pdsno_refused_total{transport="metrics"}`), a deadline
//! for the first bytes, for each request's headers and for silence. It is not rate
//! limited: the connection caps bound the work, and `/metrics` is cheap to render.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::listen::ConnectionLimits;
use super::rest::{self, ReadyCheck};
use crate::metrics::{CONNECTION_REFUSALS, METRICS_TRANSPORT, Metrics};

/// Most open connections at once (a Prometheus server or two, an operator with curl).
pub const MAX_CONNECTIONS: usize = 64;
/// Most open connections from one source address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;

#[derive(Clone)]
struct Ctx {
    id: Option<Arc<str>>,
    metrics: Arc<Metrics>,
    ready: Option<ReadyCheck>,
}

async fn health_page(State(ctx): State<Ctx>) -> Response {
    rest::health_response(ctx.id.as_deref())
}

async fn ready_page(State(ctx): State<Ctx>) -> Response {
    rest::ready_response(ctx.id.as_deref(), ctx.ready.clone()).await
}

async fn metrics_page(State(ctx): State<Ctx>) -> Response {
    rest::metrics_response(&ctx.metrics)
}

/// The router: `/health`, `/ready` and `/metrics` only. `id` is the controller's id
/// (`None` for `pdsno broker`); `ready` what `/ready` checks (nothing: always ready).
pub fn router(id: Option<&str>, metrics: Arc<Metrics>, ready: Option<ReadyCheck>) -> Router {
    let ctx = Ctx {
        id: id.map(Arc::from),
        metrics,
        ready,
    };
    Router::new()
        .route("/health", get(health_page))
        .route("/ready", get(ready_page))
        .route("/metrics", get(metrics_page))
        .fallback(rest::not_found)
        .method_not_allowed_fallback(rest::method_not_allowed)
        .with_state(ctx)
}

/// Binds the listener at `addr`.
///
/// # Errors
/// A message naming the address and the setting when it cannot be bound.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen for metrics on {addr}: {e} (choose another --listen-metrics address, or port 0 for any free one)"
        )
    })
}

/// The connection caps of this listener.
pub fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max: MAX_CONNECTIONS,
        per_address: MAX_CONNECTIONS_PER_ADDRESS,
        exempt: Vec::new(),
    }
}

/// Serves [`router`] on `listener`, plaintext, until `cancel` fires.
///
/// # Errors
/// When accepting fails for good.
pub async fn serve(
    listener: TcpListener,
    id: Option<&str>,
    metrics: Arc<Metrics>,
    ready: Option<ReadyCheck>,
    cancel: CancellationToken,
) -> Result<(), String> {
    metrics.expect_refusals(METRICS_TRANSPORT, &CONNECTION_REFUSALS);
    super::listen::serve_http(
        listener,
        router(id, metrics.clone(), ready),
        None,
        &limits(),
        metrics,
        METRICS_TRANSPORT,
        cancel,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn serves_health_ready_and_metrics_and_nothing_else() {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let m = Arc::new(Metrics::new());
        let failing: ReadyCheck = Arc::new(|| vec![("nib", Err("read-only".to_owned()))]);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(l, Some("x_1"), m, Some(failing), cancel.clone()));
        let (code, body) = get(addr, "GET", "/health").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""controller_id":"x_1""#), "{body}");
        let (code, body) = get(addr, "GET", "/ready").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains(r#""nib":"read-only""#), "{body}");
        let (code, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains(r#"pdsno_refused_total{transport="metrics",reason="connection_cap"} 0"#),
            "{body}"
        );
        for path in ["/info", "/message/heartbeat", "/", "/metricsx"] {
            assert_eq!(get(addr, "GET", path).await.0, 404, "{path}");
        }
        assert_eq!(get(addr, "POST", "/metrics").await.0, 405);
        cancel.cancel();
        assert!(task.await.expect("task").is_ok());
    }

    #[tokio::test]
    async fn a_busy_address_is_named_with_the_setting() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let e = bind(addr).await.expect_err("in use");
        assert!(
            e.contains(&addr.to_string()) && e.contains("--listen-metrics"),
            "{e}"
        );
    }
}
