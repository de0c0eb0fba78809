//! `pdsno lockout`: the addresses a parent locked out after failed admissions, and lifting
//! a lockout (audited; a restart does not bring it back).

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use pdsno_shared::json::{Map, Value};

use super::ops::AdminTarget;
use super::output::{fail, print_json};

/// `pdsno lockout` subcommands.
#[derive(Debug, Subcommand)]
pub enum LockoutCommand {
    /// The addresses locked out now, with the time left.
    List {
        /// The node.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Lift the lockout of an address (and forget its failed attempts).
    Clear {
        /// The address (IPv4 or IPv6).
        source: std::net::IpAddr,
        /// The node.
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// Runs `pdsno lockout ...`.
pub fn run(c: &LockoutCommand) -> ExitCode {
    match c {
        LockoutCommand::List { target } => {
            match target.call(
                "lockout.list",
                Value::Object(Map::new()),
                Duration::from_secs(10),
            ) {
                Ok(v) if target.json => {
                    print_json(&v);
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    let rows = v.as_array().unwrap_or_default();
                    if rows.is_empty() {
                        println!("no address is locked out");
                    }
                    for r in rows {
                        println!(
                            "{}  {} s left",
                            r.get("source").and_then(Value::as_str).unwrap_or("-"),
                            r.get("seconds_left").and_then(Value::as_u64).unwrap_or(0)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(target.json, e),
            }
        }
        LockoutCommand::Clear { source, target } => {
            let mut args = Map::new();
            args.insert("source".into(), source.to_string().into());
            match target.call(
                "lockout.clear",
                Value::Object(args),
                Duration::from_secs(10),
            ) {
                Ok(v) if target.json => {
                    print_json(&v);
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    if v.get("was_locked_out").and_then(Value::as_bool) == Some(true) {
                        println!("lockout of {source} lifted");
                    } else {
                        println!("{source} was not locked out (its failed attempts are forgotten)");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(target.json, e),
            }
        }
    }
}
