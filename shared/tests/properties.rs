//! Property tests of the wire layer: canonical JSON, envelopes, signatures and the replay
//! guard, over generated inputs (proptest; a few hundred cases each, fast in debug).
//!
//! The canonical encoder mimics Python's `json.dumps(sort_keys=True, separators=(",",
//! ":"))`, so the generators produce what a Python peer can send: integers of any size,
//! every finite double (subnormals and negative zero included), any Unicode text. NaN and
//! infinities are not JSON and cannot be built as a [`Value`].
//!
//! Invariants (each property names the one it checks):
//! - canonical encoding is a fixed point and loses nothing;
//! - floats print as Python's `repr` lays them out and read back bit for bit;
//! - whatever is signed verifies, through the wire form too, with HMAC and Ed25519;
//! - a single changed byte never yields a different message that still verifies;
//! - a nonce is accepted once;
//! - decoding is total: arbitrary text never panics, and what decodes re-encodes stably;
//! - a subscription granted by topic-filter coverage never matches beyond its pattern.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{self, Map, Number, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing, PublicKey};
use pdsno_shared::replay::{MemoryNonceStore, NonceStore, Recorded};
use pdsno_shared::signing::{self, ED25519, HMAC_SHA256, Verifier, VerifyError, VerifyKeys};

const SECRET: &str = "pdsno-message-signing-secret-change-in-production";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// ---------------------------------------------------------------------------------------
// Generators

/// Every finite double, with the awkward ones over-represented.
fn arb_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => any::<u64>()
            .prop_map(f64::from_bits)
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite()),
        2 => -1e6..1e6f64,
        1 => (-323i32..=308).prop_map(|e| 10f64.powi(e)),
        1 => prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            0.1,
            1e-5,
            1e-4,
            1e15,
            1e16,
            5e-324,
            2.2250738585072014e-308,
            f64::MAX,
            f64::MIN,
            9007199254740993.0,
        ]),
    ]
}

/// Integer text beyond 64 bits.
fn arb_big_int() -> impl Strategy<Value = Value> {
    "-?[1-9][0-9]{19,60}"
        .prop_map(|s| Value::Number(Number::from_integer_text(&s).expect("generated integer text")))
}

/// Text with every kind of character the encoder treats specially.
fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,12}",
        "[\u{0}-\u{1f}\"\\\\/\u{7f}\u{80}\u{e9}\u{ffff}\u{10000}\u{1f600}a]{0,8}",
    ]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        arb_big_int(),
        arb_f64().prop_map(Value::from),
        arb_string().prop_map(Value::String),
    ]
}

/// JSON trees of bounded depth and size.
fn arb_value() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(arb_string(), inner, 0..6).prop_map(Value::Object),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Map> {
    btree_map(arb_string(), arb_value(), 0..5)
}

fn arb_id() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_.-]{1,40}", "[^\u{0}]{1,20}"]
}

/// Unknown top-level keys (never one the envelope models by name).
fn arb_extra() -> impl Strategy<Value = Map> {
    btree_map("x-[a-z]{1,8}", arb_value(), 0..3)
}

fn arb_message_type() -> impl Strategy<Value = MessageType> {
    prop::sample::select(MessageType::ALL.to_vec())
}

/// An unsigned envelope with generated content.
fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        arb_message_type(),
        arb_id(),
        arb_id(),
        arb_object(),
        arb_extra(),
        proptest::option::of(arb_id()),
    )
        .prop_map(|(t, sender, recipient, payload, extra, corr)| {
            let mut e = Envelope::new(t, sender, recipient, payload, t0());
            e.extra = extra;
            e.correlation_id = corr;
            e
        })
}

/// How a generated envelope is signed.
#[derive(Clone, Debug)]
enum Signer {
    /// The compat network key, no `key_id`.
    Network,
    /// A pairwise ring key, named by `key_id`.
    Ring(String, [u8; 32]),
    /// An Ed25519 identity.
    Ed25519([u8; 32]),
}

fn arb_signer() -> impl Strategy<Value = Signer> {
    prop_oneof![
        Just(Signer::Network),
        ("key_[a-z0-9_]{1,20}", any::<[u8; 32]>()).prop_map(|(id, k)| Signer::Ring(id, k)),
        any::<[u8; 32]>().prop_map(Signer::Ed25519),
    ]
}

/// The keys a receiver holds for one signer.
struct Keys {
    ring: Option<KeyRing>,
    ed: Option<PublicKey>,
}

impl Keys {
    fn view(&self) -> VerifyKeys<'_> {
        VerifyKeys {
            hmac: self.ring.as_ref(),
            ed25519: self.ed.as_ref(),
        }
    }
}

/// Signs `env` at [`t0`] and returns the receiver's keys.
fn sign(env: &mut Envelope, signer: &Signer) -> Keys {
    match signer {
        Signer::Network => {
            let mut ring = KeyRing::single(None, HmacKey::from_secret_text(SECRET), t0());
            ring.set_announce_key_id(false);
            signing::sign_with_ring(env, &ring, t0()).expect("ring has a key");
            Keys {
                ring: Some(ring),
                ed: None,
            }
        }
        Signer::Ring(id, k) => {
            let key = HmacKey::from_bytes(k).expect("32-byte key");
            let ring = KeyRing::single(Some(id.clone()), key, t0());
            signing::sign_with_ring(env, &ring, t0()).expect("ring has a key");
            Keys {
                ring: Some(ring),
                ed: None,
            }
        }
        Signer::Ed25519(seed) => {
            let k = IdentityKey::from_seed(seed);
            signing::sign_ed25519(env, &k, None, t0());
            Keys {
                ring: None,
                ed: Some(k.public()),
            }
        }
    }
}

fn verifier() -> Verifier<MemoryNonceStore> {
    Verifier::new(MemoryNonceStore::new())
}

/// Python's `repr` layout of a finite float, checked from its text alone.
fn assert_python_float_layout(f: f64, text: &str) -> Result<(), TestCaseError> {
    let parsed: f64 = text
        .parse()
        .map_err(|_| TestCaseError::fail(format!("{text:?} is not a float")))?;
    prop_assert_eq!(parsed.to_bits(), f.to_bits(), "{} does not read back", text);
    let a = f.abs();
    if f == 0.0 || (1e-4..1e16).contains(&a) {
        prop_assert!(!text.contains('e'), "{} should be positional", text);
        prop_assert!(text.contains('.'), "{} lost its fraction", text);
        let frac = text.rsplit('.').next().unwrap_or_default();
        prop_assert!(
            frac == "0" || !frac.ends_with('0'),
            "{} has trailing zeros",
            text
        );
    } else {
        let (mantissa, exp) = text
            .split_once('e')
            .ok_or_else(|| TestCaseError::fail(format!("{text:?} should use an exponent")))?;
        prop_assert!(exp.starts_with('+') || exp.starts_with('-'), "{}", text);
        prop_assert!(exp.len() >= 3, "{}: exponent needs two digits", text);
        prop_assert!(
            !mantissa.ends_with('0') && !mantissa.ends_with('.'),
            "{}",
            text
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Canonical JSON

proptest! {
    #![proptest_config(config())]

    /// encode → parse → encode gives the same bytes, and parsing loses nothing.
    #[test]
    fn canonical_encoding_is_a_lossless_fixed_point(v in arb_value()) {
        let bytes = json::to_canonical_bytes(&v);
        prop_assert!(bytes.is_ascii());
        let back = json::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &v);
        prop_assert_eq!(json::to_canonical_bytes(&back), bytes);
        // The indented form is the same value, and so is the serde bridge's copy.
        let pretty = json::parse(json::to_pretty_string(&v).as_bytes())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&pretty, &v);
        let bridged = json::to_value(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&bridged, &v);
    }

    /// Whitespace and key order in the input never change the canonical bytes.
    #[test]
    fn canonical_bytes_ignore_layout(v in arb_value()) {
        let pretty = json::to_pretty_string(&v);
        let reparsed = json::parse(pretty.as_bytes())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(json::to_canonical_bytes(&reparsed), json::to_canonical_bytes(&v));
    }

    /// Floats print as Python's `repr` and read back bit for bit.
    #[test]
    fn floats_follow_python_repr(f in arb_f64()) {
        let mut out = Vec::new();
        json::write_python_float(f, &mut out);
        let text = String::from_utf8(out).map_err(|e| TestCaseError::fail(e.to_string()))?;
        assert_python_float_layout(f, &text)?;
        let v = json::parse(text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = v.as_f64().ok_or_else(|| TestCaseError::fail("not a number"))?;
        prop_assert_eq!(n.to_bits(), f.to_bits());
    }

    /// Integers of any size print exactly as written (Python's `int`).
    #[test]
    fn integers_are_exact(i in any::<i64>(), big in "-?[1-9][0-9]{0,80}") {
        prop_assert_eq!(Value::from(i).to_string(), i.to_string());
        let v = json::parse(big.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(v.to_string(), big);
    }
}

// ---------------------------------------------------------------------------------------
// Signatures

proptest! {
    #![proptest_config(config())]

    /// Whatever is signed verifies, directly and after a trip through the wire.
    #[test]
    fn signed_envelopes_verify(mut env in arb_envelope(), signer in arb_signer()) {
        let keys = sign(&mut env, &signer);
        let ok = verifier()
            .verify(&env, keys.view(), Some(&env.sender_id), t0())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want = if matches!(signer, Signer::Ed25519(_)) { ED25519 } else { HMAC_SHA256 };
        prop_assert_eq!(ok.algorithm, want);
        if let Signer::Ring(id, _) = &signer {
            prop_assert_eq!(ok.key_id.as_deref(), Some(id.as_str()));
        }
        let received = Envelope::from_slice(&env.to_json_bytes())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(received == env);
        let again = verifier().verify(&received, keys.view(), None, t0());
        prop_assert_eq!(again, Ok(ok));
    }

    /// Freshness: accepted within ±300 s of `signed_at`, refused beyond.
    #[test]
    fn freshness_window_is_300_seconds(
        mut env in arb_envelope(),
        signer in arb_signer(),
        skew_ms in -600_000i64..600_000,
    ) {
        let keys = sign(&mut env, &signer);
        let now = t0() + Duration::milliseconds(skew_ms);
        let r = verifier().verify(&env, keys.view(), None, now);
        if skew_ms.abs() <= 300_000 {
            prop_assert!(r.is_ok(), "{:?} at skew {} ms", r, skew_ms);
        } else {
            let stale = matches!(r, Err(VerifyError::Stale { max_secs: 300, .. }));
            prop_assert!(stale, "{:?} at skew {} ms", r, skew_ms);
        }
    }

    /// One changed byte of the wire form never yields a different message that verifies.
    ///
    /// A change may still verify only when the signed content is untouched: a different
    /// `\u` spelling of the same character, or the case of a hex digit of the signature
    /// (decoded to the same bytes).
    #[test]
    fn single_byte_mutations_do_not_verify(
        mut env in arb_envelope(),
        signer in arb_signer(),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        let keys = sign(&mut env, &signer);
        let mut wire = env.to_json_bytes();
        let i = at.index(wire.len());
        prop_assume!(wire[i] != byte);
        wire[i] = byte;
        let Ok(mutated) = Envelope::from_slice(&wire) else {
            return Ok(());
        };
        if let Ok(v) = verifier().verify(&mutated, keys.view(), None, t0()) {
            prop_assert_eq!(mutated.canonical_signing_bytes(), env.canonical_signing_bytes());
            prop_assert_eq!(&mutated.signature_algorithm, &env.signature_algorithm);
            let same_sig = mutated
                .signature
                .as_deref()
                .zip(env.signature.as_deref())
                .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b));
            prop_assert!(same_sig, "signature changed yet verified ({:?})", v);
        }
    }

    /// Any change to a signed field after signing is caught.
    #[test]
    fn tampering_after_signing_is_caught(
        mut env in arb_envelope(),
        signer in arb_signer(),
        key in "[a-z]{1,8}",
        value in arb_value(),
    ) {
        let keys = sign(&mut env, &signer);
        let before = env.canonical_signing_bytes();
        env.payload.insert(key, value);
        prop_assume!(env.canonical_signing_bytes() != before);
        prop_assert_eq!(
            verifier().verify(&env, keys.view(), None, t0()),
            Err(VerifyError::BadSignature)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Replay

proptest! {
    #![proptest_config(config())]

    /// The second delivery of a nonce is a replay, whatever the message around it.
    #[test]
    fn a_nonce_is_accepted_once(
        mut first in arb_envelope(),
        mut second in arb_envelope(),
        signer in arb_signer(),
    ) {
        let keys = sign(&mut first, &signer);
        let v = verifier();
        prop_assert!(v.verify(&first, keys.view(), None, t0()).is_ok());
        prop_assert_eq!(
            v.verify(&first, keys.view(), None, t0() + Duration::seconds(1)),
            Err(VerifyError::Replay)
        );
        // A different, validly signed message reusing the nonce is refused too.
        sign(&mut second, &signer);
        second.nonce.clone_from(&first.nonce);
        resign_keeping_stamp(&mut second, &signer);
        prop_assert!(verifier().verify(&second, keys.view(), None, t0()).is_ok());
        prop_assert_eq!(
            v.verify(&second, keys.view(), None, t0()),
            Err(VerifyError::Replay)
        );
    }

    /// The memory store behaves as a set of live nonces.
    #[test]
    fn memory_store_is_a_set(nonces in vec(0u8..12, 1..64)) {
        let store = MemoryNonceStore::new();
        let exp = t0() + Duration::seconds(300);
        let mut seen = std::collections::HashSet::new();
        for n in nonces {
            let nonce = format!("nonce-{n}");
            let was_seen = !seen.insert(n);
            prop_assert_eq!(store.contains(&nonce, t0()), Ok(was_seen));
            let want = if was_seen { Recorded::AlreadySeen } else { Recorded::Fresh };
            prop_assert_eq!(store.record(&nonce, exp, t0(), 1_000), Ok(want));
        }
        prop_assert_eq!(store.len(), Ok(seen.len()));
    }
}

/// Recomputes the signature of an already stamped envelope (same nonce and `signed_at`).
fn resign_keeping_stamp(env: &mut Envelope, signer: &Signer) {
    env.signature = None;
    let bytes = env.canonical_signing_bytes();
    let sig = match signer {
        Signer::Network => {
            signing::hmac_hex(HmacKey::from_secret_text(SECRET).expose_bytes(), &bytes)
        }
        Signer::Ring(_, k) => signing::hmac_hex(k, &bytes),
        Signer::Ed25519(seed) => hex::encode(IdentityKey::from_seed(seed).sign(&bytes)),
    };
    env.signature = Some(sig);
}

// ---------------------------------------------------------------------------------------
// Decoding is total

/// Text that looks like JSON: the structural characters, with letters and digits.
fn arb_jsonish() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just("\"".to_owned()),
            Just("\\u".to_owned()),
            Just("\"message_type\":\"HEARTBEAT\"".to_owned()),
            Just("\"payload\":{}".to_owned()),
            Just("null".to_owned()),
            Just("-0.0e+5".to_owned()),
            "[a-z0-9_ .eE+-]{1,4}",
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

/// A field as a sender might fill it: usually well-typed, sometimes missing (`None`),
/// sometimes any JSON value at all.
fn slot(valid: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        12 => valid.prop_map(Some),
        1 => Just(None),
        1 => arb_value().prop_map(Some),
    ]
}

/// A short piece of JSON-looking text.
fn arb_snippet() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => arb_jsonish().prop_map(|s| s.chars().take(6).collect()),
        1 => arb_jsonish(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary text or bytes never panic the decoder.
    #[test]
    fn envelope_decoding_never_panics(
        s in any::<String>(),
        j in arb_jsonish(),
        b in vec(any::<u8>(), 0..256),
    ) {
        let _ = Envelope::from_slice(s.as_bytes());
        let _ = Envelope::from_slice(j.as_bytes());
        let _ = Envelope::from_slice(&b);
        let _ = json::parse(j.as_bytes());
    }

    /// A valid envelope with a span of its text replaced: never a panic, and whatever still
    /// decodes re-encodes to a stable form.
    #[test]
    fn spliced_envelopes_decode_stably(
        env in arb_envelope(),
        at in any::<Index>(),
        len in 0usize..8,
        insert in arb_snippet(),
    ) {
        let wire = env.to_json();
        let start = at.index(wire.len() + 1);
        let end = (start + len).min(wire.len());
        let spliced = format!("{}{}{}", &wire[..start], insert, &wire[end..]);
        if let Ok(e) = Envelope::from_slice(spliced.as_bytes()) {
            let bytes = e.to_json_bytes();
            let back = Envelope::from_slice(&bytes)
                .map_err(|err| TestCaseError::fail(err.to_string()))?;
            prop_assert!(back == e);
            prop_assert_eq!(back.to_json_bytes(), bytes);
        }
    }

    /// Objects with the envelope's fields present, absent or of the wrong type decode or
    /// are refused, never panic; what decodes re-encodes to exactly its input.
    #[test]
    fn envelope_shaped_values_round_trip(
        mut m in arb_extra(),
        ids in vec(slot(arb_id().prop_map(Value::String)), 3),
        payload in slot(arb_object().prop_map(Value::Object)),
        correlation in slot(proptest::option::of(arb_id()).prop_map(Value::from)),
        optional in vec(proptest::option::of(slot(arb_id().prop_map(Value::String))), 5),
        ty in arb_message_type(),
        ts in prop_oneof![Just("2026-03-01T12:00:00Z".to_owned()), "[0-9T:.+Z -]{0,32}"],
    ) {
        let required = ["message_id", "sender_id", "recipient_id"];
        for (name, v) in required.iter().zip(ids) {
            m.extend(v.map(|v| ((*name).to_owned(), v)));
        }
        m.extend(payload.map(|v| ("payload".to_owned(), v)));
        m.extend(correlation.map(|v| ("correlation_id".to_owned(), v)));
        let optional_names = ["nonce", "signed_at", "signature", "signature_algorithm", "key_id"];
        for (name, v) in optional_names.iter().zip(optional) {
            m.extend(v.flatten().map(|v| ((*name).to_owned(), v)));
        }
        m.insert("message_type".into(), ty.as_str().into());
        m.insert("timestamp".into(), ts.into());
        let v = Value::Object(m);
        if let Ok(e) = Envelope::from_value(v.clone()) {
            prop_assert_eq!(e.to_json_bytes(), json::to_canonical_bytes(&v));
            prop_assert!(Envelope::from_slice(&e.to_json_bytes()).ok() == Some(e));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Topic rights: a filter allowed because a pattern covers it can never match a topic the
// pattern does not (the embedded broker grants subscriptions by coverage).

fn arb_filter() -> impl Strategy<Value = String> {
    (
        vec(
            prop::sample::select(&["a", "b", "c", "+"][..]).prop_map(String::from),
            0..4,
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(mut levels, hash, root)| {
            if hash || levels.is_empty() {
                levels.push("#".into());
            }
            if root {
                levels.insert(0, "pdsno".into());
            }
            levels.join("/")
        })
}

fn arb_topic() -> impl Strategy<Value = String> {
    (
        vec(
            prop::sample::select(&["a", "b", "c", "d"][..]).prop_map(String::from),
            0..5,
        ),
        any::<bool>(),
    )
        .prop_map(|(levels, root)| {
            let mut t = if root {
                vec!["pdsno".to_owned()]
            } else {
                Vec::new()
            };
            t.extend(levels);
            if t.is_empty() {
                t.push("a".into());
            }
            t.join("/")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Coverage is sound: if `pattern` covers `filter`, every topic `filter` matches,
    /// `pattern` matches too.
    #[test]
    fn a_covered_filter_never_reaches_beyond_its_pattern(
        pattern in arb_filter(),
        filter in arb_filter(),
        topics in vec(arb_topic(), 1..24),
    ) {
        use pdsno_shared::topics::{filter_covers, filter_matches};
        prop_assert!(filter_covers(&pattern, &pattern));
        if filter_covers(&pattern, &filter) {
            for t in &topics {
                prop_assert!(
                    !filter_matches(&filter, t) || filter_matches(&pattern, t),
                    "{filter} matches {t} but {pattern} does not"
                );
            }
        }
    }
}
