//! Transports: they own bytes and sockets; tiers see only verified envelopes.

pub mod mqtt;
