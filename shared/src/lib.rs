//! `pdsno-shared`: the language every pdsno controller speaks.
//!
//! - [`json`]: JSON exactly as Python reads and writes it, including the canonical form
//!   signatures cover;
//! - [`envelope`]: the one message model, kept byte-exact for relaying;
//! - [`signing`]: HMAC-SHA256 and Ed25519 envelope signatures and the ordered verifier;
//! - [`keys`]: key types that zeroize and never print, and the rotation key ring;
//! - [`replay`]: the bounded, durable-capable replay guard;
//! - [`payload`]: typed admission, discovery and policy payloads;
//! - [`topics`], [`ids`], [`time`], [`bootstrap`]: names, formats and tokens;
//! - [`slots`]: connection slots of a listener, counted per source address.
//!
//! This crate does no I/O: no sockets, no runtime, no files.

pub mod bootstrap;
pub mod envelope;
pub mod grpc;
pub mod ids;
pub mod json;
pub mod keys;
pub mod keyx;
pub mod payload;
pub mod replay;
pub mod signing;
pub mod slots;
pub mod time;
pub mod topics;

pub use envelope::{Envelope, MessageType};
pub use json::{Map, Value};
