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
            if !self.pause_renewing(wait, batch, hook.request_timeout.get()).await {
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
                Err(error) => tracing::warn!(webhook = %self.name, %error, "cannot renew the claim of retrying events"),
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
    backoff(errors, BACKEND_PAUSE, BACKEND_PAUSE_MAX, rand::random::<f64>())
}

/// Completes once the stop flag turns true.
pub(super) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
