//! `pdsno-node`: the controller behind the `pdsno` binary.
//!
//! Rooms: [`cli`] (argument parsing and dispatch), [`cmd`] (one file per subcommand
//! family), [`nib`] (the SQLite state store), [`transport`] (MQTT client; gRPC and REST
//! follow), [`runtime`] and [`logging`].

pub mod admin;
pub mod admission;
pub mod audit;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod credentials;
pub mod data_dir;
pub mod discovery;
pub mod guard;
pub mod identity;
pub mod inbound;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod nib;
pub mod node;
pub mod outbound;
pub mod policy;
pub mod report;
pub mod runtime;
pub mod tier;
pub mod tier_settings;
pub mod tls;
pub mod transport;
pub mod trust;
