//! Arbitrary bytes as a client's stream into the embedded broker's front door codec, the
//! way a connection reads it: frame by frame, the first one as CONNECT (3.1.1 and 5), the
//! rest validated as client packets, MQTT 5 PUBLISH bodies split. Nothing may panic, a
//! frame never claims more bytes than the limit allows, a CONNECT that decodes re-encodes
//! to one that decodes the same, and a validated PUBLISH or SUBSCRIBE yields the topic or
//! filters its topic rights are checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pdsno_broker::codec::{
    self, Checked, Limits, PacketType, Version, check_client_packet, decode_connect, peek_frame,
    publish_topic_v311, split_publish_v5, subscribe_filters,
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_packet_size: 4096,
        ..Limits::default()
    };
    let mut rest = data;
    let mut first = true;
    let mut version = Version::V311;
    while !rest.is_empty() {
        let frame = match peek_frame(rest, limits.max_packet_size) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        assert!(frame.remaining <= limits.max_packet_size);
        assert!(frame.header_len >= 2 && frame.header_len <= 5);
        if frame.len() > rest.len() {
            return; // the body is still "arriving"
        }
        let body = &rest[frame.header_len..frame.len()];
        if first {
            first = false;
            match decode_connect(&frame, body, &limits) {
                Ok(c) => {
                    version = c.version;
                    let again = c.encode();
                    let f2 = peek_frame(&again, usize::MAX)
                        .expect("own encoding frames")
                        .expect("complete header");
                    assert_eq!(
                        f2.len(),
                        again.len(),
                        "own encoding has the declared length"
                    );
                    let c2 = decode_connect(
                        &f2,
                        &again[f2.header_len..],
                        &Limits {
                            max_packet_size: usize::MAX,
                            ..limits
                        },
                    )
                    .expect("own encoding decodes");
                    assert!(c2 == c, "CONNECT does not survive a re-encoding");
                }
                Err(_) => return,
            }
        } else {
            for v in [version, Version::V5] {
                match check_client_packet(&frame, body, v, &limits) {
                    Ok(Checked::Forward)
                        if v == Version::V5 && frame.kind == PacketType::Publish =>
                    {
                        let p = split_publish_v5(&frame, body, &limits)
                            .expect("a validated PUBLISH splits");
                        assert!(p.payload.len() <= body.len());
                        if !p.topic.is_empty() {
                            // The front door's rewrite (alias resolved, properties dropped)
                            // is itself a valid PUBLISH with the same parts.
                            let out =
                                codec::encode_publish_v5(rest[0], p.topic, p.packet_id, p.payload);
                            let f2 = peek_frame(&out, usize::MAX)
                                .expect("own encoding frames")
                                .expect("complete header");
                            let b2 = &out[f2.header_len..];
                            let big = Limits {
                                max_packet_size: usize::MAX,
                                ..limits
                            };
                            check_client_packet(&f2, b2, Version::V5, &big)
                                .expect("own PUBLISH validates");
                            let p2 = split_publish_v5(&f2, b2, &big).expect("own PUBLISH splits");
                            assert_eq!(
                                (p2.topic, p2.packet_id, p2.payload),
                                (p.topic, p.packet_id, p.payload)
                            );
                        }
                    }
                    Ok(Checked::Forward) if frame.kind == PacketType::Publish => {
                        // What the topic rights are checked against: a validated 3.1.1
                        // PUBLISH always yields its topic.
                        let t = publish_topic_v311(body).expect("a validated PUBLISH has a topic");
                        assert!(!t.is_empty());
                    }
                    Ok(Checked::Forward) if frame.kind == PacketType::Subscribe => {
                        let filters = subscribe_filters(body, v, &limits)
                            .expect("a validated SUBSCRIBE yields its filters");
                        assert!(
                            !filters.is_empty() && filters.len() <= limits.max_filters_per_packet
                        );
                    }
                    Ok(_) | Err(_) => {}
                }
            }
        }
        rest = &rest[frame.len()..];
    }
});
