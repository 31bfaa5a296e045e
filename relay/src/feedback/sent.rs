//! What the relay remembers of each message it sent with a VERP return
//! path, for the fallback attribution of reports that carry no token:
//! queue id, sending domain and recipients, written at accept under the
//! message's `Message-ID` and under its queue id (the `id` of Petrel's
//! `Received` header), and kept [`SENT_TTL`].
//!
//! [`matching`] (pure) decides; [`store`] and [`load`] are the I/O.

use std::time::Duration;

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::queue::{QueueError, SharedState};

/// How long a sent message is remembered: complaints and late bounces
/// come within days; feedback loops report within weeks at most. One
/// small record (two keys) per message sent for a domain with a
/// `returnPathDomain`.
pub const SENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longer `Message-ID`s are stored under their SHA-256, so a client's
/// header cannot make keys of any size.
const MAX_KEY_ID: usize = 128;

/// One sent message, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentMessage {
    /// The client's queue id (the stem of any per-recipient copy's id).
    pub queue_id: String,
    /// The sending domain, lower-cased.
    pub sending_domain: String,
    /// The envelope recipients, lower-cased.
    pub recipients: Vec<String>,
}

/// A `Message-ID` as looked up: angle brackets removed, trimmed; `None`
/// when nothing is left.
pub fn normalise_message_id(id: &str) -> Option<String> {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// The key of a (normalised) `Message-ID`.
pub fn message_id_key(id: &str) -> String {
    if id.len() <= MAX_KEY_ID {
        format!("feedback:sent:mid:{id}")
    } else {
        let hash = digest::digest(&digest::SHA256, id.as_bytes());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("feedback:sent:midh:{hex}")
    }
}

/// The key of a queue id.
pub fn queue_id_key(queue_id: &str) -> String {
    format!("feedback:sent:qid:{queue_id}")
}

/// The queue ids of Petrel's own `Received` headers (`by <hostname>
/// (Petrel) with ... id <queue id>;`) among `received` values.
pub fn petrel_queue_ids<'a>(
    received: impl Iterator<Item = &'a str>,
    hostname: &str,
) -> Vec<String> {
    let by = format!("by {} (petrel)", hostname.to_ascii_lowercase());
    received
        .filter(|v| {
            let v = v.to_ascii_lowercase();
            v.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(&by)
        })
        .filter_map(|v| {
            let words: Vec<&str> = v.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "id")?;
            let id = words.get(at + 1)?.trim_end_matches(';');
            (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
                .then(|| id.to_string())
        })
        .collect()
}

/// The first of `records` one of whose recipients is among `candidates`
/// (the recipients a report names, lower-cased), and that recipient; only
/// records of a sending domain in `sending_domains` count. A report can
/// so only ever name a recipient the message was really sent to.
pub fn matching<'a>(
    records: &'a [SentMessage],
    candidates: &[&str],
    sending_domains: &[&str],
) -> Option<(&'a SentMessage, String)> {
    records
        .iter()
        .filter(|r| {
            sending_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&r.sending_domain))
        })
        .find_map(|r| {
            candidates.iter().find_map(|c| {
                r.recipients
                    .iter()
                    .find(|rcpt| rcpt.eq_ignore_ascii_case(c))
                    .map(|rcpt| (r, rcpt.clone()))
            })
        })
}

/// Stores `message` under its queue id and, when it has one, its
/// `Message-ID`.
pub async fn store(
    state: &dyn SharedState,
    message: &SentMessage,
    header_message_id: Option<&str>,
) -> Result<(), QueueError> {
    let key = queue_id_key(&message.queue_id);
    let json = serde_json::to_string(message).map_err(|e| QueueError::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    state.set_value(&key, &json, SENT_TTL).await?;
    if let Some(id) = header_message_id.and_then(normalise_message_id) {
        state
            .set_value(&message_id_key(&id), &json, SENT_TTL)
            .await?;
    }
    Ok(())
}

/// The records stored under `keys` (missing or expired ones skipped).
pub async fn load(
    state: &dyn SharedState,
    keys: &[String],
) -> Result<Vec<SentMessage>, QueueError> {
    let mut out: Vec<SentMessage> = Vec::new();
    for key in keys {
        if let Some(json) = state.get_value(key).await? {
            let record: SentMessage =
                serde_json::from_str(&json).map_err(|e| QueueError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            if !out.contains(&record) {
                out.push(record);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryBackend;

    fn record(queue_id: &str, domain: &str, recipients: &[&str]) -> SentMessage {
        SentMessage {
            queue_id: queue_id.into(),
            sending_domain: domain.into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn only_a_recipient_of_the_message_matches() {
        let records = [
            record("q1", "example.test", &["a@dest.test", "b@dest.test"]),
            record("q2", "other.test", &["c@dest.test"]),
        ];
        let domains = ["example.test", "other.test"];
        let (r, rcpt) = matching(&records, &["x@dest.test", "B@dest.test"], &domains).unwrap();
        assert_eq!((r.queue_id.as_str(), rcpt.as_str()), ("q1", "b@dest.test"));
        let (r, rcpt) = matching(&records, &["c@dest.test"], &domains).unwrap();
        assert_eq!((r.queue_id.as_str(), rcpt.as_str()), ("q2", "c@dest.test"));
        // Not a recipient of any record.
        assert!(matching(&records, &["stranger@dest.test"], &domains).is_none());
        // No candidates, or no record.
        assert!(matching(&records, &[], &domains).is_none());
        assert!(matching(&[], &["a@dest.test"], &domains).is_none());
        // A domain no longer configured with a return path.
        assert!(matching(&records, &["c@dest.test"], &["example.test"]).is_none());
    }

    #[test]
    fn message_ids_and_received_ids_are_normalised() {
        assert_eq!(
            normalise_message_id("  <abc@x.test> ").as_deref(),
            Some("abc@x.test")
        );
        assert_eq!(normalise_message_id("<>"), None);
        assert_eq!(message_id_key("abc@x.test"), "feedback:sent:mid:abc@x.test");
        let long = "x".repeat(500);
        let key = message_id_key(&long);
        assert!(
            key.starts_with("feedback:sent:midh:") && key.len() < 100,
            "{key}"
        );
        let received = [
            "from mx.dest.test by inner.dest.test (Postfix) with ESMTP id 4XyZ;",
            "from client.example ([192.0.2.7]) by Relay.test (Petrel) with ESMTP id abc123; Mon, 23 Nov 2026",
            "from evil by other.test (Petrel) with ESMTP id forged1;",
        ];
        assert_eq!(
            petrel_queue_ids(received.iter().copied(), "relay.test"),
            vec!["abc123"]
        );
    }

    #[tokio::test]
    async fn records_are_found_by_message_id_and_queue_id() {
        let state = MemoryBackend::default();
        let r = record("q1", "example.test", &["a@dest.test"]);
        store(&state, &r, Some("<m1@example.test>")).await.unwrap();
        let by_mid = load(&state, &[message_id_key("m1@example.test")])
            .await
            .unwrap();
        assert_eq!(by_mid, vec![r.clone()]);
        let both = load(
            &state,
            &[message_id_key("m1@example.test"), queue_id_key("q1")],
        )
        .await
        .unwrap();
        assert_eq!(both, vec![r]);
        assert!(
            load(&state, &[message_id_key("never@example.test")])
                .await
                .unwrap()
                .is_empty()
        );
    }
}
