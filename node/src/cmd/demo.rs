//! `pdsno demo`: a whole topology on one machine, as separate processes.
//!
//! Starts a global controller (with its embedded broker), two regional controllers and two
//! local controllers per region, each as its own `pdsno` process on free loopback ports
//! with a temporary data directory; mints every bootstrap token; waits for every admission;
//! prints who admitted whom with the assigned ids and timings; then stops everything and
//! exits 0 (non-zero if any step failed). `--keep-running` leaves the topology up until
//! Ctrl-C and prints the addresses.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use pdsno_shared::bootstrap::bootstrap_token;
use pdsno_shared::grpc::pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

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
}

/// One spawned controller.
struct Node {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    log: PathBuf,
}

impl Node {
    /// Waits for a stdout line starting with `prefix`.
    async fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Ok(l.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            match next {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Ok(l);
                    }
                }
                Ok(None) => {
                    let status = self
                        .child
                        .wait()
                        .await
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    return Err(format!(
                        "{} exited ({status}) before reporting {prefix:?}{}",
                        self.name,
                        tail(&self.log)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{} did not report {prefix:?} within {timeout:?}{}",
                        self.name,
                        tail(&self.log)
                    ));
                }
            }
        }
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!("\n  last log lines ({}):", log.display());
    for l in lines.into_iter().rev() {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
}

/// `key=value` from a report line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

fn spawn(
    exe: &Path,
    name: &str,
    args: &[String],
    dir: &Path,
    secret_env: &str,
) -> Result<Node, String> {
    let log = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .env("PDSNO_BOOTSTRAP_SECRET", secret_env)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    Ok(Node {
        name: name.to_owned(),
        child,
        lines: rx,
        seen: Vec::new(),
        log,
    })
}

fn node_args(tier: &str, data: &Path, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        tier.to_owned(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-grpc".into(),
        "127.0.0.1:0".into(),
        "--listen-rest".into(),
        "127.0.0.1:0".into(),
    ];
    v.extend_from_slice(extra);
    v
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
    let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
    let regions: Vec<String> = (0..a.regions.clamp(1, 26))
        .map(|i| format!("zone-{}", (b'A' + i as u8) as char))
        .collect();
    println!(
        "pdsno demo: 1 global, {} regional and {} local controllers, each its own process on loopback",
        regions.len(),
        regions.len() * a.locals
    );
    println!("data and logs: {}", dir.display());
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
            ],
        );
        let mut gc = spawn(&exe, "global", &gc_args, &dir, &secret)?;
        let ready = gc.wait_for("ready ", timeout).await?;
        let mqtt = gc.wait_for("mqtt v4 ", timeout).await?;
        let gc_grpc = field(&ready, "grpc").unwrap_or_default().to_owned();
        let gc_rest = field(&ready, "rest").unwrap_or_default().to_owned();
        let mqtt_addr = mqtt.rsplit(' ').next().unwrap_or_default().to_owned();
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
                ],
            );
            rcs.push((temp.clone(), spawn(&exe, &temp, &args, &dir, &secret)?));
        }
        let mut tree = Vec::new();
        for (temp, mut n) in rcs {
            let adm = n.wait_for("admitted ", timeout).await?;
            let ready = n.wait_for("ready ", timeout).await?;
            tree.push(Admitted {
                id: field(&adm, "id").unwrap_or_default().to_owned(),
                temp_id: temp,
                ms: field(&adm, "elapsed_ms").unwrap_or_default().to_owned(),
                grpc: field(&ready, "grpc").unwrap_or_default().to_owned(),
                rest: field(&ready, "rest").unwrap_or_default().to_owned(),
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
                let token = bootstrap_token(secret.as_bytes(), &temp, r, "local");
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
                    ],
                );
                lcs.push((ri, temp.clone(), spawn(&exe, &temp, &args, &dir, &secret)?));
            }
        }
        for (ri, temp, mut n) in lcs {
            let adm = n.wait_for("admitted ", timeout).await?;
            let ready = n.wait_for("ready ", timeout).await?;
            tree[ri].children.push(Admitted {
                id: field(&adm, "id").unwrap_or_default().to_owned(),
                temp_id: temp,
                ms: field(&adm, "elapsed_ms").unwrap_or_default().to_owned(),
                grpc: field(&ready, "grpc").unwrap_or_default().to_owned(),
                rest: field(&ready, "rest").unwrap_or_default().to_owned(),
                children: Vec::new(),
            });
            nodes.push(n);
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

async fn confirm(grpc: &str, id: &str) -> Result<(), String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{grpc}: {e}"))?;
    let info = pb::node_client::NodeClient::new(ch)
        .get_info(pb::InfoRequest {})
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

/// SIGTERM everyone (children first), then wait; SIGKILL what does not stop in 5 s.
async fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter().rev() {
        if let Some(pid) = n.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for n in nodes.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(5), n.child.wait())
            .await
            .is_err()
        {
            let _ = n.child.kill().await;
        }
    }
}
