//! JSON exactly as Python's `json` module reads and writes it.
//!
//! Signatures are computed over `json.dumps(obj, sort_keys=True, separators=(",", ":"))`, so
//! this module owns a value model that loses nothing Python keeps ([`Value`]), a strict parser
//! ([`parse`]), the canonical encoder ([`write_canonical`]) and a loss-free serde bridge for
//! typed payloads ([`to_value`], [`from_value`]).

mod canonical;
mod parse;
mod serde;
mod value;

pub use self::canonical::{
    to_canonical_string, to_pretty_string, write_canonical, write_canonical_map,
    write_canonical_members, write_python_float, write_str,
};
pub use self::parse::{Limits, ParseError, ParseErrorKind, parse, parse_str_with, parse_with};
pub use self::serde::{Error, from_value, to_value};
pub use self::value::{Map, Number, Value};

/// The canonical bytes of `v` (see [`write_canonical`]).
pub fn to_canonical_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(v, &mut out);
    out
}
