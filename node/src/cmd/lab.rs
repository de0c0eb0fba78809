//! Spawning `pdsno` controllers as child processes and reading their report lines: shared
//! by `pdsno demo` and the benchmarks that need a running topology.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::report::Report;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// One spawned controller.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) child: Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    pub(crate) seen: Vec<String>,
    log: PathBuf,
}

impl Node {
    /// Waits for a stdout line starting with `prefix`.
    pub(crate) async fn wait_for(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Ok(l.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            match next {
                Ok(Some((_, l))) => {
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

impl Node {
    /// Waits for a report `pick` takes (seen before or arriving), and returns what it took.
    pub(crate) async fn wait_report<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        pick: impl Fn(Report) -> Option<T>,
    ) -> Result<T, String> {
        let line = self
            .wait_match(
                what,
                |l| Report::parse(l).and_then(&pick).is_some(),
                timeout,
            )
            .await?;
        Report::parse(&line)
            .and_then(pick)
            .ok_or_else(|| format!("{}: unreadable {what}: {line}", self.name))
    }

    /// Waits for the node's `ready` report.
    pub(crate) async fn ready(&mut self, timeout: Duration) -> Result<Ready, String> {
        self.wait_report("ready", timeout, |r| match r {
            Report::Ready { id, grpc, rest, .. } => Some(Ready { id, grpc, rest }),
            _ => None,
        })
        .await
    }

    /// The `ready` report already seen, if any.
    pub(crate) fn seen_ready(&self) -> Option<Ready> {
        self.seen.iter().find_map(|l| match Report::parse(l)? {
            Report::Ready { id, grpc, rest, .. } => Some(Ready { id, grpc, rest }),
            _ => None,
        })
    }

    /// Waits for the `admitted` report: the assigned id and how long admission took.
    pub(crate) async fn admitted(&mut self, timeout: Duration) -> Result<(String, u64), String> {
        self.wait_report("admission", timeout, |r| match r {
            Report::Admitted { id, elapsed_ms, .. } => Some((id, elapsed_ms)),
            _ => None,
        })
        .await
    }

    /// Waits for a stdout line that satisfies `pred` (seen before or arriving).
    pub(crate) async fn wait_match(
        &mut self,
        what: &str,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((_, l))) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Ok(l);
                    }
                }
                Ok(None) => {
                    return Err(format!(
                        "{} exited before {what}{}",
                        self.name,
                        tail(&self.log)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{}: no {what} within {timeout:?}{}",
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

/// What a node's `ready` report says of it.
#[derive(Clone, Debug)]
pub(crate) struct Ready {
    pub(crate) id: String,
    pub(crate) grpc: String,
    pub(crate) rest: String,
}

pub(crate) fn spawn(
    exe: &Path,
    name: &str,
    args: &[String],
    dir: &Path,
    secret_env: &str,
) -> Result<Node, String> {
    let log = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    // A bootstrap token goes to the child in its environment, out of its command line.
    let mut argv = Vec::with_capacity(args.len());
    let mut token = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--bootstrap-token" {
            token = it.next();
        } else {
            argv.push(a);
        }
    }
    let mut cmd = Command::new(exe);
    if let Some(t) = token {
        cmd.env("PDSNO_BOOTSTRAP_TOKEN", t);
    }
    // Only the global controller holds this secret; a regional controller makes its own
    // (read back with [`own_secret`] to mint its local controllers' tokens).
    if args.first().map(String::as_str) == Some("global") {
        cmd.env("PDSNO_BOOTSTRAP_SECRET", secret_env);
    } else {
        cmd.env_remove("PDSNO_BOOTSTRAP_SECRET");
    }
    let mut child = cmd
        .args(argv)
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
                if tx.send((Instant::now(), l)).is_err() {
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

/// The bootstrap secret a regional controller created in its data directory `data`.
pub(crate) fn own_secret(data: &Path) -> Result<String, String> {
    let path = data.join(crate::identity::BOOTSTRAP_SECRET_FILE);
    std::fs::read_to_string(&path)
        .map(|s| s.trim_end().to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn node_args(tier: &str, data: &Path, extra: &[String]) -> Vec<String> {
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

impl Node {
    /// Waits for a line satisfying `pred` that arrives from now on; returns when the node
    /// printed it (as read from its stdout).
    pub(crate) async fn next_match(
        &mut self,
        what: &str,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(Instant, String), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, l))) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Ok((at, l));
                    }
                }
                Ok(None) => return Err(format!("{} exited before {what}", self.name)),
                Err(_) => return Err(format!("{}: no {what} within {timeout:?}", self.name)),
            }
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The resident memory of process `pid` in KiB (Linux `/proc`; `None` elsewhere).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// SIGTERM everyone (last started first), then wait; SIGKILL what does not stop in 5 s.
pub(crate) async fn stop_all(nodes: &mut [Node]) {
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

/// Calls the admin API of the node whose data directory is `data`.
pub(crate) async fn admin_call(
    data: &Path,
    grpc: &str,
    command: &str,
    args: pdsno_shared::json::Value,
) -> Result<pdsno_shared::json::Value, String> {
    let key = crate::admin::read_key(data)?;
    crate::admin::call(
        &format!("http://{grpc}"),
        &key,
        command,
        &args,
        Duration::from_secs(10),
    )
    .await
}

/// Publishes a new policy version (the default content labelled `label`) through the admin
/// API of the global controller whose data directory is `data`; returns the version.
pub(crate) async fn publish_policy(data: &Path, grpc: &str, label: &str) -> Result<u64, String> {
    use pdsno_shared::json::{Map, Value};
    let mut content = crate::policy::default_content();
    content.insert("label".into(), label.into());
    let mut args = Map::new();
    args.insert("content".into(), Value::Object(content));
    admin_call(data, grpc, "policy.set", Value::Object(args))
        .await?
        .get("policy_version")
        .and_then(Value::as_u64)
        .ok_or_else(|| "no policy version in the answer".to_owned())
}
