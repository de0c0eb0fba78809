//! What fuzzing found, replayed by `cargo test` (the fuzz targets themselves need a nightly
//! toolchain and run only in CI, for a few seconds each):
//! - each input that once broke an invariant of this crate, inlined, with the behaviour its
//!   fix guarantees;
//! - every committed seed of the targets that need only this crate (`fuzz/seeds/
//!   canonical_json`, `envelope`, `admission_payloads`) through the invariants those targets
//!   check, so a change that breaks a seed fails here without a fuzzer.
//!
//! The keys and the clock are the fuzz crate's fixed ones (`fuzz/src/lib.rs`), so the signed
//! seeds verify.

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use pdsno_shared::bootstrap::admission_key;
use pdsno_shared::envelope::Envelope;
use pdsno_shared::json::{self, Map, ParseErrorKind, Value};
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing};
use pdsno_shared::payload::admission::ValidationRequest;
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{Verifier, VerifyError, VerifyKeys};

/// The fuzz crate's network secret (PROTOCOL.md §2).
const NETWORK_SECRET: &str = "pdsno-message-signing-secret-change-in-production";
/// The fuzz crate's Ed25519 identity seed.
const ED25519_SEED: [u8; 32] = [7; 32];

/// The fuzz crate's fixed "now", when its signed seeds are fresh.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .expect("a valid time")
}

/// The committed seeds of `target`, by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("dir entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Canonical encoding is a fixed point (the `canonical_json` target's first invariant).
fn canonical_fixed_point(v: &Value, what: &str) -> Vec<u8> {
    let first = json::to_canonical_bytes(v);
    assert!(first.is_ascii(), "{what}: canonical text must be ASCII");
    let again = json::parse(&first).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(again == *v, "{what}: parse(encode(v)) != v");
    assert_eq!(
        first,
        json::to_canonical_bytes(&again),
        "{what}: not idempotent"
    );
    first
}

/// Found by the `envelope` target: an uppercase copy of a valid hex signature verified
/// (hex decoding is case-blind), so one message had two accepted wire forms, and the copy
/// passed the replay guard. Now only the lowercase form verifies.
#[test]
fn an_uppercase_copy_of_a_signature_is_refused() {
    let ring = {
        let mut r = KeyRing::single(None, HmacKey::from_secret_text(NETWORK_SECRET), now());
        r.set_announce_key_id(false);
        r
    };
    let ed = IdentityKey::from_seed(&ED25519_SEED).public();
    for (name, keys) in [
        (
            "v2_hmac.json",
            VerifyKeys {
                hmac: Some(&ring),
                ed25519: None,
            },
        ),
        (
            "policy_ed25519.json",
            VerifyKeys {
                hmac: None,
                ed25519: Some(&ed),
            },
        ),
    ] {
        let bytes = std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/envelope")
                .join(name),
        )
        .expect("seed");
        let env = Envelope::from_slice(&bytes).expect("envelope");
        let mut upper = env.clone();
        upper.signature = env.signature.as_deref().map(str::to_ascii_uppercase);
        assert_ne!(upper.signature, env.signature, "{name}");
        let v = Verifier::new(MemoryNonceStore::new());
        assert_eq!(
            v.verify(&upper, keys, None, now()),
            Err(VerifyError::BadSignature),
            "{name}"
        );
        assert!(v.verify(&env, keys, None, now()).is_ok(), "{name}");
    }
}

/// Found by the `canonical_json` target: input spelling the serde bridge's private
/// big-integer carrier key came back from the bridge as a number. The key is refused in
/// input, anywhere in a document.
#[test]
fn the_bridge_key_is_refused_in_input() {
    for input in [
        r#"{"$pdsno::json::BigInt":"1"}"#,
        r#"{"a":[{"$pdsno::json::BigInt":"123"}]}"#,
    ] {
        match json::parse(input.as_bytes()) {
            Err(e) => assert_eq!(e.kind, ParseErrorKind::ReservedKey, "{input}"),
            Ok(v) => panic!("{input} parsed as {v}"),
        }
    }
}

/// Found by the `admission_payloads` target: a bare 32-digit number decoded as a payload
/// struct of defaults, the carrier key landing in its extra fields. A big integer asked for
/// as an object or a struct is a type error; as a value it stays the exact number.
#[test]
fn a_big_integer_is_not_a_payload() {
    let v = json::parse(b"55555555555555555555555555555555").expect("valid JSON");
    assert!(json::from_value::<ValidationRequest>(v.clone()).is_err());
    assert!(json::from_value::<Map>(v.clone()).is_err());
    let back: Value = json::from_value(v.clone()).expect("a value");
    assert_eq!(back, v);
}

/// Every `canonical_json` seed: canonical fixed point, `Display` is the canonical text, the
/// pretty form reads back, and the serde bridge carries the value unchanged.
#[test]
fn the_canonical_json_seeds_replay() {
    let all = seeds("canonical_json");
    assert_eq!(all.len(), 5, "seeds: {:?}", names(&all));
    for (name, bytes) in &all {
        let v = json::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let canonical = canonical_fixed_point(&v, name);
        assert_eq!(v.to_string().as_bytes(), canonical.as_slice(), "{name}");
        let pretty = json::to_pretty_string(&v);
        assert!(
            json::parse(pretty.as_bytes()).is_ok_and(|b| b == v),
            "{name}: pretty form"
        );
        assert!(json::to_value(&v).is_ok_and(|b| b == v), "{name}: to_value");
        assert!(
            json::from_value::<Value>(v.clone()).is_ok_and(|b| b == v),
            "{name}: from_value"
        );
    }
}

/// Every `envelope` seed: it decodes, its wire form is its canonical form and stable, and
/// it verifies (or is refused) exactly as when it was committed; a verified one is a
/// replay the second time.
#[test]
fn the_envelope_seeds_replay() {
    let all = seeds("envelope");
    assert_eq!(all.len(), 6, "seeds: {:?}", names(&all));
    let mut ring = KeyRing::single(None, HmacKey::from_secret_text(NETWORK_SECRET), now());
    ring.set_announce_key_id(false);
    let ed = IdentityKey::from_seed(&ED25519_SEED).public();
    let keys = VerifyKeys {
        hmac: Some(&ring),
        ed25519: Some(&ed),
    };
    let mut outcomes = Vec::new();
    for (name, bytes) in &all {
        let v = json::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        canonical_fixed_point(&v, name);
        let env = Envelope::from_slice(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            Envelope::from_value(v.clone()).is_ok_and(|e| e == env),
            "{name}: from_value"
        );
        let wire = env.to_json_bytes();
        assert_eq!(wire, json::to_canonical_bytes(&v), "{name}: nothing lost");
        let back = Envelope::from_slice(&wire).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(back == env, "{name}: decode(encode(env))");
        assert_eq!(back.to_json_bytes(), wire, "{name}: idempotent");
        // A VALIDATION_REQUEST is signed with the admission key of its bootstrap token.
        let admission = env
            .payload
            .get("bootstrap_token")
            .and_then(Value::as_str)
            .map(|t| KeyRing::single(None, admission_key(t), now()));
        let keys = match &admission {
            Some(r) => VerifyKeys {
                hmac: Some(r),
                ed25519: None,
            },
            None => keys,
        };
        let verifier = Verifier::new(MemoryNonceStore::new());
        let first = verifier.verify(&env, keys, None, now());
        if first.is_ok() {
            assert_eq!(
                verifier.verify(&env, keys, None, now()),
                Err(VerifyError::Replay),
                "{name}"
            );
        }
        outcomes.push(format!(
            "{name}: {}",
            first.map_or_else(|e| e.to_string(), |_| "verified".into())
        ));
    }
    assert_eq!(
        outcomes,
        [
            "heartbeat_unsigned.json: Missing required field: signature",
            "policy_ed25519.json: verified",
            "sync_request.json: verified",
            "v1_hmac.json: verified",
            "v2_hmac.json: verified",
            "validation_request.json: verified",
        ]
    );
}

/// Every `admission_payloads` seed is JSON whose canonical form is a fixed point.
#[test]
fn the_admission_payload_seeds_replay() {
    let all = seeds("admission_payloads");
    assert_eq!(all.len(), 9, "seeds: {:?}", names(&all));
    for (name, bytes) in &all {
        let v = json::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        canonical_fixed_point(&v, name);
    }
}

fn names(all: &[(String, Vec<u8>)]) -> Vec<&str> {
    all.iter().map(|(n, _)| n.as_str()).collect()
}
