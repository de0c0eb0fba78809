//! What an operator meets when running nodes by hand: a data directory used twice, an
//! admitted node that lost its identity key.

use std::time::Duration;

use pdsno_tests::{Lab, run};

mod common;

fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        args,
        Duration::from_secs(60),
    )
}

#[test]
fn a_data_dir_serves_one_node_and_a_lost_identity_key_is_never_replaced() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let data = gc.data_dir.display().to_string();
    let secret = lab.secret_file.display().to_string();
    let second = [
        "global",
        "--data-dir",
        &data,
        "--bootstrap-secret-file",
        &secret,
        "--listen-grpc",
        "127.0.0.1:0",
        "--listen-rest",
        "127.0.0.1:0",
        "--listen-mqtt",
        "127.0.0.1:0",
    ];
    let (code, out, err) = pdsno(&second);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "in use by another pdsno process (pid {})",
            gc.proc.pid()
        )),
        "{err}"
    );
    // The running node was not disturbed.
    assert!(gc.proc.is_alive());
    gc.proc.terminate(Duration::from_secs(10));
    // The tools notice that node.json is from a run that ended.
    let (code, _, err) = pdsno(&["status", "--data-dir", &data]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no node is running on"), "{err}");

    // Stopped, the directory is free again; without its key the node refuses to start
    // rather than become someone else.
    std::fs::remove_file(gc.data_dir.join("identity.key")).expect("remove key");
    let (code, out, err) = pdsno(&second);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("identity key of global_cntl_1 is missing") && err.contains("backup"),
        "{err}"
    );
    assert!(
        !gc.data_dir.join("identity.key").exists(),
        "a new key was created"
    );
}

fn json_of(out: &str) -> pdsno_shared::json::Value {
    pdsno_shared::json::parse(out.as_bytes()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn devices_list_and_show_on_the_regional_and_global_controllers() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A"]);
    let rc = lab.child(
        "regional",
        "temp-rc-inv",
        &gc,
        "zone-A",
        &["--summary-interval", "0.3"],
    );
    let lc = lab.child(
        "local",
        "temp-lc-inv",
        &rc,
        "zone-A",
        &["--discovery-interval", "0.3"],
    );
    let rc_dir = rc.data_dir.display().to_string();
    let gc_dir = gc.data_dir.display().to_string();
    // The RC's region, then the GC's inventory, once the first report went up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (rc_rows, gc_rows) = loop {
        let (_, rc_out, _) = pdsno(&["devices", "list", "--data-dir", &rc_dir, "--json"]);
        let (_, gc_out, _) = pdsno(&["devices", "list", "--data-dir", &gc_dir, "--json"]);
        let (r, g) = (json_of(&rc_out), json_of(&gc_out));
        let n = |v: &pdsno_shared::json::Value| v.as_array().map_or(0, <[_]>::len);
        if n(&r) > 0 && n(&g) == n(&r) {
            break (r, g);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no inventory: {r:?} {g:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rows = rc_rows.as_array().expect("array");
    assert!(
        rows.iter()
            .all(|d| d.get("lc_id").and_then(|v| v.as_str()) == Some(lc.id.as_str()))
    );
    let macs: Vec<&str> = rows.iter().filter_map(|d| d.get("mac")?.as_str()).collect();
    let mut sorted = macs.clone();
    sorted.sort_unstable();
    assert_eq!(macs, sorted, "sorted by MAC");
    assert!(
        gc_rows
            .as_array()
            .expect("array")
            .iter()
            .all(|d| d.get("rc_id").and_then(|v| v.as_str()) == Some(rc.id.as_str()))
    );
    // Filters.
    let (code, out, _) = pdsno(&[
        "devices",
        "list",
        "--data-dir",
        &rc_dir,
        "--json",
        "--lc",
        "local_cntl_zone-A_99",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(json_of(&out).as_array().map(<[_]>::len), Some(0));
    let (_, out, _) = pdsno(&[
        "devices",
        "list",
        "--data-dir",
        &rc_dir,
        "--json",
        "--status",
        "active",
        "--region",
        "zone-A",
    ]);
    assert!(json_of(&out).as_array().is_some_and(|a| !a.is_empty()));
    // Text table and one device, its MAC in another spelling.
    let (code, out, _) = pdsno(&["devices", "list", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("MAC"), "{out}");
    assert!(out.contains(macs[0]), "{out}");
    let upper = macs[0].to_uppercase().replace(':', "-");
    let (code, out, err) = pdsno(&["devices", "show", &upper, "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(macs[0]) && out.contains(&rc.id), "{out}");
    let (code, _, err) = pdsno(&[
        "devices",
        "show",
        "02:00:de:ad:be:ef",
        "--data-dir",
        &rc_dir,
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no device 02:00:de:ad:be:ef"), "{err}");
    let (code, out, _) = pdsno(&[
        "devices",
        "show",
        "not-a-mac",
        "--data-dir",
        &rc_dir,
        "--json",
    ]);
    assert_eq!(code, Some(1));
    assert!(json_of(&out).get("error").is_some(), "{out}");
}

#[test]
fn sighup_does_not_stop_a_node() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let pid = gc.proc.pid().to_string();
    let (code, _, err) = run("kill", &["-HUP", &pid], Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gc.proc.stderr().contains("SIGHUP") {
        assert!(
            std::time::Instant::now() < deadline,
            "no SIGHUP line: {}",
            gc.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gc.proc.is_alive(), "SIGHUP ended the node");
    // Still serving.
    let (code, out, _) = pdsno(&["status", "--data-dir", &gc.data_dir.display().to_string()]);
    assert_eq!(code, Some(0), "{out}");
    // SIGTERM still stops it cleanly.
    assert_eq!(gc.proc.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn status_json_nests_each_controller_once_and_check_reports_a_dead_one() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A", "--heartbeat-interval", "0.2"]);
    let rc = lab.child(
        "regional",
        "temp-rc-st",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.2"],
    );
    let mut lcs: Vec<_> = (1..=2)
        .map(|i| {
            lab.child(
                "local",
                &format!("temp-lc-st{i}"),
                &rc,
                "zone-A",
                &["--heartbeat-interval", "0.2"],
            )
        })
        .collect();
    let gc_dir = gc.data_dir.display().to_string();
    let status = || {
        let (code, out, err) = pdsno(&["status", "--data-dir", &gc_dir, "--json", "--check"]);
        (code, json_of(&out), err)
    };
    use pdsno_shared::json::Value;
    let children = |v: &Value| -> Vec<Value> {
        v.get("children")
            .and_then(Value::as_array)
            .map(<[Value]>::to_vec)
            .unwrap_or_default()
    };
    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .filter_map(|c| c.get("controller_id")?.as_str().map(str::to_owned))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let st = loop {
        let (code, st, err) = status();
        let under_rc = children(&st)
            .first()
            .map(|r| ids(&children(r)).len())
            .unwrap_or(0);
        if code == Some(0) && under_rc == 2 {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{code:?} {err} {st:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The GC's own children are its RC only; the LCs are under the RC, in id order.
    assert_eq!(ids(&children(&st)), vec![rc.id.clone()]);
    let mut want: Vec<String> = lcs.iter().map(|l| l.id.clone()).collect();
    want.sort_by_key(|id| pdsno_shared::ids::ControllerId::parse(id).map(|c| c.seq));
    assert_eq!(ids(&children(&children(&st)[0])), want);
    // An LC dies: --check says so and exits 1.
    lcs[1].proc.kill();
    let dead = lcs[1].id.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, err) = status();
        if code == Some(1) {
            assert!(err.contains(&dead), "{err}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{code:?} {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn version_and_build_info_name_the_commit() {
    use std::io::{Read as _, Write as _};
    let (code, out, _) = pdsno(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("pdsno 0.") && out.contains("(commit "),
        "{out}"
    );
    let commit = out
        .split("(commit ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("commit")
        .to_owned();
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let mut s = std::net::TcpStream::connect(gc.rest).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(
        text.contains(&format!(
            "pdsno_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // The standard process series, before the closing EOF.
    let rss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6, "{rss}");
    for series in [
        "process_open_fds ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(series), "{series}: {text}");
    }
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// GET `path` on `addr`; (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

#[test]
fn ready_says_what_a_node_waits_for() {
    let lab = Lab::new();
    let mut gc = lab.global(&["--regions", "zone-A"]);
    let mut rc = lab.child(
        "regional",
        "temp-rc-rd",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.2"],
    );
    // Its broker comes with its credential, after admission.
    rc.proc
        .wait_line(Duration::from_secs(30), |l| l.starts_with("mqtt connected"));
    let (code, body) = http_get(gc.rest, "/ready");
    assert_eq!(code, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v.get("status").and_then(|s| s.as_str()), Some("ready"));
    assert_eq!(
        v.get("checks")
            .and_then(|c| c.get("nib"))
            .and_then(|s| s.as_str()),
        Some("ok")
    );
    // The RC is ready once its parent acknowledged a heartbeat and the broker is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(rc.rest, "/ready");
        if code == 200 {
            let v = json_of(&body);
            let checks = v.get("checks").expect("checks");
            for k in ["nib", "mqtt", "parent"] {
                assert_eq!(checks.get(k).and_then(|s| s.as_str()), Some("ok"), "{body}");
            }
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The GC (its parent and broker) goes away: not ready, with the reasons; still alive.
    gc.proc.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(rc.rest, "/ready");
        let v = json_of(&body);
        let failing = |k: &str| {
            v.get("checks")
                .and_then(|c| c.get(k))
                .and_then(|s| s.as_str())
                .is_some_and(|s| s != "ok")
        };
        if code == 503 && failing("mqtt") && failing("parent") {
            assert_eq!(v.get("status").and_then(|s| s.as_str()), Some("not ready"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _) = http_get(rc.rest, "/health");
    assert_eq!(code, 200, "liveness is not readiness");
}

#[test]
fn each_tier_help_has_examples_and_defaults() {
    for (tier, port) in [
        ("global", "50051"),
        ("regional", "50052"),
        ("local", "50053"),
    ] {
        let (code, out, _) = pdsno(&[tier, "--help"]);
        assert_eq!(code, Some(0));
        assert!(out.contains("Examples:"), "{tier}: {out}");
        assert!(
            out.contains(&format!("pdsno {tier} --data-dir")),
            "{tier}: {out}"
        );
        assert!(out.contains(&format!("127.0.0.1:{port}")), "{tier}: {out}");
        // Each flag with its default and variable, under a heading; only this tier's flags.
        assert!(
            out.contains(&format!(
                "[default: 127.0.0.1:{port}] [env: PDSNO_LISTEN_GRPC=]"
            )),
            "{tier}: {out}"
        );
        assert!(out.contains("Keys and TLS:"), "{tier}: {out}");
        // An option line of the help (not the examples).
        let shown = |flag: &str| {
            out.lines()
                .take_while(|l| !l.starts_with("Examples:"))
                .any(|l| {
                    let l = l.trim_start();
                    l.starts_with(&format!("--{flag} ")) || l == format!("--{flag}")
                })
        };
        let only = [
            ("regions", "global"),
            ("listen-mqtt", "global"),
            ("scanner", "local"),
            ("scan-once", "local"),
            ("summary-interval", "regional"),
            ("root-public-key", "regional"),
        ];
        for (flag, owner) in only {
            assert_eq!(
                shown(flag),
                owner == tier,
                "{tier} --help and --{flag}: {out}"
            );
        }
        assert_eq!(shown("temp-id"), tier != "global", "{tier}: {out}");
        assert_eq!(
            shown("bootstrap-secret-file"),
            tier != "local",
            "{tier}: {out}"
        );
    }
}

#[test]
fn boolean_settings_work_from_the_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d").display().to_string();
    let check = |k: &str, v: &str| {
        let out = std::process::Command::new(pdsno_tests::pdsno_bin())
            .args([
                "regional",
                "--data-dir",
                &data,
                "--parent",
                "http://127.0.0.1:1",
                "--region",
                "zone-A",
                "--temp-id",
                "t-1",
                "--check-config",
            ])
            .env("PDSNO_BOOTSTRAP_TOKEN", "a-token")
            .env(k, v)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // PDSNO_REQUIRE_TLS=true is a real requirement (it used to be ignored).
    let (code, err) = check("PDSNO_REQUIRE_TLS", "true");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("require_tls"), "{err}");
    let (code, err) = check("PDSNO_REQUIRE_TLS", "false");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check("PDSNO_REQUIRE_CLIENT_CERT", "1");
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn an_operator_lists_and_lifts_a_lockout_for_good() {
    use pdsno_node::transport::parent::ParentLink;
    let lab = Lab::new();
    let args = ["--lockout-failures", "2", "--lockout-secs", "600"];
    let mut gc = lab.global(&args);
    let gc_dir = gc.data_dir.display().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        for i in 0..2 {
            let c = common::RawChild::new(&lab, &format!("rc-bad-{i}"), "zone-A", "regional");
            let (status, _) = common::handshake(&link, &gc.id, &c, |p| {
                p.insert("signed_nonce".into(), "AAAA".into());
            })
            .await;
            assert_eq!(status, "REJECTED");
        }
    });
    let (code, out, err) = pdsno(&["lockout", "list", "--data-dir", &gc_dir, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows = json_of(&out);
    let row = rows.as_array().and_then(|a| a.first()).expect("a lockout");
    assert_eq!(
        row.get("source").and_then(|s| s.as_str()),
        Some("127.0.0.1")
    );
    let left = row
        .get("seconds_left")
        .and_then(|s| s.as_u64())
        .expect("left");
    assert!((590..=600).contains(&left), "{left}");
    // Lifted: the next admission from that address goes through, and a restart does not
    // bring the lockout back from the audit log.
    let (code, out, err) = pdsno(&["lockout", "clear", "127.0.0.1", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("lifted"), "{out}");
    gc.proc.terminate(Duration::from_secs(10));
    let gc = lab.ready(lab.spawn("global", "global", &args), "global");
    let (code, out, _) = pdsno(&["lockout", "list", "--data-dir", &gc_dir]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no address is locked out"), "{out}");
    let good = common::RawChild::new(&lab, "rc-good", "zone-A", "regional");
    let (status, reason) = rt.block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        common::handshake(&link, &gc.id, &good, |_| {}).await
    });
    assert_eq!(status, "APPROVED", "{reason}");
    let (_, tail, _) = pdsno(&["audit", "tail", "--data-dir", &gc_dir, "-n", "50"]);
    assert!(tail.contains("ADMISSION_LOCKOUT_CLEARED"), "{tail}");
}

#[test]
fn bootstrap_tokens_expire() {
    use pdsno_node::transport::parent::ParentLink;
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A,zone-B", "--lockout-failures", "0"]);
    let secret = lab.secret_file.display().to_string();
    let mint = |temp: &str, region: &str, ttl: &str| {
        let (code, out, err) = pdsno(&[
            "token",
            "--bootstrap-secret-file",
            &secret,
            "--temp-id",
            temp,
            "--region",
            region,
            "--type",
            "regional",
            "--ttl",
            ttl,
        ]);
        assert_eq!(code, Some(0), "{err}");
        out.trim().to_owned()
    };
    let short = mint("temp-rc-late", "zone-A", "1s");
    assert!(short.starts_with("pdsno1."), "{short}");
    let forever = mint("temp-rc-b", "zone-B", "0");
    assert_eq!(forever.len(), 64, "the original form: {forever}");
    std::thread::sleep(Duration::from_millis(2100));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let link = ParentLink::new(&gc.grpc_url()).expect("link");
        let mut late = common::RawChild::new(&lab, "temp-rc-late", "zone-A", "regional");
        late.token = short;
        assert_eq!(
            common::handshake(&link, &gc.id, &late, |_| {}).await,
            ("REJECTED".to_owned(), "BOOTSTRAP_TOKEN_EXPIRED".to_owned())
        );
        let mut b = common::RawChild::new(&lab, "temp-rc-b", "zone-B", "regional");
        b.token = forever;
        assert_eq!(
            common::handshake(&link, &gc.id, &b, |_| {}).await.0,
            "APPROVED"
        );
    });
    // A fresh token with the default lifetime admits a real controller, which says why when
    // its token is too old.
    let token = mint("temp-rc-a", "zone-A", "24h");
    let args = lab.first_start_args("regional", "temp-rc-a", &gc.grpc_url(), "zone-A");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = pdsno_tests::Proc::pdsno(
        "temp-rc-a",
        &args,
        &[("PDSNO_BOOTSTRAP_TOKEN", token.as_str())],
    );
    p.wait_line(Duration::from_secs(30), |l| l.starts_with("admitted "));
}

#[test]
fn an_admitted_controller_restarts_without_its_token_file() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let token_file = lab.dir.path().join("rc.token");
    pdsno_tests::write_private(&token_file, &lab.token("temp-rc-tf", "zone-A", "regional"));
    let tf = token_file.display().to_string();
    let url = gc.grpc_url();
    let args = [
        "--parent",
        url.as_str(),
        "--region",
        "zone-A",
        "--temp-id",
        "temp-rc-tf",
        "--bootstrap-token-file",
        tf.as_str(),
    ];
    let mut rc = lab.ready(lab.spawn("regional", "temp-rc-tf", &args), "temp-rc-tf");
    rc.proc.terminate(Duration::from_secs(10));
    // The operator deletes the spent token, as the unit files say; the config still names it.
    std::fs::remove_file(&token_file).expect("remove");
    let mut rc = lab.ready(lab.spawn("regional", "temp-rc-tf", &args), "temp-rc-tf");
    assert!(rc.proc.lines().iter().any(|l| l.starts_with("restored ")));
    assert!(
        rc.proc.stderr().contains("first start only"),
        "admission flags on an admitted data directory are pointed out: {}",
        rc.proc.stderr()
    );
    rc.proc.terminate(Duration::from_secs(10));
    // A first start without the file says what is missing.
    let mut args = lab.first_start_args("regional", "temp-rc-new", &url, "zone-B");
    args.extend(["--bootstrap-token-file".to_owned(), tf.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = pdsno(&args);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("bootstrap token file {tf} does not exist")),
        "{err}"
    );
}

#[test]
fn print_config_shows_the_effective_settings_and_no_secret() {
    let lab = Lab::new();
    let secret = lab.secret_file.display().to_string();
    let data = lab.data("pc").display().to_string();
    let out = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args([
            "global",
            "--data-dir",
            &data,
            "--bootstrap-secret-file",
            &secret,
            "--regions",
            "zone-A,zone-B",
            "--print-config",
        ])
        .env("PDSNO_HEARTBEAT_INTERVAL", "2.5")
        .env(
            "PDSNO_MESSAGE_SIGNING_SECRET",
            "network-secret-never-printed",
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let v = json_of(&text);
    let get = |k: &str| v.get(k).cloned().unwrap_or(pdsno_shared::json::Value::Null);
    assert_eq!(get("heartbeat_interval").as_str(), Some("2.5s"), "{text}");
    assert_eq!(get("listen_grpc").as_str(), Some("127.0.0.1:50051"));
    assert_eq!(get("network_key").as_str(), Some("[set]"));
    assert_eq!(get("bootstrap_secret").as_str(), Some("[set]"));
    assert!(
        !text.contains("network-secret-never-printed") && !text.contains(&lab.secret),
        "{text}"
    );
    assert!(
        !data.is_empty() && !lab.data("pc").exists(),
        "nothing started"
    );
}

/// Flags whose variable or TOML key departs from the rule, and why.
const NAMING_EXCEPTIONS: &[(&str, &str)] = &[
    ("config", "the file itself"),
    ("check-config", "an action, not a setting"),
    ("print-config", "an action, not a setting"),
    (
        "secret",
        "PDSNO_MESSAGE_SIGNING_SECRET, the original PDSNO's name; never inline in a file",
    ),
    (
        "secret-file",
        "PDSNO_MESSAGE_SIGNING_SECRET_FILE, after the original PDSNO's name",
    ),
    (
        "bootstrap-token",
        "a secret: never inline in a file (bootstrap_token_file)",
    ),
    ("user", "a secret: --user-file / [[mqtt_users]] in the file"),
    (
        "reader",
        "a secret: --reader-file / [[mqtt_users]] in the file",
    ),
    ("user-file", "accounts in the file are [[mqtt_users]]"),
    ("reader-file", "accounts in the file are [[mqtt_users]]"),
    (
        "scan-once",
        "a one-shot run, chosen when running, not a setting",
    ),
];

/// One naming rule: flag `--heartbeat-interval` <-> `PDSNO_HEARTBEAT_INTERVAL` <-> TOML
/// `heartbeat_interval`, for every flag of every tier, derived from the CLI definition.
#[test]
fn every_flag_has_its_variable_and_its_file_key() {
    let cmd = <pdsno_node::cli::Cli as clap::CommandFactory>::command();
    let dir = tempfile::tempdir().expect("tmp");
    let mut problems = Vec::new();
    let mut checked = 0;
    for tier in ["global", "regional", "local"] {
        let sub = cmd.find_subcommand(tier).expect("tier");
        for a in sub.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if NAMING_EXCEPTIONS.iter().any(|(f, _)| *f == long)
                || long == "help"
                || long == "version"
            {
                continue;
            }
            checked += 1;
            let snake = long.replace('-', "_");
            let want = format!("PDSNO_{}", snake.to_uppercase());
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            if env.as_deref() != Some(want.as_str()) {
                problems.push(format!("{tier} --{long}: variable {env:?}, want {want}"));
            }
            // A file key of the wrong type is refused as such (an unknown one differently).
            let file = dir.path().join(format!("{tier}-{snake}.toml"));
            std::fs::write(&file, format!("{snake} = {{ wrong = 1 }}\n")).expect("write");
            let f = file.display().to_string();
            let (code, _, err) = pdsno(&[tier, "--config", &f, "--check-config"]);
            if code != Some(2) || err.contains("unknown") || !err.contains(&snake) {
                problems.push(format!("{tier} --{long}: no file key {snake}: {err}"));
            }
        }
    }
    assert!(checked > 100, "{checked} flags checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn misspelt_variables_and_keys_are_errors_that_name_the_right_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d").display().to_string();
    let run_env = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(pdsno_tests::pdsno_bin());
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let base = [
        "regional",
        "--data-dir",
        &data,
        "--parent",
        "http://127.0.0.1:1",
        "--check-config",
    ];
    let (code, err, _) = run_env(&base, &[("PDSNO_REQUIRE_TSL", "true")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("unknown variable PDSNO_REQUIRE_TSL (did you mean PDSNO_REQUIRE_TLS?)"),
        "{err}"
    );
    let file = dir.path().join("rc.toml");
    std::fs::write(&file, "regoin = \"zone-A\"\n").expect("write");
    let f = file.display().to_string();
    let (code, err, _) = run_env(&["regional", "--config", &f, "--check-config"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("unknown key `regoin` (did you mean `region`?)"),
        "{err}"
    );
    // Old names keep working for a release: a renamed variable with a warning, old file keys.
    std::fs::write(&file, "heartbeat_interval_secs = 4.0\n").expect("write");
    let (code, err, out) = run_env(
        &[
            "regional",
            "--config",
            &f,
            "--parent",
            "http://127.0.0.1:1",
            "--print-config",
        ],
        &[("PDSNO_LOCKOUT_WINDOW", "45")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("PDSNO_LOCKOUT_WINDOW is deprecated; use PDSNO_LOCKOUT_WINDOW_SECS"),
        "{err}"
    );
    assert!(
        out.contains("lockout_window: 45s") && out.contains("\"heartbeat_interval\": \"4s\""),
        "{out}"
    );
}

#[test]
fn an_admission_benchmark_of_refusals_fails() {
    let lab = Lab::new();
    let gc = lab.global(&["--rate-limit-rps", "0", "--lockout-failures", "0"]);
    let wrong = lab.dir.path().join("wrong.secret");
    pdsno_tests::write_private(&wrong, "not-the-secret-of-this-controller-0123");
    let w = wrong.display().to_string();
    let url = gc.grpc_url();
    let (code, out, err) = pdsno(&[
        "bench",
        "admission",
        "--url",
        &url,
        "--bootstrap-secret-file",
        &w,
        "--conns",
        "1",
        "--duration",
        "1",
    ]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("most admissions failed"), "{err}");
    assert!(
        err.contains("INVALID_BOOTSTRAP_TOKEN"),
        "the first error is named: {err}"
    );
}

#[test]
fn logs_as_json_lines_at_the_chosen_level() {
    let lab = Lab::new();
    let mut gc = lab.ready(
        lab.spawn_env(
            "global",
            "global",
            &["--log-format", "json"],
            &[("RUST_LOG", "")],
        ),
        "global",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gc.proc.stderr().contains("pdsno starting") {
        assert!(std::time::Instant::now() < deadline, "{}", gc.proc.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    gc.proc.terminate(Duration::from_secs(10));
    let err = gc.proc.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        json_of(l);
    }
    let start = lines
        .iter()
        .map(|l| json_of(l))
        .find(|v| {
            v.get("fields")
                .and_then(|f| f.get("message"))
                .and_then(|m| m.as_str())
                == Some("pdsno starting")
        })
        .expect("the startup line");
    let fields = start.get("fields").expect("fields");
    assert!(
        fields
            .get("version")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.contains("(commit ")),
        "{start:?}"
    );
    assert!(fields.get("data_dir").is_some(), "{start:?}");
    // --log-level warn: no info lines.
    let lab = Lab::new();
    let mut gc = lab.ready(
        lab.spawn_env(
            "global",
            "global",
            &["--log-level", "warn"],
            &[("RUST_LOG", "")],
        ),
        "global",
    );
    gc.proc.terminate(Duration::from_secs(10));
    assert!(!gc.proc.stderr().contains(" INFO "), "{}", gc.proc.stderr());
}

#[test]
fn a_refused_region_is_told_which_regions_the_parent_admits() {
    let lab = Lab::new();
    let gc = lab.global(&["--regions", "zone-A,zone-B"]);
    let url = gc.grpc_url();
    let token = lab.token("temp-rc-q", "zone-Q", "regional");
    let out = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args(lab.first_start_args("regional", "temp-rc-q", &url, "zone-Q"))
        .env("PDSNO_BOOTSTRAP_TOKEN", &token)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("INVALID_REGION [this parent admits: zone-A, zone-B]")
            && err.contains("check --region"),
        "{err}"
    );
}

#[test]
fn a_child_signing_with_a_secret_its_parent_lacks_is_told_which_setting_differs() {
    let lab = Lab::new();
    // The global controller runs without a shared message-signing secret.
    let gc = lab.global(&[]);
    let url = gc.grpc_url();
    let token = lab.token("temp-rc-s", "zone-A", "regional");
    let secret = lab.data("network.secret");
    pdsno_tests::write_private(&secret, "a-shared-message-signing-secret-0123\n");
    let mut args = lab.first_start_args("regional", "temp-rc-s", &url, "zone-A");
    args.extend(["--secret-file".into(), secret.display().to_string()]);
    let out = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args(&args)
        .env("PDSNO_BOOTSTRAP_TOKEN", &token)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    // Final (exit 3), not retried, and the message names the setting on both sides.
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("--secret-file") && err.contains("same secret"),
        "{err}"
    );
    assert_eq!(
        err.matches("could not verify our admission request")
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn a_revoked_regional_controller_is_told_and_stops_with_its_own_exit_code() {
    let lab = Lab::new();
    let gc = lab.global(&[]);
    let mut rc = lab.child(
        "regional",
        "temp-rc-r",
        &gc,
        "zone-A",
        &["--heartbeat-interval", "0.2"],
    );
    rc.proc
        .wait_line(Duration::from_secs(30), |l| l.starts_with("key "));
    let (code, out, err) = pdsno(&[
        "controller",
        "revoke",
        &rc.id,
        "--data-dir",
        &gc.data_dir.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{out} {err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rc.proc.is_alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked RC keeps running: {}",
            rc.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = rc.proc.terminate(Duration::from_secs(1));
    let err = rc.proc.stderr();
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains(&format!(
            "controller {} was revoked by global_cntl_1",
            rc.id
        )) && err.contains("revoked by an operator"),
        "{err}"
    );
    // Started again on the same data directory, it is told again at once.
    let again = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args([
            "regional",
            "--data-dir",
            &rc.data_dir.display().to_string(),
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "0.2",
        ])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(5), "{err}");
    assert!(err.contains("was revoked by global_cntl_1"), "{err}");
}

#[test]
fn one_stream_when_stdout_and_stderr_are_the_same_file() {
    let lab = Lab::new();
    let log = lab.data("both.log");
    let file = std::fs::File::create(&log).expect("log file");
    let data = lab.data("gc");
    let secret = lab.data("gc.secret");
    pdsno_tests::write_private(&secret, "a-bootstrap-secret-for-one-stream\n");
    let mut child = std::process::Command::new(pdsno_tests::pdsno_bin())
        .args([
            "global",
            "--data-dir",
            &data.display().to_string(),
            "--bootstrap-secret-file",
            &secret.display().to_string(),
            "--regions",
            "zone-A",
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--listen-mqtt",
            "127.0.0.1:0",
        ])
        .stdout(file.try_clone().expect("clone"))
        .stderr(file)
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("controller ready") {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "not ready: {t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // The log says it once, with what the report line carried (the key to pin)...
    let ready: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("controller ready"))
        .collect();
    assert_eq!(ready.len(), 1, "{text}");
    assert!(ready[0].contains("public_key="), "{text}");
    // ... and no report line repeats it.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ready ") || l.starts_with("mqtt v4 ")),
        "{text}"
    );
}

#[test]
fn check_config_predicts_the_start() {
    let lab = Lab::new();
    let bin = pdsno_tests::pdsno_bin();
    let run_in = |cwd: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .current_dir(cwd)
            .env_remove("PDSNO_BOOTSTRAP_TOKEN")
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Relative paths in a file are relative to the file's directory, wherever the node runs.
    let etc = lab.data("etc");
    std::fs::create_dir_all(&etc).expect("etc");
    pdsno_tests::write_private(
        &etc.join("bootstrap.secret"),
        "a-bootstrap-secret-0123456789\n",
    );
    let conf = etc.join("global.toml");
    std::fs::write(
        &conf,
        "data_dir = \"gc-data\"\nbootstrap_secret_file = \"bootstrap.secret\"\nregions = [\"zone-A\"]\nscanner = \"probe\"\n",
    )
    .expect("write");
    let c = conf.display().to_string();
    let elsewhere = lab.data("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    let (code, out, err) = run_in(&elsewhere, &["global", "--config", &c, "--check-config"]);
    assert_eq!(code, Some(0), "{out} {err}");
    // A key the tier does not read is named.
    assert!(
        err.contains("`scanner` is read by the local controller only"),
        "{err}"
    );
    let (code, out, err) = run_in(&elsewhere, &["global", "--config", &c, "--print-config"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&etc.join("gc-data").display().to_string()),
        "the data directory is not under the file's directory: {out}"
    );
    // A flag for another tier draws a warning; a first start without its admission inputs
    // is refused before it starts.
    let lc = lab.data("lc").display().to_string();
    let cases: [(&[&str], i32, &str); 3] = [
        (
            &["global", "--config", &c, "--subnet", "10.0.0.0/24"],
            0,
            "--subnet is read by the local controller only",
        ),
        (
            &["local", "--data-dir", &lc, "--region", "zone-A"],
            2,
            "--temp-id is required",
        ),
        (
            &[
                "local",
                "--data-dir",
                &lc,
                "--region",
                "zone-A",
                "--temp-id",
                "t-1",
                "--bootstrap-token-file",
                "/nonexistent/lc.token",
            ],
            2,
            "/nonexistent/lc.token does not exist",
        ),
    ];
    for (args, want, says) in cases {
        let mut args = args.to_vec();
        args.push("--check-config");
        let (code, _, err) = run_in(&elsewhere, &args);
        assert_eq!(code, Some(want), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // TLS files as the node loads them: a certificate from another CA, an expired one.
    let (a, b) = (
        pdsno_tests::Pki::new(&lab, "ca-a"),
        pdsno_tests::Pki::new(&lab, "ca-b"),
    );
    let (cert, key) = a.issue("gc", &[]);
    let (old_cert, old_key) = a.issue("old", &["--days", "1", "--backdate-days", "3"]);
    let secret = etc.join("bootstrap.secret").display().to_string();
    let tls_check = |cert: &str, key: &str, ca: &str| {
        run_in(
            &elsewhere,
            &[
                "global",
                "--data-dir",
                &lc,
                "--bootstrap-secret-file",
                &secret,
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--tls-ca",
                ca,
                "--check-config",
            ],
        )
    };
    let (code, out, err) = tls_check(&cert, &key, &a.ca());
    assert_eq!(code, Some(0), "{out} {err}");
    let (code, _, err) = tls_check(&cert, &key, &b.ca());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not valid under tls_ca"), "{err}");
    let (code, _, err) = tls_check(&old_cert, &old_key, &a.ca());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[test]
fn older_file_keys_still_work_with_a_deprecation_warning() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("rc.toml");
    std::fs::write(
        &f,
        "heartbeat_interval_secs = 3.0\nkey_rotation_secs = 100\nregion = \"zone-A\"\n",
    )
    .expect("write");
    let data = dir.path().join("d").display().to_string();
    let fp = f.display().to_string();
    let (code, out, err) = pdsno(&[
        "regional",
        "--config",
        &fp,
        "--data-dir",
        &data,
        "--print-config",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"heartbeat_interval\": \"3s\""), "{out}");
    assert!(out.contains("\"key_rotation\": \"100s\""), "{out}");
    for (old, new) in [
        ("heartbeat_interval_secs", "heartbeat_interval"),
        ("key_rotation_secs", "key_rotation"),
    ] {
        assert!(
            err.contains(&format!("`{old}` is deprecated"))
                && err.contains(&format!("use `{new}`")),
            "{err}"
        );
    }
}

#[test]
fn the_probe_scanner_takes_its_ports_and_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("lc").display().to_string();
    let (code, out, err) = pdsno(&[
        "local",
        "--data-dir",
        &data,
        "--scanner",
        "probe",
        "--subnet",
        "10.9.0.0/28",
        "--probe-ports",
        "830,22",
        "--probe-timeout",
        "0.2",
        "--print-config",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v = json_of(&out);
    assert_eq!(
        pdsno_shared::json::to_canonical_string(v.get("probe_ports").expect("probe_ports")),
        "[830,22]"
    );
    assert_eq!(
        v.get("probe_timeout").and_then(|t| t.as_str()),
        Some("200ms")
    );
    let (code, _, err) = pdsno(&[
        "local",
        "--data-dir",
        &data,
        "--probe-ports",
        "0",
        "--print-config",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("probe_ports"), "{err}");
}
