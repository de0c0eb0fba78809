//! The tier layer in process: each tier's handler table, and what its handlers do with
//! messages from the right and the wrong sender (a real SQLite NIB in a temporary directory,
//! a manual clock, no sockets).

use std::sync::Arc;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::json::Map;
use pdsno_shared::keys::IdentityKey;
use pdsno_shared::time::{Clock, ManualClock};

use super::{Deps, table};
use crate::discovery::delivery::Delivery;
use crate::inbound::{Handler, HandlerReply, InboundError, Received};
use crate::keys::PairKeys;
use crate::nib::{ControllerRow, Nib};
use crate::node::children::Children;
use crate::node::workers::HeartbeatStats;
use crate::outbound::Outbound;
use crate::policy::Policy;
use crate::trust::Trust;

pub(super) struct Node {
    _dir: tempfile::TempDir,
    pub(super) deps: Deps,
    pub(super) clock: Arc<ManualClock>,
}

pub(super) fn node(role: Role, me: &str, parent: Option<&str>) -> Node {
    let parent_key = IdentityKey::generate().public();
    node_with(
        role,
        me,
        parent.map(|p| (p, parent_key)),
        IdentityKey::generate(),
    )
}

/// A node whose identity key is `identity` and whose parent has `parent`'s key.
pub(super) fn node_with(
    role: Role,
    me: &str,
    parent: Option<(&str, pdsno_shared::keys::PublicKey)>,
    identity: IdentityKey,
) -> Node {
    let dir = tempfile::tempdir().expect("tmp");
    let nib = Arc::new(Nib::open(dir.path().join("nib.db")).expect("nib"));
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let pair_keys =
        Arc::new(PairKeys::load(nib.clone(), chrono::Duration::minutes(10)).expect("keys"));
    let trust = Arc::new(Trust {
        me: me.into(),
        role,
        region: (role != Role::Global).then(|| "zone-A".to_owned()),
        identity: Arc::new(identity),
        network_key: None,
        pair_keys,
        nib,
        parent: parent.map(|(p, k)| (p.to_owned(), k)),
        clock: clock.clone(),
    });
    let parent = parent.map(|(p, _)| p);
    let outbound = Arc::new(Outbound::new());
    let policy = Arc::new(Policy::load(trust.clone()).expect("policy"));
    // The global controller issues broker credentials, as in a real node.
    let credentials = (role == Role::Global).then(|| {
        Arc::new(crate::credentials::MqttCredentials::load(trust.nib.clone()).expect("creds"))
    });
    let children = (role != Role::Local)
        .then(|| Arc::new(Children::new(trust.clone(), credentials, None, None, None)));
    let regional = (role == Role::Regional).then(|| {
        Arc::new(crate::discovery::rc::RegionalDiscovery::new(
            trust.clone(),
            "zone-A".into(),
            crate::nib::IngestLimits {
                spike_threshold: 100,
                max_devices_per_lc: 1000,
            },
        ))
    });
    let local_delivery =
        (role == Role::Local).then(|| Arc::new(Delivery::new(trust.clone(), outbound.clone())));
    Node {
        _dir: dir,
        deps: Deps {
            role,
            trust,
            parent_id: parent.map(str::to_owned),
            children,
            heartbeats: Arc::new(HeartbeatStats::default()),
            policy,
            outbound,
            regional,
            local_delivery,
        },
        clock,
    }
}

pub(super) fn child_row(id: &str, role: Role, validated_by: &str) -> ControllerRow {
    ControllerRow {
        controller_id: id.into(),
        role: role.as_str().into(),
        region: Some("zone-A".into()),
        status: "active".into(),
        temp_id: None,
        public_key: Some(IdentityKey::generate().public().to_base64()),
        certificate: None,
        validated_by: Some(validated_by.into()),
        validated_at: None,
        version: 0,
    }
}

pub(super) fn env(
    t: MessageType,
    from: &str,
    to: &str,
    payload: Map,
    clock: &ManualClock,
) -> Envelope {
    Envelope::new(t, from, to, payload, clock.now())
}

fn types(role: Role) -> Vec<MessageType> {
    let parent = match role {
        Role::Global => None,
        Role::Regional => Some("global_cntl_1"),
        Role::Local => Some("regional_cntl_zone-A_1"),
    };
    let n = node(role, "me", parent);
    let mut t: Vec<MessageType> = table(&n.deps).into_iter().map(|(t, _)| t).collect();
    t.sort_by_key(|t| t.as_str());
    t
}

#[tokio::test]
async fn each_tier_has_one_handler_per_message_type_it_receives() {
    use MessageType as T;
    let mut want = vec![
        T::KeyExchangeInit,
        T::KeyRotationRequest,
        T::Heartbeat,
        T::SyncRequest,
        T::DiscoverySummary,
    ];
    want.sort_by_key(|t| t.as_str());
    assert_eq!(types(Role::Global), want);
    let mut want = vec![
        T::KeyExchangeInit,
        T::KeyRotationRequest,
        T::Heartbeat,
        T::SyncRequest,
        T::PolicyUpdate,
        T::DiscoveryReport,
    ];
    want.sort_by_key(|t| t.as_str());
    assert_eq!(types(Role::Regional), want);
    let mut want = vec![
        T::KeyExchangeInit,
        T::KeyRotationRequest,
        T::Heartbeat,
        T::PolicyUpdate,
        T::DiscoveryReportAck,
    ];
    want.sort_by_key(|t| t.as_str());
    assert_eq!(types(Role::Local), want);
    // One handler per type: no type twice in a table.
    for role in [Role::Global, Role::Regional, Role::Local] {
        let t = types(role);
        let mut d = t.clone();
        d.dedup();
        assert_eq!(t, d, "{role:?}");
    }
}

/// Calls `h` as the receive path does for a message that came over gRPC.
fn call(h: &Handler, env: &Envelope) -> Result<HandlerReply, InboundError> {
    h(Received {
        env,
        transport: "grpc",
    })
}

fn handler(n: &Node, t: MessageType) -> Handler {
    table(&n.deps)
        .into_iter()
        .find(|(ty, _)| *ty == t)
        .map(|(_, h)| h)
        .expect("a handler")
}

#[tokio::test]
async fn heartbeats_from_the_parent_are_counted_and_children_must_be_ours() {
    let n = node(
        Role::Regional,
        "regional_cntl_zone-A_1",
        Some("global_cntl_1"),
    );
    let h = handler(&n, MessageType::Heartbeat);
    let c = &n.clock;
    // From the parent: counted as heard.
    let r = call(
        &h,
        &env(
            MessageType::Heartbeat,
            "global_cntl_1",
            "regional_cntl_zone-A_1",
            Map::new(),
            c,
        ),
    );
    assert!(matches!(r, Ok(HandlerReply::Accepted)));
    assert_eq!(
        n.deps
            .heartbeats
            .parent_heard
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // From a stranger: refused, whatever it claims.
    let stranger = env(
        MessageType::Heartbeat,
        "local_cntl_zone-A_9",
        "regional_cntl_zone-A_1",
        Map::new(),
        c,
    );
    assert!(matches!(
        call(&h, &stranger),
        Err(InboundError::Forbidden(_))
    ));
    // From a child this node admitted: its liveness is recorded.
    let nib = &n.deps.trust.nib;
    nib.register_descendant(
        &child_row("local_cntl_zone-A_1", Role::Local, "regional_cntl_zone-A_1"),
        c.now(),
    )
    .expect("db")
    .expect("registered");
    let mut p = Map::new();
    p.insert("status".into(), "online".into());
    p.insert("seq".into(), 1u64.into());
    let from_child = env(
        MessageType::Heartbeat,
        "local_cntl_zone-A_1",
        "regional_cntl_zone-A_1",
        p,
        c,
    );
    // Carried over REST: the liveness says so (not "grpc" for every direct heartbeat).
    let over_rest = h(Received {
        env: &from_child,
        transport: "rest",
    });
    assert!(matches!(over_rest, Ok(HandlerReply::Accepted)));
    let status = pdsno_shared::json::to_canonical_string(
        &n.deps.children.as_ref().expect("children").status(),
    );
    assert!(status.contains(r#""via":"rest""#), "{status}");
    let children = n.deps.children.as_ref().expect("children");
    let summary =
        pdsno_shared::json::to_canonical_string(&children.summary_for_parent(&Default::default()));
    assert!(summary.contains("local_cntl_zone-A_1"), "{summary}");
    // A local controller has no children: a heartbeat from anyone but its parent is refused.
    let lc = node(
        Role::Local,
        "local_cntl_zone-A_1",
        Some("regional_cntl_zone-A_1"),
    );
    let h = handler(&lc, MessageType::Heartbeat);
    let r = call(
        &h,
        &env(
            MessageType::Heartbeat,
            "local_cntl_zone-A_2",
            "local_cntl_zone-A_1",
            Map::new(),
            &lc.clock,
        ),
    );
    assert!(matches!(r, Err(InboundError::Forbidden(_))));
}

#[tokio::test]
async fn a_policy_is_answered_to_active_children_only() {
    let n = node(Role::Global, "global_cntl_1", None);
    n.deps.policy.ensure_default().expect("default policy");
    let h = handler(&n, MessageType::SyncRequest);
    let mut p = Map::new();
    p.insert("kind".into(), "policy".into());
    let ask = |from: &str| {
        call(
            &h,
            &env(
                MessageType::SyncRequest,
                from,
                "global_cntl_1",
                p.clone(),
                &n.clock,
            ),
        )
    };
    assert!(matches!(
        ask("regional_cntl_zone-A_1"),
        Err(InboundError::Forbidden(_))
    ));
    n.deps
        .trust
        .nib
        .register_descendant(
            &child_row("regional_cntl_zone-A_1", Role::Regional, "global_cntl_1"),
            n.clock.now(),
        )
        .expect("db")
        .expect("registered");
    match ask("regional_cntl_zone-A_1") {
        Ok(HandlerReply::Reply(MessageType::SyncResponse, m)) => {
            assert_eq!(m.get("kind").and_then(|k| k.as_str()), Some("policy"));
            let policy = m.get("policy").expect("policy");
            assert!(
                policy.get("signature").is_some(),
                "a signed policy: {policy:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // An unknown kind is a bad request, not a crash.
    let mut odd = Map::new();
    odd.insert("kind".into(), "something".into());
    let r = call(
        &h,
        &env(
            MessageType::SyncRequest,
            "regional_cntl_zone-A_1",
            "global_cntl_1",
            odd,
            &n.clock,
        ),
    );
    assert!(matches!(r, Err(InboundError::BadRequest(_))), "{r:?}");
}

#[tokio::test]
async fn report_acks_come_from_the_parent_only_and_name_a_report() {
    let n = node(
        Role::Local,
        "local_cntl_zone-A_1",
        Some("regional_cntl_zone-A_1"),
    );
    let h = handler(&n, MessageType::DiscoveryReportAck);
    let mut p = Map::new();
    p.insert("report_id".into(), "rpt-1".into());
    let forged = env(
        MessageType::DiscoveryReportAck,
        "regional_cntl_zone-B_1",
        "local_cntl_zone-A_1",
        p.clone(),
        &n.clock,
    );
    assert!(matches!(call(&h, &forged), Err(InboundError::Forbidden(_))));
    let empty = env(
        MessageType::DiscoveryReportAck,
        "regional_cntl_zone-A_1",
        "local_cntl_zone-A_1",
        Map::new(),
        &n.clock,
    );
    assert!(matches!(call(&h, &empty), Err(InboundError::BadRequest(_))));
    let ok = env(
        MessageType::DiscoveryReportAck,
        "regional_cntl_zone-A_1",
        "local_cntl_zone-A_1",
        p,
        &n.clock,
    );
    assert!(matches!(call(&h, &ok), Ok(HandlerReply::Accepted)));
}

#[tokio::test]
async fn a_policy_not_signed_by_the_parent_is_refused() {
    let n = node(
        Role::Local,
        "local_cntl_zone-A_1",
        Some("regional_cntl_zone-A_1"),
    );
    let h = handler(&n, MessageType::PolicyUpdate);
    let before = n.deps.policy.version();
    // Signed by a key that is not the parent's.
    let mut p = Map::new();
    p.insert("policy_version".into(), 7u64.into());
    let mut e = env(
        MessageType::PolicyUpdate,
        "regional_cntl_zone-A_1",
        "local_cntl_zone-A_1",
        p,
        &n.clock,
    );
    pdsno_shared::signing::sign_ed25519(&mut e, &IdentityKey::generate(), None, n.clock.now());
    assert!(matches!(call(&h, &e), Err(InboundError::Forbidden(_))));
    assert_eq!(n.deps.policy.version(), before);
}

#[tokio::test]
async fn a_grandchild_is_not_a_child() {
    // The global controller knows the local controllers its regional controllers admitted,
    // but they talk to their own parent: their heartbeats and policy requests are refused
    // here.
    let n = node(Role::Global, "global_cntl_1", None);
    let nib = &n.deps.trust.nib;
    for (id, role, by) in [
        ("regional_cntl_zone-A_1", Role::Regional, "global_cntl_1"),
        ("local_cntl_zone-A_1", Role::Local, "regional_cntl_zone-A_1"),
    ] {
        nib.register_descendant(&child_row(id, role, by), n.clock.now())
            .expect("db")
            .expect("registered");
    }
    assert!(n.deps.trust.is_child("regional_cntl_zone-A_1"));
    assert!(!n.deps.trust.is_child("local_cntl_zone-A_1"));
    let hb = handler(&n, MessageType::Heartbeat);
    let from = |id: &str, t: MessageType, p: Map| env(t, id, "global_cntl_1", p, &n.clock);
    assert!(matches!(
        call(
            &hb,
            &from("local_cntl_zone-A_1", MessageType::Heartbeat, Map::new())
        ),
        Err(InboundError::Forbidden(_))
    ));
    assert!(matches!(
        call(
            &hb,
            &from("regional_cntl_zone-A_1", MessageType::Heartbeat, Map::new())
        ),
        Ok(HandlerReply::Accepted)
    ));
    let sync = handler(&n, MessageType::SyncRequest);
    let mut p = Map::new();
    p.insert("kind".into(), "policy".into());
    assert!(matches!(
        call(
            &sync,
            &from("local_cntl_zone-A_1", MessageType::SyncRequest, p)
        ),
        Err(InboundError::Forbidden(_))
    ));
}
