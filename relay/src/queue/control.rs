//! What operators do to the queue (`petrel-relay queue ...`): look at every
//! unit, claim units for an action, and hold or release a destination.
//!
//! Kept apart from [`super::Queue`], which is the hot path of inbound and
//! delivery. Actions on messages (retry, bounce, delete) are not methods
//! here: they [`QueueControl::claim`] the units (a lease, whatever state
//! they were in) and end that lease with the ordinary atomic
//! [`super::Queue::settle`], so an action writes its DSN and events in the
//! same step as the change, exactly like a delivery attempt does.
//!
//! Holds: a held destination's units sit in a `held` index that
//! [`super::Queue::lease`] never takes from, so they are neither attempted
//! nor re-leased; lease moves any unit of a held destination that becomes
//! due (a new message, a retry settled by a worker that was mid-delivery
//! when the hold came) into that index instead of handing it out. The hold
//! lives in the backend, so every pod obeys it. Release moves the units
//! back to due (at their scheduled time) and adds the time they were held
//! to [`super::DeliveryUnit::held_ms`], so a hold never makes mail expire.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{DeliveryUnit, Lease, Millis, QueueError};

/// Where a unit is, as `queue list --state` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum UnitState {
    /// Due now, waiting for a worker.
    Due,
    /// Leased by a worker (being delivered).
    Leased,
    /// Waiting for its next attempt.
    Deferred,
    /// Its destination is held.
    Held,
}

impl UnitState {
    /// The name used in output and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitState::Due => "due",
            UnitState::Leased => "leased",
            UnitState::Deferred => "deferred",
            UnitState::Held => "held",
        }
    }
}

/// A unit with where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitView {
    /// The stored unit.
    pub unit: DeliveryUnit,
    /// Its state at the time asked.
    pub state: UnitState,
}

/// A held destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The destination domain, lower-cased.
    pub domain: String,
    /// When the hold was put on.
    pub since: Millis,
}

/// Inspection and operator actions, on every backend.
#[async_trait]
pub trait QueueControl: Send + Sync + 'static {
    /// Every unit in the queue and its state at `now` (a lease expired at
    /// `now` counts as due, as in [`super::Queue::stats`]).
    async fn units(&self, now: Millis) -> Result<Vec<UnitView>, QueueError>;

    /// Leases the units named (due, deferred, held or with an expired
    /// lease) for `lease_for`, for an operator action settled through
    /// [`super::Queue::settle`]. Units leased by a worker at `now`, and ids
    /// not in the queue, are left out of the answer.
    async fn claim(
        &self,
        unit_ids: &[String],
        now: Millis,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError>;

    /// The held destinations.
    async fn holds(&self) -> Result<Vec<Hold>, QueueError>;

    /// Holds `domain` from `now` (keeping an earlier start when already
    /// held) and moves its waiting units to the held index; returns how
    /// many moved.
    async fn hold(&self, domain: &str, now: Millis) -> Result<u64, QueueError>;

    /// Lifts the hold on `domain` and makes its held units due again at
    /// their scheduled time; returns how many, or [`QueueError::NotFound`]
    /// when it was not held.
    async fn release(&self, domain: &str, now: Millis) -> Result<u64, QueueError>;
}

/// The held time to credit to a unit released at `now`: since the hold
/// began, or since the message arrived when it came during the hold.
pub(crate) fn held_credit(unit: &DeliveryUnit, hold_since: Millis, now: Millis) -> Millis {
    now.saturating_sub(hold_since.max(unit.received_at))
}

/// The unit as release stores it back.
pub(crate) fn released(unit: &DeliveryUnit, hold_since: Millis, now: Millis) -> DeliveryUnit {
    DeliveryUnit {
        held_ms: unit
            .held_ms
            .saturating_add(held_credit(unit, hold_since, now)),
        ..unit.clone()
    }
}

/// A destination as holds store it: lower-cased, no surrounding space.
pub fn normalize_domain(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_time_counts_from_the_hold_or_the_arrival() {
        let unit = DeliveryUnit {
            received_at: 100,
            held_ms: 5,
            ..crate::queue::units_of(&crate::queue::NewMessage {
                id: "m".into(),
                mail_from: "s@e.test".into(),
                recipients: vec!["a@x.org".into()],
                data: Vec::new(),
                sending_domain: "e.test".into(),
                received_at: 100,
                flags: Default::default(),
                tags: Default::default(),
                header_message_id: None,
            })
            .remove(0)
        };
        assert_eq!(
            held_credit(&unit, 50, 1_000),
            900,
            "arrived during the hold"
        );
        assert_eq!(held_credit(&unit, 400, 1_000), 600, "held after arrival");
        assert_eq!(held_credit(&unit, 2_000, 1_000), 0);
        assert_eq!(released(&unit, 400, 1_000).held_ms, 605);
        assert_eq!(released(&unit, 400, 1_000).lifetime_start(), 705);
        assert_eq!(normalize_domain(" Example.ORG. "), "example.org");
    }
}
