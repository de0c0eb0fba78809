//! Policy propagation: the global controller authors versioned policies and signs each
//! `POLICY_UPDATE` with its Ed25519 key; a regional controller checks it against the GC key
//! it pinned at admission, keeps it, and republishes it for its region signed with its own
//! key and carrying the GC's envelope verbatim under `origin`; a local controller checks
//! both signatures (its parent's, and the GC's against the root key of its chain) before it
//! applies the policy. Versions only grow: an older or equal version is ignored, which
//! also makes retained copies and re-deliveries harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::ids::{GLOBAL_CONTROLLER_ID, Role};
use pdsno_shared::json::{self, Map, Value};
use pdsno_shared::keys::PublicKey;
use pdsno_shared::payload::policy::PolicyUpdate;
use pdsno_shared::signing::{self, ED25519, VerifyKeys};
use pdsno_shared::time::format_iso;
use pdsno_shared::topics::Topic;

use crate::nib::{Event, NibError, StateKey};
use crate::trust::Trust;

/// The id of the one policy the global controller authors.
pub const POLICY_ID: &str = "global";
/// Where a regional controller keeps its republished copy.
const REGIONAL_ID: &str = "regional";
/// Recipient of broadcasts.
pub const BROADCAST: &str = "broadcast";

/// Why a policy message was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not from whom it must come, or a signature does not verify.
    #[error("policy refused: {0}")]
    Untrusted(String),
    /// Not a valid `POLICY_UPDATE`.
    #[error("invalid policy update: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] NibError),
}

/// What happened to a policy message.
#[derive(Debug, PartialEq)]
pub enum PolicyOutcome {
    /// Stored (and applied, at a local controller). A regional controller also returns
    /// the copy it must republish for its region.
    Applied {
        /// The new version.
        version: u64,
        /// For a regional controller: its signed regional copy.
        republish: Option<Box<Envelope>>,
    },
    /// Not newer than what we have.
    Stale {
        /// Its version.
        version: u64,
        /// Ours.
        current: u64,
    },
}

/// The defaults a global controller starts with (the original's policy template).
pub fn default_content() -> Map {
    let text = r#"{
        "validation": {"timestamp_freshness_seconds": 300, "challenge_timeout_seconds": 30,
                       "bootstrap_token_single_use": true},
        "approval": {"LOW": "local_controller", "MEDIUM": "regional_controller",
                     "HIGH": "global_controller"},
        "execution": {"token_validity_minutes": 15, "pre_execution_backup": true,
                      "verification_required": true},
        "rollback": {"automatic_on_failure": true, "keep_backup_count": 10,
                     "backup_retention_days": 30},
        "rate_limiting": {"api_requests_per_minute": 100, "authentication_attempts_per_minute": 5,
                          "lockout_duration_minutes": 15},
        "discovery": {"missed_cycles_before_inactive": 3, "anomaly_new_device_threshold": 100}
    }"#;
    match json::parse(text.as_bytes()) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// A node's policy state.
pub struct Policy {
    trust: Arc<Trust>,
    /// The version in force here (0: none yet).
    version: AtomicU64,
    /// Updates ignored because they were not newer.
    pub ignored_stale: AtomicU64,
    /// Updates refused (bad signature, wrong sender, malformed).
    pub refused: AtomicU64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

fn version_of(envelope_json: &str) -> Option<u64> {
    Envelope::from_slice(envelope_json.as_bytes())
        .ok()?
        .payload
        .get("policy_version")?
        .as_u64()
}

impl Policy {
    /// Loads the version in force from the NIB.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn load(trust: Arc<Trust>) -> Result<Self, NibError> {
        let id = Self::applied_id(trust.role);
        let version = trust.nib.current_policy(id)?.map_or(0, |(v, _)| v);
        Ok(Policy {
            trust,
            version: AtomicU64::new(version),
            ignored_stale: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Under which id a tier stores the copy it applies: the GC and RCs the global policy,
    /// LCs their region's copy.
    fn applied_id(role: Role) -> &'static str {
        match role {
            Role::Local => REGIONAL_ID,
            _ => POLICY_ID,
        }
    }

    /// The version in force here.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// The topic this node publishes its policy on: the GC the global topic, an RC its
    /// region's. Local controllers publish none.
    pub fn topic(&self) -> Option<Topic> {
        match self.trust.role {
            Role::Global => Some(Topic::PolicyGlobal),
            Role::Regional => self.trust.region.clone().map(Topic::PolicyRegion),
            Role::Local => None,
        }
    }

    /// The envelope this node hands to its children (published retained, and answered to
    /// a SYNC_REQUEST): the GC's global policy, or an RC's regional copy.
    ///
    /// # Errors
    /// On a NIB failure or a corrupt stored envelope.
    pub fn for_children(&self) -> Result<Option<Envelope>, PolicyError> {
        let id = match self.trust.role {
            Role::Global => POLICY_ID,
            Role::Regional => REGIONAL_ID,
            Role::Local => return Ok(None),
        };
        match self.trust.nib.current_policy(id)? {
            Some((_, text)) => Envelope::from_slice(text.as_bytes())
                .map(Some)
                .map_err(|e| PolicyError::Invalid(format!("stored policy: {e}"))),
            None => Ok(None),
        }
    }

    /// GC: the first start stores the default policy as version 1.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn ensure_default(&self) -> Result<Option<Envelope>, PolicyError> {
        if self.trust.role != Role::Global || self.version() > 0 {
            return Ok(None);
        }
        self.set(default_content()).map(Some)
    }

    /// GC: stores `content` as the next version, signed; returns the envelope to publish.
    ///
    /// # Errors
    /// On a NIB failure, or when this node is not the global controller.
    pub fn set(&self, content: Map) -> Result<Envelope, PolicyError> {
        if self.trust.role != Role::Global {
            return Err(PolicyError::Untrusted(
                "only the global controller authors policy".into(),
            ));
        }
        let now = self.trust.clock.now();
        let version = self.version() + 1;
        let update = PolicyUpdate {
            policy_id: POLICY_ID.into(),
            policy_version: version,
            scope: "global".into(),
            target_region: None,
            content,
            distributed_by: self.trust.me.clone(),
            valid_from: format_iso(now),
            origin: None,
            extra: Map::new(),
        };
        let env = self.sign_update(&update)?;
        if !self
            .trust
            .nib
            .store_policy(POLICY_ID, version, &env.to_json(), now)?
        {
            return Err(PolicyError::Invalid(format!(
                "version {version} is not newer than the stored one"
            )));
        }
        self.version.store(version, Ordering::Relaxed);
        self.audit("POLICY_PUBLISHED", version, "Published a policy version");
        Ok(env)
    }

    fn sign_update(&self, update: &PolicyUpdate) -> Result<Envelope, PolicyError> {
        let now = self.trust.clock.now();
        let payload = typed_to_map(update).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let mut env = Envelope::new(
            MessageType::PolicyUpdate,
            self.trust.me.clone(),
            BROADCAST,
            payload,
            now,
        );
        self.trust.sign_identity(&mut env);
        Ok(env)
    }

    fn audit(&self, event_type: &str, version: u64, action: &str) {
        let mut details = Map::new();
        details.insert("policy_version".into(), version.into());
        let ev = Event {
            event_type: event_type.into(),
            actor: self.trust.me.clone(),
            subject: Some(POLICY_ID.into()),
            action: action.into(),
            decision: Some(version.to_string()),
            details,
        };
        if let Err(e) =
            self.trust
                .nib
                .append_event(&ev, &self.trust.identity, self.trust.clock.now())
        {
            tracing::warn!(error = %e, "cannot write the audit event of a policy change");
        }
    }

    /// Checks that `env` is a POLICY_UPDATE from `sender` signed with its Ed25519 `key`,
    /// and returns its payload.
    fn checked(
        &self,
        env: &Envelope,
        sender: &str,
        key: &PublicKey,
    ) -> Result<PolicyUpdate, PolicyError> {
        if env.message_type != MessageType::PolicyUpdate {
            return Err(PolicyError::Invalid(format!(
                "{} is not a POLICY_UPDATE",
                env.message_type
            )));
        }
        if env.sender_id != sender {
            return Err(PolicyError::Untrusted(format!(
                "from {}, expected {sender}",
                env.sender_id
            )));
        }
        if env.signature_algorithm.as_deref() != Some(ED25519) {
            return Err(PolicyError::Untrusted(
                "a policy must be signed with its author's Ed25519 key".into(),
            ));
        }
        signing::authenticate(
            env,
            VerifyKeys {
                hmac: None,
                ed25519: Some(key),
            },
            Some(sender),
            self.trust.clock.now(),
        )
        .map_err(|e| PolicyError::Untrusted(format!("{sender}'s signature: {e}")))?;
        env.payload_as::<PolicyUpdate>()
            .map_err(|e| PolicyError::Invalid(e.to_string()))
    }

    /// RC or LC: a POLICY_UPDATE from the parent (published, or answered to a sync).
    ///
    /// # Errors
    /// [`PolicyError`] when it must be refused (counted).
    pub fn receive(&self, env: &Envelope) -> Result<PolicyOutcome, PolicyError> {
        let r = self.receive_inner(env);
        match &r {
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sender = %env.sender_id, error = %e, "policy update refused");
            }
            Ok(PolicyOutcome::Stale { version, current }) => {
                self.ignored_stale.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(version, current, "policy update not newer; ignored");
            }
            Ok(_) => {}
        }
        r
    }

    fn receive_inner(&self, env: &Envelope) -> Result<PolicyOutcome, PolicyError> {
        let (parent_id, parent_key) = self
            .trust
            .parent
            .clone()
            .ok_or_else(|| PolicyError::Untrusted("this node has no parent".into()))?;
        let outer = self.checked(env, &parent_id, &parent_key)?;
        let now = self.trust.clock.now();
        match self.trust.role {
            Role::Regional => {
                if outer.scope != "global" || outer.policy_id != POLICY_ID {
                    return Err(PolicyError::Invalid("not the global policy".into()));
                }
                let current = self.version();
                if outer.policy_version <= current {
                    return Ok(PolicyOutcome::Stale {
                        version: outer.policy_version,
                        current,
                    });
                }
                let region = self
                    .trust
                    .region
                    .clone()
                    .ok_or_else(|| PolicyError::Invalid("no region".into()))?;
                let regional = PolicyUpdate {
                    policy_id: outer.policy_id.clone(),
                    policy_version: outer.policy_version,
                    scope: "regional".into(),
                    target_region: Some(region),
                    content: outer.content.clone(),
                    distributed_by: self.trust.me.clone(),
                    valid_from: outer.valid_from.clone(),
                    origin: Some(env.to_value()),
                    extra: Map::new(),
                };
                let copy = self.sign_update(&regional)?;
                // The GC's original first: if the regional copy cannot be stored, a retry
                // of the same version is not stale.
                let stored = self.trust.nib.store_policy(
                    POLICY_ID,
                    outer.policy_version,
                    &env.to_json(),
                    now,
                )?;
                if !stored {
                    return Ok(PolicyOutcome::Stale {
                        version: outer.policy_version,
                        current: self.version(),
                    });
                }
                self.trust.nib.store_policy(
                    REGIONAL_ID,
                    outer.policy_version,
                    &copy.to_json(),
                    now,
                )?;
                self.version.store(outer.policy_version, Ordering::Relaxed);
                self.audit(
                    "POLICY_RECEIVED",
                    outer.policy_version,
                    "Accepted the global policy and republished it for the region",
                );
                Ok(PolicyOutcome::Applied {
                    version: outer.policy_version,
                    republish: Some(Box::new(copy)),
                })
            }
            Role::Local => {
                if outer.scope != "regional" || outer.target_region != self.trust.region {
                    return Err(PolicyError::Invalid(format!(
                        "a copy for {:?}, not for this region",
                        outer.target_region
                    )));
                }
                // Provenance: the GC's own signature on the same content and version.
                let origin = outer
                    .origin
                    .clone()
                    .ok_or_else(|| PolicyError::Untrusted("no GC-signed origin".into()))?;
                let origin = Envelope::from_value(origin)
                    .map_err(|e| PolicyError::Invalid(format!("origin: {e}")))?;
                let root = self
                    .trust
                    .nib
                    .state_str(StateKey::RootPublicKey)?
                    .and_then(|k| PublicKey::from_base64(&k).ok())
                    .ok_or_else(|| PolicyError::Untrusted("no pinned root key".into()))?;
                let inner = self
                    .checked(&origin, GLOBAL_CONTROLLER_ID, &root)
                    .map_err(|e| PolicyError::Untrusted(format!("origin: {e}")))?;
                if inner.policy_version != outer.policy_version
                    || inner.content != outer.content
                    || inner.policy_id != outer.policy_id
                {
                    return Err(PolicyError::Untrusted(
                        "the regional copy differs from the GC's original".into(),
                    ));
                }
                let current = self.version();
                if outer.policy_version <= current {
                    return Ok(PolicyOutcome::Stale {
                        version: outer.policy_version,
                        current,
                    });
                }
                if !self.trust.nib.store_policy(
                    REGIONAL_ID,
                    outer.policy_version,
                    &env.to_json(),
                    now,
                )? {
                    return Ok(PolicyOutcome::Stale {
                        version: outer.policy_version,
                        current: self.version(),
                    });
                }
                self.version.store(outer.policy_version, Ordering::Relaxed);
                self.audit(
                    "POLICY_APPLIED",
                    outer.policy_version,
                    "Applied the policy (regional and global signatures checked)",
                );
                Ok(PolicyOutcome::Applied {
                    version: outer.policy_version,
                    republish: None,
                })
            }
            Role::Global => Err(PolicyError::Untrusted(
                "the global controller takes no policy from anyone".into(),
            )),
        }
    }

    /// The content in force here (for operators).
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn content(&self) -> Result<Option<Map>, PolicyError> {
        Ok(self
            .in_force()?
            .and_then(|e| e.payload.get("content").and_then(Value::as_object).cloned()))
    }

    /// The signed `POLICY_UPDATE` in force here, as stored (its signatures were checked
    /// when it arrived).
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn in_force(&self) -> Result<Option<Envelope>, PolicyError> {
        let id = Self::applied_id(self.trust.role);
        Ok(self
            .trust
            .nib
            .current_policy(id)?
            .and_then(|(_, text)| Envelope::from_slice(text.as_bytes()).ok()))
    }
}

/// Who signed an envelope, how and when (no key material).
fn signature_of(env: &Envelope) -> Value {
    let mut m = Map::new();
    m.insert("signer".into(), env.sender_id.clone().into());
    m.insert("algorithm".into(), env.signature_algorithm.clone().into());
    m.insert("key_id".into(), env.key_id.clone().into());
    m.insert("signed_at".into(), env.signed_at.clone().into());
    m.insert("message_id".into(), env.message_id.clone().into());
    m.insert("signature".into(), env.signature.clone().into());
    Value::Object(m)
}

/// What `pdsno policy show` reports: the version in force, the policy document, and where
/// the stored copy came from: `policy_id`, `scope`, `target_region`, `distributed_by`,
/// `valid_from`, `signature` (signer, algorithm, key id, time), and on a regional copy the
/// global controller's `origin` signature. Without a stored policy, only the version (0)
/// and a null `content`.
pub fn show(version: u64, env: Option<&Envelope>) -> Map {
    let mut m = Map::new();
    m.insert("policy_version".into(), version.into());
    let Some(env) = env else {
        m.insert("content".into(), Value::Null);
        return m;
    };
    let p = &env.payload;
    m.insert(
        "content".into(),
        p.get("content").cloned().unwrap_or(Value::Null),
    );
    for k in [
        "policy_id",
        "scope",
        "target_region",
        "distributed_by",
        "valid_from",
    ] {
        m.insert(k.into(), p.get(k).cloned().unwrap_or(Value::Null));
    }
    m.insert("signature".into(), signature_of(env));
    let origin = p
        .get("origin")
        .and_then(|o| Envelope::from_value(o.clone()).ok())
        .map_or(Value::Null, |o| signature_of(&o));
    m.insert("origin".into(), origin);
    m
}

/// The version inside a stored envelope (for tools reading a NIB).
pub fn stored_version(envelope_json: &str) -> Option<u64> {
    version_of(envelope_json)
}

/// How a policy reached the children.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Distribution {
    /// Published (retained) on the broker.
    pub published: bool,
    /// Pushed to children over gRPC (the broker was not available).
    pub pushed: usize,
    /// Children that could not be reached either way (they sync when they come back).
    pub unreachable: usize,
}

/// What follows a policy this node applied, whichever transport brought it (MQTT, a sync
/// answer, a gRPC push): a line on stdout and, on a regional controller, its own signed copy
/// handed on to its children by [`distribute`].
pub async fn after_applied(
    trust: &Arc<Trust>,
    outbound: &crate::outbound::Outbound,
    policy: &Policy,
    version: u64,
    republish: Option<Box<Envelope>>,
) {
    match (republish, policy.topic()) {
        (Some(copy), Some(topic)) => {
            crate::report::emit(&crate::report::Report::Policy {
                version,
                event: crate::report::PolicyEvent::Republished,
                region: Some(trust.region.clone().unwrap_or_else(|| "-".into())),
            });
            tracing::info!(version, region = %trust.region.as_deref().unwrap_or("-"), "policy applied and handed on to the region");
            let d = distribute(trust, outbound, &copy, &topic).await;
            if !d.published && d.unreachable > 0 {
                tracing::warn!(
                    pushed = d.pushed,
                    unreachable = d.unreachable,
                    "policy copy not published; some children will get it when they sync"
                );
            }
        }
        _ => {
            crate::report::emit(&crate::report::Report::Policy {
                version,
                event: crate::report::PolicyEvent::Applied,
                region: None,
            });
            tracing::info!(version, "policy applied");
        }
    }
}

/// Hands `env` to this node's children: published on `topic` when the broker is there,
/// else sent to each active child's gRPC address (the transport fallback). Children that
/// miss it get it by SYNC_REQUEST when they (re)connect.
pub async fn distribute(
    trust: &Arc<Trust>,
    outbound: &crate::outbound::Outbound,
    env: &Envelope,
    topic: &Topic,
) -> Distribution {
    let mut d = Distribution::default();
    match outbound.publish(env, topic).await {
        Ok(()) => {
            d.published = true;
            outbound
                .stats
                .mqtt
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return d;
        }
        Err(e) => {
            tracing::info!(error = %e, "policy not published; pushing it to the children over gRPC")
        }
    }
    let t = trust.clone();
    let targets = tokio::task::spawn_blocking(move || {
        t.nib
            .controllers()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| Trust::child_row(&t.me, r))
            .filter_map(|r| {
                let url = t
                    .nib
                    .controller_metadata(&r.controller_id)
                    .ok()
                    .flatten()?
                    .get("grpc_url")?
                    .as_str()?
                    .to_owned();
                Some((r.controller_id, url))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (id, url) in targets {
        let sent = match crate::transport::parent::ParentLink::new(&url) {
            Ok(link) => link
                .exchange(env)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(()) => {
                d.pushed += 1;
                outbound
                    .stats
                    .grpc
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                d.unreachable += 1;
                tracing::debug!(child = %id, error = %e, "policy push failed; it will sync");
            }
        }
    }
    d
}
