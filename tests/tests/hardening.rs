//! Limits and audit between real processes: the per-client rate limit on REST and gRPC
//! (429 with the retry hint / RESOURCE_EXHAUSTED with `retry-after`), the admission lockout
//! per source address, security events in the signed event log (`pdsno audit verify` and
//! `tail`), Prometheus `/metrics`, and secrets kept out of logs and `Debug` output.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{RawChild, handshake};
use pdsno_node::transport::parent::{LinkError, ParentLink};
use pdsno_shared::grpc::pb;
use pdsno_tests::{Lab, pdsno_bin, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One HTTP/1.1 request; returns (status, headers, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("no hang")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_owned())
}

fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        pdsno_bin().to_str().expect("path"),
        args,
        Duration::from_secs(30),
    )
}

#[test]
fn rate_limit_answers_429_and_resource_exhausted_then_recovers() {
    let lab = Lab::new();
    let gc = lab.global(&["--rate-limit-rps", "2", "--rate-limit-burst", "4"]);
    rt().block_on(async {
        // REST: the burst passes, then 429 with Retry-After and the compat body.
        let mut codes = Vec::new();
        let mut refused = None;
        for _ in 0..12 {
            let (code, head, body) = http(gc.rest, "GET", "/info", "").await;
            if code == 429 && refused.is_none() {
                refused = Some((head, body));
            }
            codes.push(code);
        }
        assert_eq!(&codes[..4], &[200, 200, 200, 200], "{codes:?}");
        let (head, body) = refused.expect("a 429 after the burst");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert_eq!(
            body,
            r#"{"error":"Rate limit exceeded. Retry after 1 seconds"}"#
        );
        assert!(!codes.iter().any(|c| *c >= 500), "{codes:?}");
        // /health is not limited (load balancers poll it).
        assert_eq!(http(gc.rest, "GET", "/health", "").await.0, 200);

        // gRPC shares the client's budget: RESOURCE_EXHAUSTED with retry-after metadata.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gc.grpc))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = pb::messaging_client::MessagingClient::new(channel);
        let st = client
            .exchange(pb::Envelope::default())
            .await
            .expect_err("refused");
        assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
        assert_eq!(
            st.metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );

        // After the hint, the same client is served again.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(http(gc.rest, "GET", "/info", "").await.0, 200);
        let st = client
            .exchange(pb::Envelope::default())
            .await
            .expect_err("an empty envelope is invalid");
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");

        // Counted in /metrics.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (code, _, text) = http(gc.rest, "GET", "/metrics", "").await;
        assert_eq!(code, 200);
        assert!(
            text.contains(r#"pdsno_refused_total{transport="rest",reason="rate_limited"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pdsno_refused_total{transport="grpc",reason="rate_limited"}"#),
            "{text}"
        );
    });
}

#[test]
fn admission_lockout_per_source_is_audited_and_expires() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--lockout-failures",
        "3",
        "--lockout-secs",
        "3",
        "--lockout-window-secs",
        "60",
    ]);
    let parent = "global_cntl_1";
    rt().block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        // Three failed attempts: a forged proof of possession (REJECTED) twice, and a
        // request signed with a token of another deployment (401 / UNAUTHENTICATED).
        for i in 0..2 {
            let c = RawChild::new(&lab, &format!("rc-bad-{i}"), "zone-A", "regional");
            let (status, reason) = handshake(&link, parent, &c, |p| {
                p.insert("signed_nonce".into(), "AAAA".into());
            })
            .await;
            assert_eq!(status, "REJECTED", "{reason}");
        }
        // A request altered after signing: refused before any handler.
        let forged = RawChild::new(&lab, "rc-forged", "zone-A", "regional");
        let mut env = forged.request(parent, 0);
        env.payload.insert("region".into(), "zone-B".into());
        let r = link.request_validation(&env).await;
        assert!(
            matches!(
                &r,
                Err(LinkError::Status {
                    code: tonic::Code::Unauthenticated,
                    ..
                })
            ),
            "{r:?}"
        );

        // Locked out: even a valid child from this address is refused, on gRPC and REST.
        let good = RawChild::new(&lab, "rc-good", "zone-A", "regional");
        let r = link.request_validation(&good.request(parent, 0)).await;
        match &r {
            Err(LinkError::Status { code, message }) => {
                assert_eq!(*code, tonic::Code::ResourceExhausted);
                assert!(
                    message.contains("Too many failed admission attempts"),
                    "{message}"
                );
            }
            other => panic!("expected a lockout, got {other:?}"),
        }
        let body = good.request(parent, 0).to_json();
        let (code, head, text) = http(gc.rest, "POST", "/message/validation_request", &body).await;
        assert_eq!(code, 429, "{text}");
        assert!(head.contains("retry-after:"), "{head}");
        // Other requests from the address are not locked out.
        assert_eq!(http(gc.rest, "GET", "/info", "").await.0, 200);

        // The lockout ends; the valid child is admitted.
        tokio::time::sleep(Duration::from_millis(3300)).await;
        let (status, reason) = handshake(&link, parent, &good, |_| {}).await;
        assert_eq!(status, "APPROVED", "{reason}");
    });

    // The audit log has the refusals, the lockout and the approval; the chain verifies.
    let dir = gc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["audit", "tail", "--data-dir", &dir, "-n", "50"]);
    assert_eq!(code, Some(0), "{err}");
    for ev in [
        "VALIDATION_REJECTED",
        "MESSAGE_REJECTED",
        "ADMISSION_LOCKOUT",
        "CONTROLLER_VALIDATED",
    ] {
        assert!(out.contains(ev), "{ev} missing from:\n{out}");
    }
    let (code, out, err) = pdsno(&["audit", "tail", "--data-dir", &dir, "--json", "-n", "50"]);
    assert_eq!(code, Some(0), "{err}");
    let lockout = out
        .lines()
        .find(|l| l.contains("ADMISSION_LOCKOUT"))
        .expect("lockout event");
    let v = pdsno_shared::json::parse(lockout.as_bytes()).expect("json line");
    let details = v.get("details").expect("details");
    assert_eq!(
        details.get("source").and_then(|s| s.as_str()),
        Some("127.0.0.1")
    );
    assert_eq!(details.get("failures").and_then(|s| s.as_u64()), Some(3));
    let (code, out, err) = pdsno(&["audit", "verify", "--data-dir", &dir]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("OK events="), "{out}");
}

/// An exempt network (a NAT gateway in front of many controllers) is not rate limited;
/// a malformed network is a configuration error naming the key.
#[test]
fn an_exempt_network_is_not_rate_limited() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--rate-limit-rps",
        "1",
        "--rate-limit-burst",
        "1",
        "--rate-limit-exempt",
        "192.0.2.0/24,127.0.0.0/8",
    ]);
    rt().block_on(async {
        for i in 0..30 {
            let (code, _, body) = http(gc.rest, "GET", "/info", "").await;
            assert_eq!(code, 200, "request {i}: {body}");
        }
    });
    let (code, _, err) = pdsno(&[
        "global",
        "--data-dir",
        &lab.data("bad-net").display().to_string(),
        "--rate-limit-exempt",
        "10.0.0.0/33",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rate_limit_exempt"), "{err}");
}

/// A lockout is not lifted by restarting the node: it is restored from the audit log.
#[test]
fn a_lockout_survives_a_restart() {
    let lab = Lab::new();
    let args = [
        "--regions",
        "zone-A,zone-B",
        "--lockout-failures",
        "1",
        "--lockout-secs",
        "300",
    ];
    let mut gc = lab.ready(lab.spawn("global", "global", &args), "global");
    let parent = "global_cntl_1";
    rt().block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        let bad = RawChild::new(&lab, "rc-bad", "zone-A", "regional");
        let (status, reason) = handshake(&link, parent, &bad, |p| {
            p.insert("signed_nonce".into(), "AAAA".into());
        })
        .await;
        assert_eq!(status, "REJECTED", "{reason}");
    });
    gc.proc.kill();

    let gc = lab.ready(lab.spawn("global", "global", &args), "global");
    rt().block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        let good = RawChild::new(&lab, "rc-good", "zone-A", "regional");
        match link.request_validation(&good.request(parent, 0)).await {
            Err(LinkError::Status { code, message }) => {
                assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
                assert!(message.contains("Retry after"), "{message}");
                let secs: u64 = message
                    .rsplit("Retry after ")
                    .next()
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .expect("seconds in the message");
                assert!((200..=300).contains(&secs), "{message}");
            }
            other => panic!("the restart lifted the lockout: {other:?}"),
        }
        let body = good.request(parent, 0).to_json();
        let (code, _, text) = http(gc.rest, "POST", "/message/validation_request", &body).await;
        assert_eq!(code, 429, "{text}");
    });
    // Restoring records nothing new: one lockout, one event.
    let dir = gc.data_dir.display().to_string();
    let (code, out, err) = pdsno(&["audit", "tail", "--data-dir", &dir, "-n", "100"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.matches("ADMISSION_LOCKOUT").count(), 1, "{out}");
}

#[test]
fn audit_verify_reports_the_first_broken_link() {
    let lab = Lab::new();
    let mut gc = lab.global(&["--regions", "zone-0,zone-1,zone-2"]);
    rt().block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        for i in 0..3 {
            let c = RawChild::new(&lab, &format!("rc-{i}"), &format!("zone-{i}"), "regional");
            let (status, _) = handshake(&link, "global_cntl_1", &c, |_| {}).await;
            assert_eq!(status, "APPROVED");
        }
    });
    gc.proc.terminate(Duration::from_secs(10));
    let dir = gc.data_dir.display().to_string();
    let (code, out, _) = pdsno(&["audit", "verify", "--data-dir", &dir]);
    assert_eq!(code, Some(0), "{out}");
    // A pinned key that is not the signer's fails at the first row.
    let other = pdsno_shared::keys::IdentityKey::generate()
        .public()
        .to_base64();
    let (code, out, _) = pdsno(&[
        "audit",
        "verify",
        "--data-dir",
        &dir,
        "--public-key",
        &other,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("BROKEN seq=1") && out.contains("signature"),
        "{out}"
    );
    // Tamper with the second row behind the triggers' back.
    {
        let conn = rusqlite_conn(&gc.data_dir);
        conn.execute_batch(
            "DROP TRIGGER IF EXISTS events_no_update; \
             UPDATE events SET decision = 'FORGED' WHERE seq = 2;",
        )
        .expect("tamper");
    }
    let (code, out, _) = pdsno(&["audit", "verify", "--data-dir", &dir]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN seq=2"), "{out}");
    let (code, _, err) = pdsno(&["audit", "verify", "--data-dir", "/nonexistent"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no"), "{err}");
}

fn rusqlite_conn(dir: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("nib.db")).expect("open")
}

/// Secrets never reach the logs (debug level, every process of a GC + RC + LC topology)
/// nor `Debug` output.
#[test]
fn secrets_stay_out_of_logs_and_debug_output() {
    let lab = Lab::new();
    let ops_password = "ops-secret-password-4711";
    let user = format!("ops:{ops_password}");
    let env = [("RUST_LOG", "debug")];
    let gc = lab.ready(
        lab.spawn_env(
            "global",
            "global",
            &["--regions", "zone-A", "--user", &user],
            &env,
        ),
        "global",
    );
    let rc_token = lab.token("rc-1", "zone-A", "regional");
    let child =
        |tier: &str, name: &str, parent: &pdsno_tests::NodeProc, token: &str, extra: &[&str]| {
            let url = parent.grpc_url();
            let mut args = vec![
                "--parent",
                &url,
                "--region",
                "zone-A",
                "--temp-id",
                name,
                "--bootstrap-token",
                token,
            ];
            args.extend_from_slice(extra);
            lab.ready(lab.spawn_env(tier, name, &args, &env), name)
        };
    let rc = child("regional", "rc-1", &gc, &rc_token, &[]);
    let lc_token = lab.token_for(&rc, "lc-1", "zone-A", "local");
    let mut lc = child(
        "local",
        "lc-1",
        &rc,
        &lc_token,
        &["--discovery-interval", "0.3"],
    );
    lc.proc
        .wait_line(Duration::from_secs(30), |l| l.starts_with("mqtt connected"));
    lc.proc.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("discovery cycle=2 ")
    });

    // Every secret each node holds.
    let mut secrets: Vec<(String, String)> = vec![
        ("bootstrap secret".into(), lab.secret.clone()),
        ("RC bootstrap token".into(), rc_token.clone()),
        ("LC bootstrap token".into(), lc_token.clone()),
        ("operator password".into(), ops_password.into()),
    ];
    for n in [&gc, &rc, &lc] {
        for f in ["identity.key", "admin.key"] {
            let p = n.data_dir.join(f);
            if let Ok(t) = std::fs::read_to_string(&p) {
                secrets.push((format!("{} {f}", n.id), t.trim().to_owned()));
            }
        }
        let conn = rusqlite_conn(&n.data_dir);
        let mut st = conn
            .prepare("SELECT peer_id, material FROM pair_keys")
            .expect("pair keys");
        let keys: Vec<(String, Vec<u8>)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(!keys.is_empty(), "{} has pairwise keys", n.id);
        for (peer, material) in keys {
            secrets.push((
                format!("{} pair key with {peer} (hex)", n.id),
                hex::encode(&material),
            ));
            secrets.push((
                format!("{} pair key with {peer} (base64)", n.id),
                pdsno_shared::keys::base64_encode(&material),
            ));
        }
        let nib = common::nib(n);
        if let Some(c) = nib
            .state_str(pdsno_node::nib::StateKey::MqttCredential)
            .expect("state")
        {
            secrets.push((format!("{} MQTT credential", n.id), c));
        }
    }
    assert!(secrets.len() >= 10, "{secrets:?}");
    let logs: Vec<(String, String)> = [&gc, &rc, &lc]
        .iter()
        .map(|n| {
            (
                n.id.clone(),
                format!("{}\n{}", n.proc.lines().join("\n"), n.proc.stderr()),
            )
        })
        .collect();
    for (id, text) in &logs {
        assert!(
            text.lines().count() > 20,
            "{id}: debug logging produced output"
        );
        for (what, secret) in &secrets {
            assert!(secret.len() >= 16, "{what} is a real secret");
            assert!(
                !text.contains(secret.as_str()),
                "{what} appears in the log of {id}"
            );
        }
    }

    // Debug output of configuration and key types.
    let args = [
        "pdsno",
        "regional",
        "--data-dir",
        "/tmp/x",
        "--bootstrap-token",
        &rc_token,
        "--secret",
        "network-key-material-0123456789",
        "--parent",
        "http://127.0.0.1:1",
        "--region",
        "zone-A",
        "--temp-id",
        "rc-9",
        "--bootstrap-secret-file",
        &lab.secret_file.display().to_string(),
    ];
    use clap::Parser as _;
    let cli = pdsno_node::cli::Cli::try_parse_from(args).expect("arguments");
    let pdsno_node::cli::Command::Regional(a) = cli.command else {
        panic!("regional")
    };
    let cfg = pdsno_node::config::NodeConfig::resolve(pdsno_shared::ids::Role::Regional, &a.node)
        .expect("config");
    let dbg = format!("{cfg:?} {a:?}");
    for s in [
        rc_token.as_str(),
        "network-key-material-0123456789",
        lab.secret.as_str(),
    ] {
        assert!(
            !dbg.contains(s),
            "Debug of the configuration shows a secret: {dbg}"
        );
    }
    let key = pdsno_shared::keys::IdentityKey::generate();
    assert!(!format!("{key:?}").contains(&hex::encode(key.seed())));
    let start = Instant::now();
    drop(lc);
    assert!(start.elapsed() < Duration::from_secs(30));
}
