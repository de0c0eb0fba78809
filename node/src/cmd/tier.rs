//! `pdsno global`, `pdsno regional`, `pdsno local`: run a controller.

use std::process::ExitCode;

use pdsno_shared::ids::Role;
use tokio_util::sync::CancellationToken;

use crate::config::{NodeArgs, NodeConfig};

/// Runs a controller of `role` until SIGINT/SIGTERM.
pub fn run(role: Role, args: &NodeArgs) -> ExitCode {
    if args.check_config {
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
    crate::logging::init();
    let cfg = match NodeConfig::resolve(role, args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    crate::runtime::block_on(async move {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            crate::runtime::shutdown_signal().await;
            c.cancel();
        });
        match crate::node::run(cfg, cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
