//! MQTT 3.1.1 and 5.0 framing and validation for the front door.
//!
//! Every packet a client sends is framed and checked here before it reaches rumqttd. The
//! checks are the spec's (MQTT 3.1.1 §2–3, MQTT 5.0 §2–3) plus size limits of ours; rumqttd
//! accepts several forbidden packets (empty or wildcard publish topics, empty or malformed
//! filters, a second CONNECT) and panics on a few (a v5 CONNACK sent by a client), so
//! nothing unchecked may pass. Validation is total: it never panics and never reads past
//! the frame.
//!
//! Only CONNECT is decoded into a structure (the front door authenticates it and rewrites
//! its credentials); every other packet is validated in place and forwarded byte for byte.

use std::fmt;

/// Protocol level byte of MQTT 3.1.1.
pub const LEVEL_V311: u8 = 4;
/// Protocol level byte of MQTT 5.0.
pub const LEVEL_V5: u8 = 5;

/// An MQTT protocol version the broker speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        })
    }
}

/// Limits applied while validating.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest remaining length accepted (the whole packet after the fixed header).
    pub max_packet_size: usize,
    /// Most MQTT 5 user properties in one packet.
    pub max_user_properties: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most filters in one SUBSCRIBE or UNSUBSCRIBE.
    pub max_filters_per_packet: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 256 * 1024,
            max_user_properties: 64,
            max_topic_levels: 32,
            max_filters_per_packet: 64,
        }
    }
}

/// Why a packet was refused. Maps to an MQTT 5 reason code; MQTT 3.1.1 has none and just
/// closes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The bytes do not form the packet they claim to be (0x81).
    Malformed(&'static str),
    /// A well-formed packet the protocol forbids here (0x82).
    Protocol(&'static str),
    /// A publish topic that is not a valid topic name (0x90).
    TopicNameInvalid(&'static str),
    /// A subscription filter that is not a valid filter (0x8F).
    TopicFilterInvalid(&'static str),
    /// Larger than the configured limit (0x95).
    PacketTooLarge {
        /// Announced remaining length.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Over a count limit of ours (0x97).
    Quota(&'static str),
    /// A feature this broker does not offer (0x83).
    Unsupported(&'static str),
}

impl Violation {
    /// The MQTT 5 DISCONNECT reason code.
    pub fn reason_code(&self) -> u8 {
        match self {
            Violation::Malformed(_) => 0x81,
            Violation::Protocol(_) => 0x82,
            Violation::TopicNameInvalid(_) => 0x90,
            Violation::TopicFilterInvalid(_) => 0x8F,
            Violation::PacketTooLarge { .. } => 0x95,
            Violation::Quota(_) => 0x97,
            Violation::Unsupported(_) => 0x83,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Malformed(m) => write!(f, "malformed packet: {m}"),
            Violation::Protocol(m) => write!(f, "protocol error: {m}"),
            Violation::TopicNameInvalid(m) => write!(f, "invalid topic name: {m}"),
            Violation::TopicFilterInvalid(m) => write!(f, "invalid topic filter: {m}"),
            Violation::PacketTooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the limit of {max}")
            }
            Violation::Quota(m) => write!(f, "limit exceeded: {m}"),
            Violation::Unsupported(m) => write!(f, "unsupported: {m}"),
        }
    }
}

type R<T> = Result<T, Violation>;

/// Control packet types (the high nibble of the first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    /// 1
    Connect,
    /// 2
    ConnAck,
    /// 3
    Publish,
    /// 4
    PubAck,
    /// 5
    PubRec,
    /// 6
    PubRel,
    /// 7
    PubComp,
    /// 8
    Subscribe,
    /// 9
    SubAck,
    /// 10
    Unsubscribe,
    /// 11
    UnsubAck,
    /// 12
    PingReq,
    /// 13
    PingResp,
    /// 14
    Disconnect,
    /// 15 (MQTT 5 only)
    Auth,
}

impl PacketType {
    fn from_nibble(n: u8) -> Option<Self> {
        Some(match n {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            15 => PacketType::Auth,
            _ => return None,
        })
    }
}

/// A complete frame found at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The packet type.
    pub kind: PacketType,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Bytes of fixed header (1 + length of the remaining-length field).
    pub header_len: usize,
    /// The remaining length.
    pub remaining: usize,
}

impl Frame {
    /// Total bytes of the frame.
    pub fn len(&self) -> usize {
        self.header_len + self.remaining
    }

    /// Always false: a frame has at least its first byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Looks for a frame at the start of `buf`.
///
/// Returns `Ok(None)` while the fixed header is incomplete, the frame's header once known
/// (the body may still be arriving: compare [`Frame::len`] with the buffer), or a
/// violation for a reserved packet type, a remaining length longer than 4 bytes, or one
/// above `max_packet_size` (checked before any body is buffered).
///
/// # Errors
/// The violation found.
pub fn peek_frame(buf: &[u8], max_packet_size: usize) -> R<Option<Frame>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = PacketType::from_nibble(first >> 4)
        .ok_or(Violation::Malformed("reserved packet type 0"))?;
    let mut remaining: usize = 0;
    let mut shift = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            // The encoding must be minimal: a zero continuation byte is malformed.
            if i > 0 && b == 0 {
                return Err(Violation::Malformed("non-minimal remaining length"));
            }
            if remaining > max_packet_size {
                return Err(Violation::PacketTooLarge {
                    size: remaining,
                    max: max_packet_size,
                });
            }
            return Ok(Some(Frame {
                kind,
                flags: first & 0x0F,
                header_len: 2 + i,
                remaining,
            }));
        }
        shift += 7;
    }
    Err(Violation::Malformed("remaining length longer than 4 bytes"))
}

/// A bounds-checked reader over a packet body.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, i: 0 }
    }
    fn left(&self) -> usize {
        self.b.len() - self.i
    }
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
    fn take(&mut self, n: usize, what: &'static str) -> R<&'a [u8]> {
        let s = self
            .b
            .get(self.i..self.i + n)
            .ok_or(Violation::Malformed(what))?;
        self.i += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> R<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> R<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> R<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn varint(&mut self, what: &'static str) -> R<u32> {
        let mut v: u32 = 0;
        for i in 0..4 {
            let b = self.u8(what)?;
            v |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(Violation::Malformed(what));
                }
                return Ok(v);
            }
        }
        Err(Violation::Malformed(what))
    }
    fn binary(&mut self, what: &'static str) -> R<&'a [u8]> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
    /// A UTF-8 string: valid UTF-8 and no U+0000 (MQTT 3.1.1 §1.5.3, 5.0 §1.5.4).
    fn string(&mut self, what: &'static str) -> R<&'a str> {
        let raw = self.binary(what)?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| Violation::Malformed("string is not valid UTF-8"))?;
        if s.contains('\0') {
            return Err(Violation::Malformed("string contains U+0000"));
        }
        Ok(s)
    }
}

/// Where a property list appears (each context allows a different set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PropCtx {
    Connect,
    Will,
    Publish,
    PubResp,
    Subscribe,
    Unsubscribe,
    Disconnect,
}

/// What a property list contained that the caller needs.
#[derive(Debug, Default)]
struct PropSummary {
    topic_alias: Option<u16>,
    auth_method: bool,
}

/// Validates an MQTT 5 property list (length varint + properties) and returns its raw
/// bytes (length prefix included) and a summary.
fn properties<'a>(r: &mut Reader<'a>, ctx: PropCtx, limits: &Limits) -> R<(&'a [u8], PropSummary)> {
    let start = r.i;
    let len = r.varint("property length")? as usize;
    if len > r.left() {
        return Err(Violation::Malformed("property length exceeds packet"));
    }
    let mut pr = Reader::new(r.take(len, "properties")?);
    let mut seen = [false; 0x30];
    let mut users = 0usize;
    let mut summary = PropSummary::default();
    use PropCtx::*;
    while !pr.done() {
        let id = pr.varint("property id")?;
        let allowed = match id {
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
            0x0B => ctx == Subscribe,
            0x11 => matches!(ctx, Connect | Disconnect),
            0x15 | 0x16 | 0x17 | 0x19 | 0x21 | 0x22 | 0x27 => ctx == Connect,
            0x18 => ctx == Will,
            0x1F => matches!(ctx, PubResp | Disconnect),
            0x23 => ctx == Publish,
            0x26 => true,
            _ => false,
        };
        if !allowed {
            return Err(Violation::Protocol("property not allowed in this packet"));
        }
        let idx = id as usize;
        if id != 0x26 {
            if seen[idx] {
                return Err(Violation::Protocol("property appears twice"));
            }
            seen[idx] = true;
        }
        match id {
            0x01 | 0x17 | 0x19 => {
                if pr.u8("property value")? > 1 {
                    return Err(Violation::Protocol("property value must be 0 or 1"));
                }
            }
            0x02 | 0x11 | 0x18 => {
                pr.u32("property value")?;
            }
            0x27 => {
                if pr.u32("property value")? == 0 {
                    return Err(Violation::Protocol("maximum packet size 0"));
                }
            }
            0x03 | 0x1F => {
                pr.string("property value")?;
            }
            0x15 => {
                pr.string("property value")?;
                summary.auth_method = true;
            }
            0x08 => {
                let t = pr.string("response topic")?;
                check_topic_name(t, limits)?;
            }
            0x09 | 0x16 => {
                pr.binary("property value")?;
            }
            0x0B => {
                if pr.varint("subscription identifier")? == 0 {
                    return Err(Violation::Protocol("subscription identifier 0"));
                }
            }
            0x21 => {
                if pr.u16("property value")? == 0 {
                    return Err(Violation::Protocol("receive maximum 0"));
                }
            }
            0x22 => {
                pr.u16("property value")?;
            }
            0x23 => {
                let a = pr.u16("topic alias")?;
                if a == 0 {
                    return Err(Violation::Protocol("topic alias 0"));
                }
                summary.topic_alias = Some(a);
            }
            0x26 => {
                users += 1;
                if users > limits.max_user_properties {
                    return Err(Violation::Quota("too many user properties"));
                }
                pr.string("user property name")?;
                pr.string("user property value")?;
            }
            _ => return Err(Violation::Protocol("unknown property")),
        }
    }
    Ok((&r.b[start..r.i], summary))
}

fn check_levels(s: &str, limits: &Limits) -> bool {
    s.bytes().filter(|&b| b == b'/').count() < limits.max_topic_levels
}

/// A topic name a client may publish to: non-empty, no wildcards, not a `$` topic.
fn check_topic_name(t: &str, limits: &Limits) -> R<()> {
    if t.is_empty() {
        return Err(Violation::TopicNameInvalid("empty topic"));
    }
    if t.contains(['+', '#']) {
        return Err(Violation::TopicNameInvalid("wildcard in a topic name"));
    }
    if t.starts_with('$') {
        return Err(Violation::TopicNameInvalid(
            "topics starting with $ are reserved",
        ));
    }
    if !check_levels(t, limits) {
        return Err(Violation::TopicNameInvalid("too many topic levels"));
    }
    Ok(())
}

/// A valid subscription filter: wildcards occupy whole levels, `#` only last; `$` filters
/// only as `$share/{group}/{filter}`.
fn check_filter(f: &str, limits: &Limits) -> R<()> {
    if f.is_empty() {
        return Err(Violation::TopicFilterInvalid("empty filter"));
    }
    if !check_levels(f, limits) {
        return Err(Violation::TopicFilterInvalid("too many topic levels"));
    }
    let body = if let Some(rest) = f.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(Violation::TopicFilterInvalid(
            "shared subscription without a filter",
        ))?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(Violation::TopicFilterInvalid("invalid share name"));
        }
        if filter.is_empty() {
            return Err(Violation::TopicFilterInvalid(
                "shared subscription without a filter",
            ));
        }
        filter
    } else if f.starts_with('$') {
        return Err(Violation::TopicFilterInvalid(
            "filters starting with $ are not served",
        ));
    } else {
        f
    };
    let levels: Vec<&str> = body.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => {
                return Err(Violation::TopicFilterInvalid("# must be the last level"));
            }
            "#" | "+" => {}
            other if other.contains(['+', '#']) => {
                return Err(Violation::TopicFilterInvalid(
                    "wildcard must occupy a whole level",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn expect_flags(frame: &Frame, want: u8) -> R<()> {
    if frame.flags != want {
        return Err(Violation::Malformed("reserved fixed-header flags"));
    }
    Ok(())
}

fn end(r: &Reader<'_>) -> R<()> {
    if !r.done() {
        return Err(Violation::Malformed("trailing bytes in packet"));
    }
    Ok(())
}

/// What the front door needs to know about a validated packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Forward it.
    Forward,
    /// A DISCONNECT: forward it, then the client will close.
    Disconnect,
}

/// Validates one complete non-CONNECT packet sent by a client after its CONNECT.
///
/// `body` is the packet after the fixed header (exactly `frame.remaining` bytes).
///
/// # Errors
/// The first violation found.
pub fn check_client_packet(frame: &Frame, body: &[u8], v: Version, limits: &Limits) -> R<Checked> {
    let mut r = Reader::new(body);
    let v5 = v == Version::V5;
    match frame.kind {
        PacketType::Connect => Err(Violation::Protocol("second CONNECT")),
        PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp => {
            Err(Violation::Protocol(
                "server-to-client packet sent by a client",
            ))
        }
        PacketType::Auth => {
            if v5 {
                Err(Violation::Unsupported("enhanced authentication (AUTH)"))
            } else {
                Err(Violation::Malformed("reserved packet type 15"))
            }
        }
        PacketType::Publish => {
            let qos = (frame.flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Violation::Malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && frame.flags & 0b1000 != 0 {
                return Err(Violation::Malformed("DUP set on a QoS 0 PUBLISH"));
            }
            let topic = r.string("topic name")?;
            if qos > 0 && r.u16("packet identifier")? == 0 {
                return Err(Violation::Malformed("packet identifier 0"));
            }
            let alias = if v5 {
                properties(&mut r, PropCtx::Publish, limits)?.1.topic_alias
            } else {
                None
            };
            if !(topic.is_empty() && alias.is_some()) {
                check_topic_name(topic, limits)?;
            }
            Ok(Checked::Forward)
        }
        PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
            expect_flags(
                frame,
                if frame.kind == PacketType::PubRel {
                    0b0010
                } else {
                    0
                },
            )?;
            if r.u16("packet identifier")? == 0 {
                return Err(Violation::Malformed("packet identifier 0"));
            }
            if v5 {
                if !r.done() {
                    r.u8("reason code")?;
                }
                if !r.done() {
                    properties(&mut r, PropCtx::PubResp, limits)?;
                }
            }
            end(&r)?;
            Ok(Checked::Forward)
        }
        PacketType::Subscribe => {
            expect_flags(frame, 0b0010)?;
            if r.u16("packet identifier")? == 0 {
                return Err(Violation::Malformed("packet identifier 0"));
            }
            if v5 {
                properties(&mut r, PropCtx::Subscribe, limits)?;
            }
            let mut n = 0;
            while !r.done() {
                n += 1;
                if n > limits.max_filters_per_packet {
                    return Err(Violation::Quota("too many filters in one SUBSCRIBE"));
                }
                let f = r.string("topic filter")?;
                let opts = r.u8("subscription options")?;
                let reserved = if v5 {
                    opts & 0b1100_0000
                } else {
                    opts & 0b1111_1100
                };
                if reserved != 0 {
                    return Err(Violation::Malformed("reserved subscription option bits"));
                }
                if opts & 0b11 == 3 {
                    return Err(Violation::Malformed("subscription QoS 3"));
                }
                if v5 && (opts >> 4) & 0b11 == 3 {
                    return Err(Violation::Malformed("retain handling 3"));
                }
                check_filter(f, limits)?;
            }
            if n == 0 {
                return Err(Violation::Protocol("SUBSCRIBE without filters"));
            }
            Ok(Checked::Forward)
        }
        PacketType::Unsubscribe => {
            expect_flags(frame, 0b0010)?;
            if r.u16("packet identifier")? == 0 {
                return Err(Violation::Malformed("packet identifier 0"));
            }
            if v5 {
                properties(&mut r, PropCtx::Unsubscribe, limits)?;
            }
            let mut n = 0;
            while !r.done() {
                n += 1;
                if n > limits.max_filters_per_packet {
                    return Err(Violation::Quota("too many filters in one UNSUBSCRIBE"));
                }
                check_filter(r.string("topic filter")?, limits)?;
            }
            if n == 0 {
                return Err(Violation::Protocol("UNSUBSCRIBE without filters"));
            }
            Ok(Checked::Forward)
        }
        PacketType::PingReq => {
            expect_flags(frame, 0)?;
            end(&r)?;
            Ok(Checked::Forward)
        }
        PacketType::Disconnect => {
            expect_flags(frame, 0)?;
            if v5 {
                if !r.done() {
                    r.u8("reason code")?;
                }
                if !r.done() {
                    properties(&mut r, PropCtx::Disconnect, limits)?;
                }
            }
            end(&r)?;
            Ok(Checked::Disconnect)
        }
    }
}

/// Where the parts of an MQTT 5 PUBLISH sit in its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishV5<'a> {
    /// The topic as sent (empty when the client uses an alias).
    pub topic: &'a str,
    /// The packet identifier bytes (QoS > 0), raw.
    pub packet_id: Option<[u8; 2]>,
    /// The topic alias property, if present.
    pub alias: Option<u16>,
    /// True when the property list is not empty.
    pub has_properties: bool,
    /// The payload.
    pub payload: &'a [u8],
}

/// Splits a validated MQTT 5 PUBLISH body into its parts.
///
/// # Errors
/// As [`check_client_packet`] (call that first; this re-reads the same bytes).
pub fn split_publish_v5<'a>(frame: &Frame, body: &'a [u8], limits: &Limits) -> R<PublishV5<'a>> {
    let mut r = Reader::new(body);
    let qos = (frame.flags >> 1) & 0b11;
    let topic = r.string("topic name")?;
    let packet_id = if qos > 0 {
        let id = r.take(2, "packet identifier")?;
        Some([id[0], id[1]])
    } else {
        None
    };
    let (raw, summary) = properties(&mut r, PropCtx::Publish, limits)?;
    let has_properties = raw.len() > 1;
    let payload = &body[r.i..];
    Ok(PublishV5 {
        topic,
        packet_id,
        alias: summary.topic_alias,
        has_properties,
        payload,
    })
}

/// Encodes an MQTT 5 PUBLISH with `topic`, no properties, and the original flags.
pub fn encode_publish_v5(
    first_byte: u8,
    topic: &str,
    packet_id: Option<[u8; 2]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 5);
    put_binary(&mut body, topic.as_bytes());
    if let Some(id) = packet_id {
        body.extend_from_slice(&id);
    }
    body.push(0);
    body.extend_from_slice(payload);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first_byte);
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The topic name of a validated MQTT 3.1.1 PUBLISH body (MQTT 5: [`split_publish_v5`]).
///
/// # Errors
/// As [`check_client_packet`] (call that first).
pub fn publish_topic_v311(body: &[u8]) -> R<&str> {
    Reader::new(body).string("topic name")
}

/// The filters of a validated SUBSCRIBE body, in order.
///
/// # Errors
/// As [`check_client_packet`] (call that first).
pub fn subscribe_filters<'a>(body: &'a [u8], v: Version, limits: &Limits) -> R<Vec<&'a str>> {
    let mut r = Reader::new(body);
    r.u16("packet identifier")?;
    if v == Version::V5 {
        properties(&mut r, PropCtx::Subscribe, limits)?;
    }
    let mut filters = Vec::new();
    while !r.done() {
        filters.push(r.string("topic filter")?);
        r.u8("subscription options")?;
    }
    Ok(filters)
}

/// A decoded CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version.
    pub version: Version,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// Keep alive, seconds (0 = off).
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties, raw (length prefix included).
    pub properties: Vec<u8>,
    /// The client identifier.
    pub client_id: String,
    /// The last will.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<String>,
    /// Password (binary).
    pub password: Option<Vec<u8>>,
    /// MQTT 5: the client asked for enhanced authentication.
    pub auth_method: bool,
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("clean", &self.clean)
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("will", &self.will.as_ref().map(|w| &w.topic))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

/// A last will.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// MQTT 5 will properties, raw (length prefix included).
    pub properties: Vec<u8>,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

/// Why a CONNECT was refused; the front door answers with the matching CONNACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// Not a CONNECT at all: close without answering.
    NotConnect,
    /// Protocol name/level this broker does not speak (3.1.1: 0x01, 5: 0x84).
    UnsupportedVersion(u8),
    /// Malformed CONNECT (close; 5: 0x81).
    Invalid(Violation),
}

/// Decodes and validates a CONNECT frame (the first packet of a connection).
///
/// # Errors
/// [`ConnectError`] naming the problem.
pub fn decode_connect(
    frame: &Frame,
    body: &[u8],
    limits: &Limits,
) -> Result<Connect, ConnectError> {
    if frame.kind != PacketType::Connect {
        return Err(ConnectError::NotConnect);
    }
    let inv = ConnectError::Invalid;
    expect_flags(frame, 0).map_err(inv)?;
    let mut r = Reader::new(body);
    let name = r.string("protocol name").map_err(inv)?;
    let level = r.u8("protocol level").map_err(inv)?;
    let version = match (name, level) {
        ("MQTT", LEVEL_V311) => Version::V311,
        ("MQTT", LEVEL_V5) => Version::V5,
        ("MQTT" | "MQIsdp", l) => return Err(ConnectError::UnsupportedVersion(l)),
        _ => return Err(inv(Violation::Protocol("unknown protocol name"))),
    };
    let flags = r.u8("connect flags").map_err(inv)?;
    if flags & 0x01 != 0 {
        return Err(inv(Violation::Malformed("reserved connect flag set")));
    }
    let clean = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(inv(Violation::Malformed("will QoS 3")));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(inv(Violation::Malformed(
            "will QoS or retain without a will",
        )));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(inv(Violation::Malformed("password without user name")));
    }
    let keep_alive = r.u16("keep alive").map_err(inv)?;
    let (connect_props, summary) = if version == Version::V5 {
        let (raw, s) = properties(&mut r, PropCtx::Connect, limits).map_err(inv)?;
        (raw.to_vec(), s)
    } else {
        (Vec::new(), PropSummary::default())
    };
    let client_id = r.string("client identifier").map_err(inv)?.to_owned();
    let will = if will_flag {
        let props = if version == Version::V5 {
            properties(&mut r, PropCtx::Will, limits)
                .map_err(inv)?
                .0
                .to_vec()
        } else {
            Vec::new()
        };
        let topic = r.string("will topic").map_err(inv)?.to_owned();
        check_topic_name(&topic, limits).map_err(inv)?;
        let payload = r.binary("will payload").map_err(inv)?.to_vec();
        Some(Will {
            properties: props,
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string("user name").map_err(inv)?.to_owned())
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary("password").map_err(inv)?.to_vec())
    } else {
        None
    };
    end(&r).map_err(inv)?;
    Ok(Connect {
        version,
        clean,
        keep_alive,
        properties: connect_props,
        client_id,
        will,
        username,
        password,
        auth_method: summary.auth_method,
    })
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut Vec<u8>, b: &[u8]) {
    // Callers only pass fields that came from a u16-length field or our own short values.
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&b[..usize::from(n)]);
}

impl Connect {
    /// Encodes this CONNECT (used to forward it with replaced credentials).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.client_id.len());
        put_binary(&mut body, b"MQTT");
        body.push(match self.version {
            Version::V311 => LEVEL_V311,
            Version::V5 => LEVEL_V5,
        });
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.version == Version::V5 {
            if self.properties.is_empty() {
                body.push(0);
            } else {
                body.extend_from_slice(&self.properties);
            }
        }
        put_binary(&mut body, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if self.version == Version::V5 {
                if w.properties.is_empty() {
                    body.push(0);
                } else {
                    body.extend_from_slice(&w.properties);
                }
            }
            put_binary(&mut body, w.topic.as_bytes());
            put_binary(&mut body, &w.payload);
        }
        if let Some(u) = &self.username {
            put_binary(&mut body, u.as_bytes());
        }
        if let Some(p) = &self.password {
            put_binary(&mut body, p);
        }
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(0x10);
        put_varint(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }
}

/// CONNACK return codes the front door itself sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Protocol version not served on this listener.
    UnsupportedVersion,
    /// Client identifier not acceptable.
    IdentifierRejected,
    /// The broker cannot serve the connection now.
    ServerUnavailable,
    /// Wrong user name or password.
    BadCredentials,
    /// Not allowed to connect (anonymous access off).
    NotAuthorized,
    /// Refused for a while after repeated wrong passwords (3.1.1: not authorized).
    Banned,
    /// MQTT 5: an authentication method we do not offer.
    BadAuthMethod,
    /// MQTT 5: malformed CONNECT.
    Malformed,
    /// The client id is reserved for another account (a controller's): not authorized.
    ReservedId,
    /// The will asks to be retained on a topic where nothing may be retained (3.1.1: not
    /// authorized; MQTT 5: 0x9A "retain not supported").
    RetainForbidden,
    /// The retained will would take the account over its retained-message budget (3.1.1:
    /// not authorized; MQTT 5: 0x97 "quota exceeded").
    RetainQuota,
}

/// The CONNACK refusing a connection, in the client's protocol version.
pub fn connack_refusal(v: Version, why: Refusal) -> Vec<u8> {
    match v {
        Version::V311 => {
            let code = match why {
                Refusal::UnsupportedVersion => 0x01,
                Refusal::IdentifierRejected => 0x02,
                Refusal::ServerUnavailable | Refusal::Malformed => 0x03,
                Refusal::BadCredentials | Refusal::BadAuthMethod => 0x04,
                Refusal::NotAuthorized
                | Refusal::Banned
                | Refusal::ReservedId
                | Refusal::RetainForbidden
                | Refusal::RetainQuota => 0x05,
            };
            vec![0x20, 0x02, 0x00, code]
        }
        Version::V5 => {
            let code = match why {
                Refusal::UnsupportedVersion => 0x84,
                Refusal::IdentifierRejected => 0x85,
                Refusal::ServerUnavailable => 0x88,
                Refusal::BadCredentials => 0x86,
                Refusal::NotAuthorized | Refusal::ReservedId => 0x87,
                Refusal::RetainForbidden => 0x9A,
                Refusal::RetainQuota => 0x97,
                Refusal::Banned => 0x8A,
                Refusal::BadAuthMethod => 0x8C,
                Refusal::Malformed => 0x81,
            };
            vec![0x20, 0x03, 0x00, code, 0x00]
        }
    }
}

/// An MQTT 5 DISCONNECT with a reason code.
pub fn disconnect_v5(reason: u8) -> Vec<u8> {
    vec![0xE0, 0x02, reason, 0x00]
}

#[cfg(test)]
mod tests;
