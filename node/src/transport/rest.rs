//! REST compatibility endpoints (PROTOCOL.md §4): the original PDSNO JSON wire format, so
//! Python controllers and scripts work unchanged.
//!
//! - `POST /message/{type}`: body = envelope. 400 for a body that is not an envelope (with a
//!   `detail` saying why), 413 above the size limit, 401 for a missing or failing
//!   signature, 400 for another recipient or a body type that differs from the path, 404
//!   for a type this controller does not handle. The reply is an envelope or
//!   `{"status":"accepted"}`. No error is ever a 500 with a stack trace.
//! - `GET /health`: `{"status":"healthy","controller_id":...,"timestamp":...}`.
//! - `GET /ready`: 200 `{"status":"ready",...}` or 503 with the failing checks.
//! - `GET /metrics`: [`crate::metrics`] (also on the `--listen-metrics` listener,
//!   [`super::metrics_http`]).
//! - `GET /info`: `{"controller_id":...,"registered_handlers":[...],"host":...,"port":...}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::time::format_iso;
use tokio::net::TcpListener;

use crate::guard::{Guard, Refusal};
use crate::inbound::{Inbound, InboundError, Reply};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
struct Ctx {
    inbound: Arc<Inbound>,
    addr: SocketAddr,
    guard: Option<Arc<Guard>>,
    ready: Option<ReadyCheck>,
}

/// What `GET /ready` checks: each named check and its failure, if it failed. Blocking
/// (it may touch the NIB).
pub type ReadyCheck = Arc<dyn Fn() -> Vec<(&'static str, Result<(), String>)> + Send + Sync>;

/// 429 with `Retry-After` and the compat body `{"error":"Rate limit exceeded. Retry after N seconds"}`.
fn refusal_response(r: &Refusal) -> Response {
    let mut m = Map::new();
    m.insert("error".into(), Value::String(r.message()));
    let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, &Value::Object(m));
    if let Ok(v) = header::HeaderValue::from_str(&r.retry_after().to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// The per-client rate limit, before anything else (every route but `/health`).
async fn rate_limit(
    State(ctx): State<Ctx>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let (Some(g), Some(peer)) = (&ctx.guard, peer)
        && req.uri().path() != "/health"
        && req.uri().path() != "/ready"
        && let Err(r) = g.check_rate(peer.ip(), "rest")
    {
        return refusal_response(&r);
    }
    next.run(req).await
}

/// A JSON response with our canonical (ASCII, sorted) encoding.
fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json::to_canonical_string(v),
    )
        .into_response()
}

fn detail(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = Map::new();
    m.insert("detail".into(), Value::String(msg.into()));
    json_response(status, &Value::Object(m))
}

fn error_response(e: InboundError) -> Response {
    let status = match &e {
        InboundError::BadRequest(_)
        | InboundError::WrongRecipient { .. }
        | InboundError::TypeMismatch { .. } => StatusCode::BAD_REQUEST,
        InboundError::Unsigned
        | InboundError::BadSignature(_)
        | InboundError::PeerMismatch { .. } => StatusCode::UNAUTHORIZED,
        InboundError::Forbidden(_) | InboundError::Revoked { .. } => StatusCode::FORBIDDEN,
        InboundError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        InboundError::NoHandler(_) => StatusCode::NOT_FOUND,
        InboundError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
    };
    detail(status, e.to_string())
}

async fn message(
    State(ctx): State<Ctx>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    peer_ids: Option<axum::Extension<super::listen::PeerControllers>>,
    kind: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let kind = match kind {
        Ok(Path(k)) => k,
        Err(rej) => {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("Invalid message type in the path: {}", rej.body_text()),
            );
        }
    };
    let body = match body {
        Ok(b) => b,
        Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return detail(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body larger than {MAX_BODY} bytes"),
            );
        }
        Err(rej) => {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("Cannot read the request body: {}", rej.body_text()),
            );
        }
    };
    let Some(path_type) = MessageType::from_path_segment(&kind) else {
        return detail(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown message type {:?}",
                kind.chars().take(64).collect::<String>()
            ),
        );
    };
    let env = match Envelope::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            ctx.inbound
                .metrics()
                .message(path_type.as_str(), "rest", "malformed");
            return detail(StatusCode::BAD_REQUEST, format!("Invalid message: {e}"));
        }
    };
    let admission = matches!(
        path_type,
        MessageType::ValidationRequest | MessageType::ChallengeResponse
    );
    let source = peer.map(|axum::Extension(ConnectInfo(a))| a.ip());
    let guard = ctx.guard.clone().filter(|_| admission).zip(source);
    if let Some((g, ip)) = &guard
        && let Err(r) = g.check_admission(*ip, "rest")
    {
        return refusal_response(&r);
    }
    let inbound = ctx.inbound.clone();
    let peer_ids = peer_ids.map(|axum::Extension(p)| p).unwrap_or_default();
    let handled = tokio::task::spawn_blocking(move || {
        inbound.handle_from(env, Some(path_type), "rest", &peer_ids.0, source)
    })
    .await;
    if let (Some((g, ip)), Ok(r)) = (&guard, &handled) {
        crate::guard::record_admission(g, *ip, r);
    }
    match handled {
        Err(_) => detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "The handler failed; see the controller's log",
        ),
        Ok(Err(e)) => error_response(e),
        Ok(Ok(Reply::Envelope(e))) => json_response(StatusCode::OK, &e.to_value()),
        Ok(Ok(Reply::Accepted)) => {
            let mut m = Map::new();
            m.insert("status".into(), "accepted".into());
            json_response(StatusCode::OK, &Value::Object(m))
        }
    }
}

async fn health(State(ctx): State<Ctx>) -> Response {
    health_response(Some(ctx.inbound.id()))
}

/// Liveness: 200 `{"status":"healthy","controller_id":ID,"timestamp":...}` (without
/// `controller_id` for a process that is no controller).
pub(crate) fn health_response(id: Option<&str>) -> Response {
    let mut m = Map::new();
    m.insert("status".into(), "healthy".into());
    if let Some(id) = id {
        m.insert("controller_id".into(), id.into());
    }
    m.insert("timestamp".into(), format_iso(chrono::Utc::now()).into());
    json_response(StatusCode::OK, &Value::Object(m))
}

async fn ready(State(ctx): State<Ctx>) -> Response {
    ready_response(Some(ctx.inbound.id()), ctx.ready.clone()).await
}

/// Readiness: 200 `{"status":"ready","checks":{...}}` when every check passes, else 503
/// `{"status":"not ready","checks":{name: reason}}`.
pub(crate) async fn ready_response(id: Option<&str>, check: Option<ReadyCheck>) -> Response {
    let results = match check {
        Some(check) => tokio::task::spawn_blocking(move || check())
            .await
            .unwrap_or_else(|e| vec![("checks", Err(e.to_string()))]),
        None => Vec::new(),
    };
    let ok = results.iter().all(|(_, r)| r.is_ok());
    let mut checks = Map::new();
    for (name, r) in results {
        checks.insert(
            name.into(),
            match r {
                Ok(()) => "ok".into(),
                Err(e) => e.into(),
            },
        );
    }
    let mut m = Map::new();
    m.insert(
        "status".into(),
        if ok { "ready" } else { "not ready" }.into(),
    );
    if let Some(id) = id {
        m.insert("controller_id".into(), id.into());
    }
    m.insert("checks".into(), Value::Object(checks));
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, &Value::Object(m))
}

async fn info(State(ctx): State<Ctx>) -> Response {
    let mut m = Map::new();
    m.insert("controller_id".into(), ctx.inbound.id().into());
    m.insert(
        "registered_handlers".into(),
        Value::Array(
            ctx.inbound
                .handled_types()
                .iter()
                .map(|t| Value::from(t.as_str()))
                .collect(),
        ),
    );
    m.insert("host".into(), ctx.addr.ip().to_string().into());
    m.insert("port".into(), i64::from(ctx.addr.port()).into());
    m.insert("role".into(), ctx.inbound.role().as_str().into());
    m.insert(
        "public_key".into(),
        ctx.inbound.public_key().to_base64().into(),
    );
    json_response(StatusCode::OK, &Value::Object(m))
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    metrics_response(ctx.inbound.metrics())
}

/// The exposition text of `metrics`.
pub(crate) fn metrics_response(metrics: &crate::metrics::Metrics) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        metrics.render(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Not Found")
}

pub(crate) async fn method_not_allowed() -> Response {
    detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

/// The REST router of a node listening on `addr`; `guard` applies the rate limit and the
/// admission lockout.
pub fn router(inbound: Arc<Inbound>, addr: SocketAddr, guard: Option<Arc<Guard>>) -> Router {
    router_with(inbound, addr, guard, None)
}

/// As [`router`], with what `GET /ready` checks.
pub fn router_with(
    inbound: Arc<Inbound>,
    addr: SocketAddr,
    guard: Option<Arc<Guard>>,
    ready_check: Option<ReadyCheck>,
) -> Router {
    let ctx = Ctx {
        inbound,
        addr,
        guard,
        ready: ready_check,
    };
    Router::new()
        .route("/message/{kind}", post(message))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            rate_limit,
        ))
        .with_state(ctx)
}

/// Serves REST on `listener` (TLS with `tls`) until `cancel` fires.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    guard: Option<Arc<Guard>>,
    tls: Option<&crate::tls::TlsMaterial>,
    limits: &super::listen::ConnectionLimits,
    ready: Option<ReadyCheck>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = match tls.filter(|m| m.has_identity()) {
        Some(m) => Some(tokio_rustls::TlsAcceptor::from(
            m.server_config(&[b"h2", b"http/1.1"])
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let metrics = inbound.metrics().clone();
    super::listen::serve_http(
        listener,
        router_with(inbound, addr, guard, ready),
        acceptor,
        limits,
        metrics,
        "rest",
        cancel,
    )
    .await
}
