//! Certificate checks against an MX host's TLSA records (RFC 7672
//! section 3): a rustls verifier, so a mismatch fails the handshake
//! before any mail is sent.
//!
//! DANE-EE(3): the leaf (or its key) is pinned; no name, expiry or chain
//! check (section 3.1.1), which is what lets self-signed MX certificates
//! work. DANE-TA(2): a certificate in the server's chain is the trust
//! anchor; the leaf must chain to it, be valid now, and name one of the
//! reference identifiers (section 3.2.2: the MX host name, plus the
//! destination domain when the MX lookup was secure).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use super::tlsa::{Tlsa, Usage};

/// The certificate matches none of the TLSA records: the error rustls
/// carries (as `CertificateError::Other`) so the TLS result type reads
/// `tlsa-invalid`.
#[derive(Debug, thiserror::Error)]
#[error("the certificate matches none of the {records} usable TLSA record(s)")]
pub struct TlsaMismatch {
    /// How many usable records there were.
    pub records: usize,
}

/// Verifies a server against its TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    names: Vec<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// A verifier for `records` (usable ones, at least one), checking
    /// DANE-TA chains against `names`.
    pub fn new(
        records: Vec<Tlsa>,
        names: Vec<ServerName<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> DaneVerifier {
        DaneVerifier {
            records,
            names,
            provider,
        }
    }

    fn mismatch(&self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            TlsaMismatch {
                records: self.records.len(),
            },
        ))))
    }

    /// The chain checked against one DANE-TA anchor, for each name.
    fn verify_with_anchor(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = webpki::anchor_from_trusted_cert(anchor)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
            .to_owned();
        let roots = RootCertStore {
            roots: vec![anchor],
        };
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut last = self.mismatch();
        for name in &self.names {
            match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .records
            .iter()
            .any(|r| r.usage == Usage::EndEntity && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        // The anchor must be in the chain the server sent (RFC 7672
        // section 3.1.2): SMTP clients have no other way to get it.
        let mut result = Err(self.mismatch());
        for anchor in intermediates.iter().filter(|c| {
            self.records
                .iter()
                .any(|r| r.usage == Usage::TrustAnchor && r.matches(c))
        }) {
            result = self.verify_with_anchor(anchor, end_entity, intermediates, ocsp, now);
            if result.is_ok() {
                break;
            }
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.2+ client config verifying with `verifier`.
pub fn client_config(verifier: DaneVerifier) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = verifier.provider.clone();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::super::tlsa::{Digest, Part, association};
    use super::*;

    fn pem_cert(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("valid PEM")
    }

    fn verifier(records: Vec<Tlsa>) -> DaneVerifier {
        DaneVerifier::new(
            records,
            vec![ServerName::try_from("mx.dane.test").unwrap()],
            Arc::new(rustls::crypto::ring::default_provider()),
        )
    }

    #[test]
    fn dane_ee_matches_the_leaf_whatever_its_name() {
        let cert = pem_cert(include_str!("testdata/mx.pem"));
        let ee = Tlsa {
            usage: Usage::EndEntity,
            part: Part::PublicKey,
            digest: Digest::Sha256,
            data: association(&cert, Part::PublicKey, Digest::Sha256).unwrap(),
        };
        let other = ServerName::try_from("elsewhere.test").unwrap();
        let now = UnixTime::now();
        assert!(
            verifier(vec![ee.clone()])
                .verify_server_cert(&cert, &[], &other, &[], now)
                .is_ok()
        );
        let mut wrong = ee;
        wrong.data[0] ^= 0xff;
        let err = verifier(vec![wrong])
            .verify_server_cert(&cert, &[], &other, &[], now)
            .unwrap_err();
        assert_eq!(
            crate::delivery::tls_result::TlsResult::of_rustls(&err).map(|r| r.as_str()),
            Some("tlsa-invalid")
        );
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain() {
        // The self-signed leaf as a DANE-TA anchor is not in `intermediates`:
        // the record pins a CA that the server did not send.
        let cert = pem_cert(include_str!("testdata/mx.pem"));
        let ta = Tlsa {
            usage: Usage::TrustAnchor,
            part: Part::Certificate,
            digest: Digest::Sha256,
            data: association(&cert, Part::Certificate, Digest::Sha256).unwrap(),
        };
        let name = ServerName::try_from("mx.dane.test").unwrap();
        assert!(
            verifier(vec![ta])
                .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .is_err()
        );
    }
}
