//! [`QueueControl`] on the embedded file: each operation one redb
//! transaction. The indexes are keyed by time, so finding one unit's entry
//! means a scan; these are operator commands, not the delivery path.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable};

use super::control::{Hold, QueueControl, UnitState, UnitView, released};
use super::embedded::{
    DUE, EmbeddedBackend, HELD, HOLDS, LEASE_EXPIRY, LEASES, UNITS, decode, encode,
};
use super::{DeliveryUnit, Lease, Millis, QueueError};

/// Every `(time, id)` entry of an index table, by id.
fn index(
    table: &impl ReadableTable<(u64, &'static str), ()>,
) -> Result<HashMap<String, u64>, QueueError> {
    let mut out = HashMap::new();
    for entry in table.iter()? {
        let (key, _) = entry?;
        let (at, id) = key.value();
        out.insert(id.to_string(), at);
    }
    Ok(out)
}

#[async_trait]
impl QueueControl for EmbeddedBackend {
    async fn units(&self, now: Millis) -> Result<Vec<UnitView>, QueueError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let due = index(&txn.open_table(DUE)?)?;
            let held = index(&txn.open_table(HELD)?)?;
            let leases = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for entry in txn.open_table(UNITS)?.iter()? {
                let (id, json) = entry?;
                let id = id.value();
                let mut unit: DeliveryUnit = match decode(json.value(), id) {
                    Ok(unit) => unit,
                    Err(error) => {
                        tracing::warn!(%error, "undecodable unit record left out of the listing");
                        continue;
                    }
                };
                let lease = leases.get(id)?.map(|v| v.value().0);
                let (state, at) = match (lease, held.get(id), due.get(id)) {
                    (Some(expiry), _, _) if expiry > now => (UnitState::Leased, None),
                    (Some(expiry), _, _) => (UnitState::Due, Some(expiry)),
                    (None, Some(at), _) => (UnitState::Held, Some(*at)),
                    (None, None, Some(at)) if *at <= now => (UnitState::Due, Some(*at)),
                    (None, None, Some(at)) => (UnitState::Deferred, Some(*at)),
                    (None, None, None) => (UnitState::Due, None),
                };
                if let Some(at) = at {
                    unit.next_attempt_at = at;
                }
                out.push(UnitView { unit, state });
            }
            Ok(out)
        })
        .await
    }

    async fn claim(
        &self,
        unit_ids: &[String],
        now: Millis,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        let wanted: HashSet<String> = unit_ids.iter().cloned().collect();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        self.run(move |db| {
            let txn = db.begin_write()?;
            let mut out = Vec::new();
            {
                let units = txn.open_table(UNITS)?;
                let mut due = txn.open_table(DUE)?;
                let mut held = txn.open_table(HELD)?;
                let mut leases = txn.open_table(LEASES)?;
                let mut expiry = txn.open_table(LEASE_EXPIRY)?;
                let due_at = index(&due)?;
                let held_at = index(&held)?;
                for id in &wanted {
                    let Some(json) = units.get(id.as_str())? else {
                        continue;
                    };
                    let unit: DeliveryUnit = decode(json.value(), id)?;
                    let lease = leases.get(id.as_str())?.map(|v| v.value().0);
                    match lease {
                        Some(at) if at > now => continue,
                        Some(at) => {
                            expiry.remove((at, id.as_str()))?;
                        }
                        None => {}
                    }
                    if let Some(at) = due_at.get(id) {
                        due.remove((*at, id.as_str()))?;
                    }
                    if let Some(at) = held_at.get(id) {
                        held.remove((*at, id.as_str()))?;
                    }
                    leases.insert(id.as_str(), (expires_at, token.as_str()))?;
                    expiry.insert((expires_at, id.as_str()), ())?;
                    out.push(Lease {
                        unit,
                        token: token.clone(),
                        expires_at,
                    });
                }
            }
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    async fn holds(&self) -> Result<Vec<Hold>, QueueError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(HOLDS)?.iter()? {
                let (domain, since) = entry?;
                out.push(Hold {
                    domain: domain.value().to_string(),
                    since: since.value(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn hold(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        let domain = domain.to_string();
        self.run(move |db| {
            let txn = db.begin_write()?;
            let mut moved = 0;
            {
                let mut holds = txn.open_table(HOLDS)?;
                if holds.get(domain.as_str())?.is_none() {
                    holds.insert(domain.as_str(), now)?;
                }
                let units = txn.open_table(UNITS)?;
                let mut due = txn.open_table(DUE)?;
                let mut held = txn.open_table(HELD)?;
                for (id, at) in index(&due)? {
                    let Some(json) = units.get(id.as_str())? else {
                        continue;
                    };
                    let Ok(unit) = decode::<DeliveryUnit>(json.value(), &id) else {
                        continue;
                    };
                    if unit.domain == domain {
                        due.remove((at, id.as_str()))?;
                        held.insert((at, id.as_str()), ())?;
                        moved += 1;
                    }
                }
            }
            txn.commit()?;
            Ok(moved)
        })
        .await
    }

    async fn release(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        let domain = domain.to_string();
        self.run(move |db| {
            let txn = db.begin_write()?;
            let mut moved = 0;
            {
                let since = txn
                    .open_table(HOLDS)?
                    .remove(domain.as_str())?
                    .map(|v| v.value());
                let mut units = txn.open_table(UNITS)?;
                let mut due = txn.open_table(DUE)?;
                let mut held = txn.open_table(HELD)?;
                for (id, at) in index(&held)? {
                    let unit = match units.get(id.as_str())? {
                        Some(json) => decode::<DeliveryUnit>(json.value(), &id)?,
                        None => continue,
                    };
                    if unit.domain != domain {
                        continue;
                    }
                    let back = released(&unit, since.unwrap_or(now), now);
                    units.insert(id.as_str(), encode(&back, &id)?.as_slice())?;
                    held.remove((at, id.as_str()))?;
                    due.insert((at, id.as_str()), ())?;
                    moved += 1;
                }
                if since.is_none() && moved == 0 {
                    // Dropping the transaction aborts it: nothing changed.
                    return Err(QueueError::NotFound(format!("hold on {domain}")));
                }
            }
            txn.commit()?;
            Ok(moved)
        })
        .await
    }
}
