//! The event record: its JSON shape is a public, stable interface
//! (README "Events", `relay/schema/event.schema.json`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::queue::Millis;

/// What happened. Serialized lower-case (`"delivered"`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The relay accepted the message for this recipient (250 / HTTP 202).
    Accepted,
    /// The relay refused the message or recipient (SMTP or HTTP).
    Rejected,
    /// The destination accepted the message for this recipient.
    Delivered,
    /// A temporary failure; another attempt follows at `nextAttemptAt`.
    Deferred,
    /// A "delayed" DSN was sent to the sender for this recipient.
    Delayed,
    /// A permanent failure or expiry (`bounceType`).
    Bounced,
    /// Dropped because the recipient is on the suppression list.
    Suppressed,
    /// A DSN was generated (`dsnQueueId` names it in the queue).
    Dsn,
    /// A complaint (feedback loop) arrived for this recipient.
    Complained,
    /// The recipient unsubscribed.
    Unsubscribed,
    /// The recipient opened the message.
    Opened,
    /// The recipient clicked a link.
    Clicked,
    /// An operator dropped the message from the queue without a DSN
    /// (`petrel-relay queue delete`).
    Deleted,
}

impl EventType {
    /// Every type, in declaration order.
    pub const ALL: [EventType; 13] = [
        EventType::Accepted,
        EventType::Rejected,
        EventType::Delivered,
        EventType::Deferred,
        EventType::Delayed,
        EventType::Bounced,
        EventType::Suppressed,
        EventType::Dsn,
        EventType::Complained,
        EventType::Unsubscribed,
        EventType::Opened,
        EventType::Clicked,
        EventType::Deleted,
    ];

    /// The JSON spelling, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Accepted => "accepted",
            EventType::Rejected => "rejected",
            EventType::Delivered => "delivered",
            EventType::Deferred => "deferred",
            EventType::Delayed => "delayed",
            EventType::Bounced => "bounced",
            EventType::Suppressed => "suppressed",
            EventType::Dsn => "dsn",
            EventType::Complained => "complained",
            EventType::Unsubscribed => "unsubscribed",
            EventType::Opened => "opened",
            EventType::Clicked => "clicked",
            EventType::Deleted => "deleted",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`EventType`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?} (expected one of: {list})", list = type_list())]
pub struct UnknownEventType(pub String);

fn type_list() -> String {
    EventType::ALL.map(EventType::as_str).join(", ")
}

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

/// Why a `bounced` recipient failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BounceType {
    /// A permanent (5xx) reply for this recipient.
    Hard,
    /// A permanent failure that is not about the recipient (policy,
    /// content, the destination's configuration).
    Soft,
    /// Temporary failures until the queue lifetime ran out.
    Expired,
    /// An operator bounced it (`petrel-relay queue bounce`).
    Admin,
}

/// One event. Every optional field is absent from the JSON when unknown;
/// `tags` is always present (`{}` when the message had none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unique id (UUID v4): consumers deduplicate on it (delivery to
    /// webhooks is at-least-once).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When it happened: RFC 3339, UTC, milliseconds
    /// (`2026-12-01T21:50:00.123Z`).
    pub timestamp: String,
    /// The relay's queue id of the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// The message's `Message-ID` header, angle brackets removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_message_id: Option<String>,
    /// The configured sending domain the message was accepted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_domain: Option<String>,
    /// Envelope sender (`""` for the null sender of a DSN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Envelope recipient this event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The recipient's domain, lower-cased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Delivery attempt this outcome came from (1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The host that answered (MX host name or smarthost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
    /// The SMTP reply (one line: code, enhanced status, text) or the
    /// HTTP refusal text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Enhanced status code of the reply (`5.1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced_status: Option<String>,
    /// Whether the delivery connection used TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// The TLS policy that applied to the delivery connection: `dane`,
    /// `mta-sts`, `verified`, `encrypted`, `opportunistic` or `none` (the
    /// `policy` label of `petrel_outbound_tls_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_policy: Option<String>,
    /// The relay (host name / pod name) that recorded the event.
    pub relay: String,
    /// The message's tags (HTTP `tags`, SMTP `X-Petrel-Tags`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `bounced`: hard, soft or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_type: Option<BounceType>,
    /// `deferred`: when the next attempt is due (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// `dsn`: queue id of the generated DSN message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_queue_id: Option<String>,
    /// `bounced`: learnt from a returned DSN rather than at delivery.
    #[serde(rename = "async", default, skip_serializing_if = "Option::is_none")]
    pub is_async: Option<bool>,
    /// `complained`: the feedback type (`abuse`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
    /// `clicked`: the link's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `opened`/`clicked`: the client's User-Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// `opened`/`clicked`: by a machine (prefetching proxy, scanner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<bool>,
    /// `opened`/`clicked`: the first of its kind for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<bool>,
}

/// `at` as RFC 3339 UTC with milliseconds (`2026-12-01T21:50:00.123Z`).
pub fn format_timestamp(at: Millis) -> String {
    let at = i64::try_from(at).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(at)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Event {
    /// A new event of `kind` recorded by `relay` at `now`, with a fresh id
    /// and nothing else set.
    pub fn new(kind: EventType, relay: &str, now: Millis) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            timestamp: format_timestamp(now),
            queue_id: None,
            header_message_id: None,
            sending_domain: None,
            from: None,
            recipient: None,
            destination: None,
            attempt: None,
            remote_mta: None,
            response: None,
            enhanced_status: None,
            tls: None,
            tls_policy: None,
            relay: relay.to_string(),
            tags: BTreeMap::new(),
            bounce_type: None,
            next_attempt_at: None,
            dsn_queue_id: None,
            is_async: None,
            feedback_type: None,
            url: None,
            user_agent: None,
            machine: None,
            unique: None,
        }
    }

    /// Sets the recipient and its domain (`destination`).
    pub fn with_recipient(mut self, recipient: &str) -> Event {
        self.destination = crate::queue::recipient_domain(recipient);
        self.recipient = Some(recipient.to_string());
        self
    }

    /// Sets the SMTP reply and its enhanced status, taken from the reply
    /// text when it carries one (`550 5.1.1 ...`).
    pub fn with_response(mut self, response: &str) -> Event {
        let line = one_line(response);
        self.enhanced_status = enhanced_status_of(&line);
        self.response = Some(line);
        self
    }
}

/// A reply folded to one line (multi-line replies joined by spaces), so
/// the field stays one line as the schema promises.
fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The enhanced status code (`x.y.z`, x in 2/4/5) right after the reply
/// code, if the reply has one.
pub fn enhanced_status_of(reply: &str) -> Option<String> {
    let mut words = reply.split_whitespace();
    let first = words.next()?;
    // "550-5.1.1" (continuation) or "550 5.1.1".
    let candidate = match first.split_once('-') {
        Some((code, rest)) if code.len() == 3 && !rest.is_empty() => rest,
        _ if first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()) => words.next()?,
        _ => first,
    };
    let parts: Vec<&str> = candidate.split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| candidate.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip_through_their_names() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        let err = "delivred".parse::<EventType>().unwrap_err();
        assert!(err.to_string().contains("\"delivred\""), "{err}");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(
            format_timestamp(1_796_161_800_123),
            "2026-12-01T21:50:00.123Z"
        );
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn optional_fields_are_left_out_and_tags_always_present() {
        let e = Event::new(EventType::Accepted, "relay-0", 0);
        let json = serde_json::to_value(&e).unwrap();
        let obj = json.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["id", "relay", "tags", "timestamp", "type"]);
        assert_eq!(obj["tags"], serde_json::json!({}));
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn enhanced_status_is_read_from_the_reply() {
        let table = [
            ("550 5.1.1 no such user", Some("5.1.1")),
            ("550-5.1.1 first line", Some("5.1.1")),
            ("451 4.7.1 try later", Some("4.7.1")),
            ("550 no such user", None),
            ("5.7.1 policy", Some("5.7.1")),
            ("", None),
            ("250 2.0.0 ok", Some("2.0.0")),
            ("550 5.1111.1 x", None),
        ];
        for (reply, want) in table {
            assert_eq!(enhanced_status_of(reply).as_deref(), want, "{reply}");
        }
    }

    #[test]
    fn responses_are_one_line() {
        let e = Event::new(EventType::Bounced, "r", 0)
            .with_response("550-5.1.1 first\r\n550 5.1.1 second\r\n");
        assert_eq!(
            e.response.as_deref(),
            Some("550-5.1.1 first 550 5.1.1 second")
        );
        assert_eq!(e.enhanced_status.as_deref(), Some("5.1.1"));
    }
}

/// The JSON Schema of [`Event`], as committed in
/// `relay/schema/event.schema.json`.
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(Event);
    schema.insert(
        "$id".into(),
        "https://petrel.dev/schema/event.schema.json".into(),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod schema_drift {
    /// Regenerates the committed file when set.
    const REGENERATE: &str = "PETREL_WRITE_EVENT_SCHEMA";

    #[test]
    fn committed_event_schema_matches_the_type() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/event.schema.json");
        let generated = super::json_schema();
        if std::env::var_os(REGENERATE).is_some() {
            std::fs::write(&path, &generated).expect("write the schema");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is out of date; run `{REGENERATE}=1 cargo test -p petrel-relay --lib committed_event_schema` and commit it",
            path.display()
        );
        // And it describes what the type serializes.
        let schema: serde_json::Value = serde_json::from_str(&committed).unwrap();
        let props = schema["properties"].as_object().unwrap();
        for field in [
            "id",
            "type",
            "timestamp",
            "queueId",
            "headerMessageId",
            "tags",
            "bounceType",
            "async",
            "relay",
            "tlsPolicy",
        ] {
            assert!(props.contains_key(field), "{field} missing from the schema");
        }
    }
}
