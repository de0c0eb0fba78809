//! Key exchange and rotation over the wire: the initiator's side (a task of the node) and
//! the responder's handler.
//!
//! KEY_EXCHANGE_INIT / KEY_EXCHANGE_RESPONSE agree the first key of a pair;
//! KEY_ROTATION_REQUEST / KEY_ROTATION_ACK agree the next one. Both carry a
//! [`KeyAgreement`]; the envelope is signed the usual way (the current pairwise key if any),
//! and the payload's identity signature protects the ephemeral keys even from someone who
//! can sign envelopes. An initial exchange also delivers the initiator's MQTT credential,
//! wrapped under the new key.

use std::sync::Arc;

use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::json::Value;
use pdsno_shared::keys::PublicKey;
use pdsno_shared::keyx::{self, KeyAgreement};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::Verifier;

use crate::inbound::{HandlerReply, InboundError};
use crate::nib::{Event, StateKey};
use crate::transport::parent::{LinkError, ParentLink};
use crate::trust::Trust;

/// Wrap purpose of an MQTT credential delivered in a key exchange.
pub const MQTT_WRAP: &str = "mqtt";

/// Why an exchange we started failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The peer could not be reached or refused.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The answer does not verify or is not for us.
    #[error("invalid answer: {0}")]
    Answer(String),
    /// The key could not be stored.
    #[error("cannot store the key: {0}")]
    Store(String),
}

/// What the responder side may add to an initial exchange.
pub trait CredentialSource: Send + Sync {
    /// A fresh MQTT credential for `controller_id`, and the broker URL to use (if known).
    ///
    /// # Errors
    /// A message when no credential can be issued now.
    fn credential_for(&self, controller_id: &str) -> Result<([u8; 32], Option<String>), String>;
}

/// Runs one exchange with `peer` (first key, or the next generation when `rotation`),
/// over `link`. Returns the new key id.
///
/// # Errors
/// [`ExchangeError`].
pub async fn initiate(
    trust: &Trust,
    link: &ParentLink,
    peer: &str,
    peer_key: &PublicKey,
    rotation: bool,
) -> Result<String, ExchangeError> {
    let now = trust.clock.now();
    let generation = trust.pair_keys.generation(peer) + 1;
    let key_id = keyx::key_id(&trust.me, peer, generation);
    let pending = keyx::offer(&trust.identity, &trust.me, peer, &key_id, now);
    let t = if rotation {
        MessageType::KeyRotationRequest
    } else {
        MessageType::KeyExchangeInit
    };
    let mut env = Envelope::new(t, trust.me.clone(), peer, Default::default(), now)
        .with_typed_payload(pending.offer())
        .map_err(|e| ExchangeError::Answer(e.to_string()))?;
    if rotation {
        trust.sign_for(peer, &mut env);
    } else {
        // A first exchange (or a re-key after the peer lost our shared key) is signed with
        // the identity key, which the peer verifies whatever state its pairwise keys are in.
        trust.sign_identity(&mut env);
    }
    let reply = link.key_exchange(&env).await?;
    // The answer must come from the peer, for us, signed the way we accept from it.
    let verifier = Verifier::new(MemoryNonceStore::new());
    trust
        .verify(&verifier, &reply, None, Some(peer))
        .map_err(|e| ExchangeError::Answer(e.to_string()))?;
    let want = if rotation {
        MessageType::KeyRotationAck
    } else {
        MessageType::KeyExchangeResponse
    };
    if reply.message_type != want
        || reply.recipient_id != trust.me
        || reply.correlation_id.as_deref() != Some(env.message_id.as_str())
    {
        return Err(ExchangeError::Answer(format!(
            "expected {want} for our request, got {}",
            reply.message_type
        )));
    }
    let answer: KeyAgreement = reply
        .payload_as()
        .map_err(|e| ExchangeError::Answer(e.to_string()))?;
    let key = keyx::finish(&pending, peer_key, &answer, trust.clock.now())
        .map_err(|e| ExchangeError::Answer(e.to_string()))?;
    trust
        .pair_keys
        .install_current(peer, &key_id, &key, trust.clock.now())
        .map_err(|e| ExchangeError::Store(e.to_string()))?;
    if let Some(w) = answer.extra.get("mqtt_credential").and_then(Value::as_str) {
        let secret = keyx::unwrap(&key, &key_id, MQTT_WRAP, w)
            .map_err(|e| ExchangeError::Answer(e.to_string()))?;
        let mut values = vec![(StateKey::MqttCredential, Value::from(hex::encode(*secret)))];
        if let Some(url) = answer.extra.get("mqtt_url").and_then(Value::as_str) {
            values.push((StateKey::MqttUrl, Value::from(url)));
        }
        trust
            .nib
            .set_state(&values)
            .map_err(|e| ExchangeError::Store(e.to_string()))?;
    }
    let mut details = pdsno_shared::json::Map::new();
    details.insert("key_id".into(), key_id.clone().into());
    details.insert("peer".into(), peer.into());
    let ev = Event {
        event_type: if rotation {
            "KEY_ROTATED".into()
        } else {
            "KEY_ESTABLISHED".into()
        },
        actor: trust.me.clone(),
        subject: Some(peer.to_owned()),
        action: "Agreed a pairwise key (initiator)".into(),
        decision: Some(key_id.clone()),
        details,
    };
    if let Err(e) = trust
        .nib
        .append_event(&ev, &trust.identity, trust.clock.now())
    {
        tracing::warn!(error = %e, "cannot write the audit event of a key agreement");
    }
    tracing::info!(%peer, %key_id, rotation, "pairwise key agreed");
    if let Err(e) = confirm(trust, link, peer, &key_id).await {
        // The responder still switches as soon as it sees the key in use.
        tracing::warn!(%peer, %key_id, error = %e, "key confirmation not delivered");
    }
    Ok(key_id)
}

/// Key confirmation: the responder holds a new key as pending until it sees it used, so
/// the initiator at once sends it a HEARTBEAT signed with that key (naming it in
/// `key_confirmation`). Retried briefly on connection errors.
async fn confirm(
    trust: &Trust,
    link: &ParentLink,
    peer: &str,
    key_id: &str,
) -> Result<(), LinkError> {
    let mut attempt = 0u32;
    loop {
        let mut p = pdsno_shared::json::Map::new();
        p.insert("status".into(), "online".into());
        p.insert("key_confirmation".into(), key_id.into());
        let mut env = Envelope::new(
            MessageType::Heartbeat,
            trust.me.clone(),
            peer,
            p,
            trust.clock.now(),
        );
        trust.sign_for(peer, &mut env);
        match link.exchange(&env).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The responder's handler for KEY_EXCHANGE_INIT and KEY_ROTATION_REQUEST.
///
/// # Errors
/// [`InboundError::Forbidden`] for an unknown sender or a bad identity signature (a
/// swapped ephemeral key), [`InboundError::BadRequest`] for a malformed offer.
pub fn respond(
    trust: &Arc<Trust>,
    env: &Envelope,
    credentials: Option<&dyn CredentialSource>,
) -> Result<HandlerReply, InboundError> {
    let sender = env.sender_id.as_str();
    let Some(sender_key) = trust.identity_of(sender) else {
        return Err(InboundError::Forbidden(format!(
            "key exchange refused: {sender} is not a controller this node knows"
        )));
    };
    // Keys are agreed along the tree only: a local controller talks to its regional
    // controller, never around it to the global one.
    if !trust.is_neighbour(sender) {
        return Err(InboundError::Forbidden(format!(
            "key exchange refused: {sender} is neither our parent nor a controller we admitted"
        )));
    }
    let offer: KeyAgreement = env
        .payload_as()
        .map_err(|e| InboundError::BadRequest(format!("invalid key agreement: {e}")))?;
    let generation = keyx::generation_of(&offer.key_id);
    if offer.initiator_id != sender
        || offer.responder_id != trust.me
        || offer.key_id != keyx::key_id(sender, &trust.me, generation)
    {
        return Err(InboundError::BadRequest(
            "key agreement names the wrong parties or key".into(),
        ));
    }
    let rotation = env.message_type == MessageType::KeyRotationRequest;
    if rotation
        && trust.pair_keys.signing_key(sender).is_none()
        && trust
            .pair_keys
            .verify_ring(sender, trust.clock.now())
            .is_none()
    {
        return Err(InboundError::Forbidden(
            "rotation refused: no key to rotate; run a key exchange first".into(),
        ));
    }
    let now = trust.clock.now();
    let (mut answer, key) =
        keyx::answer(&trust.identity, &sender_key, &offer, now).map_err(|e| {
            tracing::warn!(%sender, error = %e, "refused a key agreement");
            InboundError::Forbidden(format!("key exchange refused: {e}"))
        })?;
    if !rotation && let Some(src) = credentials {
        match src.credential_for(sender) {
            Ok((secret, url)) => {
                answer.extra.insert(
                    "mqtt_credential".into(),
                    keyx::wrap(&key, &offer.key_id, MQTT_WRAP, &secret).into(),
                );
                if let Some(u) = url {
                    answer.extra.insert("mqtt_url".into(), u.into());
                }
            }
            Err(e) => {
                tracing::warn!(%sender, error = %e, "no MQTT credential issued with this key exchange")
            }
        }
    }
    trust
        .pair_keys
        .install_pending(sender, &offer.key_id, &key, now)
        .map_err(|e| InboundError::Unavailable(e.to_string()))?;
    let mut details = pdsno_shared::json::Map::new();
    details.insert("key_id".into(), offer.key_id.clone().into());
    details.insert("peer".into(), sender.into());
    let ev = Event {
        event_type: if rotation {
            "KEY_ROTATED".into()
        } else {
            "KEY_ESTABLISHED".into()
        },
        actor: trust.me.clone(),
        subject: Some(sender.to_owned()),
        action: "Agreed a pairwise key (responder)".into(),
        decision: Some(offer.key_id.clone()),
        details,
    };
    if let Err(e) = trust.nib.append_event(&ev, &trust.identity, now) {
        tracing::warn!(error = %e, "cannot write the audit event of a key agreement");
    }
    let t = if rotation {
        MessageType::KeyRotationAck
    } else {
        MessageType::KeyExchangeResponse
    };
    let payload = typed_to_map(&answer).map_err(|e| InboundError::BadRequest(e.to_string()))?;
    Ok(HandlerReply::Reply(t, payload))
}
