//! Differential test against CPython's `json` and `hmac` modules.
//!
//! Generates well over 10,000 JSON documents (nested objects and arrays; strings with
//! control characters, non-BMP characters, escapes written every legal way; floats from
//! random bit patterns, so subnormals, exponents and negative zero; integers far beyond 64
//! bits), written with random whitespace and key order. Each document is parsed and
//! canonicalised by us and by `python3` (`json.dumps(json.loads(line), sort_keys=True,
//! separators=(",", ":"))`); the outputs must match byte for byte. Then envelopes signed by
//! us must verify in Python, and envelopes signed by Python must verify here.
//!
//! The seed is printed; set `PDSNO_DIFF_SEED` to replay a run, `PDSNO_DIFF_CASES` to scale.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::{HmacKey, KeyRing};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{self, Verifier, VerifyKeys};

/// SplitMix64: tiny, deterministic, good enough to drive a generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn ws(r: &mut Rng, out: &mut String) {
    for _ in 0..r.below(3) {
        out.push([' ', '\t', '\r'][r.below(3) as usize]);
    }
}

fn random_char(r: &mut Rng) -> char {
    let cp = match r.below(10) {
        0 => r.below(0x20) as u32,                   // control characters
        1 => 0x7F + r.below(0x81) as u32,            // DEL and Latin-1
        2 => 0x100 + r.below(0xD800 - 0x100) as u32, // rest of the BMP below surrogates
        3 => 0xE000 + r.below(0x2000) as u32,        // BMP above surrogates
        4 => 0x10000 + r.below(0x100000) as u32,     // astral planes (surrogate pairs)
        5 => ['"', '\\', '/', '\u{8}', '\u{c}', '\n', '\r', '\t'][r.below(8) as usize] as u32,
        6 => 0x1F600 + r.below(0x50) as u32, // emoji
        _ => 0x20 + r.below(0x5F) as u32,    // printable ASCII
    };
    char::from_u32(cp).unwrap_or('x')
}

/// Writes `c` inside a JSON string literal, choosing a random legal spelling.
fn write_char(r: &mut Rng, c: char, out: &mut String) {
    let must_escape = (c as u32) < 0x20 || c == '"' || c == '\\';
    let short = match c {
        '"' => Some("\\\""),
        '\\' => Some("\\\\"),
        '/' => Some("\\/"),
        '\u{8}' => Some("\\b"),
        '\u{c}' => Some("\\f"),
        '\n' => Some("\\n"),
        '\r' => Some("\\r"),
        '\t' => Some("\\t"),
        _ => None,
    };
    match (must_escape, short, r.below(3)) {
        (_, Some(s), 0) | (true, Some(s), _) => out.push_str(s),
        (false, _, 0) | (false, None, 1) | (false, Some(_), 1) => out.push(c),
        _ => {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                if r.chance(50) {
                    let _ = write!(out, "\\u{unit:04x}");
                } else {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
}

fn random_string(r: &mut Rng, max_len: u64) -> String {
    (0..r.below(max_len + 1)).map(|_| random_char(r)).collect()
}

fn write_string(r: &mut Rng, s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        write_char(r, c, out);
    }
    out.push('"');
}

fn random_float(r: &mut Rng) -> f64 {
    match r.below(8) {
        0 => [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            0.5,
            1e16,
            1e-5,
            1e15,
            1e-4,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            2.5e-308,
        ][r.below(14) as usize],
        1 => (r.below(2_000_001) as f64 - 1_000_000.0) / 1000.0,
        2 => r.below(1 << 53) as f64,
        3 => (r.below(10_000) as f64) * 10f64.powi(r.below(40) as i32 - 20),
        _ => loop {
            let f = f64::from_bits(r.next());
            if f.is_finite() {
                break f;
            }
        },
    }
}

/// Writes a float in a random spelling that denotes exactly the same double.
fn write_float(r: &mut Rng, f: f64, out: &mut String) {
    match r.below(4) {
        0 => {
            let mut b = Vec::new();
            json::write_python_float(f, &mut b);
            out.push_str(std::str::from_utf8(&b).unwrap_or("0.0"));
        }
        1 => {
            let _ = write!(out, "{f:e}");
        }
        2 => {
            let _ = write!(out, "{f:.17E}");
        }
        _ => {
            // Positional notation when short enough, else exponent with an explicit '+'.
            let s = format!("{f:?}");
            if s.contains('e') {
                let _ = write!(out, "{}", s.replace("e", "e+").replace("e+-", "e-"));
            } else {
                out.push_str(&s);
            }
        }
    }
}

fn write_int(r: &mut Rng, out: &mut String) {
    match r.below(5) {
        0 => {
            let _ = write!(out, "{}", r.next() as i64);
        }
        1 => out.push_str(
            [
                "0",
                "-0",
                "1",
                "-1",
                "9223372036854775807",
                "-9223372036854775808",
                "18446744073709551615",
                "18446744073709551616",
            ][r.below(8) as usize],
        ),
        2 => {
            if r.chance(50) {
                out.push('-');
            }
            out.push(char::from(b'1' + r.below(9) as u8));
            for _ in 0..r.below(80) {
                out.push(char::from(b'0' + r.below(10) as u8));
            }
        }
        _ => {
            let _ = write!(out, "{}", r.below(1000));
        }
    }
}

fn write_value(r: &mut Rng, depth: u32, out: &mut String) {
    let leaf = depth >= 5 || r.chance(35 + u64::from(depth) * 10);
    if leaf {
        match r.below(7) {
            0 => out.push_str("null"),
            1 => out.push_str(if r.chance(50) { "true" } else { "false" }),
            2 | 3 => {
                let s = random_string(r, 12);
                write_string(r, &s, out);
            }
            4 => write_int(r, out),
            _ => {
                let f = random_float(r);
                write_float(r, f, out);
            }
        }
        return;
    }
    if r.chance(40) {
        out.push('[');
        let n = r.below(6);
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            ws(r, out);
            write_value(r, depth + 1, out);
            ws(r, out);
        }
        out.push(']');
    } else {
        write_object(r, depth, out);
    }
}

fn write_object(r: &mut Rng, depth: u32, out: &mut String) {
    out.push('{');
    let mut keys: Vec<String> = Vec::new();
    for _ in 0..r.below(7) {
        let k = random_string(r, 6);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        ws(r, out);
        write_string(r, k, out);
        ws(r, out);
        out.push(':');
        ws(r, out);
        write_value(r, depth + 1, out);
        ws(r, out);
    }
    out.push('}');
}

fn python(script: &str, args: &[&str], input: &str) -> Vec<String> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 must be installed for the differential test");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python3 ran");
    writer
        .join()
        .expect("writer thread")
        .expect("wrote to python3");
    assert!(out.status.success(), "python3 failed: {:?}", out.status);
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

const CANON_PY: &str = r#"
import json, sys
for line in sys.stdin.buffer:
    obj = json.loads(line.decode("utf-8"))
    sys.stdout.write(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")
"#;

const VERIFY_PY: &str = r#"
import hashlib, hmac, json, sys
key = bytes.fromhex(sys.argv[1])
for line in sys.stdin.buffer:
    m = json.loads(line.decode("utf-8"))
    c = {k: v for k, v in m.items() if k not in ("signature", "signature_algorithm")}
    canon = json.dumps(c, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ok = hmac.compare_digest(hmac.new(key, canon, hashlib.sha256).hexdigest(), m["signature"])
    sys.stdout.write(("OK" if ok else "BAD " + m["message_id"]) + "\n")
"#;

const SIGN_PY: &str = r#"
import hashlib, hmac, json, secrets, sys
from datetime import datetime, timezone
key = bytes.fromhex(sys.argv[1])
for line in sys.stdin.buffer:
    m = json.loads(line.decode("utf-8"))
    m["nonce"] = secrets.token_hex(32)
    m["signed_at"] = datetime.now(timezone.utc).isoformat()
    canon = json.dumps(m, sort_keys=True, separators=(",", ":")).encode("utf-8")
    m["signature"] = hmac.new(key, canon, hashlib.sha256).hexdigest()
    m["signature_algorithm"] = "HMAC-SHA256"
    # Default dumps: spaces after separators, original key order, ensure_ascii.
    sys.stdout.write(json.dumps(m) + "\n")
"#;

fn seed() -> u64 {
    std::env::var("PDSNO_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        })
}

fn cases() -> usize {
    std::env::var("PDSNO_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12_000)
}

#[test]
fn canonical_json_matches_python_byte_for_byte() {
    let seed = seed();
    eprintln!("differential seed: PDSNO_DIFF_SEED={seed}");
    let mut r = Rng(seed);
    let n = cases();
    let mut docs = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = String::new();
        ws(&mut r, &mut s);
        if i % 10 == 0 {
            // A dense array of floats from random bit patterns (every exponent range).
            s.push('[');
            for j in 0..20 {
                if j > 0 {
                    s.push(',');
                }
                let f = loop {
                    let f = f64::from_bits(r.next());
                    if f.is_finite() {
                        break f;
                    }
                };
                write_float(&mut r, f, &mut s);
            }
            s.push(']');
        } else if i % 4 == 0 {
            write_value(&mut r, 0, &mut s);
        } else {
            write_object(&mut r, 0, &mut s);
        }
        ws(&mut r, &mut s);
        docs.push(s);
    }
    let theirs = python(CANON_PY, &[], &(docs.join("\n") + "\n"));
    assert_eq!(theirs.len(), docs.len(), "python answered every document");
    let mut mismatches = 0;
    let mut floats = 0usize;
    let mut big_ints = 0usize;
    let mut astral = 0usize;
    for (doc, want) in docs.iter().zip(&theirs) {
        let ours =
            json::parse(doc.as_bytes()).unwrap_or_else(|e| panic!("we refused {doc:?}: {e}"));
        let got = json::to_canonical_string(&ours);
        floats += got.matches('.').count().min(1);
        big_ints += usize::from(got.bytes().filter(u8::is_ascii_digit).count() > 20);
        astral +=
            usize::from(got.contains("\\ud8") || got.contains("\\ud9") || got.contains("\\udb"));
        if &got != want {
            mismatches += 1;
            if mismatches <= 5 {
                eprintln!("MISMATCH\n input: {doc}\n ours:  {got}\n python:{want}");
            }
        }
    }
    assert_eq!(
        mismatches, 0,
        "seed {seed}: {mismatches} of {n} documents differ"
    );
    // The generator really exercised the hard parts.
    assert!(
        floats > n / 10 && big_ints > n / 50 && astral > n / 50,
        "{floats} {big_ints} {astral}"
    );
}

fn random_envelope(r: &mut Rng, i: usize) -> Envelope {
    let mut text = String::new();
    write_object(r, 1, &mut text);
    let payload = match json::parse(text.as_bytes()) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut e = Envelope::new(
        MessageType::ALL[i % MessageType::ALL.len()],
        "local_cntl_zone-A_1",
        "regional_cntl_zone-A_1",
        payload,
        chrono::Utc::now(),
    );
    if r.chance(30) {
        e.extra
            .insert(random_string(r, 5) + "_x", Value::from(random_float(r)));
    }
    if r.chance(50) {
        e.correlation_id = Some(pdsno_shared::ids::message_id());
    }
    e
}

#[test]
fn signatures_verify_across_implementations() {
    let seed = seed();
    eprintln!("differential seed: PDSNO_DIFF_SEED={seed}");
    let mut r = Rng(seed ^ 0x5151);
    let key = HmacKey::from_secret_text("pdsno-message-signing-secret-change-in-production");
    let key_hex = hex::encode(key.expose_bytes());
    let now = chrono::Utc::now();
    let n = 2_000;

    // Ours → Python.
    let mut lines = String::new();
    for i in 0..n {
        let mut e = random_envelope(&mut r, i);
        signing::sign_hmac(&mut e, &key, None, now);
        lines.push_str(&e.to_json());
        lines.push('\n');
    }
    let verdicts = python(VERIFY_PY, &[&key_hex], &lines);
    assert_eq!(verdicts.len(), n);
    let bad: Vec<_> = verdicts.iter().filter(|v| *v != "OK").take(5).collect();
    assert!(bad.is_empty(), "python rejected our signatures: {bad:?}");

    // Python → ours.
    let mut unsigned = String::new();
    for i in 0..n {
        unsigned.push_str(&random_envelope(&mut r, i).to_json());
        unsigned.push('\n');
    }
    let signed = python(SIGN_PY, &[&key_hex], &unsigned);
    assert_eq!(signed.len(), n);
    let mut ring = KeyRing::single(None, key.clone(), now);
    ring.set_announce_key_id(false);
    let verifier = Verifier::new(MemoryNonceStore::new());
    let check_now = chrono::Utc::now();
    for line in &signed {
        let env = Envelope::from_slice(line.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}"));
        let res = verifier.verify(
            &env,
            VerifyKeys {
                hmac: Some(&ring),
                ed25519: None,
            },
            None,
            check_now,
        );
        assert!(res.is_ok(), "{res:?} for {line}");
    }
    // And a Python-signed message tampered in transit is refused.
    let mut env = Envelope::from_slice(signed[0].as_bytes()).expect("envelope");
    env.recipient_id = "regional_cntl_zone-A_2".into();
    env.nonce = Some(pdsno_shared::ids::nonce_hex());
    let res = verifier.verify(
        &env,
        VerifyKeys {
            hmac: Some(&ring),
            ed25519: None,
        },
        None,
        check_now,
    );
    assert_eq!(res, Err(signing::VerifyError::BadSignature));
}
