//! The README's commands stay true: `cargo run --release -- demo` needs exactly one binary
//! among the workspace's default members (the `pdsno` binary), and the README names the
//! test command CI runs.

use pdsno_shared::json::{self, Value};
use pdsno_tests::{run, workspace_root};

#[test]
fn cargo_run_at_the_root_has_exactly_one_binary_to_run() {
    let root = workspace_root();
    let manifest = root.join("Cargo.toml").display().to_string();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (code, out, err) = run(
        &cargo,
        &[
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
            &manifest,
        ],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{err}");
    let m = json::parse(out.as_bytes()).expect("metadata JSON");
    let defaults: Vec<&str> = m
        .get("workspace_default_members")
        .and_then(Value::as_array)
        .expect("default members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut bins = Vec::new();
    for p in m
        .get("packages")
        .and_then(Value::as_array)
        .expect("packages")
    {
        let id = p.get("id").and_then(Value::as_str).unwrap_or_default();
        if !defaults.contains(&id) {
            continue;
        }
        for t in p
            .get("targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let is_bin = t
                .get("kind")
                .and_then(Value::as_array)
                .is_some_and(|k| k.iter().any(|k| k.as_str() == Some("bin")));
            if is_bin {
                bins.push(
                    t.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned(),
                );
            }
        }
    }
    assert_eq!(
        bins,
        vec!["pdsno".to_owned()],
        "binaries `cargo run` chooses from"
    );

    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    assert!(readme.contains("cargo run --release -- demo"));
    assert!(readme.contains("cargo test --workspace"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    assert!(ci.contains("cargo test --workspace"));
}
