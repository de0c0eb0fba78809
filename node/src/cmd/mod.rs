//! Subcommand implementations (one file per command family).

pub mod broker;
pub mod envelope_tools;
