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

use crate::inbound::{Inbound, InboundError, Reply};

/// Largest gRPC message accepted.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// Maps an inbound error to its gRPC status (the message is safe to show the client).
pub fn status_of(e: InboundError) -> Status {
    let msg = e.to_string();
    match e {
        InboundError::BadRequest(_)
        | InboundError::WrongRecipient { .. }
        | InboundError::TypeMismatch { .. } => Status::invalid_argument(msg),
        InboundError::Unsigned | InboundError::BadSignature(_) => Status::unauthenticated(msg),
        InboundError::Forbidden(_) => Status::permission_denied(msg),
        InboundError::Unavailable(_) => Status::unavailable(msg),
        InboundError::NoHandler(_) => Status::unimplemented(msg),
        InboundError::Busy(_) => Status::resource_exhausted(msg),
    }
}

fn convert_err(e: ConvertError) -> Status {
    Status::invalid_argument(format!("not a valid envelope: {e}"))
}

/// The `pdsno.v1` services of one node.
#[derive(Clone)]
pub struct GrpcApi {
    inbound: Arc<Inbound>,
}

impl GrpcApi {
    /// The API over a node's receive path.
    pub fn new(inbound: Arc<Inbound>) -> Self {
        GrpcApi { inbound }
    }

    async fn run(&self, env: Envelope) -> Result<Reply, Status> {
        let inbound = self.inbound.clone();
        tokio::task::spawn_blocking(move || inbound.handle(env, None))
            .await
            .map_err(|_| Status::internal("handler failed"))?
            .map_err(status_of)
    }

    async fn run_expect(&self, env: Envelope) -> Result<Envelope, Status> {
        match self.run(env).await? {
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
        let env = req.into_inner().into_envelope().map_err(convert_err)?;
        let reply = self.run_expect(env).await?;
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
        let env = req.into_inner().into_envelope().map_err(convert_err)?;
        let reply = self.run_expect(env).await?;
        Ok(Response::new(
            pb::ValidationResult::from_envelope(&reply)
                .map_err(|_| Status::internal("bad reply"))?,
        ))
    }
}

#[tonic::async_trait]
impl pb::messaging_server::Messaging for GrpcApi {
    async fn exchange(&self, req: Request<pb::Envelope>) -> Result<Response<pb::Envelope>, Status> {
        let env = req.into_inner().into_envelope().map_err(convert_err)?;
        match self.run(env).await? {
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
        let env = req.into_inner().into_envelope().map_err(convert_err)?;
        let reply = self.run_expect(env).await?;
        Ok(Response::new(
            pb::KeyAgreement::from_envelope(&reply).map_err(|_| Status::internal("bad reply"))?,
        ))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for GrpcApi {
    async fn get_info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let i = &self.inbound;
        Ok(Response::new(pb::NodeInfo {
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
    admin: crate::admin::AdminApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
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
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
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
        .add_service(
            pb::admin_server::AdminServer::new(admin).max_decoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
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
