//! A parent's view of its children: liveness from heartbeats, MQTT credentials (the GC
//! issues them; an RC asks the GC on behalf of its local controllers), and revocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use pdsno_broker::BrokerControl;
use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::PublicKey;
use pdsno_shared::keyx;
use pdsno_shared::payload::admission::Certificate;
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::Verifier;
use pdsno_shared::signing::VerifyError;
use pdsno_shared::time::{format_iso, parse_iso};

use crate::credentials::MqttCredentials;
use crate::inbound::{HandlerReply, InboundError};
use crate::keys::exchange::CredentialSource;
use crate::nib::{ControllerRow, Event};
use crate::transport::parent::ParentLink;
use crate::trust::Trust;

/// Wrap purpose of a credential relayed from the GC to an RC for one of its LCs.
fn relay_purpose(controller_id: &str) -> String {
    format!("mqtt|{controller_id}")
}

/// What we know about a child's liveness.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Signing time of the newest heartbeat.
    pub last_seen: Option<DateTime<Utc>>,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// The key id the last heartbeat was signed with.
    pub last_key_id: Option<String>,
    /// `online` or `offline` as the child last said (or its last will).
    pub said: Option<String>,
    /// The child's process session (a new one at each start).
    pub session: Option<String>,
    /// The newest heartbeat sequence number of that session.
    pub seq: u64,
    /// The child's heartbeat interval.
    pub interval_ms: Option<u64>,
    /// The policy version the child runs.
    pub policy_version: Option<u64>,
    /// Active devices the child knows of.
    pub devices: Option<u64>,
    /// A regional controller's own report of its children.
    pub children: Option<Value>,
    /// How the newest heartbeat came (`mqtt` or `grpc`).
    pub via: &'static str,
    /// What we last printed for it (to print transitions only).
    reported: Option<&'static str>,
}

/// The heartbeat interval a child may announce is taken within these bounds (0.1 s .. 1 day).
const MIN_INTERVAL_MS: u64 = 100;
const MAX_INTERVAL_MS: u64 = 86_400_000;

impl Liveness {
    /// `online`, `offline` (said so, or its last will), `stale` (silent for three
    /// intervals), or `unknown` (never heard).
    pub fn state(&self, now: DateTime<Utc>) -> &'static str {
        let Some(seen) = self.last_seen else {
            return "unknown";
        };
        if self.said.as_deref() == Some("offline") {
            return "offline";
        }
        let interval = self
            .interval_ms
            .unwrap_or(10_000)
            .clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
        // Both bounded: no overflow whatever a child announced.
        let limit =
            chrono::Duration::milliseconds(interval as i64 * 3) + chrono::Duration::seconds(1);
        if now.signed_duration_since(seen) > limit {
            "stale"
        } else {
            "online"
        }
    }

    fn absorb(&mut self, env: &Envelope, via: &'static str) {
        let p = &env.payload;
        let at = env.signed_at.as_deref().and_then(|t| parse_iso(t).ok());
        if let Some(t) = at
            && self.last_seen.is_none_or(|s| t > s)
        {
            self.last_seen = Some(t);
        }
        self.heartbeats += 1;
        self.last_key_id = env.key_id.clone();
        self.via = via;
        let num = |k: &str| p.get(k).and_then(Value::as_u64);
        if let Some(s) = p.get("status").and_then(Value::as_str) {
            self.said = Some(if s == "offline" { "offline" } else { "online" }.into());
        }
        if let Some(session) = p.get("session").and_then(Value::as_str) {
            self.session = Some(session.to_owned());
        }
        if let Some(n) = num("seq") {
            self.seq = n;
        }
        if let Some(n) = num("interval_ms") {
            self.interval_ms = Some(n.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS));
        }
        if let Some(n) = num("policy_version") {
            self.policy_version = Some(n);
        }
        if let Some(n) = num("devices") {
            self.devices = Some(n);
        }
        if let Some(c) = p.get("children") {
            self.children = Some(c.clone());
        }
    }
}

/// What became of a status message.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusOutcome {
    /// Taken into account.
    Recorded,
    /// Not newer than what we know (a retained copy, a re-delivery, an old will).
    Ignored,
    /// Not from one of our children: none of our business.
    NotMine,
}

/// The parent side of a node (GC or RC).
pub struct Children {
    trust: Arc<Trust>,
    liveness: Mutex<HashMap<String, Liveness>>,
    credentials: Option<Arc<MqttCredentials>>,
    broker: Option<BrokerControl>,
    mqtt_url: Option<String>,
    parent: Option<ParentLink>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("me", &self.trust.me)
            .finish_non_exhaustive()
    }
}

fn sync_payload(kind: &str, controller_id: &str) -> Map {
    let mut m = Map::new();
    m.insert("kind".into(), kind.into());
    m.insert("controller_id".into(), controller_id.into());
    m
}

impl Children {
    /// The parent side of `trust`'s node. The GC passes its credential store, broker and
    /// advertised MQTT URL; an RC passes the link to the GC.
    pub fn new(
        trust: Arc<Trust>,
        credentials: Option<Arc<MqttCredentials>>,
        broker: Option<BrokerControl>,
        mqtt_url: Option<String>,
        parent: Option<ParentLink>,
    ) -> Self {
        Children {
            trust,
            liveness: Mutex::new(HashMap::new()),
            credentials,
            broker,
            mqtt_url,
            parent,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Liveness>> {
        self.liveness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// HEARTBEAT from a child over gRPC or REST (already verified, fresh, not a replay).
    ///
    /// # Errors
    /// [`InboundError::Forbidden`] from anyone but an active child.
    pub fn heartbeat(
        &self,
        env: &Envelope,
        transport: &'static str,
    ) -> Result<HandlerReply, InboundError> {
        if !self.trust.is_child(&env.sender_id) {
            return Err(InboundError::Forbidden(format!(
                "{} is not an active child of this controller",
                env.sender_id
            )));
        }
        let mut g = self.live();
        let l = g.entry(env.sender_id.clone()).or_default();
        // A restart shows as a new session; within one, only newer heartbeats count.
        let session = env.payload.get("session").and_then(Value::as_str);
        let seq = env.payload.get("seq").and_then(Value::as_u64).unwrap_or(0);
        if session.is_some() && session == l.session.as_deref() && seq <= l.seq && seq > 0 {
            return Ok(HandlerReply::Accepted);
        }
        l.absorb(env, transport);
        Ok(HandlerReply::Accepted)
    }

    /// A message on `pdsno/status/{id}` (published, retained, or the broker's last will).
    /// Only its authenticity is checked here — a retained heartbeat or a will is old by
    /// nature — and ordering does the rest: within a session only a higher `seq` counts, a
    /// will (`offline`) counts only for the session it was made in, and staleness is judged
    /// from the signing time.
    ///
    /// # Errors
    /// The verification failure (the caller counts it).
    pub fn on_status(&self, env: &Envelope) -> Result<StatusOutcome, VerifyError> {
        // Direct children only: a grandchild's status is its own parent's business (and
        // signed with keys we do not share).
        if !self.trust.is_child(&env.sender_id) {
            return Ok(StatusOutcome::NotMine);
        }
        if env.message_type != MessageType::Heartbeat {
            return Ok(StatusOutcome::Ignored);
        }
        self.trust.authenticate(env, Some(&env.sender_id))?;
        let now = self.trust.clock.now();
        let p = &env.payload;
        let session = p.get("session").and_then(Value::as_str).map(str::to_owned);
        let seq = p.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let offline = p.get("status").and_then(Value::as_str) == Some("offline");
        let mut g = self.live();
        let l = g.entry(env.sender_id.clone()).or_default();
        let same_session = session.is_some() && session == l.session;
        if offline {
            // A will from an earlier life of the process says nothing about this one.
            if l.session.is_some() && !same_session {
                return Ok(StatusOutcome::Ignored);
            }
        } else if same_session && seq <= l.seq {
            return Ok(StatusOutcome::Ignored);
        } else if !same_session
            && let (Some(t), Some(seen)) = (
                env.signed_at.as_deref().and_then(|t| parse_iso(t).ok()),
                l.last_seen,
            )
            && t <= seen
        {
            // An older session's retained heartbeat arriving after a newer one.
            return Ok(StatusOutcome::Ignored);
        }
        l.absorb(env, "mqtt");
        drop(g);
        self.report_transitions(now);
        Ok(StatusOutcome::Recorded)
    }

    /// Prints `liveness id=ID state=STATE` when a child's state changes (the demo and
    /// operators watch these); returns the children whose state changed.
    pub fn report_transitions(&self, now: DateTime<Utc>) -> Vec<(String, &'static str)> {
        let mut changed = Vec::new();
        for (id, l) in self.live().iter_mut() {
            let state = l.state(now);
            if l.reported != Some(state) {
                l.reported = Some(state);
                changed.push((id.clone(), state));
            }
        }
        changed.sort();
        for (id, state) in &changed {
            crate::report::emit(&crate::report::Report::Liveness {
                id: id.clone(),
                state: state.to_string(),
            });
            tracing::info!(child = %id, state, "child liveness changed");
        }
        changed
    }

    /// Liveness of every child seen.
    pub fn liveness(&self) -> HashMap<String, Liveness> {
        self.live().clone()
    }

    /// SYNC_REQUEST (GC): an RC asks for, or withdraws, the MQTT credential of one of its
    /// local controllers.
    ///
    /// # Errors
    /// An [`InboundError`] for the transport.
    pub fn sync(&self, env: &Envelope) -> Result<HandlerReply, InboundError> {
        let kind = env
            .payload
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let target = env
            .payload
            .get("controller_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let rc = self
            .trust
            .nib
            .controller(&env.sender_id)
            .map_err(|e| InboundError::Unavailable(e.to_string()))?;
        let Some(rc) = rc.filter(|r| r.status == "active" && r.role == Role::Regional.as_str())
        else {
            return Err(InboundError::Forbidden(
                "only an active regional controller may ask this".into(),
            ));
        };
        let Some(creds) = &self.credentials else {
            return Err(InboundError::NoHandler(MessageType::SyncRequest));
        };
        match kind {
            "mqtt_credential" => {
                let cert: Certificate = json::from_value(
                    env.payload
                        .get("certificate")
                        .cloned()
                        .unwrap_or(Value::Null),
                )
                .map_err(|e| InboundError::BadRequest(format!("certificate: {e}")))?;
                let rc_key = rc
                    .public_key
                    .as_deref()
                    .and_then(|k| PublicKey::from_base64(k).ok())
                    .ok_or_else(|| InboundError::Unavailable("no key for the RC".into()))?;
                cert.verify(&rc_key, self.trust.clock.now())
                    .map_err(|e| InboundError::Forbidden(format!("certificate: {e}")))?;
                if cert.assigned_id != target
                    || cert.role != Role::Local.as_str()
                    || Some(cert.region.as_str()) != rc.region.as_deref()
                    || cert.issued_by != rc.controller_id
                {
                    return Err(InboundError::Forbidden(
                        "the certificate is not for a local controller of this RC's region".into(),
                    ));
                }
                let (key_id, key) = self
                    .trust
                    .pair_keys
                    .signing_key(&env.sender_id)
                    .ok_or_else(|| {
                        InboundError::Unavailable("no pairwise key with this RC yet".into())
                    })?;
                let row = ControllerRow {
                    controller_id: target.clone(),
                    role: Role::Local.as_str().into(),
                    region: Some(cert.region.clone()),
                    status: "active".into(),
                    temp_id: None,
                    public_key: Some(cert.public_key.clone()),
                    certificate: json::to_value(&cert).ok().map(|v| v.to_string()),
                    validated_by: Some(rc.controller_id.clone()),
                    validated_at: None,
                    version: 0,
                };
                if let Err(rebind) = self
                    .trust
                    .nib
                    .register_descendant(&row, self.trust.clock.now())
                    .map_err(|e| InboundError::Unavailable(e.to_string()))?
                {
                    tracing::warn!(rc = %env.sender_id, controller = %target, error = %rebind, "refused to re-bind a controller id");
                    return Err(InboundError::Forbidden(format!(
                        "controller id not re-bound: {rebind}"
                    )));
                }
                let secret = creds
                    .issue(&target)
                    .map_err(|e| InboundError::Unavailable(e.to_string()))?;
                let mut m = sync_payload(kind, &target);
                m.insert("key_id".into(), key_id.clone().into());
                m.insert(
                    "credential".into(),
                    keyx::wrap(&key, &key_id, &relay_purpose(&target), &secret).into(),
                );
                if let Some(u) = &self.mqtt_url {
                    m.insert("mqtt_url".into(), u.clone().into());
                }
                Ok(HandlerReply::Reply(MessageType::SyncResponse, m))
            }
            "revoke_mqtt_credential" => {
                let row = self
                    .trust
                    .nib
                    .controller(&target)
                    .map_err(|e| InboundError::Unavailable(e.to_string()))?;
                let Some(row) = row else {
                    // Never registered here (it never asked for a broker credential):
                    // nothing to revoke.
                    let mut m = sync_payload(kind, &target);
                    m.insert("revoked".into(), false.into());
                    return Ok(HandlerReply::Reply(MessageType::SyncResponse, m));
                };
                if row.validated_by.as_deref() != Some(env.sender_id.as_str()) {
                    return Err(InboundError::Forbidden(
                        "not a controller of this RC".into(),
                    ));
                }
                let revoked = self
                    .revoke_local(&target, &format!("revoked by {}", env.sender_id))
                    .map_err(InboundError::Unavailable)?;
                let mut m = sync_payload(kind, &target);
                m.insert("revoked".into(), revoked.into());
                Ok(HandlerReply::Reply(MessageType::SyncResponse, m))
            }
            other => Err(InboundError::BadRequest(format!(
                "unknown SYNC_REQUEST kind {other:?}"
            ))),
        }
    }

    /// Revokes `id` here: status, blocklist, keys, credential, live MQTT session, its
    /// devices; and everything it vouched for (the controllers it validated, which a
    /// global controller knows as descendants), since their certificates lead to it.
    fn revoke_local(&self, id: &str, why: &str) -> Result<bool, String> {
        let revoked = self.revoke_one(id, why)?;
        if revoked {
            let below: Vec<String> = self
                .trust
                .nib
                .controllers()
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|r| r.validated_by.as_deref() == Some(id) && r.status != "revoked")
                .map(|r| r.controller_id)
                .collect();
            let why = format!("its validating controller {id} was revoked");
            for child in below {
                self.revoke_one(&child, &why)?;
            }
        }
        Ok(revoked)
    }

    fn revoke_one(&self, id: &str, why: &str) -> Result<bool, String> {
        let nib = &self.trust.nib;
        let now = self.trust.clock.now();
        let Some(row) = nib.controller(id).map_err(|e| e.to_string())? else {
            return Ok(false);
        };
        if row.status != "revoked" {
            match nib
                .set_controller_status(id, "revoked", row.version)
                .map_err(|e| e.to_string())?
            {
                Ok(_) => {}
                Err(c) => return Err(c.to_string()),
            }
        }
        nib.block(id, why, now).map_err(|e| e.to_string())?;
        if let Some(pk) = &row.public_key {
            nib.block(pk, why, now).map_err(|e| e.to_string())?;
        }
        self.trust
            .pair_keys
            .remove_peer(id)
            .map_err(|e| e.to_string())?;
        if let Some(c) = &self.credentials {
            c.revoke(id).map_err(|e| e.to_string())?;
        }
        let kicked = self.broker.as_ref().map_or(0, |b| b.disconnect(id));
        self.live().remove(id);
        // What it reported is no longer vouched for: retired, and free for the controller
        // that really sees it.
        let retired = nib.retire_devices_of(id, now).map_err(|e| e.to_string())?;
        let mut details = Map::new();
        details.insert("reason".into(), why.into());
        details.insert("mqtt_sessions_closed".into(), (kicked as u64).into());
        details.insert("devices_retired".into(), (retired as u64).into());
        let ev = Event {
            event_type: "CONTROLLER_REVOKED".into(),
            actor: self.trust.me.clone(),
            subject: Some(id.to_owned()),
            action: "Revoked a controller".into(),
            decision: Some("REVOKED".into()),
            details,
        };
        nib.append_event(&ev, &self.trust.identity, now)
            .map_err(|e| e.to_string())?;
        tracing::warn!(controller = %id, sessions_closed = kicked, "controller revoked");
        Ok(true)
    }

    /// Operator command: revoke a child (and, for an RC's local controller, its GC
    /// credential).
    ///
    /// # Errors
    /// A message for the operator.
    pub async fn revoke(self: &Arc<Self>, id: &str) -> Result<Value, String> {
        let row = self
            .trust
            .nib
            .controller(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no controller {id} here"))?;
        if row.validated_by.as_deref() != Some(self.trust.me.as_str()) {
            return Err(format!(
                "{id} was admitted by {}; revoke it there",
                row.validated_by.unwrap_or_default()
            ));
        }
        let me = self.clone();
        let idc = id.to_owned();
        let local =
            tokio::task::spawn_blocking(move || me.revoke_local(&idc, "revoked by an operator"))
                .await
                .map_err(|e| e.to_string())??;
        let mut gc_credential = Value::Null;
        if let Some(link) = &self.parent {
            // Tell the GC to withdraw the broker credential it issued for this LC.
            let mut env = Envelope::new(
                MessageType::SyncRequest,
                self.trust.me.clone(),
                self.parent_id(),
                sync_payload("revoke_mqtt_credential", id),
                self.trust.clock.now(),
            );
            self.trust.sign_for(&self.parent_id(), &mut env);
            let reply = link
                .exchange(&env)
                .await
                .map_err(|e| format!("revoked here, but the GC did not confirm: {e}"))?;
            gc_credential = reply
                .and_then(|r| r.payload.get("revoked").cloned())
                .unwrap_or(Value::Null);
        }
        let mut m = Map::new();
        m.insert("revoked".into(), local.into());
        m.insert("controller_id".into(), id.into());
        m.insert("gc_credential_revoked".into(), gc_credential);
        Ok(Value::Object(m))
    }

    fn parent_id(&self) -> String {
        self.trust
            .parent
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_default()
    }

    /// Status of every child, for operators.
    pub fn status(&self) -> Value {
        let now = self.trust.clock.now();
        let live = self.liveness();
        let rows = self.trust.nib.controllers().unwrap_or_default();
        let v: Vec<Value> = rows
            .into_iter()
            .map(|r| {
                let l = live.get(&r.controller_id).cloned().unwrap_or_default();
                let mut m = Map::new();
                m.insert("controller_id".into(), r.controller_id.clone().into());
                m.insert("role".into(), r.role.into());
                m.insert("region".into(), r.region.into());
                m.insert("status".into(), r.status.clone().into());
                m.insert("validated_by".into(), r.validated_by.into());
                m.insert("heartbeats".into(), l.heartbeats.into());
                m.insert("last_heartbeat".into(), l.last_seen.map(format_iso).into());
                m.insert(
                    "last_heartbeat_age_ms".into(),
                    l.last_seen.map(|t| (now - t).num_milliseconds()).into(),
                );
                m.insert("last_key_id".into(), l.last_key_id.clone().into());
                let state = if r.status == "active" {
                    l.state(now)
                } else {
                    "revoked"
                };
                m.insert("liveness".into(), state.into());
                m.insert("via".into(), (!l.via.is_empty()).then_some(l.via).into());
                m.insert("policy_version".into(), l.policy_version.into());
                m.insert("devices".into(), l.devices.into());
                if let Some(c) = l.children {
                    m.insert("children".into(), c);
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(v)
    }

    /// A compact view of the direct children for our own heartbeat (an RC tells the GC
    /// about its local controllers this way): id, liveness, policy version, devices.
    pub fn summary_for_parent(&self, devices_by_lc: &HashMap<String, u64>) -> Value {
        let now = self.trust.clock.now();
        let live = self.liveness();
        let rows = self.trust.nib.controllers().unwrap_or_default();
        Value::Array(
            rows.into_iter()
                .filter(|r| r.validated_by.as_deref() == Some(self.trust.me.as_str()))
                .map(|r| {
                    let l = live.get(&r.controller_id).cloned().unwrap_or_default();
                    let mut m = Map::new();
                    let state = if r.status == "active" {
                        l.state(now)
                    } else {
                        "revoked"
                    };
                    m.insert(
                        "devices".into(),
                        devices_by_lc
                            .get(&r.controller_id)
                            .copied()
                            .or(l.devices)
                            .into(),
                    );
                    m.insert("controller_id".into(), r.controller_id.into());
                    m.insert("liveness".into(), state.into());
                    m.insert("policy_version".into(), l.policy_version.into());
                    m.insert(
                        "last_heartbeat_age_ms".into(),
                        l.last_seen.map(|t| (now - t).num_milliseconds()).into(),
                    );
                    Value::Object(m)
                })
                .collect(),
        )
    }
}

impl CredentialSource for Children {
    fn credential_for(&self, controller_id: &str) -> Result<([u8; 32], Option<String>), String> {
        if let Some(c) = &self.credentials {
            let s = c.issue(controller_id).map_err(|e| e.to_string())?;
            return Ok((s, self.mqtt_url.clone()));
        }
        let Some(link) = &self.parent else {
            return Err("no global controller to ask".into());
        };
        let cert = self
            .trust
            .nib
            .controller(controller_id)
            .map_err(|e| e.to_string())?
            .and_then(|r| r.certificate)
            .ok_or_else(|| format!("no certificate for {controller_id}"))?;
        let cert = json::parse(cert.as_bytes()).map_err(|e| e.to_string())?;
        let gc = self.parent_id();
        let mut payload = sync_payload("mqtt_credential", controller_id);
        payload.insert("certificate".into(), cert);
        let mut env = Envelope::new(
            MessageType::SyncRequest,
            self.trust.me.clone(),
            gc.clone(),
            payload,
            self.trust.clock.now(),
        );
        self.trust.sign_for(&gc, &mut env);
        // Called from a blocking thread of the runtime: wait for the network call here.
        let reply = tokio::runtime::Handle::current()
            .block_on(link.exchange(&env))
            .map_err(|e| e.to_string())?
            .ok_or("the GC sent no credential")?;
        let verifier = Verifier::new(MemoryNonceStore::new());
        self.trust
            .verify(&verifier, &reply, None, Some(&gc))
            .map_err(|e| e.to_string())?;
        let key_id = reply
            .payload
            .get("key_id")
            .and_then(Value::as_str)
            .ok_or("no key_id")?;
        let wrapped = reply
            .payload
            .get("credential")
            .and_then(Value::as_str)
            .ok_or("no credential")?;
        let key = self
            .trust
            .pair_keys
            .key_by_id(&gc, key_id)
            .ok_or_else(|| format!("unknown key {key_id}"))?;
        let secret = keyx::unwrap(&key, key_id, &relay_purpose(controller_id), wrapped)
            .map_err(|e| e.to_string())?;
        Ok((
            *secret,
            reply
                .payload
                .get("mqtt_url")
                .and_then(Value::as_str)
                .map(str::to_owned),
        ))
    }
}
