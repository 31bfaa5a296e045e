//! Settling leases: one `SETTLE` script call per shard for a whole batch
//! (each item atomic on its own), the shards' calls in flight together;
//! then the suppression entries the partitions' outboxes received are
//! moved to the shared list.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::partitions::Outboxed;
use super::{
    Lease, NewMessage, QueueError, RedisBackend, Settlement, Shard, ShardKeys, encode, event_args,
    message_args, scripts, settled_unit, shard_of_token, units_of,
};

impl RedisBackend {
    /// Settles each lease, one result per lease in order.
    pub(super) async fn settle_batch(
        &self,
        batch: &[(&Lease, &Settlement)],
    ) -> Vec<Result<(), QueueError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let mut results: Vec<Option<Result<(), QueueError>>> =
            (0..batch.len()).map(|_| None).collect();
        // Items by shard, in batch order within each.
        let mut by_shard: BTreeMap<Shard, Vec<usize>> = BTreeMap::new();
        for (i, (lease, _)) in batch.iter().enumerate() {
            match shard_of_token(&lease.token) {
                Some(shard) => by_shard.entry(shard).or_default().push(i),
                // Not a token of ours: it cannot own the unit.
                None => results[i] = Some(Err(QueueError::LeaseLost(lease.unit.id.clone()))),
            }
        }
        let now = super::super::now_millis();
        let mut shards: Vec<Arc<ShardKeys>> = Vec::new();
        let mut invocations = Vec::new();
        for (shard, items) in &by_shard {
            let keys = self.layout.keys(*shard);
            match settle_invocation(&keys, items.iter().map(|&i| batch[i]), now) {
                Ok(inv) => {
                    shards.push(keys);
                    invocations.push((items.clone(), inv));
                }
                Err(error) => {
                    let text = error.to_string();
                    for &i in items {
                        results[i] = Some(Err(QueueError::Corrupt {
                            key: batch[i].0.unit.id.clone(),
                            reason: text.clone(),
                        }));
                    }
                }
            }
        }
        let replies = self
            .each(&invocations, |(_, inv), mut conn| async move {
                inv.invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await;
        let replies = match replies {
            Ok(replies) => replies,
            Err(error) => {
                let text = error.to_string();
                return batch
                    .iter()
                    .zip(results)
                    .map(|(_, r)| r.unwrap_or_else(|| Err(QueueError::Unavailable(text.clone()))))
                    .collect();
            }
        };
        let mut moves: Vec<Outboxed> = Vec::new();
        for ((keys, (items, _)), reply) in shards.iter().zip(&invocations).zip(replies) {
            match reply {
                Ok(done) => {
                    let mut moved = Vec::new();
                    for (n, &i) in items.iter().enumerate() {
                        let (lease, settlement) = batch[i];
                        if done.get(n) == Some(&1) {
                            results[i] = Some(Ok(()));
                            if keys.shard != Shard::Legacy {
                                moved.extend(suppression_fields(settlement).unwrap_or_default());
                            }
                        } else {
                            results[i] = Some(Err(QueueError::LeaseLost(lease.unit.id.clone())));
                        }
                    }
                    if !moved.is_empty() {
                        moves.push((keys.clone(), moved));
                    }
                }
                Err(error) => {
                    let text = error.to_string();
                    for &i in items {
                        results[i] = Some(Err(match &error {
                            QueueError::Timeout(d) => QueueError::Timeout(*d),
                            _ => QueueError::Unavailable(text.clone()),
                        }));
                    }
                }
            }
        }
        if !moves.is_empty()
            && let Err(error) = self.move_suppressions(&moves).await
        {
            // Stored in the partition's outbox with the settlement; the
            // next sweep moves it.
            self.layout.needs_sweep();
            tracing::warn!(%error, "suppression entries wait in a partition outbox");
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(QueueError::Unavailable("not settled".into()))))
            .collect()
    }
}

/// One `SETTLE` call for `items` (see `scripts::SETTLE`).
fn settle_invocation<'a>(
    keys: &ShardKeys,
    items: impl ExactSizeIterator<Item = (&'a Lease, &'a Settlement)>,
    now: u64,
) -> Result<redis::ScriptInvocation<'static>, QueueError> {
    let mut inv = scripts::SETTLE.prepare_invoke();
    inv.key(&keys.data)
        .key(&keys.left)
        .key(&keys.received)
        .key(&keys.unit)
        .key(&keys.due)
        .key(&keys.leased)
        .key(&keys.token)
        .key(&keys.events)
        .key(&keys.supp_out)
        .arg(items.len());
    for (lease, settlement) in items {
        inv.arg(&lease.unit.id)
            .arg(&lease.token)
            .arg(&lease.unit.message_id);
        match settled_unit(&lease.unit, settlement.op.clone(), now) {
            Some(unit) => {
                inv.arg("requeue")
                    .arg(encode(&unit, &unit.id)?)
                    .arg(unit.next_attempt_at);
            }
            None => {
                inv.arg("finish").arg("").arg("");
            }
        }
        let messages: Vec<&NewMessage> = settlement
            .enqueue
            .iter()
            .filter(|m| !units_of(m).is_empty())
            .collect();
        inv.arg(messages.len());
        for message in messages {
            message_args(&mut inv, message)?;
        }
        event_args(&mut inv, &settlement.events)?;
        let fields = suppression_fields(settlement)?;
        inv.arg(fields.len());
        for (key, json) in fields {
            inv.arg(key).arg(json);
        }
    }
    Ok(inv)
}

/// A settlement's suppression entries as stored: (key, JSON).
fn suppression_fields(settlement: &Settlement) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
    settlement
        .suppress
        .iter()
        .map(|entry| {
            let entry = entry.clone().normalised();
            let key = entry.key();
            encode(&entry, &key).map(|json| (key, json))
        })
        .collect()
}
