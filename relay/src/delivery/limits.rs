//! Limits shared by every relay pod through [`SharedState`]: connections
//! per destination (slots), messages per second per destination, and the
//! sending domain's per-second/hour/day rates.
//!
//! A unit over a limit is handed back to the queue for a short while, not
//! failed. The queue counts every `retry` as an attempt, which would push a
//! throttled unit down the retry schedule; so each throttle is also counted
//! under `throttled:<unit>` and subtracted when the retry delay is chosen
//! ([`effective_attempts`]).

use std::time::Duration;

use petrel_crds::config::RateLimits;

use crate::queue::{QueueError, SharedState};

/// Key of the connection slots for a destination.
pub fn slot_key(destination: &str) -> String {
    format!("dest:{destination}")
}

/// One rate window to check: counter key, limit, window length, and how
/// long a unit over it waits before trying again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateWindow {
    /// Counter key.
    pub key: String,
    /// Most deliveries per window.
    pub limit: u32,
    /// Window length.
    pub window: Duration,
    /// Wait when over the limit.
    pub wait: Duration,
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// The window of `delivery.perDestinationRate` (`limit` per second).
pub fn destination_window(destination: &str, limit: u32) -> RateWindow {
    RateWindow {
        key: format!("rate:dest:{destination}:1s"),
        limit,
        window: SECOND,
        wait: SECOND,
    }
}

/// The windows that apply to one delivery: the destination's rate, then
/// the sending domain's rates, shortest first. Pure, so the mapping from
/// config is tested.
///
/// The order matters because [`take_rate`] counts as it goes: a unit held
/// back by a busy destination must not have spent its sending domain's
/// hourly or daily budget first, or a slow destination would use up the
/// domain's whole day in retries.
pub fn rate_windows(
    sending_domain: &str,
    domain_limits: Option<&RateLimits>,
    destination: &str,
    per_destination_rate: Option<u32>,
) -> Vec<RateWindow> {
    let mut out = Vec::new();
    if let Some(limit) = per_destination_rate {
        out.push(destination_window(destination, limit));
    }
    if let Some(limits) = domain_limits {
        let domain = sending_domain.to_ascii_lowercase();
        for (limit, name, window, wait) in [
            (limits.per_second, "1s", SECOND, SECOND),
            (limits.per_hour, "1h", HOUR, Duration::from_secs(60)),
            (limits.per_day, "1d", DAY, Duration::from_secs(600)),
        ] {
            if let Some(limit) = limit {
                out.push(RateWindow {
                    key: format!("rate:from:{domain}:{name}"),
                    limit,
                    window,
                    wait,
                });
            }
        }
    }
    out
}

/// Counts one delivery against every window; `Some(wait)` for the first
/// window it exceeds (the delivery must wait), `None` when it may go.
///
/// Counting first and comparing after keeps pods from overshooting together:
/// of N concurrent increments exactly `limit` see a total within it. A
/// window already full is read first, without counting, for every window
/// but the first: otherwise a unit waiting on the daily limit would spend
/// the shorter windows' budget each time it came back.
pub async fn take_rate(
    state: &dyn SharedState,
    windows: &[RateWindow],
) -> Result<Option<Duration>, QueueError> {
    for w in windows.iter().skip(1) {
        if state.counter(&w.key).await? >= u64::from(w.limit) {
            return Ok(Some(w.wait));
        }
    }
    for w in windows {
        let total = state.incr_counter(&w.key, 1, w.window).await?;
        if total > u64::from(w.limit) {
            return Ok(Some(w.wait));
        }
    }
    Ok(None)
}

fn throttle_key(unit_id: &str) -> String {
    format!("throttled:{unit_id}")
}

/// Records that a unit was handed back for a limit, not a failure.
pub async fn note_throttled(
    state: &dyn SharedState,
    unit_id: &str,
    lifetime: Duration,
) -> Result<(), QueueError> {
    state
        .incr_counter(&throttle_key(unit_id), 1, lifetime)
        .await
        .map(|_| ())
}

/// Real failed attempts of a unit, this one included: the queue's count
/// plus one, minus the throttles.
pub async fn effective_attempts(
    state: &dyn SharedState,
    unit_id: &str,
    queue_attempts: u32,
) -> u32 {
    let throttled = state.counter(&throttle_key(unit_id)).await.unwrap_or(0);
    let throttled = u32::try_from(throttled).unwrap_or(u32::MAX);
    queue_attempts
        .saturating_add(1)
        .saturating_sub(throttled)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_from_config() {
        let limits = RateLimits {
            per_second: Some(5),
            per_hour: None,
            per_day: Some(1000),
            daily_quota: Some(10),
        };
        let w = rate_windows("Example.TEST", Some(&limits), "dest.test", Some(3));
        let keys: Vec<&str> = w.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rate:dest:dest.test:1s",
                "rate:from:example.test:1s",
                "rate:from:example.test:1d",
            ]
        );
        assert_eq!(w[2].limit, 1000);
        assert_eq!(w[2].window, DAY);
        assert!(rate_windows("a", None, "b", None).is_empty());
    }

    async fn embedded() -> (tempfile::TempDir, crate::queue::embedded::EmbeddedBackend) {
        let dir = tempfile::tempdir().unwrap();
        let config = petrel_crds::config::EmbeddedQueue {
            path: dir.path().join("q.redb"),
        };
        let backend =
            crate::queue::embedded::EmbeddedBackend::open(&config, Duration::from_secs(5))
                .await
                .unwrap();
        (dir, backend)
    }

    #[tokio::test]
    async fn a_unit_held_back_spends_no_budget_of_the_other_windows() {
        let (_dir, backend) = embedded().await;
        let window = |key: &str, limit| RateWindow {
            key: key.into(),
            limit,
            window: DAY,
            wait: SECOND,
        };
        // Held back by the destination: the domain's budget is untouched.
        let dest_first = [window("dest", 1), window("from", 100)];
        assert_eq!(take_rate(&backend, &dest_first).await.unwrap(), None);
        for _ in 0..5 {
            assert!(take_rate(&backend, &dest_first).await.unwrap().is_some());
        }
        assert_eq!(backend.counter("from").await.unwrap(), 1);
        // Held back by a later, full window: the earlier one is not spent.
        let day_full = [window("hour", 100), window("day", 1)];
        assert_eq!(take_rate(&backend, &day_full).await.unwrap(), None);
        for _ in 0..5 {
            assert!(take_rate(&backend, &day_full).await.unwrap().is_some());
        }
        assert_eq!(backend.counter("hour").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn throttles_do_not_count_as_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let config = petrel_crds::config::EmbeddedQueue {
            path: dir.path().join("q.redb"),
        };
        let backend =
            crate::queue::embedded::EmbeddedBackend::open(&config, Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(effective_attempts(&backend, "u", 0).await, 1);
        note_throttled(&backend, "u", HOUR).await.unwrap();
        note_throttled(&backend, "u", HOUR).await.unwrap();
        // The queue saw 3 retries, 2 of them throttles: this failure is the
        // second real one.
        assert_eq!(effective_attempts(&backend, "u", 3).await, 2);
        assert_eq!(effective_attempts(&backend, "other", 3).await, 4);
    }
}
