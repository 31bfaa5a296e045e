//! Recording events that change no queue state (`rejected`, `suppressed`
//! when nothing was queued) without ever holding up mail: the append runs
//! in its own task under a timeout; a failure is logged and counted in
//! `petrel_events_lost_total`, and the client's reply goes out regardless.

use std::sync::Arc;
use std::time::Duration;

use super::{Event, EventLog};
use crate::metrics::RelayMetrics;

/// Counts stored events in `petrel_events_total{type}`.
pub fn count(metrics: &RelayMetrics, events: &[Event]) {
    for event in events {
        metrics
            .events
            .with_label_values(&[event.kind.as_str()])
            .inc();
    }
}

/// Appends `events` in the background (bounded by `timeout`); returns at
/// once. The returned handle is for tests that must see the outcome.
pub fn publish_in_background(
    log: Arc<dyn EventLog>,
    metrics: RelayMetrics,
    events: Vec<Event>,
    timeout: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    if events.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let result = tokio::time::timeout(timeout, log.publish(&events)).await;
        let error = match result {
            Ok(Ok(())) => {
                count(&metrics, &events);
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("timed out after {timeout:?}"),
        };
        for event in &events {
            metrics
                .events_lost
                .with_label_values(&[event.kind.as_str()])
                .inc();
        }
        tracing::warn!(%error, events = events.len(), kind = %events[0].kind, "cannot record events; the reply was sent anyway");
    }))
}
