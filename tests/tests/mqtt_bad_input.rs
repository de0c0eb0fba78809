//! Malformed MQTT input against the embedded broker, as raw bytes over TCP.
//!
//! Each case says what it guards. For every case the offending connection must be closed
//! (after the reply the spec defines, if any), a well-behaved client must keep working,
//! and the `pdsno broker` process must stay up without a panic. Cases marked
//! "rumqttd alone" describe what the embedded router would do without the front door.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pdsno_broker::codec::{Connect, Version};
use pdsno_node::transport::mqtt::{BrokerUrl, MqttClient, MqttSettings};
use pdsno_shared::keys::SecretString;
use pdsno_tests::{BrokerProc, OPS_PASSWORD, OPS_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn mqtt_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(varint(body.len()));
    p.extend_from_slice(body);
    p
}

fn connect(version: Version, id: &str, keep_alive: u16) -> Vec<u8> {
    Connect {
        version,
        clean: true,
        keep_alive,
        properties: Vec::new(),
        client_id: id.into(),
        will: None,
        username: Some(OPS_USER.into()),
        password: Some(OPS_PASSWORD.as_bytes().to_vec()),
        auth_method: false,
    }
    .encode()
}

/// PUBLISH QoS 0 with a raw topic (v5: empty property list unless given).
fn publish_raw(topic: &[u8], v5_props: Option<&[u8]>) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if let Some(p) = v5_props {
        body.extend_from_slice(p);
    }
    body.extend_from_slice(b"x");
    packet(0x30, &body)
}

fn subscribe(filter: &str, v5: bool) -> Vec<u8> {
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    body.extend(mqtt_str(filter));
    body.push(1);
    packet(0x82, &body)
}

fn user_properties(n: usize) -> Vec<u8> {
    let mut props = Vec::new();
    for _ in 0..n {
        props.push(0x26);
        props.extend(mqtt_str("k"));
        props.extend(mqtt_str("v"));
    }
    let mut out = varint(props.len());
    out.extend(props);
    out
}

/// What the broker must do.
#[derive(Debug)]
enum Expect {
    /// Close without sending anything (after the CONNACK, if the case connected first).
    Close,
    /// Send exactly these bytes, then close.
    ReplyThenClose(Vec<u8>),
    /// Accept: the connection stays usable (a PINGREQ gets a PINGRESP).
    Accept,
}

struct Case {
    name: &'static str,
    guards: &'static str,
    version: Version,
    /// Send a valid CONNECT first (and expect CONNACK 0).
    connect_first: bool,
    bytes: Vec<u8>,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    use Expect::*;
    use Version::{V5, V311};
    let deep_filter = "a/".repeat(64_999) + "a";
    vec![
        Case {
            name: "oversized remaining length",
            guards: "size limits are enforced before a body is buffered",
            version: V311,
            connect_first: true,
            bytes: vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
            expect: Close,
        },
        Case {
            name: "oversized remaining length (v5)",
            guards: "MQTT 5 clients learn why (0x95 packet too large)",
            version: V5,
            connect_first: true,
            bytes: vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x95, 0x00]),
        },
        Case {
            name: "5-byte remaining length",
            guards: "the remaining-length decoder stops at 4 bytes",
            version: V311,
            connect_first: true,
            bytes: vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            expect: Close,
        },
        Case {
            name: "first packet is not CONNECT",
            guards: "nothing reaches the router before authentication",
            version: V311,
            connect_first: false,
            bytes: publish_raw(b"pdsno/x", None),
            expect: Close,
        },
        Case {
            name: "garbage instead of MQTT (HTTP request)",
            guards: "stray protocols are dropped quietly",
            version: V311,
            connect_first: false,
            bytes: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            expect: Close,
        },
        Case {
            name: "CONNACK sent by a client (3.1.1)",
            guards: "server-only packets from clients are refused",
            version: V311,
            connect_first: true,
            bytes: vec![0x20, 0x02, 0x00, 0x00],
            expect: Close,
        },
        Case {
            name: "CONNACK sent by a client (5)",
            guards: "rumqttd alone hits unreachable!() and kills the task; we close with 0x82",
            version: V5,
            connect_first: true,
            bytes: vec![0x20, 0x03, 0x00, 0x00, 0x00],
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x82, 0x00]),
        },
        Case {
            name: "UNSUBACK sent by a client (5)",
            guards: "the other unreachable!() of rumqttd's v5 link",
            version: V5,
            connect_first: true,
            bytes: vec![0xB0, 0x03, 0x00, 0x01, 0x00],
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x82, 0x00]),
        },
        Case {
            name: "PUBLISH with an empty topic",
            guards: "rumqttd alone accepts it and matches it against '#'",
            version: V311,
            connect_first: true,
            bytes: publish_raw(b"", None),
            expect: Close,
        },
        Case {
            name: "PUBLISH with an empty topic (5, no alias)",
            guards: "empty topics need a topic alias (0x90)",
            version: V5,
            connect_first: true,
            bytes: publish_raw(b"", Some(&[0])),
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x90, 0x00]),
        },
        Case {
            name: "PUBLISH with wildcards in the topic",
            guards: "rumqttd alone routes 'a/+/#' literally and may retain it",
            version: V311,
            connect_first: true,
            bytes: publish_raw(b"pdsno/+/#", None),
            expect: Close,
        },
        Case {
            name: "PUBLISH with an invalid UTF-8 topic",
            guards: "topics are UTF-8 (rumqttd alone parses it, then drops the client)",
            version: V311,
            connect_first: true,
            bytes: publish_raw(&[b'a', 0xC3, 0x28], None),
            expect: Close,
        },
        Case {
            name: "PUBLISH with a NUL in the topic",
            guards: "U+0000 is forbidden in MQTT strings",
            version: V311,
            connect_first: true,
            bytes: publish_raw(b"a\0b", None),
            expect: Close,
        },
        Case {
            name: "PUBLISH to a $ topic",
            guards: "clients cannot inject $SYS-style topics",
            version: V311,
            connect_first: true,
            bytes: publish_raw(b"$SYS/fake", None),
            expect: Close,
        },
        Case {
            name: "PUBLISH with QoS 3",
            guards: "reserved QoS value",
            version: V311,
            connect_first: true,
            bytes: vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
            expect: Close,
        },
        Case {
            name: "SUBSCRIBE with an empty filter",
            guards: "rumqttd alone grants it",
            version: V311,
            connect_first: true,
            bytes: subscribe("", false),
            expect: Close,
        },
        Case {
            name: "SUBSCRIBE with an empty filter (5)",
            guards: "0x8F topic filter invalid",
            version: V5,
            connect_first: true,
            bytes: subscribe("", true),
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x8F, 0x00]),
        },
        Case {
            name: "SUBSCRIBE with a 65,000-level filter",
            guards: "filter depth is bounded",
            version: V311,
            connect_first: true,
            bytes: subscribe(&deep_filter, false),
            expect: Close,
        },
        Case {
            name: "SUBSCRIBE with '#' not last",
            guards: "rumqttd alone grants malformed filters",
            version: V311,
            connect_first: true,
            bytes: subscribe("a/#/b", false),
            expect: Close,
        },
        Case {
            name: "SUBSCRIBE to $SYS/#",
            guards: "no $ filters except $share",
            version: V311,
            connect_first: true,
            bytes: subscribe("$SYS/#", false),
            expect: Close,
        },
        Case {
            name: "thousands of v5 user properties",
            guards: "per-packet property count is bounded (0x97)",
            version: V5,
            connect_first: true,
            bytes: publish_raw(b"pdsno/x", Some(&user_properties(5000))),
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x97, 0x00]),
        },
        Case {
            name: "unknown v5 topic alias",
            guards: "aliases are resolved by the front door (0x82)",
            version: V5,
            connect_first: true,
            bytes: publish_raw(b"", Some(&[3, 0x23, 0x00, 0x09])),
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x82, 0x00]),
        },
        Case {
            name: "v5 AUTH packet",
            guards: "enhanced authentication is not offered (0x83)",
            version: V5,
            connect_first: true,
            bytes: vec![0xF0, 0x00],
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x83, 0x00]),
        },
        Case {
            name: "second CONNECT",
            guards: "rumqttd alone ignores it; the spec makes it a protocol error",
            version: V311,
            connect_first: true,
            bytes: connect(V311, "again", 30),
            expect: Close,
        },
        Case {
            name: "second CONNECT (5)",
            guards: "0x82 protocol error",
            version: V5,
            connect_first: true,
            bytes: connect(V5, "again", 30),
            expect: ReplyThenClose(vec![0xE0, 0x02, 0x82, 0x00]),
        },
        Case {
            name: "reserved packet type 0",
            guards: "type 0 is reserved",
            version: V311,
            connect_first: true,
            bytes: vec![0x00, 0x00],
            expect: Close,
        },
        Case {
            name: "PINGREQ with a body",
            guards: "fixed-size packets are checked exactly",
            version: V311,
            connect_first: true,
            bytes: vec![0xC0, 0x01, 0x00],
            expect: Close,
        },
        Case {
            name: "client id with '/'",
            guards: "rumqttd alone can poison a lock on ids it cannot register",
            version: V311,
            connect_first: false,
            bytes: connect(V311, "bad/id", 30),
            expect: ReplyThenClose(vec![0x20, 0x02, 0x00, 0x02]),
        },
        Case {
            name: "MQTT 3.1 (MQIsdp, level 3)",
            guards: "unsupported versions get CONNACK 0x01, not silence",
            version: V311,
            connect_first: false,
            bytes: {
                let mut b = mqtt_str("MQIsdp");
                b.extend_from_slice(&[3, 0x02, 0, 30]);
                b.extend(mqtt_str("old"));
                packet(0x10, &b)
            },
            expect: ReplyThenClose(vec![0x20, 0x02, 0x00, 0x01]),
        },
        Case {
            name: "will on a wildcard topic",
            guards: "wills are validated like publishes",
            version: V311,
            connect_first: false,
            bytes: {
                let mut b = mqtt_str("MQTT");
                b.extend_from_slice(&[4, 0x06, 0, 30]);
                b.extend(mqtt_str("w"));
                b.extend(mqtt_str("a/#"));
                b.extend(mqtt_str("x"));
                packet(0x10, &b)
            },
            expect: Close,
        },
        Case {
            name: "half-sent packet then silence",
            guards: "a stalled packet costs at most the frame timeout",
            version: V311,
            connect_first: true,
            bytes: vec![0x30, 0x10, 0x00, 0x05, b'a'],
            expect: Close,
        },
        Case {
            name: "half-sent CONNECT then silence",
            guards: "a connection that never finishes CONNECT is closed",
            version: V311,
            connect_first: false,
            bytes: vec![0x10, 0x20, 0x00, 0x04, b'M'],
            expect: Close,
        },
        Case {
            name: "keep alive 0 is accepted",
            guards: "the spec allows 0 (rumqttd alone refuses it; we give it the longest keep alive)",
            version: V311,
            connect_first: false,
            bytes: connect(V311, "no-keepalive", 0),
            expect: Accept,
        },
    ]
}

async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn well_behaved(
    addr: SocketAddr,
) -> (
    MqttClient,
    tokio::sync::mpsc::Receiver<pdsno_node::transport::mqtt::Message>,
) {
    let mut s = MqttSettings::new(
        BrokerUrl::parse(&format!("mqtt://{addr}")).expect("url"),
        "good-client",
    );
    s.username = Some(OPS_USER.into());
    s.password = Some(SecretString::new(OPS_PASSWORD));
    s.backoff_min = Duration::from_millis(50);
    let (c, _task) = MqttClient::start(s).expect("client");
    c.wait_connected(Duration::from_secs(10))
        .await
        .expect("good client connects");
    let rx = c.subscribe("pdsno/good/echo", 1).await.expect("subscribe");
    (c, rx)
}

async fn still_works(
    c: &MqttClient,
    rx: &mut tokio::sync::mpsc::Receiver<pdsno_node::transport::mqtt::Message>,
    tag: &str,
) {
    for _ in 0..50 {
        c.publish_confirmed("pdsno/good/echo", tag.to_owned(), 1, false)
            .await
            .expect("good publish");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            && m.payload == tag.as_bytes()
        {
            return;
        }
    }
    panic!("the well-behaved client stopped working after case {tag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_the_offender() {
    let mut broker = BrokerProc::start(&["--frame-timeout", "1", "--connect-timeout", "1"]);
    let v5 = broker.v5.expect("v5");
    let (good, mut echo) = well_behaved(broker.v4).await;
    let all = cases();
    // Pinned: a case removed (or added) must change this number on purpose.
    assert_eq!(all.len(), 33, "raw MQTT cases");
    for case in all {
        let addr = if case.version == Version::V5 {
            v5
        } else {
            broker.v4
        };
        let mut s = TcpStream::connect(addr).await.expect("tcp");
        if case.connect_first {
            s.write_all(&connect(case.version, "offender", 30))
                .await
                .expect("CONNECT");
            let mut ack = vec![0u8; if case.version == Version::V5 { 5 } else { 4 }];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
                .await
                .expect("CONNACK in time")
                .expect("CONNACK");
            assert_eq!(
                (ack[0], ack[3]),
                (0x20, 0x00),
                "{}: connected first",
                case.name
            );
            // The rest of a v5 CONNACK (properties from rumqttd) is not part of the case.
            if case.version == Version::V5 && ack[1] > 3 {
                let mut rest = vec![0u8; usize::from(ack[1]) - 3];
                s.read_exact(&mut rest).await.expect("CONNACK properties");
            }
        }
        let started = Instant::now();
        // A huge packet may be refused before all of it is written; that is fine.
        let _ = s.write_all(&case.bytes).await;
        match &case.expect {
            Expect::Close => {
                let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
                assert!(
                    closed,
                    "{} ({}): connection left open",
                    case.name, case.guards
                );
                assert!(got.is_empty(), "{}: unexpected reply {got:02x?}", case.name);
            }
            Expect::ReplyThenClose(want) => {
                let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
                assert!(
                    closed,
                    "{} ({}): connection left open",
                    case.name, case.guards
                );
                assert_eq!(&got, want, "{} ({})", case.name, case.guards);
            }
            Expect::Accept => {
                let mut ack = [0u8; 4];
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
                    .await
                    .expect("CONNACK in time")
                    .expect("CONNACK");
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "{}", case.name);
                s.write_all(&[0xC0, 0x00]).await.expect("PINGREQ");
                let mut pong = [0u8; 2];
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut pong))
                    .await
                    .expect("PINGRESP in time")
                    .expect("PINGRESP");
                assert_eq!(pong, [0xD0, 0x00], "{}", case.name);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} took {:?}",
            case.name,
            started.elapsed()
        );
        still_works(&good, &mut echo, case.name).await;
        assert!(broker.proc.is_alive(), "broker died on {}", case.name);
    }
    let err = broker.proc.stderr();
    assert!(!err.contains("panicked"), "the broker panicked:\n{err}");
    assert!(good.is_connected());
}

/// Connects `version` as the operator under `id`; returns the stream after CONNACK 0.
async fn connected_raw(addr: SocketAddr, version: Version, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(&connect(version, id, 30))
        .await
        .expect("CONNECT");
    let (first, body) = read_packet(&mut s).await.expect("CONNACK");
    assert_eq!(
        (first, body.get(1).copied()),
        (0x20, Some(0)),
        "{id}: CONNACK"
    );
    s
}

/// One whole packet (first byte, body) within 10 s; `None` when the connection closes.
async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let first = s.read_u8().await.ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = s.read_u8().await.ok()?;
            len |= usize::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some((first, body))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a packet or a close within 10 s")
}

/// A QoS 0 PUBLISH to `topic` whose remaining length is exactly `remaining` (v5: with an
/// empty property list).
fn publish_of_size(topic: &str, remaining: usize, v5: bool) -> Vec<u8> {
    let overhead = 2 + topic.len() + usize::from(v5);
    let mut body = mqtt_str(topic);
    if v5 {
        body.push(0);
    }
    body.resize(remaining, b'p');
    assert_eq!(body.len(), remaining);
    assert!(remaining > overhead);
    packet(0x30, &body)
}

/// The next PUBLISH delivered to the MQTT 3.1.1 subscriber `s` (acknowledged when QoS 1):
/// its topic and payload length.
async fn delivered(s: &mut TcpStream) -> (String, usize) {
    let (first, body) = read_packet(s).await.expect("a delivery");
    assert_eq!(first & 0xF0, 0x30, "not a PUBLISH: {first:#x}");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
    let mut header = 2 + topic_len;
    if (first >> 1) & 3 > 0 {
        let id = [body[header], body[header + 1]];
        header += 2;
        s.write_all(&[0x40, 0x02, id[0], id[1]])
            .await
            .expect("PUBACK");
    }
    (topic, body.len() - header)
}

/// The 256 KiB packet limit is exact, on both protocol versions: a PUBLISH whose
/// remaining length is 262,144 bytes is accepted and delivered whole; one byte more closes
/// the connection (MQTT 5: DISCONNECT 0x95 first) and nothing of it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_256_kib_packet_limit_is_exact() {
    const LIMIT: usize = 256 * 1024;
    let mut broker = BrokerProc::start(&[]);
    let v5 = broker.v5.expect("v5");
    // A raw subscriber, so nothing but the broker sits between the packets and the test.
    let mut sub = connected_raw(broker.v4, Version::V311, "big-sub").await;
    sub.write_all(&subscribe("big/#", false))
        .await
        .expect("SUBSCRIBE");
    let (first, _) = read_packet(&mut sub).await.expect("SUBACK");
    assert_eq!(first, 0x90, "SUBACK");

    for (version, addr, topic, id) in [
        (Version::V311, broker.v4, "big/v4", "big-pub-v4"),
        (Version::V5, v5, "big/v5", "big-pub-v5"),
    ] {
        let is_v5 = version == Version::V5;
        let mut publ = connected_raw(addr, version, id).await;
        // Exactly at the limit: accepted, delivered whole, the connection stays.
        publ.write_all(&publish_of_size(topic, LIMIT, is_v5))
            .await
            .expect("write");
        let payload = LIMIT - 2 - topic.len() - usize::from(is_v5);
        assert_eq!(
            delivered(&mut sub).await,
            (topic.to_owned(), payload),
            "{topic}: whole"
        );
        publ.write_all(&[0xC0, 0x00]).await.expect("PINGREQ");
        assert_eq!(
            read_packet(&mut publ).await,
            Some((0xD0, Vec::new())),
            "{topic}: the publisher is still connected"
        );

        // One byte more: refused before the body is delivered, the connection closed.
        let _ = publ
            .write_all(&publish_of_size(topic, LIMIT + 1, is_v5))
            .await;
        let (got, closed) = read_until_closed(&mut publ, Duration::from_secs(5)).await;
        assert!(
            closed,
            "{topic}: the connection stays open after {} bytes",
            LIMIT + 1
        );
        let want: &[u8] = if is_v5 {
            &[0xE0, 0x02, 0x95, 0x00]
        } else {
            &[]
        };
        assert_eq!(got, want, "{topic}");

        // Nothing of it reached the subscriber: the next packet it gets is a marker sent
        // after the refusal.
        let mut marker = connected_raw(broker.v4, Version::V311, &format!("marker-{id}")).await;
        marker
            .write_all(&publish_raw(b"big/marker", None))
            .await
            .expect("marker");
        assert_eq!(
            delivered(&mut sub).await,
            ("big/marker".to_owned(), 1),
            "after {topic}"
        );
    }
    assert!(broker.proc.is_alive());
    assert!(!broker.proc.stderr().contains("panicked"));
}
