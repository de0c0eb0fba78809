//! `pdsno devices`: the device inventory of a running node — a regional controller's
//! region, or the global controller's inventory of every region — over its admin API.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::payload::discovery::normalize_mac;

use super::ops::AdminTarget;
use super::output::{fail, print_json};

/// A device's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceStatusArg {
    /// Seen recently.
    Active,
    /// Missed for its local controller's limit of cycles, or retired.
    Inactive,
}

/// `pdsno devices` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices, sorted by MAC, optionally filtered.
    List(ListArgs),
    /// Show one device (on a global controller, its row in each region that reports it).
    Show {
        /// The MAC address (any case, `:` or `-` separated).
        mac: String,
        /// The node.
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `pdsno devices list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this region.
    #[arg(long)]
    pub region: Option<String>,
    /// Only devices reported by this local controller.
    #[arg(long = "lc", value_name = "ID")]
    pub lc: Option<String>,
    /// Only devices in this status.
    #[arg(long, value_enum)]
    pub status: Option<DeviceStatusArg>,
    /// The node.
    #[command(flatten)]
    pub target: AdminTarget,
}

fn field<'a>(d: &'a Value, k: &str) -> &'a str {
    d.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn rows(target: &AdminTarget) -> Result<Vec<Value>, String> {
    let v = target.call(
        "inventory",
        Value::Object(Map::new()),
        Duration::from_secs(30),
    )?;
    let Value::Array(mut rows) = v else {
        return Err("the node answered without a device list".into());
    };
    rows.sort_by(|a, b| {
        (field(a, "mac"), field(a, "region")).cmp(&(field(b, "mac"), field(b, "region")))
    });
    Ok(rows)
}

fn table(rows: &[Value]) -> String {
    let cols = [
        "mac",
        "ip",
        "hostname",
        "status",
        "lc_id",
        "region",
        "last_seen",
    ];
    let cells: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| field(r, c)).collect())
        .collect();
    let mut width: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |items: &[&str]| {
        let parts: Vec<String> = items
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&[
        "MAC",
        "IP",
        "HOSTNAME",
        "STATUS",
        "LC",
        "REGION",
        "LAST SEEN",
    ]);
    for row in &cells {
        line(row);
    }
    out
}

/// Runs `pdsno devices ...`.
pub fn run(c: &DevicesCommand) -> ExitCode {
    match c {
        DevicesCommand::List(a) => {
            let all = match rows(&a.target) {
                Ok(r) => r,
                Err(e) => return fail(a.target.json, e),
            };
            let status = a.status.map(|s| match s {
                DeviceStatusArg::Active => "active",
                DeviceStatusArg::Inactive => "inactive",
            });
            let picked: Vec<Value> = all
                .into_iter()
                .filter(|d| a.region.as_deref().is_none_or(|r| field(d, "region") == r))
                .filter(|d| a.lc.as_deref().is_none_or(|l| field(d, "lc_id") == l))
                .filter(|d| status.is_none_or(|s| field(d, "status") == s))
                .collect();
            if a.target.json {
                print_json(&Value::Array(picked));
            } else {
                print!("{}", table(&picked));
                eprintln!("{} devices", picked.len());
            }
            ExitCode::SUCCESS
        }
        DevicesCommand::Show { mac, target } => {
            let Some(mac) = normalize_mac(mac) else {
                return fail(target.json, format!("{mac:?} is not a MAC address"));
            };
            let found: Vec<Value> = match rows(target) {
                Ok(r) => r.into_iter().filter(|d| field(d, "mac") == mac).collect(),
                Err(e) => return fail(target.json, e),
            };
            if found.is_empty() {
                return fail(target.json, format!("no device {mac} on this node"));
            }
            if target.json {
                print_json(&Value::Array(found));
            } else {
                for d in &found {
                    for k in [
                        "mac",
                        "ip",
                        "hostname",
                        "status",
                        "lc_id",
                        "rc_id",
                        "region",
                        "last_seen",
                    ] {
                        if d.get(k).is_some() {
                            println!("{k:<10} {}", field(d, k));
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
