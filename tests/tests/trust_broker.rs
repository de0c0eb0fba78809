//! Attacks on the global controller's front doors, performed against real processes:
//! a compromised local controller flooding the embedded broker with retained messages, an
//! operator account subscribing to ever new filters, an operator account taking over a
//! controller's MQTT session by its client id, and one address holding every connection
//! slot of the gRPC, REST and MQTT listeners.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::nib;
use pdsno_broker::codec::{Connect, Version, Will};
use pdsno_node::nib::StateKey;
use pdsno_shared::grpc::pb;
use pdsno_tests::{Lab, NodeProc, Proc, listening_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(30);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// Another loopback address (all of 127.0.0.0/8 is loopback on Linux).
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A loopback address the tests declare exempt (like a NAT gateway).
const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A TCP connection to `dst` from the loopback address `src`.
async fn tcp_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(src, 0)).expect("bind source");
    tokio::time::timeout(WAIT, sock.connect(dst))
        .await
        .expect("connect in time")
        .expect("connect")
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = u8::try_from(n % 128).expect("7 bits");
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    varint(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A PUBLISH: QoS 1 with `packet_id`, else QoS 0; the retain flag as asked.
fn publish(
    v: Version,
    topic: &str,
    payload: &[u8],
    packet_id: Option<u16>,
    retain: bool,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + topic.len() + 8);
    mqtt_str(&mut body, topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if v == Version::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let mut first = if packet_id.is_some() { 0x32 } else { 0x30 };
    if retain {
        first |= 0x01;
    }
    packet(first, &body)
}

/// A SUBSCRIBE (MQTT 3.1.1), QoS 0 for every filter.
fn subscribe(filters: &[&str]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    for f in filters {
        mqtt_str(&mut body, f);
        body.push(0);
    }
    packet(0x82, &body)
}

fn connect(v: Version, id: &str, user: &str, password: &[u8], will: Option<Will>) -> Connect {
    Connect {
        version: v,
        clean: true,
        keep_alive: 60,
        properties: Vec::new(),
        client_id: id.into(),
        will,
        username: Some(user.into()),
        password: Some(password.to_vec()),
        auth_method: false,
    }
}

/// Reads one MQTT packet: (first byte, body); `None` when the connection closes first.
async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let first = s.read_u8().await.ok()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = s.read_u8().await.ok()?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

/// Connects with `c` from `src`; returns the CONNACK's return / reason code and the stream.
/// Every CONNECT gets its CONNACK, also one reusing the client id of a session that has
/// just ended (the front door hands sessions of one id to the router one at a time).
async fn mqtt(dst: SocketAddr, src: IpAddr, c: &Connect) -> (u8, TcpStream) {
    let mut s = tcp_from(src, dst).await;
    s.write_all(&c.encode()).await.expect("send CONNECT");
    let (first, body) = tokio::time::timeout(WAIT, read_packet(&mut s))
        .await
        .expect("CONNACK in time")
        .unwrap_or_else(|| panic!("{}: closed without CONNACK", c.client_id));
    assert_eq!(first, 0x20, "CONNACK expected, got {first:#x} {body:?}");
    (body[1], s)
}

/// Reads until the peer closes `s` (end of stream or reset) within `within`; returns what
/// it sent before, or `None` when it is still open.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Waits for the PUBACK of `id` (true) or the close of `s` (false).
async fn puback_or_close(s: &mut TcpStream, id: u16) -> bool {
    loop {
        match tokio::time::timeout(WAIT, read_packet(s)).await {
            Err(_) => panic!("neither PUBACK nor close"),
            Ok(None) => return false,
            Ok(Some((0x40, body))) if body[..2] == id.to_be_bytes() => return true,
            Ok(Some(_)) => {}
        }
    }
}

/// The resident memory of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The address of a `mqtt v5 ADDR` line of the global controller.
fn v5_addr(p: &Proc) -> SocketAddr {
    p.lines()
        .iter()
        .find(|l| l.starts_with("mqtt v5 "))
        .map(|l| listening_addr(l))
        .expect("an MQTT 5 listener")
}

/// `GET path` over HTTP/1.1 from `src`; (status, body).
async fn http_get(src: IpAddr, dst: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tcp_from(src, dst).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// The value of one series in a metrics text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn metrics_from(src: IpAddr, node: &NodeProc) -> String {
    let (code, body) = http_get(src, node.rest, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

fn connected_lines(p: &Proc) -> usize {
    p.lines()
        .iter()
        .filter(|l| l.starts_with("mqtt connected"))
        .count()
}

/// A local controller's credential flooding the broker with 200 KiB retained messages on
/// every topic it may publish on but where nothing is retained (events, replies to its RC,
/// its discovery topic): refused outright, and the GC's memory stays flat. Each refusal
/// closes the connection, so the attacker reconnects 1,500 times with the same client id;
/// every reconnection gets its CONNACK. An operator account retaining on its own topics
/// stops at its budget. The retained policy still works and the RC is never disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_floods_do_not_grow_the_global_controllers_memory() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--reader",
        "mon:mon-password",
        "--user",
        "ops:ops-password",
        "--listen-mqtt-v5",
        "127.0.0.1:0",
    ]);
    let broker = gc.mqtt.expect("embedded broker");
    let broker_v5 = v5_addr(&gc.proc);
    let mut rc = lab.child("regional", "temp-rc-r", &gc, "zone-A", &[]);
    let mut lc = lab.child("local", "temp-lc-r", &rc, "zone-A", &[]);
    rc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 republished"));
    lc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 applied"));
    let cred = nib(&lc)
        .state_str(StateKey::MqttCredential)
        .expect("state")
        .expect("the LC has an MQTT credential");
    // The LC is compromised: its credential is played by the attacker.
    lc.proc.kill();
    let as_lc = |v: Version| connect(v, &lc.id, &lc.id, cred.as_bytes(), None);

    let rss_before = vm_rss_kib(gc.proc.pid());
    let payload = vec![b'x'; 200 * 1024];
    let topics = [
        "pdsno/events/zone-A".to_owned(),
        "pdsno/events/system".to_owned(),
        format!("pdsno/reply/{}", rc.id),
        format!("pdsno/discovery/zone-A/{}", lc.id),
    ];
    // 1,500 retained publishes of 200 KiB (unprotected, ~300 MiB kept in memory) where
    // nothing may be retained (the topics themselves are the LC's): each closes its
    // connection, none is kept.
    let started = Instant::now();
    let lc_attempts = 1500u64;
    for i in 0..lc_attempts {
        let (code, mut s) = mqtt(broker, LOCAL, &as_lc(Version::V311)).await;
        assert_eq!(code, 0, "the LC's credential connects");
        let topic = &topics[usize::try_from(i).expect("small") % topics.len()];
        let _ = s
            .write_all(&publish(Version::V311, topic, &payload, None, true))
            .await;
        assert!(
            closed_within(&mut s, WAIT).await.is_some(),
            "a retained publish on {topic} left the connection open"
        );
    }
    let rss_after = vm_rss_kib(gc.proc.pid());
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    eprintln!(
        "GC VmRSS {rss_before} KiB -> {rss_after} KiB after {} MiB of retained publishes in {:?}",
        lc_attempts * 200 / 1024,
        started.elapsed()
    );
    assert!(
        growth_mib < 64,
        "the GC grew by {growth_mib} MiB ({rss_before} -> {rss_after} KiB)"
    );
    // MQTT 5 says why: 0x9A "retain not supported".
    let (code, mut s) = mqtt(broker_v5, LOCAL, &as_lc(Version::V5)).await;
    assert_eq!(code, 0);
    s.write_all(&publish(Version::V5, &topics[0], b"{}", None, true))
        .await
        .expect("write");
    assert_eq!(
        closed_within(&mut s, WAIT).await.expect("closed"),
        pdsno_broker::codec::disconnect_v5(0x9A)
    );
    // A reply to a controller the LC does not talk to (another LC) is not even publishable.
    let (_, mut s) = mqtt(broker_v5, LOCAL, &as_lc(Version::V5)).await;
    s.write_all(&publish(
        Version::V5,
        "pdsno/reply/local_cntl_zone-A_99",
        b"{}",
        Some(1),
        false,
    ))
    .await
    .expect("write");
    assert_eq!(
        closed_within(&mut s, WAIT).await.expect("closed"),
        pdsno_broker::codec::disconnect_v5(0x87)
    );
    // A reply to its own RC, not retained, is fine (PUBACK).
    let (_, mut s) = mqtt(broker, LOCAL, &as_lc(Version::V311)).await;
    s.write_all(&publish(Version::V311, &topics[2], b"{}", Some(7), false))
        .await
        .expect("write");
    assert!(puback_or_close(&mut s, 7).await, "a plain reply to its RC");
    drop(s);

    // An operator account (unrestricted topics) retaining 200 KiB on fresh topics: five
    // fit its 1 MiB budget, every further one closes the connection.
    let ops_attempts = 12u16;
    let mut accepted = 0;
    for i in 0..ops_attempts {
        let (code, mut s) = mqtt(
            broker,
            LOCAL,
            &connect(Version::V311, "ops-flood", "ops", b"ops-password", None),
        )
        .await;
        assert_eq!(code, 0);
        s.write_all(&publish(
            Version::V311,
            &format!("ops/flood/{i}"),
            &payload,
            Some(1),
            true,
        ))
        .await
        .expect("write");
        if puback_or_close(&mut s, 1).await {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 5, "the operator's retained budget is 1 MiB");
    // Inside pdsno/ an operator account is held to the protocol's retained topics too.
    let (code, mut s) = mqtt(
        broker,
        LOCAL,
        &connect(Version::V311, "ops-events", "ops", b"ops-password", None),
    )
    .await;
    assert_eq!(code, 0);
    s.write_all(&publish(Version::V311, &topics[1], b"{}", Some(2), true))
        .await
        .expect("write");
    assert!(
        !puback_or_close(&mut s, 2).await,
        "an operator retained a message on {}",
        topics[1]
    );

    // Nothing forbidden is retained; the operator's five, the RC's policy are.
    let (code, mut s) = mqtt(
        broker,
        LOCAL,
        &connect(Version::V311, "mon-check", "mon", b"mon-password", None),
    )
    .await;
    assert_eq!(code, 0);
    s.write_all(&subscribe(&[
        "pdsno/events/+",
        "pdsno/reply/+",
        "pdsno/discovery/+/+",
        "pdsno/policy/zone-A",
        "ops/flood/+",
    ]))
    .await
    .expect("SUBSCRIBE");
    let mut retained = Vec::new();
    while let Ok(Some((first, body))) =
        tokio::time::timeout(Duration::from_millis(1500), read_packet(&mut s)).await
    {
        if first >> 4 == 3 {
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            retained.push(String::from_utf8_lossy(&body[2..2 + n]).into_owned());
        }
    }
    retained.sort();
    let mut want: Vec<String> = (0..5).map(|i| format!("ops/flood/{i}")).collect();
    want.push("pdsno/policy/zone-A".into());
    assert_eq!(retained, want);

    // Counted; the running RC was never disturbed.
    let text = metrics_from(LOCAL, &gc).await;
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="retain_forbidden"}"#
        ),
        lc_attempts + 2,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="retained_quota"}"#
        ),
        u64::from(ops_attempts) - 5
    );
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="not_authorized"}"#
        ),
        1
    );
    let bytes = metric(&text, "pdsno_broker_retained_bytes");
    assert!(
        (5 * 200 * 1024..2 * 1024 * 1024).contains(&bytes),
        "retained bytes {bytes}"
    );
    assert_eq!(connected_lines(&rc.proc), 1, "the RC stayed connected");
}

/// A SUBSCRIBE (MQTT 5), QoS 0 for every filter.
fn subscribe_v5(packet_id: u16, filters: &[String]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0); // no properties
    for f in filters {
        mqtt_str(&mut body, f);
        body.push(0);
    }
    packet(0x82, &body)
}

/// Waits for the SUBACK (MQTT 5) of `packet_id` and returns its reason codes, or for the
/// close of `s` and returns the DISCONNECT body the broker sent before closing (empty if none).
async fn suback_or_close(s: &mut TcpStream, packet_id: u16) -> Result<Vec<u8>, Vec<u8>> {
    loop {
        match tokio::time::timeout(WAIT, read_packet(s)).await {
            Err(_) => panic!("neither SUBACK nor close"),
            Ok(None) => return Err(Vec::new()),
            Ok(Some((0x90, body))) if body[..2] == packet_id.to_be_bytes() => {
                // Packet id, then the properties (a one-byte length here), then the codes.
                let props = usize::from(body[2]);
                return Ok(body[3 + props..].to_vec());
            }
            Ok(Some((0xE0, body))) => return Err(body),
            Ok(Some(_)) => {}
        }
    }
}

/// Every distinct filter ever subscribed keeps a message log in the embedded broker for its
/// lifetime. An operator account subscribing to ever new filters stops at its budget (64):
/// the SUBSCRIBE that would exceed it closes the connection (MQTT 5: 0x97), counted as
/// `filter_quota`; filters already known stay free for it, and a controller admitted
/// afterwards still subscribes to its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_filters_are_bounded_per_account() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--user",
        "ops:ops-password",
        "--listen-mqtt-v5",
        "127.0.0.1:0",
    ]);
    let broker_v5 = v5_addr(&gc.proc);
    let mut rc = lab.child("regional", "temp-rc-f", &gc, "zone-A", &[]);
    rc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    let filters_now = |text: &str| metric(text, "pdsno_broker_filters");
    // The GC's and the RC's own filters: statuses, the region's discovery, the global
    // policy, the RC's replies.
    let mut own = 0;
    for _ in 0..100 {
        own = filters_now(&metrics_from(LOCAL, &gc).await);
        if own >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(own, 4);

    let ops = || connect(Version::V5, "ops-subscriber", "ops", b"ops-password", None);
    let (code, mut s) = mqtt(broker_v5, LOCAL, &ops()).await;
    assert_eq!(code, 0);
    // 64 new filters (and two the controllers brought, free): taken.
    let mut batch: Vec<String> = (0..62).map(|i| format!("ops/watch/{i}")).collect();
    batch.push("pdsno/status/+".into());
    batch.push("$share/ops/pdsno/policy/global".into());
    s.write_all(&subscribe_v5(1, &batch))
        .await
        .expect("SUBSCRIBE");
    let codes = suback_or_close(&mut s, 1).await.expect("SUBACK");
    assert_eq!(codes, vec![0u8; 64]);
    let last_two = ["ops/watch/62".to_owned(), "ops/watch/63".to_owned()];
    s.write_all(&subscribe_v5(4, &last_two))
        .await
        .expect("SUBSCRIBE");
    assert_eq!(suback_or_close(&mut s, 4).await, Ok(vec![0, 0]));
    // One more new filter: the connection is closed with "quota exceeded".
    s.write_all(&subscribe_v5(2, &["ops/watch/64".to_owned()]))
        .await
        .expect("SUBSCRIBE");
    assert_eq!(
        suback_or_close(&mut s, 2).await,
        Err(pdsno_broker::codec::disconnect_v5(0x97)[2..].to_vec())
    );
    // Known filters are still free for the operator.
    let (_, mut s) = mqtt(broker_v5, LOCAL, &ops()).await;
    s.write_all(&subscribe_v5(
        3,
        &["ops/watch/7".to_owned(), "pdsno/status/+".to_owned()],
    ))
    .await
    .expect("SUBSCRIBE");
    assert_eq!(suback_or_close(&mut s, 3).await, Ok(vec![0, 0]));

    // A local controller admitted now subscribes to its own filters (its region's policy
    // and its replies, both new).
    let mut lc = lab.child("local", "temp-lc-f", &rc, "zone-A", &[]);
    lc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics_from(LOCAL, &gc).await;
        if filters_now(&text) == own + 66 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(filters_now(&text), own + 66, "{text}");
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="filter_quota"}"#
        ),
        1,
        "only the operator's SUBSCRIBE was refused"
    );
    assert_eq!(connected_lines(&rc.proc), 1, "the RC stayed connected");
}

/// A read-only account (and an operator account) asking for a controller's client id: the
/// GC's own, an RC's, or any id shaped like a controller's. Without the reservation the
/// broker would hand them the session and end the controller's, firing its will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_accounts_cannot_take_a_controllers_client_id() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--reader",
        "mon:mon-password",
        "--user",
        "ops:ops-password",
        "--listen-mqtt-v5",
        "127.0.0.1:0",
    ]);
    let broker = gc.mqtt.expect("embedded broker");
    let broker_v5 = v5_addr(&gc.proc);
    let mut gc = gc;
    let mut rc = lab.child("regional", "temp-rc-k", &gc, "zone-A", &[]);
    rc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    gc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));

    // A watcher on every status (with its own client id: allowed).
    let mon = |id: &str, v: Version| connect(v, id, "mon", b"mon-password", None);
    let (code, mut watch) = mqtt(broker, LOCAL, &mon("mon-watch", Version::V311)).await;
    assert_eq!(code, 0, "the reader's own client id works");
    watch
        .write_all(&subscribe(&["pdsno/status/+"]))
        .await
        .expect("SUBSCRIBE");
    // The retained statuses first.
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_millis(800), read_packet(&mut watch)).await
    {}

    // The attack: CONNACK "not authorized", and the controllers keep their sessions.
    for id in ["global_cntl_1", rc.id.as_str()] {
        let (code, _s) = mqtt(broker, LOCAL, &mon(id, Version::V311)).await;
        assert_eq!(code, 0x05, "{id} over MQTT 3.1.1");
        let (code, _s) = mqtt(broker_v5, LOCAL, &mon(id, Version::V5)).await;
        assert_eq!(code, 0x87, "{id} over MQTT 5");
    }
    let (code, _s) = mqtt(
        broker,
        LOCAL,
        &connect(
            Version::V311,
            "local_cntl_zone-A_7",
            "ops",
            b"ops-password",
            None,
        ),
    )
    .await;
    assert_eq!(
        code, 0x05,
        "an id shaped like a controller's is reserved too"
    );

    // No will fired: nothing "offline" on the statuses, and neither controller had to
    // reconnect (a kicked client reconnects within a second and says so).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some((first, body))) =
        tokio::time::timeout_at(deadline, read_packet(&mut watch)).await
    {
        if first >> 4 == 3 {
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains("offline"), "a will fired: {text}");
        }
    }
    assert_eq!(
        connected_lines(&gc.proc),
        1,
        "the GC's own client was kicked"
    );
    assert_eq!(connected_lines(&rc.proc), 1, "the RC's client was kicked");

    // The reader with another id of its own still works, and a newer connection of its
    // own takes that id over (MQTT 5: DISCONNECT 0x8E "session taken over").
    let (code, mut first) = mqtt(broker_v5, LOCAL, &mon("mon-2", Version::V5)).await;
    assert_eq!(code, 0);
    let (code, _second) = mqtt(broker_v5, LOCAL, &mon("mon-2", Version::V5)).await;
    assert_eq!(code, 0, "the take-over is granted");
    assert_eq!(
        closed_within(&mut first, WAIT)
            .await
            .expect("the first is closed"),
        pdsno_broker::codec::disconnect_v5(0x8E)
    );
    let text = metrics_from(LOCAL, &gc).await;
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="client_id_reserved"}"#
        ),
        5,
        "{text}"
    );
}

/// The HTTP/2 client preface, an empty SETTINGS frame and a PING: what a client keeping a
/// gRPC connection alive sends.
fn h2_preface_and_ping(n: u64) -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    b.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&[0, 0, 8, 0x06, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&n.to_be_bytes());
    b
}

/// Opens `n` connections from `src` to `dst` (each sending `hello` if given) and sorts
/// them into (still open after a second, closed).
async fn hold(
    src: IpAddr,
    dst: SocketAddr,
    n: usize,
    hello: Option<&[u8]>,
) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = tcp_from(src, dst).await;
        if let Some(h) = hello {
            let _ = s.write_all(h).await;
        }
        conns.push(s);
    }
    let mut checks = tokio::task::JoinSet::new();
    for mut s in conns {
        checks.spawn(async move {
            let closed = closed_within(&mut s, Duration::from_millis(1000))
                .await
                .is_some();
            (!closed).then_some(s)
        });
    }
    let mut open = Vec::new();
    let mut closed = 0;
    while let Some(r) = checks.join_next().await {
        match r.expect("check task") {
            Some(s) => open.push(s),
            None => closed += 1,
        }
    }
    (open, closed)
}

/// One address opens more connections than its cap on gRPC (HTTP/2 preface and PINGs),
/// REST and MQTT (idle TCP): the extras are closed at once, while a client from another
/// address is served on all three; an exempt address is held to the listener's cap only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection_slot() {
    let lab = Lab::new();
    let gc = lab.global(&[
        "--max-connections-per-address",
        "8",
        "--rate-limit-exempt",
        "127.0.0.3/32",
        "--reader",
        "mon:mon-password",
    ]);
    let broker = gc.mqtt.expect("embedded broker");
    let mut gc = gc;
    gc.proc.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    // Served from elsewhere while the attacker holds its share.
    let check_others = || async {
        let (code, _) = http_get(OTHER, gc.rest, "/health").await;
        assert_eq!(code, 200, "REST from another address");
        let channel = tonic::transport::Endpoint::from_shared(gc.grpc_url())
            .expect("url")
            .local_address(Some(OTHER))
            .connect()
            .await
            .expect("gRPC from another address");
        let st = pb::messaging_client::MessagingClient::new(channel)
            .exchange(pb::Envelope::default())
            .await
            .expect_err("an empty envelope is refused");
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "served: {st:?}");
        let (code, _s) = mqtt(
            broker,
            OTHER,
            &connect(Version::V311, "mon-other", "mon", b"mon-password", None),
        )
        .await;
        assert_eq!(code, 0, "MQTT from another address");
    };

    let ping = h2_preface_and_ping(1);
    let (grpc_open, grpc_closed) = hold(LOCAL, gc.grpc, 20, Some(&ping)).await;
    let (rest_open, rest_closed) = hold(LOCAL, gc.rest, 20, None).await;
    // The GC's own MQTT client already holds one slot of 127.0.0.1.
    let (mqtt_open, mqtt_closed) = hold(LOCAL, broker, 20, None).await;
    assert_eq!((grpc_open.len(), grpc_closed), (8, 12), "gRPC");
    assert_eq!((rest_open.len(), rest_closed), (8, 12), "REST");
    assert_eq!((mqtt_open.len(), mqtt_closed), (7, 13), "MQTT");
    check_others().await;

    // The gRPC keepers stay (the cap is what bounds them), and keep being answered.
    for mut s in grpc_open {
        let mut frame = [0u8; 9];
        let _ = s.write_all(&h2_preface_and_ping(2)[24 + 9..]).await;
        tokio::time::timeout(WAIT, s.read_exact(&mut frame))
            .await
            .expect("the server still answers a kept connection")
            .expect("read");
    }

    // An exempt address is held to the listener's cap only.
    let (exempt_open, exempt_closed) = hold(GATEWAY, gc.rest, 20, None).await;
    assert_eq!((exempt_open.len(), exempt_closed), (20, 0), "exempt");

    let text = metrics_from(OTHER, &gc).await;
    assert_eq!(
        metric(
            &text,
            r#"pdsno_refused_total{transport="grpc",reason="per_address_limit"}"#
        ),
        12,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"pdsno_refused_total{transport="rest",reason="per_address_limit"}"#
        ),
        12
    );
    assert_eq!(
        metric(
            &text,
            r#"pdsno_broker_refused_total{reason="per_address_limit"}"#
        ),
        13
    );
    drop((rest_open, mqtt_open, exempt_open));
}

/// `pdsno broker` alone takes the filter budget from its flag (as its other budgets):
/// with `--max-filters-per-client 2`, an operator's third new filter closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_brokers_filter_budget_is_a_flag() {
    use pdsno_tests::{BrokerProc, OPS_PASSWORD, OPS_USER};
    let b = BrokerProc::start(&["--max-filters-per-client", "2"]);
    let v5 = b.v5.expect("a v5 listener");
    let ops = connect(
        Version::V5,
        "ops-budget",
        OPS_USER,
        OPS_PASSWORD.as_bytes(),
        None,
    );
    let (code, mut s) = mqtt(v5, LOCAL, &ops).await;
    assert_eq!(code, 0);
    s.write_all(&subscribe_v5(1, &["ops/a".to_owned(), "ops/b".to_owned()]))
        .await
        .expect("SUBSCRIBE");
    assert_eq!(suback_or_close(&mut s, 1).await, Ok(vec![0, 0]));
    s.write_all(&subscribe_v5(2, &["ops/c".to_owned()]))
        .await
        .expect("SUBSCRIBE");
    assert_eq!(
        suback_or_close(&mut s, 2).await,
        Err(pdsno_broker::codec::disconnect_v5(0x97)[2..].to_vec())
    );
}
