//! The README's first command: `pdsno demo` brings a whole topology up, shows it, stops it,
//! and exits 0.

use std::time::Duration;

use pdsno_tests::{pdsno_bin, run};

#[test]
fn demo_admits_discovers_propagates_policy_and_reports_a_dead_lc() {
    let bin = pdsno_bin();
    let (code, out, err) = run(
        bin.to_str().expect("utf-8 path"),
        &["demo"],
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "demo failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("global_cntl_1  grpc 127.0.0.1:"), "{out}");
    // The operator is told where the data is, and that it goes away.
    let data = out
        .lines()
        .find_map(|l| l.strip_prefix("data and logs: "))
        .expect("the data line");
    assert!(
        data.ends_with("(deleted when the demo ends; --keep-data keeps them)"),
        "{data}"
    );
    let dir = data.split(' ').next().unwrap_or_default();
    assert!(!std::path::Path::new(dir).exists(), "{dir} was not deleted");
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
    // The controllers at work: discovery up to the GC inventory...
    for lc in ["local_cntl_zone-A_1", "local_cntl_zone-B_2"] {
        assert!(
            out.lines()
                .any(|l| l.contains(lc) && l.contains("cycle 1:") && l.contains("devices")),
            "{out}"
        );
    }
    let inv = out
        .lines()
        .find(|l| l.contains("global_cntl_1 inventory:"))
        .unwrap_or_else(|| panic!("no inventory line:\n{out}"));
    for region in ["zone-A=", "zone-B="] {
        let n: u64 = inv
            .split(region)
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n > 100, "{region} has {n} devices: {inv}");
    }
    // ...a policy change reaching every LC...
    assert!(out.contains("policy: version 2 published"), "{out}");
    assert_eq!(
        out.matches("applied it after checking both signatures")
            .count(),
        4,
        "{out}"
    );
    // ...and a dead LC reported offline, in the GC's view too.
    assert!(
        out.contains("regional_cntl_zone-B_1  reported it offline"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("local_cntl_zone-B_2") && l.contains(" offline (")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("local_cntl_zone-A_1  online") && l.contains("policy v2")),
        "{out}"
    );
    assert!(out.contains("stopping 7 processes"), "{out}");
}

/// `pdsno demo --edge`: the single-box site at work, a remote local controller joining it,
/// and the memory of the one process.
#[test]
fn demo_edge_runs_a_site_in_one_process_and_a_remote_lc_joins_it() {
    let bin = pdsno_bin();
    let (code, out, err) = run(
        bin.to_str().expect("utf-8 path"),
        &["demo", "--edge"],
        Duration::from_secs(120),
    );
    assert_eq!(
        code,
        Some(0),
        "demo --edge failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("one process (pid "), "{out}");
    let rc_devices: u64 = out
        .lines()
        .find_map(|l| l.split("regional_cntl_zone-A_1  stores ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no RC line:\n{out}"));
    assert!(rc_devices > 100, "{out}");
    assert!(
        out.contains(&format!("global_cntl_1  inventory: zone-A={rc_devices}")),
        "the GC inventory holds what the RC stores:\n{out}"
    );
    assert!(
        out.contains("local_cntl_zone-A_3 (its own process, was temp-lc-remote) admitted by regional_cntl_zone-A_1"),
        "{out}"
    );
    for id in [
        "regional_cntl_zone-A_1",
        "local_cntl_zone-A_1",
        "local_cntl_zone-A_2",
        "local_cntl_zone-A_3",
    ] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(id) && l.contains("applied it")),
            "{id} did not apply the policy:\n{out}"
        );
    }
    assert!(out.contains("reported it offline after"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("local_cntl_zone-A_3") && l.contains(" offline ")),
        "{out}"
    );
    let mib: u64 = out
        .lines()
        .find_map(|l| l.split("memory: the site process (4 controllers) ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory line:\n{out}"));
    assert!(mib > 0, "{out}");
}
