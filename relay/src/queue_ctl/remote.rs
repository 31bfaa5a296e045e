//! The CLI's side of the relay's queue admin API, used when the embedded
//! queue file is held (locked) by a running relay. The relay is found at
//! `http.address` of the same config file (an unspecified address means
//! loopback), with the bearer token from `http.adminTokenFile` when set.
//!
//! | command  | request                                              |
//! |----------|------------------------------------------------------|
//! | stats    | `GET /admin/v1/queue/stats`                          |
//! | list     | `GET /admin/v1/queue/messages?domain=&state=&olderThanMs=` |
//! | show     | `GET /admin/v1/queue/messages/{id}`                  |
//! | retry    | `POST /admin/v1/queue/messages/{id}/retry`, `POST /admin/v1/queue/retry?domain=` |
//! | bounce   | `POST /admin/v1/queue/messages/{id}/bounce` (`{"reason": ...}`) |
//! | delete   | `DELETE /admin/v1/queue/messages/{id}`               |
//! | hold     | `PUT /admin/v1/queue/holds/{domain}`                 |
//! | release  | `DELETE /admin/v1/queue/holds/{domain}`              |
//!
//! Answers are the command's `--json` output; errors are
//! `{"error": {"message": ...}}` with 400 (usage), 404 (not found),
//! 409 (busy) or 503 (backend).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Command, CtlError, Output, RetryTarget};
use crate::config::RelayConfig;

/// A running relay's admin API.
#[derive(Clone, Debug)]
pub struct Relay {
    /// Its HTTP address.
    pub address: SocketAddr,
    /// The bearer token, when `http.adminTokenFile` is set.
    pub token: Option<String>,
}

impl Relay {
    /// The relay that `config` describes.
    pub async fn of(config: &RelayConfig) -> Result<Relay, CtlError> {
        let mut address = config.http.address;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let token = match &config.http.admin_token_file {
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map(|t| t.trim().to_string())
                    .map_err(|e| CtlError::Admin {
                        address: address.to_string(),
                        reason: format!("reading http.adminTokenFile {}: {e}", path.display()),
                    })?,
            ),
            None => None,
        };
        Ok(Relay { address, token })
    }

    /// Runs `command` on the relay.
    pub async fn execute(&self, command: Command) -> Result<Output, CtlError> {
        let (method, path, body) = request_of(&command);
        let (status, body) = self.send(method, &path, body.as_deref()).await?;
        if status != 200 {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(match status {
                400 => CtlError::Usage(message),
                404 => CtlError::NotFound(message),
                409 => CtlError::Busy(message),
                _ => self.admin_error(format!("HTTP {status}: {message}")),
            });
        }
        let parsed = match command {
            Command::Stats => serde_json::from_slice(&body).map(Output::Stats),
            Command::List(_) => serde_json::from_slice(&body).map(Output::List),
            Command::Show { .. } => serde_json::from_slice(&body).map(Output::Show),
            _ => serde_json::from_slice(&body).map(Output::Action),
        };
        parsed.map_err(|e| self.admin_error(format!("unexpected answer: {e}")))
    }

    fn admin_error(&self, reason: String) -> CtlError {
        CtlError::Admin {
            address: self.address.to_string(),
            reason,
        }
    }

    /// One HTTP/1.1 exchange (`Connection: close`): (status, body).
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), CtlError> {
        let address = self.address;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| format!("cannot connect (is the relay running?): {e}"))?;
            let auth = self
                .token
                .as_deref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let body = body.unwrap_or_default();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(body).await.map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            stream
                .take(256 * 1024 * 1024)
                .read_to_end(&mut response)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .map_err(|_| self.admin_error("timed out".into()))?
            .map_err(|e| self.admin_error(e))?;
        parse_response(&response).map_err(|e| self.admin_error(e))
    }
}

/// Status and body of a raw HTTP/1.1 response (chunked or not).
fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = &response[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        crate::events::tail::dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The method, path and body of `command`.
fn request_of(command: &Command) -> (&'static str, String, Option<Vec<u8>>) {
    const BASE: &str = "/admin/v1/queue";
    match command {
        Command::Stats => ("GET", format!("{BASE}/stats"), None),
        Command::List(f) => {
            let mut query = Vec::new();
            if let Some(d) = &f.domain {
                query.push(format!("domain={}", encode(d)));
            }
            if let Some(s) = f.state {
                query.push(format!("state={}", s.as_str()));
            }
            if let Some(ms) = f.older_than_ms {
                query.push(format!("olderThanMs={ms}"));
            }
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            ("GET", format!("{BASE}/messages{q}"), None)
        }
        Command::Show { id } => ("GET", format!("{BASE}/messages/{}", encode(id)), None),
        Command::Retry {
            target: RetryTarget::Id(id),
        } => (
            "POST",
            format!("{BASE}/messages/{}/retry", encode(id)),
            None,
        ),
        Command::Retry {
            target: RetryTarget::Domain(d),
        } => ("POST", format!("{BASE}/retry?domain={}", encode(d)), None),
        Command::Bounce { id, reason } => (
            "POST",
            format!("{BASE}/messages/{}/bounce", encode(id)),
            Some(
                serde_json::json!({ "reason": reason })
                    .to_string()
                    .into_bytes(),
            ),
        ),
        Command::Delete { id } => ("DELETE", format!("{BASE}/messages/{}", encode(id)), None),
        Command::Hold { domain } => ("PUT", format!("{BASE}/holds/{}", encode(domain)), None),
        Command::Release { domain } => ("DELETE", format!("{BASE}/holds/{}", encode(domain)), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_ids_and_filters() {
        let (m, p, _) = request_of(&Command::List(super::super::ListFilter {
            domain: Some("x.org".into()),
            state: Some(crate::queue::UnitState::Deferred),
            older_than_ms: Some(5),
        }));
        assert_eq!(
            (m, p.as_str()),
            (
                "GET",
                "/admin/v1/queue/messages?domain=x.org&state=deferred&olderThanMs=5"
            )
        );
        let (m, p, _) = request_of(&Command::Delete { id: "a b/c".into() });
        assert_eq!(
            (m, p.as_str()),
            ("DELETE", "/admin/v1/queue/messages/a%20b%2Fc")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}").unwrap(),
            (404, b"{}".to_vec())
        );
    }
}
