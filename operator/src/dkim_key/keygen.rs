//! DKIM key generation: ed25519 through mail-auth (ed25519-dalek), RSA 2048
//! through the `rsa` crate mail-auth already builds. Private keys are PKCS#8
//! PEM, which the relay loads for both algorithms.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use petrel_crds::status::DkimAlgorithm;

/// A freshly generated key.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// PKCS#8 PEM private key, stored in the key's Secret.
    pub private_pem: String,
    /// The DKIM TXT record value (`v=DKIM1; k=...; p=...`).
    pub dns_value: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private keys.
        f.debug_struct("GeneratedKey")
            .field("dns_value", &self.dns_value)
            .finish_non_exhaustive()
    }
}

/// Key generation failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeygenError(String);

/// Generates a key of the given algorithm.
pub fn generate(algorithm: DkimAlgorithm) -> Result<GeneratedKey, KeygenError> {
    match algorithm {
        DkimAlgorithm::Ed25519 => {
            use mail_auth::common::crypto::Ed25519Key;
            let der = Ed25519Key::generate_pkcs8().map_err(|e| KeygenError(e.to_string()))?;
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| KeygenError(e.to_string()))?;
            Ok(GeneratedKey {
                private_pem: pem("PRIVATE KEY", &der),
                dns_value: dns_value(algorithm, &key.public_key()),
            })
        }
        DkimAlgorithm::Rsa2048 => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| KeygenError(e.to_string()))?;
            let der = private
                .to_pkcs8_der()
                .map_err(|e| KeygenError(e.to_string()))?;
            let public = private
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| KeygenError(e.to_string()))?;
            Ok(GeneratedKey {
                private_pem: pem("PRIVATE KEY", der.as_bytes()),
                dns_value: dns_value(algorithm, public.as_bytes()),
            })
        }
    }
}

/// The DKIM record value for a public key: RSA as SubjectPublicKeyInfo DER
/// (RFC 6376), ed25519 as the raw 32 bytes (RFC 8463).
pub fn dns_value(algorithm: DkimAlgorithm, public_key: &[u8]) -> String {
    format!(
        "v=DKIM1; k={}; p={}",
        algorithm.dns_key_type(),
        STANDARD.encode(public_key)
    )
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(body).expect("base64 body")
    }

    #[test]
    fn ed25519_key_loads_and_matches_record() {
        let key = generate(DkimAlgorithm::Ed25519).expect("generates");
        assert!(key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let loaded =
            mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(&der_of(&key.private_pem))
                .expect("mail-auth loads the key");
        assert_eq!(
            key.dns_value,
            dns_value(DkimAlgorithm::Ed25519, &loaded.public_key())
        );
        assert!(key.dns_value.starts_with("v=DKIM1; k=ed25519; p="));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn rsa_key_loads_and_record_is_over_255_bytes() {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
        let key = generate(DkimAlgorithm::Rsa2048).expect("generates");
        let private = rsa::RsaPrivateKey::from_pkcs8_der(&der_of(&key.private_pem)).expect("loads");
        let public = private
            .to_public_key()
            .to_public_key_der()
            .expect("encodes");
        assert_eq!(
            key.dns_value,
            dns_value(DkimAlgorithm::Rsa2048, public.as_bytes())
        );
        assert!(key.dns_value.len() > 255, "RSA 2048 records need splitting");
        assert!(key.private_pem.lines().all(|l| l.len() <= 64));
    }
}
