//! Node configuration: one typed tree from a TOML file, environment variables and flags.
//!
//! Precedence: command-line flag, then its `PDSNO_*` environment variable, then the file
//! (`--config`), then defaults that run a lab on loopback. Unknown keys in the file are
//! errors. Secrets (bootstrap secret, shared signing secret, bootstrap token) come from
//! files or the environment; the file format has no field holding a secret itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use pdsno_broker::OperatorAccount;
use pdsno_shared::ids::{self, Role};
use pdsno_shared::keys::{HmacKey, PublicKey, SecretString};
use serde::Deserialize;

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where the NIB and identity key live.
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address.
    pub listen_grpc: Option<SocketAddr>,
    /// REST compat listen address.
    pub listen_rest: Option<SocketAddr>,
    /// A separate listener for the admin service (operator commands), e.g. on loopback;
    /// the gRPC listener then no longer serves it.
    pub listen_admin: Option<SocketAddr>,
    /// A separate plaintext HTTP listener serving only `/health`, `/ready` and `/metrics`
    /// (for Prometheus when the REST listener requires TLS); off unless given.
    pub listen_metrics: Option<SocketAddr>,
    /// Embedded broker listen address (global controller; MQTT 3.1.1 and 5).
    pub listen_mqtt: Option<SocketAddr>,
    /// An extra embedded broker listener (MQTT 3.1.1 and 5).
    pub listen_mqtt_v5: Option<SocketAddr>,
    /// Run the embedded broker (global controller; default true). Older spelling of
    /// `no_embedded_broker = true`.
    pub embedded_broker: Option<bool>,
    /// Do not run the embedded broker (global controller; use `mqtt_url`).
    pub no_embedded_broker: Option<bool>,
    /// External broker URL (`mqtt://host:port`, `mqtts://...`); a comma-separated list
    /// names the members of a broker cluster, tried in turn.
    pub mqtt_url: Option<String>,
    /// The parent's gRPC URL (regional and local controllers).
    pub parent: Option<String>,
    /// This controller's region.
    pub region: Option<String>,
    /// Temporary id used until admission.
    pub temp_id: Option<String>,
    /// File holding the bootstrap token.
    pub bootstrap_token_file: Option<PathBuf>,
    /// File holding the bootstrap secret (parents mint and check tokens with it). Required
    /// on the global controller; a regional controller creates its own in its data
    /// directory when none is given.
    pub bootstrap_secret_file: Option<PathBuf>,
    /// File holding the shared message-signing secret (network key = its SHA-256).
    pub secret_file: Option<PathBuf>,
    /// Regions children may join (global controller).
    pub regions: Option<Vec<String>>,
    /// Accept the original PDSNO's insecure challenge answer.
    pub legacy_compat: Option<bool>,
    /// Most active children of one role per region.
    pub quota_per_region: Option<u64>,
    /// Temp ids or public keys refused at admission.
    pub blocklist: Option<Vec<String>>,
    /// The global controller's public key (base64): pin it instead of trusting the first
    /// admission.
    pub root_public_key: Option<String>,
    /// The parent's controller id: its TLS certificate must name it before the bootstrap
    /// token is sent.
    pub parent_id: Option<String>,
    /// The parent's identity key (base64): it must prove holding it before the bootstrap
    /// token is sent.
    pub parent_public_key: Option<String>,
    /// A file holding the parent's identity key (base64).
    pub parent_public_key_file: Option<PathBuf>,
    /// Operator accounts of the embedded broker.
    pub mqtt_users: Option<Vec<UserEntry>>,
    /// Seconds an admission challenge stays valid (default 30).
    #[serde(rename = "challenge_ttl", alias = "challenge_ttl_secs")]
    pub challenge_ttl_secs: Option<u64>,
    /// Seconds between heartbeats to the parent (default 10). Key `heartbeat_interval`
    /// (`heartbeat_interval_secs` still read).
    #[serde(rename = "heartbeat_interval", alias = "heartbeat_interval_secs")]
    pub heartbeat_interval_secs: Option<f64>,
    /// Seconds between scheduled pairwise key rotations (default 86400).
    #[serde(rename = "key_rotation", alias = "key_rotation_secs")]
    pub key_rotation_secs: Option<u64>,
    /// Seconds a superseded key still verifies (default 600).
    #[serde(rename = "key_grace", alias = "key_grace_secs")]
    pub key_grace_secs: Option<u64>,
    /// The gRPC URL others should use to reach this node (default: the bound address).
    pub advertise_grpc: Option<String>,
    /// The MQTT URL the global controller hands to admitted controllers (a
    /// comma-separated list for a broker cluster).
    pub advertise_mqtt: Option<String>,
    /// User name on an external broker (default: the controller id).
    pub mqtt_username: Option<String>,
    /// File holding the password on an external broker (instead of the credential the
    /// global controller issues for its embedded broker).
    pub mqtt_password_file: Option<PathBuf>,
    /// CA certificates (PEM) for an `mqtts://` broker.
    pub mqtt_ca_file: Option<PathBuf>,
    /// Do not use MQTT at all (everything goes over gRPC).
    pub no_mqtt: Option<bool>,
    /// Seconds between discovery cycles (local controllers; default 30). Key
    /// `discovery_interval` (`discovery_interval_secs` still read).
    #[serde(rename = "discovery_interval", alias = "discovery_interval_secs")]
    pub discovery_interval_secs: Option<f64>,
    /// `simulated` (default), `probe` (TCP probes + neighbour table) or `file`.
    pub scanner: Option<String>,
    /// What is logged: `error`, `warn`, `info` (default), `debug`, `trace`, or a filter
    /// such as `info,pdsno_node::discovery=debug`; `RUST_LOG` wins when set.
    pub log_level: Option<String>,
    /// `text` (default) or `json` (one JSON object a line).
    pub log_format: Option<String>,
    /// The subnet this local controller scans (CIDR).
    pub subnet: Option<String>,
    /// Seed of the simulated scanner (default: derived from the controller id).
    pub scan_seed: Option<u64>,
    /// Device list for the `file` scanner (JSON array).
    pub scan_file: Option<PathBuf>,
    /// TCP ports the `probe` scanner tries on each host (default 22, 80, 443, 8080).
    pub probe_ports: Option<Vec<u16>>,
    /// Seconds the `probe` scanner waits for each connection (default 0.5).
    pub probe_timeout: Option<f64>,
    /// Cycles a device may be missed before it is reported inactive (default 3).
    pub missed_cycles: Option<u32>,
    /// Seconds between a regional controller's summaries to the GC (default 30). Key
    /// `summary_interval` (`summary_interval_secs` still read).
    #[serde(rename = "summary_interval", alias = "summary_interval_secs")]
    pub summary_interval_secs: Option<f64>,
    /// New devices in one report above which a spike is flagged (default 100).
    pub spike_threshold: Option<usize>,
    /// Most devices one local controller may own at its regional controller (default 65536).
    pub max_devices_per_lc: Option<u64>,
    /// Seconds a device may stay inactive before it is deleted (devices at local and
    /// regional controllers, the global inventory; default 604800, 7 days).
    pub device_retention: Option<u64>,
    /// This node's certificate chain (PEM): turns on TLS for gRPC, REST and the embedded broker.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) trusted for servers we call and for client certificates.
    pub tls_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `tls_ca` (mutual TLS).
    pub require_client_cert: Option<bool>,
    /// Refuse plaintext: no plaintext listener, no http:// or mqtt:// peer.
    pub require_tls: Option<bool>,
    /// The embedded broker's TLS listener (default: port 8883 next to `listen_mqtt`).
    pub listen_mqtts: Option<SocketAddr>,
    /// Requests per second allowed per client address on REST and gRPC (0 = no limit; default 200).
    pub rate_limit_rps: Option<u32>,
    /// Burst allowed above the rate (default 400).
    pub rate_limit_burst: Option<u32>,
    /// Source networks (CIDR) exempt from the rate limit, e.g. a NAT gateway in front of
    /// many controllers.
    pub rate_limit_exempt: Option<Vec<String>>,
    /// Failed admission attempts from one address before a lockout (default 5; 0 = never).
    pub lockout_failures: Option<u32>,
    /// The window in which those failures count (default 60 s).
    pub lockout_window_secs: Option<f64>,
    /// How long a locked-out address is refused (default 900 s).
    pub lockout_secs: Option<f64>,
    /// Concurrent connections per listener (default 1024).
    pub max_connections: Option<usize>,
    /// Concurrent connections one source address may hold per listener (default 64; 0 =
    /// no per-address cap); the last quarter of a listener's connections is kept for
    /// addresses holding fewer than a quarter of it. Networks in `rate_limit_exempt` are
    /// exempt.
    pub max_connections_per_address: Option<usize>,
    /// PUBLISH packets per second a controller may send through the embedded broker
    /// (default 500; 0 = no limit); above it the broker slows it down (back-pressure).
    pub mqtt_publish_rate: Option<u32>,
    /// PUBLISH packets a controller may send at once above that rate (default 2000).
    pub mqtt_publish_burst: Option<u32>,
}

/// An operator account in the file: a name and an Argon2 PHC hash (never a password).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// Account name.
    pub name: String,
    /// `$argon2id$...` hash.
    pub password_hash: String,
    /// Subscribe only, never publish (monitoring accounts).
    #[serde(default)]
    pub read_only: bool,
}

/// Flags shared by `pdsno global|regional|local`; each also reads a `PDSNO_*` variable.
#[derive(Debug, Default, Args)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "PDSNO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (NIB and identity key).
    #[arg(long, env = "PDSNO_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "PDSNO_LISTEN_GRPC", value_name = "ADDR")]
    pub listen_grpc: Option<SocketAddr>,
    /// REST compatibility listen address.
    #[arg(long, env = "PDSNO_LISTEN_REST", value_name = "ADDR")]
    pub listen_rest: Option<SocketAddr>,
    /// Serve the admin service (operator commands) only here, e.g. 127.0.0.1:0, instead of
    /// on the gRPC listener.
    #[arg(long, env = "PDSNO_LISTEN_ADMIN", value_name = "ADDR")]
    pub listen_admin: Option<SocketAddr>,
    /// Also serve GET /health, /ready and /metrics, and nothing else, over plaintext HTTP
    /// here, e.g. 127.0.0.1:9464 (for Prometheus when REST requires TLS; off by default).
    #[arg(long, env = "PDSNO_LISTEN_METRICS", value_name = "ADDR")]
    pub listen_metrics: Option<SocketAddr>,
    /// Embedded broker listen address, MQTT 3.1.1 and 5 (global controller).
    #[arg(long, env = "PDSNO_LISTEN_MQTT", value_name = "ADDR")]
    pub listen_mqtt: Option<SocketAddr>,
    /// An extra embedded broker listener (global controller). Every listener serves MQTT
    /// 3.1.1 and 5; this one is for deployments that want MQTT 5 clients on a port of their
    /// own.
    #[arg(long, env = "PDSNO_LISTEN_MQTT_V5", value_name = "ADDR")]
    pub listen_mqtt_v5: Option<SocketAddr>,
    /// Do not run the embedded broker (use --mqtt-url).
    #[arg(long, env = "PDSNO_NO_EMBEDDED_BROKER")]
    pub no_embedded_broker: bool,
    /// External MQTT broker URL; a comma-separated list names the members of a broker
    /// cluster, tried in turn when one fails.
    #[arg(long, env = "PDSNO_MQTT_URL", value_name = "URL[,URL...]")]
    pub mqtt_url: Option<String>,
    /// The parent's gRPC URL. Default: the one this controller was admitted through, and
    /// for a first start the parent tier's default port on loopback
    /// (`http://127.0.0.1:50051` for a regional, `:50052` for a local controller).
    #[arg(long, env = "PDSNO_PARENT", value_name = "URL")]
    pub parent: Option<String>,
    /// This controller's region.
    #[arg(long, env = "PDSNO_REGION")]
    pub region: Option<String>,
    /// Temporary id used until admission.
    #[arg(long, env = "PDSNO_TEMP_ID")]
    pub temp_id: Option<String>,
    /// Bootstrap token for admission (single use).
    #[arg(long, env = "PDSNO_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<SecretArg>,
    /// File holding the bootstrap token.
    #[arg(long, env = "PDSNO_BOOTSTRAP_TOKEN_FILE", value_name = "FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// File holding the bootstrap secret (or PDSNO_BOOTSTRAP_SECRET holds the secret), mode
    /// 0600. Global: required. Regional: default DATA_DIR/bootstrap.secret, created on first
    /// start; never the global controller's.
    #[arg(long, env = "PDSNO_BOOTSTRAP_SECRET_FILE", value_name = "FILE")]
    pub bootstrap_secret_file: Option<PathBuf>,
    /// Shared message-signing secret (network key = its SHA-256). Prefer the variable.
    #[arg(long, env = "PDSNO_MESSAGE_SIGNING_SECRET", hide_env_values = true)]
    pub secret: Option<SecretArg>,
    /// File holding the shared message-signing secret.
    #[arg(long, env = "PDSNO_MESSAGE_SIGNING_SECRET_FILE", value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Regions children may join, comma-separated (global controller).
    #[arg(long, env = "PDSNO_REGIONS", value_delimiter = ',')]
    pub regions: Option<Vec<String>>,
    /// Accept the original PDSNO's challenge answer (insecure; warns on each use).
    #[arg(long, env = "PDSNO_LEGACY_COMPAT")]
    pub legacy_compat: bool,
    /// Most active children of one role per region.
    #[arg(long, env = "PDSNO_QUOTA_PER_REGION")]
    pub quota_per_region: Option<u64>,
    /// Temp ids or public keys refused at admission, comma-separated.
    #[arg(long, env = "PDSNO_BLOCKLIST", value_delimiter = ',')]
    pub blocklist: Option<Vec<String>>,
    /// The global controller's public key (base64) to pin.
    #[arg(long, env = "PDSNO_ROOT_PUBLIC_KEY")]
    pub root_public_key: Option<String>,
    /// The parent's controller id (e.g. global_cntl_1): over TLS, the parent's certificate
    /// must name it (urn:pdsno:controller:ID) before the bootstrap token is sent.
    #[arg(long, env = "PDSNO_PARENT_ID", value_name = "ID")]
    pub parent_id: Option<String>,
    /// The parent's Ed25519 identity key (base64, printed by the parent at startup): it
    /// must prove holding it before the bootstrap token is sent.
    #[arg(long, env = "PDSNO_PARENT_PUBLIC_KEY", value_name = "BASE64")]
    pub parent_public_key: Option<String>,
    /// A file holding the parent's identity key (base64).
    #[arg(long, env = "PDSNO_PARENT_PUBLIC_KEY_FILE", value_name = "FILE")]
    pub parent_public_key_file: Option<PathBuf>,
    /// Embedded broker operator account NAME:PASSWORD (repeatable).
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    pub users: Vec<SecretArg>,
    /// Embedded broker read-only account NAME:PASSWORD: subscribes, never publishes
    /// (repeatable).
    #[arg(long = "reader", value_name = "NAME:PASSWORD")]
    pub readers: Vec<SecretArg>,
    /// Seconds an admission challenge stays valid.
    #[arg(
        long = "challenge-ttl",
        env = "PDSNO_CHALLENGE_TTL",
        value_name = "SECS"
    )]
    pub challenge_ttl_secs: Option<u64>,
    /// Seconds between heartbeats to the parent.
    #[arg(
        long = "heartbeat-interval",
        env = "PDSNO_HEARTBEAT_INTERVAL",
        value_name = "SECS"
    )]
    pub heartbeat_interval_secs: Option<f64>,
    /// Seconds between scheduled pairwise key rotations.
    #[arg(long = "key-rotation", env = "PDSNO_KEY_ROTATION", value_name = "SECS")]
    pub key_rotation_secs: Option<u64>,
    /// Seconds a superseded key still verifies.
    #[arg(long = "key-grace", env = "PDSNO_KEY_GRACE", value_name = "SECS")]
    pub key_grace_secs: Option<u64>,
    /// The gRPC URL others should use to reach this node.
    #[arg(long, env = "PDSNO_ADVERTISE_GRPC", value_name = "URL")]
    pub advertise_grpc: Option<String>,
    /// The MQTT URL the global controller hands to admitted controllers (a comma-separated
    /// list for a broker cluster).
    #[arg(long, env = "PDSNO_ADVERTISE_MQTT", value_name = "URL[,URL...]")]
    pub advertise_mqtt: Option<String>,
    /// User name on an external broker (default: the controller id).
    #[arg(long, env = "PDSNO_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// File holding the password on an external broker.
    #[arg(long, env = "PDSNO_MQTT_PASSWORD_FILE", value_name = "FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// CA certificates (PEM) for an mqtts:// broker.
    #[arg(long, env = "PDSNO_MQTT_CA_FILE", value_name = "FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// Do not use MQTT at all (everything goes over gRPC).
    #[arg(long, env = "PDSNO_NO_MQTT")]
    pub no_mqtt: bool,
    /// Seconds between discovery cycles (local controllers).
    #[arg(
        long = "discovery-interval",
        env = "PDSNO_DISCOVERY_INTERVAL",
        value_name = "SECS"
    )]
    pub discovery_interval_secs: Option<f64>,
    /// Device scanner: simulated, probe (TCP probes + neighbour table) or file.
    #[arg(long, env = "PDSNO_SCANNER")]
    pub scanner: Option<String>,
    /// What is logged: error, warn, info (default), debug, trace, or a filter such as
    /// `info,pdsno_node::discovery=debug` (RUST_LOG wins when set).
    #[arg(long, env = "PDSNO_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text (default) or json (one JSON object a line, on stderr).
    #[arg(long, env = "PDSNO_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// The subnet to scan (CIDR).
    #[arg(long, env = "PDSNO_SUBNET")]
    pub subnet: Option<String>,
    /// Seed of the simulated scanner.
    #[arg(long, env = "PDSNO_SCAN_SEED")]
    pub scan_seed: Option<u64>,
    /// Device list (JSON array) for the file scanner.
    #[arg(long, env = "PDSNO_SCAN_FILE", value_name = "FILE")]
    pub scan_file: Option<PathBuf>,
    /// TCP ports the probe scanner tries on each host, comma-separated.
    #[arg(
        long,
        env = "PDSNO_PROBE_PORTS",
        value_delimiter = ',',
        value_name = "PORT,..."
    )]
    pub probe_ports: Option<Vec<u16>>,
    /// Seconds the probe scanner waits for each connection.
    #[arg(long, env = "PDSNO_PROBE_TIMEOUT", value_name = "SECS")]
    pub probe_timeout: Option<f64>,
    /// Cycles a device may be missed before it is reported inactive.
    #[arg(long, env = "PDSNO_MISSED_CYCLES")]
    pub missed_cycles: Option<u32>,
    /// Seconds between a regional controller's summaries to the GC.
    #[arg(
        long = "summary-interval",
        env = "PDSNO_SUMMARY_INTERVAL",
        value_name = "SECS"
    )]
    pub summary_interval_secs: Option<f64>,
    /// New devices in one report above which a discovery spike is flagged.
    #[arg(long, env = "PDSNO_SPIKE_THRESHOLD")]
    pub spike_threshold: Option<usize>,
    /// Most devices one local controller may own (regional controllers; more are refused
    /// and audited as DEVICE_CAP_REACHED). Default 65536.
    #[arg(long, env = "PDSNO_MAX_DEVICES_PER_LC")]
    pub max_devices_per_lc: Option<u64>,
    /// Seconds a device may stay inactive before it is deleted, with one DEVICES_EXPIRED
    /// audit event per pass counting them (local and regional controllers' devices, the
    /// global inventory). Default 604800 (7 days).
    #[arg(long, env = "PDSNO_DEVICE_RETENTION", value_name = "SECS")]
    pub device_retention: Option<u64>,
    /// Run one discovery cycle, deliver its report, and exit (local controllers).
    #[arg(long, env = "PDSNO_SCAN_ONCE")]
    pub scan_once: bool,
    /// This node's certificate chain (PEM); turns on TLS for gRPC, REST and the embedded broker.
    #[arg(long, env = "PDSNO_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "PDSNO_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) trusted for the servers we call and for client certificates.
    #[arg(long, env = "PDSNO_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by --tls-ca (mutual TLS).
    #[arg(long, env = "PDSNO_REQUIRE_CLIENT_CERT")]
    pub require_client_cert: bool,
    /// Refuse plaintext: no plaintext listener, no http:// or mqtt:// peer.
    #[arg(long, env = "PDSNO_REQUIRE_TLS")]
    pub require_tls: bool,
    /// The embedded broker's TLS listener (default: port 8883 next to --listen-mqtt).
    #[arg(long, env = "PDSNO_LISTEN_MQTTS", value_name = "ADDR")]
    pub listen_mqtts: Option<SocketAddr>,
    /// Requests per second per client address on REST and gRPC (0 = no limit).
    #[arg(long, env = "PDSNO_RATE_LIMIT_RPS")]
    pub rate_limit_rps: Option<u32>,
    /// Burst allowed above --rate-limit-rps.
    #[arg(long, env = "PDSNO_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// A source network (CIDR) exempt from the rate limit, e.g. a NAT gateway in front of
    /// many controllers (repeatable; the admission lockout still applies).
    #[arg(
        long,
        env = "PDSNO_RATE_LIMIT_EXEMPT",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub rate_limit_exempt: Vec<String>,
    /// Failed admission attempts from one address before a lockout (0 = never).
    #[arg(long, env = "PDSNO_LOCKOUT_FAILURES")]
    pub lockout_failures: Option<u32>,
    /// Window (seconds) in which failed admission attempts count.
    #[arg(long, env = "PDSNO_LOCKOUT_WINDOW_SECS", value_name = "SECS")]
    pub lockout_window_secs: Option<f64>,
    /// Lockout duration (seconds).
    #[arg(long, env = "PDSNO_LOCKOUT_SECS", value_name = "SECS")]
    pub lockout_secs: Option<f64>,
    /// Concurrent connections per listener.
    #[arg(long, env = "PDSNO_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Concurrent connections one source address may hold per listener (0 = no cap; the
    /// --rate-limit-exempt networks are exempt).
    #[arg(long, env = "PDSNO_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,
    /// PUBLISH packets per second a controller may send through the embedded broker
    /// (0 = no limit); above it the broker slows it down.
    #[arg(long, env = "PDSNO_MQTT_PUBLISH_RATE")]
    pub mqtt_publish_rate: Option<u32>,
    /// PUBLISH packets a controller may send at once above --mqtt-publish-rate.
    #[arg(long, env = "PDSNO_MQTT_PUBLISH_BURST")]
    pub mqtt_publish_burst: Option<u32>,
    /// Validate the configuration and exit (0 if valid, else the first error).
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective configuration (file, variables and flags applied; secrets only
    /// as set or not) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// A secret given on the command line (a token, a password): its `Debug` shows
/// `[redacted]`, so printing the parsed arguments never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretArg(zeroize::Zeroizing<String>);

impl SecretArg {
    /// The secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretArg(zeroize::Zeroizing::new(s.to_owned())))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The resolved configuration of one node.
#[derive(Clone)]
pub struct NodeConfig {
    /// The tier.
    pub role: Role,
    /// The in-process bus shared with the other nodes of this process (`pdsno edge`); not a
    /// setting.
    pub bus: Option<crate::transport::bus::Bus>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen_grpc: SocketAddr,
    /// REST listen address.
    pub listen_rest: SocketAddr,
    /// Separate admin service listener.
    pub listen_admin: Option<SocketAddr>,
    /// Plaintext health and metrics listener.
    pub listen_metrics: Option<SocketAddr>,
    /// Embedded broker 3.1.1 address.
    pub listen_mqtt: SocketAddr,
    /// Embedded broker 5 address.
    pub listen_mqtt_v5: Option<SocketAddr>,
    /// Run the embedded broker (global only).
    pub embedded_broker: bool,
    /// External broker.
    pub mqtt_url: Option<String>,
    /// Parent URL.
    pub parent: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Temp id.
    pub temp_id: Option<String>,
    /// Bootstrap token.
    pub bootstrap_token: Option<SecretString>,
    /// Where the bootstrap token was to come from (named when a first start lacks it).
    pub bootstrap_token_file: Option<PathBuf>,
    /// Bootstrap secret.
    pub bootstrap_secret: Option<SecretString>,
    /// Shared network key.
    pub network_key: Option<HmacKey>,
    /// Allowed regions.
    pub regions: Vec<String>,
    /// Legacy challenge answers.
    pub legacy_compat: bool,
    /// Quota.
    pub quota_per_region: u64,
    /// Blocklist.
    pub blocklist: Vec<String>,
    /// Pinned root key.
    pub root_public_key: Option<PublicKey>,
    /// What the parent must prove before the bootstrap token is sent.
    pub parent_pin: crate::transport::parent::ParentPin,
    /// Operator accounts.
    pub users: Vec<OperatorAccount>,
    /// Embedded broker: PUBLISH packets per second per controller (0 = no limit).
    pub mqtt_publish_rate: u32,
    /// Embedded broker: burst above that rate.
    pub mqtt_publish_burst: u32,
    /// Admission challenge lifetime.
    pub challenge_ttl: std::time::Duration,
    /// Heartbeat period.
    pub heartbeat_interval: std::time::Duration,
    /// Scheduled key rotation period.
    pub key_rotation: std::time::Duration,
    /// Grace period of superseded keys.
    pub key_grace: std::time::Duration,
    /// Advertised gRPC URL.
    pub advertise_grpc: Option<String>,
    /// Advertised MQTT URL.
    pub advertise_mqtt: Option<String>,
    /// External broker user name.
    pub mqtt_username: Option<String>,
    /// External broker password.
    pub mqtt_password: Option<SecretString>,
    /// CA file for mqtts://.
    pub mqtt_ca_file: Option<PathBuf>,
    /// Use MQTT when a broker is known.
    pub mqtt: bool,
    /// Discovery cycle interval.
    pub discovery_interval: std::time::Duration,
    /// The scanner.
    pub scanner: ScannerKind,
    /// The log filter (`RUST_LOG` syntax).
    pub log_level: String,
    /// Logs as JSON lines.
    pub log_json: bool,
    /// The subnet to scan.
    pub subnet: Option<String>,
    /// Simulated scanner seed.
    pub scan_seed: Option<u64>,
    /// File scanner input.
    pub scan_file: Option<PathBuf>,
    /// Probe scanner ports.
    pub probe_ports: Vec<u16>,
    /// Probe scanner connect timeout.
    pub probe_timeout: std::time::Duration,
    /// Misses before inactive.
    pub missed_cycles: u32,
    /// Summary interval.
    pub summary_interval: std::time::Duration,
    /// Spike threshold.
    pub spike_threshold: usize,
    /// Device cap per local controller.
    pub max_devices_per_lc: u64,
    /// How long a device may stay inactive before it is deleted.
    pub device_retention: std::time::Duration,
    /// One cycle and exit.
    pub scan_once: bool,
    /// TLS files and requirements.
    pub tls: crate::tls::TlsOptions,
    /// The embedded broker's TLS listener.
    pub listen_mqtts: Option<SocketAddr>,
    /// Per-client limits.
    pub limits: crate::guard::Limits,
}

/// Which device scanner a local controller uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScannerKind {
    /// Deterministic simulated subnet (labs, the demo).
    Simulated,
    /// TCP connect probes and the kernel neighbour table.
    Probe,
    /// A JSON device list, read at each cycle.
    File,
}

/// The longest device retention accepted: 10 years.
const MAX_DEVICE_RETENTION_SECS: u64 = 10 * 365 * 24 * 3600;

fn seconds(name: &str, v: Option<f64>, default: f64) -> Result<std::time::Duration, ConfigError> {
    let secs = v.unwrap_or(default);
    if !(0.01..=86_400.0).contains(&secs) {
        return Err(err(name, "must be between 0.01 and 86400 seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Parses `rate_limit_exempt` networks (`10.0.0.0/8`, `fd00::/8`; a bare address is one host).
fn networks(list: Vec<String>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    err(
                        "rate_limit_exempt",
                        format!("{s:?} is not a network (CIDR such as 10.0.0.0/8) or an address"),
                    )
                })
        })
        .collect()
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("role", &self.role)
            .field("data_dir", &self.data_dir)
            .field("listen_grpc", &self.listen_grpc)
            .field("listen_rest", &self.listen_rest)
            .field("listen_admin", &self.listen_admin)
            .field("listen_metrics", &self.listen_metrics)
            .field("parent", &self.parent)
            .field("region", &self.region)
            .field("temp_id", &self.temp_id)
            .field(
                "bootstrap_token",
                &self.bootstrap_token.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "bootstrap_secret",
                &self.bootstrap_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("network_key", &self.network_key)
            .field("regions", &self.regions)
            .field("legacy_compat", &self.legacy_compat)
            .finish_non_exhaustive()
    }
}

/// A setting's `Debug` text as JSON: `None` is null, `Some(x)` is x, numbers and booleans are
/// themselves, quoted text loses its quotes.
fn tidy(text: String) -> pdsno_shared::json::Value {
    use pdsno_shared::json::Value;
    let t = text
        .strip_prefix("Some(")
        .and_then(|x| x.strip_suffix(')'))
        .unwrap_or(&text);
    match t {
        "None" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => match t.parse::<u64>() {
            Ok(n) => n.into(),
            Err(_) => t
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .unwrap_or(t)
                .into(),
        },
    }
}

impl NodeConfig {
    /// The effective configuration, one entry per setting (values as Rust shows them;
    /// secrets only as set or not), for `--print-config`.
    pub fn effective(&self) -> pdsno_shared::json::Map {
        use pdsno_shared::json::{Map, Value};
        let mut m = Map::new();
        m.insert("role".into(), tidy(format!("{:?}", self.role)));
        m.insert("data_dir".into(), tidy(format!("{:?}", self.data_dir)));
        m.insert(
            "listen_grpc".into(),
            tidy(format!("{:?}", self.listen_grpc)),
        );
        m.insert(
            "listen_rest".into(),
            tidy(format!("{:?}", self.listen_rest)),
        );
        m.insert(
            "listen_admin".into(),
            tidy(format!("{:?}", self.listen_admin)),
        );
        m.insert(
            "listen_metrics".into(),
            tidy(format!("{:?}", self.listen_metrics)),
        );
        m.insert(
            "listen_mqtt".into(),
            tidy(format!("{:?}", self.listen_mqtt)),
        );
        m.insert(
            "listen_mqtt_v5".into(),
            tidy(format!("{:?}", self.listen_mqtt_v5)),
        );
        m.insert(
            "embedded_broker".into(),
            tidy(format!("{:?}", self.embedded_broker)),
        );
        m.insert("mqtt_url".into(), tidy(format!("{:?}", self.mqtt_url)));
        m.insert("parent".into(), tidy(format!("{:?}", self.parent)));
        m.insert("region".into(), tidy(format!("{:?}", self.region)));
        m.insert("temp_id".into(), tidy(format!("{:?}", self.temp_id)));
        m.insert(
            "bootstrap_token_file".into(),
            tidy(format!("{:?}", self.bootstrap_token_file)),
        );
        m.insert("regions".into(), tidy(format!("{:?}", self.regions)));
        m.insert(
            "legacy_compat".into(),
            tidy(format!("{:?}", self.legacy_compat)),
        );
        m.insert(
            "quota_per_region".into(),
            tidy(format!("{:?}", self.quota_per_region)),
        );
        m.insert("blocklist".into(), tidy(format!("{:?}", self.blocklist)));
        m.insert(
            "root_public_key".into(),
            tidy(format!("{:?}", self.root_public_key)),
        );
        m.insert("parent_pin".into(), tidy(format!("{:?}", self.parent_pin)));
        m.insert(
            "mqtt_publish_rate".into(),
            tidy(format!("{:?}", self.mqtt_publish_rate)),
        );
        m.insert(
            "mqtt_publish_burst".into(),
            tidy(format!("{:?}", self.mqtt_publish_burst)),
        );
        m.insert(
            "challenge_ttl".into(),
            tidy(format!("{:?}", self.challenge_ttl)),
        );
        m.insert(
            "heartbeat_interval".into(),
            tidy(format!("{:?}", self.heartbeat_interval)),
        );
        m.insert(
            "key_rotation".into(),
            tidy(format!("{:?}", self.key_rotation)),
        );
        m.insert("key_grace".into(), tidy(format!("{:?}", self.key_grace)));
        m.insert(
            "advertise_grpc".into(),
            tidy(format!("{:?}", self.advertise_grpc)),
        );
        m.insert(
            "advertise_mqtt".into(),
            tidy(format!("{:?}", self.advertise_mqtt)),
        );
        m.insert(
            "mqtt_username".into(),
            tidy(format!("{:?}", self.mqtt_username)),
        );
        m.insert(
            "mqtt_ca_file".into(),
            tidy(format!("{:?}", self.mqtt_ca_file)),
        );
        m.insert("mqtt".into(), tidy(format!("{:?}", self.mqtt)));
        m.insert(
            "discovery_interval".into(),
            tidy(format!("{:?}", self.discovery_interval)),
        );
        m.insert("scanner".into(), tidy(format!("{:?}", self.scanner)));
        m.insert("subnet".into(), tidy(format!("{:?}", self.subnet)));
        m.insert("scan_seed".into(), tidy(format!("{:?}", self.scan_seed)));
        m.insert("scan_file".into(), tidy(format!("{:?}", self.scan_file)));
        m.insert(
            "probe_ports".into(),
            Value::Array(
                self.probe_ports
                    .iter()
                    .map(|p| u64::from(*p).into())
                    .collect(),
            ),
        );
        m.insert(
            "probe_timeout".into(),
            tidy(format!("{:?}", self.probe_timeout)),
        );
        m.insert(
            "missed_cycles".into(),
            tidy(format!("{:?}", self.missed_cycles)),
        );
        m.insert(
            "summary_interval".into(),
            tidy(format!("{:?}", self.summary_interval)),
        );
        m.insert(
            "spike_threshold".into(),
            tidy(format!("{:?}", self.spike_threshold)),
        );
        m.insert(
            "max_devices_per_lc".into(),
            tidy(format!("{:?}", self.max_devices_per_lc)),
        );
        m.insert(
            "device_retention".into(),
            tidy(format!("{:?}", self.device_retention)),
        );
        m.insert("scan_once".into(), tidy(format!("{:?}", self.scan_once)));
        m.insert("tls".into(), tidy(format!("{:?}", self.tls)));
        m.insert(
            "listen_mqtts".into(),
            tidy(format!("{:?}", self.listen_mqtts)),
        );
        m.insert("limits".into(), tidy(format!("{:?}", self.limits)));
        m.insert(
            "bootstrap_token".into(),
            if self.bootstrap_token.is_some() {
                "[set]"
            } else {
                "[not set]"
            }
            .into(),
        );
        m.insert(
            "bootstrap_secret".into(),
            if self.bootstrap_secret.is_some() {
                "[set]"
            } else {
                "[not set]"
            }
            .into(),
        );
        m.insert(
            "network_key".into(),
            if self.network_key.is_some() {
                "[set]"
            } else {
                "[not set]"
            }
            .into(),
        );
        m.insert(
            "mqtt_password".into(),
            if self.mqtt_password.is_some() {
                "[set]"
            } else {
                "[not set]"
            }
            .into(),
        );
        m.insert(
            "users".into(),
            Value::Array(self.users.iter().map(|u| Value::from(u.name())).collect()),
        );
        m
    }
}

/// A configuration error, naming the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key (file key or flag).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

thread_local! {
    /// Set while checking a configuration: missing secret files become notes.
    static CHECK_NOTES: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

fn read_secret(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err(
                key,
                format!(
                    "{} does not exist: create it (mode 0600) or correct the path",
                    path.display()
                ),
            )
        } else {
            err(key, format!("{}: {e}", path.display()))
        }
    })?;
    // A secret other local users can read is a secret they have: refused, like identity.key.
    match crate::identity::loose_mode(path) {
        Ok(None) => {}
        Ok(Some(mode)) => {
            return Err(err(
                key,
                format!(
                    "{} is readable by other users (mode {mode:o}): run chmod 600 {} (and keep it owned by the user pdsno runs as)",
                    path.display(),
                    path.display()
                ),
            ));
        }
        Err(e) => return Err(err(key, format!("{}: {e}", path.display()))),
    }
    let s = text.trim_end_matches(['\n', '\r']).to_owned();
    if s.is_empty() {
        return Err(err(key, format!("{} is empty", path.display())));
    }
    Ok(SecretString::new(s))
}

/// Default ports per tier (gRPC, REST).
pub fn default_ports(role: Role) -> (u16, u16) {
    match role {
        Role::Global => (50051, 8001),
        Role::Regional => (50052, 8002),
        Role::Local => (50053, 8003),
    }
}

/// Reads and parses a config file.
///
/// # Errors
/// A [`ConfigError`] with the TOML key path and position.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let mut file = parse_file(path)?;
    // A relative path in the file is relative to the file's directory, as in systemd and
    // Mosquitto configurations, so the node reads the same files from any working directory.
    if let Some(base) = path.parent() {
        for p in [
            &mut file.data_dir,
            &mut file.bootstrap_token_file,
            &mut file.bootstrap_secret_file,
            &mut file.secret_file,
            &mut file.parent_public_key_file,
            &mut file.mqtt_password_file,
            &mut file.mqtt_ca_file,
            &mut file.scan_file,
            &mut file.tls_cert,
            &mut file.tls_key,
            &mut file.tls_ca,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
    Ok(file)
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("config", format!("{}: {e}", path.display())))?;
    let de = toml::Deserializer::new(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // The key path of the offending value (`mqtt_users[1].hash`), and where it is.
        let key_path = e.path().to_string();
        let inner = e.inner();
        let mut key = path.display().to_string();
        if let Some(span) = inner.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            key = format!("{key} line {line}");
        }
        if !key_path.is_empty() && key_path != "." {
            key = format!("{key}: {key_path}");
        }
        let mut message = inner.message().to_owned();
        // serde names the unknown key and the expected ones: say which one was meant.
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((unknown, expected)) = rest.split_once("`, expected")
            && let Some(best) = did_you_mean(
                unknown,
                expected.split('`').skip(1).step_by(2).map(str::to_owned),
            )
        {
            message = format!("unknown key `{unknown}` (did you mean `{best}`?)");
        }
        err(&key, message)
    })
}

/// A variable renamed to follow the naming rule, still read for one release: its value (when
/// it parses as seconds), with a warning naming the new name.
fn deprecated_seconds(old: &str, new: &str) -> Option<f64> {
    let v = std::env::var(old).ok()?;
    eprintln!("warning: {old} is deprecated; use {new}");
    v.trim().parse().ok()
}

/// The candidate closest to `word` (by edit distance), when it is close enough to be what was
/// meant.
pub fn did_you_mean(word: &str, candidates: impl IntoIterator<Item = String>) -> Option<String> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let cost = usize::from(ca != *cb);
                cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (distance(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// The id of the controller whose data directory `dir` is, if it was admitted (read without
/// creating anything).
pub(crate) fn admitted_id(dir: &Path) -> Option<String> {
    let db = dir.join("nib.db");
    if !db.exists() {
        return None;
    }
    crate::nib::Nib::open(&db)
        .ok()?
        .state_str(crate::nib::StateKey::AssignedId)
        .ok()
        .flatten()
}

/// The parent URL a controller uses for its first admission when none is configured: the
/// parent tier's default gRPC port on loopback.
pub fn default_parent(role: Role) -> String {
    match role {
        Role::Global | Role::Regional => "http://127.0.0.1:50051".into(),
        Role::Local => "http://127.0.0.1:50052".into(),
    }
}

impl NodeConfig {
    /// Validates a configuration without starting anything: returns notes about secret
    /// files that do not exist yet (they are not errors of the configuration itself).
    ///
    /// # Errors
    /// The first problem, with its key.
    pub fn check_only(role: Role, a: &NodeArgs) -> Result<Vec<String>, ConfigError> {
        CHECK_NOTES.with(|n| *n.borrow_mut() = Some(Vec::new()));
        let r = NodeConfig::resolve(role, a);
        let mut notes = CHECK_NOTES
            .with(|n| n.borrow_mut().take())
            .unwrap_or_default();
        let cfg = r?;
        // The TLS files as the node loads them: readable, the key matching the certificate,
        // the certificate valid now and issued by the CA.
        crate::tls::TlsMaterial::load(&cfg.tls).map_err(|e| err("tls", e.0))?;
        if let Some(p) = &cfg.mqtt_ca_file {
            std::fs::read(p)
                .map_err(|e| err("mqtt_ca_file", format!("cannot read {}: {e}", p.display())))?;
        }
        if role != Role::Global {
            match admitted_id(&cfg.data_dir) {
                Some(id) => notes.push(format!(
                    "{} holds controller {id}: it restarts without admission (the first-start settings are ignored)",
                    cfg.data_dir.display()
                )),
                None => {
                    let (temp_id, _, region) =
                        cfg.first_start_inputs().map_err(|m| err("admission", m))?;
                    notes.push(format!(
                        "first start: {temp_id} asks {} for admission to region {region}",
                        cfg.parent
                            .clone()
                            .unwrap_or_else(|| default_parent(role))
                    ));
                }
            }
        }
        Ok(notes)
    }

    /// What a first start needs to be admitted: the temp id, the bootstrap token and the
    /// region.
    ///
    /// # Errors
    /// What is missing, and how to give it.
    pub fn first_start_inputs(&self) -> Result<(String, SecretString, String), String> {
        let temp_id = self.temp_id.clone().ok_or_else(|| {
            "not admitted yet: --temp-id is required (the temporary id the token was minted for)"
                .to_owned()
        })?;
        let token = self.bootstrap_token.clone().ok_or_else(|| match &self.bootstrap_token_file {
            Some(p) => format!(
                "not admitted yet: the bootstrap token file {} does not exist (mint one on the parent's host with pdsno token ... --out FILE; it is needed for the first start only)",
                p.display()
            ),
            None => "not admitted yet: give the bootstrap token (--bootstrap-token-file FILE or PDSNO_BOOTSTRAP_TOKEN)".into(),
        })?;
        let region = self
            .region
            .clone()
            .ok_or_else(|| "region: required to be admitted (--region)".to_owned())?;
        Ok((temp_id, token, region))
    }

    /// Resolves flags (and their variables) over the file over defaults, and checks the
    /// result.
    ///
    /// # Errors
    /// The first problem, with its key.
    pub fn resolve(role: Role, a: &NodeArgs) -> Result<Self, ConfigError> {
        let file = match &a.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let (grpc_port, rest_port) = default_ports(role);
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let region = a.region.clone().or(file.region);
        if let Some(r) = &region
            && !ids::is_valid_region(r)
        {
            return Err(err(
                "region",
                format!("{r:?} is not a valid region name (1-64 of [A-Za-z0-9_.-])"),
            ));
        }
        let temp_id = a.temp_id.clone().or(file.temp_id);
        if let Some(t) = &temp_id
            && !ids::is_valid_controller_id(t)
        {
            return Err(err(
                "temp_id",
                format!("{t:?} is not a valid controller id (1-128 of [A-Za-z0-9_.-])"),
            ));
        }
        let bootstrap_token = match (
            &a.bootstrap_token,
            a.bootstrap_token_file
                .as_ref()
                .or(file.bootstrap_token_file.as_ref()),
        ) {
            (Some(t), _) => Some(SecretString::new(t.expose().trim())),
            // First start only: an admitted controller restarts without it.
            (None, Some(p)) if !p.exists() => {
                CHECK_NOTES.with(|n| {
                    if let Some(v) = n.borrow_mut().as_mut() {
                        v.push(format!(
                            "bootstrap_token_file: {} does not exist (needed for the first start only)",
                            p.display()
                        ));
                    }
                });
                None
            }
            (None, Some(p)) => Some(read_secret("bootstrap_token_file", p)?),
            (None, None) => None,
        };
        let bootstrap_token_file = a
            .bootstrap_token_file
            .clone()
            .or(file.bootstrap_token_file.clone());
        let bootstrap_secret = match a
            .bootstrap_secret_file
            .as_ref()
            .or(file.bootstrap_secret_file.as_ref())
        {
            Some(p) => Some(read_secret("bootstrap_secret_file", p)?),
            None => std::env::var("PDSNO_BOOTSTRAP_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(SecretString::new),
        };
        let network_key = match (
            &a.secret,
            a.secret_file.as_ref().or(file.secret_file.as_ref()),
        ) {
            (Some(s), _) => Some(HmacKey::from_secret_text(s.expose())),
            (None, Some(p)) => Some(HmacKey::from_secret_text(
                read_secret("secret_file", p)?.expose(),
            )),
            (None, None) => None,
        };
        let regions = a.regions.clone().or(file.regions).unwrap_or_default();
        for r in &regions {
            if !ids::is_valid_region(r) {
                return Err(err("regions", format!("{r:?} is not a valid region name")));
            }
        }
        let root_public_key = match a.root_public_key.as_ref().or(file.root_public_key.as_ref()) {
            Some(k) => {
                Some(PublicKey::from_base64(k).map_err(|e| err("root_public_key", e.to_string()))?)
            }
            None => None,
        };
        let parent_id = a.parent_id.clone().or(file.parent_id);
        if let Some(p) = &parent_id
            && !ids::is_valid_controller_id(p)
        {
            return Err(err(
                "parent_id",
                format!("{p:?} is not a valid controller id (1-128 of [A-Za-z0-9_.-])"),
            ));
        }
        let parent_key_text = match (
            &a.parent_public_key,
            a.parent_public_key_file
                .as_ref()
                .or(file.parent_public_key_file.as_ref()),
        ) {
            (Some(k), _) => Some(k.trim().to_owned()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| {
                        err(
                            "parent_public_key_file",
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => file.parent_public_key.clone(),
        };
        let parent_pin = crate::transport::parent::ParentPin {
            id: parent_id,
            public_key: match parent_key_text {
                Some(k) => Some(
                    PublicKey::from_base64(k.trim())
                        .map_err(|e| err("parent_public_key", e.to_string()))?,
                ),
                None => None,
            },
        };
        let mut users = Vec::new();
        for u in &a.users {
            users.push(
                OperatorAccount::parse_flag(u.expose()).map_err(|e| err("user", e.to_string()))?,
            );
        }
        for u in &a.readers {
            users.push(
                OperatorAccount::parse_flag(u.expose())
                    .map_err(|e| err("reader", e.to_string()))?
                    .read_only(),
            );
        }
        for u in file.mqtt_users.unwrap_or_default() {
            let account = OperatorAccount::with_hash(&u.name, &u.password_hash)
                .map_err(|e| err(&format!("mqtt_users.{}", u.name), e.to_string()))?;
            users.push(if u.read_only {
                account.read_only()
            } else {
                account
            });
        }
        let parent = a.parent.clone().or(file.parent);
        let cfg = NodeConfig {
            bus: None,
            role,
            data_dir: a
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(format!("pdsno-{}", role.as_str()))),
            listen_grpc: a
                .listen_grpc
                .or(file.listen_grpc)
                .unwrap_or_else(|| loopback(grpc_port)),
            listen_rest: a
                .listen_rest
                .or(file.listen_rest)
                .unwrap_or_else(|| loopback(rest_port)),
            listen_admin: a.listen_admin.or(file.listen_admin),
            listen_metrics: a.listen_metrics.or(file.listen_metrics),
            listen_mqtt: a
                .listen_mqtt
                .or(file.listen_mqtt)
                .unwrap_or_else(|| loopback(1883)),
            listen_mqtt_v5: a.listen_mqtt_v5.or(file.listen_mqtt_v5),
            embedded_broker: !a.no_embedded_broker
                && !file.no_embedded_broker.unwrap_or(false)
                && file.embedded_broker.unwrap_or(true),
            mqtt_url: a.mqtt_url.clone().or(file.mqtt_url),
            parent: parent.clone(),
            region,
            temp_id,
            bootstrap_token,
            bootstrap_token_file,
            bootstrap_secret,
            network_key,
            regions,
            legacy_compat: a.legacy_compat || file.legacy_compat.unwrap_or(false),
            quota_per_region: a.quota_per_region.or(file.quota_per_region).unwrap_or(10),
            blocklist: a.blocklist.clone().or(file.blocklist).unwrap_or_default(),
            root_public_key,
            parent_pin,
            users,
            mqtt_publish_rate: a
                .mqtt_publish_rate
                .or(file.mqtt_publish_rate)
                .unwrap_or(500),
            mqtt_publish_burst: a
                .mqtt_publish_burst
                .or(file.mqtt_publish_burst)
                .unwrap_or(2000),
            challenge_ttl: std::time::Duration::from_secs(
                a.challenge_ttl_secs
                    .or(file.challenge_ttl_secs)
                    .unwrap_or(30)
                    .clamp(1, 600),
            ),
            heartbeat_interval: {
                let secs = a
                    .heartbeat_interval_secs
                    .or(file.heartbeat_interval_secs)
                    .unwrap_or(10.0);
                if !(0.01..=3600.0).contains(&secs) {
                    return Err(err(
                        "heartbeat_interval_secs",
                        "must be between 0.01 and 3600 seconds",
                    ));
                }
                std::time::Duration::from_secs_f64(secs)
            },
            key_rotation: std::time::Duration::from_secs(
                a.key_rotation_secs
                    .or(file.key_rotation_secs)
                    .unwrap_or(86_400)
                    .max(1),
            ),
            key_grace: std::time::Duration::from_secs(
                a.key_grace_secs
                    .or(file.key_grace_secs)
                    .unwrap_or(600)
                    .max(1),
            ),
            advertise_grpc: a.advertise_grpc.clone().or(file.advertise_grpc),
            advertise_mqtt: a.advertise_mqtt.clone().or(file.advertise_mqtt),
            mqtt_username: a.mqtt_username.clone().or(file.mqtt_username),
            mqtt_password: match a
                .mqtt_password_file
                .as_ref()
                .or(file.mqtt_password_file.as_ref())
            {
                Some(p) => Some(read_secret("mqtt_password_file", p)?),
                None => None,
            },
            mqtt_ca_file: a.mqtt_ca_file.clone().or(file.mqtt_ca_file),
            mqtt: !(a.no_mqtt || file.no_mqtt.unwrap_or(false)),
            discovery_interval: seconds(
                "discovery_interval_secs",
                a.discovery_interval_secs.or(file.discovery_interval_secs),
                30.0,
            )?,
            scanner: match a.scanner.clone().or(file.scanner).as_deref() {
                None | Some("simulated") => ScannerKind::Simulated,
                Some("probe") => ScannerKind::Probe,
                Some("file") => ScannerKind::File,
                Some(other) => {
                    return Err(err(
                        "scanner",
                        format!("{other:?}: expected simulated, probe or file"),
                    ));
                }
            },
            log_level: {
                let l = a
                    .log_level
                    .clone()
                    .or(file.log_level)
                    .unwrap_or_else(|| "info".into());
                if l.is_empty()
                    || !l
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_:=,.-".contains(c))
                {
                    return Err(err(
                        "log_level",
                        format!(
                            "{l:?}: expected error, warn, info, debug, trace or a filter like info,pdsno_node=debug"
                        ),
                    ));
                }
                l
            },
            log_json: match a.log_format.clone().or(file.log_format).as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(err(
                        "log_format",
                        format!("{other:?}: expected text or json"),
                    ));
                }
            },
            subnet: a.subnet.clone().or(file.subnet),
            scan_seed: a.scan_seed.or(file.scan_seed),
            scan_file: a.scan_file.clone().or(file.scan_file),
            probe_ports: {
                let ports = a
                    .probe_ports
                    .clone()
                    .or(file.probe_ports)
                    .unwrap_or_else(|| crate::discovery::scanner::DEFAULT_PROBE_PORTS.to_vec());
                if ports.is_empty() || ports.contains(&0) {
                    return Err(err(
                        "probe_ports",
                        "give one or more TCP ports between 1 and 65535",
                    ));
                }
                ports
            },
            probe_timeout: seconds(
                "probe_timeout",
                a.probe_timeout.or(file.probe_timeout),
                crate::discovery::scanner::DEFAULT_PROBE_TIMEOUT.as_secs_f64(),
            )?,
            missed_cycles: a.missed_cycles.or(file.missed_cycles).unwrap_or(3),
            summary_interval: seconds(
                "summary_interval_secs",
                a.summary_interval_secs.or(file.summary_interval_secs),
                30.0,
            )?,
            spike_threshold: a.spike_threshold.or(file.spike_threshold).unwrap_or(100),
            max_devices_per_lc: a
                .max_devices_per_lc
                .or(file.max_devices_per_lc)
                .unwrap_or(65_536),
            device_retention: match a.device_retention.or(file.device_retention) {
                None => crate::node::housekeeping::DEFAULT_DEVICE_RETENTION,
                Some(s) if (1..=MAX_DEVICE_RETENTION_SECS).contains(&s) => {
                    std::time::Duration::from_secs(s)
                }
                Some(_) => {
                    return Err(err(
                        "device_retention",
                        format!(
                            "must be between 1 and {MAX_DEVICE_RETENTION_SECS} seconds (10 years); 604800 is 7 days"
                        ),
                    ));
                }
            },
            scan_once: a.scan_once,
            tls: crate::tls::TlsOptions {
                cert: a.tls_cert.clone().or(file.tls_cert),
                key: a.tls_key.clone().or(file.tls_key),
                ca: a.tls_ca.clone().or(file.tls_ca),
                require_client_cert: a.require_client_cert
                    || file.require_client_cert.unwrap_or(false),
                require_tls: a.require_tls || file.require_tls.unwrap_or(false),
            },
            listen_mqtts: a.listen_mqtts.or(file.listen_mqtts),
            limits: crate::guard::Limits {
                rate_per_sec: a.rate_limit_rps.or(file.rate_limit_rps).unwrap_or(200),
                burst: a.rate_limit_burst.or(file.rate_limit_burst).unwrap_or(400),
                rate_limit_exempt: networks(if a.rate_limit_exempt.is_empty() {
                    file.rate_limit_exempt.unwrap_or_default()
                } else {
                    a.rate_limit_exempt.clone()
                })?,
                lockout_failures: a.lockout_failures.or(file.lockout_failures).unwrap_or(5),
                lockout_window: seconds(
                    "lockout_window_secs",
                    a.lockout_window_secs
                        .or(file.lockout_window_secs)
                        .or_else(|| {
                            deprecated_seconds("PDSNO_LOCKOUT_WINDOW", "PDSNO_LOCKOUT_WINDOW_SECS")
                        }),
                    60.0,
                )?,
                lockout: seconds("lockout_secs", a.lockout_secs.or(file.lockout_secs), 900.0)?,
                max_connections: a.max_connections.or(file.max_connections).unwrap_or(1024),
                max_connections_per_address: a
                    .max_connections_per_address
                    .or(file.max_connections_per_address)
                    .unwrap_or(64),
            },
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        match self.role {
            Role::Global => {
                if self.bootstrap_secret.is_none() {
                    return Err(err(
                        "bootstrap_secret_file",
                        "the global controller needs a bootstrap secret (--bootstrap-secret-file or PDSNO_BOOTSTRAP_SECRET)",
                    ));
                }
            }
            Role::Regional | Role::Local => {
                if let Some(p) = &self.parent
                    && !(p.starts_with("http://") || p.starts_with("https://"))
                {
                    return Err(err(
                        "parent",
                        format!("{p:?} must be an http:// or https:// gRPC URL"),
                    ));
                }
            }
        }
        self.tls.check().map_err(|(key, msg)| err(key, msg))?;
        if self.tls.require_tls {
            let plain = |u: &Option<String>| {
                u.as_deref().is_some_and(|u| {
                    u.split(',')
                        .map(str::trim)
                        .any(|u| u.starts_with("http://") || u.starts_with("mqtt://"))
                })
            };
            for (key, u) in [
                ("parent", &self.parent),
                ("mqtt_url", &self.mqtt_url),
                ("advertise_grpc", &self.advertise_grpc),
                ("advertise_mqtt", &self.advertise_mqtt),
            ] {
                if plain(u) {
                    return Err(err(key, "a plaintext URL is refused under require_tls"));
                }
            }
        }
        if self.limits.max_connections == 0 {
            return Err(err("max_connections", "must be at least 1"));
        }
        if !(1..=1000).contains(&self.missed_cycles) {
            return Err(err("missed_cycles", "must be between 1 and 1000"));
        }
        if let Some(n) = &self.subnet {
            crate::discovery::scanner::Subnet::parse(n)
                .map_err(|e| err("subnet", e.to_string()))?;
        }
        if self.scanner == ScannerKind::File && self.scan_file.is_none() {
            return Err(err("scan_file", "the file scanner needs --scan-file"));
        }
        if self.scan_once && self.role != Role::Local {
            return Err(err("scan_once", "only local controllers scan"));
        }
        if let Some(u) = &self.mqtt_url {
            crate::transport::mqtt::BrokerUrl::parse_list(u).map_err(|e| err("mqtt_url", e))?;
        }
        if let Some(u) = &self.advertise_mqtt {
            crate::transport::mqtt::BrokerUrl::parse_list(u)
                .map_err(|e| err("advertise_mqtt", e))?;
        }
        if let Some(u) = &self.advertise_grpc
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err(
                "advertise_grpc",
                format!("{u:?} must be an http:// or https:// URL"),
            ));
        }
        if self.listen_grpc == self.listen_rest && self.listen_grpc.port() != 0 {
            return Err(err("listen_rest", "must differ from listen_grpc"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: NodeArgs,
    }

    fn args(v: &[&str]) -> NodeArgs {
        T::parse_from(std::iter::once("t").chain(v.iter().copied())).a
    }

    #[test]
    fn a_broker_cluster_is_a_url_list_and_each_member_is_checked() {
        let ok = NodeConfig::resolve(
            Role::Local,
            &args(&[
                "--region",
                "zone-A",
                "--mqtt-url",
                "mqtt://a:1883,mqtt://b:1883",
            ]),
        )
        .expect("a list");
        assert_eq!(ok.mqtt_url.as_deref(), Some("mqtt://a:1883,mqtt://b:1883"));
        let e = NodeConfig::resolve(
            Role::Local,
            &args(&["--region", "zone-A", "--mqtt-url", "mqtt://a,ftp://b"]),
        )
        .expect_err("bad member");
        assert!(e.to_string().contains("mqtt_url"), "{e}");
    }

    fn write_private(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_other_users_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("bootstrap.secret");
        std::fs::write(&secret, "s3cret\n").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let s = secret.display().to_string();
        let e = NodeConfig::resolve(Role::Global, &args(&["--bootstrap-secret-file", &s]))
            .expect_err("group-readable secret");
        assert_eq!(e.key, "bootstrap_secret_file");
        assert!(e.message.contains(&format!("chmod 600 {s}")), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        NodeConfig::resolve(Role::Global, &args(&["--bootstrap-secret-file", &s]))
            .expect("private secret");
    }

    #[test]
    fn operator_accounts_full_and_read_only_from_flags_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = OperatorAccount::with_password("x", "pw")
            .expect("hash")
            .hash()
            .to_owned();
        let secret = dir.path().join("bootstrap.secret");
        write_private(&secret, "s3cret\n");
        let file = dir.path().join("gc.toml");
        std::fs::write(
            &file,
            format!(
                "bootstrap_secret_file = \"{}\"\n[[mqtt_users]]\nname = \"mon\"\npassword_hash = \"{hash}\"\nread_only = true\n\n[[mqtt_users]]\nname = \"admin\"\npassword_hash = \"{hash}\"\n",
                secret.display()
            ),
        )
        .expect("write");
        let cfg = NodeConfig::resolve(
            Role::Global,
            &args(&[
                "--config",
                file.to_str().expect("utf-8"),
                "--user",
                "ops:ops-pw",
                "--reader",
                "watch:watch-pw",
            ]),
        )
        .expect("valid");
        let accounts: Vec<(&str, bool)> = cfg
            .users
            .iter()
            .map(|u| (u.name(), u.is_read_only()))
            .collect();
        assert_eq!(
            accounts,
            [
                ("ops", false),
                ("watch", true),
                ("mon", true),
                ("admin", false)
            ]
        );
        assert!(cfg.users[1].verify(b"watch-pw"));
        assert_eq!((cfg.mqtt_publish_rate, cfg.mqtt_publish_burst), (500, 2000));
        let tuned = NodeConfig::resolve(
            Role::Global,
            &args(&[
                "--config",
                file.to_str().expect("utf-8"),
                "--mqtt-publish-rate",
                "0",
            ]),
        )
        .expect("valid");
        assert_eq!(tuned.mqtt_publish_rate, 0, "0 turns the limit off");
        let e = NodeConfig::resolve(
            Role::Global,
            &args(&[
                "--config",
                file.to_str().expect("utf-8"),
                "--reader",
                "nopassword",
            ]),
        )
        .expect_err("malformed");
        assert!(e.to_string().contains("reader"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("bootstrap.secret");
        write_private(&secret, "s3cret\n");
        let file = dir.path().join("rc.toml");
        std::fs::write(
            &file,
            format!("region = \"zone-A\"\nlisten_grpc = \"127.0.0.1:6000\"\nbootstrap_secret_file = \"{}\"\nquota_per_region = 3\n", secret.display()),
        )
        .expect("write");
        let cfg = NodeConfig::resolve(
            Role::Regional,
            &args(&[
                "--config",
                file.to_str().expect("utf-8"),
                "--listen-grpc",
                "127.0.0.1:6001",
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.listen_grpc.port(), 6001, "flag wins");
        assert_eq!(cfg.quota_per_region, 3, "file value");
        assert_eq!(
            cfg.bootstrap_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            cfg.parent, None,
            "decided at start: stored URL or tier default"
        );
        assert_eq!(default_parent(Role::Regional), "http://127.0.0.1:50051");
        assert_eq!(default_parent(Role::Local), "http://127.0.0.1:50052");
        assert!(!format!("{cfg:?}").contains("s3cret"));

        std::fs::write(&file, "region = \"zone-A\"\nregoin = \"typo\"\n").expect("write");
        let e = NodeConfig::resolve(
            Role::Regional,
            &args(&["--config", file.to_str().expect("utf-8")]),
        )
        .expect_err("error");
        assert!(
            e.to_string().contains("regoin") && e.to_string().contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn checks_name_the_key() {
        let e =
            NodeConfig::resolve(Role::Regional, &args(&["--region", "zone/A"])).expect_err("error");
        assert_eq!(e.key, "region");
        // A restored controller takes its region from its NIB; admission asks for one.
        let cfg = NodeConfig::resolve(Role::Local, &args(&[])).expect("valid");
        assert_eq!(cfg.region, None);
        let e = NodeConfig::resolve(
            Role::Local,
            &args(&["--region", "zone-A", "--parent", "127.0.0.1:1"]),
        )
        .expect_err("error");
        assert_eq!(e.key, "parent");
    }
}
