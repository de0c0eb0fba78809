//! Operator commands against a running node (`pdsno keys rotate`, `pdsno controller
//! revoke`, status), over the node's gRPC port.
//!
//! Requests are authenticated with the node's admin key, a 32-byte secret created at first
//! start in `DATA_DIR/admin.key` (mode 0600): whoever may read the data directory may
//! command the node. Each request carries a nonce and a time and is HMAC-signed; stale
//! and replayed requests are refused. The node writes `DATA_DIR/node.json` with its id
//! and addresses so tools find it without being told.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::grpc::pb;
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::HmacKey;
use pdsno_shared::replay::{NonceStore, Recorded};
use pdsno_shared::signing::{hmac_hex, hmac_verify_hex};
use pdsno_shared::time::{format_iso, parse_iso};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::node::children::Children;
use crate::node::workers::HeartbeatStats;
use crate::trust::Trust;

/// File name of the admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// File name of the node description.
pub const NODE_FILE: &str = "node.json";

/// Loads `DIR/admin.key`, creating it (mode 0600) if absent.
///
/// # Errors
/// A message for I/O failures or a malformed file.
pub fn load_or_create_key(dir: &Path) -> Result<HmacKey, String> {
    let path = dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => HmacKey::from_hex(t.trim()).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = HmacKey::random();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            use std::io::Write as _;
            let mut f = opts
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let text = Zeroizing::new(hex::encode(key.expose_bytes()));
            f.write_all(text.as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reads `DIR/admin.key` (for tools).
///
/// # Errors
/// A message when the file is missing or malformed.
pub fn read_key(dir: &Path) -> Result<HmacKey, String> {
    read_key_file(&dir.join(ADMIN_KEY_FILE))
}

/// Reads an admin key file (hex).
///
/// # Errors
/// A message naming the file.
pub fn read_key_file(path: &Path) -> Result<HmacKey, String> {
    let path = path.to_path_buf();
    let t = Zeroizing::new(
        std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e} (is this a node's data directory?)", path.display()))?,
    );
    HmacKey::from_hex(t.trim()).map_err(|e| format!("{}: {e}", path.display()))
}

fn signing_bytes(
    node_id: &str,
    command: &str,
    args: &Value,
    nonce: &str,
    signed_at: &str,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("args".into(), args.clone());
    m.insert("command".into(), command.into());
    m.insert("node_id".into(), node_id.into());
    m.insert("nonce".into(), nonce.into());
    m.insert("signed_at".into(), signed_at.into());
    json::to_canonical_bytes(&Value::Object(m))
}

/// Builds a signed request for node `node_id`.
pub fn request(key: &HmacKey, node_id: &str, command: &str, args: &Value) -> pb::AdminRequest {
    let nonce = pdsno_shared::ids::nonce_hex();
    let signed_at = format_iso(chrono::Utc::now());
    let signature = hmac_hex(
        key.expose_bytes(),
        &signing_bytes(node_id, command, args, &nonce, &signed_at),
    );
    pb::AdminRequest {
        command: command.into(),
        args_json: json::to_canonical_string(args),
        nonce,
        signed_at,
        signature,
        node_id: node_id.into(),
    }
}

/// The running parts of a node that operators can look at (and, for policy, change).
#[derive(Clone)]
pub struct RuntimeView {
    /// The receive path (accepted/refused counts).
    pub inbound: Arc<crate::inbound::Inbound>,
    /// The send side (paths taken, broker connection).
    pub outbound: Arc<crate::outbound::Outbound>,
    /// Policy state.
    pub policy: Arc<crate::policy::Policy>,
    /// The outbox's delivery.
    pub delivery: Arc<crate::discovery::delivery::Delivery>,
}

/// The node's side of the admin API.
pub struct Admin {
    key: HmacKey,
    trust: Arc<Trust>,
    /// Admin nonces, in the NIB's replay store: a request stays spent across restarts.
    nonces: crate::nib::SqliteNonceStore,
    children: Option<Arc<Children>>,
    heartbeat: Option<Arc<HeartbeatStats>>,
    rotate_wake: Arc<Notify>,
    rotate_done: Arc<Notify>,
    runtime: Option<RuntimeView>,
    guard: Option<Arc<crate::guard::Guard>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("node", &self.trust.me)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The admin API of a node.
    ///
    /// # Errors
    /// When the NIB's replay store cannot be read.
    pub fn new(
        key: HmacKey,
        trust: Arc<Trust>,
        children: Option<Arc<Children>>,
        heartbeat: Option<Arc<HeartbeatStats>>,
        rotate_wake: Arc<Notify>,
        rotate_done: Arc<Notify>,
    ) -> Result<Self, String> {
        let nonces =
            crate::nib::SqliteNonceStore::new(trust.nib.clone()).map_err(|e| e.to_string())?;
        Ok(Admin {
            key,
            trust,
            nonces,
            children,
            heartbeat,
            rotate_wake,
            rotate_done,
            runtime: None,
            guard: None,
        })
    }

    /// Applies the node's per-address request rate limit to admin requests too.
    pub fn with_guard(mut self, guard: Arc<crate::guard::Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Adds the running parts operators can look at.
    pub fn with_runtime(mut self, runtime: RuntimeView) -> Self {
        self.runtime = Some(runtime);
        self
    }

    fn authenticate(&self, r: &pb::AdminRequest) -> Result<Value, Status> {
        let args = json::parse(r.args_json.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("args_json: {e}")))?;
        if !hmac_verify_hex(
            self.key.expose_bytes(),
            &signing_bytes(&r.node_id, &r.command, &args, &r.nonce, &r.signed_at),
            &r.signature,
        ) {
            return Err(Status::unauthenticated(
                "admin signature does not verify (wrong admin key?)",
            ));
        }
        if r.node_id != self.trust.me {
            return Err(Status::unauthenticated(format!(
                "admin request is for {:?}, this is {}",
                r.node_id.chars().take(128).collect::<String>(),
                self.trust.me
            )));
        }
        let now = chrono::Utc::now();
        let at = parse_iso(&r.signed_at).map_err(|_| Status::unauthenticated("bad signed_at"))?;
        if (now - at).abs() > chrono::Duration::seconds(300) {
            return Err(Status::unauthenticated(
                "admin request too old or future-dated",
            ));
        }
        if r.nonce.is_empty() || r.nonce.len() > 128 {
            return Err(Status::unauthenticated("bad nonce"));
        }
        // Its own namespace in the store shared with envelope nonces.
        match self.nonces.record(
            &format!("admin:{}", r.nonce),
            at + chrono::Duration::seconds(300),
            now,
            100_000,
        ) {
            Ok(Recorded::Fresh) => Ok(args),
            Ok(Recorded::AlreadySeen) => Err(Status::unauthenticated("admin request replayed")),
            _ => Err(Status::unavailable("admin replay cache full")),
        }
    }

    async fn run(&self, command: &str, args: Value) -> Result<Value, Status> {
        let arg = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
        // `status` and `keys.list` run with the authentication, on the blocking pool
        // (`AdminApi::command`).
        match command {
            "keys.rotate" => {
                let peer =
                    arg("peer").ok_or_else(|| Status::invalid_argument("peer is required"))?;
                if self.trust.identity_of(&peer).is_none() {
                    return Err(Status::not_found(format!(
                        "{peer} is not a peer of this node"
                    )));
                }
                let (p, now) = (peer.clone(), chrono::Utc::now());
                self.trust
                    .nib
                    .off_executor(move |nib| nib.request_rotation(&p, now))
                    .await
                    .ok_or_else(|| Status::unavailable("shutting down"))?
                    .map_err(|e| Status::internal(e.to_string()))?;
                let wait = args.get("wait_secs").and_then(Value::as_u64).unwrap_or(0);
                let before = self.trust.pair_keys.generation(&peer);
                self.rotate_wake.notify_one();
                if wait > 0 {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(300));
                    while self
                        .trust
                        .nib
                        .off_executor(|nib| nib.rotation_requests())
                        .await
                        .ok_or_else(|| Status::unavailable("shutting down"))?
                        .map_err(|e| Status::internal(e.to_string()))?
                        .contains(&peer)
                    {
                        if tokio::time::timeout_at(deadline, self.rotate_done.notified())
                            .await
                            .is_err()
                        {
                            return Err(Status::deadline_exceeded(format!(
                                "rotation with {peer} not done yet; it stays requested and will be retried"
                            )));
                        }
                    }
                }
                let mut m = Map::new();
                m.insert("peer".into(), peer.clone().into());
                m.insert("generation_before".into(), before.into());
                m.insert(
                    "generation".into(),
                    self.trust.pair_keys.generation(&peer).into(),
                );
                m.insert(
                    "signing_key".into(),
                    self.trust.pair_keys.signing_key(&peer).map(|k| k.0).into(),
                );
                Ok(Value::Object(m))
            }
            "controller.revoke" => {
                let id = arg("id").ok_or_else(|| Status::invalid_argument("id is required"))?;
                let children = self.children.as_ref().ok_or_else(|| {
                    Status::failed_precondition("this node admits no controllers")
                })?;
                children
                    .revoke(&id)
                    .await
                    .map_err(Status::failed_precondition)
            }
            "policy.set" => {
                let rt = self
                    .runtime
                    .as_ref()
                    .ok_or_else(|| Status::unavailable("not running"))?;
                let content = args
                    .get("content")
                    .and_then(Value::as_object)
                    .cloned()
                    .ok_or_else(|| {
                        Status::invalid_argument("content (a JSON object) is required")
                    })?;
                let pol = rt.policy.clone();
                let env = tokio::task::spawn_blocking(move || pol.set(content))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                let version = rt.policy.version();
                crate::report::emit(&crate::report::Report::Policy {
                    version,
                    event: crate::report::PolicyEvent::Published,
                    region: None,
                });
                tracing::info!(version, "policy published");
                let d = match rt.policy.topic() {
                    Some(topic) => {
                        crate::policy::distribute(&self.trust, &rt.outbound, &env, &topic).await
                    }
                    None => crate::policy::Distribution::default(),
                };
                let mut m = Map::new();
                m.insert("policy_version".into(), version.into());
                m.insert("published".into(), d.published.into());
                m.insert("pushed".into(), (d.pushed as u64).into());
                m.insert("unreachable".into(), (d.unreachable as u64).into());
                Ok(Value::Object(m))
            }
            "policy.show" => {
                let rt = self
                    .runtime
                    .as_ref()
                    .ok_or_else(|| Status::unavailable("not running"))?;
                let pol = rt.policy.clone();
                let env = tokio::task::spawn_blocking(move || pol.in_force())
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok(Value::Object(crate::policy::show(
                    rt.policy.version(),
                    env.as_ref(),
                )))
            }
            "lockout.list" => {
                let g = self
                    .guard
                    .as_ref()
                    .ok_or_else(|| Status::unavailable("no admission guard on this node"))?;
                let rows: Vec<Value> = g
                    .lockouts()
                    .into_iter()
                    .map(|(ip, left)| {
                        let mut m = Map::new();
                        m.insert("source".into(), ip.to_string().into());
                        m.insert("seconds_left".into(), left.into());
                        Value::Object(m)
                    })
                    .collect();
                Ok(Value::Array(rows))
            }
            "lockout.clear" => {
                let g = self
                    .guard
                    .clone()
                    .ok_or_else(|| Status::unavailable("no admission guard on this node"))?;
                let ip: std::net::IpAddr = arg("source")
                    .ok_or_else(|| Status::invalid_argument("source is required"))?
                    .parse()
                    .map_err(|_| Status::invalid_argument("source is not an IP address"))?;
                let was = tokio::task::spawn_blocking(move || g.clear_lockout(ip))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                let mut m = Map::new();
                m.insert("source".into(), ip.to_string().into());
                m.insert("was_locked_out".into(), was.into());
                Ok(Value::Object(m))
            }
            "inventory" => {
                let t = self.trust.clone();
                let rows = tokio::task::spawn_blocking(move || {
                    if t.role == pdsno_shared::ids::Role::Global {
                        t.nib.inventory().map(|rows| {
                            rows.into_iter()
                                .map(|r| {
                                    let mut m = Map::new();
                                    m.insert("mac".into(), r.mac.into());
                                    m.insert("region".into(), r.region.into());
                                    m.insert("rc_id".into(), r.rc_id.into());
                                    m.insert("lc_id".into(), r.lc_id.into());
                                    m.insert("ip".into(), r.ip.into());
                                    m.insert("hostname".into(), r.hostname.into());
                                    m.insert("status".into(), r.status.into());
                                    m.insert("last_seen".into(), r.last_seen.into());
                                    Value::Object(m)
                                })
                                .collect::<Vec<_>>()
                        })
                    } else {
                        t.nib.devices(None).map(|rows| {
                            rows.into_iter()
                                .map(|r| {
                                    let mut m = Map::new();
                                    m.insert("mac".into(), r.device.mac.into());
                                    m.insert("region".into(), r.region.into());
                                    m.insert("lc_id".into(), r.lc_id.into());
                                    m.insert("ip".into(), r.device.ip.into());
                                    m.insert("hostname".into(), r.device.hostname.into());
                                    m.insert("status".into(), r.status.as_str().into());
                                    m.insert("last_seen".into(), r.device.last_seen.into());
                                    Value::Object(m)
                                })
                                .collect::<Vec<_>>()
                        })
                    }
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
                Ok(Value::Array(rows))
            }
            other => Err(Status::invalid_argument(format!(
                "unknown command {other:?}"
            ))),
        }
    }

    fn status(&self) -> Value {
        let t = &self.trust;
        let mut m = Map::new();
        m.insert("controller_id".into(), t.me.clone().into());
        m.insert("role".into(), t.role.as_str().into());
        m.insert("region".into(), t.region.clone().into());
        m.insert(
            "parent".into(),
            t.parent.as_ref().map(|p| p.0.clone()).into(),
        );
        m.insert("keys".into(), keys_value(&t.pair_keys.list()));
        m.insert(
            "mqtt_credential".into(),
            t.nib
                .state_str(crate::nib::StateKey::MqttCredential)
                .ok()
                .flatten()
                .is_some()
                .into(),
        );
        if let Some(h) = &self.heartbeat {
            use std::sync::atomic::Ordering::Relaxed;
            let mut hb = Map::new();
            hb.insert("sent".into(), h.sent.load(Relaxed).into());
            hb.insert("acked".into(), h.acked.load(Relaxed).into());
            hb.insert("failed".into(), h.failed.load(Relaxed).into());
            hb.insert("rekeys".into(), h.rekeys.load(Relaxed).into());
            hb.insert("parent_heard".into(), h.parent_heard.load(Relaxed).into());
            let last = h.parent_last_ms.load(Relaxed);
            hb.insert(
                "parent_last_heard".into(),
                chrono::DateTime::from_timestamp_millis(last)
                    .filter(|_| last > 0)
                    .map(format_iso)
                    .into(),
            );
            m.insert("heartbeats".into(), Value::Object(hb));
        }
        if let Some(c) = &self.children {
            m.insert("children".into(), c.status());
        }
        if let Some(rt) = &self.runtime {
            use std::sync::atomic::Ordering::Relaxed;
            m.insert("policy_version".into(), rt.policy.version().into());
            m.insert("received".into(), rt.inbound.stats.to_value());
            let mut tr = Map::new();
            tr.insert("sent".into(), rt.outbound.stats.to_value());
            tr.insert("mqtt_connected".into(), rt.outbound.mqtt_connected().into());
            if let Some(c) = rt.outbound.mqtt() {
                let st = c.stats();
                let mut mq = Map::new();
                mq.insert("connects".into(), st.connects.into());
                mq.insert("published".into(), st.published.into());
                mq.insert("received".into(), st.received.into());
                mq.insert("resent".into(), st.resent.into());
                mq.insert("outbox_overflow".into(), st.outbox_overflow.into());
                tr.insert("mqtt".into(), Value::Object(mq));
            }
            m.insert("transport".into(), Value::Object(tr));
            let mut d = Map::new();
            d.insert(
                "outbox".into(),
                t.nib.outbox_len().unwrap_or_default().into(),
            );
            d.insert(
                "delivered".into(),
                rt.delivery.delivered.load(Relaxed).into(),
            );
            d.insert("resent".into(), rt.delivery.resent.load(Relaxed).into());
            d.insert(
                "cycle".into(),
                t.nib
                    .state(crate::nib::StateKey::DiscoveryCycle)
                    .ok()
                    .flatten()
                    .unwrap_or(Value::Null),
            );
            let by_lc = t.nib.active_devices_by_lc().unwrap_or_default();
            d.insert("active_devices".into(), by_lc.values().sum::<u64>().into());
            if t.role == pdsno_shared::ids::Role::Global {
                let inv = t.nib.inventory().unwrap_or_default();
                let mut per = std::collections::BTreeMap::<String, u64>::new();
                for r in inv.iter().filter(|r| r.status == "active") {
                    *per.entry(r.region.clone()).or_default() += 1;
                }
                let mut pm = Map::new();
                for (k, v) in per {
                    pm.insert(k, v.into());
                }
                d.insert("inventory_by_region".into(), Value::Object(pm));
            }
            m.insert("discovery".into(), Value::Object(d));
            let mut p = Map::new();
            p.insert(
                "ignored_stale".into(),
                rt.policy.ignored_stale.load(Relaxed).into(),
            );
            p.insert("refused".into(), rt.policy.refused.load(Relaxed).into());
            m.insert("policy".into(), Value::Object(p));
        }
        Value::Object(m)
    }
}

fn keys_value(keys: &[crate::keys::KeyInfo]) -> Value {
    let now = chrono::Utc::now();
    Value::Array(
        keys.iter()
            .map(|k| {
                let mut m = Map::new();
                m.insert("key_id".into(), k.key_id.clone().into());
                m.insert("peer".into(), k.peer_id.clone().into());
                m.insert("state".into(), k.state.into());
                m.insert("created_at".into(), format_iso(k.created_at).into());
                m.insert("age_secs".into(), (now - k.created_at).num_seconds().into());
                m.insert("retires_at".into(), k.retires_at.map(format_iso).into());
                Value::Object(m)
            })
            .collect(),
    )
}

/// The gRPC face of [`Admin`].
#[derive(Clone)]
pub struct AdminApi(pub Arc<Admin>);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn command(
        &self,
        req: Request<pb::AdminRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let addr = req
            .extensions()
            .get::<crate::transport::listen::GrpcConnectInfo>()
            .and_then(|c| c.tcp.remote_addr)
            .or_else(|| req.remote_addr());
        if let (Some(g), Some(addr)) = (&self.0.guard, addr) {
            g.check_rate(addr.ip(), "grpc")
                .map_err(|r| crate::transport::grpc::refusal_status(&r))?;
        }
        let r = req.into_inner();
        // The replay record and the read-only commands use SQLite: off the executor.
        let (admin, req) = (self.0.clone(), r.clone());
        let (args, early) = tokio::task::spawn_blocking(move || {
            let args = admin.authenticate(&req)?;
            tracing::info!(command = %req.command, "admin command");
            let early = match req.command.as_str() {
                "status" => Some(Ok(admin.status())),
                "keys.list" => Some(
                    crate::keys::describe(&admin.trust.nib)
                        .map(|k| keys_value(&k))
                        .map_err(|e| Status::internal(e.to_string())),
                ),
                _ => None,
            };
            Ok::<_, Status>((args, early))
        })
        .await
        .map_err(|_| Status::internal("admin command failed"))??;
        let result = match early {
            Some(r) => r?,
            None => self.0.run(&r.command, args).await?,
        };
        Ok(Response::new(pb::AdminResponse {
            result_json: json::to_canonical_string(&result),
        }))
    }

    async fn identify(
        &self,
        _req: Request<pb::AdminIdentifyRequest>,
    ) -> Result<Response<pb::AdminIdentity>, Status> {
        Ok(Response::new(pb::AdminIdentity {
            node_id: self.0.trust.me.clone(),
        }))
    }
}

/// Writes `DIR/node.json`: the node's id, role, addresses and, when it serves TLS, the
/// paths (never the contents) of its TLS files, so operator tools run with `--data-dir`
/// reach it over TLS with the node's own certificate.
///
/// # Errors
/// A message on I/O failure.
pub fn write_node_file(
    dir: &Path,
    id: &str,
    role: &str,
    grpc: &str,
    rest: &str,
    admin: Option<&str>,
    tls: &crate::tls::TlsOptions,
) -> Result<(), String> {
    let mut m = Map::new();
    m.insert("controller_id".into(), id.into());
    m.insert("role".into(), role.into());
    m.insert("grpc".into(), grpc.into());
    m.insert("rest".into(), rest.into());
    if let Some(a) = admin {
        m.insert("admin".into(), a.into());
    }
    m.insert("pid".into(), u64::from(std::process::id()).into());
    if tls.cert.is_some() || tls.ca.is_some() {
        let path = |p: &Option<PathBuf>| -> Value {
            p.as_ref()
                .map(|p| {
                    std::fs::canonicalize(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                })
                .into()
        };
        let mut t = Map::new();
        t.insert("ca".into(), path(&tls.ca));
        t.insert("cert".into(), path(&tls.cert));
        t.insert("key".into(), path(&tls.key));
        t.insert("require_client_cert".into(), tls.require_client_cert.into());
        t.insert("require_tls".into(), tls.require_tls.into());
        m.insert("tls".into(), Value::Object(t));
    }
    let path = dir.join(NODE_FILE);
    std::fs::write(&path, json::to_pretty_string(&Value::Object(m)) + "\n")
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read_node_file(dir: &Path) -> Result<Value, String> {
    let path: PathBuf = dir.join(NODE_FILE);
    let t = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (is the node running? else pass --connect)",
            path.display()
        )
    })?;
    json::parse(&t).map_err(|e| format!("{}: {e}", path.display()))
}

/// The URL of the admin service of the node whose data directory is `dir` (from its
/// `node.json`): its `--listen-admin` listener, else its gRPC listener.
///
/// # Errors
/// A message when the file is missing or malformed.
pub fn node_url(dir: &Path) -> Result<String, String> {
    let v = read_node_file(dir)?;
    if crate::data_dir::in_use(dir) == Some(false) {
        return Err(format!(
            "no node is running on {} (its node.json{} is from a run that ended): start it, or give --connect URL",
            dir.display(),
            v.get("pid")
                .and_then(Value::as_u64)
                .map(|p| format!(", pid {p},"))
                .unwrap_or_default()
        ));
    }
    v.get("admin")
        .or_else(|| v.get("grpc"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: no grpc address", dir.join(NODE_FILE).display()))
}

/// The TLS files a tool uses to reach a node: the CA that signed the node's certificate
/// and a client certificate with its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// True when no file is named.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// `self`, with what it lacks taken from `fallback`: the CA on its own, the
    /// certificate and key only as a pair.
    #[must_use]
    pub fn or(self, fallback: ClientTlsFiles) -> ClientTlsFiles {
        let (cert, key) = if self.cert.is_some() || self.key.is_some() {
            (self.cert, self.key)
        } else {
            (fallback.cert, fallback.key)
        };
        ClientTlsFiles {
            ca: self.ca.or(fallback.ca),
            cert,
            key,
        }
    }

    /// Loads the files; `None` when none is named.
    ///
    /// # Errors
    /// A message naming the flag and the file.
    pub fn load(&self) -> Result<Option<Arc<crate::tls::TlsMaterial>>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
            _ => {}
        }
        crate::tls::TlsMaterial::load(&crate::tls::TlsOptions {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            require_client_cert: false,
            require_tls: false,
        })
        .map_err(|e| e.to_string().replace("tls_", "--tls-"))
    }
}

/// The TLS files recorded in `DIR/node.json` by the running node (empty when it serves
/// plaintext or the file predates TLS recording).
///
/// # Errors
/// A message when the file is missing or malformed.
pub fn node_tls_files(dir: &Path) -> Result<ClientTlsFiles, String> {
    let v = read_node_file(dir)?;
    let Some(t) = v.get("tls") else {
        return Ok(ClientTlsFiles::default());
    };
    let path = |k: &str| t.get(k).and_then(Value::as_str).map(PathBuf::from);
    Ok(ClientTlsFiles {
        ca: path("ca"),
        cert: path("cert"),
        key: path("key"),
    })
}

/// Sends an admin command to a node over plaintext gRPC (or TLS with the system roots for
/// an `https://` URL).
///
/// # Errors
/// A message for the operator.
pub async fn call(
    url: &str,
    key: &HmacKey,
    command: &str,
    args: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    call_with(url, key, None, command, args, timeout).await
}

/// What to add to a connection failure so the operator knows which flag is missing.
fn tls_hint(url: &str, tls: Option<&crate::tls::TlsMaterial>) -> String {
    if !url.starts_with("https://") {
        return " (if the node serves TLS, connect to its https:// URL with --tls-ca FILE, \
                 and --tls-cert FILE --tls-key FILE when it requires client certificates; \
                 or give the node's --data-dir)"
            .into();
    }
    let mut missing = Vec::new();
    if tls.is_none_or(|m| m.options().ca.is_none()) {
        missing.push("--tls-ca FILE (the CA that signed the node's certificate)");
    }
    if !tls.is_some_and(|m| m.has_identity()) {
        missing.push("--tls-cert FILE --tls-key FILE (a client certificate the node accepts)");
    }
    if missing.is_empty() {
        return " (check that the node's --tls-ca signed the certificate given with --tls-cert)"
            .into();
    }
    format!(
        " (give {}, or set PDSNO_TLS_CA / PDSNO_TLS_CERT / PDSNO_TLS_KEY, or give the node's --data-dir)",
        missing.join(" and ")
    )
}

/// The reason of a transport error: the TLS alert or certificate problem when there is one.
fn transport_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    if let Some(r) = crate::tls::handshake_reason(e) {
        parts.retain(|p| !p.contains(&r));
        parts.push(format!("TLS: {r}"));
    }
    parts.join(": ")
}

/// Sends an admin command to a node, over TLS with `tls` (CA and client certificate) for
/// an `https://` URL.
///
/// # Errors
/// A message for the operator; a connection or handshake failure names the TLS flags that
/// would fix it.
pub async fn call_with(
    url: &str,
    key: &HmacKey,
    tls: Option<&crate::tls::TlsMaterial>,
    command: &str,
    args: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|_| format!("invalid URL {url:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout);
    if url.starts_with("https://") {
        let cfg = match tls {
            Some(m) => m.tonic_client().map_err(|e| e.to_string())?,
            None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
        };
        ep = ep
            .tls_config(cfg)
            .map_err(|e| format!("TLS for {url}: {e}"))?;
    }
    let ch = ep.connect().await.map_err(|e| {
        format!(
            "cannot reach {url}: {}{}",
            transport_reason(&e),
            tls_hint(url, tls)
        )
    })?;
    let mut c = pb::admin_client::AdminClient::new(ch);
    let explain = |s: tonic::Status| {
        // A status the node sent is its answer; one made from a broken connection is not.
        use std::error::Error as _;
        // The node's answers carry its response headers; a status tonic made up on our
        // side (reset stream, refused handshake, cancelled call) has none.
        let transport = s.metadata().is_empty() && s.code() != tonic::Code::DeadlineExceeded;
        if transport {
            let detail = s
                .source()
                .map(|e| format!(": {}", transport_reason(e)))
                .unwrap_or_default();
            format!(
                "cannot reach {url}: {}{detail}{}",
                s.message(),
                tls_hint(url, tls)
            )
        } else {
            format!("{}: {}", code_name(s.code()), s.message())
        }
    };
    // Requests name the node they are for, so a captured one is refused elsewhere.
    let node_id = c
        .identify(pb::AdminIdentifyRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .node_id;
    let r = c
        .command(request(key, &node_id, command, args))
        .await
        .map_err(explain)?;
    json::parse(r.into_inner().result_json.as_bytes()).map_err(|e| e.to_string())
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::DeadlineExceeded => "timed out",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "refused",
        tonic::Code::Unimplemented => "unimplemented (no admin service here; see --listen-admin)",
        _ => "error",
    }
}
