//! Interoperability with code no one here wrote: the REST compatibility endpoints driven by
//! a client that signs with Python's own `json` and `hmac` (like the original PDSNO), and
//! the gRPC API called from Python through server reflection alone.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pdsno_shared::json::Value;
use pdsno_tests::{Lab, python_json_lines, python_with_grpc};

const SIGNING_SECRET: &str = "compat-shared-signing-secret";

fn by_case(lines: Vec<Value>) -> BTreeMap<String, Value> {
    lines
        .into_iter()
        .map(|v| {
            (
                v.get("case")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                v,
            )
        })
        .collect()
}

fn status(r: &BTreeMap<String, Value>, case: &str) -> i64 {
    r.get(case)
        .and_then(|v| v.get("status"))
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no case {case}"))
}

fn body<'a>(r: &'a BTreeMap<String, Value>, case: &str) -> &'a Value {
    r.get(case)
        .and_then(|v| v.get("body"))
        .unwrap_or_else(|| panic!("no case {case}"))
}

fn detail(r: &BTreeMap<String, Value>, case: &str) -> String {
    body(r, case)
        .get("detail")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn rest_compat_with_a_python_stdlib_client() {
    let lab = Lab::new();
    let gc = lab.global(&["--secret", SIGNING_SECRET, "--legacy-compat"]);
    let rest = gc.rest.to_string();
    let r = by_case(python_json_lines(
        &PathBuf::from("python3"),
        "rest_compat.py",
        &[&rest, SIGNING_SECRET, &lab.secret],
    ));

    assert_eq!(status(&r, "health"), 200);
    assert_eq!(
        body(&r, "health").get("status").and_then(Value::as_str),
        Some("healthy")
    );
    assert_eq!(
        body(&r, "health")
            .get("controller_id")
            .and_then(Value::as_str),
        Some("global_cntl_1")
    );
    assert_eq!(status(&r, "info"), 200);
    let handlers = body(&r, "info")
        .get("registered_handlers")
        .and_then(Value::as_array)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    assert!(
        handlers.contains(&Value::from("VALIDATION_REQUEST"))
            && handlers.contains(&Value::from("CHALLENGE_RESPONSE"))
    );
    assert_eq!(
        body(&r, "info").get("port").and_then(Value::as_i64),
        Some(i64::from(gc.rest.port()))
    );

    // The legacy handshake (non-ASCII and float payload fields included) reaches APPROVED,
    // and both replies verify with Python's HMAC.
    assert_eq!(status(&r, "validation_request"), 200);
    assert_eq!(
        body(&r, "validation_request")
            .get("message_type")
            .and_then(Value::as_str),
        Some("CHALLENGE")
    );
    assert_eq!(
        r["validation_request"].get("reply_verifies"),
        Some(&Value::Bool(true))
    );
    assert_eq!(status(&r, "challenge_response"), 200);
    let result = body(&r, "challenge_response");
    assert_eq!(
        result
            .get("payload")
            .and_then(|p| p.get("status"))
            .and_then(Value::as_str),
        Some("APPROVED")
    );
    assert_eq!(
        result
            .get("payload")
            .and_then(|p| p.get("assigned_id"))
            .and_then(Value::as_str),
        Some("regional_cntl_zone-A_1")
    );
    assert_eq!(
        r["challenge_response"].get("reply_verifies"),
        Some(&Value::Bool(true))
    );
    assert!(
        gc.proc.stderr().contains("legacy challenge answer"),
        "legacy use is logged as a warning"
    );

    assert_eq!(
        (status(&r, "replay"), detail(&r, "replay")),
        (
            401,
            "Invalid message signature: Replay attack detected: nonce already seen".into()
        )
    );
    assert_eq!(
        (status(&r, "unsigned"), detail(&r, "unsigned")),
        (401, "Message signature required but not present".into())
    );
    assert_eq!(
        (status(&r, "tampered"), detail(&r, "tampered")),
        (
            401,
            "Invalid message signature: Invalid signature: message may have been tampered with"
                .into()
        )
    );
    assert_eq!(
        (status(&r, "wrong_recipient"), detail(&r, "wrong_recipient")),
        (
            400,
            "Message recipient 'regional_cntl_zone-A_9' does not match controller 'global_cntl_1'"
                .into()
        )
    );
    assert_eq!(status(&r, "path_type_mismatch"), 400);
    assert!(detail(&r, "path_type_mismatch").contains("does not match the endpoint"));
    assert_eq!(status(&r, "malformed_json"), 400);
    assert!(
        detail(&r, "malformed_json").starts_with("Invalid message: invalid JSON"),
        "{}",
        detail(&r, "malformed_json")
    );
    assert_eq!(
        (status(&r, "not_an_envelope"), detail(&r, "not_an_envelope")),
        (400, "Invalid message: missing field `message_id`".into())
    );
    assert_eq!(status(&r, "invalid_utf8"), 400);
    assert_eq!(status(&r, "huge_body"), 413);
    assert_eq!(status(&r, "unknown_type"), 404);
    assert_eq!(status(&r, "unhandled_type"), 404);
    assert!(!gc.proc.stderr().contains("panicked"));
}

#[test]
fn grpc_api_is_callable_from_python_through_reflection() {
    let python = python_with_grpc();
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let grpc = gc.grpc.to_string();
    let lines = python_json_lines(&python, "grpc_reflection_client.py", &[&grpc, &lab.secret]);
    let find = |k: &str| {
        lines
            .iter()
            .find_map(|v| v.get(k).cloned())
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
    };
    let services = find("services");
    for s in [
        "pdsno.v1.Admission",
        "pdsno.v1.Messaging",
        "pdsno.v1.Node",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services
                .as_array()
                .is_some_and(|a| a.contains(&Value::from(s))),
            "{s} not discoverable: {services:?}"
        );
    }
    assert_eq!(
        find("health").get("status").and_then(Value::as_str),
        Some("SERVING")
    );
    assert_eq!(
        find("info").get("controllerId").and_then(Value::as_str),
        Some("global_cntl_1")
    );
    // A request built and signed in Python, from the reflected schema, gets a challenge.
    let step = find("step");
    let challenge = step
        .get("challenge")
        .unwrap_or_else(|| panic!("expected a challenge: {step:?}"));
    assert!(
        challenge
            .get("challengeId")
            .and_then(Value::as_str)
            .is_some_and(|c| c.starts_with("challenge-"))
    );
    assert_eq!(
        challenge.get("nonce").and_then(Value::as_str).map(str::len),
        Some(64)
    );
    assert_eq!(
        find("tampered").as_str(),
        Some("StatusCode.UNAUTHENTICATED")
    );
}
