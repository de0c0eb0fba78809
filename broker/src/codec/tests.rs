use super::*;

fn limits() -> Limits {
    Limits::default()
}

fn frame_of(bytes: &[u8]) -> (Frame, &[u8]) {
    let f = peek_frame(bytes, 1 << 20)
        .expect("valid header")
        .expect("complete header");
    assert_eq!(f.len(), bytes.len(), "test packet length");
    (f, &bytes[f.header_len..])
}

fn check(bytes: &[u8], v: Version) -> Result<Checked, Violation> {
    let (f, body) = frame_of(bytes);
    check_client_packet(&f, body, v, &limits())
}

fn s(x: &str) -> Vec<u8> {
    let mut out = (x.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(x.as_bytes());
    out
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn publish(topic: &str, qos: u8, v5_props: Option<&[u8]>) -> Vec<u8> {
    let mut body = s(topic);
    if qos > 0 {
        body.extend_from_slice(&[0, 1]);
    }
    if let Some(p) = v5_props {
        body.extend_from_slice(p);
    }
    body.extend_from_slice(b"payload");
    packet(0x30 | (qos << 1), &body)
}

fn subscribe(filters: &[&str], v5: bool) -> Vec<u8> {
    let mut body = vec![0, 7];
    if v5 {
        body.push(0);
    }
    for f in filters {
        body.extend_from_slice(&s(f));
        body.push(1);
    }
    packet(0x82, &body)
}

#[test]
fn frame_headers() {
    assert_eq!(peek_frame(&[], 100), Ok(None));
    assert_eq!(peek_frame(&[0x30], 100), Ok(None));
    assert_eq!(peek_frame(&[0x30, 0x80], 100), Ok(None));
    let f = peek_frame(&[0x30, 0x05, 1, 2], 100)
        .expect("ok")
        .expect("frame");
    assert_eq!(
        (f.kind, f.header_len, f.remaining, f.len()),
        (PacketType::Publish, 2, 5, 7)
    );
    let f = peek_frame(&[0x30, 0x80, 0x01], 1000)
        .expect("ok")
        .expect("frame");
    assert_eq!(f.remaining, 128);
    assert_eq!(
        peek_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], usize::MAX),
        Err(Violation::Malformed("remaining length longer than 4 bytes"))
    );
    assert_eq!(
        peek_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], 256 * 1024),
        Err(Violation::PacketTooLarge {
            size: 268_435_455,
            max: 256 * 1024
        })
    );
    assert_eq!(
        peek_frame(&[0x30, 0x80, 0x00], 100),
        Err(Violation::Malformed("non-minimal remaining length"))
    );
    assert_eq!(
        peek_frame(&[0x00, 0x00], 100),
        Err(Violation::Malformed("reserved packet type 0"))
    );
}

#[test]
fn publish_rules() {
    for v in [Version::V311, Version::V5] {
        let props: Option<&[u8]> = if v == Version::V5 { Some(&[0]) } else { None };
        assert_eq!(
            check(&publish("pdsno/status/x", 0, props), v),
            Ok(Checked::Forward)
        );
        assert_eq!(
            check(&publish("pdsno/status/x", 1, props), v),
            Ok(Checked::Forward)
        );
        assert!(matches!(
            check(&publish("", 0, props), v),
            Err(Violation::TopicNameInvalid(_))
        ));
        assert!(matches!(
            check(&publish("a/+/b", 0, props), v),
            Err(Violation::TopicNameInvalid(_))
        ));
        assert!(matches!(
            check(&publish("a/#", 1, props), v),
            Err(Violation::TopicNameInvalid(_))
        ));
        assert!(matches!(
            check(&publish("$SYS/x", 1, props), v),
            Err(Violation::TopicNameInvalid(_))
        ));
        let deep = "a/".repeat(40) + "a";
        assert!(matches!(
            check(&publish(&deep, 0, props), v),
            Err(Violation::TopicNameInvalid(_))
        ));
    }
    // Invalid UTF-8 and NUL in the topic.
    let mut bad = vec![0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, b'x'];
    assert_eq!(
        check(&bad, Version::V311),
        Err(Violation::Malformed("string is not valid UTF-8"))
    );
    bad = packet(0x30, &[0x00, 0x02, b'a', 0x00]);
    assert_eq!(
        check(&bad, Version::V311),
        Err(Violation::Malformed("string contains U+0000"))
    );
    // QoS 3, DUP on QoS 0, packet id 0.
    let mut p = publish("a", 0, None);
    p[0] = 0x36;
    assert_eq!(
        check(&p, Version::V311),
        Err(Violation::Malformed("PUBLISH with QoS 3"))
    );
    p[0] = 0x38;
    assert_eq!(
        check(&p, Version::V311),
        Err(Violation::Malformed("DUP set on a QoS 0 PUBLISH"))
    );
    let mut p0 = s("a");
    p0.extend_from_slice(&[0, 0]);
    assert_eq!(
        check(&packet(0x32, &p0), Version::V311),
        Err(Violation::Malformed("packet identifier 0"))
    );
    // v5: an empty topic is fine with a topic alias, not without.
    let alias = [3u8, 0x23, 0x00, 0x05];
    assert_eq!(
        check(&publish("", 0, Some(&alias)), Version::V5),
        Ok(Checked::Forward)
    );
    let zero_alias = [3u8, 0x23, 0x00, 0x00];
    assert_eq!(
        check(&publish("a", 0, Some(&zero_alias)), Version::V5),
        Err(Violation::Protocol("topic alias 0"))
    );
    // v5: subscription identifier may not come from a client.
    let sub_id = [2u8, 0x0B, 0x01];
    assert!(matches!(
        check(&publish("a", 0, Some(&sub_id)), Version::V5),
        Err(Violation::Protocol(_))
    ));
}

#[test]
fn user_property_limit() {
    let mut props = Vec::new();
    for i in 0..65 {
        props.push(0x26);
        props.extend_from_slice(&s(&format!("k{i}")));
        props.extend_from_slice(&s("v"));
    }
    let mut with_len = Vec::new();
    put_varint(&mut with_len, props.len());
    with_len.extend_from_slice(&props);
    assert_eq!(
        check(&publish("a", 1, Some(&with_len)), Version::V5),
        Err(Violation::Quota("too many user properties"))
    );
    // 64 are fine.
    let cut: Vec<u8> = {
        let mut p = Vec::new();
        for i in 0..64 {
            p.push(0x26);
            p.extend_from_slice(&s(&format!("k{i}")));
            p.extend_from_slice(&s("v"));
        }
        let mut l = Vec::new();
        put_varint(&mut l, p.len());
        l.extend_from_slice(&p);
        l
    };
    assert_eq!(
        check(&publish("a", 1, Some(&cut)), Version::V5),
        Ok(Checked::Forward)
    );
    // Property length beyond the packet.
    assert_eq!(
        check(&publish("a", 0, Some(&[0x7F])), Version::V5),
        Err(Violation::Malformed("property length exceeds packet"))
    );
}

#[test]
fn subscribe_rules() {
    for v5 in [false, true] {
        let v = if v5 { Version::V5 } else { Version::V311 };
        assert_eq!(
            check(&subscribe(&["pdsno/discovery/zone-A/+", "pdsno/#"], v5), v),
            Ok(Checked::Forward)
        );
        assert_eq!(
            check(&subscribe(&["$share/g/pdsno/#"], v5), v),
            Ok(Checked::Forward)
        );
        for bad in [
            "",
            "a/#/b",
            "a+",
            "a/b#",
            "$SYS/#",
            "$share//a",
            "$share/g",
            "$share/g/",
        ] {
            assert!(
                matches!(
                    check(&subscribe(&[bad], v5), v),
                    Err(Violation::TopicFilterInvalid(_))
                ),
                "{bad:?}"
            );
        }
        let deep = "+/".repeat(65_000 / 2) + "#";
        let p = subscribe(&[&deep], v5);
        let (f, body) = frame_of(&p);
        assert_eq!(
            check_client_packet(&f, body, v, &limits()),
            Err(Violation::TopicFilterInvalid("too many topic levels"))
        );
        // No filters at all.
        let mut body = vec![0, 7];
        if v5 {
            body.push(0);
        }
        assert_eq!(
            check(&packet(0x82, &body), v),
            Err(Violation::Protocol("SUBSCRIBE without filters"))
        );
        // Wrong fixed-header flags.
        let mut p = subscribe(&["a"], v5);
        p[0] = 0x80;
        assert_eq!(
            check(&p, v),
            Err(Violation::Malformed("reserved fixed-header flags"))
        );
    }
    // Too many filters.
    let many: Vec<String> = (0..65).map(|i| format!("t/{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        check(&subscribe(&refs, false), Version::V311),
        Err(Violation::Quota("too many filters in one SUBSCRIBE"))
    );
    // QoS 3 and reserved option bits.
    let mut body = vec![0, 7];
    body.extend_from_slice(&s("a"));
    body.push(3);
    assert_eq!(
        check(&packet(0x82, &body), Version::V311),
        Err(Violation::Malformed("subscription QoS 3"))
    );
    let mut body = vec![0, 7];
    body.extend_from_slice(&s("a"));
    body.push(0x04);
    assert_eq!(
        check(&packet(0x82, &body), Version::V311),
        Err(Violation::Malformed("reserved subscription option bits"))
    );
}

#[test]
fn server_packets_and_second_connect_are_refused() {
    for v in [Version::V311, Version::V5] {
        assert_eq!(
            check(&[0x20, 0x02, 0x00, 0x00], v),
            Err(Violation::Protocol(
                "server-to-client packet sent by a client"
            ))
        );
        assert_eq!(
            check(&[0x90, 0x03, 0x00, 0x01, 0x00], v),
            Err(Violation::Protocol(
                "server-to-client packet sent by a client"
            ))
        );
        assert_eq!(
            check(&[0xB0, 0x02, 0x00, 0x01], v),
            Err(Violation::Protocol(
                "server-to-client packet sent by a client"
            ))
        );
        assert_eq!(
            check(&[0xD0, 0x00], v),
            Err(Violation::Protocol(
                "server-to-client packet sent by a client"
            ))
        );
        let c = Connect {
            version: v,
            clean: true,
            keep_alive: 30,
            properties: vec![],
            client_id: "c".into(),
            will: None,
            username: None,
            password: None,
            auth_method: false,
        }
        .encode();
        assert_eq!(check(&c, v), Err(Violation::Protocol("second CONNECT")));
        assert_eq!(check(&[0xC0, 0x00], v), Ok(Checked::Forward));
        assert_eq!(
            check(&[0xC0, 0x01, 0x00], v),
            Err(Violation::Malformed("trailing bytes in packet"))
        );
        assert_eq!(check(&[0xE0, 0x00], v), Ok(Checked::Disconnect));
        assert_eq!(check(&[0x40, 0x02, 0x00, 0x01], v), Ok(Checked::Forward));
        assert_eq!(check(&[0x62, 0x02, 0x00, 0x01], v), Ok(Checked::Forward));
        assert_eq!(
            check(&[0x60, 0x02, 0x00, 0x01], v),
            Err(Violation::Malformed("reserved fixed-header flags"))
        );
    }
    assert_eq!(
        check(&[0xF0, 0x00], Version::V5),
        Err(Violation::Unsupported("enhanced authentication (AUTH)"))
    );
    assert_eq!(
        check(&[0xE0, 0x01, 0x00], Version::V311),
        Err(Violation::Malformed("trailing bytes in packet"))
    );
    assert_eq!(
        check(&[0xE0, 0x02, 0x00, 0x00], Version::V5),
        Ok(Checked::Disconnect)
    );
}

fn connect_bytes(level: u8, flags: u8, payload: &[u8], props: Option<&[u8]>) -> Vec<u8> {
    let mut body = s("MQTT");
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&[0, 30]);
    if let Some(p) = props {
        body.extend_from_slice(p);
    }
    body.extend_from_slice(payload);
    packet(0x10, &body)
}

#[test]
fn connect_decode_and_reencode() {
    let will = Will {
        properties: vec![],
        topic: "pdsno/status/x".into(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
    };
    for v in [Version::V311, Version::V5] {
        let c = Connect {
            version: v,
            clean: true,
            keep_alive: 60,
            properties: if v == Version::V5 {
                vec![5, 0x11, 0, 0, 0, 10]
            } else {
                vec![]
            },
            client_id: "local_cntl_zone-A_1".into(),
            will: Some(Will {
                properties: if v == Version::V5 { vec![0] } else { vec![] },
                ..will.clone()
            }),
            username: Some("u".into()),
            password: Some(vec![0, 159, 146, 150]),
            auth_method: false,
        };
        let bytes = c.encode();
        let (f, body) = frame_of(&bytes);
        assert_eq!(decode_connect(&f, body, &limits()), Ok(c.clone()));
        assert!(
            !format!("{c:?}").contains("159"),
            "password redacted in Debug"
        );
    }
}

#[test]
fn connect_refusals() {
    let dec = |b: &[u8]| {
        let (f, body) = frame_of(b);
        decode_connect(&f, body, &limits())
    };
    let cid = s("c");
    assert_eq!(
        dec(&connect_bytes(3, 0x02, &cid, None)),
        Err(ConnectError::UnsupportedVersion(3))
    );
    assert_eq!(
        dec(&connect_bytes(6, 0x02, &cid, None)),
        Err(ConnectError::UnsupportedVersion(6))
    );
    assert_eq!(
        dec(&connect_bytes(4, 0x03, &cid, None)),
        Err(ConnectError::Invalid(Violation::Malformed(
            "reserved connect flag set"
        )))
    );
    assert_eq!(
        dec(&connect_bytes(4, 0x02 | 0x18, &cid, None)),
        Err(ConnectError::Invalid(Violation::Malformed("will QoS 3")))
    );
    assert_eq!(
        dec(&connect_bytes(4, 0x02 | 0x20, &cid, None)),
        Err(ConnectError::Invalid(Violation::Malformed(
            "will QoS or retain without a will"
        )))
    );
    let mut with_pw = cid.clone();
    with_pw.extend_from_slice(&s("pw"));
    assert_eq!(
        dec(&connect_bytes(4, 0x02 | 0x40, &with_pw, None)),
        Err(ConnectError::Invalid(Violation::Malformed(
            "password without user name"
        )))
    );
    // A will on a wildcard topic.
    let mut p = cid.clone();
    p.extend_from_slice(&s("a/#"));
    p.extend_from_slice(&s("x"));
    assert!(matches!(
        dec(&connect_bytes(4, 0x06, &p, None)),
        Err(ConnectError::Invalid(Violation::TopicNameInvalid(_)))
    ));
    // Trailing garbage.
    let mut t = cid.clone();
    t.push(0);
    assert_eq!(
        dec(&connect_bytes(4, 0x02, &t, None)),
        Err(ConnectError::Invalid(Violation::Malformed(
            "trailing bytes in packet"
        )))
    );
    // Not a CONNECT.
    assert_eq!(dec(&[0xC0, 0x00]), Err(ConnectError::NotConnect));
    // v5 with an authentication method is flagged.
    let mut props = vec![0x15];
    props.extend_from_slice(&s("SCRAM-SHA-1"));
    let mut pl = vec![props.len() as u8];
    pl.extend_from_slice(&props);
    let c = dec(&connect_bytes(5, 0x02, &cid, Some(&pl))).expect("valid");
    assert!(c.auth_method);
}

#[test]
fn refusal_packets() {
    assert_eq!(
        connack_refusal(Version::V311, Refusal::NotAuthorized),
        [0x20, 0x02, 0x00, 0x05]
    );
    assert_eq!(
        connack_refusal(Version::V5, Refusal::BadCredentials),
        [0x20, 0x03, 0x00, 0x86, 0x00]
    );
    assert_eq!(disconnect_v5(0x81), [0xE0, 0x02, 0x81, 0x00]);
}

#[test]
fn v5_publish_split_and_reencode_without_properties() {
    let mut props = vec![0x26];
    props.extend_from_slice(&s("k"));
    props.extend_from_slice(&s("v"));
    props.extend_from_slice(&[0x23, 0x00, 0x07]);
    let mut with_len = vec![props.len() as u8];
    with_len.extend_from_slice(&props);
    let p = publish("pdsno/x", 1, Some(&with_len));
    let (f, body) = frame_of(&p);
    let parts = split_publish_v5(&f, body, &limits()).expect("split");
    assert_eq!(parts.topic, "pdsno/x");
    assert_eq!(parts.alias, Some(7));
    assert!(parts.has_properties);
    assert_eq!(parts.payload, b"payload");
    let re = encode_publish_v5(p[0], "pdsno/x", parts.packet_id, parts.payload);
    assert_eq!(re, publish("pdsno/x", 1, Some(&[0])));
    let (f2, body2) = frame_of(&re);
    assert_eq!(
        check_client_packet(&f2, body2, Version::V5, &limits()),
        Ok(Checked::Forward)
    );
}
