//! Two tiers in process, joined by the in-process bus: a regional controller's receive path
//! (its tier table behind `Inbound`) and a local controller's parent link, outbound and
//! discovery. What crosses is signed, verified and refused exactly as over gRPC: the key
//! exchange and its rotation, heartbeats and liveness, discovery reports with their acks and
//! retries, the choice of path in `Outbound`, and a revocation proved by its signed notice.

use std::sync::Arc;
use std::time::Duration;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::IdentityKey;
use pdsno_shared::time::Clock;
use pdsno_shared::topics::Topic;
use tokio_util::sync::CancellationToken;

use super::table;
use super::tests::{Node, child_row, env, node_with};
use crate::discovery::lc::LocalDiscovery;
use crate::discovery::scanner::{SimulatedScanner, Subnet};
use crate::inbound::Inbound;
use crate::keys::exchange;
use crate::outbound::{Path, SendError};
use crate::transport::bus::Bus;
use crate::transport::parent::{LinkError, ParentLink};

const RC: &str = "regional_cntl_zone-A_1";
const LC: &str = "local_cntl_zone-A_1";
/// Nothing listens there: a request that leaves the bus fails to connect.
const RC_URL: &str = "http://127.0.0.1:1";

struct Pair {
    rc: Node,
    lc: Node,
    bus: Bus,
    rc_inbound: Option<Arc<Inbound>>,
}

impl Pair {
    /// An RC that admitted the LC (its key on record), its receive path on the bus.
    fn new() -> Pair {
        let rc_key = IdentityKey::generate();
        let rc_pub = rc_key.public();
        let lc_key = IdentityKey::generate();
        let lc_pub = lc_key.public();
        let rc = node_with(
            Role::Regional,
            RC,
            Some(("global_cntl_1", IdentityKey::generate().public())),
            rc_key,
        );
        let lc = node_with(Role::Local, LC, Some((RC, rc_pub)), lc_key);
        let mut row = child_row(LC, Role::Local, RC);
        row.public_key = Some(lc_pub.to_base64());
        rc.deps
            .trust
            .nib
            .register_descendant(&row, rc.clock.now())
            .expect("db")
            .expect("registered");
        let mut inbound = Inbound::new(rc.deps.trust.clone(), None, 10_000).expect("inbound");
        for (t, h) in table(&rc.deps) {
            inbound.register(t, h);
        }
        let inbound = Arc::new(inbound);
        let bus = Bus::new();
        bus.register(RC_URL, &inbound);
        Pair {
            rc,
            lc,
            bus,
            rc_inbound: Some(inbound),
        }
    }

    /// The LC's link to its RC, over the bus while the RC runs.
    fn link(&self) -> ParentLink {
        ParentLink::new(RC_URL).expect("url").over(Some(&self.bus))
    }

    /// A heartbeat from the LC, signed for the RC.
    fn heartbeat(&self, seq: u64) -> Envelope {
        let mut p = Map::new();
        p.insert("status".into(), "online".into());
        p.insert("seq".into(), seq.into());
        p.insert("interval_ms".into(), 1000u64.into());
        let mut e = env(MessageType::Heartbeat, LC, RC, p, &self.lc.clock);
        self.lc.deps.trust.sign_for(RC, &mut e);
        e
    }

    fn child_status(&self, key: &str) -> Option<Value> {
        let st = self.rc.deps.children.as_ref().expect("children").status();
        st.as_array()?
            .iter()
            .find(|c| c.get("controller_id").and_then(Value::as_str) == Some(LC))?
            .get(key)
            .cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_agreed_and_rotated_over_the_bus_and_heartbeats_use_them() {
    let p = Pair::new();
    let link = p.link();
    assert!(link.is_local());
    let rc_pub = p.rc.deps.trust.identity.public();
    let lc_trust = &p.lc.deps.trust;
    let first = exchange::initiate(lc_trust, &link, RC, &rc_pub, false)
        .await
        .expect("key exchange");
    assert_eq!(
        lc_trust.pair_keys.signing_key(RC).map(|(k, _)| k),
        Some(first.clone())
    );
    // A heartbeat signed with the new key: the RC confirms the key and records liveness,
    // naming the bus.
    let hb = p.heartbeat(1);
    assert_eq!(hb.key_id.as_deref(), Some(first.as_str()));
    link.exchange(&hb).await.expect("heartbeat accepted");
    assert_eq!(p.child_status("liveness"), Some("online".into()));
    assert_eq!(p.child_status("via"), Some("bus".into()));
    assert_eq!(p.child_status("last_key_id"), Some(first.clone().into()));
    // The same envelope again is a replay, refused as over gRPC.
    match link.exchange(&hb).await {
        Err(LinkError::Status { code, message }) => {
            assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
        }
        other => panic!("a replay was not refused: {other:?}"),
    }
    // Rotation: the next generation, and the heartbeats move to it.
    let second = exchange::initiate(lc_trust, &link, RC, &rc_pub, true)
        .await
        .expect("rotation");
    assert_ne!(first, second);
    let hb = p.heartbeat(2);
    assert_eq!(hb.key_id.as_deref(), Some(second.as_str()));
    link.exchange(&hb)
        .await
        .expect("heartbeat with the rotated key");
    assert_eq!(p.child_status("last_key_id"), Some(second.into()));
    // An answer from anyone but the RC is not taken: a key exchange signed for another
    // controller's key fails at the LC.
    let stranger = IdentityKey::generate().public();
    assert!(
        exchange::initiate(lc_trust, &link, RC, &stranger, false)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_prefers_the_bus_then_falls_back_to_grpc() {
    let mut p = Pair::new();
    let out = &p.lc.deps.outbound;
    out.add_peer(RC, p.link());
    // A message with a topic still goes over the bus to a co-located recipient.
    let topic = Topic::Status(LC.into());
    let sent = out
        .send(&p.heartbeat(1), Some(&topic))
        .await
        .expect("sent over the bus");
    assert_eq!(sent.path, Path::Bus);
    assert_eq!(out.stats.bus.load(std::sync::atomic::Ordering::Relaxed), 1);
    // No route at all for a recipient nobody registered.
    let mut e = env(
        MessageType::Heartbeat,
        LC,
        "regional_cntl_zone-B_1",
        Map::new(),
        &p.lc.clock,
    );
    p.lc.deps.trust.sign_identity(&mut e);
    assert!(matches!(
        out.send(&e, None).await,
        Err(SendError::NoRoute(_))
    ));
    // The RC stops: the same link leaves the bus and tries gRPC (nothing listens there).
    p.rc_inbound = None;
    let r = out.send(&p.heartbeat(2), Some(&topic)).await;
    match r {
        Err(SendError::Link(LinkError::Unavailable(_))) => {}
        other => panic!("expected a gRPC connection failure, got {other:?}"),
    }
    assert_eq!(
        out.stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(out.stats.bus.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_the_rc_once_and_wait_in_the_outbox_while_it_is_away() {
    let mut p = Pair::new();
    let lc = &p.lc.deps;
    let delivery = lc.local_delivery.clone().expect("delivery");
    let discovery = Arc::new(LocalDiscovery::new(
        lc.trust.clone(),
        Box::new(SimulatedScanner::new(
            Subnet::parse("10.9.0.0/24").expect("subnet"),
            7,
        )),
        Subnet::parse("10.9.0.0/24").expect("subnet"),
        RC.into(),
        "zone-A".into(),
        3,
        delivery.clone(),
        Arc::new(|| 0),
    ));
    // The RC is away (not on the bus, nothing at its gRPC address): the report waits.
    let away = Bus::new();
    lc.outbound
        .add_peer(RC, ParentLink::new(RC_URL).expect("url").over(Some(&away)));
    let cancel = CancellationToken::new();
    tokio::spawn(delivery.clone().run(cancel.clone()));
    let d = discovery.cycle().await.expect("cycle");
    assert!(!d.new.is_empty());
    let pending = |n: &Node| n.deps.trust.nib.outbox_pending(10).expect("outbox").len();
    // Tried (the cycle woke the delivery), failed, kept.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let queued = loop {
        let rows = lc.trust.nib.outbox_pending(10).expect("outbox");
        assert_eq!(rows.len(), 1, "kept while the RC is away");
        if rows[0].attempts >= 1 {
            break rows[0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "never tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        p.rc.deps
            .trust
            .nib
            .devices(Some(LC))
            .expect("devices")
            .is_empty()
    );
    // The RC is back on the bus: the report is delivered, acknowledged and removed.
    lc.outbound.add_peer(RC, p.link());
    delivery.wake();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending(&p.lc) > 0 {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored =
        p.rc.deps
            .trust
            .nib
            .devices(Some(LC))
            .expect("devices")
            .len();
    assert_eq!(stored, d.new.len());
    // The same report again (a retransmission whose ack was lost): acknowledged, not
    // applied twice.
    let applied_before = p.rc.deps.trust.nib.events(0, 1000).expect("events").len();
    lc.trust
        .nib
        .outbox_push(&queued.item, p.lc.clock.now())
        .expect("push");
    delivery.wake();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending(&p.lc) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy was not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        p.rc.deps
            .trust
            .nib
            .devices(Some(LC))
            .expect("devices")
            .len(),
        stored
    );
    assert_eq!(
        p.rc.deps.trust.nib.events(0, 1000).expect("events").len(),
        applied_before,
        "nothing new recorded for a duplicate"
    );
    cancel.cancel();
    p.rc_inbound = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_child_is_told_over_the_bus_with_a_notice_it_can_check() {
    let p = Pair::new();
    let link = p.link();
    link.exchange(&p.heartbeat(1)).await.expect("accepted");
    let children = p.rc.deps.children.clone().expect("children");
    children.revoke(LC).await.expect("revoke");
    let e = link
        .exchange(&p.heartbeat(2))
        .await
        .expect_err("a revoked child is refused");
    assert!(matches!(e, LinkError::Revoked { .. }), "{e:?}");
    // The LC checks the notice against its parent's key and stops.
    let stop = CancellationToken::new();
    let side = crate::node::workers::ParentSide {
        id: RC.into(),
        key: p.rc.deps.trust.identity.public(),
        link: link.clone(),
        revoked: Arc::new(crate::node::workers::Revoked::new(stop.clone())),
    };
    assert!(side.stop_if_revoked(LC, &e));
    assert!(stop.is_cancelled());
    // A notice checked against another key is not believed.
    let stop = CancellationToken::new();
    let fooled = crate::node::workers::ParentSide {
        key: IdentityKey::generate().public(),
        revoked: Arc::new(crate::node::workers::Revoked::new(stop.clone())),
        ..side
    };
    assert!(!fooled.stop_if_revoked(LC, &e));
    assert!(!stop.is_cancelled());
}
