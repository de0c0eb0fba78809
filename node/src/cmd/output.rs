//! How the operator tools print results and errors: text for people, or with `--json` one
//! JSON document on stdout, errors included.
//!
//! Under `--json` an error is `{"error": "MESSAGE"}` on one line of stdout (the message is
//! the one the text form prints after `error: `), with the same non-zero exit code as the
//! text form: a script reads one stream and checks the exit code.

use std::process::ExitCode;

use pdsno_shared::json::{self, Map, Value};

/// The JSON form of an error.
pub fn error_json(msg: &str) -> String {
    let mut m = Map::new();
    m.insert("error".into(), msg.into());
    json::to_canonical_string(&Value::Object(m))
}

/// Reports `msg` (`error: MSG` on stderr, or the JSON form on stdout) and returns `code`.
pub fn fail_with(as_json: bool, code: u8, msg: impl std::fmt::Display) -> ExitCode {
    let msg = msg.to_string();
    if as_json {
        println!("{}", error_json(&msg));
    } else {
        eprintln!("error: {msg}");
    }
    ExitCode::from(code)
}

/// [`fail_with`] exit code 1.
pub fn fail(as_json: bool, msg: impl std::fmt::Display) -> ExitCode {
    fail_with(as_json, 1, msg)
}

/// Prints `v` as indented JSON on stdout.
pub fn print_json(v: &Value) {
    println!("{}", json::to_pretty_string(v));
}

/// Whether a command line asks for JSON output (`--json` before any `--`), for errors found
/// before the arguments are parsed.
pub fn wants_json<T: AsRef<std::ffi::OsStr>>(args: &[T]) -> bool {
    args.iter()
        .map(AsRef::as_ref)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_json_object_with_the_message() {
        let line = error_json("no \"node\" here\nsecond line");
        assert!(!line.contains('\n'), "{line}");
        let v = json::parse(line.as_bytes()).expect("json");
        assert_eq!(
            v.get("error").and_then(Value::as_str),
            Some("no \"node\" here\nsecond line")
        );
    }

    #[test]
    fn json_is_asked_for_only_by_the_flag_itself() {
        assert!(wants_json(&["pdsno", "status", "--json"]));
        assert!(!wants_json(&["pdsno", "status", "--jsonx"]));
        assert!(!wants_json(&["pdsno", "sign", "--", "--json"]));
    }
}
