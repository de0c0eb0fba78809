//! Subcommand implementations (one file per command family).

pub mod envelope_tools;
