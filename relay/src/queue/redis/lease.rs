//! Leasing across partitions: count what each shard has due, split the
//! batch fairly ([`plan_quotas`]), then one `LEASE` script per shard with
//! work, all in flight at once, each returning the message bytes with its
//! units.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::layout::token;
use super::{
    DeliveryUnit, Lease, LeasedUnit, Millis, QueueError, RECLAIM_BATCH, RedisBackend, ShardKeys,
    decode, plan_quotas, scripts,
};

impl RedisBackend {
    /// Leases up to `max` units over every shard that may hold some, with
    /// up to `budget` message bytes (0: none).
    pub(super) async fn lease_from_shards(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
        budget: usize,
    ) -> Result<Vec<LeasedUnit>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let shards = self.queue_shards().await?;
        let holds = self.held_domains();
        let counts = self.each(&shards, |k, mut conn| async move {
            let (due, expired): (u64, u64) = redis::pipe()
                .zcount(&k.due, "-inf", now)
                .zcount(&k.leased, "-inf", now)
                .query_async(&mut conn)
                .await?;
            Ok(due + expired)
        });
        let (holds, counts) = tokio::join!(holds, counts);
        let holds = holds?;
        // A shard that did not answer is left out of this round.
        let available: Vec<u64> = counts?.into_iter().map(|c| c.unwrap_or(0)).collect();
        let quotas = plan_quotas(&available, max, self.layout.next_start(shards.len()));
        let chosen: Vec<(Arc<ShardKeys>, usize)> = shards
            .into_iter()
            .zip(quotas)
            .filter(|(_, q)| *q > 0)
            .collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let share = budget / chosen.len();
        let quota: HashMap<String, usize> =
            chosen.iter().map(|(k, q)| (k.due.clone(), *q)).collect();
        let keys: Vec<Arc<ShardKeys>> = chosen.into_iter().map(|(k, _)| k).collect();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let (quota, holds) = (&quota, &holds);
        let replies = self
            .each(&keys, |k, mut conn| async move {
                let token = token(k.shard);
                let mut inv = scripts::LEASE.prepare_invoke();
                inv.key(&k.due)
                    .key(&k.leased)
                    .key(&k.unit)
                    .key(&k.token)
                    .key(&k.held)
                    .key(&k.data)
                    .arg(now)
                    .arg(quota.get(&k.due).copied().unwrap_or(0))
                    .arg(expires_at)
                    .arg(&token)
                    .arg(RECLAIM_BATCH)
                    .arg(share)
                    .arg(holds);
                let reply: Vec<Option<Vec<u8>>> = inv.invoke_async(&mut conn).await?;
                Ok((k, token, reply))
            })
            .await?;
        let mut out = Vec::new();
        let mut failed = None;
        for reply in replies {
            match reply {
                Ok((k, token, reply)) => decode_leases(k, &token, expires_at, reply, &mut out),
                // The other shards' leases stand: losing them here would
                // leave their units leased, undelivered, until expiry.
                Err(error) => failed = Some(error),
            }
        }
        match failed {
            Some(error) if out.is_empty() => Err(error),
            Some(error) => {
                tracing::warn!(%error, "a queue partition did not answer the lease");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// The held destinations, handed to every lease script.
    async fn held_domains(&self) -> Result<Vec<String>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(
            redis::cmd("HKEYS")
                .arg(&self.layout.shared.holds)
                .query_async(&mut conn),
        )
        .await
    }
}

/// Turns a `LEASE` reply (unit JSON, bytes or nil)* into leases; units
/// of one message share the one copy of its bytes.
fn decode_leases(
    keys: &ShardKeys,
    token: &str,
    expires_at: Millis,
    reply: Vec<Option<Vec<u8>>>,
    out: &mut Vec<LeasedUnit>,
) {
    let mut bodies: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    let mut items = reply.into_iter();
    while let (Some(unit), Some(body)) = (items.next(), items.next()) {
        let Some(unit) = unit else { continue };
        let unit: DeliveryUnit = match decode(&unit, &keys.unit) {
            Ok(unit) => unit,
            Err(error) => {
                // Skipped, not fatal: one bad record must not stall the
                // units leased with it. It stays leased until expiry.
                tracing::error!(%error, "undecodable unit record skipped");
                continue;
            }
        };
        let data = match body {
            Some(body) => {
                let body = Arc::new(body);
                bodies.insert(unit.message_id.clone(), body.clone());
                Some(body)
            }
            None => bodies.get(&unit.message_id).cloned(),
        };
        out.push(LeasedUnit {
            lease: Lease {
                unit,
                token: token.to_string(),
                expires_at,
            },
            data,
        });
    }
}
