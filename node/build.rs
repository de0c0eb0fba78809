//! Records the source commit (when built from a git checkout) for `pdsno --version` and the
//! `pdsno_build_info` metric.

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    // Not a PDSNO_* name: `cargo run` also exports it to the program it runs, and a node
    // refuses PDSNO_* variables it does not know (the demo's controllers would stop).
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a new commit or checkout), not on every change.
    for f in ["../.git/HEAD", "../.git/refs/heads"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
