//! Arbitrary HTTP requests into the REST router, in process: method, path, content type and
//! body from the input, a real receive path behind it (in-memory NIB, network key,
//! admission authority, a HEARTBEAT handler), on a single-threaded runtime.
//!
//! Input layout (text-friendly, so seeds are readable):
//! `METHOD SP PATH LF CONTENT-TYPE LF BODY`. Requests `http` itself refuses to build are
//! skipped: they never reach a server.
//!
//! Nothing may panic and no answer may be a 5xx: every bad input is the client's fault.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use libfuzzer_sys::fuzz_target;
use pdsno_fuzz::{BOOTSTRAP_SECRET, hmac_key, identity, now};
use pdsno_node::admission::{Authority, AuthorityConfig};
use pdsno_node::inbound::{HandlerReply, Inbound};
use pdsno_node::keys::PairKeys;
use pdsno_node::nib::Nib;
use pdsno_node::transport::rest;
use pdsno_node::trust::Trust;
use pdsno_shared::envelope::MessageType;
use pdsno_shared::ids::Role;
use pdsno_shared::keys::SecretString;
use pdsno_shared::time::{Clock, ManualClock};
use tower::ServiceExt;

/// The controller the requests are sent to.
const ME: &str = "global_cntl_1";

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: Router,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(build);

/// `PDSNO_FUZZ_VERBOSE=1` prints each answer (to check which seeds get how far).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("PDSNO_FUZZ_VERBOSE").is_some());

fn build() -> Fixture {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let nib = match Nib::open(":memory:") {
        Ok(n) => Arc::new(n),
        Err(e) => panic!("in-memory NIB: {e}"),
    };
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
    let identity = Arc::new(identity());
    let pair_keys = match PairKeys::load(nib.clone(), chrono::Duration::minutes(10)) {
        Ok(p) => Arc::new(p),
        Err(e) => panic!("pair keys: {e}"),
    };
    let trust = Arc::new(Trust {
        me: ME.into(),
        role: Role::Global,
        region: None,
        identity: identity.clone(),
        network_key: Some(hmac_key()),
        pair_keys,
        nib: nib.clone(),
        parent: None,
        clock: clock.clone(),
    });
    let authority = Arc::new(Authority::new(
        ME.into(),
        AuthorityConfig::new(vec![Role::Regional], SecretString::new(BOOTSTRAP_SECRET)),
        identity,
        nib,
        clock,
        None,
    ));
    let mut inbound = match Inbound::new(trust, Some(authority), 4096) {
        Ok(i) => i,
        Err(e) => panic!("inbound: {e}"),
    };
    inbound.register(
        MessageType::Heartbeat,
        Box::new(|_| Ok(HandlerReply::Accepted)),
    );
    inbound.register(
        MessageType::SyncRequest,
        Box::new(|e| {
            Ok(HandlerReply::Reply(
                MessageType::SyncResponse,
                e.env.payload.clone(),
            ))
        }),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], 8001));
    let router = rest::router(Arc::new(inbound), addr, None);
    Fixture { rt, router }
}

/// Splits off everything before the first `\n`.
fn line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fuzz_target!(|data: &[u8]| {
    let (request_line, rest) = line(data);
    let (content_type, body) = line(rest);
    let (method, path) = match request_line.iter().position(|&b| b == b' ') {
        Some(i) => (&request_line[..i], &request_line[i + 1..]),
        None => (&b"POST"[..], request_line),
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(path);
    if !content_type.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    let Ok(request) = builder.body(Body::from(body.to_vec())) else {
        return;
    };
    let fx = &*FIXTURE;
    let response = match fx.rt.block_on(fx.router.clone().oneshot(request)) {
        Ok(r) => r,
        Err(e) => match e {},
    };
    let status = response.status();
    if *VERBOSE {
        let body = fx
            .rt
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .unwrap_or_default();
        eprintln!(
            "{status} {:?} -> {}",
            String::from_utf8_lossy(request_line),
            String::from_utf8_lossy(&body)
        );
    }
    assert!(
        !status.is_server_error(),
        "{status} for {:?}",
        String::from_utf8_lossy(request_line)
    );
});
