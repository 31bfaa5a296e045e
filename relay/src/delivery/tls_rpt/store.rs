//! The shared TLS-RPT counts: one counter per kind of session per UTC day,
//! and an index of the kinds seen, both in [`SharedState`] so every pod
//! adds to the same numbers and any pod can report them.
//!
//! Only atomic counters and plain values are used (no new backend
//! method): the pod whose increment makes a kind's counter 1 is the one
//! that registers the kind, under the next number of the day's index
//! counter. A pod that dies between the two loses that kind for the day;
//! reports are statistics, not records.

use std::time::Duration;

use super::record::{Entry, day_of};
use crate::queue::{Millis, QueueError, SharedState};

/// How long a day's counts are kept: long enough for the report, which
/// runs in the first hours after the day ends, to find them after an outage.
pub const RETAIN: Duration = Duration::from_secs(3 * 86_400);

fn count_key(day: &str, digest: &str) -> String {
    format!("tlsrpt:count:{day}:{digest}")
}

fn index_key(day: &str) -> String {
    format!("tlsrpt:index:{day}")
}

fn kind_key(day: &str, n: u64) -> String {
    format!("tlsrpt:kind:{day}:{n}")
}

/// Counts one session at `now`.
pub async fn record(state: &dyn SharedState, now: Millis, entry: &Entry) -> Result<(), QueueError> {
    let day = day_of(now);
    let digest = entry.digest();
    let count = state
        .incr_counter(&count_key(&day, &digest), 1, RETAIN)
        .await?;
    if count == 1 {
        let n = state.incr_counter(&index_key(&day), 1, RETAIN).await?;
        let json = serde_json::to_string(entry).unwrap_or_default();
        state.set_value(&kind_key(&day, n), &json, RETAIN).await?;
    }
    Ok(())
}

/// Every kind of session counted on `day` (`YYYY-MM-DD`) with its count.
pub async fn load(state: &dyn SharedState, day: &str) -> Result<Vec<(Entry, u64)>, QueueError> {
    let kinds = state.counter(&index_key(day)).await?;
    let mut entries = Vec::new();
    for n in 1..=kinds {
        let Some(json) = state.get_value(&kind_key(day, n)).await? else {
            continue;
        };
        match serde_json::from_str::<Entry>(&json) {
            Ok(entry) => entries.push(entry),
            Err(error) => tracing::warn!(%error, day, n, "unreadable TLS-RPT entry skipped"),
        }
    }
    let keys: Vec<String> = entries
        .iter()
        .map(|e| count_key(day, &e.digest()))
        .collect();
    let counts = state.counters(&keys).await?;
    Ok(entries
        .into_iter()
        .zip(counts)
        .filter(|(_, c)| *c > 0)
        .collect())
}

/// Marks the report of `domain` for `day` as sent (so a later run, on
/// any pod, does not send it again).
pub async fn mark_sent(state: &dyn SharedState, day: &str, domain: &str) -> Result<(), QueueError> {
    state
        .set_value(&format!("tlsrpt:sent:{day}:{domain}"), "1", RETAIN)
        .await
}

/// Whether the report of `domain` for `day` was sent.
pub async fn was_sent(
    state: &dyn SharedState,
    day: &str,
    domain: &str,
) -> Result<bool, QueueError> {
    Ok(state
        .get_value(&format!("tlsrpt:sent:{day}:{domain}"))
        .await?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tls_rpt::{FailureDetail, Outcome, PolicyDesc};
    use crate::queue::memory::MemoryBackend;

    #[tokio::test]
    async fn counts_are_per_kind_and_per_day() {
        let state = MemoryBackend::default();
        let ok = Entry {
            domain: "dest.test".into(),
            policy: PolicyDesc::none(),
            outcome: Outcome::Success,
        };
        let bad = Entry {
            outcome: Outcome::Failure(FailureDetail {
                result_type: "starttls-not-supported".into(),
                ..FailureDetail::default()
            }),
            ..ok.clone()
        };
        let day1 = 1_796_169_600_000; // 2026-12-02T00:00:00Z
        for _ in 0..3 {
            record(&state, day1, &ok).await.unwrap();
        }
        record(&state, day1 + 1000, &bad).await.unwrap();
        record(&state, day1 + 86_400_000, &bad).await.unwrap();
        let mut got = load(&state, "2026-12-02").await.unwrap();
        got.sort();
        assert_eq!(got, vec![(ok, 3), (bad.clone(), 1)]);
        assert_eq!(load(&state, "2026-12-03").await.unwrap(), vec![(bad, 1)]);
        assert!(load(&state, "2026-12-04").await.unwrap().is_empty());
        assert!(!was_sent(&state, "2026-12-02", "dest.test").await.unwrap());
        mark_sent(&state, "2026-12-02", "dest.test").await.unwrap();
        assert!(was_sent(&state, "2026-12-02", "dest.test").await.unwrap());
    }
}
