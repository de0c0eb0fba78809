//! Subcommand implementations (one file per command family).

pub mod audit;
pub mod bench;
pub mod bench_work;
pub mod broker;
pub mod certs;
pub mod cli_docs;
pub mod demo;
mod demo_edge;
pub mod devices;
pub mod edge;
pub mod envelope_tools;
pub mod keys;
pub(crate) mod lab;
pub mod lockout;
pub mod ops;
pub mod output;
pub mod passwd;
pub mod secrets;
pub mod soak;
pub mod tier;
pub mod token;
