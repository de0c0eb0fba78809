//! Health and metrics as an operator scrapes them, between real processes:
//! - `--listen-metrics`: a plaintext listener serving only `/health`, `/ready` and
//!   `/metrics`, scraped without a client certificate from a global controller whose REST
//!   and gRPC listeners require mutual TLS (and whose REST listener still refuses
//!   plaintext);
//! - `pdsno_broker_*` only where a broker runs: a global controller with its embedded
//!   broker and `pdsno broker`, not a regional controller nor a global controller with
//!   `--no-embedded-broker`;
//! - every documented series ([`pdsno_node::metrics::Scope::series`], also named in the
//!   README) present on a fresh process before any traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use pdsno_node::metrics::{Scope, has_sample};
use pdsno_tests::{
    Deadline, Lab, NodeProc, OPS_PASSWORD, OPS_USER, Pki, Proc, field, listening_addr,
    mqtt_connect, workspace_root,
};

const LONG: Duration = Duration::from_secs(60);

/// One plaintext HTTP/1.1 request; (status, whole response). Status 0 when the answer is no
/// HTTP response (closed, reset, or TLS bytes).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.split(' ').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// The `metrics=ADDR` of a node's `ready` line.
fn metrics_addr(node: &NodeProc) -> SocketAddr {
    let line = node
        .proc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ready "))
        .expect("ready line");
    field(&line, "metrics")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics= in {line:?}"))
}

fn scrape(addr: SocketAddr) -> String {
    let (code, text) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("application/openmetrics-text"),
        "content type: {text}"
    );
    text
}

/// Every documented series of `scope` has a sample in `text`, and nothing else does.
fn assert_series(scope: Scope, text: &str, who: &str) {
    let missing: Vec<&str> = scope
        .series()
        .into_iter()
        .filter(|n| !has_sample(text, n))
        .collect();
    assert!(missing.is_empty(), "{who}: missing {missing:?}\n{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(text);
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            scope.series().iter().any(|n| has_sample(l, n)),
            "{who}: undocumented sample {l:?}"
        );
    }
}

/// Waits until `path` on `addr` answers `code`.
fn wait_code(addr: SocketAddr, path: &str, code: u16) -> String {
    let deadline = Instant::now() + LONG;
    loop {
        let (c, text) = http(addr, "GET", path);
        if c == code {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {code}; last: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A global controller whose REST and gRPC listeners require mutual TLS is scraped over
/// plain HTTP without a client certificate on `--listen-metrics`, which serves `/health`,
/// `/ready` and `/metrics` and nothing else; its REST listener still refuses plaintext.
#[test]
fn metrics_listener_is_plaintext_beside_mutual_tls() {
    let lab = Lab::new();
    let pki = Pki::new(&lab, "pki");
    let mut args = pki.flags("global", &[]);
    args.extend(
        [
            "--require-tls",
            "--require-client-cert",
            "--listen-metrics",
            "127.0.0.1:0",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gc = lab.global(&args);
    let addr = metrics_addr(&gc);
    assert_ne!(addr.port(), 0);
    assert_ne!(addr, gc.rest);

    // Every documented series of a controller running a broker, before any traffic.
    let text = scrape(addr);
    assert_series(Scope::NodeWithBroker, &text, "global (mTLS)");

    let (code, body) = http(addr, "GET", "/health");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#""status":"healthy""#)
            && body.contains(r#""controller_id":"global_cntl_1""#),
        "{body}"
    );
    // Ready once its own MQTT client is on the broker (over TLS).
    let body = wait_code(addr, "/ready", 200);
    assert!(
        body.contains(r#""status":"ready""#) && body.contains(r#""nib":"ok""#),
        "{body}"
    );
    // Nothing else: not the REST endpoints, not another method.
    for path in ["/info", "/", "/message/heartbeat", "/metrics/extra"] {
        let (code, body) = http(addr, "GET", path);
        assert_eq!(code, 404, "GET {path}: {body}");
    }
    let (code, body) = http(addr, "POST", "/message/validation_request");
    assert_eq!(code, 404, "{body}");
    let (code, body) = http(addr, "POST", "/metrics");
    assert_eq!(code, 405, "{body}");

    // The REST listener refuses plaintext, and the metrics listener shows the refusal.
    for path in ["/health", "/metrics"] {
        let (code, body) = http(gc.rest, "GET", path);
        assert_eq!(
            code, 0,
            "plaintext {path} on the mTLS REST listener: {body}"
        );
    }
    let deadline = Instant::now() + LONG;
    loop {
        let text = scrape(addr);
        let refused = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"pdsno_refused_total{transport="rest",reason="tls_handshake"} "#)
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if refused >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refused plaintext requests are not counted\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Broker series only where a broker runs; the regional controller's and the brokerless
/// global controller's documented series are all there from the start, on the metrics
/// listener and on the REST listener alike.
#[test]
fn broker_series_only_where_a_broker_runs() {
    let lab = Lab::new();
    let gc = lab.global(&["--listen-metrics", "127.0.0.1:0"]);
    let gc_text = scrape(metrics_addr(&gc));
    assert_series(Scope::NodeWithBroker, &gc_text, "global");
    assert!(
        gc_text.contains(r#"pdsno_broker_refused_total{reason="auth"} 0"#),
        "{gc_text}"
    );
    // The REST listener keeps serving /metrics, with the same series.
    let (code, rest_text) = http(gc.rest, "GET", "/metrics");
    assert_eq!(code, 200, "{rest_text}");
    assert_series(Scope::NodeWithBroker, &rest_text, "global (REST)");

    let rc = lab.child(
        "regional",
        "rc-1",
        &gc,
        "zone-A",
        &[
            "--listen-metrics",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "0.2",
        ],
    );
    let rc_metrics = metrics_addr(&rc);
    let text = scrape(rc_metrics);
    assert_series(Scope::Node, &text, "regional");
    assert!(!text.contains("pdsno_broker_"), "{text}");
    // Ready once the parent acknowledged a heartbeat and the broker link is up.
    let body = wait_code(rc_metrics, "/ready", 200);
    assert!(body.contains(&rc.id), "{body}");
    let (code, rest_text) = http(rc.rest, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(!rest_text.contains("pdsno_broker_"), "{rest_text}");

    // A global controller without its embedded broker.
    let other = Lab::new();
    let gc2 = other.global(&["--no-embedded-broker", "--listen-metrics", "127.0.0.1:0"]);
    let text = scrape(metrics_addr(&gc2));
    assert_series(Scope::Node, &text, "global --no-embedded-broker");
    assert!(!text.contains("pdsno_broker_"), "{text}");
}

/// `pdsno broker --listen-metrics`: build, process and broker series, none of a
/// controller's.
#[test]
fn the_standalone_broker_exposes_broker_series() {
    let mut broker = Proc::pdsno(
        "pdsno broker",
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--allow-anonymous",
            "--listen-metrics",
            "127.0.0.1:0",
        ],
        &[],
    );
    broker.wait_line(LONG, |l| l == "ready");
    let line = broker.wait_line(LONG, |l| l.starts_with("listening metrics http "));
    let addr = listening_addr(&line);
    let text = scrape(addr);
    assert_series(Scope::Broker, &text, "pdsno broker");
    assert!(
        text.contains("pdsno_broker_connections 0"),
        "no client yet: {text}"
    );
    assert!(!text.contains("pdsno_messages_"), "{text}");
    let (code, body) = http(addr, "GET", "/health");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("controller_id"), "{body}");
    assert_eq!(http(addr, "GET", "/ready").0, 200);
    assert_eq!(http(addr, "GET", "/info").0, 404);
    // A client on the broker shows in its gauge.
    let v4 = broker
        .lines()
        .iter()
        .find(|l| l.starts_with("listening v4 mqtt "))
        .map(|l| listening_addr(l))
        .expect("v4 listener");
    let mut client = TcpStream::connect(v4).expect("connect");
    // MQTT 3.1.1 CONNECT, clean session, keepalive 60, client id "m".
    client
        .write_all(&[
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'm',
        ])
        .expect("CONNECT");
    let mut connack = [0u8; 4];
    client.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
    let deadline = Instant::now() + LONG;
    loop {
        let text = scrape(addr);
        if text.contains("pdsno_broker_connections 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one sample (`series` with its labels) in `text`; 0 when absent.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An operator account locked after repeated wrong passwords (default: 5 in a minute) is
/// refused as `banned`, and the real broker process exports it as
/// `pdsno_broker_refused_total{reason="banned"}` (the wrong passwords as `auth`).
#[test]
fn an_operator_lockout_is_exported_as_banned() {
    let user = format!("{OPS_USER}:{OPS_PASSWORD}");
    let mut broker = Proc::pdsno(
        "pdsno broker",
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--user",
            &user,
            "--listen-metrics",
            "127.0.0.1:0",
        ],
        &[],
    );
    broker.wait_line(LONG, |l| l == "ready");
    let line = broker.wait_line(LONG, |l| l.starts_with("listening metrics http "));
    let addr = listening_addr(&line);
    let v4 = broker
        .lines()
        .iter()
        .find(|l| l.starts_with("listening v4 mqtt "))
        .map(|l| listening_addr(l))
        .expect("v4 listener");
    let banned = r#"pdsno_broker_refused_total{reason="banned"}"#;
    let auth = r#"pdsno_broker_refused_total{reason="auth"}"#;
    let before = scrape(addr);
    assert_eq!(sample(&before, banned), 0, "{before}");
    assert!(before.contains(&format!("{banned} 0\n")), "{before}");
    for i in 0..5 {
        let (code, _s) = mqtt_connect(v4, &format!("ops-{i}"), Some(OPS_USER), Some(b"wrong"));
        assert_eq!(code, 4, "attempt {i}: bad user name or password");
    }
    // Locked: even the right password is refused, without a check.
    for i in 0..2 {
        let (code, _s) = mqtt_connect(
            v4,
            &format!("ops-ok-{i}"),
            Some(OPS_USER),
            Some(OPS_PASSWORD.as_bytes()),
        );
        assert_eq!(code, 5, "locked out: not authorized");
    }
    let deadline = Deadline::after(LONG, "the lockout refusals in /metrics");
    let text = loop {
        let text = scrape(addr);
        if sample(&text, banned) >= 2 {
            break text;
        }
        deadline.check();
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&text, banned), 2, "{text}");
    assert_eq!(sample(&text, auth), 5, "{text}");
}

/// A `--listen-metrics` address that cannot be bound stops the start, naming the flag.
#[test]
fn a_busy_metrics_address_is_a_clear_startup_error() {
    let lab = Lab::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = held.local_addr().expect("addr").to_string();
    let mut p = lab.spawn(
        "global",
        "global",
        &["--regions", "zone-A", "--listen-metrics", &busy],
    );
    let deadline = Instant::now() + LONG;
    while p.is_alive() {
        assert!(Instant::now() < deadline, "still running: {:?}", p.lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = p.stderr();
    assert!(
        err.contains(&busy) && err.contains("--listen-metrics"),
        "{err}"
    );
    assert!(!p.lines().iter().any(|l| l.starts_with("ready ")));
}

/// The README's metrics section names exactly the documented series.
#[test]
fn the_readme_names_every_series() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let start = readme.find("\nMetrics:").expect("a Metrics: paragraph");
    let section = &readme[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut all = Scope::NodeWithBroker.series();
    all.sort_unstable();
    for name in &all {
        assert!(section.contains(&format!("`{name}")), "README lacks {name}");
    }
    for word in section.split('`') {
        let name = word.split('{').next().unwrap_or_default();
        if (name.starts_with("pdsno_") || name.starts_with("process_"))
            && !name.contains(' ')
            && !name.ends_with('_')
        {
            assert!(
                all.contains(&name),
                "README names {name}, which is not a documented series"
            );
        }
    }
}

/// The transport a message came over is the one its series names: a policy a regional
/// controller without MQTT fetches from its parent at start came over gRPC.
#[test]
fn a_policy_fetched_over_grpc_is_counted_as_grpc() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let rc = lab.child(
        "regional",
        "temp-rc-p",
        &gc,
        "zone-A",
        &["--no-mqtt", "--listen-metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&rc);
    let sample = |text: &str, transport: &str| -> f64 {
        let key = format!(
            "pdsno_messages_total{{type=\"POLICY_UPDATE\",transport=\"{transport}\",outcome=\"accepted\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + LONG;
    let text = loop {
        let text = scrape(addr);
        if sample(&text, "grpc") >= 1.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no policy counted over gRPC:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sample(&text, "mqtt"), 0.0, "{text}");
}
