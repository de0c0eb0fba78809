//! The JSON value model used for everything that is signed.
//!
//! `serde_json::Value` cannot represent what a Python peer may send and sign: integers beyond
//! 64 bits, and the distinction between `1` and `1.0`. Both change the canonical bytes a
//! signature is computed over, so a lossy model would turn valid messages into "tampered"
//! ones. This model keeps integers exactly (arbitrary size), keeps floats as IEEE doubles
//! (as Python does), and keeps objects in a `BTreeMap` whose order is the Unicode code point
//! order Python's `sort_keys=True` uses.

use std::collections::BTreeMap;
use std::fmt;

/// A JSON object: keys in code point order (UTF-8 byte order equals code point order).
pub type Map = BTreeMap<String, Value>;

/// A JSON value.
#[derive(Clone, PartialEq, Default)]
pub enum Value {
    /// `null`
    #[default]
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An integer of any size, or a finite double.
    Number(Number),
    /// A string (always valid Unicode; lone surrogates are refused by the parser).
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object.
    Object(Map),
}

/// A JSON number as Python sees it: an integer of any size, or a finite `float`.
#[derive(Clone, PartialEq)]
pub struct Number(pub(crate) N);

#[derive(Clone, PartialEq)]
pub(crate) enum N {
    /// An integer that fits in `i64`.
    Int(i64),
    /// An integer outside `i64`: normalised decimal text, optional leading `-`, no leading zeros.
    Big(Box<str>),
    /// A finite double.
    Float(f64),
}

impl Number {
    /// An integer number.
    pub fn from_i64(i: i64) -> Self {
        Number(N::Int(i))
    }

    /// An unsigned integer number (kept exactly, also above `i64::MAX`).
    pub fn from_u64(u: u64) -> Self {
        match i64::try_from(u) {
            Ok(i) => Number(N::Int(i)),
            Err(_) => Number(N::Big(u.to_string().into_boxed_str())),
        }
    }

    /// A 128-bit integer (kept exactly).
    pub fn from_i128(i: i128) -> Self {
        match i64::try_from(i) {
            Ok(small) => Number(N::Int(small)),
            Err(_) => Number(N::Big(i.to_string().into_boxed_str())),
        }
    }

    /// A float; `None` for NaN and infinities, which JSON cannot carry.
    pub fn from_f64(f: f64) -> Option<Self> {
        f.is_finite().then_some(Number(N::Float(f)))
    }

    /// An integer from its decimal text (`-?[0-9]+`); `None` if the text is not one.
    ///
    /// Leading zeros and `-0` are normalised the way Python's `int()` does.
    pub fn from_integer_text(text: &str) -> Option<Self> {
        let (neg, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if let Ok(i) = text.parse::<i64>() {
            return Some(Number(N::Int(i)));
        }
        let trimmed = digits.trim_start_matches('0');
        if trimmed.is_empty() {
            return Some(Number(N::Int(0)));
        }
        let mut s = String::with_capacity(trimmed.len() + 1);
        if neg {
            s.push('-');
        }
        s.push_str(trimmed);
        // Values inside i64 after trimming zeros were handled by the fast path above unless
        // they had leading zeros; re-check so small values never take the Big form.
        if let Ok(i) = s.parse::<i64>() {
            return Some(Number(N::Int(i)));
        }
        Some(Number(N::Big(s.into_boxed_str())))
    }

    /// True for integers (of any size).
    pub fn is_integer(&self) -> bool {
        !matches!(self.0, N::Float(_))
    }

    /// True for floats.
    pub fn is_float(&self) -> bool {
        matches!(self.0, N::Float(_))
    }

    /// The value as `i64` when it is an integer in range.
    pub fn as_i64(&self) -> Option<i64> {
        match &self.0 {
            N::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as `u64` when it is a non-negative integer in range.
    pub fn as_u64(&self) -> Option<u64> {
        match &self.0 {
            N::Int(i) => u64::try_from(*i).ok(),
            N::Big(s) => s.parse::<u64>().ok(),
            N::Float(_) => None,
        }
    }

    /// The value as `i128` when it is an integer in range.
    pub fn as_i128(&self) -> Option<i128> {
        match &self.0 {
            N::Int(i) => Some(i128::from(*i)),
            N::Big(s) => s.parse::<i128>().ok(),
            N::Float(_) => None,
        }
    }

    /// The value as `f64` (integers are converted, possibly with rounding).
    pub fn as_f64(&self) -> f64 {
        match &self.0 {
            N::Int(i) => *i as f64,
            N::Big(s) => s.parse::<f64>().unwrap_or(f64::NAN),
            N::Float(f) => *f,
        }
    }

    /// The exact decimal text of an integer outside `i64`, if this is one.
    pub fn big_integer_text(&self) -> Option<&str> {
        match &self.0 {
            N::Big(s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Debug for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::json::to_canonical_string(&Value::Number(
            self.clone(),
        )))
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::json::to_canonical_string(self))
    }
}

impl fmt::Display for Value {
    /// The canonical (compact, sorted, ASCII) JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::json::to_canonical_string(self))
    }
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The object, mutably, if this is one.
    pub fn as_object_mut(&mut self) -> Option<&mut Map> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer as `i64`, if this is an integer in range.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// The integer as `u64`, if this is a non-negative integer in range.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// The number as `f64`, if this is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(n.as_f64()),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Member `key` of an object (`None` for other kinds or a missing key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object().and_then(|m| m.get(key))
    }

    /// A short name of the kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(n) if n.is_integer() => "an integer",
            Value::Number(_) => "a float",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Number(Number::from_i64(i))
    }
}
impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Number(Number::from_i64(i64::from(i)))
    }
}
impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Number(Number::from_i64(i64::from(i)))
    }
}
impl From<u64> for Value {
    fn from(u: u64) -> Self {
        Value::Number(Number::from_u64(u))
    }
}
impl From<usize> for Value {
    fn from(u: usize) -> Self {
        Value::Number(Number::from_u64(u as u64))
    }
}
impl From<f64> for Value {
    /// Non-finite floats become `null`, as JSON cannot carry them.
    fn from(f: f64) -> Self {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<Map> for Value {
    fn from(m: Map) -> Self {
        Value::Object(m)
    }
}
impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Self {
        Value::Array(a)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}

/// Builds a [`Map`] from `key => value` pairs: `json_map! { "a" => 1, "b" => "x" }`.
#[macro_export]
macro_rules! json_map {
    () => { $crate::json::Map::new() };
    ($($k:expr => $v:expr),+ $(,)?) => {{
        let mut m = $crate::json::Map::new();
        $( m.insert(::std::string::String::from($k), $crate::json::Value::from($v)); )+
        m
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_text_is_normalised_like_python_int() {
        let n = |s| Number::from_integer_text(s).map(|n| Value::Number(n).to_string());
        assert_eq!(n("-0").as_deref(), Some("0"));
        assert_eq!(n("007").as_deref(), Some("7"));
        assert_eq!(
            n("-000123456789012345678901234567890").as_deref(),
            Some("-123456789012345678901234567890")
        );
        assert_eq!(
            n("9223372036854775807").as_deref(),
            Some("9223372036854775807")
        );
        assert_eq!(
            n("9223372036854775808").as_deref(),
            Some("9223372036854775808")
        );
        assert_eq!(n("1.5"), None);
        assert_eq!(n("-"), None);
        assert_eq!(n(""), None);
    }

    #[test]
    fn u64_above_i64_is_exact() {
        let v = Value::from(u64::MAX);
        assert_eq!(v.to_string(), "18446744073709551615");
        assert_eq!(v.as_u64(), Some(u64::MAX));
        assert_eq!(v.as_i64(), None);
    }

    #[test]
    fn non_finite_floats_become_null() {
        assert!(Value::from(f64::NAN).is_null());
        assert!(Value::from(f64::INFINITY).is_null());
        assert!(Number::from_f64(f64::NEG_INFINITY).is_none());
    }
}
