//! Feeding the windows: a consumer group (`reputation`) on the event
//! outbox. Every outcome the guard counts is an event already, whoever
//! produced it: `delivered` and `bounced` (hard) from delivery settling,
//! `bounced` with `async: true` from a returned DSN and `complained`
//! from an ARF report (the feedback listener). Reading the outbox counts
//! each of them once over all pods (a group hands an event to one
//! consumer), survives restarts (unacked events are claimed again) and
//! needs no call from the code that records them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::store::{Kind, Store, bucket_ms, in_window};
use crate::config::RelayConfig;
use crate::events::{BounceType, EventLog, EventType, StoredEvent};
use crate::queue::{Millis, QueueError};

/// The consumer group's name in the outbox.
pub const GROUP: &str = "reputation";
/// Events claimed per read.
pub const BATCH: usize = 500;
/// A batch claimed by a pod that died is taken over after this.
pub const RECLAIM_AFTER: Duration = Duration::from_secs(60);

/// Counts to add: `count` of `kind` for `domain` in the bucket starting at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Configured sending domain, lower-cased.
    pub domain: String,
    /// What was counted.
    pub kind: Kind,
    /// Start of the bucket (the domain's window's bucket length).
    pub at: Millis,
    /// How many.
    pub count: u64,
}

/// What an event counts as, if anything.
pub fn kind_of(event: &crate::events::Event) -> Option<Kind> {
    // DSNs the relay sends (null sender) say nothing about the domain's list.
    if event.from.as_deref() == Some("") {
        return None;
    }
    match event.kind {
        EventType::Delivered => Some(Kind::Delivered),
        EventType::Bounced => match event.bounce_type {
            Some(BounceType::Hard) => Some(Kind::Bounced),
            // A returned DSN that did not say which kind: it is one.
            None if event.is_async == Some(true) => Some(Kind::Bounced),
            // An operator bouncing queued mail (`queue bounce`) says nothing
            // about the list.
            Some(BounceType::Soft | BounceType::Expired | BounceType::Admin) | None => None,
        },
        EventType::Complained => Some(Kind::Complaint),
        EventType::Accepted
        | EventType::Rejected
        | EventType::Deferred
        | EventType::Delayed
        | EventType::Suppressed
        | EventType::Dsn
        | EventType::Unsubscribed
        | EventType::Opened
        | EventType::Clicked
        | EventType::Deleted => None,
    }
}

/// When an event happened: its timestamp, else when it was stored.
fn happened_at(e: &StoredEvent) -> Millis {
    chrono::DateTime::parse_from_rfc3339(&e.event.timestamp)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .unwrap_or(e.stored_at)
}

/// The counts a batch adds, grouped per domain, kind and bucket. Events of
/// domains not configured, or too old for the window read at `now`, count
/// nothing.
pub fn tally(events: &[StoredEvent], config: &RelayConfig, now: Millis) -> Vec<Tally> {
    let mut sums: BTreeMap<(String, Kind, Millis), u64> = BTreeMap::new();
    for e in events {
        let Some(kind) = kind_of(&e.event) else {
            continue;
        };
        let Some(domain) = e
            .event
            .sending_domain
            .as_deref()
            .and_then(|d| config.domain(d))
        else {
            continue;
        };
        let window: Duration = domain.reputation.window.into();
        // A pod whose clock runs a little ahead must not lose its counts.
        let at = happened_at(e).min(now);
        if !in_window(window, at, now) {
            continue;
        }
        let bucket = bucket_ms(window);
        *sums
            .entry((
                domain.domain.to_ascii_lowercase(),
                kind,
                at / bucket * bucket,
            ))
            .or_default() += 1;
    }
    sums.into_iter()
        .map(|((domain, kind, at), count)| Tally {
            domain,
            kind,
            at,
            count,
        })
        .collect()
}

/// Claims one batch for `consumer`, counts it, acks it. Returns the
/// domains whose counts changed (to evaluate at once) and how many events
/// were read. A failure leaves the batch claimed: it is claimed again
/// after [`RECLAIM_AFTER`], so nothing is lost (a count may be repeated
/// if the failure came between counting and acking).
pub async fn consume_once(
    log: &dyn EventLog,
    store: &Store,
    config: &RelayConfig,
    consumer: &str,
    now: Millis,
) -> Result<(Vec<String>, usize), QueueError> {
    let batch = log.claim(GROUP, consumer, BATCH, RECLAIM_AFTER).await?;
    if batch.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let tallies = tally(&batch, config, now);
    let mut generations: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        let generation = match generations.get(&t.domain) {
            Some(g) => *g,
            None => {
                let g = store.load(&t.domain).await?.generation;
                generations.insert(t.domain.clone(), g);
                g
            }
        };
        let window = config
            .domain(&t.domain)
            .map(|d| d.reputation.window.into())
            .unwrap_or(Duration::from_secs(86_400));
        store
            .add(&t.domain, generation, window, t.kind, t.at, t.count)
            .await?;
    }
    let seqs: Vec<_> = batch.iter().map(|e| e.seq.clone()).collect();
    log.ack(GROUP, &seqs).await?;
    Ok((generations.into_keys().collect(), batch.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    const H: Millis = 3_600_000;

    fn config() -> RelayConfig {
        RelayConfig::from_yaml(
            r#"
hostname: relay.test
listeners: [{name: smtp, address: "127.0.0.1:2525"}]
queue: {embedded: {path: /nonexistent/q.redb}}
domains:
  - domain: Example.test
    dkim: {selector: s1, algorithm: ed25519, keyFile: /k.pem}
"#,
        )
        .unwrap()
    }

    fn stored(kind: EventType, domain: &str, at: Millis) -> StoredEvent {
        let mut event = Event::new(kind, "relay", at);
        event.sending_domain = Some(domain.into());
        event.from = Some(format!("app@{domain}"));
        StoredEvent {
            seq: at.to_string(),
            stored_at: at,
            event,
        }
    }

    #[test]
    fn only_outcomes_of_configured_domains_in_the_window_count() {
        let now = 100 * H;
        let mut hard = stored(EventType::Bounced, "example.test", now - 10);
        hard.event.bounce_type = Some(BounceType::Hard);
        let mut soft = stored(EventType::Bounced, "example.test", now - 10);
        soft.event.bounce_type = Some(BounceType::Soft);
        let mut late = stored(EventType::Bounced, "example.test", now - 2 * H);
        late.event.is_async = Some(true);
        let mut dsn = stored(EventType::Delivered, "example.test", now);
        dsn.event.from = Some(String::new());
        let events = vec![
            stored(EventType::Delivered, "example.test", now - 5),
            stored(EventType::Delivered, "EXAMPLE.test", now - 6),
            stored(EventType::Delivered, "other.test", now),
            stored(EventType::Delivered, "example.test", now - 25 * H),
            stored(EventType::Accepted, "example.test", now),
            stored(EventType::Complained, "example.test", now - 1),
            hard,
            soft,
            late,
            dsn,
        ];
        let t = tally(&events, &config(), now);
        let get = |kind, at| {
            t.iter()
                .find(|x| x.kind == kind && x.at == at)
                .map(|x| (x.domain.as_str(), x.count))
        };
        assert_eq!(get(Kind::Delivered, 99 * H), Some(("example.test", 2)));
        assert_eq!(get(Kind::Bounced, 99 * H), Some(("example.test", 1)));
        assert_eq!(get(Kind::Bounced, 98 * H), Some(("example.test", 1)));
        assert_eq!(get(Kind::Complaint, 99 * H), Some(("example.test", 1)));
        assert_eq!(t.len(), 4, "{t:?}");
    }
}
