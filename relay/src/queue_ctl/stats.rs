//! `queue stats`: units by state and destination, the oldest message's
//! age, and the held destinations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CtlError;
use crate::events::format_timestamp;
use crate::queue::{Backend, Hold, Millis, UnitState, UnitView};

/// Unit counts by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    /// Due now.
    pub due: u64,
    /// Being delivered.
    pub leased: u64,
    /// Waiting for a later attempt.
    pub deferred: u64,
    /// Destination held.
    pub held: u64,
}

impl StateCounts {
    fn add(&mut self, state: UnitState) {
        match state {
            UnitState::Due => self.due += 1,
            UnitState::Leased => self.leased += 1,
            UnitState::Deferred => self.deferred += 1,
            UnitState::Held => self.held += 1,
        }
    }

    /// All units counted.
    pub fn total(&self) -> u64 {
        self.due + self.leased + self.deferred + self.held
    }
}

/// One destination's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStats {
    /// The destination domain.
    pub domain: String,
    /// Its units by state.
    pub units: StateCounts,
    /// Whether it is held.
    pub held: bool,
    /// Age of its oldest message, seconds.
    pub oldest_age_seconds: u64,
}

/// A held destination, for output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    /// The domain.
    pub domain: String,
    /// Held since (RFC 3339).
    pub since: String,
}

/// The `queue stats` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueSummary {
    /// Messages stored.
    pub messages: u64,
    /// Units by state, over all destinations.
    pub units: StateCounts,
    /// Age of the oldest message, seconds (0 when empty).
    pub oldest_age_seconds: u64,
    /// When the oldest message was accepted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_received_at: Option<String>,
    /// Per destination, most units first.
    pub destinations: Vec<DestinationStats>,
    /// The held destinations.
    pub holds: Vec<HoldView>,
}

/// The summary of `units` and `holds` at `now`. Pure.
pub fn summarize(units: &[UnitView], holds: &[Hold], messages: u64, now: Millis) -> QueueSummary {
    let mut total = StateCounts::default();
    let mut by_domain: BTreeMap<&str, (StateCounts, Millis)> = BTreeMap::new();
    let mut oldest: Option<Millis> = None;
    for view in units {
        total.add(view.state);
        let entry = by_domain
            .entry(view.unit.domain.as_str())
            .or_insert((StateCounts::default(), Millis::MAX));
        entry.0.add(view.state);
        entry.1 = entry.1.min(view.unit.received_at);
        oldest = Some(oldest.map_or(view.unit.received_at, |o| o.min(view.unit.received_at)));
    }
    let held = |d: &str| holds.iter().any(|h| h.domain == d);
    let mut destinations: Vec<DestinationStats> = by_domain
        .into_iter()
        .map(|(domain, (units, first))| DestinationStats {
            domain: domain.to_string(),
            units,
            held: held(domain),
            oldest_age_seconds: now.saturating_sub(first) / 1000,
        })
        .collect();
    // A held destination with nothing queued still shows.
    for h in holds {
        if !destinations.iter().any(|d| d.domain == h.domain) {
            destinations.push(DestinationStats {
                domain: h.domain.clone(),
                units: StateCounts::default(),
                held: true,
                oldest_age_seconds: 0,
            });
        }
    }
    destinations.sort_by(|a, b| {
        b.units
            .total()
            .cmp(&a.units.total())
            .then(a.domain.cmp(&b.domain))
    });
    QueueSummary {
        messages,
        units: total,
        oldest_age_seconds: oldest.map_or(0, |o| now.saturating_sub(o) / 1000),
        oldest_received_at: oldest.map(format_timestamp),
        destinations,
        holds: holds
            .iter()
            .map(|h| HoldView {
                domain: h.domain.clone(),
                since: format_timestamp(h.since),
            })
            .collect(),
    }
}

/// Reads the queue and summarizes it.
pub async fn summary(backend: &Backend, now: Millis) -> Result<QueueSummary, CtlError> {
    let units = backend.control.units(now).await?;
    let holds = backend.control.holds().await?;
    let messages = backend.queue.stats(now).await?.messages;
    Ok(summarize(&units, &holds, messages, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{NewMessage, units_of};

    pub(crate) fn view(id: &str, rcpts: &[&str], at: Millis, state: UnitState) -> Vec<UnitView> {
        units_of(&NewMessage {
            id: id.into(),
            mail_from: "s@e.test".into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            data: Vec::new(),
            sending_domain: "e.test".into(),
            received_at: at,
            flags: Default::default(),
            tags: Default::default(),
            header_message_id: None,
        })
        .into_iter()
        .map(|unit| UnitView { unit, state })
        .collect()
    }

    #[test]
    fn counts_by_state_and_destination_with_holds() {
        let mut units = view("a", &["1@x.org", "2@y.org"], 1_000, UnitState::Deferred);
        units.extend(view("b", &["3@x.org"], 5_000, UnitState::Held));
        units.extend(view("c", &["4@z.org"], 9_000, UnitState::Leased));
        let holds = vec![
            Hold {
                domain: "x.org".into(),
                since: 2_000,
            },
            Hold {
                domain: "idle.org".into(),
                since: 3_000,
            },
        ];
        let s = summarize(&units, &holds, 3, 11_000);
        assert_eq!(s.units.total(), 4);
        assert_eq!((s.units.deferred, s.units.held, s.units.leased), (2, 1, 1));
        assert_eq!(s.oldest_age_seconds, 10);
        assert_eq!(s.destinations[0].domain, "x.org");
        assert!(s.destinations[0].held);
        assert_eq!(s.destinations[0].units.held, 1);
        assert_eq!(s.destinations[0].oldest_age_seconds, 10);
        let idle = s
            .destinations
            .iter()
            .find(|d| d.domain == "idle.org")
            .unwrap();
        assert!(idle.held && idle.units.total() == 0);
        assert_eq!(s.holds.len(), 2);
        assert_eq!(summarize(&[], &[], 0, 5).oldest_received_at, None);
    }
}
