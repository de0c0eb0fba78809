//! `pdsno sign` / `pdsno verify` as an operator uses them: a real process, stdin, exit codes.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_pdsno");
const SECRET: &str = "pdsno-message-signing-secret-change-in-production";
const KEY_HEX: &str = "62ffc28aa8f61524f2f88a23c4927f87c0057dc8f66b5c1b85be7e00d61831ad";

const V1_SIGNED: &str = r#"{"correlation_id":null,"message_id":"msg-0123456789ab","message_type":"HEARTBEAT","nonce":"0000000000000000000000000000000000000000000000000000000000000000","payload":{"n":1,"name":"\u00e9","status":"ok"},"recipient_id":"global_cntl_1","sender_id":"regional_cntl_zone-A_1","signed_at":"2026-03-01T12:00:00.500000+00:00","timestamp":"2026-03-01T12:00:00+00:00","signature":"16af0344ceb1a665392f2f574d34b6ea9b99c5aee6f31f3f6b18d8a58be50699","signature_algorithm":"HMAC-SHA256"}"#;

fn run(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    run_bytes(args, env, stdin.as_bytes())
}

fn run_bytes(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("PDSNO_MESSAGE_SIGNING_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn pdsno");
    // The process may exit before reading stdin (usage errors): a broken pipe is fine.
    if let Err(e) = child.stdin.take().expect("stdin").write_all(stdin) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().expect("pdsno ran")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

fn unsigned() -> String {
    let now = chrono::Utc::now().to_rfc3339();
    format!(
        r#"{{"message_id":"msg-000000000001","message_type":"DISCOVERY_REPORT","sender_id":"local_cntl_zone-A_1","recipient_id":"regional_cntl_zone-A_1","timestamp":"{now}","payload":{{"rtt_ms":1.0,"zone":"Zürich","big":123456789012345678901234567890}},"correlation_id":null,"x-extra":[1,2]}}"#
    )
}

#[test]
fn vector_v1_verifies_at_its_own_time_and_is_stale_now() {
    let o = run(
        &[
            "verify",
            "--key-hex",
            KEY_HEX,
            "--at",
            "2026-03-01T12:00:30Z",
        ],
        &[],
        V1_SIGNED,
    );
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(0), "OK".to_owned()),
        "{}",
        stderr(&o)
    );
    let o = run(
        &[
            "verify",
            "--key-hex",
            KEY_HEX,
            "--at",
            "2026-03-01T12:10:00Z",
        ],
        &[],
        V1_SIGNED,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "Message too old or future-dated: 600s (max 300s)"
    );
    let o = run(
        &[
            "verify",
            "--key-hex",
            KEY_HEX,
            "--at",
            "2026-03-01T12:00:30Z",
            "--expected-sender",
            "global_cntl_1",
        ],
        &[],
        V1_SIGNED,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "Sender mismatch: expected global_cntl_1, got regional_cntl_zone-A_1"
    );
}

#[test]
fn sign_then_verify_with_every_key_source() {
    let o = run(&["sign", "--secret", SECRET], &[], &unsigned());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("visible to other users"),
        "warns about secrets on the command line"
    );
    let signed = stdout(&o);
    assert!(
        signed.contains(r#""signature_algorithm":"HMAC-SHA256""#),
        "{signed}"
    );
    assert!(
        signed.contains(r#""x-extra":[1,2]"#) && signed.contains("123456789012345678901234567890")
    );

    // Environment variable (the original's convention): no warning.
    let o = run(
        &["verify"],
        &[("PDSNO_MESSAGE_SIGNING_SECRET", SECRET)],
        &signed,
    );
    assert_eq!((o.status.code(), stdout(&o)), (Some(0), "OK".to_owned()));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // Hex and file.
    let o = run(&["verify", "--key-hex", KEY_HEX], &[], &signed);
    assert_eq!(stdout(&o), "OK");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key.hex");
    std::fs::write(&key_file, format!("{KEY_HEX}\n")).expect("write key");
    let o = run(
        &["verify", "--key-file", key_file.to_str().expect("utf-8")],
        &[],
        &signed,
    );
    assert_eq!(stdout(&o), "OK");
    let raw_file = dir.path().join("key.bin");
    std::fs::write(&raw_file, hex::decode(KEY_HEX).expect("hex")).expect("write key");
    let o = run(
        &["verify", "--key-file", raw_file.to_str().expect("utf-8")],
        &[],
        &signed,
    );
    assert_eq!(stdout(&o), "OK");

    // Wrong key, tampering.
    let o = run(&["verify", "--secret", "another-secret"], &[], &signed);
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (
            Some(1),
            "Invalid signature: message may have been tampered with".to_owned()
        )
    );
    let tampered = signed.replace("Z\\u00fcrich", "Zurich");
    assert_ne!(tampered, signed);
    let o = run(&["verify", "--key-hex", KEY_HEX], &[], &tampered);
    assert_eq!(o.status.code(), Some(1));
    // Unsigned input.
    let o = run(&["verify", "--key-hex", KEY_HEX], &[], &unsigned());
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(1), "Missing required field: signature".to_owned())
    );
}

#[test]
fn key_id_round_trips() {
    let o = run(
        &["sign", "--key-hex", KEY_HEX, "--key-id", "key_a_b"],
        &[],
        &unsigned(),
    );
    let signed = stdout(&o);
    assert!(signed.contains(r#""key_id":"key_a_b""#));
    let o = run(
        &["verify", "--key-hex", KEY_HEX, "--key-id", "key_a_b"],
        &[],
        &signed,
    );
    assert_eq!(stdout(&o), "OK");
    let o = run(
        &["verify", "--key-hex", KEY_HEX, "--key-id", "key_other"],
        &[],
        &signed,
    );
    assert_eq!(stdout(&o), "Invalid signature: unknown or retired key_id");
}

#[test]
fn unusable_input_exits_2_with_a_clear_message() {
    let cases: &[(&[&str], &[u8], &str)] = &[
        (
            &["verify", "--key-hex", KEY_HEX],
            b"{not json",
            "invalid JSON at byte 1",
        ),
        (
            &["verify", "--key-hex", KEY_HEX],
            b"[1,2]",
            "must be a JSON object",
        ),
        (
            &["verify", "--key-hex", KEY_HEX],
            b"{\"message_id\":\"m\"}",
            "missing field `message_type`",
        ),
        (
            &["verify", "--key-hex", KEY_HEX],
            b"\"\x01\"",
            "invalid JSON",
        ),
        (
            &["verify", "--key-hex", KEY_HEX],
            b"{\"a\":\"\xff\"}",
            "not valid UTF-8",
        ),
        (
            &["sign", "--key-hex", "abcd"],
            b"{}",
            "key must be at least 32 bytes",
        ),
        (&["sign"], b"{}", "no key"),
        (&["verify"], b"{}", "no key"),
        (
            &["sign", "--key-hex", KEY_HEX, "--secret", "x"],
            b"{}",
            "only one of",
        ),
        (
            &["verify", "--key-hex", KEY_HEX, "--at", "tomorrow"],
            b"{}",
            "--at",
        ),
        (
            &["verify", "--public-key", "placeholder"],
            b"{}",
            "--public-key",
        ),
    ];
    for (args, input, want) in cases {
        let o = run_bytes(args, &[], input);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(want),
            "{args:?}: {:?} lacks {want:?}",
            stderr(&o)
        );
    }
}

#[test]
fn python_signed_envelope_verifies_and_ours_verifies_in_python() {
    let py_sign = r#"
import hashlib, hmac, json, secrets, sys
from datetime import datetime, timezone
key = hashlib.sha256(sys.argv[1].encode()).digest()
m = {"message_id": "msg-" + secrets.token_hex(6), "message_type": "HEARTBEAT", "sender_id": "regional_cntl_zone-A_1",
     "recipient_id": "global_cntl_1", "timestamp": datetime.now(timezone.utc).isoformat(),
     "payload": {"status": "ok", "ratio": 0.1 + 0.2, "name": "\u00e9\U0001F600"}, "correlation_id": None}
m["nonce"] = secrets.token_hex(32)
m["signed_at"] = datetime.now(timezone.utc).isoformat()
m["signature"] = hmac.new(key, json.dumps(m, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()
m["signature_algorithm"] = "HMAC-SHA256"
print(json.dumps(m))
"#;
    let o = Command::new("python3")
        .args(["-c", py_sign, SECRET])
        .output()
        .expect("python3");
    assert!(o.status.success());
    let py_signed = String::from_utf8(o.stdout).expect("utf-8");
    let v = run(
        &["verify", "--expected-sender", "regional_cntl_zone-A_1"],
        &[("PDSNO_MESSAGE_SIGNING_SECRET", SECRET)],
        &py_signed,
    );
    assert_eq!(
        (v.status.code(), stdout(&v)),
        (Some(0), "OK".to_owned()),
        "{}",
        stderr(&v)
    );

    let ours = stdout(&run(
        &["sign"],
        &[("PDSNO_MESSAGE_SIGNING_SECRET", SECRET)],
        &unsigned(),
    ));
    let py_verify = r#"
import hashlib, hmac, json, sys
key = hashlib.sha256(sys.argv[1].encode()).digest()
m = json.loads(sys.stdin.read())
c = {k: v for k, v in m.items() if k not in ("signature", "signature_algorithm")}
ok = hmac.compare_digest(hmac.new(key, json.dumps(c, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest(), m["signature"])
print("OK" if ok else "BAD")
"#;
    let mut child = Command::new("python3")
        .args(["-c", py_verify, SECRET])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ours.as_bytes())
        .expect("write");
    let o = child.wait_with_output().expect("ran");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");
}

#[test]
fn ed25519_envelopes_verify_with_a_public_key() {
    use pdsno_shared::envelope::{Envelope, MessageType};
    use pdsno_shared::keys::IdentityKey;
    let id = IdentityKey::generate();
    let now = chrono::Utc::now();
    let mut e = Envelope::new(
        MessageType::PolicyUpdate,
        "global_cntl_1",
        "broadcast",
        Default::default(),
        now,
    );
    pdsno_shared::signing::sign_ed25519(&mut e, &id, None, now);
    let o = run(
        &["verify", "--public-key", &id.public().to_base64()],
        &[],
        &e.to_json(),
    );
    assert_eq!(stdout(&o), "OK", "{}", stderr(&o));
    let other = IdentityKey::generate().public().to_base64();
    let o = run(&["verify", "--public-key", &other], &[], &e.to_json());
    assert_eq!(
        stdout(&o),
        "Invalid signature: message may have been tampered with"
    );
}
