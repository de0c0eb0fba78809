//! The outgoing gRPC link to a parent: pooled HTTP/2 connection, per-request timeouts, and
//! retries with exponential backoff and jitter on connection errors only (a child that
//! starts before its parent waits instead of failing). Application errors are never
//! retried.
//!
//! Over `https://` the link runs its own TLS (rustls): the CA's checks, then, when the
//! child pinned its parent's controller id, a certificate naming it
//! (`urn:pdsno:controller:ID`); [`ParentLink::info_proved`] has the parent prove it holds
//! a pinned Ed25519 identity key, bound to the certificate it serves, after which the link
//! accepts no other certificate.

use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::envelope::Envelope;
use pdsno_shared::grpc::{TypedMessage, pb};
use rand::RngExt;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Why a call to the parent failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Could not reach the parent (connection refused, reset, DNS, ...): worth retrying.
    #[error("parent unreachable: {0}")]
    Unavailable(String),
    /// The parent answered with an error status.
    #[error("parent refused the call ({code:?}): {message}")]
    Status {
        /// The gRPC code.
        code: Code,
        /// The parent's message.
        message: String,
    },
    /// The parent's answer is not a valid envelope.
    #[error("invalid answer from the parent: {0}")]
    BadReply(String),
    /// The parent refused the call saying this controller is revoked, with a notice signed
    /// by its identity key (the node checks it before believing it).
    #[error("parent refused the call: {message}")]
    Revoked {
        /// The parent's message.
        message: String,
        /// The notice (a signed VALIDATION_RESULT, JSON).
        notice: Vec<u8>,
    },
    /// The URL is unusable.
    #[error("invalid parent URL {0:?}")]
    BadUrl(String),
    /// The TLS handshake failed (expired certificate, unknown CA, wrong name, or a client
    /// certificate the parent refused): not retried, the configuration must change.
    #[error("TLS with the parent failed: {0}")]
    Tls(String),
    /// The parent did not prove the identity the child pinned: not retried, and the child
    /// sends nothing else to it (no bootstrap token).
    #[error("the parent did not prove its identity: {0}")]
    Identity(String),
}

impl LinkError {
    /// True for connection errors (the only ones retried).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LinkError::Unavailable(_))
    }
}

pub(crate) fn from_status(s: tonic::Status) -> LinkError {
    if s.code() == Code::Unavailable || s.code() == Code::Unknown {
        if let Some(reason) = crate::tls::handshake_reason(&s) {
            return LinkError::Tls(reason);
        }
        let m = s.message();
        if m.contains("certificate") || m.contains("HandshakeFailure") || m.contains("tls") {
            return LinkError::Tls(m.to_owned());
        }
    }
    match s.code() {
        Code::PermissionDenied if !s.details().is_empty() => LinkError::Revoked {
            message: s.message().to_owned(),
            notice: s.details().to_vec(),
        },
        Code::Unavailable => LinkError::Unavailable(s.message().to_owned()),
        // The connection broke under an open call (the parent died mid-request): tonic
        // says Unknown with a transport error. The call never completed; retry it.
        Code::Unknown if s.message().contains("transport error") => {
            LinkError::Unavailable(s.message().to_owned())
        }
        code => LinkError::Status {
            code,
            message: s.message().to_owned(),
        },
    }
}

/// What a child requires its parent to prove before it sends its bootstrap token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentPin {
    /// The parent's controller id: over TLS its certificate must name it
    /// (`urn:pdsno:controller:ID`), and it must describe itself with it.
    pub id: Option<String>,
    /// The parent's Ed25519 identity key: it must prove holding it
    /// ([`ParentLink::info_proved`]).
    pub public_key: Option<pdsno_shared::keys::PublicKey>,
}

/// A connection to a parent's gRPC endpoint.
#[derive(Clone, Debug)]
pub struct ParentLink {
    url: String,
    channel: Channel,
    /// Over TLS: the parent's certificate as seen, and the one pinned after a proof.
    peer: Option<Arc<crate::tls::ParentPeer>>,
    /// The parent's receive path when it runs in this process ([`super::bus`]): requests
    /// go there first, and over gRPC once it has stopped.
    local: Option<std::sync::Weak<crate::inbound::Inbound>>,
}

/// A TLS connector for tonic: TCP to the URI's host and port, then TLS with `cfg`,
/// checking the certificate against `name`.
fn tls_connector(
    cfg: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let (cfg, name) = (cfg.clone(), name.clone());
        async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| std::io::Error::other("no host in the parent URL"))?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

impl ParentLink {
    /// A lazily connecting link to `url` (`http://host:port`).
    ///
    /// # Errors
    /// [`LinkError::BadUrl`] for an unusable URL.
    pub fn new(url: &str) -> Result<Self, LinkError> {
        Self::with_tls(url, crate::tls::installed_client().map(|m| &**m))
    }

    /// A lazily connecting link to `url` using `tls` for `https://` (without it, the system
    /// roots and no client certificate).
    ///
    /// # Errors
    /// [`LinkError::BadUrl`] for an unusable URL, or a plaintext URL when `tls` refuses
    /// plaintext.
    pub fn with_tls(url: &str, tls: Option<&crate::tls::TlsMaterial>) -> Result<Self, LinkError> {
        Self::pinned(url, tls, None)
    }

    /// As [`ParentLink::with_tls`]; over `https://` with `parent_id`, the parent's
    /// certificate must also name that controller (`urn:pdsno:controller:ID`), else the
    /// handshake fails with [`LinkError::Tls`].
    ///
    /// # Errors
    /// As [`ParentLink::with_tls`].
    pub fn pinned(
        url: &str,
        tls: Option<&crate::tls::TlsMaterial>,
        parent_id: Option<&str>,
    ) -> Result<Self, LinkError> {
        let https = url.starts_with("https://");
        if !https && tls.is_some_and(|m| m.options().require_tls) {
            return Err(LinkError::BadUrl(format!(
                "{url} (plaintext is refused under require_tls)"
            )));
        }
        let bad = || LinkError::BadUrl(url.to_owned());
        let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| bad())?;
        let ep_url = match url.strip_prefix("https://") {
            // TLS is ours (below); tonic speaks HTTP/2 over it.
            Some(rest) => format!("http://{rest}"),
            None => url.to_owned(),
        };
        let ep = Endpoint::from_shared(ep_url)
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if !https {
            return Ok(ParentLink {
                url: url.to_owned(),
                channel: ep.connect_lazy(),
                peer: None,
                local: None,
            });
        }
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(bad)?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|_| bad())?;
        let peer = Arc::new(crate::tls::ParentPeer::default());
        let cfg = crate::tls::parent_client_config(tls, parent_id, peer.clone())
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        Ok(ParentLink {
            url: url.to_owned(),
            channel: ep.connect_with_connector_lazy(tls_connector(Arc::new(cfg), name)),
            peer: Some(peer),
            local: None,
        })
    }

    /// The same link, carried by `bus` when the parent at this URL runs in this process.
    #[must_use]
    pub fn over(mut self, bus: Option<&super::bus::Bus>) -> Self {
        self.local = bus.and_then(|b| b.lookup(&self.url));
        self
    }

    /// True when requests go over the in-process bus.
    pub fn is_local(&self) -> bool {
        self.local.as_ref().is_some_and(|w| w.strong_count() > 0)
    }

    /// Over the bus: the parent's answer, `None` when it did not run here (or stopped).
    async fn local_call(&self, env: &Envelope) -> Option<Result<Option<Envelope>, LinkError>> {
        let local = self.local.as_ref().filter(|w| w.strong_count() > 0)?;
        Some(super::bus::deliver(local, env).await.map(|r| match r {
            crate::inbound::Reply::Envelope(e) => Some(*e),
            crate::inbound::Reply::Accepted => None,
        }))
    }

    async fn local_expect(&self, env: &Envelope) -> Option<Result<Envelope, LinkError>> {
        let r = self.local_call(env).await?;
        Some(r.and_then(|e| e.ok_or_else(|| LinkError::BadReply("no answer".into()))))
    }

    /// The gRPC channel (for calling other services over this link).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The parent's self-description.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn info(&self) -> Result<pb::NodeInfo, LinkError> {
        let mut c = pb::node_client::NodeClient::new(self.channel.clone());
        c.get_info(pb::InfoRequest::default())
            .await
            .map(tonic::Response::into_inner)
            .map_err(from_status)
    }

    /// The parent's self-description, with its proof that it holds the identity key `key`:
    /// a signature of a fresh nonce and of the certificate it serves us (see
    /// [`crate::tls::parent_proof_message`]). After it, the link accepts only that
    /// certificate.
    ///
    /// # Errors
    /// [`LinkError::Identity`] when the parent does not prove it (a parent without
    /// support for proofs, another key, a proof for another certificate); else
    /// [`LinkError`].
    pub async fn info_proved(
        &self,
        key: &pdsno_shared::keys::PublicKey,
    ) -> Result<pb::NodeInfo, LinkError> {
        let mut nonce = [0u8; 32];
        rand::rng().fill(&mut nonce[..]);
        let mut c = pb::node_client::NodeClient::new(self.channel.clone());
        let info = c
            .get_info(pb::InfoRequest {
                identity_nonce: nonce.to_vec(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(from_status)?;
        if info.identity_proof.is_empty() {
            return Err(LinkError::Identity(format!(
                "{} sent no identity proof (a version without support for a pinned parent key?)",
                self.url
            )));
        }
        let leaf = match &self.peer {
            Some(p) => Some(p.last_leaf().ok_or_else(|| {
                LinkError::Identity("no TLS certificate seen from the parent".into())
            })?),
            None => None,
        };
        let msg = crate::tls::parent_proof_message(&nonce, leaf.as_ref());
        if !key.verify(&msg, &info.identity_proof) {
            let detail = if info.public_key == key.to_base64() {
                "a proof that does not verify for the TLS certificate it serves"
            } else {
                "a proof by another key than the pinned one"
            };
            return Err(LinkError::Identity(format!(
                "{} (claiming to be {}) sent {detail}",
                self.url,
                info.controller_id.chars().take(128).collect::<String>()
            )));
        }
        if let (Some(p), Some(l)) = (&self.peer, leaf) {
            p.pin_leaf(l);
        }
        Ok(info)
    }

    /// VALIDATION_REQUEST → CHALLENGE or VALIDATION_RESULT.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn request_validation(&self, env: &Envelope) -> Result<Envelope, LinkError> {
        if let Some(r) = self.local_expect(env).await {
            return r;
        }
        let msg = pb::ValidationRequest::from_envelope(env)
            .map_err(|e| LinkError::BadReply(e.to_string()))?;
        let mut c = pb::admission_client::AdmissionClient::new(self.channel.clone());
        let step = c
            .request_validation(msg)
            .await
            .map_err(from_status)?
            .into_inner();
        match step.step {
            Some(pb::admission_step::Step::Challenge(ch)) => ch
                .into_envelope()
                .map_err(|e| LinkError::BadReply(e.to_string())),
            Some(pb::admission_step::Step::Result(r)) => r
                .into_envelope()
                .map_err(|e| LinkError::BadReply(e.to_string())),
            None => Err(LinkError::BadReply("empty admission step".into())),
        }
    }

    /// CHALLENGE_RESPONSE → VALIDATION_RESULT.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn respond_to_challenge(&self, env: &Envelope) -> Result<Envelope, LinkError> {
        if let Some(r) = self.local_expect(env).await {
            return r;
        }
        let msg = pb::ChallengeResponse::from_envelope(env)
            .map_err(|e| LinkError::BadReply(e.to_string()))?;
        let mut c = pb::admission_client::AdmissionClient::new(self.channel.clone());
        let r = c
            .respond_to_challenge(msg)
            .await
            .map_err(from_status)?
            .into_inner();
        r.into_envelope()
            .map_err(|e| LinkError::BadReply(e.to_string()))
    }

    /// A key agreement step (KEY_EXCHANGE_INIT or KEY_ROTATION_REQUEST) and its answer.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn key_exchange(&self, env: &Envelope) -> Result<Envelope, LinkError> {
        if let Some(r) = self.local_expect(env).await {
            return r;
        }
        let msg =
            pb::KeyAgreement::from_envelope(env).map_err(|e| LinkError::BadReply(e.to_string()))?;
        let mut c = pb::key_exchange_client::KeyExchangeClient::new(self.channel.clone());
        let r = c.exchange(msg).await.map_err(from_status)?.into_inner();
        r.into_envelope()
            .map_err(|e| LinkError::BadReply(e.to_string()))
    }

    /// Any other request/response envelope; `None` when the parent accepted without reply.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn exchange(&self, env: &Envelope) -> Result<Option<Envelope>, LinkError> {
        if let Some(r) = self.local_call(env).await {
            return r;
        }
        let mut c = pb::messaging_client::MessagingClient::new(self.channel.clone());
        let r = c
            .exchange(pb::Envelope::from_envelope(env))
            .await
            .map_err(from_status)?
            .into_inner();
        if r.header.is_none() && r.message_type.is_empty() {
            return Ok(None);
        }
        r.into_envelope()
            .map(Some)
            .map_err(|e| LinkError::BadReply(e.to_string()))
    }
}

/// Backoff settings for retries.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based): exponential, full jitter in
    /// the upper half.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.as_millis().max(1) as u64;
        let cap = self.max.as_millis().max(1) as u64;
        let exp = base
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
            .min(cap);
        Duration::from_millis(rand::rng().random_range(exp / 2..=exp))
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or `deadline` passes,
/// sleeping per `backoff` between connection failures.
///
/// # Errors
/// The last error.
pub async fn retry<T, F, Fut>(
    what: &str,
    backoff: Backoff,
    deadline: Option<Duration>,
    mut op: F,
) -> Result<T, LinkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LinkError>>,
{
    let start = tokio::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                attempt += 1;
                let wait = backoff.delay(attempt);
                if deadline.is_some_and(|d| start.elapsed() + wait > d) {
                    return Err(e);
                }
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::info!(%what, attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "waiting for the parent");
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 1..10 {
            let d = b.delay(attempt);
            let exp = (100u64 << (attempt - 1)).min(2000);
            assert!(
                d >= Duration::from_millis(exp / 2) && d <= Duration::from_millis(exp),
                "{attempt}: {d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_connection_errors() {
        let mut calls = 0;
        let r: Result<(), _> = retry("x", Backoff::default(), None, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(LinkError::Unavailable("refused".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!((r, calls), (Ok(()), 3));
        let mut calls = 0;
        let r: Result<(), _> = retry("x", Backoff::default(), None, || {
            calls += 1;
            async {
                Err(LinkError::Status {
                    code: Code::InvalidArgument,
                    message: "no".into(),
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "application errors are not retried");
        let r: Result<(), _> = retry(
            "x",
            Backoff::default(),
            Some(Duration::from_secs(1)),
            || async { Err(LinkError::Unavailable("down".into())) },
        )
        .await;
        assert!(
            matches!(r, Err(LinkError::Unavailable(_))),
            "gives up at the deadline"
        );
    }
}
