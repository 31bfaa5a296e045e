//! Fetching `https://mta-sts.<domain>/.well-known/mta-sts.txt` (RFC 8461
//! section 3.3): HTTPS with a verified certificate, no redirects, a 200
//! with `text/plain`, at most 64 KiB, all within one time limit.
//!
//! A minimal HTTP/1.1 client over hyper's connection API, so the request
//! goes exactly where we resolved (our resolver, the MX nameservers) and
//! nothing follows redirects or reuses connections behind our back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest policy accepted (section 3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Where and how to fetch policies.
#[derive(Clone)]
pub struct FetchSettings {
    /// Resolves `mta-sts.<domain>`.
    pub resolver: TokioResolver,
    /// HTTPS port: 443 except in tests (`delivery.mx.mtaStsPort`).
    pub port: u16,
    /// Verified TLS (Mozilla roots plus `delivery.tls.caFile`).
    pub tls: Arc<rustls::ClientConfig>,
    /// Limit for the whole fetch: DNS, connect, handshake, response.
    pub timeout: Duration,
}

/// Why a policy could not be fetched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// `mta-sts.<domain>` has no address.
    #[error("cannot resolve {host}: {reason}")]
    Dns {
        /// The policy host.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// No address accepted a connection.
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The certificate was not valid for the policy host (TLS-RPT
    /// `sts-webpki-invalid`), or the handshake failed otherwise.
    #[error("TLS with {host} failed: {reason}")]
    Tls {
        /// The policy host.
        host: String,
        /// rustls' reason.
        reason: String,
        /// The certificate was refused (as opposed to another failure).
        certificate: bool,
    },
    /// HTTP failed, or the answer was not a 200 with `text/plain`.
    #[error("{0}")]
    Http(String),
    /// The whole fetch took too long.
    #[error("policy fetch timed out after {0:?}")]
    Timeout(Duration),
}

impl FetchError {
    /// The certificate of the policy host was refused.
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            FetchError::Tls {
                certificate: true,
                ..
            }
        )
    }
}

/// The policy text of `domain`.
pub async fn fetch(settings: &FetchSettings, domain: &str) -> Result<String, FetchError> {
    tokio::time::timeout(settings.timeout, fetch_inner(settings, domain))
        .await
        .map_err(|_| FetchError::Timeout(settings.timeout))?
}

async fn fetch_inner(settings: &FetchSettings, domain: &str) -> Result<String, FetchError> {
    let host = format!("mta-sts.{}", domain.trim_end_matches('.'));
    let ips = settings
        .resolver
        .lookup_ip(format!("{host}."))
        .await
        .map_err(|e| FetchError::Dns {
            host: host.clone(),
            reason: e.to_string(),
        })?;
    let mut tcp = None;
    let mut tried = Vec::new();
    for ip in ips.iter() {
        let addr = SocketAddr::new(ip, settings.port);
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => tried.push(format!("{addr}: {e}")),
        }
    }
    let Some(tcp) = tcp else {
        return Err(FetchError::Connect(if tried.is_empty() {
            format!("{host}: no address")
        } else {
            tried.join(", ")
        }));
    };
    let name =
        rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| FetchError::Dns {
            host: host.clone(),
            reason: e.to_string(),
        })?;
    let tls = TlsConnector::from(settings.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls {
            host: host.clone(),
            certificate: super::super::tls_result::TlsResult::of_io(&e).is_some(),
            reason: e.to_string(),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| FetchError::Http(format!("HTTP with {host}: {e}")))?;
    // The connection task ends with the request (Connection: close) or
    // when `fetch` is dropped by its timeout.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = request(&mut sender, &host).await;
    driver.abort();
    result
}

async fn request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
) -> Result<String, FetchError> {
    let req = hyper::Request::get("/.well-known/mta-sts.txt")
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "petrel-relay")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| FetchError::Http(format!("HTTP with {host}: {e}")))?;
    let status = response.status();
    if status != hyper::StatusCode::OK {
        // Redirects included: section 3.3 forbids following them.
        return Err(FetchError::Http(format!(
            "https://{host}/.well-known/mta-sts.txt answered {status}"
        )));
    }
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("text/plain") {
        return Err(FetchError::Http(format!(
            "policy served as {content_type:?}, not text/plain"
        )));
    }
    let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            FetchError::Http(format!("policy body: {e} (limit {MAX_POLICY_BYTES} bytes)"))
        })?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| FetchError::Http("policy is not UTF-8".into()))
}
