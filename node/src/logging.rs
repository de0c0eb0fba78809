//! Structured logs via `tracing` (`RUST_LOG` selects what is shown).
//!
//! rumqttd logs routine events (every disconnect, every plain TCP probe) at ERROR, so it
//! is silenced unless `RUST_LOG` names it explicitly.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (stderr) at level `info`. Safe to call more than once.
pub fn init() {
    init_with("info", false);
}

/// Installs the global subscriber (stderr): `level` is the filter when `RUST_LOG` is not
/// set (or empty); `json` writes one JSON object a line. Safe to call more than once.
pub fn init_with(level: &str, json: bool) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = if spec.contains("rumqttd") {
        EnvFilter::new(spec)
    } else {
        EnvFilter::new(format!("{spec},rumqttd=off"))
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
