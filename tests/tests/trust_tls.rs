//! Mutual TLS bound to controllers, attacked by real processes:
//! - a fake parent holding only a local controller's certificate (valid under the lab CA,
//!   for `localhost`/`127.0.0.1` like every lab certificate) gets no bootstrap token from a
//!   regional controller that pinned its parent by controller id or by identity key;
//! - a client-only certificate cannot serve as a parent at all;
//! - after admission, a controller's own client certificate cannot carry messages signed as
//!   another controller (with the shared network key), over gRPC or REST.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pdsno_node::tls::{TlsMaterial, TlsOptions, client_config_for};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::grpc::pb;
use pdsno_shared::json::Map;
use pdsno_shared::keys::HmacKey;
use pdsno_shared::signing::{sign_ed25519, sign_hmac};
use pdsno_tests::{Lab, NodeProc, Pki, Proc, field, pdsno_bin, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(60);
const GC_ID: &str = "global_cntl_1";
const NETWORK_SECRET: &str = "trust-tls-network-secret-0123456789";

fn bin() -> &'static str {
    let p: &'static PathBuf = Box::leak(Box::new(pdsno_bin()));
    p.to_str().expect("utf-8 path")
}

fn https(n: &NodeProc) -> String {
    format!("https://127.0.0.1:{}", n.grpc.port())
}

fn tls_flags(cert: &str, key: &str, ca: &str) -> Vec<String> {
    ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
        .map(str::to_owned)
        .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn material(cert: Option<&str>, key: Option<&str>, ca: &Path) -> Arc<TlsMaterial> {
    TlsMaterial::load(&TlsOptions {
        cert: cert.map(PathBuf::from),
        key: key.map(PathBuf::from),
        ca: Some(ca.to_path_buf()),
        require_client_cert: false,
        require_tls: false,
    })
    .expect("load TLS material")
    .expect("some material")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The real global controller under mutual TLS, its certificate naming `global_cntl_1`,
/// with the shared network key; its identity key as printed on the `ready` line.
fn real_gc(lab: &Lab, pki: &Pki) -> (NodeProc, String) {
    let (cert, key) = pki.issue("global", &["--role", "both", "--controller-id", GC_ID]);
    let mut args = tls_flags(&cert, &key, &pki.ca());
    args.extend(
        [
            "--require-client-cert",
            "--regions",
            "zone-A,zone-B",
            "--listen-mqtts",
            "127.0.0.1:0",
        ]
        .map(str::to_owned),
    );
    let p = lab.spawn_env(
        "global",
        "global",
        &strs(&args),
        &[("PDSNO_MESSAGE_SIGNING_SECRET", NETWORK_SECRET)],
    );
    let gc = lab.ready(p, "global");
    assert_eq!(gc.id, GC_ID);
    let line = gc
        .proc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ready "))
        .expect("ready line");
    let public_key = field(&line, "public_key").expect("the GC prints its public key");
    assert_eq!(public_key.len(), 44, "{line}");
    (gc, public_key)
}

/// An attacker's `pdsno global` serving TLS with a stolen certificate, with its own
/// bootstrap secret (it cannot admit anyone the real parent would).
fn fake_gc(lab: &Lab, pki: &Pki, cert: &str, key: &str) -> NodeProc {
    let secret = lab.dir.path().join("attacker.secret");
    pdsno_tests::write_private(&secret, "the-attacker-has-another-secret-42\n");
    let data = lab.data("attacker");
    let mut args = vec![
        "global".to_owned(),
        "--data-dir".into(),
        data.display().to_string(),
        "--bootstrap-secret-file".into(),
        secret.display().to_string(),
        "--listen-grpc".into(),
        "127.0.0.1:0".into(),
        "--listen-rest".into(),
        "127.0.0.1:0".into(),
        "--listen-mqtt".into(),
        "127.0.0.1:0".into(),
        "--listen-mqtts".into(),
        "127.0.0.1:0".into(),
        "--regions".into(),
        "zone-A,zone-B".into(),
    ];
    args.extend(tls_flags(cert, key, &pki.ca()));
    let p = Proc::pdsno("attacker", &strs(&args), &[]);
    lab.ready(p, "attacker")
}

/// Arguments of a regional controller `name` of `region` bootstrapping from `parent_url`
/// with its own certificate and `extra` (pins).
fn regional_args(
    lab: &Lab,
    pki: &Pki,
    name: &str,
    region: &str,
    parent_url: &str,
    extra: &[&str],
) -> Vec<String> {
    let controller = format!("regional_cntl_{region}_1");
    let (cert, key) = pki.issue(name, &["--role", "both", "--controller-id", &controller]);
    let mut args = vec![
        "regional".to_owned(),
        "--data-dir".into(),
        lab.data(name).display().to_string(),
        "--listen-grpc".into(),
        "127.0.0.1:0".into(),
        "--listen-rest".into(),
        "127.0.0.1:0".into(),
        "--parent".into(),
        parent_url.into(),
        "--region".into(),
        region.into(),
        "--temp-id".into(),
        name.into(),
        "--bootstrap-token".into(),
        lab.token(name, region, "regional"),
    ];
    args.extend(tls_flags(&cert, &key, &pki.ca()));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// GET `path` over TLS (server name `localhost`) with `tls` as the client.
async fn https_get(
    addr: SocketAddr,
    path: &str,
    tls: &TlsMaterial,
    ca: &Path,
) -> Result<(u16, String), String> {
    https_request(addr, "GET", path, "", tls, ca).await
}

async fn https_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    tls: &TlsMaterial,
    ca: &Path,
) -> Result<(u16, String), String> {
    let cfg = client_config_for(Some(tls), Some(ca)).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut s = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    Ok((code, text))
}

/// The sum of the `pdsno_messages_total` samples for `kind` (any transport and outcome).
fn messages_of(text: &str, kind: &str) -> f64 {
    let prefix = format!("pdsno_messages_total{{type=\"{kind}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many VALIDATION_REQUESTs (each carrying a bootstrap token) `node` has received.
fn tokens_received(node: &NodeProc, pki: &Pki) -> f64 {
    let anonymous = material(None, None, &pki.ca_path());
    let (code, text) = rt()
        .block_on(https_get(node.rest, "/metrics", &anonymous, &pki.ca_path()))
        .expect("metrics");
    assert_eq!(code, 200, "{text}");
    messages_of(&text, "VALIDATION_REQUEST")
}

/// An attacker holding only a local controller's certificate runs a parent with it. A
/// regional controller pinned to its parent (by controller id, or by identity key) refuses
/// it before sending anything and fails with the reason; the attacker receives no token.
/// Without a pin (documented), the certificate is enough and the token goes to the
/// attacker. The pinned regional controller is admitted by the real parent.
#[test]
fn a_fake_parent_with_a_local_certificate_gets_no_token_from_a_pinned_child() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (mut gc, gc_key) = real_gc(&lab, &pki);
    // A local controller that serves TLS has a server certificate too, valid for
    // localhost and 127.0.0.1 like every lab certificate.
    let (lc_cert, lc_key) = pki.issue(
        "lc-1",
        &["--role", "both", "--controller-id", "local_cntl_zone-A_1"],
    );
    let attacker = fake_gc(&lab, &pki, &lc_cert, &lc_key);
    let fake_url = https(&attacker);

    // 1. Pinned by controller id: the TLS handshake fails on the certificate's name.
    let args = regional_args(
        &lab,
        &pki,
        "rc-id",
        "zone-A",
        &fake_url,
        &["--parent-id", GC_ID],
    );
    let (code, out, err) = run(bin(), &strs(&args), LONG);
    assert_ne!(code, Some(0), "must not start: {out}");
    assert!(
        err.contains("TLS")
            && err.contains("local_cntl_zone-A_1")
            && err.contains(&format!("{GC_ID} was expected")),
        "the reason is named: {err}"
    );
    assert!(!out.contains("admitted"), "{out}");

    // 2. Pinned by identity key: the fake parent cannot prove it holds the GC's key.
    let args = regional_args(
        &lab,
        &pki,
        "rc-key",
        "zone-A",
        &fake_url,
        &["--parent-public-key", &gc_key],
    );
    let (code, out, err) = run(bin(), &strs(&args), LONG);
    assert_ne!(code, Some(0), "must not start: {out}");
    assert!(
        err.contains("did not prove its identity")
            && err.contains("another key than the pinned one"),
        "the reason is named: {err}"
    );
    // The same key from a file.
    let key_file = lab.dir.path().join("gc.pub");
    std::fs::write(&key_file, format!("{gc_key}\n")).expect("key file");
    let key_file = key_file.display().to_string();
    let args = regional_args(
        &lab,
        &pki,
        "rc-keyfile",
        "zone-A",
        &fake_url,
        &["--parent-public-key-file", &key_file],
    );
    let (code, _, err) = run(bin(), &strs(&args), LONG);
    assert_ne!(code, Some(0));
    assert!(err.contains("did not prove its identity"), "{err}");

    // Not one token reached the attacker.
    assert_eq!(
        tokens_received(&attacker, &pki),
        0.0,
        "a pinned child sent its bootstrap token to the fake parent"
    );

    // 3. Without a pin, the lab certificate is all it takes: the token goes to the attacker.
    let args = regional_args(&lab, &pki, "rc-open", "zone-A", &fake_url, &[]);
    let (code, _, _) = run(bin(), &strs(&args), LONG);
    assert_ne!(
        code,
        Some(0),
        "the attacker cannot admit it with another secret"
    );
    assert!(
        tokens_received(&attacker, &pki) >= 1.0,
        "unpinned, the child sends its token to any parent with a valid certificate"
    );

    // The legitimate path: both pins, the real parent proves both and admits the child.
    let args = regional_args(
        &lab,
        &pki,
        "rc-good",
        "zone-A",
        &https(&gc),
        &["--parent-id", GC_ID, "--parent-public-key", &gc_key],
    );
    let p = Proc::pdsno("rc-good", &strs(&args[..]), &[]);
    let mut rc = lab.ready(p, "rc-good");
    let admitted = rc
        .proc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("admitted "))
        .expect("admitted line");
    assert_eq!(field(&admitted, "parent").as_deref(), Some(GC_ID));
    assert_eq!(rc.id, "regional_cntl_zone-A_1");
    assert!(gc.proc.is_alive());
    rc.proc.kill();
}

/// A raw TLS server presenting `cert`/`key` on loopback; counts the bytes it decrypted.
fn raw_tls_server(
    cert: &str,
    key: &str,
) -> (SocketAddr, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(pdsno_node::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    let handle = std::thread::spawn(move || {
        rt().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
            while let Ok(Ok((tcp, _))) = tokio::time::timeout_at(deadline, listener.accept()).await
            {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            counted.fetch_add(n, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
    });
    (addr, received, handle)
}

/// A certificate issued for client authentication only (`--role client`, what a local
/// controller without TLS listeners gets) cannot serve as a parent: even a child without
/// any pin refuses it in the handshake, for its purpose; the fake server decrypts nothing.
/// The same certificate still works as a client certificate (a local controller loads it).
#[test]
fn a_client_only_certificate_cannot_serve_as_a_parent() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (lc_cert, lc_key) = pki.issue(
        "lc-client",
        &["--role", "client", "--controller-id", "local_cntl_zone-A_1"],
    );
    let (addr, received, server) = raw_tls_server(&lc_cert, &lc_key);
    let url = format!("https://127.0.0.1:{}", addr.port());
    let args = regional_args(&lab, &pki, "rc-1", "zone-A", &url, &[]);
    let (code, out, err) = run(bin(), &strs(&args), LONG);
    assert_ne!(code, Some(0), "must not start: {out}");
    assert!(
        err.contains("TLS") && err.contains("extended key usage for server"),
        "the reason is named: {err}"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "nothing reached the fake parent"
    );

    // A client-only certificate is a valid client identity: it loads under the CA and a
    // TLS client presents it.
    let m = material(Some(&lc_cert), Some(&lc_key), &pki.ca_path());
    assert!(m.has_identity());
    // And it names its controller.
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&lc_cert).expect("cert")
    };
    assert_eq!(
        pdsno_node::tls::controller_ids(&der),
        vec!["local_cntl_zone-A_1".to_owned()]
    );
    drop(server);
}

/// A HEARTBEAT from `sender` to the GC, signed with the shared network key (which any
/// controller of the deployment holds).
fn network_heartbeat(sender: &str) -> Envelope {
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let now = chrono::Utc::now();
    let mut e = Envelope::new(MessageType::Heartbeat, sender.to_owned(), GC_ID, p, now);
    sign_hmac(
        &mut e,
        &HmacKey::from_secret_text(NETWORK_SECRET),
        None,
        now,
    );
    e
}

/// A HEARTBEAT from `node` to the GC, signed with its own identity key.
fn identity_heartbeat(node: &NodeProc) -> Envelope {
    let key = pdsno_node::identity::load_or_create(&node.data_dir)
        .expect("identity")
        .0;
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    let now = chrono::Utc::now();
    let mut e = Envelope::new(MessageType::Heartbeat, node.id.clone(), GC_ID, p, now);
    sign_ed25519(&mut e, &key, None, now);
    e
}

/// Two admitted regional controllers under mutual TLS with a shared network key. Using its
/// own certificate (naming regional_cntl_zone-A_1), one sends a heartbeat signed with the
/// network key as the other: refused as UNAUTHENTICATED over gRPC and 401 over REST,
/// counted and audited. Its own heartbeat on the same connection is accepted, and so is the
/// other's with the other's certificate.
#[test]
fn a_controller_certificate_cannot_carry_another_controllers_messages() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (gc, gc_key) = real_gc(&lab, &pki);
    let env = [("PDSNO_MESSAGE_SIGNING_SECRET", NETWORK_SECRET)];
    let mut rcs = Vec::new();
    for (name, region) in [("rc-a", "zone-A"), ("rc-b", "zone-B")] {
        let args = regional_args(
            &lab,
            &pki,
            name,
            region,
            &https(&gc),
            &["--parent-id", GC_ID, "--parent-public-key", &gc_key],
        );
        let p = Proc::pdsno(name, &strs(&args), &env);
        rcs.push(lab.ready(p, name));
    }
    let (a_id, b_id) = (rcs[0].id.clone(), rcs[1].id.clone());
    assert_eq!(
        (a_id.as_str(), b_id.as_str()),
        ("regional_cntl_zone-A_1", "regional_cntl_zone-B_1")
    );
    let pem = |n: &str| pki.dir.join(n).display().to_string();
    let a_tls = material(
        Some(&pem("rc-a.pem")),
        Some(&pem("rc-a.key")),
        &pki.ca_path(),
    );
    let b_tls = material(
        Some(&pem("rc-b.pem")),
        Some(&pem("rc-b.key")),
        &pki.ca_path(),
    );

    let rt = rt();
    rt.block_on(async {
        let as_a = ParentLink::with_tls(&https(&gc), Some(&a_tls)).expect("link");
        // The attack: A's certificate, B's name, the network key's signature.
        match as_a.exchange(&network_heartbeat(&b_id)).await {
            Err(LinkError::Status { code, message }) => {
                assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
                assert!(
                    message.contains("TLS identity mismatch")
                        && message.contains(&a_id)
                        && message.contains(&b_id),
                    "{message}"
                );
            }
            other => panic!("a heartbeat as {b_id} over {a_id}'s certificate: {other:?}"),
        }
        // Legitimate traffic on the same kind of connection still works.
        as_a.exchange(&identity_heartbeat(&rcs[0]))
            .await
            .expect("A's own heartbeat is accepted");
        let as_b = ParentLink::with_tls(&https(&gc), Some(&b_tls)).expect("link");
        as_b.exchange(&identity_heartbeat(&rcs[1]))
            .await
            .expect("B's own heartbeat is accepted");

        // REST: the same forgery is a 401 naming the mismatch.
        let body = network_heartbeat(&b_id).to_json();
        let (code, text) = https_request(
            gc.rest,
            "POST",
            "/message/heartbeat",
            &body,
            &a_tls,
            &pki.ca_path(),
        )
        .await
        .expect("REST answered");
        assert_eq!(code, 401, "{text}");
        assert!(text.contains("TLS identity mismatch"), "{text}");

        // Counted per transport.
        let (code, metrics) = https_get(gc.rest, "/metrics", &a_tls, &pki.ca_path())
            .await
            .expect("metrics");
        assert_eq!(code, 200);
        for t in ["grpc", "rest"] {
            let series = format!(
                r#"pdsno_messages_total{{type="HEARTBEAT",transport="{t}",outcome="tls_identity_mismatch"}} 1"#
            );
            assert!(metrics.contains(&series), "{series} in\n{metrics}");
        }
    });

    // And audited.
    let dir = gc.data_dir.display().to_string();
    let (code, out, err) = run(
        bin(),
        &["audit", "tail", "--data-dir", &dir, "-n", "100"],
        LONG,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("tls_identity_mismatch"),
        "the refusal is in the audit log: {out}"
    );
    for mut rc in rcs {
        rc.proc.kill();
    }
}

/// A fake parent in this process: it serves TLS with a stolen certificate and relays each
/// GetInfo (with the child's nonce) to the real parent over its own TLS connection, so the
/// child gets a genuine signature by the real parent's key. Admission calls are counted.
struct RelayParent {
    real: ParentLink,
    admission_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl pb::node_server::Node for RelayParent {
    async fn get_info(
        &self,
        req: tonic::Request<pb::InfoRequest>,
    ) -> Result<tonic::Response<pb::NodeInfo>, tonic::Status> {
        let nonce = req.into_inner().identity_nonce;
        let mut c = pb::node_client::NodeClient::new(self.real.channel());
        c.get_info(pb::InfoRequest {
            identity_nonce: nonce,
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::admission_server::Admission for RelayParent {
    async fn request_validation(
        &self,
        _req: tonic::Request<pb::ValidationRequest>,
    ) -> Result<tonic::Response<pb::AdmissionStep>, tonic::Status> {
        self.admission_calls.fetch_add(1, Ordering::SeqCst);
        Err(tonic::Status::unavailable("captured"))
    }

    async fn respond_to_challenge(
        &self,
        _req: tonic::Request<pb::ChallengeResponse>,
    ) -> Result<tonic::Response<pb::ValidationResult>, tonic::Status> {
        self.admission_calls.fetch_add(1, Ordering::SeqCst);
        Err(tonic::Status::unavailable("captured"))
    }
}

/// The identity proof is bound to the TLS certificate: a fake parent that relays the
/// child's nonce to the real parent and returns the real parent's signature is refused
/// (the signature covers the real parent's certificate, not the one the child sees), and
/// receives no token.
#[test]
fn a_relayed_identity_proof_does_not_verify() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (gc, gc_key) = real_gc(&lab, &pki);
    let (lc_cert, lc_key) = pki.issue(
        "lc-1",
        &["--role", "both", "--controller-id", "local_cntl_zone-A_1"],
    );
    let stolen = material(Some(&lc_cert), Some(&lc_key), &pki.ca_path());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let admission_calls = Arc::new(AtomicUsize::new(0));
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = server_rt.block_on(async {
        let relay = RelayParent {
            real: ParentLink::with_tls(&https(&gc), Some(&stolen)).expect("link"),
            admission_calls: admission_calls.clone(),
        };
        let relay = Arc::new(relay);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(stolen.server_config(&[b"h2"]).expect("config"));
        let incoming = pdsno_node::transport::listen::grpc_incoming(
            listener,
            &pdsno_node::transport::listen::ConnectionLimits {
                max: 16,
                ..Default::default()
            },
            Some(acceptor),
            Arc::new(pdsno_node::metrics::Metrics::new()),
            cancel.clone(),
        );
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::from_arc(relay.clone()))
                .add_service(pb::admission_server::AdmissionServer::from_arc(relay))
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await;
        });
        addr
    });
    let url = format!("https://127.0.0.1:{}", addr.port());

    // The relay works: an unpinned look at it shows the real parent's identity.
    let info = server_rt
        .block_on(async {
            let anonymous = material(None, None, &pki.ca_path());
            ParentLink::with_tls(&url, Some(&anonymous))
                .expect("link")
                .info()
                .await
        })
        .expect("the relay answers");
    assert_eq!(
        (info.controller_id.as_str(), info.public_key.as_str()),
        (GC_ID, gc_key.as_str())
    );

    let args = regional_args(
        &lab,
        &pki,
        "rc-1",
        "zone-A",
        &url,
        &["--parent-public-key", &gc_key],
    );
    let (code, out, err) = run(bin(), &strs(&args), LONG);
    assert_ne!(code, Some(0), "must not start: {out}");
    assert!(
        err.contains("did not prove its identity")
            && err.contains("does not verify for the TLS certificate it serves"),
        "the reason is named: {err}"
    );
    assert_eq!(
        admission_calls.load(Ordering::SeqCst),
        0,
        "the relay received no admission request (no token)"
    );
    cancel.cancel();
}

/// The public key a node printed on its `ready` line.
fn printed_key(n: &NodeProc) -> String {
    let line = n
        .proc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ready "))
        .expect("ready line");
    field(&line, "public_key").expect("public_key on the ready line")
}

/// Every tier proves its identity key to its children, also without TLS (the proof is
/// then not bound to a certificate): a regional controller pins the global one, a local
/// controller pins its regional parent by id and key, and both are admitted. A regional
/// controller pinning another key is refused before it sends its token.
#[test]
fn pins_on_every_tier_admit_the_real_parents() {
    let lab = Lab::new();
    let mut gc = lab.global(&["--listen-mqtts", "127.0.0.1:0"]);
    let gc_key = printed_key(&gc);
    let mut rc = lab.child(
        "regional",
        "rc-1",
        &gc,
        "zone-A",
        &["--parent-id", GC_ID, "--parent-public-key", &gc_key],
    );
    let rc_key = printed_key(&rc);
    assert_ne!(rc_key, gc_key);
    let rc_id = rc.id.clone();
    let mut lc = lab.child(
        "local",
        "lc-1",
        &rc,
        "zone-A",
        &["--parent-id", &rc_id, "--parent-public-key", &rc_key],
    );
    assert!(lc.id.starts_with("local_cntl_zone-A_"), "{}", lc.id);

    // The wrong key (the RC's, for the GC): refused, nothing sent.
    let url = gc.grpc_url();
    let token = lab.token("rc-2", "zone-B", "regional");
    let data = lab.data("rc-2").display().to_string();
    let (code, out, err) = run(
        bin(),
        &[
            "regional",
            "--data-dir",
            &data,
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--parent",
            &url,
            "--region",
            "zone-B",
            "--temp-id",
            "rc-2",
            "--bootstrap-token",
            &token,
            "--parent-public-key",
            &rc_key,
        ],
        LONG,
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("did not prove its identity")
            && err.contains("another key than the pinned one"),
        "{err}"
    );
    // A key that is not one at all is a configuration error.
    let (code, _, err) = run(
        bin(),
        &[
            "regional",
            "--data-dir",
            &data,
            "--parent",
            &url,
            "--parent-public-key",
            "not-a-key",
            "--check-config",
        ],
        LONG,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("parent_public_key"), "{err}");
    assert!(gc.proc.is_alive() && rc.proc.is_alive() && lc.proc.is_alive());
    lc.proc.kill();
    rc.proc.kill();
}
