//! The `pdsno` command line: one binary, every tier and tool.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::cmd;

/// The version with the commit it was built from: `0.1.0 (commit 0123456789ab)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUILD_GIT_COMMIT"),
    ")"
);

const GLOBAL_EXAMPLES: &str = "\
Examples:
  # First start: a bootstrap secret (mode 0600) and a token for a regional controller
  pdsno token --init-secret --bootstrap-secret-file bootstrap.secret \\
    --temp-id temp-rc-a --region zone-A --type regional --out rc-a.token
  pdsno global --data-dir gc-data --bootstrap-secret-file bootstrap.secret --regions zone-A,zone-B
  # From a file (every flag is also a TOML key and a PDSNO_* variable)
  pdsno global --config /etc/pdsno/global.toml --check-config

Defaults: gRPC 127.0.0.1:50051, REST 127.0.0.1:8001, MQTT 127.0.0.1:1883 (3.1.1 and 5);
data directory ./pdsno-global. Listen on other addresses with --listen-grpc etc.";

const REGIONAL_EXAMPLES: &str = "\
Examples:
  # First start, with the token minted on the global controller's host
  pdsno regional --data-dir rc-a-data --parent http://gc:50051 \\
    --region zone-A --temp-id temp-rc-a --bootstrap-token-file rc-a.token
  # Later starts need only the data directory; mint local controllers' tokens with
  pdsno token --data-dir rc-a-data --temp-id temp-lc-1 --region zone-A --type local --out lc-1.token

Defaults: gRPC 127.0.0.1:50052, REST 127.0.0.1:8002. Its bootstrap secret is its own
(DATA_DIR/bootstrap.secret); never give it the global controller's.";

const LOCAL_EXAMPLES: &str = "\
Examples:
  pdsno local --data-dir lc-1-data --parent http://rc-a:50052 \\
    --region zone-A --temp-id temp-lc-1 --bootstrap-token-file lc-1.token
  # One discovery cycle from a device list, then exit (4: report not delivered)
  pdsno local --data-dir lc-1-data --scanner file --scan-file devices.json --scan-once

Defaults: gRPC 127.0.0.1:50053, REST 127.0.0.1:8003.";

/// pdsno: a partially distributed SDN orchestrator in one binary.
#[derive(Debug, Parser)]
#[command(name = "pdsno", version = VERSION, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the global controller (root of trust; embeds the MQTT broker).
    #[command(after_help = GLOBAL_EXAMPLES)]
    Global(cmd::tier::TierArgs),
    /// Run a regional controller (admitted by the global controller).
    #[command(after_help = REGIONAL_EXAMPLES)]
    Regional(cmd::tier::TierArgs),
    /// Run a local controller (admitted by its regional controller).
    #[command(after_help = LOCAL_EXAMPLES)]
    Local(cmd::tier::TierArgs),
    /// Pairwise keys: list them, rotate one.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Controllers: revoke one.
    #[command(subcommand)]
    Controller(cmd::keys::ControllerCommand),
    /// Show a running node: the controller tree with liveness, devices, policy versions.
    Status(cmd::ops::StatusArgs),
    /// Policy: publish a new version (global controller), show the one in force.
    #[command(subcommand)]
    Policy(cmd::ops::PolicyCommand),
    /// Devices: the inventory of a regional controller's region or of the global controller.
    #[command(subcommand)]
    Devices(cmd::devices::DevicesCommand),
    /// Admission lockouts on a parent: list them, lift one.
    #[command(subcommand)]
    Lockout(cmd::lockout::LockoutCommand),
    /// Run a single-box site in one process: a global, a regional and its local controllers.
    Edge(cmd::edge::EdgeArgs),
    /// Run a whole GC + RC + LC topology locally, show it, and stop it.
    Demo(cmd::demo::DemoArgs),
    /// Print a bootstrap token for a new child (or write it to --out).
    Token(cmd::token::TokenArgs),
    /// Hash an operator password (read from stdin or --password-file) for [[mqtt_users]].
    Passwd(cmd::passwd::PasswdArgs),
    /// Sign one JSON envelope read from stdin and print it.
    Sign(cmd::envelope_tools::SignArgs),
    /// Verify one JSON envelope read from stdin: prints OK (exit 0) or the reason (exit 1).
    Verify(cmd::envelope_tools::VerifyArgs),
    /// Run the embedded MQTT broker alone.
    Broker(cmd::broker::BrokerArgs),
    /// Load generators (numbers for reports).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// TLS certificates for a lab: a CA, then one certificate per controller.
    #[command(subcommand)]
    Certs(cmd::certs::CertsCommand),
    /// The signed event log: verify the chain, show the latest events.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Print a shell completion script (e.g. `pdsno completions bash > /etc/bash_completion.d/pdsno`).
    Completions(cmd::cli_docs::CompletionsArgs),
    /// Write the manual pages (pdsno.1 and one per subcommand) into --out-dir, or pdsno.1 to stdout.
    Man(cmd::cli_docs::ManArgs),
}

/// Parses `args` and runs the command; returns the process exit code.
pub fn run_with(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = match command().try_get_matches_from(&args) {
        Ok(m) => m,
        // Under --json a usage error is JSON too (same exit code).
        Err(e) if e.use_stderr() && cmd::output::wants_json(&args) => {
            let text = e.render().to_string();
            let text = text.trim().trim_start_matches("error: ");
            println!("{}", cmd::output::error_json(text));
            return ExitCode::from(2);
        }
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (2).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let sub = matches.subcommand().map(|(_, m)| m);
    let warnings = |flags| {
        sub.map(|m| cmd::secrets::command_line_warnings(m, flags))
            .unwrap_or_default()
    };
    // A tier's warnings: secrets on the command line, and settings it does not read.
    let tier_warnings = |role: pdsno_shared::ids::Role| {
        let mut w = warnings(cmd::secrets::NODE_SECRETS);
        if let (Some(m), Some(c)) = (sub, command().find_subcommand(role.as_str())) {
            w.extend(crate::tier_settings::ignored_in_matches(role, m, c));
        }
        w
    };
    match cli.command {
        Command::Global(a) => cmd::tier::run(
            pdsno_shared::ids::Role::Global,
            &a,
            &tier_warnings(pdsno_shared::ids::Role::Global),
        ),
        Command::Regional(a) => cmd::tier::run(
            pdsno_shared::ids::Role::Regional,
            &a,
            &tier_warnings(pdsno_shared::ids::Role::Regional),
        ),
        Command::Local(a) => cmd::tier::run(
            pdsno_shared::ids::Role::Local,
            &a,
            &tier_warnings(pdsno_shared::ids::Role::Local),
        ),
        Command::Token(a) => cmd::token::run(&a),
        Command::Passwd(a) => cmd::passwd::run(&a),
        Command::Edge(a) => cmd::edge::run(&a),
        Command::Demo(a) => cmd::demo::run(&a),
        Command::Status(a) => cmd::ops::status(&a),
        Command::Policy(c) => cmd::ops::policy(&c),
        Command::Devices(c) => cmd::devices::run(&c),
        Command::Lockout(c) => cmd::lockout::run(&c),
        Command::Keys(c) => cmd::keys::keys(&c),
        Command::Controller(c) => cmd::keys::controller(&c),
        Command::Sign(a) => cmd::envelope_tools::sign(&a, sub),
        Command::Verify(a) => cmd::envelope_tools::verify(&a, sub),
        Command::Broker(a) => cmd::broker::run(&a, &warnings(cmd::secrets::BROKER_SECRETS)),
        Command::Bench(c) => {
            if let Some(m) = sub.and_then(|m| m.subcommand_matches("mqtt")) {
                for w in cmd::secrets::command_line_warnings(m, cmd::secrets::BENCH_SECRETS) {
                    eprintln!("warning: {w}");
                }
            }
            cmd::bench::run(&c)
        }
        Command::Certs(c) => cmd::certs::run(&c),
        Command::Audit(c) => cmd::audit::run(&c),
        Command::Completions(a) => cmd::cli_docs::completions(&a),
        Command::Man(a) => cmd::cli_docs::man(&a),
    }
}

/// The command line definition, each tier's flags grouped (and the other tiers' hidden) as
/// its `--help` shows them.
pub fn command() -> clap::Command {
    use pdsno_shared::ids::Role;
    let mut cmd = Cli::command();
    for role in [Role::Global, Role::Regional, Role::Local] {
        cmd = cmd.mut_subcommand(role.as_str(), |c| crate::tier_settings::for_tier(c, role));
    }
    cmd
}

/// Every `PDSNO_*` variable a flag of `pdsno <tier>` reads, with its flag.
pub fn tier_env_vars() -> Vec<(String, String)> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    if let Some(sub) = cmd.find_subcommand("global") {
        for a in sub.get_arguments() {
            if let (Some(env), Some(long)) = (a.get_env(), a.get_long()) {
                out.push((env.to_string_lossy().into_owned(), long.to_owned()));
            }
        }
    }
    out
}

/// `PDSNO_*` variables read outside the tiers' flags (tools, the runtime, tests).
const OTHER_VARIABLES: &[&str] = &[
    "PDSNO_BOOTSTRAP_SECRET",
    "PDSNO_BOOTSTRAP_TOKEN",
    "PDSNO_WORKER_THREADS",
    "PDSNO_ADMIN_KEY_FILE",
    "PDSNO_BIN",
    "PDSNO_TEST_LOG",
    "PDSNO_PYTHON",
    "PDSNO_DIFF_SEED",
    "PDSNO_DIFF_CASES",
    // Deprecated names, still read for one release (with a warning).
    "PDSNO_LOCKOUT_WINDOW",
];

/// The `PDSNO_*` variables set in `vars` that nothing reads: each with the variable that was
/// probably meant. A misspelt `PDSNO_REQUIRE_TSL=true` must not leave TLS off quietly.
pub fn unknown_variables(vars: impl IntoIterator<Item = String>) -> Vec<(String, Option<String>)> {
    let cmd = Cli::command();
    let mut known: Vec<String> = OTHER_VARIABLES.iter().map(|s| (*s).to_owned()).collect();
    for sub in cmd.get_subcommands() {
        let mut stack = vec![sub];
        while let Some(c) = stack.pop() {
            known.extend(
                c.get_arguments()
                    .filter_map(|a| a.get_env())
                    .map(|e| e.to_string_lossy().into_owned()),
            );
            stack.extend(c.get_subcommands());
        }
    }
    vars.into_iter()
        .filter(|v| v.starts_with("PDSNO_") && !known.contains(v))
        .map(|v| {
            let hint = crate::config::did_you_mean(&v, known.iter().cloned());
            (v, hint)
        })
        .collect()
}
