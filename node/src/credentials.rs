//! MQTT credentials the global controller issues to admitted controllers, and the check
//! its embedded broker runs on every CONNECT.
//!
//! A credential is 32 random bytes (hex on the wire, as the MQTT password); the user name
//! is the controller id and must equal the MQTT client id, so one controller cannot take
//! over another's session. Only SHA-256 hashes are stored (NIB and memory); revoking
//! removes the hash, and the broker drops the controller's live session.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use pdsno_broker::{CredentialCheck, CredentialRequest};
use subtle::ConstantTimeEq;

use crate::nib::{Nib, NibError, credential_hash};

/// The issued credentials (hashes), loaded from the NIB.
#[derive(Debug)]
pub struct MqttCredentials {
    nib: Arc<Nib>,
    hashes: RwLock<HashMap<String, [u8; 32]>>,
}

impl MqttCredentials {
    /// Loads the issued credentials.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn load(nib: Arc<Nib>) -> Result<Self, NibError> {
        let mut map = HashMap::new();
        for (id, h) in nib.mqtt_credentials()? {
            let mut b = [0u8; 32];
            if hex::decode_to_slice(&h, &mut b).is_ok() {
                map.insert(id, b);
            }
        }
        Ok(MqttCredentials {
            nib,
            hashes: RwLock::new(map),
        })
    }

    /// Issues (or replaces) the credential of `controller_id`; returns the secret.
    ///
    /// # Errors
    /// On a NIB failure (nothing is issued then).
    pub fn issue(&self, controller_id: &str) -> Result<[u8; 32], NibError> {
        let secret = pdsno_shared::ids::random_bytes_32();
        self.nib.put_mqtt_credential(
            controller_id,
            hex::encode(secret).as_bytes(),
            chrono::Utc::now(),
        )?;
        let mut h = [0u8; 32];
        let _ = hex::decode_to_slice(credential_hash(hex::encode(secret).as_bytes()), &mut h);
        self.hashes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(controller_id.to_owned(), h);
        Ok(secret)
    }

    /// Removes the credential of `controller_id`.
    ///
    /// # Errors
    /// On a NIB failure.
    pub fn revoke(&self, controller_id: &str) -> Result<bool, NibError> {
        let had = self.nib.delete_mqtt_credential(controller_id)?;
        self.hashes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(controller_id);
        Ok(had)
    }

    /// True when a credential is issued to `controller_id`.
    pub fn has(&self, controller_id: &str) -> bool {
        self.hashes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(controller_id)
    }

    /// True when `password` is the credential issued to `username`.
    pub fn check(&self, username: &str, password: &[u8]) -> bool {
        let g = self
            .hashes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(want) = g.get(username) else {
            return false;
        };
        let mut got = [0u8; 32];
        if hex::decode_to_slice(credential_hash(password), &mut got).is_err() {
            return false;
        }
        bool::from(want.ct_eq(&got))
    }

    /// The broker's credential check: user name = client id = controller id, and the
    /// password matches its issued credential.
    pub fn broker_check(self: &Arc<Self>) -> CredentialCheck {
        let me = self.clone();
        Arc::new(move |req: CredentialRequest| {
            let ok = req.client_id == req.username && me.check(&req.username, &req.password);
            Box::pin(async move { ok })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_check_revoke_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nib = Arc::new(Nib::open(dir.path().join("nib.db")).expect("open"));
        let c = MqttCredentials::load(nib.clone()).expect("load");
        let s = c.issue("regional_cntl_zone-A_1").expect("issue");
        let pw = hex::encode(s);
        assert!(c.check("regional_cntl_zone-A_1", pw.as_bytes()));
        assert!(!c.check("regional_cntl_zone-A_1", b"guess"));
        assert!(!c.check("regional_cntl_zone-A_2", pw.as_bytes()));
        assert!(c.has("regional_cntl_zone-A_1") && !c.has("regional_cntl_zone-A_2"));
        let again = MqttCredentials::load(nib).expect("reload");
        assert!(
            again.check("regional_cntl_zone-A_1", pw.as_bytes()),
            "survives a restart"
        );
        assert!(again.revoke("regional_cntl_zone-A_1").expect("revoke"));
        assert!(!again.check("regional_cntl_zone-A_1", pw.as_bytes()));
    }
}
