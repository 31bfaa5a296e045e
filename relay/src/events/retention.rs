//! Retention of the event log: every [`TRIM_EVERY`], events older than
//! `events.retention` are removed, except those a configured webhook has
//! not acknowledged; whatever the backend had to drop unacknowledged is
//! counted and logged.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::EventLog;
use super::webhook_dispatch::{group_name, stopped};
use crate::config::RelayConfig;
use crate::metrics::WebhookMetrics;
use crate::queue::now_millis;
use crate::reload::Reloading;

/// How often the log is trimmed. Every pod trims; trimming is idempotent.
pub const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Trims until `stop` turns true.
pub async fn run(
    config: Reloading<RelayConfig>,
    log: Arc<dyn EventLog>,
    metrics: WebhookMetrics,
    stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(stop.clone()) => return,
        }
        let config = config.get();
        let retention = config.events.retention.get().as_millis() as u64;
        let before = now_millis().saturating_sub(retention);
        let groups: Vec<String> = config
            .events
            .webhooks
            .iter()
            .map(|w| group_name(&w.name))
            .collect();
        match log.trim(before, &groups).await {
            Ok(report) => {
                if report.dropped_unacked > 0 {
                    metrics.trimmed_unacked.inc_by(report.dropped_unacked);
                    tracing::error!(
                        dropped = report.dropped_unacked,
                        trimmed = report.trimmed,
                        "retention removed events a webhook had not acknowledged"
                    );
                } else if report.trimmed > 0 {
                    tracing::debug!(trimmed = report.trimmed, "event log trimmed");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot trim the event log"),
        }
    }
}
