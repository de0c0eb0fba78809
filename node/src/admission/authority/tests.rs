use chrono::TimeZone;
use pdsno_shared::envelope::MessageType;
use pdsno_shared::keys::base64_encode;
use pdsno_shared::time::ManualClock;

use super::*;
use pdsno_shared::bootstrap::bootstrap_token;

const SECRET: &str = "test-bootstrap-secret";

struct Fixture {
    auth: Authority,
    clock: ManualClock,
    nib: Arc<Nib>,
    gc: Arc<IdentityKey>,
    _dir: tempfile::TempDir,
}

fn fixture(cfg: impl FnOnce(&mut AuthorityConfig)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let nib = Arc::new(Nib::open(dir.path().join("nib.db")).expect("nib"));
    let clock = ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .single()
            .expect("time"),
    );
    let mut c = AuthorityConfig::new(vec![Role::Regional], SecretString::new(SECRET));
    c.regions = vec!["zone-A".into(), "zone-B".into()];
    cfg(&mut c);
    let gc = Arc::new(IdentityKey::generate());
    let auth = Authority::new(
        "global_cntl_1".into(),
        c,
        gc.clone(),
        nib.clone(),
        Arc::new(clock.clone()),
        None,
    );
    Fixture {
        auth,
        clock,
        nib,
        gc,
        _dir: dir,
    }
}

struct Child {
    temp_id: String,
    key: IdentityKey,
    region: String,
    kind: String,
}

impl Child {
    fn new(temp_id: &str, region: &str, kind: &str) -> Self {
        Child {
            temp_id: temp_id.into(),
            key: IdentityKey::generate(),
            region: region.into(),
            kind: kind.into(),
        }
    }

    fn token(&self) -> String {
        bootstrap_token(SECRET.as_bytes(), &self.temp_id, &self.region, &self.kind)
    }

    fn request(&self, f: &Fixture, token: Option<&str>) -> Envelope {
        let mut p = Map::new();
        p.insert("temp_id".into(), self.temp_id.clone().into());
        p.insert("controller_type".into(), self.kind.clone().into());
        p.insert("region".into(), self.region.clone().into());
        p.insert("public_key".into(), self.key.public().to_base64().into());
        p.insert(
            "bootstrap_token".into(),
            token.map_or_else(|| self.token(), str::to_owned).into(),
        );
        Envelope::new(
            MessageType::ValidationRequest,
            self.temp_id.clone(),
            "global_cntl_1",
            p,
            f.clock.now(),
        )
    }

    fn respond(&self, f: &Fixture, challenge: &Map) -> Envelope {
        let nonce = hex::decode(challenge["nonce"].as_str().unwrap_or_default()).expect("hex");
        let mut p = Map::new();
        p.insert("challenge_id".into(), challenge["challenge_id"].clone());
        p.insert("temp_id".into(), self.temp_id.clone().into());
        p.insert(
            "signed_nonce".into(),
            base64_encode(&self.key.sign(&nonce)).into(),
        );
        Envelope::new(
            MessageType::ChallengeResponse,
            self.temp_id.clone(),
            "global_cntl_1",
            p,
            f.clock.now(),
        )
    }
}

fn challenge(f: &Fixture, env: &Envelope) -> Map {
    match f.auth.on_request(env).expect("evaluated") {
        RequestOutcome::Challenge(m) => m,
        RequestOutcome::Refused(m) => panic!("refused: {m:?}"),
    }
}

fn refusal(f: &Fixture, env: &Envelope) -> String {
    match f.auth.on_request(env).expect("evaluated") {
        RequestOutcome::Refused(m) => m["reason"].as_str().unwrap_or_default().to_owned(),
        RequestOutcome::Challenge(_) => panic!("challenged"),
    }
}

fn result_reason(m: &Map) -> (&str, &str) {
    (
        m["status"].as_str().unwrap_or_default(),
        m.get("reason").and_then(Value::as_str).unwrap_or(""),
    )
}

#[test]
fn full_admission_issues_a_verifiable_certificate_and_delegation() {
    let f = fixture(|_| {});
    let child = Child::new("temp-rc-zone-a-001", "zone-A", "regional");
    let ch = challenge(&f, &child.request(&f, None));
    assert_eq!(ch["nonce"].as_str().map(str::len), Some(64));
    assert_eq!(ch["expires_at"].as_str(), Some("2026-03-01T12:00:30+00:00"));
    let result = f
        .auth
        .on_response(&child.respond(&f, &ch))
        .expect("evaluated");
    assert_eq!(result_reason(&result), ("APPROVED", ""));
    assert_eq!(
        result["assigned_id"].as_str(),
        Some("regional_cntl_zone-A_1")
    );
    let cert: Certificate = json::from_value(result["certificate"].clone()).expect("certificate");
    assert_eq!(cert.verify(&f.gc.public(), f.clock.now()), Ok(()));
    assert_eq!(cert.public_key, child.key.public().to_base64());
    let deleg: DelegationCredential =
        json::from_value(result["delegation_credential"].clone()).expect("delegation");
    assert_eq!(deleg.verify(&f.gc.public(), f.clock.now()), Ok(()));
    assert_eq!(
        (deleg.delegatee_id.as_str(), deleg.region.as_str()),
        ("regional_cntl_zone-A_1", "zone-A")
    );
    assert_eq!(
        result["root_public_key"].as_str(),
        Some(f.gc.public().to_base64().as_str())
    );
    // The challenge is single use.
    let again = f
        .auth
        .on_response(&child.respond(&f, &ch))
        .expect("evaluated");
    assert_eq!(
        result_reason(&again),
        ("REJECTED", reason::UNKNOWN_CHALLENGE)
    );
    // The token is consumed: another key presenting it is refused.
    let thief = Child {
        key: IdentityKey::generate(),
        ..Child::new(&child.temp_id, "zone-A", "regional")
    };
    assert_eq!(
        refusal(&f, &thief.request(&f, Some(&child.token()))),
        reason::BOOTSTRAP_TOKEN_ALREADY_USED
    );
    // The child itself, having lost the answer, gets the same admission again after
    // proving its key once more: same id, same certificate, nothing new assigned.
    let ch2 = challenge(&f, &child.request(&f, None));
    let again = f
        .auth
        .on_response(&child.respond(&f, &ch2))
        .expect("evaluated");
    assert_eq!(result_reason(&again), ("APPROVED", ""));
    assert_eq!(again["assigned_id"], result["assigned_id"]);
    assert_eq!(again["certificate"], result["certificate"]);
    let deleg: DelegationCredential =
        json::from_value(again["delegation_credential"].clone()).expect("delegation");
    assert_eq!(deleg.verify(&f.gc.public(), f.clock.now()), Ok(()));
    assert_eq!(f.nib.controllers().expect("rows").len(), 1);
    // Not once it is revoked.
    let id = result["assigned_id"].as_str().unwrap_or_default();
    let row = f.nib.controller(id).expect("db").expect("row");
    f.nib
        .set_controller_status(id, "revoked", row.version)
        .expect("db")
        .expect("no conflict");
    assert_eq!(
        refusal(&f, &child.request(&f, None)),
        reason::BOOTSTRAP_TOKEN_ALREADY_USED
    );
}

#[test]
fn request_stage_reject_reasons() {
    let f = fixture(|c| c.blocklist = vec!["temp-blocked".into()]);
    let child = Child::new("temp-rc-1", "zone-A", "regional");
    let mut old = child.request(&f, None);
    old.timestamp = format_iso(f.clock.now() - Duration::seconds(301));
    assert_eq!(refusal(&f, &old), reason::STALE_TIMESTAMP);
    let mut future = child.request(&f, None);
    future.timestamp = format_iso(f.clock.now() + Duration::seconds(31));
    assert_eq!(refusal(&f, &future), reason::FUTURE_TIMESTAMP);
    let mut slightly_ahead = child.request(&f, None);
    slightly_ahead.timestamp = format_iso(f.clock.now() + Duration::seconds(29));
    challenge(&f, &slightly_ahead);
    let blocked = Child::new("temp-blocked", "zone-A", "regional");
    assert_eq!(refusal(&f, &blocked.request(&f, None)), reason::BLOCKLISTED);
    f.nib
        .block(&child.key.public().to_base64(), "revoked", f.clock.now())
        .expect("block");
    assert_eq!(refusal(&f, &child.request(&f, None)), reason::BLOCKLISTED);
    let other = Child::new("temp-rc-2", "zone-A", "regional");
    assert_eq!(
        refusal(&f, &other.request(&f, Some(&"0".repeat(64)))),
        reason::INVALID_BOOTSTRAP_TOKEN
    );
    // A token minted for another region does not transfer.
    let token_b = bootstrap_token(SECRET.as_bytes(), "temp-rc-2", "zone-B", "regional");
    assert_eq!(
        refusal(&f, &other.request(&f, Some(&token_b))),
        reason::INVALID_BOOTSTRAP_TOKEN
    );
    let mut spoofed = other.request(&f, None);
    spoofed.sender_id = "someone-else".into();
    assert_eq!(refusal(&f, &spoofed), reason::TEMP_ID_MISMATCH);
    let mut no_fields = other.request(&f, None);
    no_fields.payload.remove("bootstrap_token");
    assert!(matches!(
        f.auth.on_request(&no_fields),
        Err(AdmissionError::BadPayload { .. })
    ));
}

#[test]
fn response_stage_reject_reasons() {
    let f = fixture(|c| c.quota_per_region = 1);
    let run = |child: &Child, tamper: &dyn Fn(&mut Envelope)| {
        let ch = challenge(&f, &child.request(&f, None));
        let mut resp = child.respond(&f, &ch);
        tamper(&mut resp);
        let r = f.auth.on_response(&resp).expect("evaluated");
        result_reason(&r).1.to_owned()
    };
    let c = Child::new("t-unknown", "zone-A", "regional");
    assert_eq!(
        run(&c, &|e| {
            e.payload
                .insert("challenge_id".into(), "challenge-000000000000".into());
        }),
        reason::UNKNOWN_CHALLENGE
    );
    let c = Child::new("t-mismatch", "zone-A", "regional");
    assert_eq!(
        run(&c, &|e| {
            e.payload.insert("temp_id".into(), "t-other".into());
        }),
        reason::TEMP_ID_MISMATCH
    );
    let c = Child::new("t-badsig", "zone-A", "regional");
    let stranger = IdentityKey::generate();
    assert_eq!(
        run(&c, &|e| {
            e.payload.insert(
                "signed_nonce".into(),
                base64_encode(&stranger.sign(&[0u8; 32])).into(),
            );
        }),
        reason::INVALID_SIGNATURE
    );
    let c = Child::new("t-local", "zone-A", "local");
    assert_eq!(run(&c, &|_| {}), reason::CONTROLLER_TYPE_NOT_PERMITTED);
    let c = Child::new("t-region", "zone-Q", "regional");
    assert_eq!(run(&c, &|_| {}), reason::INVALID_REGION);
    let c = Child::new("t-ok", "zone-A", "regional");
    assert_eq!(run(&c, &|_| {}), "");
    let c = Child::new("t-second", "zone-A", "regional");
    assert_eq!(run(&c, &|_| {}), reason::REGION_ALREADY_SERVED);
    // Expiry: 30 s later the challenge is gone.
    let c = Child::new("t-late", "zone-B", "regional");
    let ch = challenge(&f, &c.request(&f, None));
    f.clock.advance(Duration::seconds(31));
    let resp = c.respond(&f, &ch);
    let r = f.auth.on_response(&resp).expect("evaluated");
    assert_eq!(result_reason(&r), ("REJECTED", reason::CHALLENGE_EXPIRED));
    // Every refusal was audited.
    let events = f.nib.events(0, 100).expect("events");
    assert!(
        events
            .iter()
            .filter(|e| e.event_type == "VALIDATION_REJECTED")
            .count()
            >= 7
    );
}

#[test]
fn regional_parent_enforces_its_region_and_legacy_is_opt_in() {
    let f = fixture(|c| {
        c.permitted = vec![Role::Local];
        c.regions = vec![];
        c.served_region = Some("zone-A".into());
    });
    let lc = Child::new("temp-lc-b", "zone-B", "local");
    let ch = challenge(&f, &lc.request(&f, None));
    let r = f.auth.on_response(&lc.respond(&f, &ch)).expect("evaluated");
    assert_eq!(result_reason(&r), ("REJECTED", reason::REGION_MISMATCH));
    // The original's challenge answer is refused unless legacy compatibility is on.
    let lc = Child::new("temp-lc-legacy", "zone-A", "local");
    let ch = challenge(&f, &lc.request(&f, None));
    let mut resp = lc.respond(&f, &ch);
    let nonce = hex::decode(ch["nonce"].as_str().unwrap_or_default()).expect("hex");
    resp.payload
        .insert("signed_nonce".into(), legacy_signed_nonce(&nonce).into());
    let r = f.auth.on_response(&resp).expect("evaluated");
    assert_eq!(result_reason(&r), ("REJECTED", reason::INVALID_SIGNATURE));

    let f = fixture(|c| c.legacy_compat = true);
    let rc = Child::new("temp-rc-legacy", "zone-A", "regional");
    let mut req = rc.request(&f, None);
    req.payload
        .insert("public_key".into(), "ed25519-pubkey-placeholder".into());
    let ch = challenge(&f, &req);
    let mut resp = rc.respond(&f, &ch);
    let nonce = hex::decode(ch["nonce"].as_str().unwrap_or_default()).expect("hex");
    resp.payload
        .insert("signed_nonce".into(), legacy_signed_nonce(&nonce).into());
    let r = f.auth.on_response(&resp).expect("evaluated");
    assert_eq!(result_reason(&r), ("APPROVED", ""));
    // The same spent token and "key" again: a legacy answer proves no key, so the stored
    // admission is not handed out a second time.
    let ch = challenge(&f, &req);
    let mut resp = rc.respond(&f, &ch);
    let nonce = hex::decode(ch["nonce"].as_str().unwrap_or_default()).expect("hex");
    resp.payload
        .insert("signed_nonce".into(), legacy_signed_nonce(&nonce).into());
    let r = f.auth.on_response(&resp).expect("evaluated");
    assert_eq!(
        result_reason(&r),
        ("REJECTED", reason::BOOTSTRAP_TOKEN_ALREADY_USED)
    );
}

#[test]
fn admission_keys_follow_the_token_and_the_challenge() {
    let f = fixture(|_| {});
    let child = Child::new("temp-rc-k", "zone-A", "regional");
    let req = child.request(&f, None);
    let k = f.auth.admission_key_for(&req).expect("key from token");
    assert_eq!(k, admission_key(&child.token()));
    let ch = challenge(&f, &req);
    let resp = child.respond(&f, &ch);
    assert_eq!(f.auth.admission_key_for(&resp), Some(k));
    let mut unknown = resp.clone();
    unknown
        .payload
        .insert("challenge_id".into(), "challenge-ffffffffffff".into());
    assert_eq!(f.auth.admission_key_for(&unknown), None);
}

#[test]
fn pending_challenges_are_bounded() {
    let f = fixture(|c| c.max_pending = 3);
    for i in 0..3 {
        let c = Child::new(&format!("temp-{i}"), "zone-A", "regional");
        challenge(&f, &c.request(&f, None));
    }
    let c = Child::new("temp-x", "zone-A", "regional");
    assert_eq!(
        f.auth.on_request(&c.request(&f, None)).err(),
        Some(AdmissionError::Busy)
    );
    f.clock.advance(Duration::seconds(31));
    challenge(&f, &c.request(&f, None));
    assert_eq!(f.auth.pending_challenges(), 1);
}
