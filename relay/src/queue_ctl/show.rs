//! `queue show ID`: a message's envelope, its units with their attempt
//! history, and its header.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CtlError;
use crate::delivery::dsn::header_block;
use crate::events::format_timestamp;
use crate::queue::{Backend, Millis, QueueError, UnitState, UnitView};

/// One failed attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    /// When (RFC 3339).
    pub at: String,
    /// The reply or local reason.
    pub reply: String,
}

/// One unit of the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitDetail {
    /// Unit id.
    pub unit_id: String,
    /// Destination domain.
    pub destination: String,
    /// Recipients still to deliver.
    pub recipients: Vec<String>,
    /// Where it is.
    pub state: UnitState,
    /// Attempts made.
    pub attempts: u32,
    /// When it is tried next (RFC 3339), unless being delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// The last temporary failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// A "delayed" DSN went out.
    pub delay_notified: bool,
    /// Seconds it spent held (added to its queue lifetime).
    pub held_seconds: u64,
    /// The last failed attempts, oldest first.
    pub history: Vec<AttemptView>,
}

/// A message in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageDetail {
    /// Queue id.
    pub queue_id: String,
    /// Envelope sender (empty for a DSN).
    pub sender: String,
    /// The sending domain it was accepted for.
    pub sending_domain: String,
    /// When it was accepted (RFC 3339).
    pub received_at: String,
    /// Seconds since.
    pub age_seconds: u64,
    /// The `Message-ID` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id_header: Option<String>,
    /// Needs SMTPUTF8.
    pub smtputf8: bool,
    /// Is itself a DSN.
    pub is_dsn: bool,
    /// The app's tags.
    pub tags: BTreeMap<String, String>,
    /// Size of the stored message, bytes (absent when its data is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Header fields in order, unfolded.
    pub headers: Vec<(String, String)>,
    /// The units still queued.
    pub units: Vec<UnitDetail>,
}

/// The header fields of `header`, in order, continuation lines unfolded.
/// Pure; lines that are not fields are skipped.
pub fn parse_headers(header: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

/// The units of message (or unit) `id` among `units`.
pub fn units_of_id(units: Vec<UnitView>, id: &str) -> Vec<UnitView> {
    units
        .into_iter()
        .filter(|v| v.unit.message_id == id || v.unit.id == id)
        .collect()
}

/// The detail of `units` (all of one message) and its data. Pure.
pub fn build(units: &[UnitView], data: Option<&[u8]>, now: Millis) -> Option<MessageDetail> {
    let first = &units.first()?.unit;
    Some(MessageDetail {
        queue_id: first.message_id.clone(),
        sender: first.mail_from.clone(),
        sending_domain: first.sending_domain.clone(),
        received_at: format_timestamp(first.received_at),
        age_seconds: now.saturating_sub(first.received_at) / 1000,
        message_id_header: first.header_message_id.clone(),
        smtputf8: first.flags.smtputf8,
        is_dsn: first.flags.is_dsn,
        tags: first.tags.clone(),
        size: data.map(|d| d.len() as u64),
        headers: data
            .map(|d| parse_headers(header_block(d)))
            .unwrap_or_default(),
        units: units
            .iter()
            .map(|v| UnitDetail {
                unit_id: v.unit.id.clone(),
                destination: v.unit.domain.clone(),
                recipients: v.unit.recipients.clone(),
                state: v.state,
                attempts: v.unit.attempts,
                next_attempt_at: (v.state != UnitState::Leased)
                    .then(|| format_timestamp(v.unit.next_attempt_at)),
                last_reply: v.unit.last_error.clone(),
                delay_notified: v.unit.delay_notified,
                held_seconds: v.unit.held_ms / 1000,
                history: v
                    .unit
                    .history
                    .iter()
                    .map(|a| AttemptView {
                        at: format_timestamp(a.at),
                        reply: a.reply.clone(),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// Reads message `id` from the backend.
pub async fn detail(backend: &Backend, id: &str, now: Millis) -> Result<MessageDetail, CtlError> {
    let units = units_of_id(backend.control.units(now).await?, id);
    let Some(first) = units.first() else {
        return Err(not_found(id));
    };
    let data = match backend.queue.message_data(&first.unit.message_id).await {
        Ok(data) => Some(data),
        Err(QueueError::NotFound(_)) => None,
        Err(error) => return Err(error.into()),
    };
    build(&units, data.as_deref(), now).ok_or_else(|| not_found(id))
}

/// The error for an id with nothing queued under it.
pub fn not_found(id: &str) -> CtlError {
    CtlError::NotFound(format!(
        "no message or unit {id:?} in the queue (delivered, bounced, deleted or never queued)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_unfolded_in_order() {
        let h = b"Subject: a\r\n long subject\r\nFrom: s@e.test\r\nX-Odd:no-space\r\nnot a field\r\n\r\n";
        assert_eq!(
            parse_headers(h),
            vec![
                ("Subject".to_string(), "a long subject".to_string()),
                ("From".to_string(), "s@e.test".to_string()),
                ("X-Odd".to_string(), "no-space".to_string()),
            ]
        );
    }
}
