//! A strict, total JSON parser producing [`Value`].
//!
//! It accepts exactly what Python's `json.loads` accepts from a well-behaved sender and
//! refuses, with a byte offset and a reason, what a hostile one may try:
//! - invalid UTF-8, control characters inside strings, lone UTF-16 surrogates;
//! - `NaN`, `Infinity` and numbers that overflow a double (Python would accept them and then
//!   emit text that is not JSON);
//! - duplicate object keys (Python keeps the last one silently; two parsers disagreeing on
//!   which copy counts is a classic signature bypass, so we refuse the message);
//! - nesting deeper than [`Limits::max_depth`] and integers longer than
//!   [`Limits::max_integer_digits`] (Python's own default limit is 4300 digits).
//!
//! Parsing never panics and never recurses deeper than the depth limit.

use std::fmt;

use super::value::{Map, N, Number, Value};

/// Limits applied while parsing.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Maximum nesting of arrays and objects.
    pub max_depth: usize,
    /// Maximum number of digits of an integer (Python's default `int` limit is 4300).
    pub max_integer_digits: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 128,
            max_integer_digits: 4300,
        }
    }
}

/// Why a text is not acceptable JSON, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON at byte {offset}: {kind}")]
pub struct ParseError {
    /// Byte offset of the problem in the input.
    pub offset: usize,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

/// The kinds of JSON errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The input is not UTF-8.
    InvalidUtf8,
    /// The input ended too early.
    UnexpectedEnd,
    /// A character that cannot start or continue a value here.
    UnexpectedChar(char),
    /// Something follows the value.
    TrailingData,
    /// Invalid escape sequence.
    InvalidEscape,
    /// A `\u` escape names a lone surrogate.
    LoneSurrogate,
    /// A raw control character inside a string.
    ControlCharacter,
    /// A malformed number.
    InvalidNumber,
    /// A float that overflows to infinity.
    NumberOutOfRange,
    /// An integer with too many digits.
    IntegerTooLong,
    /// Nesting too deep.
    TooDeep,
    /// An object key appears twice.
    DuplicateKey(String),
    /// The key the serde bridge reserves for exact big integers: refused in input so that
    /// no received object can turn into a number on a typed round trip.
    ReservedKey,
}

impl fmt::Display for ParseErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseErrorKind::InvalidUtf8 => f.write_str("text is not valid UTF-8"),
            ParseErrorKind::UnexpectedEnd => f.write_str("unexpected end of input"),
            ParseErrorKind::UnexpectedChar(c) => write!(f, "unexpected character {c:?}"),
            ParseErrorKind::TrailingData => f.write_str("extra data after the value"),
            ParseErrorKind::InvalidEscape => f.write_str("invalid escape sequence"),
            ParseErrorKind::LoneSurrogate => f.write_str("lone UTF-16 surrogate in \\u escape"),
            ParseErrorKind::ControlCharacter => {
                f.write_str("unescaped control character in string")
            }
            ParseErrorKind::InvalidNumber => f.write_str("malformed number"),
            ParseErrorKind::NumberOutOfRange => f.write_str("number out of range for a float"),
            ParseErrorKind::IntegerTooLong => f.write_str("integer has too many digits"),
            ParseErrorKind::TooDeep => f.write_str("nesting too deep"),
            ParseErrorKind::DuplicateKey(k) => write!(f, "duplicate key {k:?}"),
            ParseErrorKind::ReservedKey => {
                write!(f, "the key {:?} is reserved", super::serde::BIG_INT_TOKEN)
            }
        }
    }
}

/// Parses one JSON value from `input` with the default [`Limits`].
///
/// # Errors
/// A [`ParseError`] for anything that is not a single acceptable JSON value.
pub fn parse(input: &[u8]) -> Result<Value, ParseError> {
    parse_with(input, Limits::default())
}

/// Parses one JSON value from `input` with explicit limits.
///
/// # Errors
/// A [`ParseError`] for anything that is not a single acceptable JSON value.
pub fn parse_with(input: &[u8], limits: Limits) -> Result<Value, ParseError> {
    let text = std::str::from_utf8(input).map_err(|e| ParseError {
        offset: e.valid_up_to(),
        kind: ParseErrorKind::InvalidUtf8,
    })?;
    parse_str_with(text, limits)
}

/// Parses one JSON value from a string with explicit limits.
///
/// # Errors
/// A [`ParseError`] for anything that is not a single acceptable JSON value.
pub fn parse_str_with(text: &str, limits: Limits) -> Result<Value, ParseError> {
    let mut p = Parser {
        s: text,
        b: text.as_bytes(),
        i: 0,
        limits,
    };
    p.skip_ws();
    let v = p.value(0)?;
    p.skip_ws();
    if p.i != p.b.len() {
        return Err(p.err(ParseErrorKind::TrailingData));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    limits: Limits,
}

impl Parser<'_> {
    fn err(&self, kind: ParseErrorKind) -> ParseError {
        ParseError {
            offset: self.i,
            kind,
        }
    }

    fn unexpected(&self) -> ParseError {
        match self.s.get(self.i..).and_then(|r| r.chars().next()) {
            Some(c) => self.err(ParseErrorKind::UnexpectedChar(c)),
            None => self.err(ParseErrorKind::UnexpectedEnd),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn expect_literal(&mut self, lit: &str, v: Value) -> Result<Value, ParseError> {
        if self.b[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(v)
        } else {
            Err(self.unexpected())
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        match self.peek() {
            None => Err(self.err(ParseErrorKind::UnexpectedEnd)),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.expect_literal("true", Value::Bool(true)),
            Some(b'f') => self.expect_literal("false", Value::Bool(false)),
            Some(b'n') => self.expect_literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.unexpected()),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > self.limits.max_depth {
            return Err(self.err(ParseErrorKind::TooDeep));
        }
        self.i += 1; // '{'
        let mut map = Map::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.unexpected());
            }
            let key_at = self.i;
            let key = self.string()?;
            if key == super::serde::BIG_INT_TOKEN {
                return Err(ParseError {
                    offset: key_at,
                    kind: ParseErrorKind::ReservedKey,
                });
            }
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.unexpected());
            }
            self.i += 1;
            self.skip_ws();
            let v = self.value(depth)?;
            if map.contains_key(&key) {
                return Err(ParseError {
                    offset: key_at,
                    kind: ParseErrorKind::DuplicateKey(key),
                });
            }
            map.insert(key, v);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.unexpected()),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > self.limits.max_depth {
            return Err(self.err(ParseErrorKind::TooDeep));
        }
        self.i += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.unexpected()),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let Some(chunk) = self.b.get(self.i..self.i + 4) else {
            self.i = self.b.len();
            return Err(self.err(ParseErrorKind::UnexpectedEnd));
        };
        let mut v = 0u32;
        for &c in chunk {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(self.err(ParseErrorKind::InvalidEscape)),
            };
            v = v * 16 + u32::from(d);
        }
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            // Copy the longest run of plain characters in one go.
            let start = self.i;
            while let Some(&c) = self.b.get(self.i) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            // `start..i` ends before an ASCII byte or at the end, so it is a char boundary.
            out.push_str(&self.s[start..self.i]);
            match self.peek() {
                None => return Err(self.err(ParseErrorKind::UnexpectedEnd)),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err(ParseErrorKind::UnexpectedEnd));
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let at = self.i - 2;
                            let hi = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&hi) {
                                if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err(ParseError {
                                        offset: at,
                                        kind: ParseErrorKind::LoneSurrogate,
                                    });
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(ParseError {
                                        offset: at,
                                        kind: ParseErrorKind::LoneSurrogate,
                                    });
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(ParseError {
                                    offset: at,
                                    kind: ParseErrorKind::LoneSurrogate,
                                });
                            } else {
                                hi
                            };
                            match char::from_u32(c) {
                                Some(ch) => out.push(ch),
                                None => {
                                    return Err(ParseError {
                                        offset: at,
                                        kind: ParseErrorKind::InvalidEscape,
                                    });
                                }
                            }
                        }
                        _ => {
                            self.i -= 1;
                            return Err(self.err(ParseErrorKind::InvalidEscape));
                        }
                    }
                }
                Some(_) => return Err(self.err(ParseErrorKind::ControlCharacter)),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.unexpected()),
        }
        let int_len = self.i - int_start;
        let mut is_float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err(ParseErrorKind::InvalidNumber));
            }
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err(ParseErrorKind::InvalidNumber));
            }
            is_float = true;
        }
        let text = &self.s[start..self.i];
        if is_float {
            // Rust's parser is correctly rounded, like Python's float().
            let f: f64 = text.parse().map_err(|_| ParseError {
                offset: start,
                kind: ParseErrorKind::InvalidNumber,
            })?;
            return match Number::from_f64(f) {
                Some(n) => Ok(Value::Number(n)),
                None => Err(ParseError {
                    offset: start,
                    kind: ParseErrorKind::NumberOutOfRange,
                }),
            };
        }
        if int_len > self.limits.max_integer_digits {
            return Err(ParseError {
                offset: start,
                kind: ParseErrorKind::IntegerTooLong,
            });
        }
        match text.parse::<i64>() {
            Ok(i) => Ok(Value::Number(Number(N::Int(i)))),
            Err(_) => Number::from_integer_text(text)
                .map(Value::Number)
                .ok_or(ParseError {
                    offset: start,
                    kind: ParseErrorKind::InvalidNumber,
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> ParseErrorKind {
        match parse(s.as_bytes()) {
            Err(e) => e.kind,
            Ok(v) => panic!("{s:?} parsed as {v}"),
        }
    }

    #[test]
    fn the_serde_bridge_key_is_refused_in_input() {
        assert_eq!(
            kind(r#"{"a":{"$pdsno::json::BigInt":"123"}}"#),
            ParseErrorKind::ReservedKey
        );
        assert!(parse(br#"{"$pdsno::json::BigInts":"1"}"#).is_ok());
    }

    #[test]
    fn accepts_python_style_documents() {
        let v = parse(
            br#" {"a": [1, 2.5, -0, -0.0, 1E5, true, null, "x\u00e9\ud83d\ude00"], "b": {}} "#,
        )
        .expect("valid");
        assert_eq!(
            v.to_string(),
            r#"{"a":[1,2.5,0,-0.0,100000.0,true,null,"x\u00e9\ud83d\ude00"],"b":{}}"#
        );
    }

    #[test]
    fn refuses_what_python_would_sign_ambiguously() {
        assert_eq!(
            kind(r#"{"a":1,"a":2}"#),
            ParseErrorKind::DuplicateKey("a".into())
        );
        assert_eq!(kind(r#""\ud800""#), ParseErrorKind::LoneSurrogate);
        assert_eq!(kind(r#""\udc00\ud800""#), ParseErrorKind::LoneSurrogate);
        assert_eq!(kind(r#""\ud800\u0041""#), ParseErrorKind::LoneSurrogate);
        assert_eq!(kind("\"a\u{1}b\""), ParseErrorKind::ControlCharacter);
        assert_eq!(kind("1e400"), ParseErrorKind::NumberOutOfRange);
        assert_eq!(kind("NaN"), ParseErrorKind::UnexpectedChar('N'));
        assert_eq!(kind("Infinity"), ParseErrorKind::UnexpectedChar('I'));
        assert_eq!(kind("01"), ParseErrorKind::TrailingData);
        assert_eq!(kind("1."), ParseErrorKind::InvalidNumber);
        assert_eq!(kind("1e"), ParseErrorKind::InvalidNumber);
        assert_eq!(kind("-"), ParseErrorKind::UnexpectedEnd);
        assert_eq!(kind("[1,]"), ParseErrorKind::UnexpectedChar(']'));
        assert_eq!(kind("{\"a\" 1}"), ParseErrorKind::UnexpectedChar('1'));
        assert_eq!(kind(r#""\x""#), ParseErrorKind::InvalidEscape);
        assert_eq!(kind(r#""\u12"#), ParseErrorKind::UnexpectedEnd);
        assert_eq!(kind("{} {}"), ParseErrorKind::TrailingData);
        assert_eq!(kind(""), ParseErrorKind::UnexpectedEnd);
        assert_eq!(kind("\"abc"), ParseErrorKind::UnexpectedEnd);
    }

    #[test]
    fn invalid_utf8_is_reported_with_offset() {
        let e = parse(b"{\"a\":\"\xff\"}").expect_err("bad utf-8");
        assert_eq!(e.kind, ParseErrorKind::InvalidUtf8);
        assert_eq!(e.offset, 6);
    }

    #[test]
    fn depth_is_limited_without_recursing_further() {
        let deep = "[".repeat(100_000);
        assert_eq!(kind(&deep), ParseErrorKind::TooDeep);
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(parse(ok.as_bytes()).is_ok());
        let too = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(kind(&too), ParseErrorKind::TooDeep);
    }

    #[test]
    fn integer_digit_limit_matches_python_default() {
        let ok = "9".repeat(4300);
        assert!(parse(ok.as_bytes()).is_ok());
        let too = "9".repeat(4301);
        assert_eq!(kind(&too), ParseErrorKind::IntegerTooLong);
    }

    #[test]
    fn big_integers_survive() {
        let v = parse(b"[12345678901234567890, -98765432109876543210987654321]").expect("valid");
        assert_eq!(
            v.to_string(),
            "[12345678901234567890,-98765432109876543210987654321]"
        );
    }
}
