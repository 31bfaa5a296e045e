//! `petrel-relay events tail`: events as JSON lines, read from the
//! backend, or, when the embedded queue file is held by a running relay,
//! through that relay's admin API (`GET /admin/v1/events`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{EventLog, EventSeq, EventType, StoredEvent};
use crate::config::RelayConfig;
use crate::queue::QueueError;

/// Events fetched per read.
pub const PAGE: usize = 500;
/// Pause between reads with `--follow` once the end is reached.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Why tailing failed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The backend failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The relay's admin API failed or refused.
    #[error("admin API at {address}: {reason}")]
    Admin {
        /// Where it was asked.
        address: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// A page of the admin API's answer.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EventPage {
    /// The events, in log order.
    pub events: Vec<PageEvent>,
}

/// One event of a page, with its position.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageEvent {
    /// Its position in the log (pass as `after` for the next page).
    pub seq: EventSeq,
    /// When it was stored (ms since the epoch).
    pub stored_at: u64,
    /// The event.
    pub event: super::Event,
}

impl From<StoredEvent> for PageEvent {
    fn from(e: StoredEvent) -> PageEvent {
        PageEvent {
            seq: e.seq,
            stored_at: e.stored_at,
            event: e.event,
        }
    }
}

/// Where events are read from.
pub enum Source {
    /// The backend itself.
    Log(Arc<dyn EventLog>),
    /// A running relay's admin API.
    Admin {
        /// The relay's HTTP address (0.0.0.0 becomes loopback).
        address: SocketAddr,
        /// The bearer token, when `http.adminTokenFile` is set.
        token: Option<String>,
    },
}

impl Source {
    /// The backend, or the relay's admin API when the embedded file is
    /// locked by a running relay.
    pub async fn open(config: &RelayConfig) -> Result<Source, TailError> {
        match crate::queue::open(&config.queue).await {
            Ok(backend) => Ok(Source::Log(backend.events)),
            Err(error) if config.queue.embedded.is_some() => {
                tracing::debug!(%error, "queue file busy; reading through the relay's admin API");
                let mut address = config.http.address;
                if address.ip().is_unspecified() {
                    address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                let token = match &config.http.admin_token_file {
                    Some(path) => Some(
                        read_token(path)
                            .await
                            .map_err(|reason| TailError::Admin { address, reason })?,
                    ),
                    None => None,
                };
                Ok(Source::Admin { address, token })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Up to [`PAGE`] events after `after`.
    pub async fn page(&self, after: Option<&EventSeq>) -> Result<Vec<StoredEvent>, TailError> {
        match self {
            Source::Log(log) => Ok(log.read(after, PAGE).await?),
            Source::Admin { address, token } => {
                let query = match after {
                    Some(seq) => format!("?after={seq}&limit={PAGE}"),
                    None => format!("?limit={PAGE}"),
                };
                let body = http_get(
                    *address,
                    &format!("/admin/v1/events{query}"),
                    token.as_deref(),
                )
                .await
                .map_err(|reason| TailError::Admin {
                    address: *address,
                    reason,
                })?;
                let page: EventPage =
                    serde_json::from_slice(&body).map_err(|e| TailError::Admin {
                        address: *address,
                        reason: format!("unexpected answer: {e}"),
                    })?;
                Ok(page
                    .events
                    .into_iter()
                    .map(|e| StoredEvent {
                        seq: e.seq,
                        stored_at: e.stored_at,
                        event: e.event,
                    })
                    .collect())
            }
        }
    }
}

async fn read_token(path: &Path) -> Result<String, String> {
    tokio::fs::read_to_string(path)
        .await
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("reading http.adminTokenFile {}: {e}", path.display()))
}

/// A minimal HTTP/1.1 GET (one request, `Connection: close`), so the CLI
/// needs no HTTP client library. Returns the body of a 200.
async fn http_get(address: SocketAddr, path: &str, token: Option<&str>) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "timed out".to_string())??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = &response[split + 4..];
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    if status != "200" {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(body)
}

/// The body of a chunked HTTP/1.1 response, joined.
pub(crate) fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("malformed chunk")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "malformed chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Prints events (JSON lines) of `kind` (all when `None`) from the oldest
/// retained on; with `follow`, keeps printing new ones until `stop`.
pub async fn tail(
    source: &Source,
    kind: Option<EventType>,
    follow: bool,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), TailError> {
    let mut after: Option<EventSeq> = None;
    loop {
        let page = source.page(after.as_ref()).await?;
        let full = page.len() == PAGE;
        for stored in page {
            after = Some(stored.seq.clone());
            if kind.is_some_and(|k| k != stored.event.kind) {
                continue;
            }
            let line = serde_json::to_string(&stored.event).map_err(|e| {
                TailError::Queue(QueueError::Corrupt {
                    key: stored.seq.clone(),
                    reason: e.to_string(),
                })
            })?;
            // A closed pipe (`| head`) ends the tail quietly.
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
        if !full {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::queue::memory::MemoryBackend;

    #[tokio::test]
    async fn tail_prints_every_event_of_the_type_once_in_order() {
        let mem = Arc::new(MemoryBackend::default());
        let events: Vec<Event> = (0..(PAGE + 3))
            .map(|i| {
                let kind = if i % 2 == 0 {
                    EventType::Delivered
                } else {
                    EventType::Bounced
                };
                Event::new(kind, "r", 0).with_recipient(&format!("r{i}@x.test"))
            })
            .collect();
        mem.publish(&events).await.unwrap();
        let source = Source::Log(mem);
        let mut out = Vec::new();
        tail(&source, Some(EventType::Bounced), false, &mut out)
            .await
            .unwrap();
        let lines: Vec<Event> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want: Vec<&Event> = events
            .iter()
            .filter(|e| e.kind == EventType::Bounced)
            .collect();
        assert_eq!(lines.len(), want.len());
        assert!(lines.iter().zip(want).all(|(a, b)| a == b));
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"9\r\nabc").is_err());
    }
}
