//! MQTT topic names and who may speak on them (PROTOCOL.md §5).
//!
//! Every receiver checks ownership on the signed envelope: a message is accepted only if its
//! `sender_id` owns the topic it arrived on. The embedded broker also enforces these rights
//! per connection ([`may_publish_on`], [`may_subscribe`]); with an external broker,
//! `deploy/` ships an ACL file expressing the same rules.

use std::fmt;

use crate::ids::{self, ControllerId, Role};

/// Root of every pdsno topic.
pub const ROOT: &str = "pdsno";

/// A pdsno topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `pdsno/discovery/{region}/{lc_id}`: LC → RC, QoS 1.
    Discovery {
        /// The LC's region.
        region: String,
        /// The reporting LC.
        lc_id: String,
    },
    /// `pdsno/policy/global`: GC → all RCs, QoS 1, retained.
    PolicyGlobal,
    /// `pdsno/policy/{region}`: RC → its LCs, QoS 1, retained.
    PolicyRegion(String),
    /// `pdsno/events/system`: any → monitoring, QoS 0.
    EventsSystem,
    /// `pdsno/events/{region}`: any in the region → monitoring, QoS 0.
    EventsRegion(String),
    /// `pdsno/status/{controller_id}`: heartbeat and last will, QoS 0, retained.
    Status(String),
    /// Ours: `pdsno/reply/{controller_id}`: answers to what that controller published
    /// (e.g. the regional controller's `DISCOVERY_REPORT_ACK` to a local controller), QoS 1,
    /// not retained. Only the named controller's parent or children may publish there.
    Reply(String),
}

/// MQTT delivery settings for a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// QoS level (0, 1 or 2).
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

impl Topic {
    /// Parses a concrete topic name; `None` for anything outside the pdsno tree, malformed
    /// segments, or wildcards.
    pub fn parse(name: &str) -> Option<Topic> {
        let mut parts = name.split('/');
        if parts.next()? != ROOT {
            return None;
        }
        let kind = parts.next()?;
        let a = parts.next();
        let b = parts.next();
        if parts.next().is_some() {
            return None;
        }
        match (kind, a, b) {
            ("discovery", Some(region), Some(lc))
                if ids::is_valid_region(region) && ids::is_valid_controller_id(lc) =>
            {
                Some(Topic::Discovery {
                    region: region.to_owned(),
                    lc_id: lc.to_owned(),
                })
            }
            ("policy", Some("global"), None) => Some(Topic::PolicyGlobal),
            ("policy", Some(region), None) if ids::is_valid_region(region) => {
                Some(Topic::PolicyRegion(region.to_owned()))
            }
            ("events", Some("system"), None) => Some(Topic::EventsSystem),
            ("events", Some(region), None) if ids::is_valid_region(region) => {
                Some(Topic::EventsRegion(region.to_owned()))
            }
            ("status", Some(id), None) if ids::is_valid_controller_id(id) => {
                Some(Topic::Status(id.to_owned()))
            }
            ("reply", Some(id), None) if ids::is_valid_controller_id(id) => {
                Some(Topic::Reply(id.to_owned()))
            }
            _ => None,
        }
    }

    /// QoS and retain flag of PROTOCOL.md §5.
    pub fn delivery(&self) -> Delivery {
        match self {
            Topic::Discovery { .. } | Topic::Reply(_) => Delivery {
                qos: 1,
                retain: false,
            },
            Topic::PolicyGlobal | Topic::PolicyRegion(_) => Delivery {
                qos: 1,
                retain: true,
            },
            Topic::EventsSystem | Topic::EventsRegion(_) => Delivery {
                qos: 0,
                retain: false,
            },
            Topic::Status(_) => Delivery {
                qos: 0,
                retain: true,
            },
        }
    }

    /// Whether `sender_id` may publish on this topic.
    ///
    /// - discovery: only the LC named in the topic, and only if its id places it in the
    ///   topic's region;
    /// - global policy: only the global controller;
    /// - regional policy: only a regional controller of that region;
    /// - system events: any assigned controller;
    /// - regional events: any controller of that region (or the global controller);
    /// - status: only the controller named in the topic;
    /// - reply: only a controller the named one talks to: its parent or its children (the
    ///   global controller and any regional controller; a regional controller and the local
    ///   controllers of its region). The node itself answers only one way (a regional
    ///   controller acknowledging a local controller's discovery report); the rule is the
    ///   tier link so that both ends of a link can answer each other, and nobody else.
    pub fn may_publish(&self, sender_id: &str) -> bool {
        let sender = ControllerId::parse(sender_id);
        let in_region = |region: &str| {
            sender
                .as_ref()
                .is_some_and(|s| s.region.as_deref() == Some(region))
        };
        match self {
            Topic::Discovery { region, lc_id } => {
                lc_id == sender_id
                    && sender.as_ref().is_some_and(|s| s.role == Role::Local)
                    && in_region(region)
            }
            Topic::PolicyGlobal => sender.as_ref().is_some_and(|s| s.role == Role::Global),
            Topic::PolicyRegion(region) => {
                sender.as_ref().is_some_and(|s| s.role == Role::Regional) && in_region(region)
            }
            Topic::EventsSystem => sender.is_some(),
            Topic::EventsRegion(region) => {
                in_region(region) || sender.as_ref().is_some_and(|s| s.role == Role::Global)
            }
            Topic::Status(id) => id == sender_id,
            Topic::Reply(id) => match (sender, ControllerId::parse(id)) {
                (Some(s), Some(to)) => linked(&s, &to),
                _ => false,
            },
        }
    }
}

/// Whether `a` and `b` are the two ends of a tier link: the global controller and a
/// regional controller, or a regional controller and a local controller of its region.
fn linked(a: &ControllerId, b: &ControllerId) -> bool {
    match (a.role, b.role) {
        (Role::Global, Role::Regional) | (Role::Regional, Role::Global) => true,
        (Role::Regional, Role::Local) | (Role::Local, Role::Regional) => {
            a.region.is_some() && a.region == b.region
        }
        _ => false,
    }
}

/// Whether a message on the MQTT topic `name` may be retained: only the topics PROTOCOL.md
/// §5 marks retained (`pdsno/policy/global`, `pdsno/policy/{region}`,
/// `pdsno/status/{controller_id}`). Discovery reports, events and replies never are, and
/// nothing outside the pdsno tree is a pdsno topic at all.
pub fn may_retain_on(name: &str) -> bool {
    Topic::parse(name).is_some_and(|t| t.delivery().retain)
}

/// Whether `name` lies in the pdsno topic tree (`pdsno` or below it).
pub fn in_pdsno_tree(name: &str) -> bool {
    name == ROOT
        || name
            .strip_prefix(ROOT)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether an MQTT client id looks like a controller's (`global_cntl_…`, `regional_cntl_…`,
/// `local_cntl_…`): a broker reserves such ids for the controller's own credential, so
/// that no other account can take over (and end) a controller's session.
pub fn is_controller_client_id(client_id: &str) -> bool {
    ["global_cntl_", "regional_cntl_", "local_cntl_"]
        .iter()
        .any(|p| client_id.starts_with(p))
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Discovery { region, lc_id } => write!(f, "{ROOT}/discovery/{region}/{lc_id}"),
            Topic::PolicyGlobal => write!(f, "{ROOT}/policy/global"),
            Topic::PolicyRegion(r) => write!(f, "{ROOT}/policy/{r}"),
            Topic::EventsSystem => write!(f, "{ROOT}/events/system"),
            Topic::EventsRegion(r) => write!(f, "{ROOT}/events/{r}"),
            Topic::Status(id) => write!(f, "{ROOT}/status/{id}"),
            Topic::Reply(id) => write!(f, "{ROOT}/reply/{id}"),
        }
    }
}

/// The filter an RC subscribes to for its LCs' reports: `pdsno/discovery/{region}/+`.
pub fn discovery_filter(region: &str) -> String {
    format!("{ROOT}/discovery/{region}/+")
}

/// The filter for every controller's status: `pdsno/status/+`.
pub fn status_filter() -> String {
    format!("{ROOT}/status/+")
}

/// Whether an MQTT topic `name` matches `filter` (`+` one level, `#` the rest, MQTT 3.1.1
/// §4.7; `$`-topics are not matched by filters starting with a wildcard).
pub fn filter_matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return f.next().is_none(),
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `filter` is a well-formed MQTT topic filter (wildcards occupy whole levels, `#`
/// only last, not empty).
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains('+') && !other.contains('#'),
    })
}

/// Whether every topic `filter` can match is also matched by `pattern` (both MQTT filters):
/// `pdsno/status/+` covers `pdsno/status/x` and itself, not `pdsno/status/#` or `pdsno/#`.
pub fn filter_covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return p.next().is_none(),
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(pl), Some(fl)) if pl == fl && fl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The filters a controller may subscribe to (PROTOCOL.md §5, the same rules as the ACL
/// file in `deploy/mosquitto`): the global controller reads everything; every controller
/// reads all statuses and the answers addressed to it; a regional controller also reads its
/// region's discovery reports, events and policy and the global policy; a local controller
/// its region's policy. Any filter covered by one of these is allowed.
pub fn subscribe_rights(controller_id: &str) -> Vec<String> {
    let Some(id) = ControllerId::parse(controller_id) else {
        return Vec::new();
    };
    let mut v = vec![
        status_filter(),
        Topic::Reply(controller_id.to_owned()).to_string(),
    ];
    match (id.role, id.region) {
        (Role::Global, _) => return vec!["#".to_owned()],
        (Role::Regional, Some(r)) => {
            v.push(discovery_filter(&r));
            v.push(Topic::PolicyGlobal.to_string());
            v.push(Topic::PolicyRegion(r.clone()).to_string());
            v.push(Topic::EventsRegion(r).to_string());
        }
        (Role::Local, Some(r)) => v.push(Topic::PolicyRegion(r).to_string()),
        _ => return Vec::new(),
    }
    v
}

/// Whether `controller_id` may subscribe to `filter` (a shared subscription
/// `$share/{group}/{filter}` is judged by its filter).
pub fn may_subscribe(controller_id: &str, filter: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((_, f)) => f,
            None => return false,
        },
        None => filter,
    };
    subscribe_rights(controller_id)
        .iter()
        .any(|p| filter_covers(p, filter))
}

/// Whether `controller_id` may publish on the MQTT topic `name`: a pdsno topic it owns
/// ([`Topic::may_publish`]); nothing outside the pdsno tree.
pub fn may_publish_on(controller_id: &str, name: &str) -> bool {
    Topic::parse(name).is_some_and(|t| t.may_publish(controller_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let all = [
            Topic::Discovery {
                region: "zone-A".into(),
                lc_id: "local_cntl_zone-A_1".into(),
            },
            Topic::PolicyGlobal,
            Topic::PolicyRegion("zone-A".into()),
            Topic::EventsSystem,
            Topic::EventsRegion("zone-A".into()),
            Topic::Status("regional_cntl_zone-A_1".into()),
            Topic::Reply("local_cntl_zone-A_1".into()),
        ];
        for t in all {
            assert_eq!(Topic::parse(&t.to_string()), Some(t.clone()), "{t}");
        }
        assert_eq!(
            Topic::Discovery {
                region: "zone-A".into(),
                lc_id: "local_cntl_zone-A_1".into()
            }
            .to_string(),
            "pdsno/discovery/zone-A/local_cntl_zone-A_1"
        );
        for bad in [
            "",
            "pdsno",
            "pdsno/discovery/zone-A",
            "pdsno/discovery/zone-A/+",
            "other/policy/global",
            "pdsno/policy/global/x",
            "pdsno/status/a/b",
            "pdsno/policy/#",
            "pdsno/unknown/x",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn delivery_follows_the_protocol_table() {
        assert_eq!(
            Topic::PolicyGlobal.delivery(),
            Delivery {
                qos: 1,
                retain: true
            }
        );
        assert_eq!(
            Topic::Status("x".into()).delivery(),
            Delivery {
                qos: 0,
                retain: true
            }
        );
        assert_eq!(
            Topic::Discovery {
                region: "r".into(),
                lc_id: "l".into()
            }
            .delivery(),
            Delivery {
                qos: 1,
                retain: false
            }
        );
        assert_eq!(
            Topic::EventsSystem.delivery(),
            Delivery {
                qos: 0,
                retain: false
            }
        );
    }

    #[test]
    fn ownership_rules() {
        let lc1 = "local_cntl_zone-A_1";
        let lc2 = "local_cntl_zone-A_2";
        let lc_b = "local_cntl_zone-B_1";
        let rc = "regional_cntl_zone-A_1";
        let gc = "global_cntl_1";
        let disc = Topic::Discovery {
            region: "zone-A".into(),
            lc_id: lc1.into(),
        };
        assert!(disc.may_publish(lc1));
        assert!(!disc.may_publish(lc2), "another LC's topic");
        assert!(!disc.may_publish(rc));
        let wrong_region = Topic::Discovery {
            region: "zone-A".into(),
            lc_id: lc_b.into(),
        };
        assert!(
            !wrong_region.may_publish(lc_b),
            "an LC of zone-B on zone-A's tree"
        );
        assert!(Topic::PolicyGlobal.may_publish(gc));
        assert!(!Topic::PolicyGlobal.may_publish(rc));
        assert!(!Topic::PolicyGlobal.may_publish("temp-global-x"));
        assert!(Topic::PolicyRegion("zone-A".into()).may_publish(rc));
        assert!(!Topic::PolicyRegion("zone-B".into()).may_publish(rc));
        assert!(!Topic::PolicyRegion("zone-A".into()).may_publish(lc1));
        assert!(Topic::Status(lc1.into()).may_publish(lc1));
        assert!(!Topic::Status(lc1.into()).may_publish(lc2));
        assert!(Topic::EventsSystem.may_publish(lc1));
        assert!(!Topic::EventsSystem.may_publish("temp-x"));
        assert!(Topic::EventsRegion("zone-A".into()).may_publish(lc1));
        assert!(Topic::EventsRegion("zone-A".into()).may_publish(gc));
        assert!(!Topic::EventsRegion("zone-A".into()).may_publish(lc_b));
        assert!(Topic::Reply(lc1.into()).may_publish(rc));
        assert!(!Topic::Reply(lc1.into()).may_publish(lc1), "not to itself");
        assert!(
            !Topic::Reply(lc1.into()).may_publish("temp-x"),
            "unassigned"
        );
    }

    #[test]
    fn replies_go_only_along_tier_links() {
        let lc1 = "local_cntl_zone-A_1";
        let lc2 = "local_cntl_zone-A_2";
        let lc_b = "local_cntl_zone-B_1";
        let rc = "regional_cntl_zone-A_1";
        let rc_b = "regional_cntl_zone-B_1";
        let gc = "global_cntl_1";
        for (from, to) in [
            (rc, lc1),
            (rc, lc2),
            (lc1, rc),
            (gc, rc),
            (rc, gc),
            (gc, rc_b),
        ] {
            assert!(Topic::Reply(to.into()).may_publish(from), "{from} -> {to}");
        }
        for (from, to) in [
            (lc1, lc2),
            (lc1, lc1),
            (lc_b, rc),
            (rc_b, lc1),
            (rc, lc_b),
            (lc1, gc),
            (gc, lc1),
            (rc, rc_b),
            (gc, gc),
            ("temp-x", lc1),
            (rc, "temp-x"),
        ] {
            assert!(!Topic::Reply(to.into()).may_publish(from), "{from} -> {to}");
        }
        assert!(!may_publish_on(lc1, &format!("pdsno/reply/{lc2}")));
    }

    #[test]
    fn only_the_retained_topics_of_the_protocol_may_be_retained() {
        for t in [
            "pdsno/policy/global",
            "pdsno/policy/zone-A",
            "pdsno/status/local_cntl_zone-A_1",
        ] {
            assert!(may_retain_on(t), "{t}");
        }
        for t in [
            "pdsno/discovery/zone-A/local_cntl_zone-A_1",
            "pdsno/events/system",
            "pdsno/events/zone-A",
            "pdsno/reply/local_cntl_zone-A_1",
            "pdsno/status/+",
            "pdsno",
            "other/topic",
        ] {
            assert!(!may_retain_on(t), "{t}");
        }
        assert!(in_pdsno_tree("pdsno") && in_pdsno_tree("pdsno/x/y"));
        assert!(!in_pdsno_tree("pdsnox/y") && !in_pdsno_tree("other/pdsno"));
    }

    #[test]
    fn controller_client_ids_are_recognised() {
        for id in [
            "global_cntl_1",
            "regional_cntl_zone-A_1",
            "local_cntl_x",
            "local_cntl_",
        ] {
            assert!(is_controller_client_id(id), "{id}");
        }
        for id in ["mon-1", "ops", "temp-rc-1", "xglobal_cntl_1", "GLOBAL-CNTL"] {
            assert!(!is_controller_client_id(id), "{id}");
        }
    }

    #[test]
    fn filters() {
        assert!(filter_matches(
            "pdsno/discovery/zone-A/+",
            "pdsno/discovery/zone-A/local_cntl_zone-A_1"
        ));
        assert!(!filter_matches(
            "pdsno/discovery/zone-A/+",
            "pdsno/discovery/zone-B/x"
        ));
        assert!(!filter_matches(
            "pdsno/discovery/zone-A/+",
            "pdsno/discovery/zone-A/x/y"
        ));
        assert!(filter_matches("pdsno/#", "pdsno/policy/global"));
        assert!(filter_matches("pdsno/#", "pdsno"));
        assert!(filter_matches("#", "a/b"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("pdsno/policy/global", "pdsno/policy/global"));
        assert!(!filter_matches("pdsno/policy", "pdsno/policy/global"));
        assert!(is_valid_filter("pdsno/+/x/#"));
        assert!(!is_valid_filter("pdsno/#/x"));
        assert!(!is_valid_filter("pdsno/a+"));
        assert!(!is_valid_filter(""));
    }

    #[test]
    fn filter_coverage() {
        for (p, f) in [
            ("pdsno/status/+", "pdsno/status/+"),
            ("pdsno/status/+", "pdsno/status/local_cntl_zone-A_1"),
            ("pdsno/#", "pdsno/#"),
            ("pdsno/#", "pdsno"),
            ("pdsno/#", "pdsno/status/+"),
            ("pdsno/#", "pdsno/+/x/#"),
            ("#", "anything/at/all"),
            ("pdsno/policy/global", "pdsno/policy/global"),
        ] {
            assert!(filter_covers(p, f), "{p} covers {f}");
        }
        for (p, f) in [
            ("pdsno/status/+", "pdsno/status/#"),
            ("pdsno/status/+", "pdsno/#"),
            ("pdsno/status/+", "pdsno/+/x"),
            ("pdsno/status/+", "pdsno/status"),
            ("pdsno/status/+", "pdsno/status/a/b"),
            ("pdsno/policy/global", "pdsno/policy/+"),
            ("pdsno/policy/global", "pdsno/policy/global/#"),
            ("pdsno/x/#", "pdsno/+/y"),
        ] {
            assert!(!filter_covers(p, f), "{p} must not cover {f}");
        }
    }

    #[test]
    fn subscription_rights_per_tier() {
        let gc = "global_cntl_1";
        let rc = "regional_cntl_zone-A_1";
        let lc = "local_cntl_zone-A_1";
        for f in [
            "#",
            "pdsno/#",
            "pdsno/discovery/+/+",
            "$share/g/pdsno/status/+",
        ] {
            assert!(may_subscribe(gc, f), "{f}");
        }
        for f in [
            "pdsno/discovery/zone-A/+",
            "pdsno/discovery/zone-A/local_cntl_zone-A_3",
            "pdsno/policy/global",
            "pdsno/policy/zone-A",
            "pdsno/status/+",
            "pdsno/reply/regional_cntl_zone-A_1",
            "pdsno/events/zone-A",
            "$share/rcs/pdsno/discovery/zone-A/+",
        ] {
            assert!(may_subscribe(rc, f), "RC may read {f}");
        }
        for f in [
            "#",
            "pdsno/#",
            "pdsno/discovery/zone-B/+",
            "pdsno/discovery/+/+",
            "pdsno/reply/+",
            "pdsno/reply/regional_cntl_zone-A_2",
            "pdsno/policy/zone-B",
            "pdsno/policy/+",
            "$share/x",
            "other/topic",
        ] {
            assert!(!may_subscribe(rc, f), "RC may not read {f}");
        }
        for f in [
            "pdsno/policy/zone-A",
            "pdsno/reply/local_cntl_zone-A_1",
            "pdsno/status/+",
        ] {
            assert!(may_subscribe(lc, f), "LC may read {f}");
        }
        for f in [
            "pdsno/policy/global",
            "pdsno/discovery/zone-A/+",
            "pdsno/discovery/zone-A/local_cntl_zone-A_1",
            "pdsno/reply/local_cntl_zone-A_2",
            "pdsno/events/zone-A",
        ] {
            assert!(!may_subscribe(lc, f), "LC may not read {f}");
        }
        assert!(
            !may_subscribe("temp-rc-1", "pdsno/status/+"),
            "no assigned id, no rights"
        );
    }

    #[test]
    fn publish_rights_follow_topic_ownership() {
        let lc = "local_cntl_zone-A_1";
        assert!(may_publish_on(
            lc,
            "pdsno/discovery/zone-A/local_cntl_zone-A_1"
        ));
        assert!(may_publish_on(lc, "pdsno/status/local_cntl_zone-A_1"));
        assert!(may_publish_on(lc, "pdsno/events/zone-A"));
        assert!(may_publish_on(lc, "pdsno/reply/regional_cntl_zone-A_1"));
        for t in [
            "pdsno/discovery/zone-A/local_cntl_zone-A_2",
            "pdsno/status/regional_cntl_zone-A_1",
            "pdsno/policy/zone-A",
            "pdsno/policy/global",
            "pdsno/events/zone-B",
            "elsewhere",
        ] {
            assert!(!may_publish_on(lc, t), "LC may not publish {t}");
        }
        assert!(may_publish_on("global_cntl_1", "pdsno/policy/global"));
        assert!(!may_publish_on(
            "regional_cntl_zone-A_1",
            "pdsno/policy/global"
        ));
        assert!(may_publish_on(
            "regional_cntl_zone-A_1",
            "pdsno/policy/zone-A"
        ));
    }
}
