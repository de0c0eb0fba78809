//! The gRPC server: `pdsno.v1` services, the standard `grpc.health.v1` health service, and
//! server reflection (v1 and v1alpha), so `grpcurl` and any gRPC client can discover and
//! call the API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::grpc::{ConvertError, TypedMessage, pb};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::guard::{Guard, Refusal};
use crate::inbound::{Inbound, InboundError, Reply};

/// A request message that carries one envelope.
trait IntoEnvelope {
    /// True for the admission calls (subject to the lockout before decoding).
    const ADMISSION: bool;
    fn to_envelope(self) -> Result<Envelope, ConvertError>;
}

impl IntoEnvelope for pb::ValidationRequest {
    const ADMISSION: bool = true;
    fn to_envelope(self) -> Result<Envelope, ConvertError> {
        self.into_envelope()
    }
}

impl IntoEnvelope for pb::ChallengeResponse {
    const ADMISSION: bool = true;
    fn to_envelope(self) -> Result<Envelope, ConvertError> {
        self.into_envelope()
    }
}

impl IntoEnvelope for pb::KeyAgreement {
    const ADMISSION: bool = false;
    fn to_envelope(self) -> Result<Envelope, ConvertError> {
        self.into_envelope()
    }
}

impl IntoEnvelope for pb::Envelope {
    const ADMISSION: bool = false;
    fn to_envelope(self) -> Result<Envelope, ConvertError> {
        self.into_envelope()
    }
}

/// Largest gRPC message accepted.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// Maps an inbound error to its gRPC status (the message is safe to show the client).
pub fn status_of(e: InboundError) -> Status {
    let msg = e.to_string();
    match e {
        InboundError::BadRequest(_)
        | InboundError::WrongRecipient { .. }
        | InboundError::TypeMismatch { .. } => Status::invalid_argument(msg),
        InboundError::Unsigned
        | InboundError::BadSignature(_)
        | InboundError::PeerMismatch { .. } => Status::unauthenticated(msg),
        InboundError::Forbidden(_) => Status::permission_denied(msg),
        InboundError::Unavailable(_) => Status::unavailable(msg),
        InboundError::NoHandler(_) => Status::unimplemented(msg),
        InboundError::Busy(_) => Status::resource_exhausted(msg),
        InboundError::Revoked { notice, .. } => Status::with_details(
            tonic::Code::PermissionDenied,
            msg,
            notice.to_json_bytes().into(),
        ),
    }
}

fn convert_err(e: ConvertError) -> Status {
    Status::invalid_argument(format!("not a valid envelope: {e}"))
}

/// The `pdsno.v1` services of one node.
#[derive(Clone)]
pub struct GrpcApi {
    inbound: Arc<Inbound>,
    guard: Option<Arc<Guard>>,
    /// The fingerprint of the certificate the listener serves (identity proofs bind to it).
    tls_leaf: Option<[u8; 32]>,
}

/// RESOURCE_EXHAUSTED with the wait in `retry-after` metadata (seconds).
pub fn refusal_status(r: &Refusal) -> Status {
    let mut s = Status::resource_exhausted(r.message());
    if let Ok(v) = r.retry_after().to_string().parse() {
        s.metadata_mut().insert("retry-after", v);
    }
    s
}

impl GrpcApi {
    /// The API over a node's receive path.
    pub fn new(inbound: Arc<Inbound>) -> Self {
        GrpcApi {
            inbound,
            guard: None,
            tls_leaf: None,
        }
    }

    /// Applies `guard` (rate limit, admission lockout) to every call.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    async fn run<T>(&self, req: Request<T>) -> Result<Reply, Status>
    where
        T: IntoEnvelope,
    {
        let conn = req
            .extensions()
            .get::<super::listen::GrpcConnectInfo>()
            .cloned();
        let ip = conn
            .as_ref()
            .and_then(|c| c.tcp.remote_addr)
            .or_else(|| req.remote_addr())
            .map(|a| a.ip());
        let peer_ids = conn.map(|c| c.peer_controllers).unwrap_or_default();
        let admission_call = T::ADMISSION;
        if let (Some(g), Some(ip)) = (&self.guard, ip) {
            g.check_rate(ip, "grpc").map_err(|r| refusal_status(&r))?;
            if admission_call {
                g.check_admission(ip, "grpc")
                    .map_err(|r| refusal_status(&r))?;
            }
        }
        let env = req.into_inner().to_envelope().map_err(convert_err)?;
        let admission = admission_call
            || matches!(
                env.message_type,
                MessageType::ValidationRequest | MessageType::ChallengeResponse
            );
        if !admission_call
            && admission
            && let (Some(g), Some(ip)) = (&self.guard, ip)
        {
            g.check_admission(ip, "grpc")
                .map_err(|r| refusal_status(&r))?;
        }
        let inbound = self.inbound.clone();
        let r = tokio::task::spawn_blocking(move || {
            inbound.handle_from(env, None, "grpc", &peer_ids, ip)
        })
        .await
        .map_err(|_| Status::internal("handler failed"))?;
        if admission && let (Some(g), Some(ip)) = (&self.guard, ip) {
            crate::guard::record_admission(g, ip, &r);
        }
        r.map_err(status_of)
    }

    async fn run_expect<T: IntoEnvelope>(&self, req: Request<T>) -> Result<Envelope, Status> {
        match self.run(req).await? {
            Reply::Envelope(e) => Ok(*e),
            Reply::Accepted => Err(Status::internal("handler produced no reply")),
        }
    }
}

#[tonic::async_trait]
impl pb::admission_server::Admission for GrpcApi {
    async fn request_validation(
        &self,
        req: Request<pb::ValidationRequest>,
    ) -> Result<Response<pb::AdmissionStep>, Status> {
        let reply = self.run_expect(req).await?;
        let step = match reply.message_type {
            MessageType::Challenge => pb::admission_step::Step::Challenge(
                pb::Challenge::from_envelope(&reply).map_err(|_| Status::internal("bad reply"))?,
            ),
            _ => pb::admission_step::Step::Result(
                pb::ValidationResult::from_envelope(&reply)
                    .map_err(|_| Status::internal("bad reply"))?,
            ),
        };
        Ok(Response::new(pb::AdmissionStep { step: Some(step) }))
    }

    async fn respond_to_challenge(
        &self,
        req: Request<pb::ChallengeResponse>,
    ) -> Result<Response<pb::ValidationResult>, Status> {
        let reply = self.run_expect(req).await?;
        Ok(Response::new(
            pb::ValidationResult::from_envelope(&reply)
                .map_err(|_| Status::internal("bad reply"))?,
        ))
    }
}

#[tonic::async_trait]
impl pb::messaging_server::Messaging for GrpcApi {
    async fn exchange(&self, req: Request<pb::Envelope>) -> Result<Response<pb::Envelope>, Status> {
        match self.run(req).await? {
            Reply::Envelope(e) => Ok(Response::new(pb::Envelope::from_envelope(&e))),
            Reply::Accepted => Ok(Response::new(pb::Envelope::default())),
        }
    }
}

#[tonic::async_trait]
impl pb::key_exchange_server::KeyExchange for GrpcApi {
    async fn exchange(
        &self,
        req: Request<pb::KeyAgreement>,
    ) -> Result<Response<pb::KeyAgreement>, Status> {
        let reply = self.run_expect(req).await?;
        Ok(Response::new(
            pb::KeyAgreement::from_envelope(&reply).map_err(|_| Status::internal("bad reply"))?,
        ))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for GrpcApi {
    async fn get_info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let i = &self.inbound;
        let nonce = req.into_inner().identity_nonce;
        let identity_proof = match nonce.len() {
            0 => Vec::new(),
            32 => i
                .trust()
                .identity
                .sign(&crate::tls::parent_proof_message(
                    &nonce,
                    self.tls_leaf.as_ref(),
                ))
                .to_vec(),
            n => {
                return Err(Status::invalid_argument(format!(
                    "identity_nonce must be 32 bytes, got {n}"
                )));
            }
        };
        Ok(Response::new(pb::NodeInfo {
            identity_proof,
            controller_id: i.id().to_owned(),
            role: i.role().as_str().to_owned(),
            region: i.region().unwrap_or_default().to_owned(),
            public_key: i.public_key().to_base64(),
            handlers: i
                .handled_types()
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
        }))
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves.
///
/// # Errors
/// When reflection cannot be built or the server fails.
pub async fn serve(
    listener: TcpListener,
    api: GrpcApi,
    admin: Option<crate::admin::AdminApi>,
    tls: Option<&crate::tls::TlsMaterial>,
    limits: &super::listen::ConnectionLimits,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let metrics = api.inbound.metrics().clone();
    let api = GrpcApi {
        tls_leaf: tls.and_then(crate::tls::TlsMaterial::leaf_fingerprint),
        ..api
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::admission_server::AdmissionServer<GrpcApi>>()
        .await;
    reporter
        .set_serving::<pb::messaging_server::MessagingServer<GrpcApi>>()
        .await;
    reporter
        .set_serving::<pb::node_server::NodeServer<GrpcApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| e.to_string())?;
    let acceptor = match tls.filter(|m| m.has_identity()) {
        Some(m) => Some(tokio_rustls::TlsAcceptor::from(
            m.server_config(&[b"h2"])
                .map_err(|e| format!("gRPC TLS: {e}"))?,
        )),
        None => None,
    };
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::admission_server::AdmissionServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            pb::messaging_server::MessagingServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            pb::key_exchange_server::KeyExchangeServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(pb::node_server::NodeServer::new(api).max_decoding_message_size(MAX_MESSAGE))
        .add_optional_service(
            admin.map(|a| {
                pb::admin_server::AdminServer::new(a).max_decoding_message_size(MAX_MESSAGE)
            }),
        )
        .serve_with_incoming_shutdown(
            super::listen::grpc_incoming(listener, limits, acceptor, metrics, cancel.clone()),
            cancel.cancelled_owned(),
        )
        .await
        .map_err(|e| e.to_string())
}

/// Serves only the admin service on `listener` (`--listen-admin`), with the same TLS and
/// connection cap as the gRPC listener.
///
/// # Errors
/// When the TLS material is unusable or the server fails.
pub async fn serve_admin(
    listener: TcpListener,
    admin: crate::admin::AdminApi,
    tls: Option<&crate::tls::TlsMaterial>,
    limits: &super::listen::ConnectionLimits,
    metrics: Arc<crate::metrics::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let acceptor = match tls.filter(|m| m.has_identity()) {
        Some(m) => Some(tokio_rustls::TlsAcceptor::from(
            m.server_config(&[b"h2"])
                .map_err(|e| format!("admin TLS: {e}"))?,
        )),
        None => None,
    };
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(120))
        .concurrency_limit_per_connection(16)
        .add_service(
            pb::admin_server::AdminServer::new(admin).max_decoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            super::listen::grpc_incoming(listener, limits, acceptor, metrics, cancel.clone()),
            cancel.cancelled_owned(),
        )
        .await
        .map_err(|e| e.to_string())
}

/// Binds `addr` for the gRPC server.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for gRPC on {addr}: {e}"))
}
