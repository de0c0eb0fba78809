//! Structured logs via `tracing` (`RUST_LOG` selects what is shown).
//!
//! rumqttd logs routine events (every disconnect, every plain TCP probe) at ERROR, so it
//! is silenced unless `RUST_LOG` names it explicitly.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (stderr). Safe to call more than once.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if s.contains("rumqttd") => EnvFilter::new(s),
        Ok(s) => EnvFilter::new(format!("{s},rumqttd=off")),
        Err(_) => EnvFilter::new("info,rumqttd=off"),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
