//! rustls client configs for outbound SMTP.
//!
//! MX delivery in `opportunistic` and `encrypted` modes does not verify
//! certificates, like Postfix's `smtp_tls_security_level = may` and
//! `encrypt`: without DANE or MTA-STS there is no trustworthy name to check
//! an MX certificate against (the MX name itself comes from unauthenticated
//! DNS), and most MX certificates would fail anyway, so verification would
//! only push mail to plain text. Encryption still defeats passive
//! eavesdropping. Handshake signatures are verified, so the session key
//! really belongs to the presented key.
//!
//! `verified` mode (and MTA-STS `enforce`) checks the chain against the
//! Mozilla roots plus `delivery.tls.caFile` and the MX host name with
//! webpki's RFC 6125 rules (DNS-ID only, a wildcard only as the whole
//! leftmost label), as RFC 7672 section 3.2.3 and RFC 8461 section 4.2 ask.
//!
//! Smarthost delivery verifies against the system roots (or a configured
//! CA file): the smarthost is a fixed, named server we choose to trust.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a TLS client config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the protocol versions or roots.
    #[error("TLS client config: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No usable root certificate was found.
    #[error("no root certificates found (looked in {0})")]
    NoRoots(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate chain, checks handshake signatures.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The config for MX delivery: TLS 1.2+, no certificate verification
/// (see the module docs for why).
pub fn unverified() -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = AcceptAnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Mozilla's roots plus the certificates in `ca_file` (when set): the trust
/// of verified MX delivery and of MTA-STS policy fetches.
pub fn mozilla_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| TlsConfigError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsConfigError::NoRoots(path.display().to_string()));
        }
    }
    Ok(roots)
}

/// The config for verified MX delivery: TLS 1.2+, chain to
/// [`mozilla_roots`], certificate valid for the MX host name.
pub fn verified_mx(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(mozilla_roots(ca_file)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The config for MTA-STS policy fetches: as [`verified_mx`], speaking
/// HTTP/1.1.
pub fn verified_https(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(mozilla_roots(ca_file)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where system roots usually live (Debian/Ubuntu/Alpine, RHEL).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The config for a smarthost: verify against `ca_file`, else
/// `$SSL_CERT_FILE`, else the system bundle.
pub fn verified(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let candidates: Vec<String> = match ca_file {
        Some(p) => vec![p.display().to_string()],
        None => std::env::var("SSL_CERT_FILE")
            .ok()
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(|s| s.to_string()))
            .collect(),
    };
    let mut roots = RootCertStore::empty();
    for path in &candidates {
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(source) if ca_file.is_some() => {
                return Err(TlsConfigError::CaFile {
                    path: path.clone(),
                    source,
                });
            }
            Err(_) => continue,
        };
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        roots.add_parsable_certificates(certs);
        if !roots.is_empty() {
            break;
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoRoots(candidates.join(", ")));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build() {
        assert!(unverified().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        assert!(matches!(
            verified(Some(&missing)),
            Err(TlsConfigError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            verified(Some(&empty)),
            Err(TlsConfigError::NoRoots(_))
        ));
        assert!(matches!(
            verified_mx(Some(&empty)),
            Err(TlsConfigError::NoRoots(_))
        ));
        assert!(matches!(
            verified_mx(Some(&missing)),
            Err(TlsConfigError::CaFile { .. })
        ));
        assert!(verified_mx(None).is_ok());
        assert!(
            mozilla_roots(None).unwrap().len() > 100,
            "Mozilla roots present"
        );
    }
}
