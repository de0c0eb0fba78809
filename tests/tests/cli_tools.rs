//! The operator tools' small promises: shell completions and manual pages generated from the
//! command line, `--json` output that is JSON for results and errors alike, and an admission
//! benchmark that starts its own parent and fails when nothing gets through.

use std::time::Duration;

use pdsno_shared::json::Value;
use pdsno_tests::{Lab, run};

const WAIT: Duration = Duration::from_secs(60);

fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        args,
        Duration::from_secs(120),
    )
}

/// As [`pdsno`], reading stdout while the program runs: a completion script is larger than
/// a pipe holds.
fn pdsno_big(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run pdsno");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(out: &str) -> Value {
    pdsno_shared::json::parse(out.as_bytes()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
}

#[test]
fn completions_are_scripts_that_know_the_subcommands_and_flags() {
    let (code, out, err) = pdsno_big(&["completions", "bash"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("global") && out.contains("--data-dir"),
        "{out}"
    );
    assert!(
        out.contains("complete -F"),
        "a bash completion script: {out}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = pdsno_big(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(out.contains("bootstrap-secret-file"), "{shell}: {out}");
    }
    let (code, out, err) = pdsno(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(err.contains("bash") && err.contains("zsh"), "{err}");
}

#[test]
fn man_writes_a_page_for_pdsno_and_each_subcommand() {
    let dir = tempfile::tempdir().expect("tmp");
    let out_dir = dir.path().join("man1");
    let d = out_dir.display().to_string();
    let (code, out, err) = pdsno(&["man", "--out-dir", &d]);
    assert_eq!(code, Some(0), "{err}");
    for page in [
        "pdsno.1",
        "pdsno-global.1",
        "pdsno-keys-list.1",
        "pdsno-bench-admission.1",
    ] {
        let path = out_dir.join(page);
        assert!(out.contains(&path.display().to_string()), "{page}: {out}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        let name = page.trim_end_matches(".1");
        assert!(text.contains(&format!(".TH {name} 1")), "{page}: {text}");
    }
    let global = std::fs::read_to_string(out_dir.join("pdsno-global.1")).expect("page");
    assert!(
        global.contains("data\\-dir"),
        "the flags are documented: {global}"
    );
    // Without --out-dir: the main page on stdout, nothing written.
    let (code, out, err) = pdsno_big(&["man"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(".TH pdsno 1") && out.contains("completions"),
        "{out}"
    );
    // A directory that cannot be made: an error saying what to give.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let (code, _, err) = pdsno(&["man", "--out-dir", &file.display().to_string()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--out-dir"), "{err}");
}

/// The `grpc.handshake conns=N ...` line of a run, and its `ok=` count.
fn run_line(out: &str, conns: usize) -> (String, usize) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("grpc.handshake conns={conns} ")))
        .unwrap_or_else(|| panic!("no run with {conns} conns: {out}"))
        .to_owned();
    let ok = pdsno_tests::field(&line, "ok")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ok= in {line}"));
    (line, ok)
}

#[test]
fn bench_admission_without_url_benchmarks_a_parent_of_its_own() {
    let (code, out, err) = pdsno(&["bench", "admission", "--conns", "1,2", "--max", "20"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // Each run has its own --max: the second run is not left with nothing to do.
    for conns in [1, 2] {
        let (line, ok) = run_line(&out, conns);
        assert_eq!(ok, 20, "{line}");
        assert!(line.contains(" errors=0"), "{line}");
        assert!(!line.contains(" 0 ops/s"), "{line}");
    }
    assert!(out.contains("grpc.handshake.best "), "{out}");
    assert!(
        err.contains("no --url: starting a global controller"),
        "{err}"
    );
    // Its data directory is gone.
    let data = err
        .split("data in ")
        .nth(1)
        .and_then(|s| s.split(", deleted").next())
        .unwrap_or_else(|| panic!("no data directory named: {err}"));
    assert!(!std::path::Path::new(data).exists(), "{data} left behind");

    // Local controllers need a regional parent: it starts both.
    let (code, out, err) = pdsno(&[
        "bench",
        "admission",
        "--kind",
        "local",
        "--conns",
        "2",
        "--max",
        "10",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(run_line(&out, 2).1, 10, "{out}");
    assert!(err.contains("a global and a regional controller"), "{err}");
}

#[test]
fn bench_admission_shows_progress_on_stderr_for_longer_runs() {
    let (code, out, err) = pdsno(&["bench", "admission", "--conns", "1", "--duration", "4"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("progress conns=1 "))
        .collect();
    assert!(progress.len() >= 2, "a line about every second: {err}");
    assert!(
        progress.iter().all(|l| l.contains(" admitted, 0 errors, ")),
        "{err}"
    );
    // Stdout keeps only the result lines.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("grpc.handshake conns=1 "), "{out}");
    assert!(lines[1].starts_with("grpc.handshake.best "), "{out}");
    assert!(run_line(&out, 1).1 > 0, "{out}");
}

#[test]
fn bench_admission_at_a_wrong_url_fails_and_says_what_to_check() {
    let lab = Lab::new();
    let url = format!("http://127.0.0.1:{}", pdsno_tests::free_port());
    let secret = lab.secret_file.display().to_string();
    let started = std::time::Instant::now();
    let (code, out, err) = pdsno(&[
        "bench",
        "admission",
        "--url",
        &url,
        "--bootstrap-secret-file",
        &secret,
        "--conns",
        "1,2",
        "--duration",
        "30",
    ]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("most admissions failed"), "{err}");
    assert!(err.contains(&url) && err.contains("--url"), "{err}");
    // It gives up instead of spinning for the whole duration of every run.
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    assert!(!out.contains("grpc.handshake conns=2 "), "{out}");
    // TLS files only make sense for a parent at --url.
    let (code, _, err) = pdsno(&["bench", "admission", "--tls-ca", &secret]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--url"), "{err}");
}

#[test]
fn errors_under_json_are_json_with_the_same_exit_code() {
    let (code, out, err) = pdsno(&["status", "--json", "--data-dir", "/nonexistent"]);
    assert_eq!(code, Some(1), "{err}");
    let v = json_of(&out);
    let msg = str_at(&v, &["error"]).expect("an error field");
    assert!(msg.contains("/nonexistent"), "{msg}");
    // The text form: the same message on stderr, nothing on stdout.
    let (code, text_out, err) = pdsno(&["status", "--data-dir", "/nonexistent"]);
    assert_eq!(code, Some(1));
    assert!(text_out.is_empty(), "{text_out}");
    assert_eq!(err.trim(), format!("error: {msg}"));

    for (args, want) in [
        (
            vec!["policy", "show", "--json", "--data-dir", "/nonexistent"],
            1,
        ),
        (
            vec!["keys", "list", "--json", "--data-dir", "/nonexistent"],
            1,
        ),
        (
            vec!["lockout", "list", "--json", "--data-dir", "/nonexistent"],
            1,
        ),
        (
            vec!["audit", "tail", "--json", "--data-dir", "/nonexistent"],
            2,
        ),
        // Usage errors too.
        (vec!["devices", "show", "--json"], 2),
        (vec!["policy", "show", "--json", "--no-such-flag"], 2),
    ] {
        let (code, out, err) = pdsno(&args);
        assert_eq!(code, Some(want), "{args:?}: {out}\n{err}");
        let v = json_of(&out);
        assert!(
            str_at(&v, &["error"]).is_some_and(|e| !e.is_empty()),
            "{args:?}: {out}"
        );
    }
}

#[test]
fn json_output_is_machine_readable_and_policy_show_carries_its_signatures() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A"]);
    let mut rc = lab.child("regional", "temp-rc-j", &gc, "zone-A", &[]);
    let mut lc = lab.child("local", "temp-lc-j", &rc, "zone-A", &[]);
    rc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 republished"));
    lc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=1 applied"));
    let gc_dir = gc.data_dir.display().to_string();
    let lc_dir = lc.data_dir.display().to_string();

    let policy = lab.dir.path().join("policy.json");
    std::fs::write(&policy, r#"{"max_devices": 42}"#).expect("policy");
    let (code, out, err) = pdsno(&[
        "policy",
        "set",
        &policy.display().to_string(),
        "--json",
        "--data-dir",
        &gc_dir,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        json_of(&out).get("policy_version").and_then(Value::as_u64),
        Some(2)
    );

    // The GC: its own document, signed by itself.
    let (code, out, err) = pdsno(&["policy", "show", "--json", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    let v = json_of(&out);
    assert_eq!(v.get("policy_version").and_then(Value::as_u64), Some(2));
    assert_eq!(
        v.get("content")
            .and_then(|c| c.get("max_devices"))
            .and_then(Value::as_u64),
        Some(42)
    );
    assert_eq!(str_at(&v, &["scope"]), Some("global"));
    assert_eq!(str_at(&v, &["distributed_by"]), Some(gc.id.as_str()));
    assert_eq!(str_at(&v, &["signature", "signer"]), Some(gc.id.as_str()));
    assert_eq!(str_at(&v, &["signature", "algorithm"]), Some("Ed25519"));
    assert!(str_at(&v, &["signature", "signed_at"]).is_some(), "{out}");
    assert_eq!(v.get("origin"), Some(&Value::Null), "{out}");
    // The text form is for people: a summary line, then the document.
    let (code, text, err) = pdsno(&["policy", "show", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.starts_with("policy version 2 (global)"), "{text}");
    assert!(
        text.contains(&format!("signed Ed25519 by {} at ", gc.id)),
        "{text}"
    );
    assert!(text.contains("\"max_devices\": 42"), "{text}");
    assert!(
        pdsno_shared::json::parse(text.as_bytes()).is_err(),
        "{text}"
    );

    // The LC: its region's copy, signed by the RC, carrying the GC's signature.
    lc.proc
        .wait_line(WAIT, |l| l.starts_with("policy version=2 applied"));
    let (code, out, err) = pdsno(&["policy", "show", "--json", "--data-dir", &lc_dir]);
    assert_eq!(code, Some(0), "{err}");
    let v = json_of(&out);
    assert_eq!(v.get("policy_version").and_then(Value::as_u64), Some(2));
    assert_eq!(str_at(&v, &["target_region"]), Some("zone-A"));
    assert_eq!(str_at(&v, &["signature", "signer"]), Some(rc.id.as_str()));
    assert_eq!(str_at(&v, &["origin", "signer"]), Some(gc.id.as_str()));
    let (_, text, _) = pdsno(&["policy", "show", "--data-dir", &lc_dir]);
    assert!(
        text.contains(&format!("origin signed Ed25519 by {} at ", gc.id)),
        "{text}"
    );

    // Every other --json form parses.
    let (code, out, err) = pdsno(&["status", "--json", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        str_at(&json_of(&out), &["controller_id"]),
        Some(gc.id.as_str())
    );
    for args in [
        vec!["devices", "list", "--json", "--data-dir", &gc_dir],
        vec!["lockout", "list", "--json", "--data-dir", &gc_dir],
        vec!["keys", "list", "--json", "--data-dir", &lc_dir],
    ] {
        let (code, out, err) = pdsno(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(json_of(&out).as_array().is_some(), "{args:?}: {out}");
    }
    let (code, out, err) = pdsno(&["audit", "tail", "--json", "-n", "3", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    let events: Vec<Value> = out.lines().map(json_of).collect();
    assert_eq!(events.len(), 3, "{out}");
    assert!(events.iter().all(|e| str_at(e, &["event_type"]).is_some()));
}

/// `pdsno bench soak`, as short as it goes: the topology comes up, one sample names every
/// tier's memory and NIB, there are too few samples for a slope, and everything stops (the
/// demo's data directory is gone).
#[test]
fn bench_soak_samples_every_tier_and_cleans_up() {
    let (code, out, err) = pdsno_big(&[
        "bench",
        "soak",
        "--minutes",
        "0",
        "--regions",
        "1",
        "--locals",
        "2",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("soak: 1 global, 1 regional, 2 local controllers"),
        "{out}"
    );
    let sample = out
        .lines()
        .find(|l| l.trim_start().starts_with("0.0 "))
        .unwrap_or_else(|| panic!("no sample line:\n{out}"));
    let numbers: Vec<u64> = sample
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // RSS and NIB for the GC, the RC and the LC, each above zero.
    assert_eq!(numbers.len(), 6, "{sample}");
    assert!(numbers.iter().all(|n| *n > 0), "{sample}");
    assert!(
        out.contains("slopes: too few samples after the warm-up"),
        "{out}"
    );
    let data = err
        .lines()
        .chain(out.lines())
        .find_map(|l| l.strip_prefix("data and logs: "))
        .and_then(|l| l.split(' ').next().map(str::to_owned));
    if let Some(d) = data {
        assert!(!std::path::Path::new(&d).exists(), "{d} left behind");
    }
}
