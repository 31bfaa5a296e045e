//! `queue list`: one row per unit, filtered by destination, state and age.

use serde::{Deserialize, Serialize};

use super::ListFilter;
use crate::events::format_timestamp;
use crate::queue::{Millis, UnitState, UnitView};

/// One unit, as `queue list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRow {
    /// The message's queue id.
    pub queue_id: String,
    /// The unit's id (queue id and destination).
    pub unit_id: String,
    /// Envelope sender (empty for a DSN).
    pub sender: String,
    /// Recipients still to deliver.
    pub recipients: Vec<String>,
    /// Destination domain.
    pub destination: String,
    /// Where the unit is.
    pub state: UnitState,
    /// Attempts made.
    pub attempts: u32,
    /// The last temporary failure's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// When it is tried next (RFC 3339); absent while being delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// When the message was accepted (RFC 3339).
    pub received_at: String,
    /// Seconds since it was accepted.
    pub age_seconds: u64,
}

/// Whether `view` passes `filter` at `now`. Pure.
pub fn matches(view: &UnitView, filter: &ListFilter, now: Millis) -> bool {
    let domain_ok = filter.domain.as_deref().is_none_or(|d| {
        view.unit
            .domain
            .eq_ignore_ascii_case(d.trim_end_matches('.'))
    });
    let state_ok = filter.state.is_none_or(|s| s == view.state);
    let age_ok = filter
        .older_than_ms
        .is_none_or(|ms| now.saturating_sub(view.unit.received_at) >= ms);
    domain_ok && state_ok && age_ok
}

/// The row of one unit.
pub fn row(view: &UnitView, now: Millis) -> ListRow {
    let unit = &view.unit;
    ListRow {
        queue_id: unit.message_id.clone(),
        unit_id: unit.id.clone(),
        sender: unit.mail_from.clone(),
        recipients: unit.recipients.clone(),
        destination: unit.domain.clone(),
        state: view.state,
        attempts: unit.attempts,
        last_reply: unit.last_error.clone(),
        next_attempt_at: (view.state != UnitState::Leased)
            .then(|| format_timestamp(unit.next_attempt_at)),
        received_at: format_timestamp(unit.received_at),
        age_seconds: now.saturating_sub(unit.received_at) / 1000,
    }
}

/// The rows of the units passing `filter`, oldest message first.
pub fn rows(mut units: Vec<UnitView>, filter: &ListFilter, now: Millis) -> Vec<ListRow> {
    units.retain(|v| matches(v, filter, now));
    units.sort_by(|a, b| (a.unit.received_at, &a.unit.id).cmp(&(b.unit.received_at, &b.unit.id)));
    units.iter().map(|v| row(v, now)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{NewMessage, units_of};

    fn views() -> Vec<UnitView> {
        let msg = |id: &str, at: Millis| NewMessage {
            id: id.into(),
            mail_from: "s@e.test".into(),
            recipients: vec!["a@x.org".into(), "b@y.org".into()],
            data: Vec::new(),
            sending_domain: "e.test".into(),
            received_at: at,
            flags: Default::default(),
            tags: Default::default(),
            header_message_id: None,
        };
        let mut out = Vec::new();
        for (m, state) in [
            (msg("old", 1_000), UnitState::Deferred),
            (msg("new", 3_600_000), UnitState::Leased),
        ] {
            for mut unit in units_of(&m) {
                unit.last_error = Some("451 4.7.1 try later".into());
                out.push(UnitView { unit, state });
            }
        }
        out
    }

    #[test]
    fn filters_by_domain_state_and_age() {
        let now = 3_601_000;
        let all = rows(views(), &ListFilter::default(), now);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].queue_id, "old", "oldest first");
        let f = ListFilter {
            domain: Some("X.org".into()),
            ..Default::default()
        };
        assert_eq!(rows(views(), &f, now).len(), 2);
        let f = ListFilter {
            state: Some(UnitState::Leased),
            ..Default::default()
        };
        let leased = rows(views(), &f, now);
        assert_eq!(leased.len(), 2);
        assert!(leased.iter().all(|r| r.next_attempt_at.is_none()));
        let f = ListFilter {
            older_than_ms: Some(3_600_000),
            ..Default::default()
        };
        let old = rows(views(), &f, now);
        assert_eq!(old.len(), 2);
        assert!(old.iter().all(|r| r.queue_id == "old"));
        assert_eq!(old[0].last_reply.as_deref(), Some("451 4.7.1 try later"));
        assert_eq!(old[0].age_seconds, 3_600);
    }
}
