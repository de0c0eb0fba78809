//! The README's first command: `pdsno demo` brings a whole topology up, shows it, stops it,
//! and exits 0.

use std::time::Duration;

use pdsno_tests::{pdsno_bin, run};

#[test]
fn demo_admits_everyone_and_exits_zero() {
    let bin = pdsno_bin();
    let (code, out, err) = run(
        bin.to_str().expect("utf-8 path"),
        &["demo"],
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "demo failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("global_cntl_1  grpc 127.0.0.1:"), "{out}");
    for id in [
        "regional_cntl_zone-A_1",
        "regional_cntl_zone-B_1",
        "local_cntl_zone-A_1",
        "local_cntl_zone-A_2",
        "local_cntl_zone-B_1",
        "local_cntl_zone-B_2",
    ] {
        assert!(out.contains(id), "{id} missing from the tree:\n{out}");
    }
    assert!(out.contains("admitted by regional_cntl_zone-B_1"), "{out}");
    assert!(out.contains("6 admissions succeeded"), "{out}");
    assert!(out.contains("stopping 7 processes"), "{out}");
}
