//! TLS and mutual TLS between real processes: gRPC (admission, key exchange), REST and the
//! embedded broker (the controllers' own MQTT links and `mosquitto_sub --cafile`), with
//! plaintext and bad certificates refused with a clear error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pdsno_node::tls::{TlsMaterial, TlsOptions, client_config_for};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_tests::{Lab, NodeProc, Pki, field, listening_addr, pdsno_bin, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(60);

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

/// GET `path` over TLS with `tls` as the client; `Err` for a failed handshake or a closed
/// connection.
async fn https_get(
    addr: SocketAddr,
    path: &str,
    tls: Option<&TlsMaterial>,
    ca: &Path,
) -> Result<(u16, String), String> {
    let cfg = client_config_for(tls, Some(ca)).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut s = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
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

/// A plaintext HTTP GET; `Err` when the server does not answer with HTTP.
async fn http_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/") {
        return Err(format!("no HTTP answer ({} bytes)", buf.len()));
    }
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| text.clone())
}

/// The embedded broker's TLS listener, as the GC reported it.
fn mqtts_addr(gc: &NodeProc) -> SocketAddr {
    gc.proc
        .lines()
        .iter()
        .find(|l| l.starts_with("mqtts v4 "))
        .map(|l| listening_addr(l))
        .expect("a TLS MQTT listener")
}

/// The value of the sample named exactly `series` in an OpenMetrics text (0 if absent).
fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn child_tls(
    lab: &Lab,
    tier: &str,
    name: &str,
    parent: &NodeProc,
    region: &str,
    tls: &[String],
) -> NodeProc {
    let token = lab.token_for(parent, name, region, tier);
    let url = format!("https://127.0.0.1:{}", parent.grpc.port());
    let mut args = vec![
        "--parent",
        &url,
        "--region",
        region,
        "--temp-id",
        name,
        "--bootstrap-token",
        &token,
    ];
    args.extend(strs(tls));
    let p = lab.spawn(tier, name, &args);
    lab.ready(p, name)
}

/// The whole topology under mutual TLS with plaintext refused: admission and key exchange
/// over gRPC/TLS, MQTT over TLS with client certificates (discovery reaches the RC and the
/// GC), REST over TLS, and `mosquitto_sub --cafile` on the embedded broker.
#[test]
fn mutual_tls_topology_grpc_rest_and_mqtt() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let strict = ["--require-client-cert", "--require-tls"];
    let gc_tls = pki.flags("global", &strict);
    let mut gc_args = strs(&gc_tls);
    gc_args.extend(["--user", "ops:ops-password-123"]);
    let mut gc = lab.global(&gc_args);
    // Under --require-tls the broker has no plaintext listener.
    let mqtts = mqtts_addr(&gc);
    assert!(
        !gc.proc.lines().iter().any(|l| l.starts_with("mqtt v4 ")),
        "no plaintext MQTT listener under --require-tls: {:?}",
        gc.proc.lines()
    );

    let rc_tls = pki.flags("rc-1", &strict);
    let mut rc = child_tls(&lab, "regional", "rc-1", &gc, "zone-A", &rc_tls);
    let lc_tls = pki.flags("lc-1", &strict);
    let mut lc_extra = lc_tls.clone();
    lc_extra.extend(
        [
            "--discovery-interval",
            "0.3",
            "--subnet",
            "10.7.0.0/28",
            "--scan-seed",
            "7",
        ]
        .map(str::to_owned),
    );
    let mut lc = child_tls(&lab, "local", "lc-1", &rc, "zone-A", &lc_extra);

    // Both children reach the broker over TLS with their certificate and credential.
    let line = rc.proc.wait_line(LONG, |l| l.starts_with("mqtt connected"));
    assert_eq!(
        field(&line, "broker"),
        Some(format!("127.0.0.1:{}", mqtts.port()))
    );
    lc.proc.wait_line(LONG, |l| l.starts_with("mqtt connected"));
    // Discovery over MQTT/TLS: the RC ingests the LC's report.
    let lc_id = lc.id.clone();
    rc.proc.wait_line(LONG, |l| {
        l.starts_with("report from=") && l.contains(&lc_id)
    });

    let rt = rt();
    rt.block_on(async {
        // REST over TLS with a client certificate.
        let client = material(
            Some(&pki.issue("operator", &[]).0),
            Some(&pki.dir.join("operator.key").display().to_string()),
            &pki.ca_path(),
        );
        let (code, body) = https_get(gc.rest, "/health", Some(&client), &pki.ca_path())
            .await
            .expect("REST over mTLS");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"status\":\"healthy\""), "{body}");
        let (code, body) = https_get(gc.rest, "/metrics", Some(&client), &pki.ca_path())
            .await
            .expect("metrics over mTLS");
        assert_eq!(code, 200);
        assert!(
            body.contains("pdsno_messages_total{type=\"VALIDATION_REQUEST\",transport=\"grpc\",outcome=\"accepted\"}"),
            "{body}"
        );
        // gRPC over TLS from this process with a client certificate.
        let link = ParentLink::with_tls(
            &format!("https://127.0.0.1:{}", gc.grpc.port()),
            Some(&client),
        )
        .expect("link");
        let info = link.info().await.expect("GetInfo over mTLS");
        assert_eq!(info.controller_id, "global_cntl_1");
    });

    // mosquitto_sub over TLS: it sees the retained status of the RC.
    let (cert, key) = pki.issue("mosquitto-client", &[]);
    let port = mqtts.port().to_string();
    let ca = pki.ca();
    let (code, out, err) = run(
        "mosquitto_sub",
        &[
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-u",
            "ops",
            "-P",
            "ops-password-123",
            "-t",
            &format!("pdsno/status/{}", rc.id),
            "-C",
            "1",
            "-W",
            "20",
            "-V",
            "mqttv311",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "mosquitto_sub over TLS: {out} {err}");
    assert!(out.contains(&rc.id), "{out}");

    // Without a client certificate, mosquitto_sub is refused at the handshake.
    let (code, out, err) = run(
        "mosquitto_sub",
        &[
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-u",
            "ops",
            "-P",
            "ops-password-123",
            "-t",
            "pdsno/#",
            "-C",
            "1",
            "-W",
            "5",
        ],
        Duration::from_secs(20),
    );
    assert_ne!(
        code,
        Some(0),
        "no client certificate must be refused: {out} {err}"
    );
    assert!(!out.contains("pdsno"), "{out}");
    assert!(gc.proc.is_alive(), "the GC survived");
    lc.proc.kill();
    rc.proc.kill();
}

/// Plaintext, a missing client certificate and a certificate from another CA are refused
/// on every listener, and the server keeps serving good clients.
#[test]
fn plaintext_and_foreign_certificates_are_refused() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let rogue = Pki::new(&lab, "rogue");
    let gc_tls = pki.flags("global", &["--require-client-cert", "--require-tls"]);
    let mut gc = lab.global(&strs(&gc_tls));
    let mqtts = mqtts_addr(&gc);
    let (good_cert, good_key) = pki.issue("client", &[]);
    let good = material(Some(&good_cert), Some(&good_key), &pki.ca_path());
    let (rogue_cert, rogue_key) = rogue.issue("client", &[]);
    // Trusts both CAs (so the server is accepted) but presents a certificate of the rogue CA.
    let both = lab.dir.path().join("both-cas.pem");
    std::fs::write(
        &both,
        format!(
            "{}{}",
            std::fs::read_to_string(pki.ca_path()).expect("ca"),
            std::fs::read_to_string(rogue.ca_path()).expect("rogue ca")
        ),
    )
    .expect("write bundle");
    let foreign = material(Some(&rogue_cert), Some(&rogue_key), &both);
    let anonymous = material(None, None, &pki.ca_path());

    let rt = rt();
    rt.block_on(async {
        // REST: plaintext HTTP gets no HTTP answer; TLS without / with a foreign client
        // certificate fails; the good client works before and after.
        assert_eq!(
            https_get(gc.rest, "/health", Some(&good), &pki.ca_path())
                .await
                .map(|r| r.0),
            Ok(200)
        );
        let plain = http_get(gc.rest, "/health").await;
        assert!(plain.is_err(), "plaintext REST answered: {plain:?}");
        let anon = https_get(gc.rest, "/health", Some(&anonymous), &pki.ca_path()).await;
        assert!(anon.is_err(), "REST without a client certificate: {anon:?}");
        let f = https_get(gc.rest, "/health", Some(&foreign), &pki.ca_path()).await;
        assert!(f.is_err(), "REST with a foreign certificate: {f:?}");

        // gRPC: plaintext, no client certificate, foreign certificate.
        let plain = ParentLink::with_tls(&format!("http://{}", gc.grpc), None)
            .expect("link")
            .info()
            .await;
        assert!(plain.is_err(), "plaintext gRPC answered: {plain:?}");
        let https = format!("https://127.0.0.1:{}", gc.grpc.port());
        for (what, m) in [("anonymous", &anonymous), ("foreign", &foreign)] {
            let r = ParentLink::with_tls(&https, Some(m))
                .expect("link")
                .info()
                .await;
            assert!(r.is_err(), "gRPC with a {what} client: {r:?}");
        }
        let ok = ParentLink::with_tls(&https, Some(&good))
            .expect("link")
            .info()
            .await
            .expect("good client still served");
        assert_eq!(ok.controller_id, "global_cntl_1");

        // MQTT: a plaintext CONNECT on the TLS listener is not answered with a CONNACK.
        let mut s = TcpStream::connect(mqtts).await.expect("connect");
        let connect = [
            0x10u8, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04,
            b'p', b'l', b'a', b'n',
        ];
        s.write_all(&connect).await.expect("write");
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await;
        match r {
            Ok(Ok(n)) => assert!(
                n == 0 || buf[0] != 0x20,
                "plaintext MQTT got a CONNACK: {:?}",
                &buf[..n]
            ),
            Ok(Err(_)) => {}
            Err(_) => panic!("plaintext MQTT connection hung"),
        }

        // Every failed handshake is counted, per listener: REST and gRPC each saw a
        // plaintext client, an anonymous one and a foreign one.
        // (The server counts a failure just after closing, so allow it a moment.)
        let series =
            |t: &str| format!(r#"pdsno_refused_total{{transport="{t}",reason="tls_handshake"}}"#);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (code, text) = https_get(gc.rest, "/metrics", Some(&good), &pki.ca_path())
                .await
                .expect("metrics");
            assert_eq!(code, 200);
            let counts = [
                counter(&text, &series("rest")),
                counter(&text, &series("grpc")),
            ];
            if counts.iter().all(|n| *n >= 3.0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "TLS handshake failures (rest, grpc) counted: {counts:?}\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The client side: a child that trusts another CA fails at once with the TLS reason.
    let (code, _out, err) = run(
        pdsno_bin().to_str().expect("path"),
        &[
            "regional",
            "--data-dir",
            &lab.data("rc-rogue").display().to_string(),
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--parent",
            &format!("https://127.0.0.1:{}", gc.grpc.port()),
            "--region",
            "zone-A",
            "--temp-id",
            "rc-rogue",
            "--bootstrap-token",
            &lab.token("rc-rogue", "zone-A", "regional"),
            "--tls-cert",
            &rogue_cert,
            "--tls-key",
            &rogue_key,
            "--tls-ca",
            &rogue.ca(),
        ],
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("TLS") && err.contains("invalid peer certificate: UnknownIssuer"),
        "the reason is named: {err}"
    );
    assert!(gc.proc.is_alive());
}

/// Certificate problems found before any connection: an expired certificate, a key of
/// another certificate, require_tls without a certificate or with a plaintext parent.
#[test]
fn certificate_and_configuration_problems_are_named() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (expired_cert, expired_key) = pki.issue("old", &["--days", "1", "--backdate-days", "10"]);
    let (_, other_key) = pki.issue("other", &[]);
    let base = |name: &str| {
        vec![
            "global".to_owned(),
            "--data-dir".into(),
            lab.data(name).display().to_string(),
            "--bootstrap-secret-file".into(),
            lab.secret_file.display().to_string(),
            "--listen-grpc".into(),
            "127.0.0.1:0".into(),
            "--listen-rest".into(),
            "127.0.0.1:0".into(),
            "--listen-mqtt".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let bin = pdsno_bin();
    let bin = bin.to_str().expect("path");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "an expired certificate",
            [
                "--tls-cert",
                &expired_cert,
                "--tls-key",
                &expired_key,
                "--tls-ca",
                &pki.ca(),
            ]
            .map(str::to_owned)
            .to_vec(),
            "certificate expired",
        ),
        (
            "a key that belongs to another certificate",
            ["--tls-cert", &expired_cert, "--tls-key", &other_key]
                .map(str::to_owned)
                .to_vec(),
            "does not belong",
        ),
        (
            "require_tls without a certificate",
            vec!["--require-tls".into()],
            "tls_cert",
        ),
        (
            "require_client_cert without a CA",
            [
                "--tls-cert",
                &expired_cert,
                "--tls-key",
                &expired_key,
                "--require-client-cert",
            ]
            .map(str::to_owned)
            .to_vec(),
            "tls_ca",
        ),
        (
            "a missing certificate file",
            [
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ]
            .map(str::to_owned)
            .to_vec(),
            "/nonexistent/cert.pem",
        ),
    ];
    for (i, (what, extra, expect)) in cases.into_iter().enumerate() {
        let mut args = base(&format!("gc-{i}"));
        args.extend(extra);
        let (code, out, err) = run(bin, &strs(&args), Duration::from_secs(30));
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: must fail, got {code:?} {out}"
        );
        assert!(
            err.contains(expect),
            "{what}: {err:?} should name {expect:?}"
        );
    }

    // A child under require_tls refuses a plaintext parent URL before connecting.
    let (cert, key) = pki.issue("rc-x", &[]);
    let (code, _, err) = run(
        bin,
        &[
            "regional",
            "--data-dir",
            &lab.data("rc-x").display().to_string(),
            "--parent",
            "http://127.0.0.1:9",
            "--region",
            "zone-A",
            "--temp-id",
            "rc-x",
            "--bootstrap-token",
            "x",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--require-tls",
            "--check-config",
        ],
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("parent") && err.contains("plaintext"), "{err}");
}

/// TLS without client certificates: a child that trusts the CA connects with https:// and
/// mqtts://, and the wrong host name is refused with the reason.
#[test]
fn server_only_tls_and_a_wrong_name() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let (cert, key) = pki.issue("global", &[]);
    let gc = lab.global(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--listen-mqtts",
        "127.0.0.1:0",
        "--listen-grpc",
        "0.0.0.0:0",
    ]);
    assert!(
        gc.proc.lines().iter().any(|l| l.starts_with("mqtt v4 ")),
        "plaintext MQTT stays without --require-tls"
    );
    let ca = pki.ca();
    let rc_tls = vec!["--tls-ca".to_owned(), ca.clone()];
    let mut rc = child_tls(&lab, "regional", "rc-1", &gc, "zone-A", &rc_tls);
    let line = rc.proc.wait_line(LONG, |l| l.starts_with("mqtt connected"));
    let tls_port = mqtts_addr(&gc).port();
    assert_eq!(
        field(&line, "broker"),
        Some(format!("127.0.0.1:{tls_port}")),
        "the GC hands out its TLS listener"
    );

    // 127.0.0.2 is not a name in the GC's certificate.
    let rt = rt();
    rt.block_on(async {
        let m = material(None, None, &pki.ca_path());
        let r = ParentLink::with_tls(&format!("https://127.0.0.2:{}", gc.grpc.port()), Some(&m))
            .expect("link")
            .info()
            .await;
        match r {
            Err(LinkError::Tls(reason)) => {
                assert!(
                    reason.contains("not valid for name \"127.0.0.2\""),
                    "{reason}"
                )
            }
            other => panic!("expected a TLS error naming the name mismatch, got {other:?}"),
        }
    });
    rc.proc.kill();
}
