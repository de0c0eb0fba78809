//! Arbitrary bytes into the strict JSON parser. When they parse: the canonical encoding is a
//! fixed point (encode, parse, encode gives identical bytes and an equal value), the pretty
//! form reads back as the same value, and the serde bridge carries the value unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pdsno_fuzz::assert_canonical_fixed_point;
use pdsno_shared::json::{self, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = json::parse(data) else {
        return;
    };
    let canonical = assert_canonical_fixed_point(&v);

    // `Display` is the canonical text too.
    assert_eq!(v.to_string().as_bytes(), canonical.as_slice());

    // Indented output is still the same JSON value.
    let pretty = json::to_pretty_string(&v);
    match json::parse(pretty.as_bytes()) {
        Ok(back) => assert!(back == v, "pretty form reads back differently"),
        Err(e) => panic!("pretty output does not parse: {e}"),
    }

    // Value -> serde -> Value is lossless (big integers included), unless the input
    // itself spells the private big-integer carrier, which the bridge may reinterpret.
    if !contains_key(&v, "$pdsno::json::BigInt") {
        match json::to_value(&v) {
            Ok(back) => assert!(back == v, "serde bridge changed the value"),
            Err(e) => panic!("a parsed value does not serialize: {e}"),
        }
        match json::from_value::<Value>(v.clone()) {
            Ok(back) => assert!(back == v, "serde bridge changed the value"),
            Err(e) => panic!("a parsed value does not deserialize: {e}"),
        }
    }
});

fn contains_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|x| contains_key(x, key)),
        Value::Array(a) => a.iter().any(|x| contains_key(x, key)),
        _ => false,
    }
}
