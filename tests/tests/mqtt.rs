//! The embedded broker and the node's MQTT client over real sockets: QoS levels, retained
//! messages, last wills, authentication, interop with Mosquitto (its clients against our
//! broker, our client against its broker), and reconnection across a broker restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pdsno_broker::codec::{Connect, Version, Will};
use pdsno_broker::{BrokerConfig, BrokerHandle, CredentialCheck, EmbeddedBroker, OperatorAccount};
use pdsno_node::transport::mqtt::{
    BrokerUrl, LinkState, Message, MqttClient, MqttSettings, PublishError,
};
use pdsno_shared::keys::SecretString;
use pdsno_tests::{BrokerProc, Deadline, Mosquitto, OPS_PASSWORD, OPS_USER, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// MQTT 3.1.1 and 5 listeners on free loopback ports, with the operator account.
fn base_config() -> BrokerConfig {
    let mut cfg = BrokerConfig::plain(
        "127.0.0.1:0".parse().expect("addr"),
        Some("127.0.0.1:0".parse().expect("addr")),
    );
    cfg.operators
        .push(OperatorAccount::with_password(OPS_USER, OPS_PASSWORD).expect("account"));
    cfg
}

/// Starts `cfg` with a credential check accepting `ctl-1` / `secret` when the client id is
/// the user name.
async fn start_with_ctl(cfg: BrokerConfig, secret: &'static [u8]) -> BrokerHandle {
    let check: CredentialCheck = Arc::new(move |req| {
        Box::pin(async move {
            req.username == "ctl-1" && req.client_id == "ctl-1" && req.password.as_slice() == secret
        })
    });
    EmbeddedBroker::start(cfg, Some(check))
        .await
        .expect("broker starts")
}

/// An in-process broker with the operator account and `ctl-1` / `issued-secret`.
async fn embedded() -> BrokerHandle {
    start_with_ctl(base_config(), b"issued-secret").await
}

fn settings(addr: SocketAddr, id: &str, user: &str, password: &str) -> MqttSettings {
    let mut s = MqttSettings::new(
        BrokerUrl::parse(&format!("mqtt://{addr}")).expect("url"),
        id,
    );
    s.username = Some(user.into());
    s.password = Some(SecretString::new(password));
    s.backoff_min = Duration::from_millis(50);
    s.backoff_max = Duration::from_millis(400);
    s
}

async fn connected(s: MqttSettings) -> MqttClient {
    let (c, _task) = MqttClient::start(s).expect("client");
    c.wait_connected(T).await.expect("connects");
    c
}

async fn recv(rx: &mut mpsc::Receiver<Message>) -> Message {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("message within timeout")
        .expect("channel open")
}

/// Subscribes and proves the subscription is active by echoing a probe through it.
async fn subscribed(
    sub: &MqttClient,
    pubc: &MqttClient,
    filter: &str,
    qos: u8,
    probe_topic: &str,
) -> mpsc::Receiver<Message> {
    let mut rx = sub.subscribe(filter, qos).await.expect("subscribe");
    let deadline = Deadline::after(T, format!("a probe through the subscription {filter}"));
    loop {
        deadline.check();
        pubc.publish_confirmed(probe_topic, "probe", 1, false)
            .await
            .expect("probe");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            assert_eq!(m.topic, probe_topic);
            return rx;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_round_trip_and_both_auth_paths() {
    let broker = embedded().await;
    let addr = broker.plain_addr(Version::V311).expect("v4");
    let sub = connected(settings(addr, "ops-sub", OPS_USER, OPS_PASSWORD)).await;
    let publ = connected(settings(addr, "ctl-1", "ctl-1", "issued-secret")).await;
    for qos in 0..=2u8 {
        let topic = format!("pdsno/test/q{qos}");
        let mut rx = subscribed(&sub, &publ, &topic, qos, &topic).await;
        let payload = format!("payload at qos {qos}");
        publ.publish_confirmed(&topic, payload.clone(), qos, false)
            .await
            .expect("confirmed");
        let m = loop {
            let m = recv(&mut rx).await;
            if m.payload != "probe" {
                break m;
            }
        };
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.qos),
            (topic.as_str(), payload.as_bytes(), qos)
        );
    }
    assert!(
        publ.stats().acked >= 2,
        "QoS 1 and 2 publishes were acknowledged: {:?}",
        publ.stats()
    );
    assert_eq!(broker.stats().violations, 0);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_a_late_subscriber() {
    let broker = embedded().await;
    let addr = broker.plain_addr(Version::V311).expect("v4");
    let publ = connected(settings(addr, "ctl-1", "ctl-1", "issued-secret")).await;
    publ.publish_confirmed("pdsno/policy/global", "policy v7", 1, true)
        .await
        .expect("retained publish");
    let late = connected(settings(addr, "late", OPS_USER, OPS_PASSWORD)).await;
    let mut rx = late
        .subscribe("pdsno/policy/+", 1)
        .await
        .expect("subscribe");
    let m = recv(&mut rx).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        ("pdsno/policy/global", &b"policy v7"[..], true)
    );
    broker.shutdown().await;
}

async fn raw_connect(addr: SocketAddr, c: &Connect) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(&c.encode()).await.expect("send CONNECT");
    let mut ack = vec![0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut ack))
        .await
        .expect("answer")
        .expect("read");
    ack.truncate(n);
    (s, ack)
}

fn connect_packet(
    version: Version,
    id: &str,
    user: Option<&str>,
    password: Option<&str>,
    will: Option<Will>,
) -> Connect {
    Connect {
        version,
        clean: true,
        keep_alive: 30,
        properties: Vec::new(),
        client_id: id.into(),
        will,
        username: user.map(Into::into),
        password: password.map(|p| p.as_bytes().to_vec()),
        auth_method: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_fires_on_abrupt_disconnect_only() {
    let broker = embedded().await;
    let addr = broker.plain_addr(Version::V311).expect("v4");
    let watcher = connected(settings(addr, "watcher", OPS_USER, OPS_PASSWORD)).await;
    let probe = connected(settings(addr, "prober", OPS_USER, OPS_PASSWORD)).await;
    let mut rx = subscribed(&watcher, &probe, "pdsno/status/+", 1, "pdsno/status/probe").await;
    let will = |who: &str| Will {
        properties: vec![],
        topic: format!("pdsno/status/{who}"),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: false,
    };

    // A clean DISCONNECT: no will.
    let (mut polite, ack) = raw_connect(
        addr,
        &connect_packet(
            Version::V311,
            "polite",
            Some(OPS_USER),
            Some(OPS_PASSWORD),
            Some(will("polite")),
        ),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    polite.write_all(&[0xE0, 0x00]).await.expect("DISCONNECT");
    drop(polite);
    // An abrupt close: the will.
    let (abrupt, ack) = raw_connect(
        addr,
        &connect_packet(
            Version::V311,
            "abrupt",
            Some(OPS_USER),
            Some(OPS_PASSWORD),
            Some(will("abrupt")),
        ),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    drop(abrupt);
    let m = recv(&mut rx).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("pdsno/status/abrupt", &b"offline"[..]),
        "only the abrupt client's will"
    );
    // Nothing from the polite one even after a while.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err()
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_anonymous_are_refused_with_connack_codes() {
    let broker = embedded().await;
    let v4 = broker.plain_addr(Version::V311).expect("v4");
    let v5 = broker.plain_addr(Version::V5).expect("v5");
    let cases = [
        (
            v4,
            connect_packet(Version::V311, "x", Some(OPS_USER), Some("wrong"), None),
            vec![0x20, 0x02, 0x00, 0x04],
        ),
        (
            v4,
            connect_packet(Version::V311, "x", None, None, None),
            vec![0x20, 0x02, 0x00, 0x05],
        ),
        (
            v4,
            connect_packet(Version::V311, "ctl-1", Some("ctl-1"), Some("guess"), None),
            vec![0x20, 0x02, 0x00, 0x04],
        ),
        (
            v4,
            connect_packet(
                Version::V311,
                "not-ctl-1",
                Some("ctl-1"),
                Some("issued-secret"),
                None,
            ),
            vec![0x20, 0x02, 0x00, 0x04],
        ),
        (
            v5,
            connect_packet(Version::V5, "x", Some(OPS_USER), Some("wrong"), None),
            vec![0x20, 0x03, 0x00, 0x86, 0x00],
        ),
        (
            v5,
            connect_packet(Version::V5, "x", None, None, None),
            vec![0x20, 0x03, 0x00, 0x87, 0x00],
        ),
    ];
    for (addr, c, want) in cases {
        let (mut s, ack) = raw_connect(addr, &c).await;
        assert_eq!(ack, want, "{c:?}");
        let mut rest = [0u8; 8];
        let n = tokio::time::timeout(T, s.read(&mut rest))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "connection closed after the refusal");
    }
    // Our client reports the refusal and keeps retrying with backoff.
    let (bad, _task) =
        MqttClient::start(settings(v4, "ops-bad", OPS_USER, "wrong")).expect("client");
    assert!(
        bad.wait_connected(Duration::from_millis(800))
            .await
            .is_err()
    );
    assert!(bad.stats().connection_errors >= 1);
    assert!(broker.stats().refused_auth >= 5);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_against_our_broker_v311_and_v5() {
    let broker = BrokerProc::start(&[]);
    let v4 = broker.v4.port().to_string();
    let v5 = broker.v5.expect("v5").port().to_string();
    let sub = |port: &str, v5: bool, topic: &str| {
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-u",
            OPS_USER,
            "-P",
            OPS_PASSWORD,
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ];
        if v5 {
            args.extend_from_slice(&["-V", "5"]);
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    // Each listener serves both versions, as Mosquitto's do.
    for (port, v5flag) in [
        (v4.as_str(), false),
        (v4.as_str(), true),
        (v5.as_str(), true),
        (v5.as_str(), false),
    ] {
        let topic = format!(
            "pdsno/interop/{port}/{}",
            if v5flag { "v5" } else { "v311" }
        );
        let args = sub(port, v5flag, &topic);
        let handle = std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run("mosquitto_sub", &a, Duration::from_secs(15))
        });
        // Retry publishing until the subscriber is attached (it prints on first message).
        let mut got = None;
        for _ in 0..100 {
            let mut args = vec![
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-u",
                OPS_USER,
                "-P",
                OPS_PASSWORD,
                "-t",
                &topic,
                "-m",
                "hello",
                "-q",
                "1",
            ];
            if v5flag {
                args.extend_from_slice(&["-V", "5", "-D", "publish", "user-property", "k", "v"]);
            }
            let (code, _, err) = run("mosquitto_pub", &args, T);
            assert_eq!(code, Some(0), "mosquitto_pub failed: {err}");
            if handle.is_finished() {
                got = Some(handle.join().expect("sub thread"));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, out, err) = got.expect("mosquitto_sub received a message");
        assert_eq!(code, Some(0), "mosquitto_sub: {err}");
        assert_eq!(out.trim(), format!("{topic} hello"));
    }
    // A v5 publish with properties must not disturb a v3.1.1 subscriber (rumqttd alone
    // would panic that subscriber's connection), on one port.
    let args = sub(&v4, false, "pdsno/mixed");
    let handle = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run("mosquitto_sub", &a, Duration::from_secs(15))
    });
    for _ in 0..100 {
        run(
            "mosquitto_pub",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &v4,
                "-V",
                "5",
                "-u",
                OPS_USER,
                "-P",
                OPS_PASSWORD,
                "-t",
                "pdsno/mixed",
                "-m",
                "from-v5",
                "-D",
                "publish",
                "user-property",
                "a",
                "b",
                "-D",
                "publish",
                "message-expiry-interval",
                "60",
            ],
            T,
        );
        if handle.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out, _) = handle.join().expect("sub thread");
    assert_eq!((code, out.trim()), (Some(0), "pdsno/mixed from-v5"));
    // Wrong credentials and anonymity, as the operator sees them.
    let (code, _, err) = run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &v4,
            "-u",
            OPS_USER,
            "-P",
            "nope",
            "-t",
            "a",
            "-m",
            "x",
        ],
        T,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("bad user name or password"), "{err}");
    let (code, _, err) = run(
        "mosquitto_pub",
        &["-h", "127.0.0.1", "-p", &v4, "-t", "a", "-m", "x"],
        T,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("not authorised"), "{err}");
    let mut broker = broker;
    assert!(broker.proc.is_alive());
    assert!(
        !broker.proc.stderr().contains("panicked"),
        "{}",
        broker.proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_real_mosquitto() {
    let mosq = Mosquitto::start(0);
    let mut s = MqttSettings::new(
        BrokerUrl::parse(&format!("mqtt://{}", mosq.addr)).expect("url"),
        "pdsno-sub",
    );
    s.backoff_min = Duration::from_millis(50);
    let sub = connected(s).await;
    let mut p = MqttSettings::new(
        BrokerUrl::parse(&format!("mqtt://{}", mosq.addr)).expect("url"),
        "pdsno-pub",
    );
    p.will = Some(pdsno_node::transport::mqtt::Will {
        topic: "pdsno/status/pdsno-pub".into(),
        payload: "offline".into(),
        qos: 1,
        retain: true,
    });
    let publ = connected(p).await;
    let mut rx = subscribed(&sub, &publ, "pdsno/#", 1, "pdsno/probe").await;
    publ.publish_confirmed(
        "pdsno/discovery/zone-A/local_cntl_zone-A_1",
        "report",
        1,
        false,
    )
    .await
    .expect("publish");
    let m = recv(&mut rx).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos),
        (
            "pdsno/discovery/zone-A/local_cntl_zone-A_1",
            &b"report"[..],
            1
        )
    );
    publ.publish_confirmed("pdsno/policy/global", "p1", 1, true)
        .await
        .expect("retained");
    let mut l = MqttSettings::new(
        BrokerUrl::parse(&format!("mqtt://{}", mosq.addr)).expect("url"),
        "pdsno-late",
    );
    l.backoff_min = Duration::from_millis(50);
    let late = connected(l).await;
    let mut lrx = late
        .subscribe("pdsno/policy/global", 1)
        .await
        .expect("subscribe");
    let m = recv(&mut lrx).await;
    assert_eq!((&m.payload[..], m.retain), (&b"p1"[..], true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_no_buffered_qos1_message_and_resubscribes() {
    let mut broker = BrokerProc::start(&[]);
    let v4 = broker.v4;
    let v5 = broker.v5.expect("v5");
    let mut ps = settings(v4, "restart-pub", OPS_USER, OPS_PASSWORD);
    ps.outbox_limit = 20;
    let publ = connected(ps).await;
    let sub = connected(settings(v4, "restart-sub", OPS_USER, OPS_PASSWORD)).await;
    let mut q0 = subscribed(&sub, &publ, "pdsno/restart/q0", 0, "pdsno/restart/q0").await;
    let mut q1 = subscribed(&sub, &publ, "pdsno/restart/q1", 1, "pdsno/restart/q1").await;

    broker.proc.kill();
    for c in [&publ, &sub] {
        let mut st = c.state();
        tokio::time::timeout(
            T,
            st.wait_for(|s| matches!(s, LinkState::Disconnected { .. })),
        )
        .await
        .expect("noticed")
        .expect("state");
    }
    // Publish while the broker is gone: 20 fit in the outbox, 5 are refused and counted.
    let mut deliveries = Vec::new();
    let mut refused = 0;
    for i in 0..25 {
        match publ
            .publish(
                format!("pdsno/restart/retained/{i}"),
                format!("m{i}"),
                1,
                true,
            )
            .await
        {
            Ok(d) => deliveries.push((i, d)),
            Err(PublishError::OutboxFull(20)) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((deliveries.len(), refused), (20, 5));
    assert_eq!(publ.stats().outbox_overflow, 5);

    // The broker comes back on the same ports; the client reconnects by itself.
    let _broker2 = BrokerProc::start_on(&v4.to_string(), &v5.to_string(), &[]);
    for (i, d) in deliveries {
        tokio::time::timeout(T, d)
            .await
            .expect("confirmed in time")
            .expect("not dropped")
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
    }
    // Every buffered message reached the broker: a late subscriber sees all 20 retained.
    let late = connected(settings(v4, "restart-late", OPS_USER, OPS_PASSWORD)).await;
    let mut lrx = late
        .subscribe("pdsno/restart/retained/+", 1)
        .await
        .expect("subscribe");
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let m = recv(&mut lrx).await;
        assert!(m.retain);
        seen.insert(String::from_utf8_lossy(&m.payload).into_owned());
    }
    let want: std::collections::BTreeSet<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want);

    // The old subscriber resubscribed each filter at its own QoS.
    sub.wait_connected(T).await.expect("subscriber back");
    for (rx, topic, qos) in [
        (&mut q0, "pdsno/restart/q0", 0u8),
        (&mut q1, "pdsno/restart/q1", 1u8),
    ] {
        let deadline = Deadline::after(T, format!("{topic} delivered after the restart"));
        let m = loop {
            deadline.check();
            publ.publish_confirmed(topic, "after-restart", 1, false)
                .await
                .expect("publish");
            match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                Ok(Some(m)) if &m.payload[..] == b"after-restart" => break m,
                _ => {}
            }
        };
        assert_eq!(m.qos, qos, "{topic} delivered at the subscription's QoS");
    }
    assert!(publ.stats().connects >= 2 && sub.stats().connects >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_an_error_returned_to_the_caller() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = EmbeddedBroker::start(BrokerConfig::plain(addr, None), None)
        .await
        .expect_err("port in use");
    assert!(
        matches!(err, pdsno_broker::BrokerError::Bind { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    // The same through `pdsno broker`: a clear message and a failing exit code.
    let (code, _, stderr) = run(
        pdsno_tests::pdsno_bin().to_str().expect("utf-8"),
        &["broker", "--listen", &addr.to_string(), "--allow-anonymous"],
        T,
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("in use"),
        "{stderr}"
    );
}

/// A PUBLISH packet by hand (QoS 0 unless `packet_id`; MQTT 5 adds an empty property list).
fn publish_packet(v: Version, topic: &str, payload: &[u8], packet_id: Option<u16>) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if v == Version::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    assert!(body.len() < 128);
    let first = if packet_id.is_some() { 0x32 } else { 0x30 };
    let mut p = vec![first, u8::try_from(body.len()).expect("short")];
    p.extend_from_slice(&body);
    p
}

/// A SUBSCRIBE packet by hand, QoS 0 for every filter.
fn subscribe_packet(v: Version, filters: &[&str]) -> Vec<u8> {
    let mut body = vec![0x00, 0x07];
    if v == Version::V5 {
        body.push(0);
    }
    for f in filters {
        body.extend_from_slice(&u16::try_from(f.len()).expect("short").to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(0);
    }
    assert!(body.len() < 128);
    let mut p = vec![0x82, u8::try_from(body.len()).expect("short")];
    p.extend_from_slice(&body);
    p
}

/// Reads until the broker closes `s`; returns what it sent before closing.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the broker kept the connection open; got {got:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_rights_close_the_offender_and_keep_the_rest() {
    use pdsno_broker::{Access, Principal, TopicRules};
    let mut cfg = base_config();
    // ctl-1 may publish under own/ and subscribe to own/+; operators are not restricted.
    cfg.topic_rules = Some(TopicRules::new(|who, access, topic| match who {
        Principal::Credential(_) => match access {
            Access::Publish => topic.starts_with("own/"),
            Access::Subscribe => topic == "own/+",
        },
        _ => true,
    }));
    let broker = start_with_ctl(cfg, b"pw").await;
    let v4 = broker.plain_addr(Version::V311).expect("v4");
    let v5 = broker.plain_addr(Version::V5).expect("v5");
    let ops = connected(settings(v4, "ops-watch", OPS_USER, OPS_PASSWORD)).await;
    let mut own = subscribed(&ops, &ops, "own/+", 0, "own/probe").await;
    let mut other = subscribed(&ops, &ops, "other/+", 0, "other/probe").await;
    let ctl = |v: Version, will: Option<Will>| {
        connect_packet(v, "ctl-1", Some("ctl-1"), Some("pw"), will)
    };

    // 1. MQTT 3.1.1: an allowed and a forbidden PUBLISH in one write. The first is
    //    delivered, the second is not, and the connection is closed.
    let (mut s, ack) = raw_connect(v4, &ctl(Version::V311, None)).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let mut two = publish_packet(Version::V311, "own/a", b"before", None);
    two.extend(publish_packet(Version::V311, "other/x", b"forbidden", None));
    s.write_all(&two).await.expect("write");
    assert_eq!(
        until_closed(&mut s).await,
        b"",
        "3.1.1 has no reason to give"
    );
    let m = recv(&mut own).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("own/a", &b"before"[..])
    );
    assert_eq!(broker.stats().denied, 1);

    // 2. MQTT 5: a SUBSCRIBE with one filter outside the rights is refused as a whole:
    //    DISCONNECT 0x87 (not authorized).
    let (mut s, ack) = raw_connect(v5, &ctl(Version::V5, None)).await;
    assert_eq!(&ack[..4], [0x20, ack[1], 0x00, 0x00]);
    s.write_all(&subscribe_packet(Version::V5, &["own/+", "other/#"]))
        .await
        .expect("write");
    assert_eq!(
        until_closed(&mut s).await,
        pdsno_broker::codec::disconnect_v5(0x87)
    );
    assert_eq!(broker.stats().denied, 2);

    // 3. MQTT 5: a forbidden PUBLISH, QoS 1: no PUBACK, DISCONNECT 0x87, nothing delivered.
    let (mut s, _) = raw_connect(v5, &ctl(Version::V5, None)).await;
    s.write_all(&publish_packet(
        Version::V5,
        "other/y",
        b"forbidden",
        Some(1),
    ))
    .await
    .expect("write");
    assert_eq!(
        until_closed(&mut s).await,
        pdsno_broker::codec::disconnect_v5(0x87)
    );
    assert_eq!(broker.stats().denied, 3);

    // 4. A will on a topic the client may not publish on: CONNACK "not authorized".
    let will = Will {
        properties: vec![],
        topic: "other/will".into(),
        payload: b"gone".to_vec(),
        qos: 0,
        retain: true,
    };
    let (_s, ack) = raw_connect(v4, &ctl(Version::V311, Some(will))).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(broker.stats().denied, 4);

    // 5. Inside its rights the controller works: subscribe own/+ and receive, publish QoS 1
    //    on own/ and get the PUBACK.
    let (mut s, _) = raw_connect(v4, &ctl(Version::V311, None)).await;
    s.write_all(&subscribe_packet(Version::V311, &["own/+"]))
        .await
        .expect("write");
    let mut suback = [0u8; 5];
    tokio::time::timeout(T, s.read_exact(&mut suback))
        .await
        .expect("SUBACK in time")
        .expect("SUBACK");
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x07, 0x00]);
    s.write_all(&publish_packet(Version::V311, "own/b", b"fine", Some(9)))
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.windows(4).any(|w| w == [0x40, 0x02, 0x00, 0x09]) {
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("PUBACK in time")
            .expect("read");
        assert!(n > 0, "closed: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(recv(&mut own).await.payload, &b"fine"[..]);

    // Nothing forbidden ever reached a subscriber; operators are not restricted.
    ops.publish_confirmed("other/z", "by ops", 1, false)
        .await
        .expect("ops publishes anywhere");
    let m = recv(&mut other).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("other/z", &b"by ops"[..])
    );
    assert_eq!(broker.stats().denied, 4);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_account_subscribes_but_never_publishes() {
    let mut cfg = BrokerConfig::plain("127.0.0.1:0".parse().expect("addr"), None);
    cfg.operators
        .push(OperatorAccount::with_password(OPS_USER, OPS_PASSWORD).expect("account"));
    cfg.operators.push(
        OperatorAccount::with_password("mon", "mon-password")
            .expect("account")
            .read_only(),
    );
    let broker = EmbeddedBroker::start(cfg, None)
        .await
        .expect("broker starts");
    let addr = broker.plain_addr(Version::V311).expect("v4");
    let ops = connected(settings(addr, "ops-1", OPS_USER, OPS_PASSWORD)).await;
    let mon = connected(settings(addr, "mon-1", "mon", "mon-password")).await;
    let mut rx = subscribed(&mon, &ops, "pdsno/#", 1, "pdsno/probe").await;
    ops.publish_confirmed("pdsno/status/x", "seen", 1, false)
        .await
        .expect("publish");
    assert_eq!(recv(&mut rx).await.payload, &b"seen"[..]);

    // Its PUBLISH closes the connection and reaches nobody.
    let (mut s, ack) = raw_connect(
        addr,
        &connect_packet(
            Version::V311,
            "mon-raw",
            Some("mon"),
            Some("mon-password"),
            None,
        ),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    s.write_all(&publish_packet(
        Version::V311,
        "pdsno/status/x",
        b"forged",
        None,
    ))
    .await
    .expect("write");
    assert_eq!(until_closed(&mut s).await, b"");
    // Nor may it leave a will.
    let will = Will {
        properties: vec![],
        topic: "pdsno/status/mon".into(),
        payload: b"gone".to_vec(),
        qos: 0,
        retain: false,
    };
    let (_s, ack) = raw_connect(
        addr,
        &connect_packet(
            Version::V311,
            "mon-will",
            Some("mon"),
            Some("mon-password"),
            Some(will),
        ),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(broker.stats().denied, 2);
    ops.publish_confirmed("pdsno/status/x", "after", 1, false)
        .await
        .expect("publish");
    assert_eq!(
        recv(&mut rx).await.payload,
        &b"after"[..],
        "nothing forged in between"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_operator_passwords_lock_that_account_for_that_address() {
    let mut cfg = base_config();
    cfg.limits.operator_lockout_failures = 3;
    cfg.limits.operator_lockout = Duration::from_millis(1500);
    cfg.operators
        .push(OperatorAccount::with_password("mon", "mon-password").expect("account"));
    let broker = start_with_ctl(cfg, b"pw").await;
    let v4 = broker.plain_addr(Version::V311).expect("v4");
    let v5 = broker.plain_addr(Version::V5).expect("v5");
    let ops = |v: Version, pw: &str| connect_packet(v, "ops-x", Some(OPS_USER), Some(pw), None);

    for _ in 0..3 {
        let (_s, ack) = raw_connect(v4, &ops(Version::V311, "wrong")).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x04], "bad user name or password");
    }
    // Locked: even the right password is refused, without a check (5: banned).
    let (_s, ack) = raw_connect(v4, &ops(Version::V311, OPS_PASSWORD)).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05]);
    let (_s, ack) = raw_connect(v5, &ops(Version::V5, OPS_PASSWORD)).await;
    assert_eq!(ack, [0x20, 0x03, 0x00, 0x8A, 0x00]);
    assert_eq!(broker.stats().banned, 2);
    // Other accounts from the same address, and controllers, are not affected.
    let (_s, ack) = raw_connect(
        v4,
        &connect_packet(
            Version::V311,
            "mon-x",
            Some("mon"),
            Some("mon-password"),
            None,
        ),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let (_s, ack) = raw_connect(
        v4,
        &connect_packet(Version::V311, "ctl-1", Some("ctl-1"), Some("pw"), None),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    // The lockout ends; the right password works again.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (_s, ack) = raw_connect(v4, &ops(Version::V311, OPS_PASSWORD)).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    broker.shutdown().await;
}

/// A client given the members of a broker cluster moves on to the next one when its broker
/// dies: its subscriptions follow, and what it published meanwhile is delivered there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_fails_over_to_the_next_broker_of_a_cluster() {
    let mut a = Mosquitto::start(0);
    let b = Mosquitto::start(0);
    let url = |addr: SocketAddr| BrokerUrl::parse(&format!("mqtt://{addr}")).expect("url");
    let mut s = MqttSettings::new(url(a.addr), "pdsno-failover");
    s.alternates = vec![url(b.addr)];
    s.backoff_min = Duration::from_millis(50);
    s.backoff_max = Duration::from_millis(200);
    let client = connected(s).await;
    let mut own = client.subscribe("fo/in/#", 1).await.expect("subscribe");
    let mut other = MqttSettings::new(url(b.addr), "watcher-b");
    other.backoff_min = Duration::from_millis(50);
    let watcher = connected(other).await;
    let mut seen_at_b = watcher.subscribe("fo/out/#", 1).await.expect("subscribe");

    a.proc.kill();
    let mut st = client.state();
    tokio::time::timeout(
        T,
        st.wait_for(|s| matches!(s, LinkState::Disconnected { .. })),
    )
    .await
    .expect("noticed")
    .expect("state");
    let sent = client
        .publish("fo/out/1", "while failing over", 1, false)
        .await
        .expect("queued");
    client.wait_connected(T).await.expect("connected to b");
    assert_eq!(client.broker(), url(b.addr));
    tokio::time::timeout(T, sent)
        .await
        .expect("confirmed in time")
        .expect("not dropped")
        .expect("confirmed by b");
    let m = recv(&mut seen_at_b).await;
    assert_eq!(&m.payload[..], b"while failing over");
    // Its subscription was renewed at b.
    let deadline = Deadline::after(T, "the client's subscription renewed at b");
    loop {
        deadline.check();
        watcher
            .publish_confirmed("fo/in/x", "to the client", 1, false)
            .await
            .expect("publish at b");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), own.recv()).await {
            assert_eq!(&m.payload[..], b"to the client");
            break;
        }
    }
    assert!(client.stats().connects >= 2);
}

/// A controller publishing above its rate is slowed down by back-pressure (the front door
/// stops reading), not cut off: every message arrives. Operators are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_above_its_publish_rate_is_slowed_not_dropped() {
    let mut cfg = base_config();
    cfg.limits.controller_publish_rate = 100;
    cfg.limits.controller_publish_burst = 50;
    let broker = start_with_ctl(cfg, b"pw").await;
    let v4 = broker.plain_addr(Version::V311).expect("v4");
    let ops = connected(settings(v4, "ops-rate", OPS_USER, OPS_PASSWORD)).await;
    let mut rx = subscribed(&ops, &ops, "rate/+", 0, "rate/probe").await;

    let (mut s, ack) = raw_connect(
        v4,
        &connect_packet(Version::V311, "ctl-1", Some("ctl-1"), Some("pw"), None),
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let mut all = Vec::new();
    for i in 0..250u32 {
        all.extend(publish_packet(
            Version::V311,
            "rate/x",
            &i.to_be_bytes(),
            None,
        ));
    }
    let started = std::time::Instant::now();
    s.write_all(&all).await.expect("write");
    for i in 0..250u32 {
        let m = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("every message arrives")
            .expect("open");
        assert_eq!(&m.payload[..], &i.to_be_bytes(), "in order, none lost");
    }
    // 200 messages above the burst at 100/s: at least ~2 s (a lower bound only).
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not slowed: {:?}",
        started.elapsed()
    );
    let throttled = broker.stats().throttled;
    assert!(throttled > 0);

    for i in 0..500u32 {
        ops.publish("rate/ops", i.to_be_bytes().to_vec(), 0, false)
            .await
            .expect("publish");
    }
    let mut got = 0;
    while got < 500 {
        let m = recv(&mut rx).await;
        if m.topic == "rate/ops" {
            got += 1;
        }
    }
    assert_eq!(
        broker.stats().throttled,
        throttled,
        "operators are not limited"
    );
    broker.shutdown().await;
}
