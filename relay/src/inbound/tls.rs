//! The TLS acceptor: rustls with the ring provider, TLS 1.2 and 1.3 only,
//! certificate and key re-read when cert-manager renews them in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;
use crate::reload::Reloading;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM holds no certificate or no key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
    /// rustls refused the certificate/key pair.
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds a rustls server config from PEM files.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&files.cert_file)?;
    let key_pem = read(&files.key_file)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: files.cert_file.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: files.cert_file.clone(),
            what: "no certificate found",
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: files.key_file.clone(),
            source,
        })?
        .ok_or_else(|| TlsError::Pem {
            path: files.key_file.clone(),
            what: "no private key found",
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(config)
}

/// A TLS acceptor whose certificate follows its files.
#[derive(Clone)]
pub struct Tls {
    config: Reloading<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files now (an error refuses to start) and re-reads them
    /// when they change; a broken renewal keeps the previous certificate.
    pub fn watch(files: &TlsFiles) -> Result<Tls, TlsError> {
        let initial = Arc::new(server_config(files)?);
        let files = files.clone();
        let config = Reloading::spawn(
            vec![files.cert_file.clone(), files.key_file.clone()],
            crate::config::RELOAD_INTERVAL,
            initial,
            move |_| match server_config(&files) {
                Ok(c) => {
                    tracing::info!(cert = %files.cert_file.display(), "TLS certificate reloaded");
                    Some(Arc::new(c))
                }
                Err(error) => {
                    tracing::error!(%error, "TLS certificate change refused; keeping the previous one");
                    None
                }
            },
        );
        Ok(Tls { config })
    }

    /// A fixed config (tests).
    pub fn fixed(config: ServerConfig) -> Tls {
        Tls {
            config: Reloading::fixed(Arc::new(config)),
        }
    }

    /// Runs the server handshake with the current certificate.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> std::io::Result<TlsStream<S>> {
        let config: Arc<ServerConfig> = (*self.config.get()).clone();
        TlsAcceptor::from(config).accept(io).await
    }
}

/// Protocol version and cipher suite of a finished handshake, for the
/// Received header and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// IANA name of the cipher suite.
    pub cipher: String,
}

/// What a handshake negotiated.
pub fn info<S>(stream: &TlsStream<S>) -> TlsInfo {
    let (_, conn) = stream.get_ref();
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_string();
    TlsInfo { version, cipher }
}
