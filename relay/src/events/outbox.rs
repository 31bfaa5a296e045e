//! SCRATCH: local copy of the events contract until events-core lands.
use std::time::Duration;

use async_trait::async_trait;

use super::Event;
use crate::queue::{Millis, QueueError};

pub type EventSeq = String;
pub struct StoredEvent {
    pub seq: EventSeq,
    pub stored_at: Millis,
    pub event: Event,
}
pub struct Backlog {
    pub pending: u64,
    pub oldest_at: Option<Millis>,
}
pub struct TrimReport {
    pub trimmed: u64,
    pub dropped_unacked: u64,
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    async fn publish(&self, events: &[Event]) -> Result<(), QueueError>;
    async fn ensure_group(&self, group: &str) -> Result<(), QueueError>;
    async fn claim(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<StoredEvent>, QueueError>;
    async fn renew(&self, group: &str, consumer: &str, seqs: &[EventSeq]) -> Result<(), QueueError>;
    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError>;
    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError>;
    async fn read(&self, after: Option<&EventSeq>, max: usize) -> Result<Vec<StoredEvent>, QueueError>;
    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError>;
}
