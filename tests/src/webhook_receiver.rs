//! A webhook receiver for end-to-end tests and the bench: an HTTP server on
//! 127.0.0.1 that checks every request's `Petrel-Signature` exactly as the
//! README tells receivers to (HMAC-SHA256 over `"<t>.<raw body>"`, constant
//! time comparison, `t` within five minutes), answers with a scripted
//! status, and records the events of the batches it accepted by event id.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ring::hmac;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Largest clock difference a signature's `t` may show (replay guard).
pub const TOLERANCE_SECS: u64 = 300;

/// One distinct event received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The event as JSON.
    pub event: serde_json::Value,
    /// How many accepted requests carried it (more than 1: a duplicate).
    pub copies: u64,
}

#[derive(Default)]
struct Records {
    by_id: HashMap<String, Received>,
    batch_ids: HashMap<String, u64>,
}

struct Shared {
    key: hmac::Key,
    status: AtomicU16,
    records: Mutex<Records>,
    requests: AtomicU64,
    refused: AtomicU64,
    bad_signatures: AtomicU64,
    duplicates: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running receiver; stops when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl WebhookReceiver {
    /// Listens on a free 127.0.0.1 port, verifying with `secret`.
    pub async fn start(secret: &[u8]) -> std::io::Result<WebhookReceiver> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), secret).await
    }

    /// Listens on `addr` (the same port again after a restart).
    pub async fn start_on(addr: SocketAddr, secret: &[u8]) -> std::io::Result<WebhookReceiver> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            status: AtomicU16::new(200),
            records: Mutex::new(Records::default()),
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(WebhookReceiver { addr, shared, task })
    }

    /// The URL to configure: `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The status correctly signed requests get from now on (200 accepts;
    /// anything else refuses, and their events are not recorded).
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Requests received (any outcome).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Correctly signed requests answered with a non-2xx status.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Requests whose signature did not verify (answered 401).
    pub fn bad_signatures(&self) -> u64 {
        self.shared.bad_signatures.load(Ordering::SeqCst)
    }

    /// Copies of already-recorded events in accepted requests.
    pub fn duplicates(&self) -> u64 {
        self.shared.duplicates.load(Ordering::SeqCst)
    }

    /// Distinct events recorded.
    pub fn unique(&self) -> usize {
        self.shared.records().by_id.len()
    }

    /// Distinct events by id.
    pub fn events(&self) -> HashMap<String, Received> {
        self.shared.records().by_id.clone()
    }

    /// Distinct events counted by `type`.
    pub fn counts_by_type(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in self.shared.records().by_id.values() {
            let kind = r.event["type"].as_str().unwrap_or("?").to_string();
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }

    /// Accepted requests by `Petrel-Webhook-Id`.
    pub fn batch_ids(&self) -> HashMap<String, u64> {
        self.shared.records().batch_ids.clone()
    }

    /// Waits until `done(self)` holds, re-checking after every request;
    /// false on timeout.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.changed.notified();
                if done(self) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Verifies `Petrel-Signature: t=<unix seconds>,v1=<hex>` over `body`, the
/// way a receiver should: recompute, compare in constant time, bound `t`.
pub fn verify(key: &hmac::Key, header: &str, body: &[u8], now_secs: u64) -> Result<(), String> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1.push(value.to_string()),
            _ => {}
        }
    }
    let t = t.ok_or("no t=")?;
    if t.abs_diff(now_secs) > TOLERANCE_SECS {
        return Err(format!(
            "t={t} is more than {TOLERANCE_SECS}s from now ({now_secs})"
        ));
    }
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let ok = v1
        .iter()
        .any(|hex| decode_hex(hex).is_some_and(|tag| hmac::verify(key, &signed, &tag).is_ok()));
    if ok {
        Ok(())
    } else {
        Err("no v1 signature matches".into())
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let status = answer(&shared, &headers, &body);
    shared.changed.notify_waiters();
    status
}

fn answer(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let signed = header("petrel-signature")
        .ok_or_else(|| "no Petrel-Signature".to_string())
        .and_then(|sig| verify(&shared.key, sig, body, now));
    let well_formed = header("content-type") == Some("application/json")
        && header("petrel-webhook-id").is_some_and(|id| !id.is_empty());
    if signed.is_err() || !well_formed {
        shared.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let status =
        StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
    if !status.is_success() {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return status;
    }
    let Ok(serde_json::Value::Array(events)) = serde_json::from_slice(body) else {
        shared.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::BAD_REQUEST;
    };
    let mut records = shared.records();
    let batch = header("petrel-webhook-id").unwrap_or_default().to_string();
    *records.batch_ids.entry(batch).or_default() += 1;
    for event in events {
        let Some(id) = event["id"].as_str().map(str::to_string) else {
            continue;
        };
        match records.by_id.get_mut(&id) {
            Some(r) => {
                r.copies += 1;
                shared.duplicates.fetch_add(1, Ordering::SeqCst);
            }
            None => {
                records.by_id.insert(id, Received { event, copies: 1 });
            }
        }
    }
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_the_documented_scheme_and_nothing_else() {
        // Same known answer as the relay's signing test (openssl dgst).
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"whsec_test");
        let body = br#"[{"id":"e1"}]"#;
        let good =
            "t=1700000000,v1=deed8f23c4bf6ec8f91ef00e83532840aff216f763db777f9fe35c503898d820";
        assert_eq!(verify(&key, good, body, 1_700_000_100), Ok(()));
        assert!(verify(&key, good, br#"[{"id":"e2"}]"#, 1_700_000_100).is_err());
        assert!(verify(&key, good, body, 1_700_000_000 + TOLERANCE_SECS + 1).is_err());
        assert!(verify(&key, "v1=00", body, 1_700_000_000).is_err());
    }
}
