//! TLS for every listener (gRPC, REST, the embedded broker) and every client (the parent
//! link, MQTT), with rustls on the ring provider.
//!
//! - `tls_cert` + `tls_key` turn TLS on for this node's listeners; `tls_ca` is the trust
//!   anchor for the servers we call and for client certificates;
//! - `require_client_cert` refuses a client without a certificate signed by `tls_ca`;
//! - `require_tls` refuses plaintext: no plaintext listener, no `http://` / `mqtt://` peer.
//!
//! Certificates name the controller they belong to with the URI SAN
//! `urn:pdsno:controller:ID` ([`controller_ids`]). A child link checks the parent's
//! certificate with [`ParentVerifier`] (the CA's checks, then the pinned parent id, then the
//! certificate an identity proof was bound to, [`parent_proof_message`]); the listeners hand
//! the client certificate's controller ids to the receive path, which refuses a message from
//! another sender.
//!
//! Problems are found at startup and named: unreadable or empty files, a key that does not
//! belong to the certificate, and (when a CA is given) our own certificate expired or not
//! issued by that CA. A peer's bad certificate fails its handshake with rustls's reason
//! (expired, unknown issuer, not valid for the name), which the parent link reports as a
//! TLS error instead of retrying.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use zeroize::Zeroizing;

/// TLS settings as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// This node's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Trusted CA certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate.
    pub require_client_cert: bool,
    /// Refuse plaintext.
    pub require_tls: bool,
}

impl TlsOptions {
    /// Checks the combination; `Err((config key, message))`.
    ///
    /// # Errors
    /// A key without a certificate (or the reverse), mutual TLS without a CA or without our
    /// own certificate, `require_tls` without a certificate.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(("tls_key", "tls_cert needs tls_key".into())),
            (None, Some(_)) => return Err(("tls_cert", "tls_key needs tls_cert".into())),
            _ => {}
        }
        if self.require_client_cert && self.ca.is_none() {
            return Err((
                "tls_ca",
                "require_client_cert needs tls_ca (the CA that signs client certificates)".into(),
            ));
        }
        if (self.require_client_cert || self.require_tls) && self.cert.is_none() {
            return Err((
                "tls_cert",
                "require_tls and require_client_cert need this node's certificate (tls_cert, tls_key)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// True when this node serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.cert.is_some()
    }
}

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

fn read(what: &str, p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", p.display())))
}

fn certs_from(what: &str, p: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what} {}: not PEM certificates: {e}", p.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {}: no certificate in the file",
            p.display()
        )));
    }
    Ok(certs)
}

/// The ring provider every TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loaded TLS material.
pub struct TlsMaterial {
    opts: TlsOptions,
    key_pem: Zeroizing<Vec<u8>>,
    certs: Vec<CertificateDer<'static>>,
    roots: Option<Arc<RootCertStore>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert", &self.opts.cert)
            .field("ca", &self.opts.ca)
            .field("key", &"<redacted>")
            .field("require_client_cert", &self.opts.require_client_cert)
            .field("require_tls", &self.opts.require_tls)
            .finish()
    }
}

fn check_issued(
    certs: &[CertificateDer<'static>],
    roots: &RootCertStore,
    what: &str,
) -> Result<(), TlsError> {
    let Some(leaf) = certs.first() else {
        return Err(TlsError(format!("{what}: no certificate")));
    };
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| TlsError(format!("{what}: {e}")))?;
    let as_server = rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &certs[1..],
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    );
    match as_server {
        // A client-only certificate (`pdsno certs issue --role client`): check it as one.
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::InvalidPurpose
            | rustls::CertificateError::InvalidPurposeContext { .. },
        )) => {
            let v =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
                    .build()
                    .map_err(|e| TlsError(format!("{what}: {e}")))?;
            v.verify_client_cert(leaf, &certs[1..], UnixTime::now())
                .map(|_| ())
                .map_err(|e| TlsError(format!("{what} is not valid under tls_ca: {e}")))
        }
        r => r.map_err(|e| TlsError(format!("{what} is not valid under tls_ca: {e}"))),
    }
}

impl TlsMaterial {
    /// Loads and checks the files named by `opts`; `None` when TLS is not configured at all.
    ///
    /// # Errors
    /// Unreadable or malformed files, a mismatched key, an expired certificate or one not
    /// issued by the CA.
    pub fn load(opts: &TlsOptions) -> Result<Option<Arc<TlsMaterial>>, TlsError> {
        opts.check()
            .map_err(|(k, m)| TlsError(format!("{k}: {m}")))?;
        if opts.cert.is_none() && opts.ca.is_none() {
            return Ok(None);
        }
        let roots = match &opts.ca {
            Some(p) => {
                let pem = read("tls_ca", p)?;
                let mut store = RootCertStore::empty();
                for c in certs_from("tls_ca", p, &pem)? {
                    store
                        .add(c)
                        .map_err(|e| TlsError(format!("tls_ca {}: {e}", p.display())))?;
                }
                Some(Arc::new(store))
            }
            None => None,
        };
        let (key_pem, certs) = match (&opts.cert, &opts.key) {
            (Some(cp), Some(kp)) => {
                let cert_pem = read("tls_cert", cp)?;
                let key_pem = Zeroizing::new(read("tls_key", kp)?);
                let certs = certs_from("tls_cert", cp, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    TlsError(format!(
                        "tls_key {}: no usable private key: {e}",
                        kp.display()
                    ))
                })?;
                let signing = provider()
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| TlsError(format!("tls_key {}: {e}", kp.display())))?;
                rustls::sign::CertifiedKey::new(certs.clone(), signing)
                    .keys_match()
                    .map_err(|e| {
                        TlsError(format!(
                            "tls_key {} does not belong to tls_cert {}: {e}",
                            kp.display(),
                            cp.display()
                        ))
                    })?;
                if let Some(store) = &roots {
                    check_issued(&certs, store, &format!("tls_cert {}", cp.display()))?;
                }
                (key_pem, certs)
            }
            _ => (Zeroizing::new(Vec::new()), Vec::new()),
        };
        Ok(Some(Arc::new(TlsMaterial {
            opts: opts.clone(),
            key_pem,
            certs,
            roots,
        })))
    }

    /// The options it was loaded from.
    pub fn options(&self) -> &TlsOptions {
        &self.opts
    }

    /// True when this node has its own certificate (serves TLS, can present a client cert).
    pub fn has_identity(&self) -> bool {
        !self.certs.is_empty()
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| TlsError(format!("tls_key: {e}")))
    }

    /// A rustls server configuration (gRPC, REST, broker), advertising `alpn`.
    ///
    /// # Errors
    /// Without a certificate, or when rustls refuses the material.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        if !self.has_identity() {
            return Err(TlsError("serving TLS needs tls_cert and tls_key".into()));
        }
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = match &self.roots {
            Some(roots) => {
                let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
                let v = if self.opts.require_client_cert {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| TlsError(e.to_string()))?)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(self.certs.clone(), self.private_key()?)
            .map_err(|e| TlsError(e.to_string()))?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// A rustls client configuration (MQTT): trusts `tls_ca` (else the system roots) and
    /// presents our certificate when we have one.
    ///
    /// # Errors
    /// When rustls refuses the material.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        client_config(Some(self))
    }

    /// The gRPC client side (tonic), for operator tools calling a node's admin service:
    /// trusts `tls_ca` (else the system roots) and presents our certificate, read again
    /// from the configured files.
    ///
    /// # Errors
    /// When a file cannot be read.
    pub fn tonic_client(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut c = tonic::transport::ClientTlsConfig::new();
        c = match &self.opts.ca {
            Some(ca) => {
                c.ca_certificate(tonic::transport::Certificate::from_pem(read("tls_ca", ca)?))
            }
            None => c.with_native_roots(),
        };
        if self.has_identity()
            && let Some(cert) = &self.opts.cert
        {
            c = c.identity(tonic::transport::Identity::from_pem(
                read("tls_cert", cert)?,
                &self.key_pem[..],
            ));
        }
        Ok(c)
    }
}

/// A client configuration trusting `tls_ca` (or the system roots without one), with our
/// certificate as client identity when there is one.
///
/// # Errors
/// When rustls refuses the material.
pub fn client_config(m: Option<&TlsMaterial>) -> Result<rustls::ClientConfig, TlsError> {
    client_config_for(m, None)
}

/// As [`client_config`], trusting the CA certificates in `ca_file` instead when given.
///
/// # Errors
/// An unreadable CA file, or when rustls refuses the material.
pub fn client_config_for(
    m: Option<&TlsMaterial>,
    ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let from_file = match ca_file {
        Some(p) => {
            let pem = read("CA file", p)?;
            let mut store = RootCertStore::empty();
            for c in certs_from("CA file", p, &pem)? {
                store
                    .add(c)
                    .map_err(|e| TlsError(format!("CA file {}: {e}", p.display())))?;
            }
            Some(Arc::new(store))
        }
        None => None,
    };
    let roots = from_file.unwrap_or_else(|| roots_of(m));
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError(format!("no usable trust anchor: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_webpki_verifier(verifier);
    match m {
        Some(m) if m.has_identity() => builder
            .with_client_auth_cert(m.certs.clone(), m.private_key()?)
            .map_err(|e| TlsError(e.to_string())),
        _ => Ok(builder.with_no_client_auth()),
    }
}

static CLIENT: OnceLock<Arc<TlsMaterial>> = OnceLock::new();

/// Makes `m` the material of every outgoing link of this process (the parent link, tools).
/// The first call wins; later calls are ignored.
pub fn install_client(m: Arc<TlsMaterial>) {
    let _ = CLIENT.set(m);
}

/// The material installed by [`install_client`].
pub fn installed_client() -> Option<&'static Arc<TlsMaterial>> {
    CLIENT.get()
}

/// True when plaintext links are refused in this process.
pub fn plaintext_refused() -> bool {
    installed_client().is_some_and(|m| m.opts.require_tls)
}

fn describe(e: &rustls::Error) -> String {
    match e {
        // Our own certificate checks: their message, not rustls's debug form.
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            format!("invalid peer certificate: {}", o.0)
        }
        e => e.to_string(),
    }
}

/// Turns an error chain from a TLS handshake into its reason, if it is one.
pub fn handshake_reason(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(describe(r));
        }
        cur = e.source();
    }
    None
}

/// The URI a certificate carries (as a subject alternative name) to name the controller it
/// belongs to: `urn:pdsno:controller:<id>`.
pub const CONTROLLER_URN: &str = "urn:pdsno:controller:";

/// The controller ids a DER certificate names (its `urn:pdsno:controller:` URIs); empty
/// for a certificate that names none (an operator's, or one issued before controller
/// names existed) or that cannot be parsed.
pub fn controller_ids(cert: &[u8]) -> Vec<String> {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = c.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(CONTROLLER_URN),
            _ => None,
        })
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// SHA-256 of a DER certificate: what a parent's identity proof is bound to.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(cert).into()
}

impl TlsMaterial {
    /// The fingerprint of our own (leaf) certificate, when we have one.
    pub fn leaf_fingerprint(&self) -> Option<[u8; 32]> {
        self.certs.first().map(|c| fingerprint(c))
    }
}

/// The bytes a parent signs with its Ed25519 identity key to prove, before a child sends
/// its bootstrap token, that it holds that key: a context string, the child's fresh nonce,
/// and the fingerprint of the TLS certificate the parent serves (all zero over plaintext).
/// The fingerprint binds the proof to the TLS connection: a proof relayed from the real
/// parent through a server with another certificate does not verify.
pub fn parent_proof_message(nonce: &[u8], leaf: Option<&[u8; 32]>) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + nonce.len());
    m.extend_from_slice(b"pdsno parent identity proof v1\0");
    m.extend_from_slice(leaf.unwrap_or(&[0u8; 32]));
    m.extend_from_slice(nonce);
    m
}

/// What the parent link saw of the parent's certificate, and what it requires of it.
#[derive(Debug, Default)]
pub struct ParentPeer {
    state: std::sync::Mutex<ParentPeerState>,
}

#[derive(Debug, Default)]
struct ParentPeerState {
    last_leaf: Option<[u8; 32]>,
    pinned_leaf: Option<[u8; 32]>,
}

impl ParentPeer {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParentPeerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The fingerprint of the certificate of the latest TLS connection.
    pub fn last_leaf(&self) -> Option<[u8; 32]> {
        self.lock().last_leaf
    }

    /// From now on, only a parent serving exactly this certificate is accepted (the one
    /// that proved the pinned identity key).
    pub fn pin_leaf(&self, leaf: [u8; 32]) {
        self.lock().pinned_leaf = Some(leaf);
    }
}

/// Why a parent's certificate was refused beyond the CA's checks.
#[derive(Debug, thiserror::Error)]
pub enum ParentCertError {
    /// The certificate does not name the expected parent controller.
    #[error(
        "the parent's certificate names controller {found} but {expected} was expected (--parent-id)"
    )]
    WrongController {
        /// The configured parent id.
        expected: String,
        /// What the certificate names (`none` without a controller name).
        found: String,
    },
    /// Another certificate than the one that proved the parent's identity key.
    #[error("the parent's certificate changed after it proved its identity key")]
    ChangedAfterProof,
}

/// Checks a parent's certificate: the CA's checks (chain, validity, name, server
/// purpose), then the configured parent controller id, then the certificate pinned by an
/// identity proof; records the certificate seen.
#[derive(Debug)]
pub struct ParentVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected_id: Option<String>,
    peer: Arc<ParentPeer>,
}

impl rustls::client::danger::ServerCertVerifier for ParentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let other = |e: ParentCertError| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        if let Some(expected) = &self.expected_id {
            let ids = controller_ids(end_entity);
            if !ids.iter().any(|i| i == expected) {
                return Err(other(ParentCertError::WrongController {
                    expected: expected.clone(),
                    found: if ids.is_empty() {
                        "none".into()
                    } else {
                        ids.join(",")
                    },
                }));
            }
        }
        let leaf = fingerprint(end_entity);
        let mut st = self.peer.lock();
        if st.pinned_leaf.is_some_and(|p| p != leaf) {
            return Err(other(ParentCertError::ChangedAfterProof));
        }
        st.last_leaf = Some(leaf);
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn roots_of(m: Option<&TlsMaterial>) -> Arc<RootCertStore> {
    match m.and_then(|m| m.roots.clone()) {
        Some(r) => r,
        None => {
            let mut store = RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
            Arc::new(store)
        }
    }
}

/// The client configuration of a parent link: trusts `tls_ca` (else the system roots),
/// presents our certificate when we have one, speaks HTTP/2, never resumes a session (each
/// connection's certificate is checked), and requires the parent's certificate to name
/// `expected_id` when given; what it sees is recorded in `peer`.
///
/// # Errors
/// When rustls refuses the material.
pub fn parent_client_config(
    m: Option<&TlsMaterial>,
    expected_id: Option<&str>,
    peer: Arc<ParentPeer>,
) -> Result<rustls::ClientConfig, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots_of(m), provider())
        .build()
        .map_err(|e| TlsError(format!("no usable trust anchor: {e}")))?;
    let verifier = Arc::new(ParentVerifier {
        inner,
        expected_id: expected_id.map(str::to_owned),
        peer,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match m {
        Some(m) if m.has_identity() => builder
            .with_client_auth_cert(m.certs.clone(), m.private_key()?)
            .map_err(|e| TlsError(e.to_string()))?,
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_proof_binds_the_nonce_and_the_certificate() {
        let leaf = fingerprint(b"certificate");
        let other = fingerprint(b"another certificate");
        let nonce = [7u8; 32];
        let m = parent_proof_message(&nonce, Some(&leaf));
        assert_ne!(m, parent_proof_message(&nonce, Some(&other)));
        assert_ne!(m, parent_proof_message(&[8u8; 32], Some(&leaf)));
        assert_ne!(m, parent_proof_message(&nonce, None));
        assert!(controller_ids(b"not a certificate").is_empty());
    }
}
