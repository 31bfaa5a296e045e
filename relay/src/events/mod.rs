//! SCRATCH: local copy of the events contract until events-core lands.
pub mod event;
pub mod outbox;
pub mod retention;
pub mod webhook_backoff;
pub mod webhook_batch;
pub mod webhook_client;
pub mod webhook_dispatch;
pub mod webhook_sign;
pub mod webhook_supervisor;

pub use event::{Event, EventType};
pub use outbox::{Backlog, EventLog, EventSeq, StoredEvent, TrimReport};
