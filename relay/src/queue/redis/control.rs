//! [`QueueControl`] on Redis: every shard read in one MULTI snapshot each
//! (the listing aggregates all partitions), claims, holds and releases as
//! Lua scripts per shard (module `scripts`); holds live in the shared
//! `{prefix}:holds`, which every lease passes to its scripts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::layout::{ShardKeys, token};
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
                .arg(&self.layout.shared.holds)
                .arg(domain)
                .query_async(&mut conn),
        )
        .await
    }

    /// Every unit of every shard with its state, by shard (each shard read
    /// in one MULTI snapshot).
    async fn units_by_shard(
        &self,
        now: Millis,
    ) -> Result<Vec<(Arc<ShardKeys>, Vec<UnitView>)>, QueueError> {
        let shards = self.queue_shards().await?;
        type Index = HashMap<String, f64>;
        type Snapshot = (HashMap<String, Vec<u8>>, Index, Index, Index);
        let replies: Vec<Snapshot> = self
            .each_ok(&shards, |k, mut conn| async move {
                redis::pipe()
                    .atomic()
                    .hgetall(&k.unit)
                    .zrange_withscores(&k.due, 0, -1)
                    .zrange_withscores(&k.leased, 0, -1)
                    .zrange_withscores(&k.held, 0, -1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(shards
            .into_iter()
            .zip(replies)
            .map(|(keys, (records, due, leased, held))| {
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
                (keys, out)
            })
            .collect())
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
        Ok(self
            .units_by_shard(now)
            .await?
            .into_iter()
            .flat_map(|(_, views)| views)
            .collect())
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
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        // Every shard is asked for every id: a unit is in one only, and the
        // others skip ids they do not hold.
        let shards = self.queue_shards().await?;
        let replies: Vec<(String, Vec<Vec<u8>>)> = self
            .each_ok(&shards, |k, mut conn| async move {
                let token = token(k.shard);
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
                let records: Vec<Vec<u8>> = inv.invoke_async(&mut conn).await?;
                Ok((token, records))
            })
            .await?;
        let mut out = Vec::new();
        for (token, records) in replies {
            for bytes in records {
                out.push(Lease {
                    unit: decode(&bytes, "unit")?,
                    token: token.clone(),
                    expires_at,
                });
            }
        }
        Ok(out)
    }

    async fn holds(&self) -> Result<Vec<Hold>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let all: HashMap<String, Millis> = self
            .bounded(
                redis::cmd("HGETALL")
                    .arg(&self.layout.shared.holds)
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
        // The hold first: from here on lease diverts the domain's units, so
        // the listing below cannot miss one that becomes due meanwhile.
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(
                redis::cmd("HSETNX")
                    .arg(&self.layout.shared.holds)
                    .arg(domain)
                    .arg(now)
                    .query_async(&mut conn),
            )
            .await?;
        let mut moved = 0u64;
        for (keys, views) in self.units_by_shard(now).await? {
            let ids: Vec<String> = views
                .into_iter()
                .filter(|v| {
                    v.unit.domain == domain
                        && matches!(v.state, UnitState::Due | UnitState::Deferred)
                })
                .map(|v| v.unit.id)
                .collect();
            for batch in ids.chunks(BATCH) {
                let mut inv = scripts::HOLD.prepare_invoke();
                inv.key(&keys.due).key(&keys.held).arg(batch);
                let n: u64 = self.bounded(inv.invoke_async(&mut conn)).await?;
                moved += n;
            }
        }
        Ok(moved)
    }

    async fn release(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        let since = self.hold_since(domain).await?;
        // The hold goes first, so lease stops diverting units; then every
        // unit held so far is moved back.
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(
                redis::cmd("HDEL")
                    .arg(&self.layout.shared.holds)
                    .arg(domain)
                    .query_async(&mut conn),
            )
            .await?;
        let held: Vec<(Arc<ShardKeys>, Vec<DeliveryUnit>)> = self
            .units_by_shard(now)
            .await?
            .into_iter()
            .map(|(keys, views)| {
                let units = views
                    .into_iter()
                    .filter(|v| v.unit.domain == domain && v.state == UnitState::Held)
                    .map(|v| v.unit)
                    .collect();
                (keys, units)
            })
            .collect();
        if since.is_none() && held.iter().all(|(_, units)| units.is_empty()) {
            return Err(QueueError::NotFound(format!("hold on {domain}")));
        }
        let since = since.unwrap_or(now);
        let mut moved = 0u64;
        for (keys, units) in &held {
            for batch in units.chunks(BATCH) {
                let mut inv = scripts::RELEASE.prepare_invoke();
                inv.key(&keys.held).key(&keys.due).key(&keys.unit);
                for unit in batch {
                    let back = released(unit, since, now);
                    inv.arg(&back.id).arg(encode(&back, &back.id)?);
                }
                let n: u64 = self.bounded(inv.invoke_async(&mut conn)).await?;
                moved += n;
            }
        }
        Ok(moved)
    }
}
