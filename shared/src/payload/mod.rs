//! Typed payloads. Every struct keeps unknown fields in `extra`, so reading a payload into
//! its type and writing it back loses nothing.

pub mod admission;
pub mod discovery;
pub mod policy;
