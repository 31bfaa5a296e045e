//! The queue gauges (`petrel_queue_units`, `petrel_queue_oldest_message_age_seconds`,
//! `petrel_queue_held_destinations`): one refresher, started by the
//! delivery scheduler. Every relay pod reports the same shared queue;
//! dashboards take `max`.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metrics::RelayMetrics;
use crate::queue::{Millis, Queue, QueueControl, QueueStats, now_millis};

/// Sets the unit and age gauges from [`QueueStats`] taken at `now`.
pub fn record_queue_stats(metrics: &RelayMetrics, stats: &QueueStats, now: Millis) {
    for (state, value) in [
        ("due", stats.due),
        ("deferred", stats.deferred),
        ("leased", stats.leased),
        ("held", stats.held),
    ] {
        metrics
            .queue_units
            .with_label_values(&[state])
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }
    let age_secs = stats
        .oldest_received_at
        .map(|at| now.saturating_sub(at) / 1000)
        .unwrap_or(0);
    metrics
        .oldest_message_age
        .set(i64::try_from(age_secs).unwrap_or(i64::MAX));
}

/// Reads the stats and the held destinations once and sets the gauges. A
/// failed read keeps the last values and is logged (readiness reports the
/// outage). Each read waits at most `timeout`.
pub async fn refresh(
    queue: &dyn Queue,
    control: &dyn QueueControl,
    metrics: &RelayMetrics,
    timeout: Duration,
) {
    let now = now_millis();
    match tokio::time::timeout(timeout, queue.stats(now)).await {
        Ok(Ok(stats)) => record_queue_stats(metrics, &stats, now),
        Ok(Err(error)) => tracing::debug!(%error, "queue stats unavailable"),
        Err(_) => tracing::debug!("queue stats timed out"),
    }
    if let Ok(Ok(holds)) = tokio::time::timeout(timeout, control.holds()).await {
        metrics
            .held_destinations
            .set(i64::try_from(holds.len()).unwrap_or(i64::MAX));
    }
}

/// Refreshes the gauges every `interval` (the first at once) until the
/// handle is aborted.
pub fn spawn(
    queue: Arc<dyn Queue>,
    control: Arc<dyn QueueControl>,
    metrics: RelayMetrics,
    interval: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A slow read cannot pile reads up: it ends before the next tick.
        let timeout = interval.max(crate::http::PING_TIMEOUT);
        loop {
            ticker.tick().await;
            refresh(queue.as_ref(), control.as_ref(), &metrics, timeout).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_queue_stats_of_empty_queue_is_zero_age() {
        let (_, metrics) = RelayMetrics::standalone();
        metrics.oldest_message_age.set(99);
        record_queue_stats(&metrics, &QueueStats::default(), 5_000);
        assert_eq!(metrics.oldest_message_age.get(), 0);
    }
}
