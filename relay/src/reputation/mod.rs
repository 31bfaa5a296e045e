//! The reputation guard (SES-style pause): per sending domain, over a
//! rolling window shared by every pod, the hard-bounce rate and the
//! complaint rate; a domain over a threshold is paused, at half of one it
//! warns.
//!
//! ```text
//! outbox events --consumer--> store (shared counters) --guard.evaluate--> record
//!   (delivered, bounced,        rates::assess + state::next (pure)     (ok|warning|paused)
//!    complained)                                                            |
//!   MAIL FROM / POST /v1/send: 451 4.7.1 / 503   <-- guard.recent_refusal --+
//!   delivery worker: units held (Postpone)       <-- guard.recently_paused -+
//!   GET /admin/v1/reputation, POST .../resume    (endpoints)
//! ```
//!
//! Every decision takes the time as an argument, so tests run the window
//! on a fake clock; only the background task ([`run`]) and the HTTP
//! handlers read the real one.

pub mod consumer;
pub mod endpoints;
pub mod metrics;
pub mod pauses;
pub mod rates;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use metrics::ReputationMetrics;
pub use pauses::Pauses;
pub use rates::{Counts, Level, Reason};
pub use state::DomainState;
pub use store::Store;

use crate::config::{RelayConfig, SendingDomain};
use crate::events::EventLog;
use crate::queue::{Millis, QueueError, SharedState, now_millis};
use crate::refusal::Refusal;
use crate::reload::Reloading;

/// How often every domain is evaluated even without new events (windows
/// roll, `autoResumeAfter` runs out, pauses made by another pod show up
/// in this pod's metrics).
pub const EVALUATE_EVERY: Duration = Duration::from_secs(10);
/// Pause between outbox reads once the group is caught up.
pub const POLL: Duration = Duration::from_secs(1);
/// How long a held unit waits before the worker looks at its domain again.
pub const HOLD_FOR: Duration = Duration::from_secs(60);

/// Reads and changes the shared reputation of sending domains. Cheap to
/// clone; clones share this pod's recent answers ([`Pauses`]), so one
/// guard per process should be cloned to every part that asks.
#[derive(Clone)]
pub struct Guard {
    config: Reloading<RelayConfig>,
    store: Store,
    pauses: Pauses,
}

impl Guard {
    /// Over the backend's shared state.
    pub fn new(config: Reloading<RelayConfig>, state: Arc<dyn SharedState>) -> Guard {
        Guard {
            config,
            store: Store::new(state),
            pauses: Pauses::default(),
        }
    }

    /// The shared counters and records.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The config the guard reads thresholds from.
    pub fn config(&self) -> Arc<RelayConfig> {
        self.config.get()
    }

    /// The refusal new mail from `sending` gets while it is paused, read
    /// from the shared record now.
    pub async fn refusal(&self, sending: &SendingDomain) -> Result<Option<Refusal>, QueueError> {
        if !sending.reputation.enabled {
            return Ok(None);
        }
        self.read_refusal(sending.domain.to_ascii_lowercase(), now_millis())
            .await
    }

    /// Reads `domain`'s record and notes the answer as of `now`.
    async fn read_refusal(
        &self,
        domain: String,
        now: Millis,
    ) -> Result<Option<Refusal>, QueueError> {
        let record = self.store.load(&domain).await?;
        self.pauses.note(&domain, &record, now);
        Ok(record.is_paused().then(|| Refusal::Paused {
            why: record.message.unwrap_or_else(|| "reputation".into()),
            domain,
        }))
    }

    /// [`refusal`](Self::refusal) for the hot paths: this pod's answer of
    /// the last [`pauses::FRESH_FOR`] at `now` if it has one, else read.
    pub async fn recent_refusal(
        &self,
        sending: &SendingDomain,
        now: Millis,
    ) -> Result<Option<Refusal>, QueueError> {
        if !sending.reputation.enabled {
            return Ok(None);
        }
        let domain = sending.domain.to_ascii_lowercase();
        match self.pauses.fresh(&domain, now) {
            Some(paused) => Ok(paused.map(|why| Refusal::Paused { why, domain })),
            None => self.read_refusal(domain, now).await,
        }
    }

    /// Whether queued mail of `domain` (a sending domain) is held, read
    /// from the shared record now.
    pub async fn is_paused(&self, domain: &str) -> Result<bool, QueueError> {
        let config = self.config.get();
        match config.domain(domain) {
            Some(sending) => Ok(self.refusal(sending).await?.is_some()),
            None => Ok(false),
        }
    }

    /// [`is_paused`](Self::is_paused) for the hot paths, as
    /// [`recent_refusal`](Self::recent_refusal).
    pub async fn recently_paused(&self, domain: &str, now: Millis) -> Result<bool, QueueError> {
        let config = self.config.get();
        match config.domain(domain) {
            Some(sending) => Ok(self.recent_refusal(sending, now).await?.is_some()),
            None => Ok(false),
        }
    }

    /// Counts `sending`'s window at `now`, decides, and stores what
    /// changed; returns the record as it now stands.
    pub async fn evaluate(
        &self,
        sending: &SendingDomain,
        now: Millis,
    ) -> Result<DomainState, QueueError> {
        let domain = sending.domain.to_ascii_lowercase();
        let config = &sending.reputation;
        let stored = self.store.load(&domain).await?;
        let counts = self
            .store
            .counts(&domain, stored.generation, config.window.into(), now)
            .await?;
        let verdict = rates::assess(&counts, config);
        let record = match state::next(&stored, counts, &verdict, config, now) {
            state::Change::Keep => {
                self.pauses.note(&domain, &stored, now_millis());
                return Ok(stored);
            }
            state::Change::Store(record) => record,
            state::Change::AutoResume => state::resumed(&stored),
        };
        // A resume by another pod since the load wins over this evaluation.
        let current = self.store.load(&domain).await?;
        if current.generation != stored.generation {
            self.pauses.note(&domain, &current, now_millis());
            return Ok(current);
        }
        self.store.save(&domain, &record).await?;
        self.pauses.note(&domain, &record, now_millis());
        log_change(&domain, &stored, &record);
        Ok(record)
    }

    /// Every configured domain, evaluated at `now`, in config order.
    pub async fn evaluate_all(
        &self,
        now: Millis,
    ) -> Result<Vec<(String, DomainState)>, QueueError> {
        let config = self.config.get();
        let mut out = Vec::with_capacity(config.domains.len());
        for sending in &config.domains {
            let record = self.evaluate(sending, now).await?;
            out.push((sending.domain.to_ascii_lowercase(), record));
        }
        Ok(out)
    }

    /// Resumes `domain` and starts a new window; `None` when it is not a
    /// configured sending domain.
    pub async fn resume(&self, domain: &str) -> Result<Option<DomainState>, QueueError> {
        let config = self.config.get();
        let Some(sending) = config.domain(domain) else {
            return Ok(None);
        };
        let domain = sending.domain.to_ascii_lowercase();
        let stored = self.store.load(&domain).await?;
        let record = state::resumed(&stored);
        self.store.save(&domain, &record).await?;
        self.pauses.note(&domain, &record, now_millis());
        tracing::info!(event = "reputation_resumed", %domain, was = ?stored.level, "sending domain resumed; window reset");
        Ok(Some(record))
    }
}

fn log_change(domain: &str, before: &DomainState, after: &DomainState) {
    if before.level == after.level && before.generation == after.generation {
        return;
    }
    let message = after.message.as_deref().unwrap_or("");
    match after.level {
        Level::Paused => {
            tracing::error!(event = "reputation_paused", %domain, reason = ?after.reason, message, "sending domain paused")
        }
        Level::Warning => {
            tracing::warn!(event = "reputation_warning", %domain, reason = ?after.reason, message, "sending domain near a reputation threshold")
        }
        Level::Ok if after.generation != before.generation => {
            tracing::info!(event = "reputation_resumed", %domain, "pause ran out (autoResumeAfter); window reset")
        }
        Level::Ok => {
            tracing::info!(event = "reputation_ok", %domain, "sending domain back below its warning thresholds")
        }
    }
}

/// Feeds the windows from the outbox and evaluates every domain, until
/// `stop` turns true. One per pod; the consumer group shares the work.
pub async fn run(
    guard: Guard,
    log: Arc<dyn EventLog>,
    metrics: ReputationMetrics,
    consumer: String,
    mut stop: watch::Receiver<bool>,
) {
    while let Err(error) = log.ensure_group(consumer::GROUP).await {
        tracing::warn!(%error, "cannot create the reputation consumer group; retrying");
        tokio::select! {
            _ = crate::inbound::stopping(&mut stop) => return,
            _ = tokio::time::sleep(POLL * 5) => {}
        }
    }
    let mut last_evaluation: Option<tokio::time::Instant> = None;
    loop {
        let config = guard.config();
        let now = now_millis();
        let mut caught_up = true;
        match consumer::consume_once(log.as_ref(), guard.store(), &config, &consumer, now).await {
            Ok((touched, read)) => {
                caught_up = read < consumer::BATCH;
                for domain in touched {
                    if let Some(sending) = config.domain(&domain) {
                        match guard.evaluate(sending, now).await {
                            Ok(record) => metrics.show(&domain, &record),
                            Err(error) => {
                                tracing::warn!(%error, %domain, "cannot evaluate reputation")
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the outbox for reputation counts"),
        }
        if last_evaluation.is_none_or(|t| t.elapsed() >= EVALUATE_EVERY) {
            last_evaluation = Some(tokio::time::Instant::now());
            match guard.evaluate_all(now).await {
                Ok(all) => {
                    for (domain, record) in all {
                        metrics.show(&domain, &record);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot evaluate reputation"),
            }
        }
        if caught_up {
            tokio::select! {
                _ = crate::inbound::stopping(&mut stop) => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        } else if *stop.borrow() {
            return;
        }
    }
}
