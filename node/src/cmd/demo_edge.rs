//! `pdsno demo --edge`: the single-box site of `pdsno edge` at work.
//!
//! Starts `pdsno edge` (a global, a regional and its local controllers in one process) on
//! free loopback ports with a temporary directory, then shows what it does: discovery up to
//! the GC inventory, a local controller started as its own process joining the regional
//! controller inside the site, a policy change reaching every controller, the remote local
//! controller killed and reported offline, and the memory the site process uses.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use pdsno_shared::json::{Map, Value};

use super::demo::DemoArgs;
use super::lab::{Node, Ready, admin_call, own_secret, rss_kib, spawn, stop_all};
use crate::report::Report;

const REGION: &str = "zone-A";

/// Runs the edge demo in `dir`.
pub(crate) async fn demo(a: &DemoArgs, dir: &Path, timeout: Duration) -> Result<(), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the pdsno executable: {e}"))?;
    let locals = a.locals.clamp(1, 64);
    println!(
        "pdsno demo --edge: 1 global, 1 regional and {locals} local controllers in one process (pdsno edge), and 1 local controller as its own process"
    );
    println!("data and logs: {}", dir.display());
    let site = dir.join("site");
    let any = "127.0.0.1:0".to_owned();
    let args: Vec<String> = [
        "edge",
        "--data-dir",
        &site.display().to_string(),
        "--region",
        REGION,
        "--locals",
        &locals.to_string(),
        "--listen-grpc",
        &any,
        "--listen-rest",
        &any,
        "--listen-mqtt",
        &any,
        "--regional-listen-grpc",
        &any,
        "--regional-listen-rest",
        &any,
        "--heartbeat-interval",
        "0.5",
        "--summary-interval",
        "1",
        "--discovery-interval",
        &a.discovery_interval.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let started = Instant::now();
    let mut nodes = vec![spawn(&exe, "edge", &args, dir, "")?];
    let result = work(a, dir, &site, &exe, locals, timeout, started, &mut nodes).await;
    if result.is_ok() && a.keep_running {
        println!("running; press Ctrl-C to stop");
        crate::runtime::shutdown_signal().await;
    }
    println!("stopping {} processes", nodes.len());
    stop_all(&mut nodes).await;
    result
}

/// The `ready` reports of the site's nodes: one of `role` not in `seen`.
async fn next_ready(
    site: &mut Node,
    role: &str,
    seen: &mut BTreeSet<String>,
    timeout: Duration,
) -> Result<Ready, String> {
    let known = seen.clone();
    let r = site
        .wait_report(&format!("a {role} controller"), timeout, |r| match r {
            Report::Ready {
                id,
                role: r,
                grpc,
                rest,
                ..
            } if r == role && !known.contains(&id) => Some(Ready { id, grpc, rest }),
            _ => None,
        })
        .await?;
    seen.insert(r.id.clone());
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn work(
    a: &DemoArgs,
    dir: &Path,
    site: &Path,
    exe: &Path,
    locals: usize,
    timeout: Duration,
    started: Instant,
    nodes: &mut Vec<Node>,
) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    let edge = nodes.first_mut().ok_or("no site")?;
    let gc = next_ready(edge, "global", &mut seen, timeout).await?;
    let rc = next_ready(edge, "regional", &mut seen, timeout).await?;
    let mut lcs = Vec::new();
    for _ in 0..locals {
        lcs.push(next_ready(edge, "local", &mut seen, timeout).await?);
    }
    lcs.sort_by(|x, y| x.id.cmp(&y.id));
    let pid = edge.pid();
    println!();
    println!(
        "one process (pid {}), up in {:.2} s:",
        pid.map_or("?".into(), |p| p.to_string()),
        started.elapsed().as_secs_f64()
    );
    println!("{}  grpc {}  rest {}", gc.id, gc.grpc, gc.rest);
    println!("└── {}  grpc {}  rest {}", rc.id, rc.grpc, rc.rest);
    for (i, lc) in lcs.iter().enumerate() {
        let b = if i + 1 == lcs.len() {
            "└──"
        } else {
            "├──"
        };
        println!("    {b} {}  grpc {}  rest {}", lc.id, lc.grpc, lc.rest);
    }
    let gc_dir = site.join("global");
    let status = |dir: std::path::PathBuf, grpc: String| async move {
        admin_call(&dir, &grpc, "status", Value::Object(Map::new())).await
    };

    // 1. Discovery, all inside the process.
    println!();
    println!(
        "discovery: every local controller scans its simulated /24 every {} s",
        a.discovery_interval
    );
    let deadline = Instant::now() + timeout;
    let (rc_n, inv) = loop {
        let rs = status(site.join("regional"), rc.grpc.clone()).await?;
        let gs = status(gc_dir.clone(), gc.grpc.clone()).await?;
        let rc_n = number(&rs, &["discovery", "active_devices"]);
        let inv = number(&gs, &["discovery", "inventory_by_region", REGION]);
        if rc_n > 0 && inv == rc_n {
            break (rc_n, inv);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "discovery: the inventory did not reach the GC within {timeout:?} ({rc_n} devices at the RC, {inv} at the GC)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "  {}  stores {rc_n} devices from {locals} local controllers",
        rc.id
    );
    println!("  {}  inventory: {REGION}={inv}", gc.id);

    // 2. A local controller of another box joins the regional controller in the site.
    println!();
    let temp = "temp-lc-remote";
    let token = pdsno_shared::bootstrap::bootstrap_token(
        own_secret(&site.join("regional"))?.as_bytes(),
        temp,
        REGION,
        "local",
    );
    let lc_args: Vec<String> = super::lab::node_args(
        "local",
        &dir.join(temp),
        &[
            "--parent".into(),
            format!("http://{}", rc.grpc),
            "--region".into(),
            REGION.into(),
            "--temp-id".into(),
            temp.into(),
            "--bootstrap-token".into(),
            token,
            "--heartbeat-interval".into(),
            "0.5".into(),
            "--discovery-interval".into(),
            a.discovery_interval.to_string(),
        ],
    );
    nodes.push(spawn(exe, temp, &lc_args, dir, "")?);
    let remote = nodes.last_mut().ok_or("lost a node")?;
    let (remote_id, ms) = remote.admitted(timeout).await?;
    println!(
        "remote: {remote_id} (its own process, was {temp}) admitted by {} over gRPC in {ms} ms",
        rc.id
    );
    let broker = remote
        .wait_report("its broker connection", timeout, |r| match r {
            Report::MqttConnected { broker } => Some(broker),
            _ => None,
        })
        .await?;
    println!(
        "  {remote_id}  connected to the site's broker at {broker} with the credential it was given"
    );

    // 3. Policy.
    println!();
    let set_at = Instant::now();
    let version = super::lab::publish_policy(&gc_dir, &gc.grpc, "set by pdsno demo --edge").await?;
    println!("policy: version {version} published by {}", gc.id);
    let everyone: Vec<(String, std::path::PathBuf, String)> =
        std::iter::once((rc.id.clone(), site.join("regional"), rc.grpc.clone()))
            .chain(lcs.iter().enumerate().map(|(i, lc)| {
                (
                    lc.id.clone(),
                    site.join(format!("local-{}", i + 1)),
                    lc.grpc.clone(),
                )
            }))
            .collect();
    for (id, data, grpc) in &everyone {
        let deadline = Instant::now() + timeout;
        loop {
            let st = status(data.clone(), grpc.clone()).await?;
            if st.get("policy_version").and_then(Value::as_u64) == Some(version) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{id} did not apply policy version {version}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("  {id}  applied it ({} ms)", set_at.elapsed().as_millis());
    }
    let applied = format!("policy version={version} applied");
    let remote = nodes.last_mut().ok_or("lost a node")?;
    remote
        .wait_match("the policy", |l| l.starts_with(&applied), timeout)
        .await?;
    println!(
        "  {remote_id}  applied it ({} ms)",
        set_at.elapsed().as_millis()
    );

    // 4. Liveness: the remote local controller dies.
    println!();
    let memory_site = pid.and_then(rss_kib);
    let memory_remote = remote.pid().and_then(rss_kib);
    remote
        .child
        .start_kill()
        .map_err(|e| format!("cannot kill {remote_id}: {e}"))?;
    let killed = Instant::now();
    println!("liveness: {remote_id} killed (SIGKILL)");
    let deadline = Instant::now() + timeout;
    let mut offline_after = None;
    let tree = loop {
        let st = status(gc_dir.clone(), gc.grpc.clone()).await?;
        let rendered = crate::cmd::ops::render_tree(&st);
        let offline = rendered
            .lines()
            .any(|l| l.contains(&remote_id) && l.contains(" offline "));
        if offline && offline_after.is_none() {
            offline_after = Some(killed.elapsed());
        }
        // Then wait (a few seconds at most) for the tree to show the policy everywhere.
        let v = format!("policy v{version} ");
        let settled = rendered
            .lines()
            .all(|l| l.contains(&remote_id) || !l.contains("_cntl_") || l.contains(&v));
        match offline_after {
            Some(t) if settled || killed.elapsed() > t + Duration::from_secs(5) => break rendered,
            None if Instant::now() > deadline => {
                return Err(format!("{remote_id} was not reported offline:\n{rendered}"));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "  {}  reported it offline after {} ms (its last will, from the site's broker)",
        gc.id,
        offline_after.unwrap_or_default().as_millis()
    );
    println!();
    println!("pdsno status ({}):", gc.id);
    print!("{tree}");
    println!();
    match (memory_site, memory_remote) {
        (Some(s), Some(r)) => println!(
            "memory: the site process ({} controllers) {} MiB RSS; the remote local controller {} MiB",
            2 + locals,
            s / 1024,
            r / 1024
        ),
        _ => println!("memory: not measured (no /proc here)"),
    }
    Ok(())
}

/// The number at `path` in `v` (0 when absent).
fn number(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}
