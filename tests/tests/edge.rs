//! `pdsno edge`: a global, a regional and two local controllers in one process, each with
//! its own data directory and NIB, admitting each other with the same tokens and
//! signatures as separate processes, over the in-process bus (no gRPC between them);
//! discovery reaches the GC inventory, a policy every
//! controller, liveness is tracked; a local controller running as its own process joins
//! the site's regional controller; a restart restores every tier; bad input is refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, num};
use pdsno_node::nib::Nib;
use pdsno_node::report::Report;
use pdsno_shared::json::{Map, Value};
use pdsno_tests::{Proc, run};

const WAIT: Duration = Duration::from_secs(60);

fn edge_args(site: &Path, locals: &str) -> Vec<String> {
    let any = "127.0.0.1:0";
    [
        "edge",
        "--data-dir",
        &site.display().to_string(),
        "--locals",
        locals,
        "--listen-grpc",
        any,
        "--listen-rest",
        any,
        "--listen-mqtt",
        any,
        "--regional-listen-grpc",
        any,
        "--regional-listen-rest",
        any,
        "--heartbeat-interval",
        "0.5",
        "--discovery-interval",
        "1",
        "--summary-interval",
        "1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn start(name: &str, args: &[String]) -> Proc {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::pdsno(name, &a, &[("PDSNO_BOOTSTRAP_SECRET", "")])
}

/// One controller of the site as its `ready` report tells it.
#[derive(Clone, Debug)]
struct Tier {
    id: String,
    role: String,
    grpc: String,
    rest: String,
    data: PathBuf,
}

/// Waits for the `ready` reports of the site's `n` controllers.
fn tiers(p: &mut Proc, site: &Path, n: usize) -> Vec<Tier> {
    let ready = |l: &str| matches!(Report::parse(l), Some(Report::Ready { .. }));
    let mut out = Vec::new();
    while out.len() < n {
        p.wait_line(WAIT, |l| ready(l) && p_count(l, &out));
        out = p
            .lines()
            .iter()
            .filter_map(|l| match Report::parse(l) {
                Some(Report::Ready {
                    id,
                    role,
                    grpc,
                    rest,
                    ..
                }) => Some((id, role, grpc, rest)),
                _ => None,
            })
            .map(|(id, role, grpc, rest)| Tier {
                data: site.join(match role.as_str() {
                    "global" => "global".to_owned(),
                    "regional" => "regional".to_owned(),
                    _ => format!("local-{}", id.rsplit('_').next().unwrap_or("?")),
                }),
                id,
                role,
                grpc,
                rest,
            })
            .collect();
    }
    out
}

/// A `ready` line of a controller not yet in `seen`.
fn p_count(line: &str, seen: &[Tier]) -> bool {
    pdsno_node::report::field(line, "id").is_some_and(|id| seen.iter().all(|t| t.id != id))
}

async fn status(t: &Tier) -> Value {
    let key = pdsno_node::admin::read_key(&t.data).expect("admin key");
    pdsno_node::admin::call(
        &format!("http://{}", t.grpc),
        &key,
        "status",
        &Value::Object(Map::new()),
        Duration::from_secs(10),
    )
    .await
    .expect("status")
}

/// `pdsno_messages_total{type,transport,outcome="accepted"}` at `t`.
fn accepted(t: &Tier, kind: &str, transport: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&t.rest).expect("connect to REST");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let want = format!(
        "pdsno_messages_total{{type=\"{kind}\",transport=\"{transport}\",outcome=\"accepted\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn child<'a>(st: &'a Value, id: &str) -> Option<&'a Value> {
    st.get("children")?
        .as_array()?
        .iter()
        .find(|c| c.get("controller_id").and_then(Value::as_str) == Some(id))
}

fn liveness(st: &Value, id: &str) -> String {
    child(st, id)
        .and_then(|c| c.get("liveness"))
        .and_then(Value::as_str)
        .unwrap_or("absent")
        .to_owned()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_runs_a_whole_site_and_a_remote_local_controller_joins_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("site");
    let args = edge_args(&site, "2");
    let mut edge = start("edge", &args);
    let t = tiers(&mut edge, &site, 4);
    let by_role = |r: &str| -> Vec<Tier> { t.iter().filter(|x| x.role == r).cloned().collect() };
    let (gc, rc, lcs) = (
        by_role("global").remove(0),
        by_role("regional").remove(0),
        by_role("local"),
    );
    assert_eq!(gc.id, "global_cntl_1");
    assert_eq!(rc.id, "regional_cntl_zone-A_1");
    let mut lc_ids: Vec<&str> = lcs.iter().map(|l| l.id.as_str()).collect();
    lc_ids.sort_unstable();
    assert_eq!(lc_ids, ["local_cntl_zone-A_1", "local_cntl_zone-A_2"]);

    // Admission as between processes: the RC by the GC, the LCs by the RC, each once.
    let admitted: Vec<(String, String)> = edge
        .lines()
        .iter()
        .filter_map(|l| match Report::parse(l) {
            Some(Report::Admitted { id, parent, .. }) => Some((id, parent)),
            _ => None,
        })
        .collect();
    assert_eq!(admitted.len(), 3, "{admitted:?}");
    assert!(admitted.contains(&(rc.id.clone(), gc.id.clone())));
    for lc in &lcs {
        assert!(admitted.contains(&(lc.id.clone(), rc.id.clone())));
    }
    // One NIB per tier, each holding its own children only.
    let gc_nib = Nib::open(gc.data.join("nib.db")).expect("GC NIB");
    let rc_nib = Nib::open(rc.data.join("nib.db")).expect("RC NIB");
    let validated_by = |nib: &Nib, id: &str| {
        nib.controller(id)
            .expect("read")
            .and_then(|r| r.validated_by)
    };
    assert_eq!(
        validated_by(&gc_nib, &rc.id).as_deref(),
        Some(gc.id.as_str())
    );
    for lc in &lcs {
        assert_eq!(
            validated_by(&rc_nib, &lc.id).as_deref(),
            Some(rc.id.as_str())
        );
        let own = Nib::open(lc.data.join("nib.db")).expect("LC NIB");
        assert!(own.controller(&rc.id).expect("read").is_none());
    }
    // The site's secret is the GC's alone: the RC minted its LCs' tokens with its own.
    let site_secret = std::fs::read_to_string(site.join("bootstrap.secret")).expect("secret");
    let rc_secret = std::fs::read_to_string(rc.data.join("bootstrap.secret")).expect("secret");
    assert_ne!(site_secret, rc_secret);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(site.join("bootstrap.secret"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Discovery up to the GC inventory.
    eventually("the LCs' devices in the GC inventory", WAIT, || async {
        let r = num(&status(&rc).await, &["discovery", "active_devices"]).unwrap_or(0);
        let g = num(
            &status(&gc).await,
            &["discovery", "inventory_by_region", "zone-A"],
        )
        .unwrap_or(0);
        r > 0 && g == r
    })
    .await;
    for lc in &lcs {
        let n = rc_nib.devices(Some(&lc.id)).expect("devices").len();
        assert!(n > 0, "{} reported nothing", lc.id);
    }

    // Liveness: every in-process child is online at its parent.
    eventually("every child online", WAIT, || async {
        let g = status(&gc).await;
        let r = status(&rc).await;
        liveness(&g, &rc.id) == "online" && lcs.iter().all(|l| liveness(&r, &l.id) == "online")
    })
    .await;

    // Between co-located tiers the in-process bus carried it all: admission, keys,
    // heartbeats, reports and summaries; none of it went over gRPC.
    assert_eq!(accepted(&rc, "VALIDATION_REQUEST", "bus"), 2);
    assert_eq!(accepted(&rc, "KEY_EXCHANGE_INIT", "bus"), 2);
    assert!(accepted(&rc, "DISCOVERY_REPORT", "bus") >= 2);
    assert!(accepted(&rc, "HEARTBEAT", "bus") >= 2);
    assert_eq!(accepted(&gc, "VALIDATION_REQUEST", "bus"), 1);
    assert!(accepted(&gc, "HEARTBEAT", "bus") >= 1);
    for kind in [
        "VALIDATION_REQUEST",
        "KEY_EXCHANGE_INIT",
        "DISCOVERY_REPORT",
        "HEARTBEAT",
    ] {
        assert_eq!(accepted(&rc, kind, "grpc"), 0, "{kind}");
    }
    let via = |st: &Value, id: &str| {
        child(st, id)
            .and_then(|c| c.get("via"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let rs = status(&rc).await;
    for lc in &lcs {
        assert_eq!(via(&rs, &lc.id), "bus");
    }

    // A local controller on another box joins the site's regional controller.
    let secret = rc_secret.trim_end();
    let token =
        pdsno_shared::bootstrap::bootstrap_token(secret.as_bytes(), "remote-lc", "zone-A", "local");
    let remote_data = dir.path().join("remote-lc");
    let rc_url = format!("http://{}", rc.grpc);
    let remote_args = [
        "local",
        "--data-dir",
        &remote_data.display().to_string(),
        "--listen-grpc",
        "127.0.0.1:0",
        "--listen-rest",
        "127.0.0.1:0",
        "--parent",
        &rc_url,
        "--region",
        "zone-A",
        "--temp-id",
        "remote-lc",
        "--heartbeat-interval",
        "0.5",
        "--discovery-interval",
        "1",
    ];
    let mut remote = Proc::pdsno(
        "remote-lc",
        &remote_args,
        &[("PDSNO_BOOTSTRAP_TOKEN", token.as_str())],
    );
    let line = remote.wait_line(WAIT, |l| l.starts_with("admitted "));
    assert_eq!(
        pdsno_node::report::field(&line, "parent"),
        Some(rc.id.as_str())
    );
    let remote_id = pdsno_node::report::field(&line, "id")
        .expect("id")
        .to_owned();
    assert_eq!(remote_id, "local_cntl_zone-A_3");
    remote.wait_line(WAIT, |l| l.starts_with("mqtt connected"));
    // It came over the network, as a remote controller does.
    assert_eq!(accepted(&rc, "VALIDATION_REQUEST", "grpc"), 1);
    assert_eq!(accepted(&rc, "VALIDATION_REQUEST", "bus"), 2);
    eventually(
        "the remote LC's devices at the RC and the GC",
        WAIT,
        || async {
            let mine = rc_nib
                .devices(Some(&remote_id))
                .map(|d| d.len())
                .unwrap_or(0);
            let r = num(&status(&rc).await, &["discovery", "active_devices"]).unwrap_or(0);
            let g = num(
                &status(&gc).await,
                &["discovery", "inventory_by_region", "zone-A"],
            )
            .unwrap_or(0);
            mine > 0 && g == r
        },
    )
    .await;

    // A policy reaches every controller, in the process and out of it.
    let mut content = pdsno_node::policy::default_content();
    content.insert("label".into(), "edge test".into());
    let mut a = Map::new();
    a.insert("content".into(), Value::Object(content));
    let key = pdsno_node::admin::read_key(&gc.data).expect("admin key");
    let r = pdsno_node::admin::call(
        &format!("http://{}", gc.grpc),
        &key,
        "policy.set",
        &Value::Object(a),
        Duration::from_secs(10),
    )
    .await
    .expect("policy.set");
    let version = r.get("policy_version").and_then(Value::as_u64).expect("v");
    for t in std::iter::once(&rc).chain(&lcs) {
        eventually(&format!("{} applies v{version}", t.id), WAIT, || async {
            num(&status(t).await, &["policy_version"]) == Some(version)
        })
        .await;
    }
    let applied = format!("policy version={version} applied");
    remote.wait_line(WAIT, |l| l.starts_with(&applied));

    let site_rss = rss_kib(edge.pid());
    let remote_rss = rss_kib(remote.pid());
    eprintln!(
        "RSS: the site process (4 controllers) {site_rss} KiB; one local controller process {remote_rss} KiB"
    );

    // The remote LC dies: its last will, through the site's broker, tells the RC.
    remote.kill();
    eventually("the remote LC offline at the RC", WAIT, || async {
        liveness(&status(&rc).await, &remote_id) == "offline"
    })
    .await;
    assert_eq!(liveness(&status(&rc).await, &lcs[0].id), "online");

    // SIGTERM stops every tier; the exit is clean.
    assert_eq!(edge.terminate(WAIT), Some(0), "{}", edge.stderr());
    drop((gc_nib, rc_nib));

    // Started again: every tier restored from its data directory, nobody admitted anew.
    let mut again = start("edge-again", &args);
    let t2 = tiers(&mut again, &site, 4);
    let mut before: Vec<&str> = t.iter().map(|x| x.id.as_str()).collect();
    let mut after: Vec<&str> = t2.iter().map(|x| x.id.as_str()).collect();
    before.sort_unstable();
    after.sort_unstable();
    assert_eq!(before, after);
    let lines = again.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("admitted ")),
        "{lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("restored ")).count(),
        3,
        "{lines:?}"
    );
    assert!(
        !again.stderr().contains("ignored"),
        "no first-start inputs on a restart: {}",
        again.stderr()
    );

    // The RC revokes one of the site's LCs: told over the bus with the RC's signed notice,
    // that LC stops; the rest of the site goes on.
    let rc2 = t2
        .iter()
        .find(|x| x.role == "regional")
        .expect("rc")
        .clone();
    let (victim, other) = ("local_cntl_zone-A_2", "local_cntl_zone-A_1");
    let mut a = Map::new();
    a.insert("id".into(), victim.into());
    let key = pdsno_node::admin::read_key(&rc2.data).expect("admin key");
    pdsno_node::admin::call(
        &format!("http://{}", rc2.grpc),
        &key,
        "controller.revoke",
        &Value::Object(a),
        Duration::from_secs(10),
    )
    .await
    .expect("revoke");
    eventually("the revoked LC stops alone", WAIT, || async {
        again
            .stderr()
            .contains("revoked by its parent; it stays stopped")
    })
    .await;
    assert!(again.is_alive(), "the site goes on");
    let rs = status(&rc2).await;
    assert_eq!(
        child(&rs, victim)
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str),
        Some("revoked")
    );
    eventually("the other LC still online", WAIT, || async {
        liveness(&status(&rc2).await, other) == "online"
    })
    .await;
    assert_eq!(again.terminate(WAIT), Some(0));
}

/// Bad input stops the site with a clear message and exit code: a region no topic can
/// hold (2), and a second site on a directory in use (1, naming the node and what to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_region_or_a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("site");
    let bin = pdsno_tests::pdsno_bin();
    let bin = bin.to_str().expect("path");
    let s = site.display().to_string();
    let (code, _, err) = run(bin, &["edge", "--data-dir", &s, "--region", "a/#"], WAIT);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("region: \"a/#\" is not a valid region name"),
        "{err}"
    );
    let (code, _, err) = run(bin, &["edge", "--data-dir", &s, "--locals", "65"], WAIT);
    assert_eq!(code, Some(2), "{err}");

    let args = edge_args(&site, "1");
    let mut first = start("edge", &args);
    tiers(&mut first, &site, 3);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run(bin, &a, WAIT);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("global: data directory")
            && err.contains("is in use by another pdsno process"),
        "{err}"
    );
    // The running site is unharmed.
    assert!(first.is_alive());
    assert_eq!(first.terminate(WAIT), Some(0));
}
