//! Events: what became of every message, one JSON record per outcome and
//! recipient, kept in an outbox inside the queue backend.
//!
//! The outbox is written in the same atomic queue operation as the state
//! change an event describes (`Queue::enqueue` for `accepted`,
//! `Queue::settle` for delivery outcomes), so a unit is never delivered
//! without its event and no event describes something that did not
//! happen. Events that change no queue state (`rejected`) go through
//! [`EventLog::publish`]. Consumers (webhooks, `events tail`) read the
//! outbox through [`EventLog`].
//!
//! Names follow the events contract (`EVENTS-CONTRACT.md`) unchanged.

pub mod emit;
pub mod event;
pub mod outbox;
pub mod tags;
pub mod tail;

pub use event::{BounceType, Event, EventType, UnknownEventType, format_timestamp};

/// The name events carry in `relay`: the pod name (`POD_NAME`, else
/// `HOSTNAME`, which Kubernetes sets to it), else the configured hostname.
pub fn relay_name(hostname: &str) -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| hostname.to_string())
}
pub use outbox::{Backlog, EventLog, EventSeq, StoredEvent, TrimReport};
