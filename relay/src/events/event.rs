//! SCRATCH: local copy of the events contract until events-core lands.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::queue::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Accepted,
    Rejected,
    Delivered,
    Deferred,
    Delayed,
    Bounced,
    Suppressed,
    Dsn,
    Complained,
    Unsubscribed,
    Opened,
    Clicked,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
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
    ];
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    pub relay: String,
    pub tags: BTreeMap<String, String>,
}

impl Event {
    pub fn new(kind: EventType, relay: &str, now: Millis) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            timestamp: now.to_string(),
            recipient: None,
            relay: relay.to_string(),
            tags: BTreeMap::new(),
        }
    }
}
