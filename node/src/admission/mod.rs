//! Controller admission: the parent's [`authority`] and the child's [`child`] handshake.

pub mod authority;
pub mod child;

pub use authority::{
    AdmissionError, Authority, AuthorityConfig, IssuerChain, RequestOutcome, reason,
};
