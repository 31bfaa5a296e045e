//! [`QueueControl`] on Redis: the whole queue read in one MULTI snapshot,
//! claims, holds and releases as Lua scripts (module `scripts`).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

use super::{RedisBackend, decode, encode, scripts};
use crate::queue::control::{Hold, QueueControl, UnitState, UnitView, released};
use crate::queue::{DeliveryUnit, Lease, Millis, QueueError};

/// Unit ids per hold or release script call: bounds how long one script
/// keeps Redis busy.
const BATCH: usize = 500;

impl RedisBackend {
    async fn hold_since(&self, domain: &str) -> Result<Option<Millis>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(
            redis::cmd("HGET")
                .arg(&self.keys.holds)
                .arg(domain)
                .query_async(&mut conn),
        )
        .await
    }
}

/// The state of a unit from the indexes it is in.
fn state_of(
    id: &str,
    now: Millis,
    due: &HashMap<String, f64>,
    leased: &HashMap<String, f64>,
    held: &HashMap<String, f64>,
) -> (UnitState, Option<Millis>) {
    if let Some(expiry) = leased.get(id) {
        // An expired lease is due again, at its expiry (as lease reclaims it).
        return if (*expiry as Millis) > now {
            (UnitState::Leased, None)
        } else {
            (UnitState::Due, Some(*expiry as Millis))
        };
    }
    if let Some(at) = held.get(id) {
        return (UnitState::Held, Some(*at as Millis));
    }
    match due.get(id) {
        Some(at) if (*at as Millis) <= now => (UnitState::Due, Some(*at as Millis)),
        Some(at) => (UnitState::Deferred, Some(*at as Millis)),
        None => (UnitState::Due, None),
    }
}

#[async_trait]
impl QueueControl for RedisBackend {
    async fn units(&self, now: Millis) -> Result<Vec<UnitView>, QueueError> {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hgetall(&k.unit)
            .zrange_withscores(&k.due, 0, -1)
            .zrange_withscores(&k.leased, 0, -1)
            .zrange_withscores(&k.held, 0, -1);
        let mut conn = self.connection(&self.conn).await?;
        type Index = HashMap<String, f64>;
        let (records, due, leased, held): (HashMap<String, Vec<u8>>, Index, Index, Index) =
            self.bounded(pipe.query_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(records.len());
        for (id, json) in records {
            let mut unit: DeliveryUnit = match decode(&json, &id) {
                Ok(unit) => unit,
                Err(error) => {
                    tracing::warn!(%error, "undecodable unit record left out of the listing");
                    continue;
                }
            };
            let (state, at) = state_of(&id, now, &due, &leased, &held);
            if let Some(at) = at {
                unit.next_attempt_at = at;
            }
            out.push(UnitView { unit, state });
        }
        Ok(out)
    }

    async fn claim(
        &self,
        unit_ids: &[String],
        now: Millis,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        if unit_ids.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.keys;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(&k.due)
            .key(&k.leased)
            .key(&k.unit)
            .key(&k.token)
            .key(&k.held)
            .arg(now)
            .arg(expires_at)
            .arg(&token)
            .arg(unit_ids);
        let mut conn = self.connection(&self.conn).await?;
        let records: Vec<Vec<u8>> = self.bounded(inv.invoke_async(&mut conn)).await?;
        records
            .iter()
            .map(|bytes| {
                Ok(Lease {
                    unit: decode(bytes, &k.unit)?,
                    token: token.clone(),
                    expires_at,
                })
            })
            .collect()
    }

    async fn holds(&self) -> Result<Vec<Hold>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let all: HashMap<String, Millis> = self
            .bounded(
                redis::cmd("HGETALL")
                    .arg(&self.keys.holds)
                    .query_async(&mut conn),
            )
            .await?;
        let mut holds: Vec<Hold> = all
            .into_iter()
            .map(|(domain, since)| Hold { domain, since })
            .collect();
        holds.sort_by(|a, b| a.domain.cmp(&b.domain));
        Ok(holds)
    }

    async fn hold(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        let k = &self.keys;
        let run = |ids: &[String]| {
            let mut inv = scripts::HOLD.prepare_invoke();
            inv.key(&k.holds)
                .key(&k.due)
                .key(&k.held)
                .arg(domain)
                .arg(now)
                .arg(ids);
            inv
        };
        // The hold first: from here on lease diverts the domain's units, so
        // the listing below cannot miss one that becomes due meanwhile.
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self.bounded(run(&[]).invoke_async(&mut conn)).await?;
        let ids: Vec<String> = self
            .units(now)
            .await?
            .into_iter()
            .filter(|v| {
                v.unit.domain == domain && matches!(v.state, UnitState::Due | UnitState::Deferred)
            })
            .map(|v| v.unit.id)
            .collect();
        let mut moved = 0u64;
        for batch in ids.chunks(BATCH) {
            let n: u64 = self.bounded(run(batch).invoke_async(&mut conn)).await?;
            moved += n;
        }
        Ok(moved)
    }

    async fn release(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        let k = &self.keys;
        let since = self.hold_since(domain).await?;
        // The hold goes first, so lease stops diverting units; then every
        // unit held so far is moved back.
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(
                redis::cmd("HDEL")
                    .arg(&k.holds)
                    .arg(domain)
                    .query_async(&mut conn),
            )
            .await?;
        let held: Vec<DeliveryUnit> = self
            .units(now)
            .await?
            .into_iter()
            .filter(|v| v.unit.domain == domain && v.state == UnitState::Held)
            .map(|v| v.unit)
            .collect();
        if since.is_none() && held.is_empty() {
            return Err(QueueError::NotFound(format!("hold on {domain}")));
        }
        let since = since.unwrap_or(now);
        let mut moved = 0u64;
        for batch in held.chunks(BATCH) {
            let mut inv = scripts::RELEASE.prepare_invoke();
            inv.key(&k.held).key(&k.due).key(&k.unit);
            for unit in batch {
                let back = released(unit, since, now);
                inv.arg(&back.id).arg(encode(&back, &back.id)?);
            }
            let n: u64 = self.bounded(inv.invoke_async(&mut conn)).await?;
            moved += n;
        }
        Ok(moved)
    }
}
