//! `pdsno status` and `pdsno policy`: operator views of a running node, over its admin API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pdsno_shared::json::{self, Map, Value};

use super::output::{fail, print_json};
use crate::admin;

/// How to reach a node's admin API.
///
/// Over TLS, the CA and client certificate come from `--tls-ca`, `--tls-cert`, `--tls-key`
/// (or `PDSNO_TLS_CA`, `PDSNO_TLS_CERT`, `PDSNO_TLS_KEY`), else from the paths the node
/// recorded in `DATA_DIR/node.json` (its own CA, certificate and key).
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// The node's gRPC URL, `https://` when it serves TLS (default: from DATA_DIR/node.json).
    #[arg(long, value_name = "URL")]
    pub connect: Option<String>,
    /// The node's data directory (its admin.key authenticates us; its node.json says where
    /// the node is and which TLS files it uses).
    #[arg(long, env = "PDSNO_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node's admin key file, when the data directory is elsewhere.
    #[arg(long, env = "PDSNO_ADMIN_KEY_FILE", value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that signed the node's TLS certificate.
    #[arg(long, env = "PDSNO_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a node that requires one (mutual TLS).
    #[arg(
        long,
        env = "PDSNO_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "PDSNO_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Print JSON instead of text (errors too: `{"error": "..."}` on stdout).
    #[arg(long)]
    pub json: bool,
}

impl AdminTarget {
    /// The TLS files to use: the flags, then what the node recorded in its data directory.
    fn tls_files(&self) -> Result<admin::ClientTlsFiles, String> {
        let given = admin::ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        match &self.data_dir {
            Some(d) if d.join(admin::NODE_FILE).exists() => Ok(given.or(admin::node_tls_files(d)?)),
            _ => Ok(given),
        }
    }

    /// Sends `command` to the node.
    ///
    /// # Errors
    /// A message for the operator.
    pub fn call(&self, command: &str, args: Value, timeout: Duration) -> Result<Value, String> {
        let key = match (&self.admin_key_file, &self.data_dir) {
            (Some(f), _) => admin::read_key_file(f)?,
            (None, Some(d)) => admin::read_key(d)?,
            (None, None) => {
                return Err(
                    "the node's admin key is needed: give --data-dir DIR or --admin-key-file FILE"
                        .into(),
                );
            }
        };
        let url = match (&self.connect, &self.data_dir) {
            (Some(u), _) => u.clone(),
            (None, Some(d)) => admin::node_url(d)?,
            (None, None) => return Err("give --connect URL or --data-dir DIR".into()),
        };
        let tls = self.tls_files()?.load()?;
        crate::runtime::block_on(admin::call_with(
            &url,
            &key,
            tls.as_deref(),
            command,
            &args,
            timeout,
        ))
    }
}

/// `pdsno status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node to ask (a GC shows the whole tree).
    #[command(flatten)]
    pub target: AdminTarget,
    /// For monitoring: exit 1 when any controller below the node is offline or stale
    /// (revoked ones do not count), naming them on stderr.
    #[arg(long)]
    pub check: bool,
}

/// Sorts controller ids by role, region and sequence number (`..._2` before `..._10`).
fn id_order(id: &str) -> (String, u64, String) {
    match pdsno_shared::ids::ControllerId::parse(id) {
        Some(c) => (
            format!("{}/{}", c.role.as_str(), c.region.unwrap_or_default()),
            c.seq,
            String::new(),
        ),
        None => (String::new(), 0, id.to_owned()),
    }
}

fn sorted_by_id(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_cached_key(|c| {
        id_order(c.get("controller_id").and_then(Value::as_str).unwrap_or(""))
    });
    v
}

/// The status with its tree in shape: each controller listed once, under the controller
/// that validated it (a GC knows its RCs' local controllers too, but they are shown under
/// their RC, not as its own children), in numeric id order.
pub fn normalized(st: &Value) -> Value {
    let mut st = st.clone();
    let me = s(&st, "controller_id");
    if let Some(Value::Array(children)) = st.get("children").cloned() {
        let direct: Vec<Value> = children
            .into_iter()
            .filter(|c| c.get("validated_by").and_then(Value::as_str) == Some(me.as_str()))
            .map(|mut c| {
                if let Some(Value::Array(g)) = c.get("children").cloned()
                    && let Value::Object(m) = &mut c
                {
                    m.insert("children".into(), Value::Array(sorted_by_id(g)));
                }
                c
            })
            .collect();
        if let Value::Object(m) = &mut st {
            m.insert("children".into(), Value::Array(sorted_by_id(direct)));
        }
    }
    st
}

/// Controllers below the node that are offline or stale (revoked ones are not).
fn unhealthy(st: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut walk = |c: &Value| {
        let l = c.get("liveness").and_then(Value::as_str).unwrap_or("");
        if matches!(l, "offline" | "stale") {
            out.push(format!("{} {l}", s(c, "controller_id")));
        }
    };
    for c in st
        .get("children")
        .and_then(Value::as_array)
        .unwrap_or_default()
    {
        walk(c);
        for g in c
            .get("children")
            .and_then(Value::as_array)
            .unwrap_or_default()
        {
            walk(g);
        }
    }
    out
}

/// `pdsno policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Publish FILE (a JSON object) as the next policy version (global controller).
    Set {
        /// The policy document.
        file: PathBuf,
        /// The global controller.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Show the policy in force on a node.
    Show {
        /// The node.
        #[command(flatten)]
        target: AdminTarget,
    },
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => json::to_canonical_string(other),
    }
}

fn age(v: &Value) -> String {
    v.get("last_heartbeat_age_ms")
        .and_then(Value::as_i64)
        .map_or("never".into(), |ms| {
            format!("{:.1}s ago", ms as f64 / 1000.0)
        })
}

/// One line per controller: liveness, policy version, devices.
fn line(v: &Value) -> String {
    let via = match v.get("via").and_then(Value::as_str) {
        Some(p) => format!(" via {p}"),
        None => String::new(),
    };
    format!(
        "{}  {} ({}{via})  policy v{}  devices {}",
        s(v, "controller_id"),
        s(v, "liveness"),
        age(v),
        s(v, "policy_version"),
        s(v, "devices"),
    )
}

/// Renders a node's status as a tree.
pub fn render_tree(st: &Value) -> String {
    let st = &normalized(st);
    let mut out = String::new();
    let me = s(st, "controller_id");
    let mut head = format!(
        "{me}  [{}]  policy v{}",
        s(st, "role"),
        s(st, "policy_version")
    );
    if let Some(tr) = st.get("transport") {
        let c = tr.get("mqtt_connected").and_then(Value::as_bool) == Some(true);
        head.push_str(if c { "  mqtt connected" } else { "  mqtt down" });
    }
    if let Some(inv) = st
        .get("discovery")
        .and_then(|d| d.get("inventory_by_region"))
        .and_then(Value::as_object)
    {
        let parts: Vec<String> = inv
            .iter()
            .map(|(k, v)| format!("{k}={}", json::to_canonical_string(v)))
            .collect();
        if parts.is_empty() {
            head.push_str("  inventory pending (no summary yet)");
        } else {
            head.push_str(&format!("  inventory {}", parts.join(" ")));
        }
    } else if let Some(n) = st.get("discovery").and_then(|d| d.get("active_devices")) {
        head.push_str(&format!("  devices {}", json::to_canonical_string(n)));
    }
    out.push_str(&head);
    out.push('\n');
    let children: Vec<&Value> = st
        .get("children")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter(|c| c.get("validated_by").and_then(Value::as_str) == Some(me.as_str()))
        .collect();
    for (i, c) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        out.push_str(if last { "└─ " } else { "├─ " });
        out.push_str(&line(c));
        out.push('\n');
        let grand = c
            .get("children")
            .and_then(Value::as_array)
            .unwrap_or_default();
        for (j, g) in grand.iter().enumerate() {
            out.push_str(if last { "   " } else { "│  " });
            out.push_str(if j + 1 == grand.len() {
                "└─ "
            } else {
                "├─ "
            });
            out.push_str(&line(g));
            out.push('\n');
        }
    }
    if let Some(r) = st
        .get("received")
        .and_then(|r| r.get("rejected"))
        .and_then(Value::as_object)
        && !r.is_empty()
    {
        let parts: Vec<String> = r
            .iter()
            .map(|(k, v)| format!("{k}={}", json::to_canonical_string(v)))
            .collect();
        out.push_str(&format!("rejected: {}\n", parts.join(" ")));
    }
    out
}

/// Runs `pdsno status`.
pub fn status(a: &StatusArgs) -> ExitCode {
    match a
        .target
        .call("status", Value::Object(Map::new()), Duration::from_secs(10))
    {
        Ok(v) => {
            let v = normalized(&v);
            if a.target.json {
                print_json(&v);
            } else {
                print!("{}", render_tree(&v));
            }
            let bad = unhealthy(&v);
            if a.check && !bad.is_empty() {
                eprintln!("not healthy: {}", bad.join(", "));
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(a.target.json, e),
    }
}

/// Renders `policy show` for people: where the policy came from, then the document.
pub fn render_policy(v: &Value) -> String {
    let version = s(v, "policy_version");
    let content = match v.get("content") {
        Some(c @ Value::Object(_)) => c,
        _ => return format!("no policy in force yet (version {version})\n"),
    };
    let mut head = format!("policy version {version}");
    if let Some(scope) = v.get("scope").and_then(Value::as_str) {
        head.push_str(&format!(" ({scope}"));
        if let Some(r) = v.get("target_region").and_then(Value::as_str) {
            head.push_str(&format!(", region {r}"));
        }
        head.push(')');
    }
    if let Some(by) = v.get("distributed_by").and_then(Value::as_str) {
        head.push_str(&format!(", distributed by {by}"));
    }
    if let Some(from) = v.get("valid_from").and_then(Value::as_str) {
        head.push_str(&format!(", valid from {from}"));
    }
    let mut out = head;
    out.push('\n');
    let signed = |label: &str, sig: &Value| {
        format!(
            "{label} {} by {} at {}{}\n",
            s(sig, "algorithm"),
            s(sig, "signer"),
            s(sig, "signed_at"),
            match sig.get("key_id").and_then(Value::as_str) {
                Some(k) => format!(" (key {k})"),
                None => String::new(),
            }
        )
    };
    if let Some(sig @ Value::Object(_)) = v.get("signature") {
        out.push_str(&signed("signed", sig));
    }
    if let Some(sig @ Value::Object(_)) = v.get("origin") {
        out.push_str(&signed("origin signed", sig));
    }
    out.push_str("content:\n");
    out.push_str(&json::to_pretty_string(content));
    out.push('\n');
    out
}

/// Runs `pdsno policy ...`.
pub fn policy(c: &PolicyCommand) -> ExitCode {
    match c {
        PolicyCommand::Set { file, target } => {
            let j = target.json;
            let bytes = match std::fs::read(file) {
                Ok(b) => b,
                Err(e) => return fail(j, format!("{}: {e}", file.display())),
            };
            let content = match json::parse(&bytes) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return fail(
                        j,
                        format!("{}: the policy must be a JSON object", file.display()),
                    );
                }
                Err(e) => return fail(j, format!("{}: {e}", file.display())),
            };
            let mut args = Map::new();
            args.insert("content".into(), Value::Object(content));
            match target.call("policy.set", Value::Object(args), Duration::from_secs(30)) {
                Ok(v) => {
                    if j {
                        print_json(&v);
                    } else {
                        println!(
                            "policy version {} {}",
                            s(&v, "policy_version"),
                            if v.get("published").and_then(Value::as_bool) == Some(true) {
                                "published"
                            } else {
                                "stored (children get it by sync when the broker is back)"
                            }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(j, e),
            }
        }
        PolicyCommand::Show { target } => {
            match target.call(
                "policy.show",
                Value::Object(Map::new()),
                Duration::from_secs(10),
            ) {
                Ok(v) => {
                    if target.json {
                        print_json(&v);
                    } else {
                        print!("{}", render_policy(&v));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(target.json, e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_show_text_before_any_policy_and_from_an_older_node() {
        let none = Value::Object(crate::policy::show(0, None));
        assert_eq!(render_policy(&none), "no policy in force yet (version 0)\n");
        // An older node answers only the version and the document: no signature lines.
        let old = json::parse(br#"{"policy_version": 3, "content": {"a": 1}}"#).expect("json");
        assert_eq!(
            render_policy(&old),
            "policy version 3\ncontent:\n{\n  \"a\": 1\n}\n"
        );
    }
}
