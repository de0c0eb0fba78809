//! Broker configuration, built in code (no rumqttd config file).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, PasswordHash};

use crate::codec::{self, Version};

/// One listening socket.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// A name for logs and stats (`v4`, `v5`, `tls`).
    pub name: String,
    /// Address to bind (port 0 picks a free port; read it back from the handle).
    pub addr: SocketAddr,
    /// The protocol version this listener was opened for. Every listener serves both MQTT
    /// 3.1.1 and 5 (the CONNECT's protocol level decides); this one only shapes the answer
    /// to a CONNECT too malformed to tell.
    pub version: Version,
    /// Serve TLS with this certificate and key.
    pub tls: Option<TlsFiles>,
}

/// PEM files of a TLS listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (leaf first).
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates: with it, a client may present one
    /// (it is verified when presented).
    pub ca: Option<PathBuf>,
    /// Refuse a client without a certificate signed by `ca`.
    pub require_client_cert: bool,
}

/// Resource limits.
#[derive(Clone, Debug)]
pub struct BrokerLimits {
    /// Most client connections at once; more are refused with "server unavailable".
    pub max_connections: usize,
    /// Largest packet accepted (remaining length), bytes.
    pub max_packet_size: usize,
    /// Most MQTT 5 user properties per packet.
    pub max_user_properties: usize,
    /// Most levels in a topic or filter.
    pub max_topic_levels: usize,
    /// Most filters per SUBSCRIBE/UNSUBSCRIBE.
    pub max_filters_per_packet: usize,
    /// Time a new connection has to complete TLS and send CONNECT.
    pub connect_timeout: Duration,
    /// Time a started packet has to arrive completely.
    pub frame_timeout: Duration,
    /// Bytes per segment of a subscription's in-memory log.
    pub segment_size: usize,
    /// Segments kept per subscription filter: each distinct filter has its own log in
    /// rumqttd, holding up to `segment_size × segment_count` bytes of topics and payloads
    /// (plus one message) of what matched it, for as long as the broker runs.
    pub segment_count: usize,
    /// Most distinct subscription filters one client may add (0 = no limit). rumqttd
    /// keeps a log for every filter ever subscribed until it stops, so a new filter is
    /// charged, for the broker's lifetime, to the account that subscribed to it first (a
    /// controller's credential, an operator account, or all anonymous clients together);
    /// a SUBSCRIBE that would take the account over this closes the connection (MQTT 5:
    /// DISCONNECT 0x97 "quota exceeded"). Filters already known cost nothing.
    pub max_filters_per_client: usize,
    /// Packets read from a connection per batch before the router is notified.
    pub read_batch: usize,
    /// Wrong passwords for one operator account from one address (within
    /// `operator_lockout_window`) before that address is refused for the account during
    /// `operator_lockout` without a password check (0 = never). Operator passwords are
    /// chosen by people and each check costs an Argon2 hash; controller credentials are
    /// random 256-bit secrets and are not locked.
    pub operator_lockout_failures: u32,
    /// The window those failures count in.
    pub operator_lockout_window: Duration,
    /// How long the address is refused for that account.
    pub operator_lockout: Duration,
    /// PUBLISH packets per second a controller connection (an accepted credential) may
    /// send over time (0 = no limit). Above it the front door stops reading from that
    /// connection until the budget refills: TCP back-pressure, nothing dropped. A
    /// compromised controller cannot flood its subscribers; operators are not limited.
    pub controller_publish_rate: u32,
    /// PUBLISH packets a controller may send at once above the rate.
    pub controller_publish_burst: u32,
    /// Most connections one source address may hold at once (0 = no per-address rules).
    /// The last quarter of `max_connections` is kept for addresses holding fewer than a
    /// quarter of this (see [`pdsno_shared::slots`]); a connection above either is closed
    /// at once, before TLS or CONNECT. Addresses matched by
    /// [`BrokerConfig::per_address_exempt`] are held to `max_connections` only.
    pub max_connections_per_address: usize,
    /// Most topics one client may hold retained messages on (0 = no limit). A client is
    /// its account: a controller's credential, an operator account, or all anonymous
    /// clients together. A retained PUBLISH (or a retained will, counted from CONNECT)
    /// above it closes the connection (MQTT 5: DISCONNECT 0x97 "quota exceeded").
    pub retained_topics_per_client: usize,
    /// Most bytes (topic names and payloads) of retained messages one client may hold
    /// (0 = no limit); as `retained_topics_per_client`.
    pub retained_bytes_per_client: usize,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_connections: 1024,
            max_packet_size: 256 * 1024,
            max_user_properties: 64,
            max_topic_levels: 32,
            max_filters_per_packet: 64,
            connect_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            segment_size: 256 * 1024,
            segment_count: 2,
            max_filters_per_client: 64,
            read_batch: 100,
            operator_lockout_failures: 5,
            operator_lockout_window: Duration::from_secs(60),
            operator_lockout: Duration::from_secs(300),
            controller_publish_rate: 500,
            controller_publish_burst: 2000,
            max_connections_per_address: 64,
            retained_topics_per_client: 32,
            retained_bytes_per_client: 1024 * 1024,
        }
    }
}

impl BrokerLimits {
    pub(crate) fn codec(&self) -> codec::Limits {
        codec::Limits {
            max_packet_size: self.max_packet_size,
            max_user_properties: self.max_user_properties,
            max_topic_levels: self.max_topic_levels,
            max_filters_per_packet: self.max_filters_per_packet,
        }
    }
}

/// An operator account (for tools like `mosquitto_sub`): a name and an Argon2id hash.
#[derive(Clone)]
pub struct OperatorAccount {
    name: String,
    hash: String,
    read_only: bool,
}

/// Why an account could not be created.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The `NAME:PASSWORD` text is malformed.
    #[error("expected NAME:PASSWORD with a non-empty name and password")]
    Malformed,
    /// The stored hash is not a PHC string Argon2 can check.
    #[error("password hash is not a valid Argon2 PHC string")]
    BadHash,
    /// Hashing failed.
    #[error("cannot hash password: {0}")]
    Hash(String),
}

impl OperatorAccount {
    /// An account from a plain password (hashed now with Argon2id).
    ///
    /// # Errors
    /// When hashing fails or name/password are empty.
    pub fn with_password(name: &str, password: &str) -> Result<Self, AccountError> {
        if name.is_empty() || password.is_empty() {
            return Err(AccountError::Malformed);
        }
        let hash = Argon2::default()
            .hash_password(password.as_bytes())
            .map_err(|e| AccountError::Hash(e.to_string()))?
            .to_string();
        Ok(OperatorAccount {
            name: name.to_owned(),
            hash,
            read_only: false,
        })
    }

    /// An account from `NAME:PASSWORD` (the `--user` flag).
    ///
    /// # Errors
    /// When the text is malformed.
    pub fn parse_flag(text: &str) -> Result<Self, AccountError> {
        let (name, password) = text.split_once(':').ok_or(AccountError::Malformed)?;
        OperatorAccount::with_password(name, password)
    }

    /// An account from a stored Argon2 PHC hash (`$argon2id$v=19$...`).
    ///
    /// # Errors
    /// When the hash does not parse.
    pub fn with_hash(name: &str, hash: &str) -> Result<Self, AccountError> {
        PasswordHash::new(hash).map_err(|_| AccountError::BadHash)?;
        if name.is_empty() {
            return Err(AccountError::Malformed);
        }
        Ok(OperatorAccount {
            name: name.to_owned(),
            hash: hash.to_owned(),
            read_only: false,
        })
    }

    /// The same account, allowed to subscribe only (monitoring, `mosquitto_sub`): it
    /// authenticates as [`crate::Principal::Reader`], and any PUBLISH or will is refused.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Whether the account may only subscribe.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The account name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PHC hash (safe to store; not the password).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Checks a password (slow by design: call it off the async executor).
    pub fn verify(&self, password: &[u8]) -> bool {
        Argon2::default()
            .verify_password(password, self.hash.as_str())
            .is_ok()
    }
}

impl fmt::Debug for OperatorAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorAccount")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The whole broker configuration.
#[derive(Clone, Debug, Default)]
pub struct BrokerConfig {
    /// Listening sockets (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// Limits.
    pub limits: BrokerLimits,
    /// Accept clients without a user name. Off unless the operator turns it on.
    pub allow_anonymous: bool,
    /// Operator accounts.
    pub operators: Vec<OperatorAccount>,
    /// Topic rights per principal (none: every authenticated client may do anything).
    pub topic_rules: Option<crate::auth::TopicRules>,
    /// Client ids reserved for the credential of the same name (controllers): an operator
    /// account or an anonymous client asking for one is refused with CONNACK "not
    /// authorized", so it cannot take over a controller's session (and fire its will).
    pub reserved_client_ids: Option<crate::auth::ReservedIds>,
    /// Source addresses held to `max_connections` only, not to
    /// `max_connections_per_address` (e.g. a NAT gateway in front of many controllers).
    pub per_address_exempt: Option<crate::auth::ExemptAddresses>,
}

impl BrokerConfig {
    /// A plain MQTT 3.1.1 listener and an MQTT 5 listener on the given addresses.
    pub fn plain(v4: SocketAddr, v5: Option<SocketAddr>) -> Self {
        let mut listeners = vec![ListenerConfig {
            name: "v4".into(),
            addr: v4,
            version: Version::V311,
            tls: None,
        }];
        if let Some(a) = v5 {
            listeners.push(ListenerConfig {
                name: "v5".into(),
                addr: a,
                version: Version::V5,
                tls: None,
            });
        }
        BrokerConfig {
            listeners,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_accounts() {
        let a = OperatorAccount::parse_flag("ops:s3cret:with:colons").expect("account");
        assert_eq!(a.name(), "ops");
        assert!(a.verify(b"s3cret:with:colons"));
        assert!(!a.verify(b"s3cret"));
        assert!(!format!("{a:?}").contains("argon2"), "no hash in Debug");
        let b = OperatorAccount::with_hash("ops", a.hash()).expect("from hash");
        assert!(b.verify(b"s3cret:with:colons"));
        assert_eq!(
            OperatorAccount::parse_flag("nopassword").err(),
            Some(AccountError::Malformed)
        );
        assert_eq!(
            OperatorAccount::parse_flag(":x").err(),
            Some(AccountError::Malformed)
        );
        assert_eq!(
            OperatorAccount::with_hash("ops", "plaintext").err(),
            Some(AccountError::BadHash)
        );
    }
}
