//! Subcommand implementations (one file per command family).

pub mod bench;
pub mod broker;
pub mod demo;
pub mod envelope_tools;
pub mod keys;
pub mod ops;
pub mod tier;
pub mod token;
