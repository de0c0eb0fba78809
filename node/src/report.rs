//! Report lines: one short `key=value` line on stdout per event an operator, a script or a
//! test waits for. [`Report`] lists them all; [`emit`] prints one and [`Report::parse`]
//! reads one back (the demo, the benchmarks and the tests use it). The log on stderr
//! records the same events with their fields.
//!
//! When stdout and stderr lead to the same place (a terminal, `2>&1`, the systemd journal
//! with the default `StandardError=inherit`), the report lines are left out: the log alone
//! tells each event once.

use std::fmt;
use std::sync::LazyLock;

/// An event a node reports on stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// `ready id=ID role=ROLE grpc=ADDR rest=ADDR [admin=ADDR] [metrics=ADDR] public_key=B64`.
    Ready {
        /// The controller id.
        id: String,
        /// Its tier.
        role: String,
        /// The gRPC listener.
        grpc: String,
        /// The REST listener.
        rest: String,
        /// The admin listener, with `--listen-admin`.
        admin: Option<String>,
        /// The metrics listener, with `--listen-metrics`.
        metrics: Option<String>,
        /// The identity key a child pins (`--parent-public-key`).
        public_key: String,
    },
    /// `admitted id=ID parent=PARENT temp_id=TEMP elapsed_ms=N`: a child's first start.
    Admitted {
        /// The id the parent assigned.
        id: String,
        /// The parent's id.
        parent: String,
        /// The temporary id admitted.
        temp_id: String,
        /// How long admission took.
        elapsed_ms: u64,
    },
    /// `restored id=ID parent=PARENT`: a restarted child keeps its identity.
    Restored {
        /// The controller id.
        id: String,
        /// The parent's id (`-` when none).
        parent: String,
    },
    /// `mqtt v4|v5 ADDR` or `mqtts v4|v5 ADDR`: an embedded broker listener.
    MqttListener {
        /// TLS (`mqtts`).
        tls: bool,
        /// `v4` (MQTT 3.1.1) or `v5`.
        version: String,
        /// The address.
        addr: String,
    },
    /// `mqtt connected broker=HOST:PORT`.
    MqttConnected {
        /// The broker.
        broker: String,
    },
    /// `key id=KEY_ID peer=PEER`: a pairwise key agreed.
    Key {
        /// The key id.
        id: String,
        /// The peer.
        peer: String,
    },
    /// `liveness id=ID state=STATE`: a child went online, stale or offline.
    Liveness {
        /// The child.
        id: String,
        /// Its new state.
        state: String,
    },
    /// `discovery cycle=N seen=N new=N updated=N inactive=N active=N report=ID`.
    DiscoveryCycle {
        /// The cycle number.
        cycle: u64,
        /// Devices seen.
        seen: u64,
        /// New ones.
        new: u64,
        /// Changed ones.
        updated: u64,
        /// Gone inactive.
        inactive: u64,
        /// Active after the cycle.
        active: u64,
        /// The report sent (`-`: none).
        report: String,
    },
    /// `report from=LC new=N updated=N inactive=N collisions=N id=REPORT`: ingested at an RC.
    ReportIngested {
        /// The local controller.
        from: String,
        /// New devices.
        new: u64,
        /// Updated devices.
        updated: u64,
        /// Devices marked inactive.
        inactive: u64,
        /// Devices another controller owns.
        collisions: u64,
        /// The report id.
        id: String,
    },
    /// `summary from=RC region=R new=N updated=N inactive=N region_total=N`: at the GC.
    Summary {
        /// The regional controller.
        from: String,
        /// Its region.
        region: String,
        /// New devices.
        new: u64,
        /// Updated devices.
        updated: u64,
        /// Inactive devices.
        inactive: u64,
        /// Devices in the region.
        region_total: u64,
    },
    /// `anomaly kind=cross_region mac=MAC regions=A,B`: one device in two regions.
    CrossRegion {
        /// The device.
        mac: String,
        /// The regions that report it.
        regions: String,
    },
    /// `policy version=N applied|published|republished [region=R]`.
    Policy {
        /// The version.
        version: u64,
        /// What happened to it here.
        event: PolicyEvent,
        /// The region a regional controller republished it for.
        region: Option<String>,
    },
    /// `scan-once delivered=true|false`.
    ScanOnce {
        /// Whether the report was acknowledged.
        delivered: bool,
    },
}

/// What a node did with a policy version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    /// Checked and in force (a local controller, or a regional one without children).
    Applied,
    /// Made here (the global controller).
    Published,
    /// In force and handed on to the region (a regional controller).
    Republished,
}

impl PolicyEvent {
    fn as_str(self) -> &'static str {
        match self {
            PolicyEvent::Applied => "applied",
            PolicyEvent::Published => "published",
            PolicyEvent::Republished => "republished",
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Ready {
                id,
                role,
                grpc,
                rest,
                admin,
                metrics,
                public_key,
            } => {
                write!(f, "ready id={id} role={role} grpc={grpc} rest={rest}")?;
                if let Some(a) = admin {
                    write!(f, " admin={a}")?;
                }
                if let Some(m) = metrics {
                    write!(f, " metrics={m}")?;
                }
                write!(f, " public_key={public_key}")
            }
            Report::Admitted {
                id,
                parent,
                temp_id,
                elapsed_ms,
            } => write!(
                f,
                "admitted id={id} parent={parent} temp_id={temp_id} elapsed_ms={elapsed_ms}"
            ),
            Report::Restored { id, parent } => write!(f, "restored id={id} parent={parent}"),
            Report::MqttListener { tls, version, addr } => {
                let scheme = if *tls { "mqtts" } else { "mqtt" };
                write!(f, "{scheme} {version} {addr}")
            }
            Report::MqttConnected { broker } => write!(f, "mqtt connected broker={broker}"),
            Report::Key { id, peer } => write!(f, "key id={id} peer={peer}"),
            Report::Liveness { id, state } => write!(f, "liveness id={id} state={state}"),
            Report::DiscoveryCycle {
                cycle,
                seen,
                new,
                updated,
                inactive,
                active,
                report,
            } => write!(
                f,
                "discovery cycle={cycle} seen={seen} new={new} updated={updated} inactive={inactive} active={active} report={report}"
            ),
            Report::ReportIngested {
                from,
                new,
                updated,
                inactive,
                collisions,
                id,
            } => write!(
                f,
                "report from={from} new={new} updated={updated} inactive={inactive} collisions={collisions} id={id}"
            ),
            Report::Summary {
                from,
                region,
                new,
                updated,
                inactive,
                region_total,
            } => write!(
                f,
                "summary from={from} region={region} new={new} updated={updated} inactive={inactive} region_total={region_total}"
            ),
            Report::CrossRegion { mac, regions } => {
                write!(f, "anomaly kind=cross_region mac={mac} regions={regions}")
            }
            Report::Policy {
                version,
                event,
                region,
            } => {
                write!(f, "policy version={version} {}", event.as_str())?;
                match region {
                    Some(r) => write!(f, " region={r}"),
                    None => Ok(()),
                }
            }
            Report::ScanOnce { delivered } => write!(f, "scan-once delivered={delivered}"),
        }
    }
}

/// The value of `key=` in a report line (`field("ready id=x grpc=y", "grpc")` is `y`).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

impl Report {
    /// Reads a report line back; `None` for anything else (a line of another program, or
    /// of a newer version with an event this one does not know).
    pub fn parse(line: &str) -> Option<Report> {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        let second = words.next().unwrap_or_default();
        let s = |k: &str| field(line, k).map(str::to_owned);
        let n = |k: &str| field(line, k).and_then(|v| v.parse::<u64>().ok());
        Some(match (first, second) {
            ("ready", _) => Report::Ready {
                id: s("id")?,
                role: s("role")?,
                grpc: s("grpc")?,
                rest: s("rest")?,
                admin: s("admin"),
                metrics: s("metrics"),
                public_key: s("public_key")?,
            },
            ("admitted", _) => Report::Admitted {
                id: s("id")?,
                parent: s("parent")?,
                temp_id: s("temp_id")?,
                elapsed_ms: n("elapsed_ms")?,
            },
            ("restored", _) => Report::Restored {
                id: s("id")?,
                parent: s("parent")?,
            },
            ("mqtt", "connected") => Report::MqttConnected {
                broker: s("broker")?,
            },
            ("mqtt" | "mqtts", v @ ("v4" | "v5")) => Report::MqttListener {
                tls: first == "mqtts",
                version: v.to_owned(),
                addr: words.next()?.to_owned(),
            },
            ("key", _) => Report::Key {
                id: s("id")?,
                peer: s("peer")?,
            },
            ("liveness", _) => Report::Liveness {
                id: s("id")?,
                state: s("state")?,
            },
            ("discovery", _) => Report::DiscoveryCycle {
                cycle: n("cycle")?,
                seen: n("seen")?,
                new: n("new")?,
                updated: n("updated")?,
                inactive: n("inactive")?,
                active: n("active")?,
                report: s("report")?,
            },
            ("report", _) => Report::ReportIngested {
                from: s("from")?,
                new: n("new")?,
                updated: n("updated")?,
                inactive: n("inactive")?,
                collisions: n("collisions")?,
                id: s("id")?,
            },
            ("summary", _) => Report::Summary {
                from: s("from")?,
                region: s("region")?,
                new: n("new")?,
                updated: n("updated")?,
                inactive: n("inactive")?,
                region_total: n("region_total")?,
            },
            ("anomaly", _) if field(line, "kind") == Some("cross_region") => Report::CrossRegion {
                mac: s("mac")?,
                regions: s("regions")?,
            },
            ("policy", _) => Report::Policy {
                version: n("version")?,
                event: match line.split_whitespace().nth(2)? {
                    "applied" => PolicyEvent::Applied,
                    "published" => PolicyEvent::Published,
                    "republished" => PolicyEvent::Republished,
                    _ => return None,
                },
                region: s("region"),
            },
            ("scan-once", _) => Report::ScanOnce {
                delivered: s("delivered")?.parse().ok()?,
            },
            _ => return None,
        })
    }
}

static ENABLED: LazyLock<bool> = LazyLock::new(|| !same_destination());

/// True when report lines are printed.
pub fn enabled() -> bool {
    *ENABLED
}

/// Prints `r` as one report line on stdout (flushed at once), unless stdout and stderr
/// share a destination.
pub fn emit(r: &Report) {
    if enabled() {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{r}");
        let _ = out.flush();
    }
}

#[cfg(unix)]
fn same_destination() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let id = |fd: std::os::fd::BorrowedFd<'_>| {
        let f = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let m = f.metadata().ok()?;
        Some((m.dev(), m.ino()))
    };
    match (id(std::io::stdout().as_fd()), id(std::io::stderr().as_fd())) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_destination() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_reads_back_as_itself() {
        let all = [
            Report::Ready {
                id: "global_cntl_1".into(),
                role: "global".into(),
                grpc: "127.0.0.1:1".into(),
                rest: "127.0.0.1:2".into(),
                admin: Some("127.0.0.1:3".into()),
                metrics: None,
                public_key: "AAAA+/=".into(),
            },
            Report::Admitted {
                id: "regional_cntl_zone-A_1".into(),
                parent: "global_cntl_1".into(),
                temp_id: "t".into(),
                elapsed_ms: 4,
            },
            Report::Restored {
                id: "local_cntl_zone-A_1".into(),
                parent: "regional_cntl_zone-A_1".into(),
            },
            Report::MqttListener {
                tls: true,
                version: "v5".into(),
                addr: "127.0.0.1:8883".into(),
            },
            Report::MqttConnected {
                broker: "127.0.0.1:1883".into(),
            },
            Report::Key {
                id: "key_a_b".into(),
                peer: "b".into(),
            },
            Report::Liveness {
                id: "x".into(),
                state: "offline".into(),
            },
            Report::DiscoveryCycle {
                cycle: 1,
                seen: 2,
                new: 3,
                updated: 4,
                inactive: 5,
                active: 6,
                report: "rpt-1".into(),
            },
            Report::ReportIngested {
                from: "lc".into(),
                new: 1,
                updated: 2,
                inactive: 3,
                collisions: 4,
                id: "rpt-1".into(),
            },
            Report::Summary {
                from: "rc".into(),
                region: "zone-A".into(),
                new: 1,
                updated: 2,
                inactive: 3,
                region_total: 4,
            },
            Report::CrossRegion {
                mac: "02:00:00:00:00:01".into(),
                regions: "zone-A,zone-B".into(),
            },
            Report::Policy {
                version: 2,
                event: PolicyEvent::Republished,
                region: Some("zone-A".into()),
            },
            Report::Policy {
                version: 3,
                event: PolicyEvent::Applied,
                region: None,
            },
            Report::ScanOnce { delivered: false },
        ];
        for r in all {
            let line = r.to_string();
            assert_eq!(Report::parse(&line), Some(r), "{line}");
        }
        assert_eq!(Report::parse("something else entirely"), None);
        assert_eq!(Report::parse("ready id=x"), None, "incomplete");
        assert_eq!(Report::parse(""), None);
    }
}
