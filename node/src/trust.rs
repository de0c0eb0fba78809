//! Who signs with what, and which keys verify whom, for one node.
//!
//! Signing a message for a peer: the current pairwise key shared with it (named by
//! `key_id`), else the shared network key (compat deployments), else the node's Ed25519
//! identity key. Verifying a message from a sender: its pairwise keys (current, pending,
//! retiring within grace), the network key, and its Ed25519 identity key if it is our
//! parent or an active child. Revoked controllers have neither keys nor an active row, so
//! nothing of theirs verifies.
//!
//! The network key is known to every controller of a deployment, so it says only "one of
//! us", never who. It is therefore refused from a sender we share a pairwise key with (that
//! key names the sender), and never accepted for a privileged message (key exchange,
//! credentials, revocation, policy, config approval: see [`privileged`]), which is signed
//! with a pairwise key or the sender's identity key instead.

use std::sync::Arc;

use pdsno_shared::envelope::{Envelope, MessageType};
use pdsno_shared::ids::Role;
use pdsno_shared::keys::{DEFAULT_GRACE, HmacKey, IdentityKey, KeyRing, PublicKey};
use pdsno_shared::replay::NonceStore;
use pdsno_shared::signing::{self, Verified, Verifier, VerifyError, VerifyKeys};
use pdsno_shared::time::Clock;

use crate::keys::PairKeys;
use crate::nib::Nib;

/// Ring key id of the shared network key (internal; never announced on the wire).
pub const NETWORK_KEY_ID: &str = "network";
/// Ring key id of an admission key (internal; never announced on the wire).
pub const ADMISSION_KEY_ID: &str = "admission";

/// True for message types that change who may do what (keys, credentials, revocation,
/// policy, config approval): never signed or accepted under the shared network key.
pub fn privileged(t: MessageType) -> bool {
    use MessageType as T;
    matches!(
        t,
        T::KeyExchangeInit
            | T::KeyExchangeResponse
            | T::KeyRotationRequest
            | T::KeyRotationAck
            | T::PolicyUpdate
            | T::SyncRequest
            | T::SyncResponse
            | T::ConfigApproval
            | T::ConfigRejection
            | T::ExecutionInstruction
    )
}

/// The keys of one node and the rules for using them.
pub struct Trust {
    /// This node's id.
    pub me: String,
    /// Its role.
    pub role: Role,
    /// Its region.
    pub region: Option<String>,
    /// Its identity key.
    pub identity: Arc<IdentityKey>,
    /// The shared network key, if the deployment has one.
    pub network_key: Option<HmacKey>,
    /// Pairwise keys.
    pub pair_keys: Arc<PairKeys>,
    /// The NIB.
    pub nib: Arc<Nib>,
    /// The parent's id and pinned key (children).
    pub parent: Option<(String, PublicKey)>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("me", &self.me)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// The Ed25519 key of a sender we know: our parent, or an active controller we admitted.
    pub fn identity_of(&self, sender: &str) -> Option<PublicKey> {
        if let Some((pid, pk)) = &self.parent
            && pid == sender
        {
            return Some(*pk);
        }
        let row = self.nib.controller(sender).ok().flatten()?;
        if row.status != "active" {
            return None;
        }
        row.public_key
            .as_deref()
            .and_then(|k| PublicKey::from_base64(k).ok())
    }

    /// True when `peer` is our parent or one of our children (see [`Trust::is_child`]):
    /// the peers we share pairwise keys with.
    pub fn is_neighbour(&self, peer: &str) -> bool {
        self.parent.as_ref().is_some_and(|(pid, _)| pid == peer) || self.is_child(peer)
    }

    /// The one rule for "is this my child", from the admission records: an active
    /// controller this node admitted itself. A grandchild its child registered here (the
    /// global controller knows every local controller) is not: it talks to its own parent.
    pub fn is_child(&self, id: &str) -> bool {
        self.nib
            .controller(id)
            .ok()
            .flatten()
            .is_some_and(|r| Self::child_row(&self.me, &r))
    }

    /// [`Trust::is_child`] on a row already read.
    pub fn child_row(me: &str, r: &crate::nib::ControllerRow) -> bool {
        r.status == "active" && r.validated_by.as_deref() == Some(me)
    }

    /// The network key, when it may verify `env`: the deployment has one, the sender shares
    /// no confirmed pairwise key with us, and the message is not [`privileged`].
    fn network_key_for(&self, env: &Envelope) -> Option<&HmacKey> {
        let k = self.network_key.as_ref()?;
        if privileged(env.message_type) || self.pair_keys.signing_key(&env.sender_id).is_some() {
            return None;
        }
        Some(k)
    }

    /// Verifies `env` from its sender with every key that may have signed it (plus
    /// `admission`, an unadmitted child's key); a pending pairwise key used by the peer is
    /// promoted.
    ///
    /// # Errors
    /// The verification failure.
    pub fn verify<S: NonceStore>(
        &self,
        verifier: &Verifier<S>,
        env: &Envelope,
        admission: Option<HmacKey>,
        expected_sender: Option<&str>,
    ) -> Result<Verified, VerifyError> {
        let now = self.clock.now();
        let mut ring = self
            .pair_keys
            .verify_ring(&env.sender_id, now)
            .unwrap_or_else(|| KeyRing::new(DEFAULT_GRACE));
        ring.set_announce_key_id(false);
        if let Some(k) = self.network_key_for(env) {
            ring.add(Some(NETWORK_KEY_ID.into()), k.clone(), now);
        }
        if let Some(k) = admission {
            ring.add(Some(ADMISSION_KEY_ID.into()), k, now);
        }
        let ed = self.identity_of(&env.sender_id);
        let keys = VerifyKeys {
            hmac: (!ring.is_empty()).then_some(&ring),
            ed25519: ed.as_ref(),
        };
        let v = verifier.verify(env, keys, expected_sender, now)?;
        if let Some(kid) = v.key_id.as_deref()
            && kid != NETWORK_KEY_ID
            && kid != ADMISSION_KEY_ID
        {
            self.pair_keys.confirm(&env.sender_id, kid, now);
        }
        Ok(v)
    }

    /// Checks only that `env` really comes from its sender (any key it may have used),
    /// without freshness or replay checks: for retained or broadcast content whose
    /// receivers order it by version or session (see [`signing::authenticate`]).
    ///
    /// # Errors
    /// The failing check.
    pub fn authenticate(
        &self,
        env: &Envelope,
        expected_sender: Option<&str>,
    ) -> Result<Verified, VerifyError> {
        let now = self.clock.now();
        let mut ring = self
            .pair_keys
            .verify_ring(&env.sender_id, now)
            .unwrap_or_else(|| KeyRing::new(DEFAULT_GRACE));
        ring.set_announce_key_id(false);
        if let Some(k) = self.network_key_for(env) {
            ring.add(Some(NETWORK_KEY_ID.into()), k.clone(), now);
        }
        let ed = self.identity_of(&env.sender_id);
        let keys = VerifyKeys {
            hmac: (!ring.is_empty()).then_some(&ring),
            ed25519: ed.as_ref(),
        };
        signing::authenticate(env, keys, expected_sender, now)
    }

    /// Signs `env` with our Ed25519 identity key: what a peer can always verify, whatever
    /// happened to the keys we share with it.
    pub fn sign_identity(&self, env: &mut Envelope) {
        signing::sign_ed25519(env, &self.identity, None, self.clock.now());
    }

    /// Signs a message for `peer` (see the module docs for the key chosen).
    pub fn sign_for(&self, peer: &str, env: &mut Envelope) {
        let now = self.clock.now();
        if let Some((kid, key)) = self.pair_keys.signing_key(peer) {
            signing::sign_hmac(env, &key, Some(&kid), now);
        } else if let Some(k) = self
            .network_key
            .as_ref()
            .filter(|_| !privileged(env.message_type))
        {
            signing::sign_hmac(env, k, None, now);
        } else {
            signing::sign_ed25519(env, &self.identity, None, now);
        }
    }
}
