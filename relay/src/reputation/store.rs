//! The shared side, thin: rolling-window counters and the per-domain
//! record in the queue backend's [`SharedState`], so every pod counts
//! into and reads the same numbers (Redis), and they outlive a restart.
//!
//! The window is cut into [`BUCKETS`] buckets, one counter key per
//! bucket and kind: `reputation:<domain>:<generation>:<bucket ms>:<kind>:<n>`.
//! A count lands in the bucket of the event's time, and a read sums the
//! buckets that overlap `[now - window, now]`, so the window rolls with
//! the clock passed in (a test's fake one too), to within one bucket.
//! Keys live a little longer than the window, then the backend drops them.

use std::sync::Arc;
use std::time::Duration;

use super::rates::Counts;
use super::state::DomainState;
use crate::queue::{Millis, QueueError, SharedState};

/// Buckets per window: the window rolls in steps of 1/24 of it (an hour
/// for the default 24h).
pub const BUCKETS: u64 = 24;

/// How long a domain's record is kept without a write. Long: losing it
/// would lift a pause.
const RECORD_TTL: Duration = Duration::from_secs(400 * 86_400);

/// What one count is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A recipient delivered.
    Delivered,
    /// A recipient hard-bounced.
    Bounced,
    /// A complaint.
    Complaint,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Delivered, Kind::Bounced, Kind::Complaint];

    fn key(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Bounced => "bounced",
            Kind::Complaint => "complaint",
        }
    }
}

/// Length of one bucket of `window`, in ms (at least a second).
pub fn bucket_ms(window: Duration) -> u64 {
    (u64::try_from(window.as_millis()).unwrap_or(u64::MAX) / BUCKETS).max(1_000)
}

fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

/// The bucket numbers a read at `now` sums: every bucket overlapping
/// `(now - window, now]`.
pub fn buckets_at(window: Duration, now: Millis) -> std::ops::RangeInclusive<u64> {
    let b = bucket_ms(window);
    let from = now.saturating_sub(window_ms(window)) / b;
    from..=now / b
}

/// Whether an event at `at` still falls in the window read at `now`.
pub fn in_window(window: Duration, at: Millis, now: Millis) -> bool {
    buckets_at(window, now).contains(&(at / bucket_ms(window)))
}

fn counter_key(domain: &str, generation: u64, window: Duration, kind: Kind, bucket: u64) -> String {
    format!(
        "reputation:{domain}:{generation}:{}:{}:{bucket}",
        bucket_ms(window),
        kind.key()
    )
}

fn record_key(domain: &str) -> String {
    format!("reputation:{domain}:state")
}

/// The reputation counters and records of every domain.
#[derive(Clone)]
pub struct Store {
    state: Arc<dyn SharedState>,
}

impl Store {
    /// Over the backend's shared state.
    pub fn new(state: Arc<dyn SharedState>) -> Store {
        Store { state }
    }

    /// The domain's record; the default (ok, generation 0) when none is
    /// stored. A record that does not decode is logged and read as the
    /// default rather than refusing the domain's mail.
    pub async fn load(&self, domain: &str) -> Result<DomainState, QueueError> {
        let Some(text) = self.state.get_value(&record_key(domain)).await? else {
            return Ok(DomainState::default());
        };
        Ok(serde_json::from_str(&text).unwrap_or_else(|error| {
            tracing::error!(%error, %domain, "unreadable reputation record; treating the domain as ok");
            DomainState::default()
        }))
    }

    /// Stores the domain's record.
    pub async fn save(&self, domain: &str, record: &DomainState) -> Result<(), QueueError> {
        let text = serde_json::to_string(record).map_err(|e| QueueError::Corrupt {
            key: record_key(domain),
            reason: e.to_string(),
        })?;
        self.state
            .set_value(&record_key(domain), &text, RECORD_TTL)
            .await
    }

    /// Counts `by` of `kind` that happened at `at` into generation
    /// `generation` of the domain's window.
    pub async fn add(
        &self,
        domain: &str,
        generation: u64,
        window: Duration,
        kind: Kind,
        at: Millis,
        by: u64,
    ) -> Result<(), QueueError> {
        let key = counter_key(domain, generation, window, kind, at / bucket_ms(window));
        // Kept two buckets past the window, measured from the first count.
        let ttl = window + Duration::from_millis(2 * bucket_ms(window));
        self.state.incr_counter(&key, by, ttl).await.map(|_| ())
    }

    /// The domain's counts over the window read at `now`.
    pub async fn counts(
        &self,
        domain: &str,
        generation: u64,
        window: Duration,
        now: Millis,
    ) -> Result<Counts, QueueError> {
        let buckets: Vec<u64> = buckets_at(window, now).collect();
        let keys: Vec<String> = Kind::ALL
            .iter()
            .flat_map(|&kind| {
                buckets
                    .iter()
                    .map(move |&b| counter_key(domain, generation, window, kind, b))
            })
            .collect();
        let values = self.state.counters(&keys).await?;
        let sum = |i: usize| -> u64 {
            values
                .iter()
                .skip(i * buckets.len())
                .take(buckets.len())
                .fold(0u64, |a, v| a.saturating_add(*v))
        };
        Ok(Counts {
            delivered: sum(0),
            bounced: sum(1),
            complaints: sum(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryBackend;

    const H: Millis = 3_600_000;
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn buckets_cover_the_window_and_roll() {
        assert_eq!(bucket_ms(DAY), H);
        assert_eq!(bucket_ms(Duration::from_secs(60)), 2_500);
        assert_eq!(bucket_ms(Duration::from_secs(10)), 1_000);
        let now = 100 * H + 5;
        assert_eq!(buckets_at(DAY, now), 76..=100);
        assert!(in_window(DAY, now - 24 * H + 10, now));
        assert!(!in_window(DAY, now - 25 * H, now));
    }

    #[tokio::test]
    async fn counts_roll_out_of_the_window_and_generations_are_apart() {
        let store = Store::new(std::sync::Arc::new(MemoryBackend::default()));
        let t0 = 1_000 * H;
        store
            .add("e.test", 0, DAY, Kind::Delivered, t0, 90)
            .await
            .unwrap();
        store
            .add("e.test", 0, DAY, Kind::Bounced, t0 + H, 10)
            .await
            .unwrap();
        store
            .add("e.test", 0, DAY, Kind::Complaint, t0 + 2 * H, 1)
            .await
            .unwrap();
        store
            .add("other.test", 0, DAY, Kind::Bounced, t0, 5)
            .await
            .unwrap();
        store
            .add("e.test", 1, DAY, Kind::Bounced, t0, 7)
            .await
            .unwrap();
        let at = |now| store.counts("e.test", 0, DAY, now);
        assert_eq!(
            at(t0 + 3 * H).await.unwrap(),
            Counts {
                delivered: 90,
                bounced: 10,
                complaints: 1
            }
        );
        // 24h after the deliveries' hour they leave the window.
        assert_eq!(
            at(t0 + 25 * H).await.unwrap(),
            Counts {
                delivered: 0,
                bounced: 10,
                complaints: 1
            }
        );
        assert_eq!(at(t0 + 30 * H).await.unwrap(), Counts::default());
        assert_eq!(store.counts("e.test", 1, DAY, t0).await.unwrap().bounced, 7);
    }
}
