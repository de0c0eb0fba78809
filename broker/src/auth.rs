//! Who may connect (operator accounts, the caller's credential check, anonymous access)
//! and what a connection may do with topics (the caller's [`TopicRules`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::codec::{Connect, Refusal, Version};
use crate::config::OperatorAccount;

/// What the caller's credential check sees.
pub struct CredentialRequest {
    /// The MQTT client identifier.
    pub client_id: String,
    /// The user name.
    pub username: String,
    /// The password (zeroized on drop).
    pub password: Zeroizing<Vec<u8>>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The protocol version.
    pub version: Version,
}

impl fmt::Debug for CredentialRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialRequest")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("peer", &self.peer)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The caller's credential check (the node backs it with credentials issued at admission).
pub type CredentialCheck =
    Arc<dyn Fn(CredentialRequest) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Longest client identifier accepted.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A client identifier rumqttd can register safely: 1..=128 characters, none of `+ # / $`
/// (rumqttd uses the id in topic paths and poisons a lock on ids it cannot register) and
/// no control characters. (An empty id is handled separately: the broker assigns one.)
pub fn client_id_acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.chars().count() <= MAX_CLIENT_ID_LEN
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '$') || c.is_control())
}

/// Client ids reserved for the credential of the same name: [`ReservedIds::new`] takes a
/// function saying whether an id is reserved.
#[derive(Clone)]
pub struct ReservedIds(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl ReservedIds {
    /// Ids for which `f` is true are reserved.
    pub fn new(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        ReservedIds(Arc::new(f))
    }

    /// Whether `client_id` is reserved.
    pub fn contains(&self, client_id: &str) -> bool {
        (self.0)(client_id)
    }
}

impl fmt::Debug for ReservedIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReservedIds(..)")
    }
}

/// Source addresses exempt from the per-address connection cap: [`ExemptAddresses::new`]
/// takes a function saying whether an address is exempt.
#[derive(Clone)]
pub struct ExemptAddresses(pub(crate) pdsno_shared::slots::Exempt);

impl ExemptAddresses {
    /// Addresses for which `f` is true are exempt.
    pub fn new(f: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Self {
        ExemptAddresses(Arc::new(f))
    }
}

impl fmt::Debug for ExemptAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExemptAddresses(..)")
    }
}

/// Operator password checks running at once. Each Argon2id check takes ~19 MiB for its
/// duration; without a bound, a burst of CONNECTs naming an operator account would take
/// that much per connection. Further checks wait their turn (under the connect timeout).
pub(crate) const PASSWORD_CHECKS_AT_ONCE: usize = 4;

pub(crate) struct Gate {
    pub(crate) allow_anonymous: bool,
    pub(crate) operators: Vec<OperatorAccount>,
    pub(crate) check: Option<CredentialCheck>,
    pub(crate) lockout: OperatorLockout,
    pub(crate) reserved: Option<ReservedIds>,
    /// [`PASSWORD_CHECKS_AT_ONCE`] permits.
    pub(crate) password_checks: tokio::sync::Semaphore,
}

/// Most (address, account) pairs remembered; beyond it, pairs neither locked nor failing
/// recently are forgotten first.
const MAX_LOCKOUT_ENTRIES: usize = 16_384;

#[derive(Default)]
struct Failures {
    recent: Vec<Instant>,
    until: Option<Instant>,
}

/// Wrong operator passwords per (address, account), and the lockouts they start.
pub(crate) struct OperatorLockout {
    failures: u32,
    window: Duration,
    lockout: Duration,
    map: Mutex<HashMap<(IpAddr, String), Failures>>,
}

impl OperatorLockout {
    pub(crate) fn new(failures: u32, window: Duration, lockout: Duration) -> Self {
        OperatorLockout {
            failures,
            window,
            lockout,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(IpAddr, String), Failures>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn locked(&self, ip: IpAddr, account: &str) -> bool {
        let now = Instant::now();
        self.map()
            .get(&(ip, account.to_owned()))
            .and_then(|f| f.until)
            .is_some_and(|u| u > now)
    }

    /// Records a wrong password; true when it starts a lockout.
    fn failed(&self, ip: IpAddr, account: &str) -> bool {
        if self.failures == 0 {
            return false;
        }
        let now = Instant::now();
        let mut map = self.map();
        if map.len() >= MAX_LOCKOUT_ENTRIES {
            let window = self.window;
            map.retain(|_, f| {
                f.until.is_some_and(|u| u > now)
                    || f.recent.iter().any(|t| now.duration_since(*t) < window)
            });
            if map.len() >= MAX_LOCKOUT_ENTRIES {
                return false; // under a flood: refuse by password checks alone
            }
        }
        let f = map.entry((ip, account.to_owned())).or_default();
        f.recent.retain(|t| now.duration_since(*t) < self.window);
        f.recent.push(now);
        if f.recent.len() >= self.failures as usize {
            f.recent.clear();
            f.until = Some(now + self.lockout);
            return true;
        }
        false
    }

    fn succeeded(&self, ip: IpAddr, account: &str) {
        self.map().remove(&(ip, account.to_owned()));
    }
}

impl Gate {
    /// Decides a CONNECT; `Err` carries the CONNACK refusal.
    pub(crate) async fn admit(&self, c: &Connect, peer: SocketAddr) -> Result<Principal, Refusal> {
        // An empty id asks the broker to assign one (rumqttd does, and reports it to MQTT 5
        // clients); only allowed with a clean session (MQTT 3.1.1 §3.1.3.1).
        let id_ok = if c.client_id.is_empty() {
            c.clean
        } else {
            client_id_acceptable(&c.client_id)
        };
        if !id_ok {
            return Err(Refusal::IdentifierRejected);
        }
        if c.auth_method {
            return Err(Refusal::BadAuthMethod);
        }
        // A controller's client id is only for its own credential (checked by the caller's
        // credential check); any other account asking for it is refused.
        let reserved = !c.client_id.is_empty()
            && self
                .reserved
                .as_ref()
                .is_some_and(|r| r.contains(&c.client_id));
        let Some(username) = c.username.clone() else {
            return match (self.allow_anonymous, reserved) {
                (true, false) => Ok(Principal::Anonymous),
                (true, true) => Err(Refusal::ReservedId),
                (false, _) => Err(Refusal::NotAuthorized),
            };
        };
        let Some(password) = c.password.clone().map(Zeroizing::new) else {
            return Err(Refusal::BadCredentials);
        };
        if let Some(account) = self
            .operators
            .iter()
            .find(|a| a.name() == username)
            .cloned()
        {
            if self.lockout.locked(peer.ip(), &username) {
                return Err(Refusal::Banned);
            }
            // Argon2 is deliberately slow; keep it off the executor threads.
            let read_only = account.is_read_only();
            let Ok(_turn) = self.password_checks.acquire().await else {
                return Err(Refusal::ServerUnavailable);
            };
            let ok = tokio::task::spawn_blocking(move || account.verify(&password))
                .await
                .unwrap_or(false);
            if !ok {
                if self.lockout.failed(peer.ip(), &username) {
                    tracing::warn!(source = %peer.ip(), account = %username, "operator account locked for this address after repeated wrong passwords");
                }
                return Err(Refusal::BadCredentials);
            }
            self.lockout.succeeded(peer.ip(), &username);
            if reserved {
                return Err(Refusal::ReservedId);
            }
            return Ok(if read_only {
                Principal::Reader(username)
            } else {
                Principal::Operator(username)
            });
        }
        let Some(check) = &self.check else {
            return Err(Refusal::BadCredentials);
        };
        let req = CredentialRequest {
            client_id: c.client_id.clone(),
            username: username.clone(),
            password,
            peer,
            version: c.version,
        };
        if !check(req).await {
            return Err(Refusal::BadCredentials);
        }
        if reserved && c.client_id != username {
            return Err(Refusal::ReservedId);
        }
        Ok(Principal::Credential(username))
    }
}

/// Who a connection authenticated as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No user name (anonymous access is on).
    Anonymous,
    /// An operator account.
    Operator(String),
    /// A read-only operator account: it may subscribe, never publish (nor leave a will).
    Reader(String),
    /// A credential accepted by the caller's check.
    Credential(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Operator(n) => write!(f, "operator:{n}"),
            Principal::Reader(n) => write!(f, "reader:{n}"),
            Principal::Credential(n) => write!(f, "controller:{n}"),
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Publish => "publish",
            Access::Subscribe => "subscribe",
        })
    }
}

impl Principal {
    /// The account whose budgets (retained messages) this connection draws on: the
    /// credential or operator account; every anonymous client shares one.
    pub(crate) fn account(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Operator(n) | Principal::Reader(n) => format!("operator:{n}"),
            Principal::Credential(n) => format!("credential:{n}"),
        }
    }
}

/// What a client asks to do with a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Publish on a topic name (a PUBLISH, or the will of a CONNECT).
    Publish,
    /// Subscribe to a topic filter.
    Subscribe,
}

/// The caller's topic rights: whether a principal may publish on a topic or subscribe to
/// a filter. Without rules every authenticated client may do anything.
///
/// A refusal closes the connection (MQTT 5: DISCONNECT 0x87 "not authorized"), or refuses
/// the CONNECT whose will names a topic the client may not publish on. A PUBLISH is not
/// dropped silently: the client learns at once that it is misconfigured.
///
/// Rules may also say where a message may be retained ([`TopicRules::with_retain`]): a
/// PUBLISH with the retain flag on another topic closes the connection the same way
/// (MQTT 5: DISCONNECT 0x9A "retain not supported"), and a CONNECT whose will asks for it
/// is refused.
#[derive(Clone)]
pub struct TopicRules {
    rights: Arc<RuleFn>,
    retain: Option<Arc<RetainFn>>,
}

/// The function behind [`TopicRules`].
type RuleFn = dyn Fn(&Principal, Access, &str) -> bool + Send + Sync;

/// The function behind [`TopicRules::with_retain`].
type RetainFn = dyn Fn(&Principal, &str) -> bool + Send + Sync;

impl TopicRules {
    /// Rules given by a function of principal, access and topic.
    pub fn new(f: impl Fn(&Principal, Access, &str) -> bool + Send + Sync + 'static) -> Self {
        TopicRules {
            rights: Arc::new(f),
            retain: None,
        }
    }

    /// The same rules, with `f` saying whether a principal may retain a message on a
    /// topic it may publish on (without it: wherever it may publish).
    #[must_use]
    pub fn with_retain(
        mut self,
        f: impl Fn(&Principal, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retain = Some(Arc::new(f));
        self
    }

    /// Whether `principal` may do `access` on `topic`.
    pub fn allows(&self, principal: &Principal, access: Access, topic: &str) -> bool {
        (self.rights)(principal, access, topic)
    }

    /// Whether `principal` may retain a message on `topic`.
    pub fn allows_retain(&self, principal: &Principal, topic: &str) -> bool {
        self.retain.as_ref().is_none_or(|f| f(principal, topic))
    }
}

/// Whether `principal` may do `access` on `topic` under the optional caller's `rules`: a
/// read-only account never publishes, whatever the rules; without rules anything else goes.
pub fn permitted(
    rules: Option<&TopicRules>,
    principal: &Principal,
    access: Access,
    topic: &str,
) -> bool {
    if access == Access::Publish && matches!(principal, Principal::Reader(_)) {
        return false;
    }
    rules.is_none_or(|r| r.allows(principal, access, topic))
}

/// Whether `principal` may retain a message on `topic` under the optional `rules`.
pub fn retain_permitted(rules: Option<&TopicRules>, principal: &Principal, topic: &str) -> bool {
    rules.is_none_or(|r| r.allows_retain(principal, topic))
}

impl fmt::Debug for TopicRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TopicRules(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(client_id_acceptable("local_cntl_zone-A_1"));
        assert!(client_id_acceptable("mosq-AbC123"));
        for bad in [
            "",
            "a/b",
            "a+b",
            "a#",
            "$sys",
            "a\u{0}b",
            "a\nb",
            &"x".repeat(129),
        ] {
            assert!(!client_id_acceptable(bad), "{bad:?}");
        }
    }
}
