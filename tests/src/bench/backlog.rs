//! A deep queue before the run: N small messages for a destination that is
//! deferring (every unit postponed a day ahead, as after a 451 with a long
//! retry), written through the queue API rather than SMTP so a million take
//! a minute, not an hour. The bench then measures accept and delivery to
//! another destination against an empty-queue run, and what each queued
//! message costs in Redis memory.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use petrel_relay::queue::{self, MessageFlags, NewMessage, SettleOp, Settlement, now_millis};

use crate::redis::RedisServer;

/// Enqueues (and postpones) in flight at once.
const IN_FLIGHT: usize = 64;
/// Units leased per call while postponing.
const LEASE_BATCH: usize = 1000;

/// What to pre-fill.
#[derive(Debug, Clone)]
pub struct Backlog {
    /// Messages, one recipient each.
    pub messages: u64,
    /// Message size in bytes.
    pub size: usize,
    /// Their (deferring) destination domain: not the bench's `example.net`.
    pub domain: String,
    /// How far ahead every unit is postponed: past the end of the run.
    pub postpone: Duration,
}

impl Default for Backlog {
    fn default() -> Backlog {
        Backlog {
            messages: 1_000_000,
            size: 1024,
            domain: "deferred.example.org".into(),
            postpone: Duration::from_secs(24 * 3600),
        }
    }
}

/// Errors while filling.
#[derive(Debug, thiserror::Error)]
pub enum BacklogError {
    /// Opening the queue or a queue call failed.
    #[error("queue: {0}")]
    Queue(#[from] queue::QueueError),
    /// The queue config did not parse.
    #[error("queue config: {0}")]
    Config(String),
    /// INFO memory failed.
    #[error("redis: {0}")]
    Redis(#[from] crate::redis::RedisError),
}

/// What the fill did.
#[derive(Debug, Clone)]
pub struct Filled {
    /// Messages queued.
    pub messages: u64,
    /// Units postponed (should equal `messages`).
    pub postponed: u64,
    /// Time to enqueue and postpone them all.
    pub elapsed: Duration,
    /// `used_memory` grew by this much.
    pub memory_bytes: u64,
}

impl Filled {
    /// Redis bytes per queued message.
    pub fn bytes_per_message(&self) -> f64 {
        self.memory_bytes as f64 / self.messages.max(1) as f64
    }

    /// One line for the bench's note column.
    pub fn describe(&self) -> String {
        format!(
            "backlog: {} queued ({} postponed) in {:.0}s, redis {:.0} B/msg",
            self.messages,
            self.postponed,
            self.elapsed.as_secs_f64(),
            self.bytes_per_message()
        )
    }
}

/// `used_memory` from `INFO memory`.
pub fn used_memory(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn memory(redis: &RedisServer) -> Result<u64, BacklogError> {
    let info = redis.raw_command(&["INFO", "memory"]).await?;
    Ok(used_memory(&info).unwrap_or(0))
}

fn message(index: u64, backlog: &Backlog, body: &[u8]) -> NewMessage {
    let id = format!("backlog{index:08}");
    let rcpt = format!("u{index}@{}", backlog.domain);
    let mut data = format!(
        "From: <sender@example.test>\r\nTo: <{rcpt}>\r\nSubject: backlog {index}\r\nMessage-ID: <{id}@example.test>\r\n\r\n"
    )
    .into_bytes();
    data.extend_from_slice(&body[..backlog.size.saturating_sub(data.len()).min(body.len())]);
    NewMessage {
        id: id.clone(),
        mail_from: "sender@example.test".into(),
        recipients: vec![rcpt],
        data,
        sending_domain: "example.test".into(),
        received_at: now_millis(),
        flags: MessageFlags::default(),
        tags: Default::default(),
        header_message_id: Some(format!("{id}@example.test")),
    }
}

/// Fills the queue at `redis` (prefix `petrel`, as the bench's relays use)
/// before any relay runs: enqueue every message, then lease them all and
/// postpone each, so the units sit in the queue not yet due.
pub async fn fill(redis: &RedisServer, backlog: &Backlog) -> Result<Filled, BacklogError> {
    let config: petrel_crds::config::QueueConfig =
        serde_json::from_value(serde_json::json!({ "redis": { "url": redis.url() } }))
            .map_err(|e| BacklogError::Config(e.to_string()))?;
    let backend = queue::open(&config).await?;
    let before = memory(redis).await?;
    let start = Instant::now();
    let mut line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
            .repeat(backlog.size / 76 + 1);
    line.truncate(backlog.size);
    let body = line;
    let q = backend.queue.clone();
    let results: Vec<Result<(), queue::QueueError>> = futures::stream::iter(0..backlog.messages)
        .map(|i| {
            let q = q.clone();
            let m = message(i, backlog, &body);
            async move { q.enqueue(m, Vec::new()).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(e.into());
    }
    let until = now_millis() + backlog.postpone.as_millis() as u64;
    let mut postponed = 0u64;
    loop {
        let leases = q
            .lease(now_millis(), LEASE_BATCH, Duration::from_secs(3600))
            .await?;
        if leases.is_empty() {
            break;
        }
        let n = leases.len() as u64;
        let settled: Vec<Result<(), queue::QueueError>> = futures::stream::iter(leases)
            .map(|lease| {
                let q = q.clone();
                async move {
                    q.settle(&lease, Settlement::only(SettleOp::Postpone { until }))
                        .await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        if let Some(Err(e)) = settled.into_iter().find(Result::is_err) {
            return Err(e.into());
        }
        postponed += n;
    }
    let elapsed = start.elapsed();
    let after = memory(redis).await?;
    Ok(Filled {
        messages: backlog.messages,
        postponed,
        elapsed,
        memory_bytes: after.saturating_sub(before),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_used_memory() {
        let info = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n";
        assert_eq!(used_memory(info), Some(1_048_576));
        assert_eq!(used_memory("# Memory\r\n"), None);
    }

    #[test]
    fn messages_have_the_asked_size_and_destination() {
        let b = Backlog::default();
        let body = vec![b'x'; 2048];
        let m = message(7, &b, &body);
        assert_eq!(m.data.len(), 1024);
        assert_eq!(m.recipients, vec!["u7@deferred.example.org".to_string()]);
    }

    /// A small fill against a real Redis: every unit postponed, none due.
    #[tokio::test]
    async fn fills_and_postpones_every_message() {
        let redis = crate::redis::RedisServer::start().await.unwrap();
        let backlog = Backlog {
            messages: 300,
            ..Backlog::default()
        };
        let filled = fill(&redis, &backlog).await.unwrap();
        assert_eq!(filled.messages, 300);
        assert_eq!(filled.postponed, 300);
        assert!(filled.memory_bytes > 300 * 1024, "{filled:?}");
        let config: petrel_crds::config::QueueConfig =
            serde_json::from_value(serde_json::json!({ "redis": { "url": redis.url() } })).unwrap();
        let backend = queue::open(&config).await.unwrap();
        let due = backend
            .queue
            .lease(now_millis(), 10, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(due.is_empty());
        let stats = backend.queue.stats(now_millis()).await.unwrap();
        assert_eq!(stats.deferred, 300, "{stats:?}");
    }
}
