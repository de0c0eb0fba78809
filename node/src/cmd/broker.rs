//! `pdsno broker`: the embedded broker alone (lab use, tests, and tools).
//!
//! Prints one line per bound listener (`listening v4 mqtt 127.0.0.1:1883`, and
//! `listening metrics http ADDR` with `--listen-metrics`) and then `ready`, so scripts can
//! wait for readiness and read ports chosen with `:0`. Stops on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pdsno_broker::{
    BrokerConfig, EmbeddedBroker, ListenerConfig, OperatorAccount, TlsFiles, Version,
};

/// `pdsno broker` arguments.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// MQTT 3.1.1 listener address.
    #[arg(
        long,
        env = "PDSNO_LISTEN_MQTT",
        default_value = "127.0.0.1:1883",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// MQTT 5 listener address (none unless given).
    #[arg(long, env = "PDSNO_LISTEN_MQTT_V5", value_name = "ADDR")]
    pub listen_v5: Option<SocketAddr>,
    /// MQTT 3.1.1 over TLS listener address (needs --tls-cert and --tls-key).
    #[arg(long, env = "PDSNO_LISTEN_MQTT_TLS", value_name = "ADDR")]
    pub listen_tls: Option<SocketAddr>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "PDSNO_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "PDSNO_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates.
    #[arg(long, env = "PDSNO_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse TLS clients without a certificate signed by --tls-ca.
    #[arg(long, requires = "tls_ca")]
    pub require_client_cert: bool,
    /// Operator account NAME:PASSWORD (repeatable).
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    pub users: Vec<crate::config::SecretArg>,
    /// Read-only operator account NAME:PASSWORD: subscribes, never publishes (repeatable).
    #[arg(long = "reader", value_name = "NAME:PASSWORD")]
    pub readers: Vec<crate::config::SecretArg>,
    /// Operator accounts from files (instead of --user/--reader).
    #[command(flatten)]
    pub accounts: crate::cmd::secrets::AccountFiles,
    /// Accept clients without credentials (off by default).
    #[arg(long, env = "PDSNO_MQTT_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// Most client connections at once.
    #[arg(long, env = "PDSNO_MQTT_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Largest MQTT packet accepted, bytes.
    #[arg(long, env = "PDSNO_MQTT_MAX_PACKET", default_value_t = 256 * 1024)]
    pub max_packet_size: usize,
    /// Seconds a started packet may take to arrive completely.
    #[arg(
        long = "frame-timeout",
        env = "PDSNO_MQTT_FRAME_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS"
    )]
    pub frame_timeout_secs: u64,
    /// Seconds a new connection has to finish TLS and send CONNECT.
    #[arg(
        long = "connect-timeout",
        env = "PDSNO_MQTT_CONNECT_TIMEOUT",
        default_value_t = 10,
        value_name = "SECS"
    )]
    pub connect_timeout_secs: u64,
    /// Most connections from one source address at once (0 = no limit).
    #[arg(
        long,
        env = "PDSNO_MQTT_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_connections_per_address: usize,
    /// Most retained topics one account may hold (0 = no limit).
    #[arg(
        long,
        env = "PDSNO_MQTT_RETAINED_TOPICS_PER_CLIENT",
        default_value_t = 32,
        value_name = "N"
    )]
    pub retained_topics_per_client: usize,
    /// Most bytes of retained topics and payloads one account may hold (0 = no limit).
    #[arg(
        long,
        env = "PDSNO_MQTT_RETAINED_BYTES_PER_CLIENT",
        default_value_t = 1024 * 1024,
        value_name = "BYTES"
    )]
    pub retained_bytes_per_client: usize,
    /// Most new subscription filters one account may add, each keeping a message log for
    /// the broker's lifetime (0 = no limit).
    #[arg(
        long,
        env = "PDSNO_MQTT_MAX_FILTERS_PER_CLIENT",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_filters_per_client: usize,
    /// Serve GET /health, /ready and /metrics (the pdsno_broker_* series), and nothing
    /// else, over plaintext HTTP here, e.g. 127.0.0.1:9464 (off by default).
    #[arg(long, env = "PDSNO_LISTEN_METRICS", value_name = "ADDR")]
    pub listen_metrics: Option<SocketAddr>,
}

impl BrokerArgs {
    /// The broker configuration these flags describe.
    ///
    /// # Errors
    /// Inconsistent flags or malformed accounts.
    pub fn to_config(&self) -> Result<BrokerConfig, String> {
        let mut cfg = BrokerConfig::plain(self.listen, self.listen_v5);
        if let Some(addr) = self.listen_tls {
            let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
                return Err("--listen-tls needs --tls-cert and --tls-key".into());
            };
            cfg.listeners.push(ListenerConfig {
                name: "tls".into(),
                addr,
                version: Version::V311,
                tls: Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: self.tls_ca.clone(),
                    require_client_cert: self.require_client_cert,
                }),
            });
        }
        for u in &self.users {
            cfg.operators
                .push(OperatorAccount::parse_flag(u.expose()).map_err(|e| format!("--user: {e}"))?);
        }
        for u in &self.readers {
            cfg.operators.push(
                OperatorAccount::parse_flag(u.expose())
                    .map_err(|e| format!("--reader: {e}"))?
                    .read_only(),
            );
        }
        cfg.operators.extend(self.accounts.accounts()?);
        cfg.allow_anonymous = self.allow_anonymous;
        cfg.limits.max_connections = self.max_connections.max(1);
        cfg.limits.max_packet_size = self.max_packet_size.max(1024);
        cfg.limits.frame_timeout = std::time::Duration::from_secs(self.frame_timeout_secs.max(1));
        cfg.limits.connect_timeout =
            std::time::Duration::from_secs(self.connect_timeout_secs.max(1));
        cfg.limits.max_connections_per_address = self.max_connections_per_address;
        cfg.limits.retained_topics_per_client = self.retained_topics_per_client;
        cfg.limits.retained_bytes_per_client = self.retained_bytes_per_client;
        cfg.limits.max_filters_per_client = self.max_filters_per_client;
        Ok(cfg)
    }
}

/// Runs `pdsno broker` until a signal arrives.
pub fn run(args: &BrokerArgs, warnings: &[String]) -> ExitCode {
    crate::logging::init();
    crate::cmd::secrets::warn(warnings);
    let cfg = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.operators.is_empty() && !cfg.allow_anonymous {
        eprintln!(
            "warning: no --user-file, no --user and no --allow-anonymous: every client will be refused"
        );
    }
    let listen_metrics = args.listen_metrics;
    crate::runtime::block_on(async move {
        let metrics_listener = match listen_metrics {
            Some(a) => match crate::transport::metrics_http::bind(a).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            },
            None => None,
        };
        let broker = match EmbeddedBroker::start(cfg, None).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        for l in broker.listeners() {
            let scheme = if l.tls { "mqtts" } else { "mqtt" };
            let name = match l.version {
                Version::V311 => "v4",
                Version::V5 => "v5",
            };
            println!("listening {name} {scheme} {}", l.addr);
        }
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut metrics_task = None;
        if let Some(l) = metrics_listener {
            if let Ok(a) = l.local_addr() {
                println!("listening metrics http {a}");
            }
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::with_scope(
                crate::metrics::Scope::Broker,
            ));
            let control = broker.control();
            metrics.add_sampler(move |s| s.broker(&control.stats()));
            let c = cancel.clone();
            metrics_task = Some(tokio::spawn(async move {
                if let Err(e) =
                    crate::transport::metrics_http::serve(l, None, metrics, None, c).await
                {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            }));
        }
        println!("ready");
        crate::runtime::shutdown_signal().await;
        tracing::info!("stopping the broker");
        cancel.cancel();
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        broker.shutdown().await;
        ExitCode::SUCCESS
    })
}
