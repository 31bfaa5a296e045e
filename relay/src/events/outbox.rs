//! The read side of the outbox. The write side lives inside the queue
//! operations (`Queue::enqueue`, `Queue::settle`), so an event is stored
//! in the same atomic step as the state change it describes.
//!
//! Both backends serve this trait: Redis from the partitions' streams
//! (`{prefix:N:…}:events`) and the shared `{prefix}:events`, read as one log
//! with one consumer group per reader, the embedded backend from redb
//! tables written in the queue's transactions.

use std::time::Duration;

use async_trait::async_trait;

use super::Event;
use crate::queue::{Millis, QueueError, SuppressionEntry};

/// Position of an event in the log. Redis: the stream id
/// (`1700000000000-0`); embedded: a zero-padded counter, so both sort as
/// strings in log order within one backend.
pub type EventSeq = String;

/// An event as stored in the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Where it is in the log.
    pub seq: EventSeq,
    /// When the backend stored it (retention counts from here).
    pub stored_at: Millis,
    /// The event.
    pub event: Event,
}

/// What a consumer group still has to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Events claimed but not acknowledged, plus events never read.
    pub pending: u64,
    /// When the oldest of them was stored.
    pub oldest_at: Option<Millis>,
}

/// What a [`EventLog::trim`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Events removed.
    pub trimmed: u64,
    /// Of those, events some group had not acknowledged (only when they
    /// could not be kept; the caller counts them in a metric).
    pub dropped_unacked: u64,
}

/// The event outbox, shared by every relay pod through the queue backend.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends events that change no queue state (rejected, opened, ...).
    /// Durable on `Ok`.
    async fn publish(&self, events: &[Event]) -> Result<(), QueueError>;

    /// Appends events together with the suppression entries they describe
    /// (an asynchronous bounce, a complaint, an unsubscribe), in one atomic
    /// step: both or neither. Durable on `Ok`.
    async fn publish_suppressing(
        &self,
        events: &[Event],
        suppress: &[SuppressionEntry],
    ) -> Result<(), QueueError>;

    /// Creates consumer group `group` (one per webhook name) if missing,
    /// starting at the beginning of the retained log. Idempotent.
    async fn ensure_group(&self, group: &str) -> Result<(), QueueError>;

    /// Claims up to `max` events for `consumer` in `group`: first events
    /// claimed by any consumer longer than `reclaim_after` ago and not
    /// acked (a dead pod's batch), then never-read ones. Each returned
    /// event is claimed by `consumer` until acked, so two pods never both
    /// send it (except after `reclaim_after`).
    async fn claim(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<StoredEvent>, QueueError>;

    /// Acknowledges (done with) events of `group`.
    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError>;

    /// Renews `consumer`'s claim of `seqs` in `group` (restarts their
    /// `reclaim_after` clock), so a live consumer retrying a batch for hours
    /// keeps it; events claimed by another consumer meanwhile, acked or
    /// trimmed are left alone. Returns how many are still `consumer`'s.
    async fn renew(
        &self,
        group: &str,
        consumer: &str,
        seqs: &[EventSeq],
    ) -> Result<u64, QueueError>;

    /// Unacked backlog of `group` (claimed-unacked plus not yet read) and
    /// the time its oldest event was stored.
    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError>;

    /// Events after `after` (`None`: from the oldest retained) in log
    /// order, at most `max` (the CLI's tail).
    async fn read(
        &self,
        after: Option<&EventSeq>,
        max: usize,
    ) -> Result<Vec<StoredEvent>, QueueError>;

    /// Drops events stored before `before`, except those some group in
    /// `groups` has not acked (kept); reports counts.
    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError>;
}
