//! Shared by the `delivery_*` tests: a relay's delivery workers (no
//! inbound side) over a real queue, and helpers to enqueue and wait.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use petrel_crds::config::RelayConfig;
use petrel_relay::delivery::{self, DeliveryContext};
use petrel_relay::metrics::RelayMetrics;
use petrel_relay::queue::{self, Backend, MessageFlags, NewMessage, now_millis};
use petrel_relay::reload::Reloading;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single test.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A config delivering by MX through `dns` to port `mx_port`, with a
/// Redis queue at `redis_url` and a one-second retry schedule.
pub fn mx_config(redis_url: &str, dns: SocketAddr, mx_port: u16) -> RelayConfig {
    let yaml = format!(
        r#"
hostname: relay.test
listeners:
  - name: smtp
    address: 127.0.0.1:2525
domains: []
queue:
  redis:
    url: "{redis_url}"
  lease: 30s
delivery:
  transport: mx
  mx:
    port: {mx_port}
    nameservers: ["{dns}"]
  retrySchedule: [1s]
  workers: 8
  timeouts:
    connect: 5s
    greeting: 5s
    command: 5s
    data: 5s
"#,
    );
    RelayConfig::from_yaml(&yaml).expect("test config")
}

/// The delivery side of one relay, running until stopped.
pub struct Relay {
    /// Its context (queue, state, metrics).
    pub ctx: Arc<DeliveryContext>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Opens the queue and starts the workers.
    pub async fn start(config: RelayConfig) -> Relay {
        let backend = queue::open(&config.queue).await.expect("queue opens");
        Relay::start_with(config, backend)
    }

    /// Starts workers over an already opened backend.
    pub fn start_with(config: RelayConfig, backend: Backend) -> Relay {
        let (_registry, metrics) = RelayMetrics::standalone();
        let ctx = Arc::new(
            DeliveryContext::new(Reloading::fixed(config), backend, metrics).expect("context"),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(delivery::run(ctx.clone(), async move {
            let _ = rx.await;
        }));
        Relay {
            ctx,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the workers and waits for them.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), task).await;
        }
    }

    /// Recipients delivered according to this relay's metrics.
    pub fn delivered(&self, sending_domain: &str) -> u64 {
        self.ctx
            .metrics
            .delivered
            .with_label_values(&[sending_domain, "other"])
            .get()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A message from `from` to `rcpts`.
pub fn message(id: &str, from: &str, rcpts: &[&str], subject: &str) -> NewMessage {
    let data = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\nMessage-ID: <{id}@example.test>\r\n\r\nHello.\r\n.leading dot\r\n",
        rcpts.join(">, <")
    );
    NewMessage {
        id: id.to_string(),
        mail_from: from.to_string(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
        data: data.into_bytes(),
        sending_domain: from
            .rsplit_once('@')
            .map(|(_, d)| d.to_string())
            .unwrap_or_default(),
        received_at: now_millis(),
        flags: MessageFlags::default(),
        tags: Default::default(),
        header_message_id: Some(format!("{id}@example.test")),
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes. For state
/// that has no event to await (queue depth, DNS query log).
pub async fn until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
