//! KEY_EXCHANGE_INIT and KEY_ROTATION_REQUEST: agreeing and rotating the pairwise key with a
//! neighbour (see [`crate::keys::exchange::respond`]); a parent hands its child its broker
//! credential with the first exchange.

use std::sync::Arc;

use pdsno_shared::envelope::MessageType;

use super::Deps;
use crate::inbound::Handler;
use crate::keys::exchange::CredentialSource;

/// Both key messages share one responder.
pub fn handlers(d: &Deps) -> Vec<(MessageType, Handler)> {
    let t = d.trust.clone();
    let source: Option<Arc<dyn CredentialSource>> =
        d.children.clone().map(|c| c as Arc<dyn CredentialSource>);
    let respond = Arc::new(move |env: &pdsno_shared::envelope::Envelope| {
        crate::keys::exchange::respond(&t, env, source.as_deref())
    });
    let r = respond.clone();
    vec![
        (MessageType::KeyExchangeInit, Box::new(move |m| r(m.env))),
        (
            MessageType::KeyRotationRequest,
            Box::new(move |m| respond(m.env)),
        ),
    ]
}
