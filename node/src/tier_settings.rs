//! Which tier reads which setting, and under which heading `--help` shows it.
//!
//! Every flag of `pdsno global|regional|local` is one setting (flag `--x-y`, variable
//! `PDSNO_X_Y`, TOML key `x_y`). One table says which tiers read it: `--help` of a tier shows
//! only those (grouped under headings), and a setting given to a tier that ignores it (on
//! the command line, in a variable or in the file) draws a warning at start and from
//! `--check-config`.

use clap::parser::ValueSource;
use pdsno_shared::ids::Role;

const G: u8 = 1;
const R: u8 = 2;
const L: u8 = 4;
const ALL: u8 = G | R | L;
const PARENTS: u8 = G | R;
const CHILDREN: u8 = R | L;

const NODE: &str = "Node";
const LISTEN: &str = "Listeners and limits";
const BROKER: &str = "Embedded MQTT broker";
const MQTT: &str = "MQTT client";
const FIRST_START: &str = "First start (admission by the parent)";
const ADMITTING: &str = "Admitting children";
const TRUST: &str = "Keys and TLS";
const DISCOVERY: &str = "Discovery";

/// `(flag without --, heading, tiers that read it)`. A flag missing here is read by every
/// tier and shown under "Node" (a test keeps the table complete).
pub const SETTINGS: &[(&str, &str, u8)] = &[
    ("config", NODE, ALL),
    ("data-dir", NODE, ALL),
    ("log-level", NODE, ALL),
    ("log-format", NODE, ALL),
    ("heartbeat-interval", NODE, ALL),
    ("check-config", NODE, ALL),
    ("print-config", NODE, ALL),
    ("listen-grpc", LISTEN, ALL),
    ("listen-rest", LISTEN, ALL),
    ("listen-admin", LISTEN, ALL),
    ("listen-metrics", LISTEN, ALL),
    ("advertise-grpc", LISTEN, ALL),
    ("rate-limit-rps", LISTEN, ALL),
    ("rate-limit-burst", LISTEN, ALL),
    ("rate-limit-exempt", LISTEN, ALL),
    ("max-connections", LISTEN, ALL),
    ("max-connections-per-address", LISTEN, ALL),
    ("listen-mqtt", BROKER, G),
    ("listen-mqtt-v5", BROKER, G),
    ("listen-mqtts", BROKER, G),
    ("no-embedded-broker", BROKER, G),
    ("advertise-mqtt", BROKER, G),
    ("user", BROKER, G),
    ("reader", BROKER, G),
    ("user-file", BROKER, G),
    ("reader-file", BROKER, G),
    ("mqtt-publish-rate", BROKER, G),
    ("mqtt-publish-burst", BROKER, G),
    ("mqtt-url", MQTT, ALL),
    ("mqtt-username", MQTT, ALL),
    ("mqtt-password-file", MQTT, ALL),
    ("mqtt-ca-file", MQTT, ALL),
    ("no-mqtt", MQTT, ALL),
    ("parent", FIRST_START, CHILDREN),
    ("region", FIRST_START, CHILDREN),
    ("temp-id", FIRST_START, CHILDREN),
    ("bootstrap-token", FIRST_START, CHILDREN),
    ("bootstrap-token-file", FIRST_START, CHILDREN),
    ("parent-id", FIRST_START, CHILDREN),
    ("parent-public-key", FIRST_START, CHILDREN),
    ("parent-public-key-file", FIRST_START, CHILDREN),
    ("root-public-key", FIRST_START, R),
    ("bootstrap-secret-file", ADMITTING, PARENTS),
    ("regions", ADMITTING, G),
    ("quota-per-region", ADMITTING, PARENTS),
    ("blocklist", ADMITTING, PARENTS),
    ("challenge-ttl", ADMITTING, PARENTS),
    ("legacy-compat", ADMITTING, PARENTS),
    ("lockout-failures", ADMITTING, PARENTS),
    ("lockout-window-secs", ADMITTING, PARENTS),
    ("lockout-secs", ADMITTING, PARENTS),
    ("secret", TRUST, ALL),
    ("secret-file", TRUST, ALL),
    ("key-rotation", TRUST, ALL),
    ("key-grace", TRUST, ALL),
    ("tls-cert", TRUST, ALL),
    ("tls-key", TRUST, ALL),
    ("tls-ca", TRUST, ALL),
    ("require-client-cert", TRUST, ALL),
    ("require-tls", TRUST, ALL),
    ("discovery-interval", DISCOVERY, L),
    ("scanner", DISCOVERY, L),
    ("subnet", DISCOVERY, L),
    ("scan-seed", DISCOVERY, L),
    ("scan-file", DISCOVERY, L),
    ("probe-ports", DISCOVERY, L),
    ("probe-timeout", DISCOVERY, L),
    ("missed-cycles", DISCOVERY, L),
    ("scan-once", DISCOVERY, L),
    ("summary-interval", DISCOVERY, R),
    ("spike-threshold", DISCOVERY, R),
    ("max-devices-per-lc", DISCOVERY, R),
    ("device-retention", DISCOVERY, ALL),
];

fn bit(role: Role) -> u8 {
    match role {
        Role::Global => G,
        Role::Regional => R,
        Role::Local => L,
    }
}

fn tiers_named(mask: u8) -> String {
    let names: Vec<&str> = [(G, "global"), (R, "regional"), (L, "local")]
        .into_iter()
        .filter(|(b, _)| mask & b != 0)
        .map(|(_, n)| n)
        .collect();
    match names.as_slice() {
        [one] => format!("the {one} controller"),
        [a, b] => format!("{a} and {b} controllers"),
        _ => "every controller".into(),
    }
}

/// The entry of `flag`, if the table has it.
pub fn setting(flag: &str) -> Option<(&'static str, u8)> {
    SETTINGS
        .iter()
        .find(|(f, _, _)| *f == flag)
        .map(|(_, h, m)| (*h, *m))
}

/// True when `role` reads the setting `flag` (flags not in the table: every tier).
pub fn reads(role: Role, flag: &str) -> bool {
    setting(flag).is_none_or(|(_, m)| m & bit(role) != 0)
}

/// The default of a setting for `role`, as `--help` shows it (the values
/// [`crate::config::NodeConfig::resolve`] applies; a test keeps them in step).
pub fn default_for(role: Role, flag: &str) -> Option<String> {
    let (grpc, rest) = crate::config::default_ports(role);
    Some(match flag {
        "data-dir" => format!("./pdsno-{}", role.as_str()),
        "listen-grpc" => format!("127.0.0.1:{grpc}"),
        "listen-rest" => format!("127.0.0.1:{rest}"),
        "listen-mqtt" => "127.0.0.1:1883".into(),
        "parent" => crate::config::default_parent(role),
        "heartbeat-interval" => "10".into(),
        "log-level" => "info".into(),
        "log-format" => "text".into(),
        "key-rotation" => "86400".into(),
        "key-grace" => "600".into(),
        "challenge-ttl" => "30".into(),
        "quota-per-region" => "10".into(),
        "lockout-failures" => "5".into(),
        "lockout-window-secs" => "60".into(),
        "lockout-secs" => "900".into(),
        "rate-limit-rps" => "200".into(),
        "rate-limit-burst" => "400".into(),
        "max-connections" => "1024".into(),
        "max-connections-per-address" => "64".into(),
        "mqtt-publish-rate" => "500".into(),
        "mqtt-publish-burst" => "2000".into(),
        "discovery-interval" => "30".into(),
        "summary-interval" => "30".into(),
        "scanner" => "simulated".into(),
        "probe-ports" => "22,80,443,8080".into(),
        "probe-timeout" => "0.5".into(),
        "missed-cycles" => "3".into(),
        "spike-threshold" => "100".into(),
        "max-devices-per-lc" => "65536".into(),
        "device-retention" => "604800".into(),
        _ => return None,
    })
}

/// The `pdsno <tier>` subcommand as its `--help` shows it: the flags of other tiers hidden
/// (still accepted, with a warning when set), the rest under headings with their defaults.
pub fn for_tier(mut cmd: clap::Command, role: Role) -> clap::Command {
    let args: Vec<(clap::Id, String, Option<String>)> = cmd
        .get_arguments()
        .filter_map(|a| {
            a.get_long().map(|l| {
                (
                    a.get_id().clone(),
                    l.to_owned(),
                    a.get_help().map(|h| h.to_string()),
                )
            })
        })
        .collect();
    for (id, long, help) in args {
        let (heading, _) = setting(&long).unwrap_or((NODE, ALL));
        let hide = !reads(role, &long);
        let help = match (help, default_for(role, &long)) {
            (Some(h), Some(d)) => Some(format!("{h} [default: {d}]")),
            (h, _) => h,
        };
        cmd = cmd.mut_arg(id, |a| {
            let a = a.help_heading(heading).hide(hide);
            match help {
                Some(h) => a.help(h),
                None => a,
            }
        });
    }
    cmd
}

/// Warnings for settings given to `role` on the command line or in a variable that it
/// does not read.
pub fn ignored_in_matches(role: Role, m: &clap::ArgMatches, cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if reads(role, long) {
            continue;
        }
        let Some((_, mask)) = setting(long) else {
            continue;
        };
        let given = match m.value_source(a.get_id().as_str()) {
            Some(ValueSource::CommandLine) => format!("--{long}"),
            Some(ValueSource::EnvVariable) => a
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("--{long}")),
            _ => continue,
        };
        out.push(format!(
            "{given} is read by {} only; a {} controller ignores it",
            tiers_named(mask),
            role.as_str()
        ));
    }
    out
}

/// Warnings for keys of the configuration file at `path` that `role` does not read.
pub fn ignored_in_file(role: Role, path: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for key in table.keys() {
        let flag = match key.as_str() {
            // The older spelling, and the file's own form of --user.
            "embedded_broker" => "no-embedded-broker".to_owned(),
            "mqtt_users" => "user".to_owned(),
            k => {
                let direct = k.replace('_', "-");
                if setting(&direct).is_some() {
                    direct
                } else {
                    // `*_secs`: the older names of the interval settings.
                    k.trim_end_matches("_secs").replace('_', "-")
                }
            }
        };
        if let Some((_, mask)) = setting(&flag)
            && mask & bit(role) == 0
        {
            out.push(format!(
                "{}: `{key}` is read by {} only; a {} controller ignores it",
                path.display(),
                tiers_named(mask),
                role.as_str()
            ));
        }
    }
    out
}

/// File keys of an earlier release, still read for this one: `(old, new)`.
pub const DEPRECATED_FILE_KEYS: &[(&str, &str)] = &[
    ("heartbeat_interval_secs", "heartbeat_interval"),
    ("discovery_interval_secs", "discovery_interval"),
    ("summary_interval_secs", "summary_interval"),
    ("challenge_ttl_secs", "challenge_ttl"),
    ("key_rotation_secs", "key_rotation"),
    ("key_grace_secs", "key_grace"),
    ("embedded_broker", "no_embedded_broker (inverted)"),
];

/// Warnings for keys of the file at `path` spelt as in an earlier release.
pub fn deprecated_in_file(path: &std::path::Path) -> Vec<String> {
    let Ok(table) = std::fs::read_to_string(path).map(|t| t.parse::<toml::Table>()) else {
        return Vec::new();
    };
    let Ok(table) = table else {
        return Vec::new();
    };
    DEPRECATED_FILE_KEYS
        .iter()
        .filter(|(old, _)| table.contains_key(*old))
        .map(|(old, new)| {
            format!(
                "{}: `{old}` is deprecated and will stop working in the next release; use `{new}`",
                path.display()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_tier_flag_is_in_the_table() {
        let cmd = crate::cli::Cli::command();
        let global = cmd.find_subcommand("global").expect("global");
        for a in global.get_arguments() {
            if let Some(long) = a.get_long()
                && long != "help"
                && long != "version"
            {
                assert!(
                    setting(long).is_some(),
                    "--{long} is not in tier_settings::SETTINGS"
                );
            }
        }
        for (flag, _, _) in SETTINGS {
            assert!(
                global.get_arguments().any(|a| a.get_long() == Some(flag)),
                "SETTINGS names --{flag}, which no tier has"
            );
        }
    }

    #[test]
    fn help_defaults_are_the_defaults_applied() {
        use clap::FromArgMatches;
        for role in [Role::Global, Role::Regional, Role::Local] {
            let m = crate::cli::Cli::command()
                .try_get_matches_from(["pdsno", role.as_str()])
                .expect("parse");
            let cli = crate::cli::Cli::from_arg_matches(&m).expect("args");
            let args = match cli.command {
                crate::cli::Command::Global(a)
                | crate::cli::Command::Regional(a)
                | crate::cli::Command::Local(a) => a.node,
                _ => unreachable!(),
            };
            let Ok(c) = crate::config::NodeConfig::resolve(role, &args) else {
                // The global controller needs a bootstrap secret to resolve.
                assert_eq!(role, Role::Global);
                continue;
            };
            let d = |f: &str| default_for(role, f).expect(f);
            assert_eq!(d("data-dir"), format!("./{}", c.data_dir.display()));
            assert_eq!(d("listen-grpc"), c.listen_grpc.to_string());
            assert_eq!(d("listen-rest"), c.listen_rest.to_string());
            assert_eq!(
                d("heartbeat-interval").parse::<f64>().ok(),
                Some(c.heartbeat_interval.as_secs_f64())
            );
            assert_eq!(d("key-rotation"), c.key_rotation.as_secs().to_string());
            assert_eq!(d("key-grace"), c.key_grace.as_secs().to_string());
            assert_eq!(d("challenge-ttl"), c.challenge_ttl.as_secs().to_string());
            assert_eq!(d("quota-per-region"), c.quota_per_region.to_string());
            assert_eq!(d("lockout-failures"), c.limits.lockout_failures.to_string());
            assert_eq!(
                d("lockout-window-secs").parse::<f64>().ok(),
                Some(c.limits.lockout_window.as_secs_f64())
            );
            assert_eq!(
                d("lockout-secs").parse::<f64>().ok(),
                Some(c.limits.lockout.as_secs_f64())
            );
            assert_eq!(d("rate-limit-rps"), c.limits.rate_per_sec.to_string());
            assert_eq!(d("rate-limit-burst"), c.limits.burst.to_string());
            assert_eq!(d("max-connections"), c.limits.max_connections.to_string());
            assert_eq!(
                d("max-connections-per-address"),
                c.limits.max_connections_per_address.to_string()
            );
            assert_eq!(d("mqtt-publish-rate"), c.mqtt_publish_rate.to_string());
            assert_eq!(d("mqtt-publish-burst"), c.mqtt_publish_burst.to_string());
            assert_eq!(
                d("discovery-interval").parse::<f64>().ok(),
                Some(c.discovery_interval.as_secs_f64())
            );
            assert_eq!(
                d("summary-interval").parse::<f64>().ok(),
                Some(c.summary_interval.as_secs_f64())
            );
            assert_eq!(d("missed-cycles"), c.missed_cycles.to_string());
            let ports: Vec<String> = c.probe_ports.iter().map(u16::to_string).collect();
            assert_eq!(d("probe-ports"), ports.join(","));
            assert_eq!(
                d("probe-timeout").parse::<f64>().ok(),
                Some(c.probe_timeout.as_secs_f64())
            );
            assert_eq!(d("spike-threshold"), c.spike_threshold.to_string());
            assert_eq!(d("max-devices-per-lc"), c.max_devices_per_lc.to_string());
            assert_eq!(
                d("device-retention"),
                c.device_retention.as_secs().to_string()
            );
            assert_eq!(
                Some(d("parent")),
                c.parent
                    .clone()
                    .or_else(|| Some(crate::config::default_parent(role)))
            );
        }
    }

    #[test]
    fn file_keys_map_to_their_flags() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "regions = [\"a\"]\nscanner = \"file\"\nlockout_secs = 5.0\nlockout_window_secs = 5.0\n\
             lockout_failures = 2\nheartbeat_interval = 1.0\ndiscovery_interval_secs = 3.0\n\
             summary_interval = 2.0\nembedded_broker = false\n",
        )
        .expect("write");
        let w = ignored_in_file(Role::Local, &p).join("\n");
        for key in [
            "`regions`",
            "`lockout_secs`",
            "`lockout_window_secs`",
            "`lockout_failures`",
            "`summary_interval`",
            "`embedded_broker`",
        ] {
            assert!(w.contains(key), "{key} not reported: {w}");
        }
        for key in [
            "`scanner`",
            "`heartbeat_interval`",
            "`discovery_interval_secs`",
        ] {
            assert!(!w.contains(key), "{key} is read by a local controller: {w}");
        }
        let w = ignored_in_file(Role::Global, &p).join("\n");
        assert!(w.contains("`scanner`") && !w.contains("`regions`"), "{w}");
    }
}
