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
    // `cargo run` exports build-script variables to the program: a PDSNO_* one would be an
    // unknown variable to every controller the demo starts.
    for build in ["node/build.rs", "shared/build.rs"] {
        let text = std::fs::read_to_string(root.join(build)).unwrap_or_default();
        assert!(
            !text.contains("rustc-env=PDSNO_"),
            "{build} exports a PDSNO_ variable"
        );
    }
    assert!(readme.contains("cargo test --workspace"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    assert!(ci.contains("cargo test --workspace"));
}

/// The commands of a ```sh block, continuation lines joined, comments and blank lines
/// dropped.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines() {
        let line = line.split(" #").next().unwrap_or("").trim_end();
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(line);
                out.push(std::mem::take(&mut cur).trim().to_owned());
            }
        }
    }
    out
}

/// "## Run a controller" as written: the secret and token commands, a GC, an RC and an LC,
/// each in the shell, in the README's order, in a fresh directory. Only the ports differ
/// (free ones, given through the tiers' PDSNO_LISTEN_* variables and rewritten in --parent
/// URLs).
#[test]
fn the_run_a_controller_walk_through_works_as_written() {
    use pdsno_tests::{Proc, free_port};
    use std::time::Duration;
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README");
    let section = readme
        .split("## Run a controller")
        .nth(1)
        .expect("the section");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its sh block");
    let cmds = commands(block);
    assert!(cmds.len() >= 5, "{cmds:?}");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = pdsno_tests::pdsno_bin().display().to_string();
    // Each tier's default ports, and the free ones it gets here.
    let tiers = [
        ("global", 50051u16, 8001u16),
        ("regional", 50052, 8002),
        ("local", 50053, 8003),
    ];
    let ports: Vec<(u16, u16)> = tiers.iter().map(|_| (free_port(), free_port())).collect();
    let mqtt = free_port();
    let mut running = Vec::new();
    for cmd in &cmds {
        assert!(cmd.starts_with("pdsno "), "{cmd}");
        let mut line = cmd.replacen("pdsno", &bin, 1);
        for (i, (_, grpc, _)) in tiers.iter().enumerate() {
            line = line.replace(
                &format!("127.0.0.1:{grpc}"),
                &format!("127.0.0.1:{}", ports[i].0),
            );
        }
        let script = format!("cd '{}' && exec {line}", dir.path().display());
        let sub = cmd.split_whitespace().nth(1).unwrap_or_default();
        match tiers.iter().position(|(t, _, _)| *t == sub) {
            Some(i) => {
                let grpc = format!("127.0.0.1:{}", ports[i].0);
                let rest = format!("127.0.0.1:{}", ports[i].1);
                let mqtt = format!("127.0.0.1:{mqtt}");
                let mut env = vec![
                    ("PDSNO_LISTEN_GRPC", grpc.as_str()),
                    ("PDSNO_LISTEN_REST", rest.as_str()),
                ];
                if sub == "global" {
                    env.push(("PDSNO_LISTEN_MQTT", mqtt.as_str()));
                }
                let mut p =
                    Proc::spawn(sub, std::path::Path::new("/bin/sh"), &["-c", &script], &env);
                p.wait_line(Duration::from_secs(60), |l| l.starts_with("ready "));
                running.push(p);
            }
            None => {
                let (code, out, err) = run("/bin/sh", &["-c", &script], Duration::from_secs(60));
                assert_eq!(code, Some(0), "{cmd}: {out}{err}");
            }
        }
    }
    assert_eq!(running.len(), 3, "a GC, an RC and an LC: {cmds:?}");
    let lc = running.last_mut().expect("lc");
    let ready = lc.wait_line(Duration::from_secs(5), |l| l.starts_with("ready "));
    assert!(ready.contains("id=local_cntl_zone-A_1"), "{ready}");
    // The operating commands work on the same data directories.
    let gc_data = dir.path().join("gc-data").display().to_string();
    let (code, out, err) = run(
        &bin,
        &["status", "--data-dir", &gc_data],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("regional_cntl_zone-A_1"), "{out}");
    // The "Operating" block, as written, on the same data directories; a device's MAC comes
    // from the list, as the README says.
    let ops = section
        .split("Operating a running node")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the operating block");
    let rc_data = dir.path().join("rc-a-data").display().to_string();
    let mac = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, out, _) = run(
                &bin,
                &["devices", "list", "--data-dir", &rc_data, "--json"],
                Duration::from_secs(30),
            );
            let first = pdsno_shared::json::parse(out.as_bytes())
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                .and_then(|d| d.get("mac").and_then(|m| m.as_str().map(str::to_owned)));
            if let Some(m) = first {
                break m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no device reached the RC: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut ran = 0;
    for cmd in commands(ops) {
        let line = cmd
            .replacen("pdsno ", &format!("{bin} "), 1)
            .replace(" MAC ", &format!(" {mac} "));
        let script = format!("cd '{}' && {line}", dir.path().display());
        let (code, out, err) = run("/bin/sh", &["-c", &script], Duration::from_secs(60));
        assert_eq!(code, Some(0), "{cmd}: {out}{err}");
        ran += 1;
    }
    assert!(ran >= 12, "{ran} operating commands");
    // The last one revoked the local controller: it was told, and stopped with code 5.
    let lc = running.last_mut().expect("lc");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while lc.is_alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked LC runs on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lc.terminate(Duration::from_secs(1)),
        Some(5),
        "{}",
        lc.stderr()
    );
    for mode in [
        "bootstrap.secret",
        "rc-a.token",
        "lc-1.token",
        "rc-a-data/bootstrap.secret",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(dir.path().join(mode))
            .expect(mode)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o600, "{mode}");
    }
}

/// "## Run a single-box site" as written: `pdsno edge`, then a token and a local controller
/// of another box joining the site's regional controller, in a fresh directory. Only the
/// ports differ (port 0 through the PDSNO_* variables; `RC_HOST:50052` becomes the
/// regional controller's address as it reports it).
#[test]
fn the_single_box_site_works_as_written() {
    use pdsno_tests::Proc;
    use std::time::Duration;
    let wait = Duration::from_secs(60);
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README");
    let section = readme
        .split("## Run a single-box site")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the section");
    let blocks: Vec<&str> = section
        .split("```sh")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert_eq!(blocks.len(), 2, "{section}");
    let site = commands(blocks[0]);
    assert_eq!(site.len(), 1, "{site:?}");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = pdsno_tests::pdsno_bin().display().to_string();
    let sh = |line: &str| format!("cd '{}' && exec {line}", dir.path().display());
    // Port 0 everywhere: each listener takes a free port itself (no race with other tests).
    let any = "127.0.0.1:0".to_owned();
    let ports = [
        ("PDSNO_LISTEN_GRPC", any.clone()),
        ("PDSNO_LISTEN_REST", any.clone()),
        ("PDSNO_LISTEN_MQTT", any.clone()),
        ("PDSNO_REGIONAL_LISTEN_GRPC", any.clone()),
        ("PDSNO_REGIONAL_LISTEN_REST", any.clone()),
    ];
    let env: Vec<(&str, &str)> = ports.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let script = sh(&site[0].replacen("pdsno", &bin, 1));
    let mut edge = Proc::spawn(
        "edge",
        std::path::Path::new("/bin/sh"),
        &["-c", &script],
        &env,
    );
    // The last of the four to start: the second local controller.
    edge.wait_line(wait, |l| l.starts_with("ready id=local_cntl_zone-A_2 "));
    let rc_ready = edge.wait_line(wait, |l| l.starts_with("ready id=regional_cntl_zone-A_1 "));
    let rc_grpc = pdsno_tests::field(&rc_ready, "grpc").expect("the RC's gRPC address");
    let ids: Vec<String> = edge
        .lines()
        .iter()
        .filter(|l| l.starts_with("ready "))
        .filter_map(|l| pdsno_tests::field(l, "id"))
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");

    let remote = commands(blocks[1]);
    assert_eq!(remote.len(), 2, "{remote:?}");
    let (code, out, err) = run(
        "/bin/sh",
        &["-c", &sh(&remote[0].replacen("pdsno", &bin, 1))],
        wait,
    );
    assert_eq!(code, Some(0), "{}: {out}{err}", remote[0]);
    let line = remote[1]
        .replacen("pdsno", &bin, 1)
        .replace("RC_HOST:50052", &rc_grpc);
    let lc_ports = [
        ("PDSNO_LISTEN_GRPC", any.clone()),
        ("PDSNO_LISTEN_REST", any.clone()),
    ];
    let env: Vec<(&str, &str)> = lc_ports.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut lc = Proc::spawn(
        "lc-remote",
        std::path::Path::new("/bin/sh"),
        &["-c", &sh(&line)],
        &env,
    );
    let ready = lc.wait_line(wait, |l| l.starts_with("ready "));
    assert!(ready.contains("id=local_cntl_zone-A_3"), "{ready}");
    // The operating commands take the site's data directories.
    let rc_data = dir.path().join("site/regional").display().to_string();
    let (code, out, err) = run(&bin, &["status", "--data-dir", &rc_data], wait);
    assert_eq!(code, Some(0), "{err}");
    for id in [
        "local_cntl_zone-A_1",
        "local_cntl_zone-A_2",
        "local_cntl_zone-A_3",
    ] {
        assert!(out.contains(id), "{out}");
    }
    assert_eq!(lc.terminate(wait), Some(0));
    assert_eq!(edge.terminate(wait), Some(0), "{}", edge.stderr());
}
