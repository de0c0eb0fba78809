//! Arbitrary bytes into the typed payload decoders a parent runs on an unadmitted child's
//! messages (VALIDATION_REQUEST, CHALLENGE_RESPONSE) and a child runs on its parent's
//! (CHALLENGE, VALIDATION_RESULT with its certificate and delegation credential), plus the
//! bootstrap-token and controller-id helpers those decoders feed. Discovery and policy
//! payloads share the same serde bridge and ride along.
//!
//! Nothing may panic. A payload that decodes encodes to a JSON object that decodes to an
//! equal payload and encodes to identical canonical bytes; a credential signed with a
//! fixed key never fails on its signature.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use pdsno_fuzz::{BOOTSTRAP_SECRET, assert_canonical_fixed_point, identity, now};
use pdsno_shared::bootstrap::{admission_key, bootstrap_token, legacy_signed_nonce, token_matches};
use pdsno_shared::ids::{self, ControllerId, Role};
use pdsno_shared::json::{self, Value};
use pdsno_shared::payload::admission::{
    Certificate, Challenge, ChallengeResponse, CredentialError, DelegationCredential, Metadata,
    ValidationRequest, ValidationResult,
};
use pdsno_shared::payload::discovery::{
    DiscoveryReport, DiscoveryReportAck, DiscoveryRequest, DiscoverySummary,
};
use pdsno_shared::payload::policy::{PolicyAck, PolicyUpdate};
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = json::parse(data) else {
        return;
    };
    if let Some(r) = round_trip::<ValidationRequest>(&v) {
        bootstrap_checks(&r);
    }
    round_trip::<Metadata>(&v);
    round_trip::<Challenge>(&v);
    round_trip::<ChallengeResponse>(&v);
    if let Some(r) = round_trip::<ValidationResult>(&v) {
        if let Some(c) = r.certificate {
            credential_checks_cert(c);
        }
        if let Some(d) = r.delegation_credential
            && let Some(d) = round_trip::<DelegationCredential>(&d)
        {
            credential_checks_delegation(d);
        }
    }
    if let Some(c) = round_trip::<Certificate>(&v) {
        credential_checks_cert(c);
    }
    if let Some(d) = round_trip::<DelegationCredential>(&v) {
        credential_checks_delegation(d);
    }
    round_trip::<DiscoveryRequest>(&v);
    round_trip::<DiscoveryReport>(&v);
    round_trip::<DiscoveryReportAck>(&v);
    round_trip::<DiscoverySummary>(&v);
    round_trip::<PolicyUpdate>(&v);
    round_trip::<PolicyAck>(&v);
});

/// Decodes `v` as `T`; when that works, checks the typed round trip and returns the value.
fn round_trip<T>(v: &Value) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let t: T = json::from_value(v.clone()).ok()?;
    let w = match json::to_value(&t) {
        Ok(w) => w,
        Err(e) => panic!("decoded payload does not encode: {e}\n{t:?}"),
    };
    assert!(w.as_object().is_some(), "payload encodes to {}", w.kind());
    let bytes = assert_canonical_fixed_point(&w);
    let again: T = match json::from_value(w.clone()) {
        Ok(x) => x,
        Err(e) => panic!("encoded payload does not decode: {e}\n{w}"),
    };
    assert_eq!(again, t, "decode(encode(p)) != p");
    let w2 = json::to_value(&again).unwrap_or_default();
    assert_eq!(
        json::to_canonical_bytes(&w2),
        bytes,
        "payload encoding unstable"
    );
    Some(t)
}

fn bootstrap_checks(r: &ValidationRequest) {
    let expected = bootstrap_token(
        BOOTSTRAP_SECRET.as_bytes(),
        &r.temp_id,
        &r.region,
        &r.controller_type,
    );
    assert!(ids::is_hex64(&expected));
    assert_eq!(
        token_matches(&expected, &r.bootstrap_token),
        expected == r.bootstrap_token
    );
    assert_eq!(
        admission_key(&r.bootstrap_token),
        admission_key(&r.bootstrap_token)
    );
    let _ = legacy_signed_nonce(r.bootstrap_token.as_bytes());
    if let Some(role) = Role::parse(&r.controller_type) {
        assert_eq!(role.as_str(), r.controller_type);
    }
    let _ = ids::is_valid_region(&r.region);
    for id in [&r.temp_id, &r.metadata.hostname] {
        let _ = ids::is_valid_controller_id(id);
        if let Some(c) = ControllerId::parse(id)
            && let Some(region) = &c.region
        {
            assert_eq!(&ControllerId::assigned(c.role, region, c.seq), id);
        }
    }
}

fn credential_checks_cert(mut c: Certificate) {
    let key = identity();
    let _ = c.verify(&key.public(), now());
    match c.sign(&key) {
        Ok(()) => assert_ne!(
            c.verify(&key.public(), now()),
            Err(CredentialError::BadSignature)
        ),
        Err(e) => panic!("a decoded certificate cannot be signed: {e}"),
    }
}

fn credential_checks_delegation(mut d: DelegationCredential) {
    let key = identity();
    let _ = d.verify(&key.public(), now());
    match d.sign(&key) {
        Ok(()) => assert_ne!(
            d.verify(&key.public(), now()),
            Err(CredentialError::BadSignature)
        ),
        Err(e) => panic!("a decoded credential cannot be signed: {e}"),
    }
}
