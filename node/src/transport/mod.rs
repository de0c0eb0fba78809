//! Transports: they own bytes and sockets; tiers see only verified envelopes.

pub mod bus;
pub mod grpc;
pub mod listen;
pub mod metrics_http;
pub mod mqtt;
pub mod parent;
pub mod rest;
