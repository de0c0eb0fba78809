//! `pdsno demo`: a whole topology on one machine, as separate processes.
//!
//! Starts a global controller (with its embedded broker), two regional controllers and two
//! local controllers per region, each as its own `pdsno` process on free loopback ports
//! with a temporary data directory; mints every bootstrap token; waits for every admission
//! and prints who admitted whom with the assigned ids and timings. Then the controllers
//! work: every local controller scans its simulated subnet and the devices arrive at each
//! regional controller and in the GC inventory; a policy change goes from the GC to every
//! local controller; one local controller is killed and reported offline. Then everything
//! stops and the demo exits 0 (non-zero if any step failed). `--keep-running` leaves the
//! topology up until Ctrl-C.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::lab::{Node, admin_call, node_args, own_secret, spawn, stop_all};
use crate::report::Report;
use clap::Args;
use pdsno_shared::bootstrap::bootstrap_token;
use pdsno_shared::grpc::pb;

/// `pdsno demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Regional controllers to start.
    #[arg(long, default_value_t = 2)]
    pub regions: usize,
    /// Local controllers per regional controller.
    #[arg(long, default_value_t = 2)]
    pub locals: usize,
    /// Leave the topology running (until Ctrl-C) and print its addresses.
    #[arg(long)]
    pub keep_running: bool,
    /// Keep the data directory afterwards (its path is printed).
    #[arg(long)]
    pub keep_data: bool,
    /// Seconds to wait for each step.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Seconds between discovery cycles on the local controllers.
    #[arg(long, default_value_t = 2)]
    pub discovery_interval: u64,
    /// Show `pdsno edge` instead: a global, a regional and `--locals` local controllers in
    /// one process, joined by one local controller running as its own process.
    #[arg(long)]
    pub edge: bool,
}

struct Admitted {
    id: String,
    temp_id: String,
    ms: String,
    grpc: String,
    rest: String,
    children: Vec<Admitted>,
}

/// Runs the demo.
pub fn run(a: &DemoArgs) -> ExitCode {
    crate::runtime::block_on(async move {
        match demo(a).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn demo(a: &DemoArgs) -> Result<(), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the pdsno executable: {e}"))?;
    let tmp = tempfile::Builder::new()
        .prefix("pdsno-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    let timeout = Duration::from_secs(a.timeout.max(5));
    if a.edge {
        let r = super::demo_edge::demo(a, &dir, timeout).await;
        if a.keep_data {
            println!("data kept in {}", tmp.keep().display());
        }
        return r;
    }
    let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
    let regions: Vec<String> = (0..a.regions.clamp(1, 26))
        .map(|i| format!("zone-{}", (b'A' + i as u8) as char))
        .collect();
    println!(
        "pdsno demo: 1 global, {} regional and {} local controllers, each its own process on loopback",
        regions.len(),
        regions.len() * a.locals
    );
    println!(
        "data and logs: {}{}",
        dir.display(),
        if a.keep_data {
            " (kept)"
        } else {
            " (deleted when the demo ends; --keep-data keeps them)"
        }
    );
    let started = Instant::now();
    let mut nodes: Vec<Node> = Vec::new();
    let result = async {
        // Global controller.
        let gc_args = node_args(
            "global",
            &dir.join("global"),
            &[
                "--listen-mqtt".into(),
                "127.0.0.1:0".into(),
                "--regions".into(),
                regions.join(","),
                "--quota-per-region".into(),
                (a.locals + 10).to_string(),
                "--heartbeat-interval".into(),
                "0.5".into(),
            ],
        );
        let mut gc = spawn(&exe, "global", &gc_args, &dir, &secret)?;
        let ready = gc.ready(timeout).await?;
        let mqtt_addr = gc
            .wait_report("an MQTT listener", timeout, |r| match r {
                Report::MqttListener {
                    tls: false,
                    version,
                    addr,
                } if version == "v4" => Some(addr),
                _ => None,
            })
            .await?;
        let (gc_grpc, gc_rest) = (ready.grpc, ready.rest);
        nodes.push(gc);

        // Regional controllers, all at once.
        let mut rcs = Vec::new();
        for r in &regions {
            let temp = format!("temp-rc-{}", r.to_lowercase());
            let token = bootstrap_token(secret.as_bytes(), &temp, r, "regional");
            let args = node_args(
                "regional",
                &dir.join(&temp),
                &[
                    "--parent".into(),
                    format!("http://{gc_grpc}"),
                    "--region".into(),
                    r.clone(),
                    "--temp-id".into(),
                    temp.clone(),
                    "--bootstrap-token".into(),
                    token,
                    "--heartbeat-interval".into(),
                    "0.5".into(),
                    "--summary-interval".into(),
                    "1".into(),
                ],
            );
            rcs.push((temp.clone(), spawn(&exe, &temp, &args, &dir, &secret)?));
        }
        let mut tree = Vec::new();
        let mut rc_secrets = Vec::new();
        for (temp, mut n) in rcs {
            let (id, ms) = n.admitted(timeout).await?;
            let ready = n.ready(timeout).await?;
            rc_secrets.push(own_secret(&dir.join(&temp))?);
            tree.push(Admitted {
                id,
                temp_id: temp,
                ms: ms.to_string(),
                grpc: ready.grpc,
                rest: ready.rest,
                children: Vec::new(),
            });
            nodes.push(n);
        }

        // Local controllers of every region, all at once.
        let mut lcs = Vec::new();
        for (ri, rc) in tree.iter().enumerate() {
            let r = &regions[ri];
            for i in 1..=a.locals {
                let temp = format!("temp-lc-{}-{i}", r.to_lowercase());
                // Minted with the RC's own secret: only that RC accepts it.
                let token = bootstrap_token(rc_secrets[ri].as_bytes(), &temp, r, "local");
                let args = node_args(
                    "local",
                    &dir.join(&temp),
                    &[
                        "--parent".into(),
                        format!("http://{}", rc.grpc),
                        "--region".into(),
                        r.clone(),
                        "--temp-id".into(),
                        temp.clone(),
                        "--bootstrap-token".into(),
                        token,
                        "--heartbeat-interval".into(),
                        "0.5".into(),
                        "--discovery-interval".into(),
                        a.discovery_interval.to_string(),
                    ],
                );
                lcs.push((ri, temp.clone(), spawn(&exe, &temp, &args, &dir, &secret)?));
            }
        }
        for (ri, temp, mut n) in lcs {
            let (id, ms) = n.admitted(timeout).await?;
            let ready = n.ready(timeout).await?;
            tree[ri].children.push(Admitted {
                id,
                temp_id: temp,
                ms: ms.to_string(),
                grpc: ready.grpc,
                rest: ready.rest,
                children: Vec::new(),
            });
            nodes.push(n);
        }

        for rc in &mut tree {
            rc.children.sort_by(|a, b| a.id.cmp(&b.id));
        }
        // Ask every node who it is, over gRPC, to confirm the ids took effect.
        for rc in &tree {
            confirm(&rc.grpc, &rc.id).await?;
            for lc in &rc.children {
                confirm(&lc.grpc, &lc.id).await?;
            }
        }

        println!();
        println!("global_cntl_1  grpc {gc_grpc}  rest {gc_rest}  mqtt {mqtt_addr}");
        for (i, rc) in tree.iter().enumerate() {
            let last_rc = i + 1 == tree.len();
            let (branch, indent) = if last_rc {
                ("└──", "    ")
            } else {
                ("├──", "│   ")
            };
            println!(
                "{branch} {}  (was {}, admitted by global_cntl_1 in {} ms)  grpc {}  rest {}",
                rc.id, rc.temp_id, rc.ms, rc.grpc, rc.rest
            );
            for (j, lc) in rc.children.iter().enumerate() {
                let b = if j + 1 == rc.children.len() {
                    "└──"
                } else {
                    "├──"
                };
                println!(
                    "{indent}{b} {}  (was {}, admitted by {} in {} ms)  grpc {}  rest {}",
                    lc.id, lc.temp_id, rc.id, lc.ms, lc.grpc, lc.rest
                );
            }
        }
        let total = tree.len() + tree.iter().map(|r| r.children.len()).sum::<usize>();
        println!();
        println!(
            "{total} admissions succeeded; topology up in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        work(a, &dir, &tree, &mut nodes, timeout).await?;
        Ok::<(), String>(())
    }
    .await;

    if result.is_ok() && a.keep_running {
        println!("running; press Ctrl-C to stop");
        crate::runtime::shutdown_signal().await;
    }
    println!("stopping {} processes", nodes.len());
    stop_all(&mut nodes).await;
    if a.keep_data {
        let kept = tmp.keep();
        println!("data kept in {}", kept.display());
    }
    result
}

/// The controllers at work: discovery on every LC's simulated subnet up to the GC
/// inventory, a policy change reaching every LC, one LC killed and reported offline.
async fn work(
    a: &DemoArgs,
    dir: &Path,
    tree: &[Admitted],
    nodes: &mut [Node],
    timeout: Duration,
) -> Result<(), String> {
    use pdsno_shared::json::{Map, Value};
    let find = |nodes: &[Node], name: &str| nodes.iter().position(|n| n.name == name);
    let gc_grpc = nodes
        .first()
        .and_then(Node::seen_ready)
        .map(|r| r.grpc)
        .ok_or("the global controller is not ready")?;

    // 1. Discovery.
    println!();
    println!(
        "discovery: every local controller scans its simulated /24 every {} s",
        a.discovery_interval
    );
    for rc in tree {
        for lc in &rc.children {
            let i = find(nodes, &lc.temp_id).ok_or("lost a node")?;
            let (cycle, active) = nodes[i]
                .wait_report("a discovery cycle", timeout, |r| match r {
                    Report::DiscoveryCycle { cycle, active, .. } => Some((cycle, active)),
                    _ => None,
                })
                .await?;
            println!(
                "  {}  cycle {cycle}: {active} devices, reported to {}",
                lc.id, rc.id
            );
        }
    }
    for rc in tree {
        let i = find(nodes, &rc.temp_id).ok_or("lost a node")?;
        for lc in &rc.children {
            let want = format!("report from={} ", lc.id);
            nodes[i]
                .wait_match("a report", |l| l.starts_with(&want), timeout)
                .await?;
        }
        let st = admin_call(
            &dir.join(&rc.temp_id),
            &rc.grpc,
            "status",
            Value::Object(Map::new()),
        )
        .await?;
        let n = st
            .get("discovery")
            .and_then(|d| d.get("active_devices"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        println!(
            "  {}  stores {n} devices from {} local controllers",
            rc.id,
            rc.children.len()
        );
    }
    {
        let gc = nodes.first_mut().ok_or("no global controller")?;
        for rc in tree {
            let want = format!("summary from={} ", rc.id);
            gc.wait_match("a summary", |l| l.starts_with(&want), timeout)
                .await?;
        }
    }
    let st = admin_call(
        &dir.join("global"),
        &gc_grpc,
        "status",
        Value::Object(Map::new()),
    )
    .await?;
    let inv = st
        .get("discovery")
        .and_then(|d| d.get("inventory_by_region"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = inv
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_u64().unwrap_or(0)))
        .collect();
    println!("  global_cntl_1 inventory: {}", parts.join(" "));

    // 2. Policy.
    println!();
    let set_at = Instant::now();
    let version =
        super::lab::publish_policy(&dir.join("global"), &gc_grpc, "set by pdsno demo").await?;
    println!("policy: version {version} published by global_cntl_1 (Ed25519-signed)");
    let applied = format!("policy version={version} applied");
    let republished = format!("policy version={version} republished");
    for rc in tree {
        let i = find(nodes, &rc.temp_id).ok_or("lost a node")?;
        nodes[i]
            .wait_match("the policy", |l| l.starts_with(&republished), timeout)
            .await?;
        println!(
            "  {}  checked the GC signature, republished for {} ({} ms)",
            rc.id,
            rc.id.split('_').nth(2).unwrap_or("its region"),
            set_at.elapsed().as_millis()
        );
        for lc in &rc.children {
            let j = find(nodes, &lc.temp_id).ok_or("lost a node")?;
            nodes[j]
                .wait_match("the policy", |l| l.starts_with(&applied), timeout)
                .await?;
            println!(
                "    {}  applied it after checking both signatures ({} ms)",
                lc.id,
                set_at.elapsed().as_millis()
            );
        }
    }

    // 3. Liveness: one local controller dies.
    let (Some(rc), Some(victim)) = (tree.last(), tree.last().and_then(|r| r.children.last()))
    else {
        return Ok(());
    };
    println!();
    let rss: Vec<u64> = nodes
        .iter()
        .filter_map(|n| n.pid().and_then(super::lab::rss_kib))
        .collect();
    let memory = (rss.len() == nodes.len()).then(|| rss.iter().sum::<u64>());
    let i = find(nodes, &victim.temp_id).ok_or("lost a node")?;
    nodes[i]
        .child
        .start_kill()
        .map_err(|e| format!("cannot kill {}: {e}", victim.id))?;
    let killed = Instant::now();
    println!("liveness: {} killed (SIGKILL)", victim.id);
    let j = find(nodes, &rc.temp_id).ok_or("lost a node")?;
    let want = format!("liveness id={} state=offline", victim.id);
    nodes[j]
        .wait_match("the offline report", |l| l.starts_with(&want), timeout)
        .await?;
    println!(
        "  {}  reported it offline after {} ms (its last will, published by the broker)",
        rc.id,
        killed.elapsed().as_millis()
    );
    // The GC learns it from the RC's next heartbeat.
    let deadline = Instant::now() + timeout;
    let st = loop {
        let st = admin_call(
            &dir.join("global"),
            &gc_grpc,
            "status",
            Value::Object(Map::new()),
        )
        .await?;
        let rendered = crate::cmd::ops::render_tree(&st);
        let v = format!("policy v{version} ");
        let settled = rendered.lines().all(|l| {
            if l.contains(&victim.id) {
                l.contains(" offline ")
            } else {
                !l.contains("_cntl_") || l.contains(&v)
            }
        });
        if settled || Instant::now() > deadline {
            break rendered;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!();
    println!("pdsno status (global_cntl_1):");
    print!("{st}");
    if let Some(kib) = memory {
        println!();
        println!(
            "memory: {} processes, {} MiB RSS in total (pdsno demo --edge runs a site in one)",
            nodes.len(),
            kib / 1024
        );
    }
    Ok(())
}

async fn confirm(grpc: &str, id: &str) -> Result<(), String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{grpc}: {e}"))?;
    let info = pb::node_client::NodeClient::new(ch)
        .get_info(pb::InfoRequest::default())
        .await
        .map_err(|e| format!("{grpc}: {e}"))?
        .into_inner();
    if info.controller_id != id {
        return Err(format!(
            "{grpc} says it is {}, expected {id}",
            info.controller_id
        ));
    }
    Ok(())
}
