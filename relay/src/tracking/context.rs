//! What `opened` and `clicked` events carry besides the token: the
//! message's tags and `Message-ID`, and the ids of per-recipient copies.
//!
//! **Per-recipient copies.** A tracked message with several recipients is
//! queued as one copy per recipient, each with its own rewritten body and
//! tokens naming that recipient (one shared body could only name none of
//! them). The client's queue id `X` (`250 2.0.0 Ok: queued as X`, the HTTP
//! `id`) stays the stem of every copy's id: recipient `i` (from 1, in
//! envelope order) is queued as `X.i`, so every event of the message
//! names `X` before the dot and apps correlate without a new field.
//!
//! **Event context.** Tokens carry queue id, recipient and URL only (tags
//! would make every link far longer). The tags and `Message-ID` are
//! written once per message at accept, under `X`, as a small
//! [`SharedState`] value that lives [`CONTEXT_TTL`]; the endpoints read it
//! for each open and click. An open after that, or while the backend is
//! away, gets its event without them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::{QueueError, SharedState};

/// How long a message's tags and `Message-ID` are kept for its events:
/// nearly all opens and clicks come within days of sending. Each record is
/// small (the tags are bounded by `tags::validate`), one per tracked
/// message.
pub const CONTEXT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The queue id of copy `index` (0-based) of message `stem`: `stem.1`, ...
pub fn copy_id(stem: &str, index: usize) -> String {
    format!("{stem}.{}", index + 1)
}

/// The client's queue id of a message or copy: `X` of `X.3`, `X` of `X`.
/// Queue ids the relay makes (UUIDs, simple form) have no dot of their own.
pub fn stem_of(queue_id: &str) -> &str {
    queue_id.split_once('.').map_or(queue_id, |(stem, _)| stem)
}

/// The tags and `Message-ID` of one message, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventContext {
    /// The app's tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The `Message-ID`, angle brackets removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_message_id: Option<String>,
}

impl EventContext {
    /// Nothing worth storing.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.header_message_id.is_none()
    }
}

fn key(stem: &str) -> String {
    format!("tracking:ctx:{stem}")
}

/// Stores `context` for the message `stem` (nothing when it is empty).
pub async fn store(
    state: &dyn SharedState,
    stem: &str,
    context: &EventContext,
) -> Result<(), QueueError> {
    if context.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(context).map_err(|e| QueueError::Corrupt {
        key: key(stem),
        reason: e.to_string(),
    })?;
    state.set_value(&key(stem), &json, CONTEXT_TTL).await
}

/// The context of the message `queue_id` (a copy's id or the message's),
/// empty when none was stored or it expired.
pub async fn load(state: &dyn SharedState, queue_id: &str) -> Result<EventContext, QueueError> {
    let key = key(stem_of(queue_id));
    match state.get_value(&key).await? {
        Some(json) => serde_json::from_str(&json).map_err(|e| QueueError::Corrupt {
            key,
            reason: e.to_string(),
        }),
        None => Ok(EventContext::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryBackend;

    #[test]
    fn copy_ids_keep_the_clients_queue_id_as_their_stem() {
        let stem = "0123456789abcdef0123456789abcdef";
        assert_eq!(copy_id(stem, 0), format!("{stem}.1"));
        assert_eq!(copy_id(stem, 41), format!("{stem}.42"));
        for id in [copy_id(stem, 0), copy_id(stem, 99), stem.to_string()] {
            assert_eq!(stem_of(&id), stem);
        }
    }

    #[tokio::test]
    async fn every_copy_reads_the_messages_context() {
        let state = MemoryBackend::default();
        let context = EventContext {
            tags: BTreeMap::from([("campaign".to_string(), "spring".to_string())]),
            header_message_id: Some("abc@example.test".into()),
        };
        store(&state, "m1", &context).await.unwrap();
        assert_eq!(load(&state, "m1.2").await.unwrap(), context);
        assert_eq!(load(&state, "m1").await.unwrap(), context);
        assert!(load(&state, "m2.1").await.unwrap().is_empty());
        store(&state, "m3", &EventContext::default()).await.unwrap();
        assert_eq!(state.get_value("tracking:ctx:m3").await.unwrap(), None);
    }
}
