//! Throwaway TLS material: a test CA, server certificates it signs, and
//! rustls configs built with the ring provider.
//!
//! Tests use real TLS (STARTTLS on the sink, the relay's listeners) with
//! certificates generated per test run; nothing is committed to the repo.
//! Configs always name the ring provider explicitly, so tests never depend
//! on (or fight over) a process-wide default crypto provider.
//!
//! ```
//! use petrel_tests::tls::TestCa;
//! let ca = TestCa::new().unwrap();
//! let cert = ca.issue_server_cert(&["localhost", "127.0.0.1", "mx.example.org"]).unwrap();
//! let server = cert.server_config().unwrap(); // for a TlsAcceptor
//! let client = ca.client_config().unwrap();   // trusts only this CA
//! # let _ = (server, client);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors from generating certificates or building rustls configs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused the parameters (e.g. an invalid DNS name).
    #[error("generating certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the certificate, key or protocol versions.
    #[error("building rustls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// Writing PEM files failed.
    #[error("writing {path}: {source}")]
    Io {
        /// File being written.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The ring crypto provider, named explicitly for every config we build.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that exists only for this test run.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Generate a new CA (ECDSA P-256, "Petrel Test CA").
    pub fn new() -> Result<Self, TlsError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Petrel Test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM (what a client must trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A root store containing only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // A freshly generated CA always parses; ignore the impossible error.
        let _ = roots.add(self.cert_der.clone());
        roots
    }

    /// Issue a server certificate for `names` (DNS names or IP addresses, the
    /// first one also becomes the subject CN), valid for server and client auth.
    pub fn issue_server_cert(&self, names: &[&str]) -> Result<ServerCert, TlsError> {
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            chain_der: vec![cert.der().clone(), self.cert_der.clone()],
            key_der: key.serialize_der(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// A client config (ring, TLS 1.2+) that trusts only this CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Write `ca.crt` into `dir` and return its path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf, TlsError> {
        let path = dir.join("ca.crt");
        write(&path, &self.cert_pem)?;
        Ok(path)
    }
}

/// A server certificate and its key, issued by a [`TestCa`].
#[derive(Clone)]
pub struct ServerCert {
    /// Leaf certificate then CA certificate, PEM.
    pub chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Leaf then CA, DER.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
    /// The issuing CA certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").finish_non_exhaustive()
    }
}

/// Paths written by [`ServerCert::write_to_dir`], named like a
/// `kubernetes.io/tls` Secret mounted as files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `tls.crt`: certificate chain PEM.
    pub cert: PathBuf,
    /// `tls.key`: private key PEM.
    pub key: PathBuf,
    /// `ca.crt`: CA certificate PEM.
    pub ca: PathBuf,
}

impl ServerCert {
    /// The private key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A server config (ring, TLS 1.2+, no client auth) presenting this certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain_der.clone(), self.private_key())?;
        Ok(Arc::new(config))
    }

    /// Write `tls.crt`, `tls.key` and `ca.crt` into `dir` (which must exist),
    /// the files the relay reads its certificate from.
    pub fn write_to_dir(&self, dir: &Path) -> Result<TlsFiles, TlsError> {
        let files = TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        };
        write(&files.cert, &self.chain_pem)?;
        write(&files.key, &self.key_pem)?;
        write(&files.ca, &self.ca_pem)?;
        Ok(files)
    }
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_parse_back() {
        let ca = TestCa::new().unwrap();
        let cert = ca.issue_server_cert(&["localhost", "127.0.0.1"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = cert.write_to_dir(dir.path()).unwrap();
        let pem = std::fs::read(&files.cert).unwrap();
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs.len(), 2);
        let key = std::fs::read(&files.key).unwrap();
        assert!(
            rustls_pemfile::private_key(&mut key.as_slice())
                .unwrap()
                .is_some()
        );
        assert_eq!(std::fs::read_to_string(&files.ca).unwrap(), ca.cert_pem());
    }
}
