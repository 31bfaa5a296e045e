//! One webhook's side of HTTP: its client (trust anchors, timeout), its
//! signing secret (re-read when the file changes), and one signed POST
//! turned into an [`Outcome`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, header};

use super::webhook_batch::Batch;
use super::webhook_sign::{SIGNATURE_HEADER, WEBHOOK_ID_HEADER, signature};
use crate::config::Webhook;
use crate::http_client::{ClientOptions, HttpClient, HttpClientError};
use crate::reload::{FileFingerprint, file_fingerprint};

/// How a response body is bounded: receivers answer with a status, the
/// body is only logged.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the receiver has the batch.
    Success,
    /// Any other status.
    HttpError(u16),
    /// No response within the request timeout.
    Timeout,
    /// No connection, or it broke before a response.
    ConnectError(String),
    /// Nothing was sent: the signing secret (or CA file) could not be used.
    NotSent(String),
}

impl Outcome {
    /// The `result` label of `petrel_webhook_requests_total`, `None` when no
    /// request was made.
    pub fn label(&self) -> Option<&'static str> {
        match self {
            Outcome::Success => Some("success"),
            Outcome::HttpError(_) => Some("http_error"),
            Outcome::Timeout => Some("timeout"),
            Outcome::ConnectError(_) => Some("connect_error"),
            Outcome::NotSent(_) => None,
        }
    }
}

/// The client and secret of one webhook, rebuilt as its config changes.
pub struct WebhookClient {
    client: Option<(ClientKey, HttpClient)>,
    secret: Option<(FileFingerprint, PathBuf, Vec<u8>)>,
}

/// What a client was built from: a change means a rebuild.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientKey {
    ca_file: Option<PathBuf>,
    ca_fingerprint: Option<FileFingerprint>,
    timeout: Duration,
}

impl Default for WebhookClient {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookClient {
    /// Nothing built yet; the first [`send`](Self::send) builds.
    pub fn new() -> WebhookClient {
        WebhookClient {
            client: None,
            secret: None,
        }
    }

    /// Signs `batch` with the current secret, POSTs it to `hook.url` and
    /// classifies the result.
    pub async fn send(&mut self, hook: &Webhook, batch: &Batch, now_secs: u64) -> Outcome {
        let client = match self.client(hook) {
            Ok(client) => client,
            Err(e) => return Outcome::NotSent(e.to_string()),
        };
        let secret = match self.secret(&hook.secret_file) {
            Ok(secret) => secret,
            Err(why) => return Outcome::NotSent(why),
        };
        let request = Request::post(hook.url.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("petrel-relay/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature(&secret, now_secs, &batch.body))
            .header(WEBHOOK_ID_HEADER, batch.id.as_str())
            .body(Full::new(Bytes::from(batch.body.clone())));
        let request = match request {
            Ok(r) => r,
            Err(e) => return Outcome::NotSent(format!("url {:?}: {e}", hook.url)),
        };
        match client.send(request).await {
            Ok(response) if response.status.is_success() => Outcome::Success,
            Ok(response) => Outcome::HttpError(response.status.as_u16()),
            Err(HttpClientError::Timeout(_)) => Outcome::Timeout,
            // A body over the limit still came with a status: not 2xx here
            // would have been read; treat it as the receiver misbehaving.
            Err(HttpClientError::BodyTooLarge(_)) => Outcome::HttpError(0),
            Err(e) => Outcome::ConnectError(e.to_string()),
        }
    }

    fn client(&mut self, hook: &Webhook) -> Result<HttpClient, HttpClientError> {
        let key = ClientKey {
            ca_file: hook.ca_file.clone(),
            ca_fingerprint: hook
                .ca_file
                .as_deref()
                .and_then(|p| file_fingerprint(p).ok()),
            timeout: hook.request_timeout.get(),
        };
        if let Some((built, client)) = &self.client
            && *built == key
        {
            return Ok(client.clone());
        }
        let client = HttpClient::new(ClientOptions {
            ca_file: key.ca_file.clone(),
            connect_timeout: key.timeout,
            request_timeout: key.timeout,
            max_response_bytes: MAX_RESPONSE_BYTES,
        })?;
        self.client = Some((key, client.clone()));
        Ok(client)
    }

    /// The secret in `path`, read again only when the file changed (one
    /// `stat` per request otherwise).
    fn secret(&mut self, path: &Path) -> Result<Vec<u8>, String> {
        let fingerprint =
            file_fingerprint(path).map_err(|e| format!("secretFile {}: {e}", path.display()))?;
        if let Some((seen, seen_path, secret)) = &self.secret
            && *seen == fingerprint
            && seen_path == path
        {
            return Ok(secret.clone());
        }
        let text =
            std::fs::read(path).map_err(|e| format!("secretFile {}: {e}", path.display()))?;
        let secret = text.trim_ascii().to_vec();
        if secret.is_empty() {
            return Err(format!("secretFile {} is empty", path.display()));
        }
        self.secret = Some((fingerprint, path.to_path_buf(), secret.clone()));
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_trimmed_and_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let mut c = WebhookClient::new();
        assert!(c.secret(&path).unwrap_err().contains("secretFile"));
        std::fs::write(&path, "  one\n").unwrap();
        assert_eq!(c.secret(&path).unwrap(), b"one");
        std::fs::write(&path, "second-longer\n").unwrap();
        assert_eq!(c.secret(&path).unwrap(), b"second-longer");
        std::fs::write(&path, "\n").unwrap();
        assert!(c.secret(&path).unwrap_err().contains("empty"));
    }
}
