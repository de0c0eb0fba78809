//! Arbitrary bytes through the whole receive path of the shared crate: strict JSON parse,
//! envelope decode, then full verification (HMAC key ring and Ed25519 key, freshness,
//! replay). Nothing may panic, and:
//! - a decoded envelope re-encodes to canonical bytes that decode to the same envelope and
//!   encode to the same bytes again (relaying never changes a message);
//! - the signing bytes are the wire bytes without `signature` / `signature_algorithm`;
//! - a message that verifies once is refused as a replay the second time, and its
//!   signature really is the one the key would produce.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pdsno_fuzz::{assert_canonical_fixed_point, hmac_key, identity, now};
use pdsno_shared::envelope::Envelope;
use pdsno_shared::json::{self, Value};
use pdsno_shared::keys::KeyRing;
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{self, HMAC_SHA256, Verifier, VerifyError, VerifyKeys};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = json::parse(data) else {
        return;
    };
    assert_canonical_fixed_point(&v);
    let Ok(env) = Envelope::from_value(v.clone()) else {
        // The byte entry point must agree with the value entry point.
        assert!(Envelope::from_slice(data).is_err());
        return;
    };
    match Envelope::from_slice(data) {
        Ok(e) => assert!(e == env, "from_slice and from_value disagree"),
        Err(e) => panic!("from_slice refused what from_value accepted: {e}"),
    }

    // Relaying: the wire form is canonical and stable.
    let wire = env.to_json_bytes();
    assert_eq!(wire, json::to_canonical_bytes(&env.to_value()));
    let back = match Envelope::from_slice(&wire) {
        Ok(e) => e,
        Err(e) => panic!("re-encoded envelope does not decode: {e}"),
    };
    assert!(back == env, "decode(encode(env)) != env");
    assert_eq!(
        back.to_json_bytes(),
        wire,
        "envelope encoding is not idempotent"
    );
    // Nothing of the input is lost: the wire form is the input's canonical form.
    assert_eq!(wire, json::to_canonical_bytes(&v));

    // The signature covers everything but the two signature fields.
    let mut unsigned = env.to_value();
    if let Some(m) = unsigned.as_object_mut() {
        m.remove("signature");
        m.remove("signature_algorithm");
    }
    assert_eq!(
        env.canonical_signing_bytes(),
        json::to_canonical_bytes(&unsigned)
    );

    verify(&env);
});

fn verify(env: &Envelope) {
    let t = now();
    let hmac = hmac_key();
    let mut ring = KeyRing::single(None, hmac.clone(), t);
    ring.set_announce_key_id(false);
    let ed = identity().public();
    let key_sets = [
        VerifyKeys {
            hmac: Some(&ring),
            ed25519: Some(&ed),
        },
        VerifyKeys {
            hmac: Some(&ring),
            ed25519: None,
        },
        VerifyKeys {
            hmac: None,
            ed25519: Some(&ed),
        },
        VerifyKeys::default(),
    ];
    for keys in key_sets {
        let verifier = Verifier::new(MemoryNonceStore::new()).with_capacity(4);
        let first = verifier.verify(env, keys, None, t);
        let auth = signing::authenticate(env, keys, Some(&env.sender_id), t);
        match &first {
            Ok(ok) => {
                // Authentic, and only with the key the algorithm names.
                assert_eq!(auth.as_ref().ok(), Some(ok));
                let sig = env.signature.as_deref().unwrap_or_default();
                let bytes = env.canonical_signing_bytes();
                if ok.algorithm == HMAC_SHA256 {
                    assert!(signing::hmac_verify_hex(hmac.expose_bytes(), &bytes, sig));
                } else {
                    let raw = hex_64(sig);
                    assert!(raw.is_some_and(|s| ed.verify(&bytes, &s)));
                }
                assert_eq!(
                    verifier.verify(env, keys, None, t),
                    Err(VerifyError::Replay),
                    "a second delivery must be a replay"
                );
            }
            Err(e) => {
                assert!(!e.is_internal(), "memory store failed: {e}");
                // A bad signature never authenticates either.
                if *e == VerifyError::BadSignature {
                    assert!(auth.is_err());
                }
            }
        }
        // Reason texts are total.
        let _ = first.map_err(|e| e.to_string());
    }
    // The decoded envelope's accessors are total.
    let _ = env.timestamp_utc();
    let _ = env.payload_as::<Value>();
    let _ = format!("{env:?}");
}

fn hex_64(s: &str) -> Option<[u8; 64]> {
    if s.len() != 128 {
        return None;
    }
    let mut out = [0u8; 64];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}
