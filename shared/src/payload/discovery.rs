//! Discovery payloads (PROTOCOL.md §6).

use serde::{Deserialize, Serialize};

use crate::json::Map;

/// How a device was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMethod {
    /// Answered SNMP.
    Snmp,
    /// Answered ICMP echo (or a TCP probe).
    Icmp,
    /// Seen only in the ARP / neighbour table.
    Arp,
}

impl DiscoveryMethod {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveryMethod::Snmp => "snmp",
            DiscoveryMethod::Icmp => "icmp",
            DiscoveryMethod::Arp => "arp",
        }
    }
}

/// One device in a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// IPv4/IPv6 address.
    pub ip: String,
    /// MAC address, lower-case colon form (the device's identity).
    pub mac: String,
    /// ISO-8601 time it was last seen.
    pub last_seen: String,
    /// Protocol that found it (`ARP`, `icmp`, ...; free text in the original).
    pub protocol: String,
    /// Whether it answered a reachability probe.
    pub reachable: bool,
    /// Round-trip time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Host name (SNMP sysName or DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Vendor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Uptime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// Best method that reached it.
    pub discovery_method: DiscoveryMethod,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// A device that stopped answering.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InactiveDevice {
    /// MAC address.
    pub mac: String,
    /// Last known address.
    #[serde(default)]
    pub ip: String,
    /// Last known host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `DISCOVERY_REPORT` payload: the delta of one LC cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryReport {
    /// The reporting LC.
    pub lc_id: String,
    /// The scanned subnet (CIDR).
    pub subnet: String,
    /// The LC's region.
    pub region: String,
    /// ISO-8601 time of the cycle.
    pub timestamp: String,
    /// Devices seen for the first time.
    #[serde(default)]
    pub new_devices: Vec<Device>,
    /// Devices whose attributes changed.
    #[serde(default)]
    pub updated_devices: Vec<Device>,
    /// Devices that went inactive.
    #[serde(default)]
    pub inactive_devices: Vec<InactiveDevice>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `DISCOVERY_REPORT_ACK` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryReportAck {
    /// `"received"`.
    pub status: String,
    /// `len(new) + len(updated)`.
    pub devices_processed: u64,
    /// MACs another LC already claimed.
    pub collisions_detected: u64,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// `DISCOVERY_SUMMARY` payload: an RC's window of reports, for the GC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoverySummary {
    /// Unique id of this summary.
    pub summary_id: String,
    /// The RC.
    pub rc_id: String,
    /// Its region.
    pub region: String,
    /// Window start (ISO-8601).
    pub cycle_start: String,
    /// Window end (ISO-8601).
    pub cycle_end: String,
    /// New devices in the window.
    pub total_new: u64,
    /// Updated devices in the window.
    pub total_updated: u64,
    /// Devices gone inactive in the window.
    pub total_inactive: u64,
    /// Active devices in the region now.
    pub total_devices_in_region: u64,
    /// Anomalies flagged (`DISCOVERY_SPIKE`, `MAC_COLLISION`, ...).
    #[serde(default)]
    pub anomalies_flagged: Vec<crate::json::Value>,
    /// LCs that reported in the window.
    #[serde(default)]
    pub lcs_reported: Vec<String>,
    /// Admitted LCs that did not.
    #[serde(default)]
    pub lcs_missing: Vec<String>,
    /// Unknown fields, preserved (ours: `devices`, the changed device records).
    #[serde(flatten)]
    pub extra: Map,
}

/// `DISCOVERY_REQUEST` payload: ask an LC to scan now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryRequest {
    /// Unique id.
    pub request_id: String,
    /// `SCHEDULED`, `ON_DEMAND`, `BOOTSTRAP` or `RC_REQUESTED_OVERDUE`.
    pub trigger: String,
    /// Subnets to scan (empty: the LC's own).
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Protocols to use (empty: all).
    #[serde(default)]
    pub protocols: Vec<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Map,
}

/// Normalises a MAC address to lower-case colon form; `None` if it is not 6 octets.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let hex: String = mac.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let separators_ok = mac
        .chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-' | '.'));
    if hex.len() != 12 || !separators_ok {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    let parts: Vec<&str> = (0..6).filter_map(|i| lower.get(i * 2..i * 2 + 2)).collect();
    Some(parts.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;

    #[test]
    fn report_round_trips_with_optional_fields_absent() {
        let text = br#"{"lc_id":"local_cntl_zone-A_1","subnet":"10.0.0.0/24","region":"zone-A","timestamp":"2026-03-01T12:00:00+00:00","new_devices":[{"ip":"10.0.0.5","mac":"02:00:00:00:00:05","last_seen":"2026-03-01T12:00:00+00:00","protocol":"ARP","reachable":true,"rtt_ms":1.0,"discovery_method":"icmp","x":1}],"updated_devices":[],"inactive_devices":[{"mac":"02:00:00:00:00:06","ip":"10.0.0.6","hostname":null}]}"#;
        let v = json::parse(text).expect("json");
        let r: DiscoveryReport = json::from_value(v.clone()).expect("typed");
        assert_eq!(r.new_devices[0].discovery_method, DiscoveryMethod::Icmp);
        assert_eq!(r.new_devices[0].hostname, None);
        assert_eq!(json::to_value(&r).expect("value"), v);
    }

    #[test]
    fn mac_normalisation() {
        assert_eq!(
            normalize_mac("02-AB-cd-00-11-22").as_deref(),
            Some("02:ab:cd:00:11:22")
        );
        assert_eq!(
            normalize_mac("02ab.cd00.1122").as_deref(),
            Some("02:ab:cd:00:11:22")
        );
        assert_eq!(normalize_mac("02:ab:cd:00:11"), None);
        assert_eq!(normalize_mac("zz:ab:cd:00:11:22"), None);
    }
}
