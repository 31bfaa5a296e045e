//! A small outbound HTTP/1.1 client: webhooks today, policy fetches
//! (MTA-STS) tomorrow.
//!
//! Connects with a timeout, speaks TLS 1.2+ through rustls (ring) verified
//! against the system roots plus an optional CA file, bounds the whole
//! request by a timeout and the response body by a size limit, so a slow or
//! hostile server costs at most those. Connections are kept alive and reused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

/// How a client behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// PEM file of extra CA certificates, trusted on top of the system's.
    pub ca_file: Option<PathBuf>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Bound on one request: connect, TLS, sending, the whole response.
    pub request_timeout: Duration,
    /// Largest response body read; a longer one is an error.
    pub max_response_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// Why a client could not be built, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The CA file could not be read or held no certificate.
    #[error("CA file {path}: {why}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS config: {0}")]
    Tls(#[from] rustls::Error),
    /// The request did not complete within the request timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// No connection (DNS, TCP refused, TLS handshake or verification).
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke during the exchange, or the response was not HTTP.
    #[error("request: {0}")]
    Request(String),
    /// The response body exceeded the limit.
    #[error("response body larger than {0} bytes")]
    BodyTooLarge(usize),
}

/// A response, its body read in full (within the limit).
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A pooled HTTP/HTTPS client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    options: Arc<ClientOptions>,
}

impl HttpClient {
    /// Builds a client; reads the system roots and `options.ca_file` now.
    pub fn new(options: ClientOptions) -> Result<HttpClient, HttpClientError> {
        let roots = roots(options.ca_file.as_deref())?;
        if roots.is_empty() {
            tracing::warn!("no trusted CA certificates found: https requests will fail");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(options.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            .build(connector);
        Ok(HttpClient {
            inner,
            options: Arc::new(options),
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Sends `request` and reads the response, all within the request
    /// timeout and the body limit.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<HttpResponse, HttpClientError> {
        let timeout = self.options.request_timeout;
        let limit = self.options.max_response_bytes;
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|e| {
                if e.is_connect() {
                    HttpClientError::Connect(error_chain(&e))
                } else {
                    HttpClientError::Request(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, limit).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    HttpClientError::BodyTooLarge(limit)
                } else {
                    HttpClientError::Request(e.to_string())
                }
            })?;
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpClientError::Timeout(timeout))?
    }
}

/// An error and its sources on one line ("client error (Connect): tcp
/// connect error: Connection refused"), since hyper's top level says little.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The system roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured) plus `ca_file`.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, HttpClientError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let ca_error = |why: String| HttpClientError::CaFile {
            path: path.to_path_buf(),
            why,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no PEM certificate in it".into()));
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ca_error("no usable CA certificate in it".into()));
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = HttpClient::new(ClientOptions {
            ca_file: Some(missing.clone()),
            ..ClientOptions::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let err = HttpClient::new(ClientOptions {
            ca_file: Some(empty),
            ..ClientOptions::default()
        })
        .err()
        .unwrap();
        assert!(matches!(err, HttpClientError::CaFile { .. }), "{err}");
    }

    #[tokio::test]
    async fn refused_connections_and_timeouts_are_told_apart() {
        // A port nobody listens on: refused, a connect error.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let client = HttpClient::new(ClientOptions {
            request_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        })
        .unwrap();
        let request = |port: u16| {
            Request::post(format!("http://127.0.0.1:{port}/"))
                .body(Full::new(Bytes::from_static(b"[]")))
                .unwrap()
        };
        let err = client.send(request(port)).await.unwrap_err();
        assert!(matches!(err, HttpClientError::Connect(_)), "{err}");
        // A listener that accepts and never answers: a timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let (_socket, _) = silent.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let err = client.send(request(port)).await.unwrap_err();
        assert!(matches!(err, HttpClientError::Timeout(_)), "{err}");
        hold.abort();
    }
}
