//! `pdsno keys list|rotate` and `pdsno controller revoke`: operator commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use pdsno_shared::json::{Map, Value};

use super::output::{fail, print_json};

/// Where the node is and how to authenticate to it.
pub use crate::cmd::ops::AdminTarget as Target;

/// `pdsno keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show key ids, peers, ages and states (never key material). Reads the NIB directly.
    List {
        /// The node's data directory.
        #[arg(long, env = "PDSNO_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the pairwise key with a peer now (on the running node).
    Rotate {
        /// The peer's controller id.
        #[arg(long)]
        peer: String,
        /// Return at once instead of waiting for the rotation.
        #[arg(long)]
        no_wait: bool,
        /// The node.
        #[command(flatten)]
        target: Target,
    },
}

/// `pdsno controller` subcommands.
#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Revoke a controller this node admitted: its keys, MQTT credential and session go.
    Revoke {
        /// The controller id.
        id: String,
        /// The node that admitted it.
        #[command(flatten)]
        target: Target,
    },
}

fn call(t: &Target, command: &str, args: Value, timeout: Duration) -> Result<Value, String> {
    t.call(command, args, timeout)
}

fn print_keys(v: &Value, as_json: bool) {
    if as_json {
        print_json(v);
        return;
    }
    let rows = v.as_array().unwrap_or_default();
    if rows.is_empty() {
        println!("no pairwise keys");
        return;
    }
    println!(
        "{:<60} {:<28} {:<9} {:>9}  retires_at",
        "key_id", "peer", "state", "age"
    );
    for r in rows {
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
        let age = r
            .get("age_secs")
            .and_then(Value::as_i64)
            .map_or("-".into(), |a| format!("{a}s"));
        println!(
            "{:<60} {:<28} {:<9} {:>9}  {}",
            s("key_id"),
            s("peer"),
            s("state"),
            age,
            s("retires_at")
        );
    }
}

/// Runs `pdsno keys ...`.
pub fn keys(c: &KeysCommand) -> ExitCode {
    match c {
        KeysCommand::List {
            data_dir,
            json: as_json,
        } => {
            let path = data_dir.join("nib.db");
            if !path.exists() {
                return fail(
                    *as_json,
                    format!(
                        "{} does not exist: is {} a node's data directory?",
                        path.display(),
                        data_dir.display()
                    ),
                );
            }
            let nib = match crate::nib::Nib::open(&path) {
                Ok(n) => n,
                Err(e) => return fail(*as_json, e),
            };
            match crate::keys::describe(&nib) {
                Ok(keys) => {
                    let now = chrono::Utc::now();
                    let v = Value::Array(
                        keys.iter()
                            .map(|k| {
                                let mut m = Map::new();
                                m.insert("key_id".into(), k.key_id.clone().into());
                                m.insert("peer".into(), k.peer_id.clone().into());
                                m.insert("state".into(), k.state.into());
                                m.insert(
                                    "age_secs".into(),
                                    (now - k.created_at).num_seconds().into(),
                                );
                                m.insert(
                                    "retires_at".into(),
                                    k.retires_at.map(pdsno_shared::time::format_iso).into(),
                                );
                                Value::Object(m)
                            })
                            .collect(),
                    );
                    print_keys(&v, *as_json);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(*as_json, e),
            }
        }
        KeysCommand::Rotate {
            peer,
            no_wait,
            target,
        } => {
            let mut args = Map::new();
            args.insert("peer".into(), peer.clone().into());
            args.insert(
                "wait_secs".into(),
                Value::from(if *no_wait { 0u64 } else { 60 }),
            );
            match call(
                target,
                "keys.rotate",
                Value::Object(args),
                Duration::from_secs(75),
            ) {
                Ok(v) => {
                    if target.json {
                        print_json(&v);
                    } else if *no_wait {
                        println!("rotation with {peer} requested");
                    } else {
                        let key = v.get("signing_key").and_then(Value::as_str).unwrap_or("-");
                        println!("rotated: now signing with {key} for {peer}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(target.json, e),
            }
        }
    }
}

/// Runs `pdsno controller ...`.
pub fn controller(c: &ControllerCommand) -> ExitCode {
    match c {
        ControllerCommand::Revoke { id, target } => {
            let mut args = Map::new();
            args.insert("id".into(), id.clone().into());
            match call(
                target,
                "controller.revoke",
                Value::Object(args),
                Duration::from_secs(30),
            ) {
                Ok(v) => {
                    if target.json {
                        print_json(&v);
                    } else {
                        println!("revoked {id}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(target.json, e),
            }
        }
    }
}
