//! Identifier formats (PROTOCOL.md §1, upstream notes §1.2) and controller id parsing.
//!
//! Assigned controller ids are `{type}_cntl_{region}_{seq}` (`regional_cntl_zone-A_1`); the
//! global controller is `global_cntl_1`. Roles are read from the id's structure, never from a
//! substring search (the original's "contains 'global'" rule let `temp-global-x` pass as GC).

use std::fmt;

use rand::RngExt;
use serde::{Deserialize, Serialize};

/// The id of the global controller.
pub const GLOBAL_CONTROLLER_ID: &str = "global_cntl_1";

/// Longest region name accepted.
pub const MAX_REGION_LEN: usize = 64;
/// Longest temporary or assigned controller id accepted.
pub const MAX_CONTROLLER_ID_LEN: usize = 128;

fn random_hex(n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// A fresh `msg-` + 12 lowercase hex id.
pub fn message_id() -> String {
    format!("msg-{}", random_hex(6))
}

/// A fresh `challenge-` + 12 lowercase hex id.
pub fn challenge_id() -> String {
    format!("challenge-{}", random_hex(6))
}

/// A fresh `event-` + 12 lowercase hex id.
pub fn event_id() -> String {
    format!("event-{}", random_hex(6))
}

/// A fresh 64-hex nonce (32 random bytes).
pub fn nonce_hex() -> String {
    random_hex(32)
}

/// 32 fresh random bytes.
pub fn random_bytes_32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::rng().fill(&mut b[..]);
    b
}

/// True for `msg-` followed by 12 lowercase hex digits.
pub fn is_message_id(s: &str) -> bool {
    s.strip_prefix("msg-")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// True for exactly 64 lowercase or uppercase hex digits.
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A controller tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The global controller (root of trust).
    Global,
    /// A regional controller (one per zone).
    Regional,
    /// A local controller (one per subnet).
    Local,
}

impl Role {
    /// `"global"`, `"regional"` or `"local"` (the `controller_type` wire value).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Global => "global",
            Role::Regional => "regional",
            Role::Local => "local",
        }
    }

    /// Parses the wire value.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "global" => Some(Role::Global),
            "regional" => Some(Role::Regional),
            "local" => Some(Role::Local),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An assigned controller id, taken apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ControllerId {
    /// The tier.
    pub role: Role,
    /// The region (`None` for the global controller).
    pub region: Option<String>,
    /// The sequence number the parent assigned.
    pub seq: u64,
}

impl ControllerId {
    /// The id the parent assigns: `{role}_cntl_{region}_{seq}`.
    pub fn assigned(role: Role, region: &str, seq: u64) -> String {
        format!("{}_cntl_{region}_{seq}", role.as_str())
    }

    /// Takes an assigned id apart; `None` for temporary ids and anything else.
    ///
    /// `global_cntl_{n}` is global; `regional_cntl_{region}_{n}` and
    /// `local_cntl_{region}_{n}` carry a region, which may itself contain `_`.
    pub fn parse(id: &str) -> Option<ControllerId> {
        if id.len() > MAX_CONTROLLER_ID_LEN {
            return None;
        }
        let parse_seq = |s: &str| -> Option<u64> {
            if s.is_empty()
                || s.len() > 19
                || !s.bytes().all(|b| b.is_ascii_digit())
                || s.starts_with('0')
            {
                return None;
            }
            s.parse().ok()
        };
        if let Some(seq) = id.strip_prefix("global_cntl_") {
            return Some(ControllerId {
                role: Role::Global,
                region: None,
                seq: parse_seq(seq)?,
            });
        }
        let (role, rest) = if let Some(r) = id.strip_prefix("regional_cntl_") {
            (Role::Regional, r)
        } else if let Some(r) = id.strip_prefix("local_cntl_") {
            (Role::Local, r)
        } else {
            return None;
        };
        let (region, seq) = rest.rsplit_once('_')?;
        if !is_valid_region(region) {
            return None;
        }
        Some(ControllerId {
            role,
            region: Some(region.to_owned()),
            seq: parse_seq(seq)?,
        })
    }
}

/// A region name usable in ids and MQTT topics: 1..=64 characters from `[A-Za-z0-9_.-]`.
///
/// MQTT wildcards (`+`, `#`), `/` and control characters would let a region name escape its
/// topic, so they are refused everywhere a region is accepted.
pub fn is_valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= MAX_REGION_LEN
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A controller id (temporary or assigned) usable in topics and keys: 1..=128 characters
/// from `[A-Za-z0-9_.-]`.
pub fn is_valid_controller_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CONTROLLER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The pairwise key id of two controllers: `key_{min}_{max}` in string order.
pub fn pair_key_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("key_{lo}_{hi}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_the_wire_formats() {
        let m = message_id();
        assert!(is_message_id(&m), "{m}");
        assert_ne!(message_id(), m);
        assert!(challenge_id().starts_with("challenge-"));
        assert_eq!(challenge_id().len(), "challenge-".len() + 12);
        assert!(event_id().starts_with("event-"));
        assert!(is_hex64(&nonce_hex()));
        assert!(!is_message_id("msg-0123456789AB"));
        assert!(!is_message_id("msg-0123456789a"));
    }

    #[test]
    fn controller_ids_parse_structurally() {
        assert_eq!(
            ControllerId::parse("regional_cntl_zone-A_1"),
            Some(ControllerId {
                role: Role::Regional,
                region: Some("zone-A".into()),
                seq: 1
            })
        );
        assert_eq!(
            ControllerId::parse("local_cntl_zone_with_underscores_42"),
            Some(ControllerId {
                role: Role::Local,
                region: Some("zone_with_underscores".into()),
                seq: 42
            })
        );
        assert_eq!(
            ControllerId::parse(GLOBAL_CONTROLLER_ID),
            Some(ControllerId {
                role: Role::Global,
                region: None,
                seq: 1
            })
        );
        for bad in [
            "temp-rc-zone-a-001",
            "regional_cntl_zone-A_",
            "regional_cntl__1",
            "regional_cntl_zone-A_01",
            "regional_cntl_zone/A_1",
            "regional_cntl_zone+A_1",
            "local_cntl_zone-A_x",
            "global_cntl_",
            "xglobal_cntl_1",
        ] {
            assert_eq!(ControllerId::parse(bad), None, "{bad}");
        }
        assert_eq!(
            ControllerId::assigned(Role::Local, "zone-A", 3),
            "local_cntl_zone-A_3"
        );
    }

    #[test]
    fn pair_key_id_matches_the_vector() {
        assert_eq!(
            pair_key_id("temp-rc-zone-a-001", "global_cntl_1"),
            "key_global_cntl_1_temp-rc-zone-a-001"
        );
        assert_eq!(pair_key_id("a", "b"), pair_key_id("b", "a"));
    }

    #[test]
    fn regions_and_ids_cannot_escape_topics() {
        assert!(is_valid_region("zone-A"));
        for bad in ["", "a/b", "a+b", "a#", "zone A", "é", &"z".repeat(65)] {
            assert!(!is_valid_region(bad), "{bad}");
        }
        assert!(is_valid_controller_id("temp-rc-zone-a-001"));
        assert!(!is_valid_controller_id("x/y"));
    }
}
