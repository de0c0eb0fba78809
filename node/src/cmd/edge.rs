//! `pdsno edge`: a single-box site in one process: the global controller with its embedded
//! broker, one regional controller and its local controllers.
//!
//! Each tier is the node `pdsno global|regional|local` runs, with the same admission, the
//! same signatures, and its own NIB and data directory under `--data-dir`:
//!
//! ```text
//! DIR/bootstrap.secret   the site's bootstrap secret (created on the first start, mode 0600)
//! DIR/global/            the global controller
//! DIR/regional/          the regional controller (and the secret its local controllers' tokens use)
//! DIR/local-1/ ...       the local controllers
//! ```
//!
//! The nodes start in order ([`crate::node::run_with`] says when each is ready): the GC;
//! then the RC, admitted by it on its first start with a token minted from the site's
//! secret; then the LCs, admitted by the RC with tokens minted from the RC's own secret.
//! Co-located tiers talk over loopback gRPC and the embedded broker. The GC and the RC
//! listen where `pdsno global` and `pdsno regional` would, so operators and remote local
//! controllers (tokens from `pdsno token --secret-file DIR/regional/bootstrap.secret`)
//! reach them as usual. A restart restores every tier from its data directory. A node
//! revoked by its parent stops alone (exit code 5 for that node, in the log); when a node
//! stops with any other error, the others stop too and the exit code is that node's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pdsno_shared::ids::Role;
use pdsno_shared::keys::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{NodeArgs, NodeConfig};
use crate::node::{NodeError, Started};
use crate::transport::bus::Bus;

/// `pdsno edge` arguments (each flag also reads its `PDSNO_*` variable).
#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// The site's directory: its bootstrap secret and one data directory per controller.
    #[arg(
        long,
        env = "PDSNO_DATA_DIR",
        value_name = "DIR",
        default_value = "pdsno-edge"
    )]
    pub data_dir: PathBuf,
    /// The region of the regional controller and its local controllers.
    #[arg(long, env = "PDSNO_REGION", default_value = "zone-A")]
    pub region: String,
    /// Local controllers to run in the process (0 to 64).
    #[arg(long, env = "PDSNO_LOCALS", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub locals: u16,
    /// The global controller's gRPC listener.
    #[arg(
        long,
        env = "PDSNO_LISTEN_GRPC",
        value_name = "ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub listen_grpc: SocketAddr,
    /// The global controller's REST listener.
    #[arg(
        long,
        env = "PDSNO_LISTEN_REST",
        value_name = "ADDR",
        default_value = "127.0.0.1:8001"
    )]
    pub listen_rest: SocketAddr,
    /// The embedded broker's MQTT 3.1.1 listener.
    #[arg(
        long,
        env = "PDSNO_LISTEN_MQTT",
        value_name = "ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub listen_mqtt: SocketAddr,
    /// The regional controller's gRPC listener (where remote local controllers are admitted).
    #[arg(
        long,
        env = "PDSNO_REGIONAL_LISTEN_GRPC",
        value_name = "ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub regional_listen_grpc: SocketAddr,
    /// The regional controller's REST listener.
    #[arg(
        long,
        env = "PDSNO_REGIONAL_LISTEN_REST",
        value_name = "ADDR",
        default_value = "127.0.0.1:8002"
    )]
    pub regional_listen_rest: SocketAddr,
    /// Seconds between heartbeats (every tier).
    #[arg(long, env = "PDSNO_HEARTBEAT_INTERVAL", value_name = "SECS")]
    pub heartbeat_interval: Option<f64>,
    /// Seconds between discovery cycles of the local controllers.
    #[arg(long, env = "PDSNO_DISCOVERY_INTERVAL", value_name = "SECS")]
    pub discovery_interval: Option<f64>,
    /// Seconds between the regional controller's summaries to the global controller.
    #[arg(long, env = "PDSNO_SUMMARY_INTERVAL", value_name = "SECS")]
    pub summary_interval: Option<f64>,
    /// The local controllers' scanner (see `pdsno local --help`).
    #[arg(long, env = "PDSNO_SCANNER", value_name = "KIND")]
    pub scanner: Option<String>,
    /// Seconds a device may stay inactive before it is deleted (every tier).
    #[arg(long, env = "PDSNO_DEVICE_RETENTION", value_name = "SECS")]
    pub device_retention: Option<u64>,
    /// Log level (RUST_LOG, when set, wins).
    #[arg(long, env = "PDSNO_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "PDSNO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Why the site stopped.
#[derive(Debug)]
struct Stop {
    code: u8,
    message: String,
}

impl Stop {
    fn config(message: impl Into<String>) -> Self {
        Stop {
            code: 2,
            message: message.into(),
        }
    }
    fn node(name: &str, e: &NodeError) -> Self {
        Stop {
            code: e.exit_code(),
            message: format!("{name}: {e}"),
        }
    }
}

/// Runs the site until SIGINT/SIGTERM.
pub fn run(a: &EdgeArgs) -> ExitCode {
    crate::logging::init_with(&a.log_level, a.log_format == "json");
    crate::runtime::block_on(async move {
        let cancel = crate::runtime::cancel_on_signal();
        match edge(a, &cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(s) => {
                eprintln!("error: {}", s.message);
                ExitCode::from(s.code)
            }
        }
    })
}

/// A running node of the site.
struct Running {
    name: String,
    task: JoinHandle<Result<(), NodeError>>,
}

async fn edge(a: &EdgeArgs, cancel: &CancellationToken) -> Result<(), Stop> {
    if !pdsno_shared::ids::is_valid_region(&a.region) {
        return Err(Stop::config(format!(
            "region: {:?} is not a valid region name (1 to 64 of A-Z a-z 0-9 _ . -)",
            a.region
        )));
    }
    let dir = &a.data_dir;
    create_private(dir).map_err(|e| Stop::config(format!("data_dir: {}: {e}", dir.display())))?;
    let (site_secret, created) = crate::identity::load_or_create_bootstrap_secret(dir)
        .map_err(|e| Stop::config(format!("data_dir: {e}")))?;
    if created {
        tracing::info!(path = %dir.join(crate::identity::BOOTSTRAP_SECRET_FILE).display(), "created the site's bootstrap secret");
    }
    tracing::info!(
        data_dir = %dir.display(),
        region = %a.region,
        locals = a.locals,
        "pdsno edge starting: global, regional and local controllers in one process"
    );
    let bus = crate::transport::bus::Bus::new();
    let mut running: Vec<Running> = Vec::new();
    let outcome = async {
        let gc = start(
            &mut running,
            "global",
            global_config(a, dir, &bus)?,
            None,
            cancel,
        )
        .await?;
        let rc_dir = dir.join("regional");
        let rc = start(
            &mut running,
            "regional",
            child_config(a, Role::Regional, &rc_dir, &gc, "edge-rc", &bus)?,
            Some((&site_secret, "edge-rc")),
            cancel,
        )
        .await?;
        let (rc_secret, _) = crate::identity::load_or_create_bootstrap_secret(&rc_dir)
            .map_err(|e| Stop::config(format!("data_dir: {e}")))?;
        let mut locals = Vec::new();
        for i in 1..=a.locals {
            let temp = format!("edge-lc-{i}");
            let started = start(
                &mut running,
                &format!("local-{i}"),
                child_config(
                    a,
                    Role::Local,
                    &dir.join(format!("local-{i}")),
                    &rc,
                    &temp,
                    &bus,
                )?,
                Some((&rc_secret, &temp)),
                cancel,
            )
            .await;
            match started {
                Ok(lc) => locals.push(lc.id),
                // Revoked by the regional controller: that one stays stopped.
                Err(s) if s.code == 5 => {
                    tracing::error!(node = %format!("local-{i}"), "{}; it stays stopped, the rest of the site goes on", s.message);
                }
                Err(s) => return Err(s),
            }
        }
        tracing::info!(
            global = %gc.id,
            regional = %rc.id,
            locals = %locals.join(","),
            "pdsno edge running"
        );
        Ok(())
    }
    .await;
    let outcome = match outcome {
        Ok(()) => watch(&mut running, cancel).await,
        Err(s) => Err(s),
    };
    cancel.cancel();
    for r in running {
        let _ = r.task.await;
    }
    outcome
}

/// Starts one node and waits until it serves (or fails to start).
async fn start(
    running: &mut Vec<Running>,
    name: &str,
    mut cfg: NodeConfig,
    token: Option<(&SecretString, &str)>,
    cancel: &CancellationToken,
) -> Result<Started, Stop> {
    let admitted = crate::config::admitted_id(&cfg.data_dir).is_some();
    if admitted {
        // A restart restores the admitted identity: no temp id, no token.
        cfg.temp_id = None;
    } else if let (Some((secret, temp)), Some(region)) = (token, cfg.region.clone()) {
        let expires = chrono::Utc::now().timestamp() + 3600;
        cfg.bootstrap_token = Some(SecretString::new(pdsno_shared::bootstrap::expiring_token(
            secret.expose().as_bytes(),
            temp,
            &region,
            cfg.role.as_str(),
            expires,
        )));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Its own token: a node that stops itself (revoked) does not stop the others.
    let span = tracing::info_span!("node", name);
    let task =
        tokio::spawn(crate::node::run_with(cfg, cancel.child_token(), Some(tx)).instrument(span));
    match rx.await {
        Ok(s) => {
            running.push(Running {
                name: name.to_owned(),
                task,
            });
            Ok(s)
        }
        // It ended before it served: an error, or a stop requested during startup.
        Err(_) => match task.await {
            Ok(Err(e)) => Err(Stop::node(name, &e)),
            Ok(Ok(())) => Err(Stop {
                code: 0,
                message: format!("{name}: stopped before it was ready"),
            }),
            Err(e) => Err(Stop {
                code: 1,
                message: format!("{name}: {e}"),
            }),
        },
    }
}

/// Waits for a stop request or for a node to end. A node its parent revoked stops alone
/// (the others go on); any other end of a node stops the site.
async fn watch(running: &mut Vec<Running>, cancel: &CancellationToken) -> Result<(), Stop> {
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        if let Some(i) = running.iter().position(|r| r.task.is_finished()) {
            let mut r = running.remove(i);
            let name = r.name.clone();
            return match (&mut r.task).await {
                Ok(Err(e @ NodeError::Revoked(_))) => {
                    tracing::error!(node = %name, error = %e, "revoked by its parent; it stays stopped, the rest of the site goes on");
                    continue;
                }
                Ok(Ok(())) if cancel.is_cancelled() => Ok(()),
                Ok(Ok(())) => Err(Stop {
                    code: 1,
                    message: format!("{name} stopped; stopping the site"),
                }),
                Ok(Err(e)) => Err(Stop::node(&name, &e)),
                Err(e) => Err(Stop {
                    code: 1,
                    message: format!("{name}: {e}"),
                }),
            };
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Creates the site's directory, readable by its owner only.
fn create_private(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn common(a: &EdgeArgs, data_dir: PathBuf) -> NodeArgs {
    NodeArgs {
        data_dir: Some(data_dir),
        heartbeat_interval_secs: a.heartbeat_interval,
        device_retention: a.device_retention,
        log_level: Some(a.log_level.clone()),
        log_format: Some(a.log_format.clone()),
        ..NodeArgs::default()
    }
}

fn resolve(role: Role, args: &NodeArgs, bus: &Bus) -> Result<NodeConfig, Stop> {
    let mut cfg = NodeConfig::resolve(role, args)
        .map_err(|e| Stop::config(format!("invalid configuration ({}): {e}", role.as_str())))?;
    cfg.bus = Some(bus.clone());
    // The site's secret is the global controller's alone.
    if role != Role::Global {
        cfg.bootstrap_secret = None;
    }
    Ok(cfg)
}

fn global_config(a: &EdgeArgs, dir: &Path, bus: &Bus) -> Result<NodeConfig, Stop> {
    let args = NodeArgs {
        listen_grpc: Some(a.listen_grpc),
        listen_rest: Some(a.listen_rest),
        listen_mqtt: Some(a.listen_mqtt),
        bootstrap_secret_file: Some(dir.join(crate::identity::BOOTSTRAP_SECRET_FILE)),
        regions: Some(vec![a.region.clone()]),
        ..common(a, dir.join("global"))
    };
    resolve(Role::Global, &args, bus)
}

/// The parent's gRPC URL as a co-located child dials it.
fn url_of(parent: &Started) -> String {
    let mut addr = parent.grpc;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}")
}

fn child_config(
    a: &EdgeArgs,
    role: Role,
    data_dir: &Path,
    parent: &Started,
    temp_id: &str,
    bus: &Bus,
) -> Result<NodeConfig, Stop> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (grpc, rest) = match role {
        Role::Regional => (a.regional_listen_grpc, a.regional_listen_rest),
        _ => (loopback, loopback),
    };
    let mut args = NodeArgs {
        listen_grpc: Some(grpc),
        listen_rest: Some(rest),
        parent: Some(url_of(parent)),
        region: Some(a.region.clone()),
        temp_id: Some(temp_id.to_owned()),
        ..common(a, data_dir.to_path_buf())
    };
    if role == Role::Regional {
        args.summary_interval_secs = a.summary_interval;
    }
    if role == Role::Local {
        args.discovery_interval_secs = a.discovery_interval;
        args.scanner = a.scanner.clone();
    }
    resolve(role, &args, bus)
}
