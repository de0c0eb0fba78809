//! Policy payloads (PROTOCOL.md §5, DESIGN.md "Trust model").
//!
//! Ours: a policy has an integer `policy_version` that only grows, so "older never replaces
//! newer" is a comparison, and the GC signs every `POLICY_UPDATE` with its Ed25519 key. An
//! RC republishing for its region embeds the GC-signed envelope under `origin`, so an LC can
//! check provenance as well as the RC's own signature.

use serde::{Deserialize, Serialize};

use crate::json::{Map, Value};

/// `POLICY_UPDATE` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyUpdate {
    /// Stable policy id (`global`).
    pub policy_id: String,
    /// Monotonic version.
    pub policy_version: u64,
    /// `global` or `regional`.
    pub scope: String,
    /// For a regional republish, the region.
    #[serde(default)]
    pub target_region: Option<String>,
    /// The policy document.
    pub content: Map,
    /// Who published this copy.
    pub distributed_by: String,
    /// ISO-8601 time it takes effect.
    pub valid_from: String,
    /// On a regional republish: the GC-signed `POLICY_UPDATE` envelope, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Value>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `POLICY_ACK` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyAck {
    /// The policy.
    pub policy_id: String,
    /// The version applied.
    pub policy_version: u64,
    /// `applied` or `ignored_stale`.
    pub status: String,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}
