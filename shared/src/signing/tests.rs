use std::sync::Arc;

use chrono::TimeZone;

use super::*;
use crate::envelope::MessageType;
use crate::json::{self, Map};
use crate::replay::MemoryNonceStore;

const SECRET: &str = "pdsno-message-signing-secret-change-in-production";

const V1_CANONICAL: &str = r#"{"correlation_id":null,"message_id":"msg-0123456789ab","message_type":"HEARTBEAT","nonce":"0000000000000000000000000000000000000000000000000000000000000000","payload":{"n":1,"name":"\u00e9","status":"ok"},"recipient_id":"global_cntl_1","sender_id":"regional_cntl_zone-A_1","signed_at":"2026-03-01T12:00:00.500000+00:00","timestamp":"2026-03-01T12:00:00+00:00"}"#;
const V1_SIGNATURE: &str = "16af0344ceb1a665392f2f574d34b6ea9b99c5aee6f31f3f6b18d8a58be50699";

const V2_CANONICAL: &str = r#"{"correlation_id":"msg-0123456789ab","message_id":"msg-fedcba987654","message_type":"DISCOVERY_REPORT","nonce":"abababababababababababababababababababababababababababababababab","payload":{"Z":"upper","big":1e+16,"ctl":"a\tb\n\u0001\"\\/","emoji":"\ud83d\ude00","int_big":12345678901234567890,"list":[3,{"B":false,"a":null,"b":true}],"loss":1e-05,"neg":-0.5,"rtt_ms":1.0,"third":0.30000000000000004,"zone":"Z\u00fcrich","\u00e4":"non-ascii-key"},"recipient_id":"regional_cntl_zone-A_1","sender_id":"local_cntl_zone-A_1","signed_at":"2026-03-01T12:00:01+00:00","timestamp":"2026-03-01T12:00:00.000001+00:00"}"#;
const V2_SIGNATURE: &str = "cbd1baca82b3b74371e80eaa80a227b48ad64460eef66b68d3c684ae84c61fae";

fn network_ring() -> KeyRing {
    let mut r = KeyRing::single(None, HmacKey::from_secret_text(SECRET), t0());
    r.set_announce_key_id(false);
    r
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .expect("valid")
}

fn verifier() -> Verifier<MemoryNonceStore> {
    Verifier::new(MemoryNonceStore::new())
}

fn hmac_only(r: &KeyRing) -> VerifyKeys<'_> {
    VerifyKeys {
        hmac: Some(r),
        ed25519: None,
    }
}

/// A signed message as received: the canonical text plus the signature fields.
fn signed_from_canonical(canonical: &str, sig: &str) -> Envelope {
    let mut v = json::parse(canonical.as_bytes()).expect("valid");
    let m = v.as_object_mut().expect("object");
    m.insert("signature".into(), sig.into());
    m.insert("signature_algorithm".into(), HMAC_SHA256.into());
    Envelope::from_value(v).expect("envelope")
}

#[test]
fn vector_v1() {
    let key = HmacKey::from_secret_text(SECRET);
    assert_eq!(
        hmac_hex(key.expose_bytes(), V1_CANONICAL.as_bytes()),
        V1_SIGNATURE
    );
    // Built from fields, the envelope reproduces the canonical text exactly.
    let mut payload = Map::new();
    payload.insert("status".into(), "ok".into());
    payload.insert("n".into(), 1i64.into());
    payload.insert("name".into(), "é".into());
    let mut e = Envelope::new(
        MessageType::Heartbeat,
        "regional_cntl_zone-A_1",
        "global_cntl_1",
        payload,
        t0(),
    );
    e.message_id = "msg-0123456789ab".into();
    e.nonce = Some("0".repeat(64));
    e.signed_at = Some("2026-03-01T12:00:00.500000+00:00".into());
    assert_eq!(
        String::from_utf8(e.canonical_signing_bytes()).expect("ascii"),
        V1_CANONICAL
    );
    // And verifies when received.
    let env = signed_from_canonical(V1_CANONICAL, V1_SIGNATURE);
    let ring = network_ring();
    let ok = verifier().verify(
        &env,
        hmac_only(&ring),
        Some("regional_cntl_zone-A_1"),
        t0() + Duration::seconds(1),
    );
    assert_eq!(
        ok,
        Ok(Verified {
            algorithm: HMAC_SHA256,
            key_id: None
        })
    );
}

#[test]
fn vector_v2_from_parsed_json() {
    let key = HmacKey::from_secret_text(SECRET);
    assert_eq!(
        hmac_hex(key.expose_bytes(), V2_CANONICAL.as_bytes()),
        V2_SIGNATURE
    );
    // A sender that wrote 1e16 (not 1e+16), other whitespace and key order: same canonical.
    let sloppy = r#"{ "timestamp": "2026-03-01T12:00:00.000001+00:00", "signed_at": "2026-03-01T12:00:01+00:00",
        "sender_id": "local_cntl_zone-A_1", "recipient_id": "regional_cntl_zone-A_1",
        "payload": {"zone": "Zürich", "third": 0.30000000000000004, "rtt_ms": 1.0, "neg": -0.5, "loss": 0.00001,
          "list": [3, {"b": true, "a": null, "B": false}], "int_big": 12345678901234567890, "emoji": "😀",
          "ctl": "a\tb\n\u0001\"\\\/", "big": 1e16, "Z": "upper", "ä": "non-ascii-key"},
        "nonce": "abababababababababababababababababababababababababababababababab",
        "message_type": "DISCOVERY_REPORT", "message_id": "msg-fedcba987654", "correlation_id": "msg-0123456789ab",
        "signature": "cbd1baca82b3b74371e80eaa80a227b48ad64460eef66b68d3c684ae84c61fae", "signature_algorithm": "HMAC-SHA256" }"#;
    let env = Envelope::from_slice(sloppy.as_bytes()).expect("envelope");
    assert_eq!(
        String::from_utf8(env.canonical_signing_bytes()).expect("ascii"),
        V2_CANONICAL
    );
    let ring = network_ring();
    let now = Utc
        .with_ymd_and_hms(2026, 3, 1, 12, 4, 0)
        .single()
        .expect("valid");
    assert!(verifier().verify(&env, hmac_only(&ring), None, now).is_ok());
}

fn fresh(now: DateTime<Utc>) -> Envelope {
    let mut p = Map::new();
    p.insert("status".into(), "ok".into());
    Envelope::new(
        MessageType::Heartbeat,
        "regional_cntl_zone-A_1",
        "global_cntl_1",
        p,
        now,
    )
}

fn signed(ring: &KeyRing, now: DateTime<Utc>) -> Envelope {
    let mut e = fresh(now);
    sign_with_ring(&mut e, ring, now).expect("key");
    e
}

#[test]
fn sign_sets_fields_like_the_original() {
    let ring = network_ring();
    let e = signed(&ring, t0());
    assert!(crate::ids::is_hex64(e.nonce.as_deref().unwrap_or_default()));
    assert_eq!(e.signed_at.as_deref(), Some("2026-03-01T12:00:00+00:00"));
    assert_eq!(e.signature.as_deref().map(str::len), Some(64));
    assert_eq!(e.signature_algorithm.as_deref(), Some(HMAC_SHA256));
    assert_eq!(e.key_id, None, "the network key is not named on the wire");
}

#[test]
fn every_reason_string() {
    let ring = network_ring();
    let now = t0();
    let v = verifier();
    let check = |e: &Envelope, expected: Option<&str>| {
        v.verify(e, hmac_only(&ring), expected, now)
            .map_err(|e| e.to_string())
    };
    let good = signed(&ring, now);

    for (field, strip) in [
        (
            "signature",
            (|e: &mut Envelope| e.signature = None) as fn(&mut Envelope),
        ),
        ("nonce", |e| e.nonce = None),
        ("signed_at", |e| e.signed_at = None),
        ("sender_id", |e| e.sender_id.clear()),
    ] {
        let mut e = good.clone();
        strip(&mut e);
        assert_eq!(
            check(&e, None),
            Err(format!("Missing required field: {field}"))
        );
    }
    assert_eq!(
        check(&good, Some("global_cntl_1")),
        Err("Sender mismatch: expected global_cntl_1, got regional_cntl_zone-A_1".into())
    );
    let mut e = good.clone();
    e.signature_algorithm = Some("HMAC-MD5".into());
    assert_eq!(
        check(&e, None),
        Err("Unsupported signature algorithm".into())
    );
    let mut e = good.clone();
    e.signature_algorithm = Some(ED25519.into());
    assert_eq!(
        check(&e, None),
        Err("Unsupported signature algorithm".into()),
        "no Ed25519 key for this sender"
    );

    let mut e = good.clone();
    e.signed_at = Some("not a time".into());
    let r = check(&e, None).expect_err("bad time");
    assert!(r.starts_with("Invalid timestamp format: "), "{r}");

    for (offset, text) in [(-301, "301"), (301, "301"), (-600, "600")] {
        let mut e = fresh(now);
        sign_with_ring(&mut e, &ring, now + Duration::seconds(offset)).expect("key");
        assert_eq!(
            check(&e, None),
            Err(format!(
                "Message too old or future-dated: {text}s (max 300s)"
            ))
        );
    }
    // 300 s exactly is still inside the window.
    let mut e = fresh(now);
    sign_with_ring(&mut e, &ring, now - Duration::seconds(300)).expect("key");
    assert!(check(&e, None).is_ok());

    let mut e = good.clone();
    e.nonce = Some("n".repeat(129));
    assert_eq!(
        check(&e, None),
        Err("Invalid nonce: must be 1 to 128 characters".into())
    );

    let mut e = good.clone();
    e.payload.insert("status".into(), "tampered".into());
    assert_eq!(
        check(&e, None),
        Err("Invalid signature: message may have been tampered with".into())
    );
    let mut e = good.clone();
    e.sender_id = "regional_cntl_zone-A_2".into();
    assert_eq!(
        check(&e, None),
        Err("Invalid signature: message may have been tampered with".into())
    );
    let mut e = good.clone();
    e.extra.insert("x-added".into(), true.into());
    assert_eq!(
        check(&e, None),
        Err("Invalid signature: message may have been tampered with".into()),
        "extra keys are covered"
    );
    let mut e = good.clone();
    e.signature = Some("zz".into());
    assert_eq!(
        check(&e, None),
        Err("Invalid signature: message may have been tampered with".into())
    );

    assert_eq!(
        check(&good, None),
        Ok(Verified {
            algorithm: HMAC_SHA256,
            key_id: None
        })
    );
    assert_eq!(
        check(&good, None),
        Err("Replay attack detected: nonce already seen".into())
    );
}

#[test]
fn failed_verification_does_not_burn_the_nonce() {
    let ring = network_ring();
    let v = verifier();
    let good = signed(&ring, t0());
    let mut tampered = good.clone();
    tampered.payload.insert("x".into(), 1i64.into());
    assert_eq!(
        v.verify(&tampered, hmac_only(&ring), None, t0()),
        Err(VerifyError::BadSignature)
    );
    assert!(
        v.verify(&good, hmac_only(&ring), None, t0()).is_ok(),
        "the genuine message still passes"
    );
}

#[test]
fn replay_inside_and_after_the_window() {
    let ring = network_ring();
    let v = verifier();
    let e = signed(&ring, t0());
    assert!(v.verify(&e, hmac_only(&ring), None, t0()).is_ok());
    assert_eq!(
        v.verify(&e, hmac_only(&ring), None, t0() + Duration::seconds(299)),
        Err(VerifyError::Replay)
    );
    // After the window the freshness check refuses it, even once the nonce is purged.
    let later = t0() + Duration::seconds(301);
    assert!(matches!(
        v.verify(&e, hmac_only(&ring), None, later),
        Err(VerifyError::Stale { .. })
    ));
    v.store().purge_expired(later).expect("purge");
    assert_eq!(v.store().len(), Ok(0));
    assert!(matches!(
        v.verify(&e, hmac_only(&ring), None, later),
        Err(VerifyError::Stale { .. })
    ));
}

#[test]
fn future_dated_nonce_is_kept_until_its_own_window_ends() {
    let ring = network_ring();
    let v = verifier();
    let mut e = fresh(t0());
    sign_with_ring(&mut e, &ring, t0() + Duration::seconds(250)).expect("key");
    assert!(v.verify(&e, hmac_only(&ring), None, t0()).is_ok());
    // 500 s later it is still fresh (signed_at + 300 > now), so the nonce must still be known.
    let t = t0() + Duration::seconds(500);
    v.store().purge_expired(t).expect("purge");
    assert_eq!(
        v.verify(&e, hmac_only(&ring), None, t),
        Err(VerifyError::Replay)
    );
}

#[test]
fn full_cache_rejects_instead_of_forgetting() {
    let ring = network_ring();
    let v = Verifier::new(MemoryNonceStore::new()).with_capacity(3);
    for _ in 0..3 {
        assert!(
            v.verify(&signed(&ring, t0()), hmac_only(&ring), None, t0())
                .is_ok()
        );
    }
    let e = signed(&ring, t0());
    let err = v
        .verify(&e, hmac_only(&ring), None, t0())
        .expect_err("full");
    assert_eq!(err, VerifyError::ReplayCacheFull);
    assert!(err.is_internal());
    // Once the earlier nonces expire there is room again.
    let later = t0() + Duration::seconds(301);
    let e = signed(&ring, later);
    assert!(v.verify(&e, hmac_only(&ring), None, later).is_ok());
}

#[test]
fn rotation_with_grace() {
    let t = t0();
    let mut ring = KeyRing::new(Duration::minutes(10));
    ring.add(
        Some("key_a_b".into()),
        HmacKey::from_bytes(&[1; 32]).expect("key"),
        t,
    );
    let old_msg = signed(&ring, t);
    assert_eq!(old_msg.key_id.as_deref(), Some("key_a_b"));
    ring.add(
        Some("key_a_b.2".into()),
        HmacKey::from_bytes(&[2; 32]).expect("key"),
        t,
    );
    let new_msg = signed(&ring, t);
    assert_eq!(new_msg.key_id.as_deref(), Some("key_a_b.2"));
    let v = verifier();
    // Both verify during the grace period, and the verifier reports which key matched.
    assert_eq!(
        v.verify(&new_msg, hmac_only(&ring), None, t)
            .map(|x| x.key_id),
        Ok(Some("key_a_b.2".into()))
    );
    assert_eq!(
        v.verify(&old_msg, hmac_only(&ring), None, t)
            .map(|x| x.key_id),
        Ok(Some("key_a_b".into()))
    );
    // After the grace period the old key no longer verifies.
    let after = t + Duration::minutes(10) + Duration::seconds(1);
    let mut old_again = fresh(after);
    sign_hmac(
        &mut old_again,
        &HmacKey::from_bytes(&[1; 32]).expect("key"),
        Some("key_a_b"),
        after,
    );
    assert_eq!(
        v.verify(&old_again, hmac_only(&ring), None, after),
        Err(VerifyError::UnknownKeyId)
    );
    let mut unnamed_old = fresh(after);
    sign_hmac(
        &mut unnamed_old,
        &HmacKey::from_bytes(&[1; 32]).expect("key"),
        None,
        after,
    );
    assert_eq!(
        v.verify(&unnamed_old, hmac_only(&ring), None, after),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn wrong_key() {
    let ring = network_ring();
    let other = KeyRing::single(
        None,
        HmacKey::from_secret_text("another-secret-entirely"),
        t0(),
    );
    let e = signed(&other, t0());
    assert_eq!(
        verifier().verify(&e, hmac_only(&ring), None, t0()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn ed25519_envelopes() {
    let id = IdentityKey::generate();
    let pk = id.public();
    let mut e = fresh(t0());
    sign_ed25519(&mut e, &id, None, t0());
    assert_eq!(e.signature_algorithm.as_deref(), Some(ED25519));
    assert_eq!(e.signature.as_deref().map(str::len), Some(128));
    let keys = VerifyKeys {
        hmac: None,
        ed25519: Some(&pk),
    };
    let v = verifier();
    assert_eq!(
        v.verify(&e, keys, None, t0()).map(|x| x.algorithm),
        Ok(ED25519)
    );
    assert_eq!(v.verify(&e, keys, None, t0()), Err(VerifyError::Replay));
    let mut t = e.clone();
    t.nonce = Some(crate::ids::nonce_hex());
    assert_eq!(
        v.verify(&t, keys, None, t0()),
        Err(VerifyError::BadSignature)
    );
    let other = IdentityKey::generate().public();
    let mut e2 = fresh(t0());
    sign_ed25519(&mut e2, &id, None, t0());
    assert_eq!(
        v.verify(
            &e2,
            VerifyKeys {
                hmac: None,
                ed25519: Some(&other)
            },
            None,
            t0()
        ),
        Err(VerifyError::BadSignature)
    );
    // An HMAC-signed message is not accepted where only an Ed25519 key is known.
    let ring = network_ring();
    assert_eq!(
        v.verify(&signed(&ring, t0()), keys, None, t0()),
        Err(VerifyError::UnsupportedAlgorithm)
    );
}

#[test]
fn concurrent_copies_are_accepted_once() {
    let ring = Arc::new(network_ring());
    let v = Arc::new(verifier());
    let e = Arc::new(signed(&ring, t0()));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (ring, v, e) = (ring.clone(), v.clone(), e.clone());
            std::thread::spawn(move || v.verify(&e, hmac_only(&ring), None, t0()).is_ok())
        })
        .collect();
    let accepted = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .filter(|ok| *ok)
        .count();
    assert_eq!(accepted, 1, "exactly one copy wins");
}

#[test]
fn authenticate_checks_the_signature_but_not_age_or_reuse() {
    let ring = network_ring();
    let e = signed(&ring, t0());
    let much_later = t0() + chrono::Duration::days(30);
    // Old and used twice: still authentic.
    authenticate(&e, hmac_only(&ring), None, much_later).expect("authentic");
    authenticate(&e, hmac_only(&ring), None, much_later).expect("again");
    // ...while the full check refuses it as stale.
    assert!(matches!(
        verifier().verify(&e, hmac_only(&ring), None, much_later),
        Err(VerifyError::Stale { .. })
    ));
    // Tampering, a wrong sender and a missing signature are still caught.
    let mut t = e.clone();
    t.payload.insert("status".into(), "forged".into());
    assert_eq!(
        authenticate(&t, hmac_only(&ring), None, much_later),
        Err(VerifyError::BadSignature)
    );
    assert!(matches!(
        authenticate(&e, hmac_only(&ring), Some("someone_else"), much_later),
        Err(VerifyError::SenderMismatch { .. })
    ));
    let mut u = e.clone();
    u.signature = None;
    assert_eq!(
        authenticate(&u, hmac_only(&ring), None, much_later),
        Err(VerifyError::MissingField("signature"))
    );
    // Ed25519 too.
    let id = crate::keys::IdentityKey::generate();
    let mut b = fresh(t0());
    sign_ed25519(&mut b, &id, None, t0());
    let pk = id.public();
    let keys = VerifyKeys {
        hmac: None,
        ed25519: Some(&pk),
    };
    authenticate(&b, keys, None, much_later).expect("ed25519");
    let other = crate::keys::IdentityKey::generate().public();
    assert_eq!(
        authenticate(
            &b,
            VerifyKeys {
                hmac: None,
                ed25519: Some(&other)
            },
            None,
            much_later
        ),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn an_uppercase_copy_of_a_valid_signature_is_refused() {
    let ring = network_ring();
    let e = signed(&ring, t0());
    let mut upper = e.clone();
    upper.signature = e.signature.as_deref().map(str::to_ascii_uppercase);
    assert_ne!(upper.signature, e.signature);
    assert_eq!(
        verifier().verify(&upper, hmac_only(&ring), None, t0()),
        Err(VerifyError::BadSignature)
    );
    assert!(verifier().verify(&e, hmac_only(&ring), None, t0()).is_ok());

    let id = IdentityKey::generate();
    let pk = id.public();
    let mut e = fresh(t0());
    sign_ed25519(&mut e, &id, None, t0());
    e.signature = e.signature.as_deref().map(str::to_ascii_uppercase);
    let keys = VerifyKeys {
        hmac: None,
        ed25519: Some(&pk),
    };
    assert_eq!(
        verifier().verify(&e, keys, None, t0()),
        Err(VerifyError::BadSignature)
    );
}
