//! `pdsno global`, `pdsno regional`, `pdsno local`: run a controller.

use std::process::ExitCode;

use pdsno_shared::ids::Role;

use clap::Args;

use crate::cmd::secrets::AccountFiles;
use crate::config::{NodeArgs, NodeConfig};

/// `pdsno global|regional|local` arguments: the node's flags and its account files.
#[derive(Debug, Args)]
pub struct TierArgs {
    /// The node's flags.
    #[command(flatten)]
    pub node: NodeArgs,
    /// Operator accounts of the embedded broker, from files.
    #[command(flatten)]
    pub accounts: AccountFiles,
}

/// Runs a controller of `role` until SIGINT/SIGTERM; `warnings` (secrets given on the
/// command line) are printed and logged first.
pub fn run(role: Role, a: &TierArgs, warnings: &[String]) -> ExitCode {
    let args = &a.node;
    let mut warnings = warnings.to_vec();
    if let Some(p) = &args.config {
        warnings.extend(crate::tier_settings::ignored_in_file(role, p));
        warnings.extend(crate::tier_settings::deprecated_in_file(p));
    }
    let warnings = warnings.as_slice();
    let unknown = crate::cli::unknown_variables(std::env::vars().map(|(k, _)| k));
    if !unknown.is_empty() {
        for (v, hint) in unknown {
            match hint {
                Some(h) => eprintln!("error: unknown variable {v} (did you mean {h}?)"),
                None => eprintln!("error: unknown variable {v}"),
            }
        }
        eprintln!("error: invalid configuration: unset or correct the variables above");
        return ExitCode::from(2);
    }
    let accounts = match a.accounts.accounts() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        for w in warnings {
            eprintln!("warning: {w}");
        }
        return match NodeConfig::check_only(role, args) {
            Ok(notes) => {
                for n in notes {
                    println!("note: {n}");
                }
                println!("configuration OK ({} controller)", role.as_str());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: invalid configuration: {e}");
                ExitCode::from(2)
            }
        };
    }
    if args.print_config {
        for w in warnings {
            eprintln!("warning: {w}");
        }
        return match NodeConfig::resolve(role, args) {
            Ok(mut c) => {
                c.users.extend(accounts);
                println!(
                    "{}",
                    pdsno_shared::json::to_pretty_string(&pdsno_shared::json::Value::Object(
                        c.effective()
                    ))
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: invalid configuration: {e}");
                ExitCode::from(2)
            }
        };
    }
    let cfg = match NodeConfig::resolve(role, args) {
        Ok(mut c) => {
            c.users.extend(accounts);
            c
        }
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init_with(&cfg.log_level, cfg.log_json);
    crate::cmd::secrets::warn(warnings);
    tracing::info!(
        version = crate::cli::VERSION,
        role = role.as_str(),
        config = %args.config.as_ref().map_or("(none)".into(), |p| p.display().to_string()),
        data_dir = %cfg.data_dir.display(),
        "pdsno starting"
    );
    crate::runtime::block_on(async move {
        let cancel = crate::runtime::cancel_on_signal();
        match crate::node::run(cfg, cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // A revocation was logged at ERROR when it was proved; say it once.
                if !matches!(e, crate::node::NodeError::Revoked(_)) {
                    eprintln!("error: {e}");
                }
                ExitCode::from(e.exit_code())
            }
        }
    })
}
