//! Sign and verify a ~2 KB DISCOVERY_REPORT envelope (HMAC-SHA256 and Ed25519), plus the
//! full receive path (parse bytes, then verify).
//!
//! Run: `cargo bench -p pdsno-shared --bench sign_verify`.

use std::hint::black_box;
use std::time::{Duration, Instant};

const CHUNK: u64 = 20_000;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::json::Map;
use pdsno_shared::keys::{HmacKey, IdentityKey, KeyRing};
use pdsno_shared::payload::discovery::{Device, DiscoveryMethod, DiscoveryReport};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{self, Verifier, VerifyKeys};
use pdsno_shared::time::format_iso;

fn report_envelope() -> Envelope {
    let now = chrono::Utc::now();
    let ts = format_iso(now);
    let devices = (0u32..8)
        .map(|i| Device {
            ip: format!("10.1.2.{}", 10 + i),
            mac: format!("02:00:00:01:02:{:02x}", i),
            last_seen: ts.clone(),
            protocol: "icmp".into(),
            reachable: true,
            rtt_ms: Some(0.35 + f64::from(i) * 0.07),
            hostname: Some(format!("sw-{i:03}")),
            vendor: Some("Arista".into()),
            model: None,
            uptime_seconds: Some(86_400 + u64::from(i)),
            discovery_method: DiscoveryMethod::Icmp,
            extra: Map::new(),
        })
        .collect();
    let report = DiscoveryReport {
        lc_id: "local_cntl_zone-A_1".into(),
        subnet: "10.1.2.0/24".into(),
        region: "zone-A".into(),
        timestamp: ts,
        new_devices: devices,
        updated_devices: vec![],
        inactive_devices: vec![],
        extra: Map::new(),
    };
    let payload = typed_to_map(&report).unwrap_or_default();
    Envelope::new(
        MessageType::DiscoveryReport,
        "local_cntl_zone-A_1",
        "regional_cntl_zone-A_1",
        payload,
        now,
    )
}

fn bench(c: &mut Criterion) {
    let key = HmacKey::from_secret_text("bench-secret");
    let ring = KeyRing::single(None, key.clone(), chrono::Utc::now());
    let id = IdentityKey::generate();
    let pk = id.public();
    let base = report_envelope();
    let mut probe = base.clone();
    signing::sign_hmac(&mut probe, &key, None, chrono::Utc::now());
    eprintln!(
        "envelope size: {} bytes on the wire",
        probe.to_json_bytes().len()
    );

    let mut g = c.benchmark_group("sign_verify");
    g.bench_function("hmac_sign", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |e| signing::sign_hmac(e, &key, None, chrono::Utc::now()),
            BatchSize::SmallInput,
        )
    });
    // Verification needs a distinct nonce per message. Sign messages ahead in chunks (not
    // timed) and verify each chunk with a fresh replay cache, so the cache holds at most a
    // chunk of live nonces, like a node under steady traffic.
    let keys = VerifyKeys {
        hmac: Some(&ring),
        ed25519: None,
    };
    let ed_keys = VerifyKeys {
        hmac: None,
        ed25519: Some(&pk),
    };
    let timed_verify = |iters: u64, ed: bool, parse: bool| {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(CHUNK);
            left -= n;
            let now = chrono::Utc::now();
            let envs: Vec<Envelope> = (0..n)
                .map(|_| {
                    let mut e = base.clone();
                    if ed {
                        signing::sign_ed25519(&mut e, &id, None, now);
                    } else {
                        signing::sign_hmac(&mut e, &key, None, now);
                    }
                    e
                })
                .collect();
            let wire: Vec<Vec<u8>> = if parse {
                envs.iter().map(Envelope::to_json_bytes).collect()
            } else {
                vec![]
            };
            let verifier = Verifier::new(MemoryNonceStore::new());
            let k = if ed { ed_keys } else { keys };
            let start = Instant::now();
            if parse {
                for w in &wire {
                    let e = Envelope::from_slice(w).ok();
                    black_box(e.map(|e| verifier.verify(&e, k, None, now).is_ok()));
                }
            } else {
                for e in &envs {
                    black_box(verifier.verify(e, k, None, now).is_ok());
                }
            }
            total += start.elapsed();
        }
        total
    };
    g.bench_function("hmac_verify", |b| {
        b.iter_custom(|iters| timed_verify(iters, false, false))
    });
    g.bench_function("hmac_parse_and_verify", |b| {
        b.iter_custom(|iters| timed_verify(iters, false, true))
    });
    g.bench_function("ed25519_sign", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |e| signing::sign_ed25519(e, &id, None, chrono::Utc::now()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ed25519_verify", |b| {
        b.iter_custom(|iters| timed_verify(iters, true, false))
    });
    g.bench_function("canonical_bytes", |b| {
        b.iter(|| black_box(&probe).canonical_signing_bytes())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
