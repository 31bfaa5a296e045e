//! The loop of one webhook in one pod: claim events from the webhook's
//! consumer group, skip unwanted types, send batches, retry failures with
//! backoff for `retryFor`, then drop (counted and logged), ack.
//!
//! It runs in its own task and touches nothing of delivery's but the queue
//! backend, so a slow or dead endpoint delays only its own events. Events
//! it has claimed stay claimed while it lives: it renews the claim while it
//! waits, so other pods take them over only once it is gone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::webhook_backoff::{backoff, gives_up, reclaim_after, renew_every};
use super::webhook_batch::{Batch, Bounds, plan};
use super::webhook_client::{Outcome, WebhookClient};
use super::{EventLog, EventSeq, StoredEvent};
use crate::config::Webhook;
use crate::metrics::WebhookMetrics;
use crate::queue::now_millis;

/// Wait between polls of an empty consumer group.
pub const IDLE_POLL: Duration = Duration::from_millis(500);

/// First wait after a backend error; doubled up to [`BACKEND_PAUSE_MAX`].
const BACKEND_PAUSE: Duration = Duration::from_millis(500);
const BACKEND_PAUSE_MAX: Duration = Duration::from_secs(30);

/// The consumer group of a webhook.
pub fn group_name(webhook: &str) -> String {
    format!("webhook:{webhook}")
}

/// This process's consumer name: the pod name (`$HOSTNAME`, else the
/// configured hostname) plus a random suffix, so a restarted container does
/// not inherit the claims of the one that died (those are taken over after
/// their reclaim time, by whichever pod claims first).
pub fn consumer_name(configured_hostname: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| configured_hostname.to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// What every dispatcher of this pod shares.
pub struct Dispatch {
    /// The event log of the queue backend.
    pub log: Arc<dyn EventLog>,
    /// Webhook metrics.
    pub metrics: WebhookMetrics,
    /// This pod's consumer name in every group (unique per process).
    pub consumer: String,
}

/// How a batch ended.
enum Sent {
    /// The receiver answered 2xx.
    Delivered,
    /// Retried for `retryFor` and given up.
    Dropped,
    /// The relay is stopping; the events stay claimed.
    Stopped,
}

/// Runs one webhook until `stop` turns true (or the task is aborted because
/// the webhook was removed). `hook` carries its latest config.
pub async fn run(
    dispatch: Arc<Dispatch>,
    hook: watch::Receiver<Arc<Webhook>>,
    stop: watch::Receiver<bool>,
) {
    let name = hook.borrow().name.clone();
    let mut d = Dispatcher {
        group: group_name(&name),
        name,
        dispatch,
        hook,
        stop,
        client: WebhookClient::new(),
        pending: VecDeque::new(),
    };
    d.run().await;
}

struct Dispatcher {
    name: String,
    group: String,
    dispatch: Arc<Dispatch>,
    hook: watch::Receiver<Arc<Webhook>>,
    stop: watch::Receiver<bool>,
    client: WebhookClient,
    /// Claimed, not yet sent or acked, in log order.
    pending: VecDeque<StoredEvent>,
}

impl Dispatcher {
    async fn run(&mut self) {
        let mut errors = 0;
        while let Err(error) = self.dispatch.log.ensure_group(&self.group).await {
            errors += 1;
            tracing::warn!(webhook = %self.name, %error, "cannot create the webhook's consumer group; retrying");
            if !self.pause(backend_pause(errors)).await {
                return;
            }
        }
        tracing::info!(webhook = %self.name, consumer = %self.dispatch.consumer, "webhook dispatcher started");
        let mut errors = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let hook = self.hook.borrow().clone();
            if self.pending.is_empty() {
                let claimed = self
                    .dispatch
                    .log
                    .claim(
                        &self.group,
                        &self.dispatch.consumer,
                        hook.batch_max_events as usize,
                        reclaim_after(hook.request_timeout.get()),
                    )
                    .await;
                match claimed {
                    Ok(events) if events.is_empty() => {
                        errors = 0;
                        if !self.pause(IDLE_POLL).await {
                            return;
                        }
                        continue;
                    }
                    Ok(events) => {
                        errors = 0;
                        self.pending.extend(events);
                    }
                    Err(error) => {
                        errors += 1;
                        tracing::warn!(webhook = %self.name, %error, "cannot claim events; retrying");
                        if !self.pause(backend_pause(errors)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let bounds = Bounds {
                max_events: hook.batch_max_events as usize,
                max_bytes: hook.batch_max_bytes as usize,
            };
            let plan = plan(
                &mut self.pending,
                |e| hook.wants(e.kind.as_str()),
                bounds,
                &self.name,
            );
            if !plan.unencodable.is_empty() {
                tracing::error!(
                    webhook = %self.name,
                    events = plan.unencodable.len(),
                    "events could not be encoded as JSON; acknowledged without sending"
                );
            }
            let unsent: Vec<EventSeq> = plan.skipped.into_iter().chain(plan.unencodable).collect();
            if !unsent.is_empty() && !self.ack(&unsent).await {
                return;
            }
            let Some(batch) = plan.batch else { continue };
            match self.send(&batch).await {
                Sent::Delivered | Sent::Dropped => {
                    if !self.ack(&batch.seqs).await {
                        return;
                    }
                }
                Sent::Stopped => return,
            }
        }
    }

    /// Sends `batch` until it is delivered, given up, or the relay stops.
    async fn send(&mut self, batch: &Batch) -> Sent {
        let mut failures: u32 = 0;
        let mut first_failure = None;
        loop {
            let hook = self.hook.borrow().clone();
            let now_secs = now_millis() / 1000;
            let outcome = tokio::select! {
                outcome = self.client.send(&hook, batch, now_secs) => outcome,
                _ = stopped(self.stop.clone()) => return Sent::Stopped,
            };
            if let Some(label) = outcome.label() {
                self.dispatch
                    .metrics
                    .requests
                    .with_label_values(&[&self.name, label])
                    .inc();
            }
            if outcome == Outcome::Success {
                if failures > 0 {
                    tracing::info!(webhook = %self.name, batch = %batch.id, attempts = failures + 1, "webhook batch delivered after retrying");
                }
                return Sent::Delivered;
            }
            failures += 1;
            let now = now_millis();
            let first = *first_failure.get_or_insert(now);
            if gives_up(first, now, hook.retry_for.get()) {
                self.dispatch
                    .metrics
                    .requests
                    .with_label_values(&[&self.name, "dropped"])
                    .inc();
                self.dispatch
                    .metrics
                    .dropped_events
                    .with_label_values(&[&self.name])
                    .inc_by(batch.seqs.len() as u64);
                tracing::error!(
                    webhook = %self.name,
                    batch = %batch.id,
                    events = batch.seqs.len(),
                    attempts = failures,
                    last = ?outcome,
                    "webhook batch dropped: retried for {} without success",
                    hook.retry_for
                );
                return Sent::Dropped;
            }
            let wait = backoff(
                failures,
                hook.retry_initial_backoff.get(),
                hook.retry_max_backoff.get(),
                rand::random::<f64>(),
            );
            tracing::warn!(
                webhook = %self.name,
                batch = %batch.id,
                attempt = failures,
                outcome = ?outcome,
                retry_in = ?wait,
                "webhook request failed; retrying"
            );
            if !self
                .pause_renewing(wait, batch, hook.request_timeout.get())
                .await
            {
                return Sent::Stopped;
            }
        }
    }

    /// Waits `wait`, renewing the claim of `batch` and of the pending events
    /// every [`renew_every`] and once more at the end, right before the next
    /// attempt. False when the relay is stopping.
    async fn pause_renewing(&mut self, wait: Duration, batch: &Batch, timeout: Duration) -> bool {
        let mut left = wait;
        loop {
            let step = left.min(renew_every(timeout));
            if !self.pause(step).await {
                return false;
            }
            left -= step;
            let seqs: Vec<EventSeq> = batch
                .seqs
                .iter()
                .cloned()
                .chain(self.pending.iter().map(|e| e.seq.clone()))
                .collect();
            match self
                .dispatch
                .log
                .renew(&self.group, &self.dispatch.consumer, &seqs)
                .await
            {
                Ok(held) if held < seqs.len() as u64 => tracing::warn!(
                    webhook = %self.name,
                    held,
                    claimed = seqs.len(),
                    "another consumer took over some retrying events; they may be sent twice"
                ),
                Ok(_) => {}
                // Not fatal: at worst another pod sends these too, and
                // receivers dedupe by event id.
                Err(error) => {
                    tracing::warn!(webhook = %self.name, %error, "cannot renew the claim of retrying events")
                }
            }
            if left.is_zero() {
                return true;
            }
        }
    }

    /// Acks `seqs`, retrying backend errors. False when the relay is
    /// stopping first (the events are then sent again later: at least once).
    async fn ack(&mut self, seqs: &[EventSeq]) -> bool {
        let mut errors = 0;
        loop {
            match self.dispatch.log.ack(&self.group, seqs).await {
                Ok(()) => return true,
                Err(error) => {
                    errors += 1;
                    tracing::warn!(webhook = %self.name, %error, "cannot acknowledge events; retrying");
                    if !self.pause(backend_pause(errors)).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps `d`; false when the relay stops first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stopped(self.stop.clone()) => false,
        }
    }
}

fn backend_pause(errors: u32) -> Duration {
    backoff(
        errors,
        BACKEND_PAUSE,
        BACKEND_PAUSE_MAX,
        rand::random::<f64>(),
    )
}

/// Completes once the stop flag turns true.
pub(super) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use axum::http::StatusCode;

    use super::*;
    use crate::events::{Event, EventType};
    use crate::queue::memory::MemoryBackend;

    /// A receiver answering `status` and counting requests.
    async fn receiver(status: Arc<AtomicU16>, hits: Arc<AtomicUsize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let (status, hits) = (status.clone(), hits.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    fn hook(url: &str, secret: &std::path::Path, retry_for: Duration) -> Webhook {
        let mut w = Webhook::new("app", url, secret);
        w.retry_initial_backoff = Duration::from_millis(20).into();
        w.retry_max_backoff = Duration::from_millis(50).into();
        w.retry_for = retry_for.into();
        w
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    async fn acked(log: &MemoryBackend) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while log.backlog("webhook:app").await.unwrap().pending != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("timed out waiting for the ack");
    }

    #[tokio::test]
    async fn a_batch_given_up_after_retry_for_is_acked_counted_and_never_silent() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let status = Arc::new(AtomicU16::new(503));
        let hits = Arc::new(AtomicUsize::new(0));
        let url = receiver(status.clone(), hits.clone()).await;
        let log = Arc::new(MemoryBackend::default());
        let events: Vec<Event> = (0..3)
            .map(|i| Event::new(EventType::Delivered, "relay", 1_000 + i))
            .collect();
        log.publish(&events).await.unwrap();
        let registry = prometheus::Registry::new();
        let metrics = WebhookMetrics::register(&registry).unwrap();
        let dispatch = Arc::new(Dispatch {
            log: log.clone(),
            metrics: metrics.clone(),
            consumer: "pod-a".into(),
        });
        let (_hook_tx, hook_rx) =
            watch::channel(Arc::new(hook(&url, &secret, Duration::from_millis(200))));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(dispatch, hook_rx, stop_rx));
        let dropped = || {
            metrics
                .requests
                .with_label_values(&["app", "dropped"])
                .get()
        };
        until("the drop", || dropped() == 1).await;
        assert!(hits.load(Ordering::SeqCst) >= 2, "retried before dropping");
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["app", "http_error"])
                .get() as usize,
            hits.load(Ordering::SeqCst)
        );
        assert_eq!(metrics.dropped_events.with_label_values(&["app"]).get(), 3);
        // Dropped means acked: nothing is owed any more.
        acked(&log).await;
        stop_tx.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn refused_batches_are_retried_until_accepted_then_acked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let status = Arc::new(AtomicU16::new(500));
        let hits = Arc::new(AtomicUsize::new(0));
        let url = receiver(status.clone(), hits.clone()).await;
        let log = Arc::new(MemoryBackend::default());
        let events: Vec<Event> = (0..5)
            .map(|i| Event::new(EventType::Bounced, "relay", 1_000 + i))
            .collect();
        log.publish(&events).await.unwrap();
        let registry = prometheus::Registry::new();
        let metrics = WebhookMetrics::register(&registry).unwrap();
        let dispatch = Arc::new(Dispatch {
            log: log.clone(),
            metrics: metrics.clone(),
            consumer: "pod-a".into(),
        });
        let (_hook_tx, hook_rx) =
            watch::channel(Arc::new(hook(&url, &secret, Duration::from_secs(3600))));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(dispatch, hook_rx, stop_rx));
        until("three refusals", || hits.load(Ordering::SeqCst) >= 3).await;
        // While it retries, the batch stays claimed by this consumer:
        // another one finds nothing to take over.
        let other = log
            .claim("webhook:app", "pod-b", 10, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(
            other.is_empty(),
            "{} events taken over from a live dispatcher",
            other.len()
        );
        status.store(200, Ordering::SeqCst);
        acked(&log).await;
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["app", "success"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["app", "dropped"])
                .get(),
            0
        );
        stop_tx.send_replace(true);
        task.await.unwrap();
    }
}
