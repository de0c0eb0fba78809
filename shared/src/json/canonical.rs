//! Python-compatible JSON text: the bytes a signature is computed over.
//!
//! [`write_canonical`] reproduces `json.dumps(obj, sort_keys=True, separators=(",", ":"))`
//! (with the default `ensure_ascii=True`) byte for byte:
//! - keys in code point order (a [`Map`] is already in that order), no whitespace;
//! - every character outside printable ASCII (0x20..=0x7E) is escaped: `"` `\` and
//!   `\n \r \t \b \f` with their short forms, everything else as `\uXXXX` in lowercase hex,
//!   characters above U+FFFF as a UTF-16 surrogate pair; `/` is not escaped; DEL (0x7F) is;
//! - integers exactly as Python prints them (any size);
//! - floats as Python's `repr`: the shortest digits that round-trip, `1.0` keeps its `.0`,
//!   exponent form when the decimal exponent is < -4 or >= 16 (`1e-05`, `1e+16`).
//!
//! The same encoder (with an indent) renders human-readable output for the CLI.

use super::value::{Map, N, Number, Value};

/// The canonical text of `v` as a `String`.
pub fn to_canonical_string(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(v, &mut out);
    // The encoder only ever emits ASCII.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the canonical bytes of `v` to `out`.
pub fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    write_value(v, out, None, 0);
}

/// Appends the canonical bytes of an object.
pub fn write_canonical_map(m: &Map, out: &mut Vec<u8>) {
    write_object(m, out, None, 0);
}

/// Appends the canonical bytes of an object given as sorted `(key, value)` members.
///
/// The caller guarantees keys are unique and sorted by code point; this lets a caller
/// encode a struct as if it were a [`Map`] without building one.
pub fn write_canonical_members<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a Value)>,
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        write_value(v, out, None, 0);
    }
    out.push(b'}');
}

/// `v` as indented, sorted, ASCII-escaped JSON (Python's `json.dumps(v, indent=2,
/// sort_keys=True)`), for people to read.
pub fn to_pretty_string(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_value(v, &mut out, Some(2), 0);
    String::from_utf8(out).unwrap_or_default()
}

fn newline(out: &mut Vec<u8>, indent: Option<usize>, level: usize) {
    if let Some(w) = indent {
        out.push(b'\n');
        out.resize(out.len() + w * level, b' ');
    }
}

fn write_value(v: &Value, out: &mut Vec<u8>, indent: Option<usize>, level: usize) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            if !items.is_empty() {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    newline(out, indent, level + 1);
                    write_value(item, out, indent, level + 1);
                }
                newline(out, indent, level);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map, out, indent, level),
    }
}

fn write_object(map: &Map, out: &mut Vec<u8>, indent: Option<usize>, level: usize) {
    out.push(b'{');
    if !map.is_empty() {
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            newline(out, indent, level + 1);
            write_str(k, out);
            out.push(b':');
            if indent.is_some() {
                out.push(b' ');
            }
            write_value(v, out, indent, level + 1);
        }
        newline(out, indent, level);
    }
    out.push(b'}');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u_escape(out: &mut Vec<u8>, unit: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((unit >> shift) & 0xF) as usize]);
    }
}

/// Appends `s` as a JSON string with Python's `ensure_ascii` escaping.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if (0x20..=0x7E).contains(&b) && b != b'"' && b != b'\\' {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        if b < 0x80 {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0C => out.extend_from_slice(b"\\f"),
                _ => push_u_escape(out, u32::from(b)),
            }
            i += 1;
        } else {
            // A multi-byte UTF-8 sequence; `i` is on a char boundary because every byte
            // before it was consumed whole.
            let c = s[i..].chars().next().unwrap_or('\u{FFFD}');
            let cp = u32::from(c);
            if cp >= 0x10000 {
                let v = cp - 0x10000;
                push_u_escape(out, 0xD800 | (v >> 10));
                push_u_escape(out, 0xDC00 | (v & 0x3FF));
            } else {
                push_u_escape(out, cp);
            }
            i += c.len_utf8();
        }
        run = i;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Appends the decimal text of `i` without allocating.
fn write_i64(i: i64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    let mut n = i.unsigned_abs();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[pos..]);
}

fn write_number(n: &Number, out: &mut Vec<u8>) {
    match &n.0 {
        N::Int(i) => write_i64(*i, out),
        N::Big(s) => out.extend_from_slice(s.as_bytes()),
        N::Float(f) => write_python_float(*f, out),
    }
}

/// Appends Python's `repr(f)`.
pub fn write_python_float(f: f64, out: &mut Vec<u8>) {
    if f.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"Infinity" } else { b"-Infinity" });
        return;
    }
    if f == 0.0 {
        out.extend_from_slice(if f.is_sign_negative() {
            b"-0.0"
        } else {
            b"0.0"
        });
        return;
    }
    // Ryu yields the shortest digits that round-trip and, among several such strings, the
    // one closest to the exact value: the digits of David Gay's mode 0, which Python's repr
    // uses. Only its layout differs, so take the digits and the exponent and re-lay them.
    let mut buf = ryu::Buffer::new();
    let text = buf.format_finite(f);
    let (neg, digits, exp) = decompose(text);
    if neg {
        out.push(b'-');
    }
    if !(-4..16).contains(&exp) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        write_i64(i64::from(e), out);
    } else if exp >= 0 {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.extend_from_slice(&digits);
            out.resize(out.len() + (int_len - digits.len()), b'0');
            out.extend_from_slice(b".0");
        } else {
            out.extend_from_slice(&digits[..int_len]);
            out.push(b'.');
            out.extend_from_slice(&digits[int_len..]);
        }
    } else {
        out.extend_from_slice(b"0.");
        out.resize(out.len() + (-exp - 1) as usize, b'0');
        out.extend_from_slice(&digits);
    }
}

/// Splits a decimal float text (`-12.5e3`, `0.00012`, `1e16`) into its sign, significant
/// digits (no leading or trailing zeros) and the decimal exponent of the first digit.
fn decompose(text: &str) -> (bool, Vec<u8>, i32) {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp_suffix) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: Vec<u8> = int_part.bytes().chain(frac_part.bytes()).collect();
    let lead = all.iter().take_while(|&&d| d == b'0').count();
    let mut digits: Vec<u8> = all[lead..].to_vec();
    while digits.len() > 1 && digits.last() == Some(&b'0') {
        digits.pop();
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    // The first significant digit sits at position `lead` of `all`; the decimal point sits
    // after `int_part.len()` digits.
    let exp = int_part.len() as i32 - 1 - lead as i32 + exp_suffix;
    (neg, digits, exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr(f: f64) -> String {
        let mut out = Vec::new();
        write_python_float(f, &mut out);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn floats_match_python_repr() {
        // Expected values are what CPython 3.11 prints for repr().
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (0.5, "0.5"),
            (-0.5, "-0.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123.456, "123.456"),
            (100.0, "100.0"),
            (1e22, "1e+22"),
            (-1.25e-7, "-1.25e-07"),
            (9007199254740993.0, "9007199254740992.0"),
            // Cases where the shortest round-trip string is not unique.
            (-259971563399074.12, "-259971563399074.12"),
            (1190801984560851.2, "1190801984560851.2"),
            (739102753098463.2, "739102753098463.2"),
            (-1447412360644424.2, "-1447412360644424.2"),
        ];
        for (f, want) in cases {
            assert_eq!(repr(*f), *want, "repr({f:?})");
        }
    }

    #[test]
    fn decompose_reads_every_layout() {
        assert_eq!(decompose("1e16"), (false, b"1".to_vec(), 16));
        assert_eq!(decompose("-1.25e-7"), (true, b"125".to_vec(), -7));
        assert_eq!(decompose("0.000123"), (false, b"123".to_vec(), -4));
        assert_eq!(decompose("123.456"), (false, b"123456".to_vec(), 2));
        assert_eq!(decompose("100.0"), (false, b"1".to_vec(), 2));
        assert_eq!(decompose("5E-324"), (false, b"5".to_vec(), -324));
    }

    #[test]
    fn integers() {
        for i in [0, 7, -7, 10, 1234567890, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            write_i64(i, &mut out);
            assert_eq!(String::from_utf8(out).expect("ascii"), i.to_string());
        }
    }

    #[test]
    fn strings_use_ensure_ascii_escapes() {
        let mut out = Vec::new();
        write_str("a\"b\\c/\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f} é€😀", &mut out);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            r#""a\"b\\c/\n\r\t\b\f\u0001\u001f\u007f \u00e9\u20ac\ud83d\ude00""#
        );
    }

    #[test]
    fn pretty_matches_python_indent_2() {
        let v = crate::json::parse(br#"{"b":[1,{"c":null}],"a":{},"d":[]}"#).expect("valid");
        assert_eq!(
            to_pretty_string(&v),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"c\": null\n    }\n  ],\n  \"d\": []\n}"
        );
    }
}
