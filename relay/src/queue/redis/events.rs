//! The event outbox on Redis: one stream per partition (`{prefix:N}:events`,
//! written by `ENQUEUE` and `SETTLE` with the state change) and the shared
//! `{prefix}:events` (written by `PUBLISH`, and by the single-tag layout of
//! before), read here as one log.
//!
//! A position names its stream: `<ms>-<n>@N` for partition N, a plain
//! stream id for the shared stream (as before partitions). Readers see
//! every stream; the merged order is by stream id, streams tied at one id
//! by partition, which within one stream (hence for the events of one
//! message) is the order they were written.
//!
//! Each reader (a webhook) is a consumer group. `claim` first takes over
//! entries another consumer has held longer than `reclaim_after`
//! (`XAUTOCLAIM`), then reads new ones (`XREADGROUP >`); `ack` is `XACK`.
//! Trimming (`XTRIM MINID`) never passes the oldest entry any given group
//! has not acknowledged, so nothing a webhook still owes is dropped.
//!
//! A stream id is `<ms>-<n>` of the Redis server's clock, so it doubles
//! as the time the event was stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::layout::{
    Shard, ShardKeys, id_key, merged_key, plan_quotas, range_start, seq, split_seq,
};
use super::{RedisBackend, decode, scripts};
use crate::events::{Backlog, Event, EventLog, EventSeq, StoredEvent, TrimReport};
use crate::queue::{Millis, QueueError, SuppressionEntry};

/// The millisecond part of a stream id.
fn id_millis(id: &str) -> Millis {
    id.split_once('-')
        .map_or(id, |(ms, _)| ms)
        .parse()
        .unwrap_or(0)
}

fn text(v: &Value) -> Option<String> {
    redis::from_redis_value_ref(v).ok()
}

/// Decodes `[[id, [field, value, ...]], ...]` (XRANGE, XREADGROUP and
/// XAUTOCLAIM entries). Entries already trimmed (`[id, nil]`) and
/// undecodable ones are skipped; the latter are logged (they stay in the
/// stream until trimmed, and acking is the reader's business).
fn entries(v: &Value, key: &str) -> Vec<StoredEvent> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else { continue };
        let (Some(id), Some(Value::Array(fields))) = (pair.first().and_then(text), pair.get(1))
        else {
            continue;
        };
        let json = fields
            .chunks(2)
            .find(|kv| kv.first().and_then(text).as_deref() == Some("e"))
            .and_then(|kv| kv.get(1))
            .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok());
        let Some(json) = json else { continue };
        match decode::<Event>(&json, key) {
            Ok(event) => out.push(StoredEvent {
                stored_at: id_millis(&id),
                seq: id,
                event,
            }),
            Err(error) => tracing::error!(%error, id, "undecodable event skipped"),
        }
    }
    out
}

/// A field of an XINFO reply (`[name, value, name, value, ...]`).
fn info_field<'a>(info: &'a [Value], name: &str) -> Option<&'a Value> {
    info.chunks(2)
        .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
        .and_then(|kv| kv.get(1))
}

/// What a group still owes: its oldest pending id, the id it has read up
/// to, and how many entries are pending or unread.
#[derive(Debug)]
struct GroupState {
    oldest_pending: Option<String>,
    last_delivered: String,
    pending: u64,
    unread: Option<u64>,
}

/// Idle time given to entries a claim read beyond its `max` and hands
/// back: far past any `reclaim_after`, so the next claim takes them first.
const GIVE_BACK_IDLE_MS: u64 = 10 * 365 * 86_400_000;

/// Rounds of a claim over the streams (the first asks each stream for an
/// equal share, later ones only the streams that filled theirs).
const CLAIM_ROUNDS: usize = 8;

/// The entries of a reply, positions naming `shard`'s stream.
fn entries_of(v: &Value, keys: &ShardKeys) -> Vec<StoredEvent> {
    let mut out = entries(v, &keys.events);
    for e in &mut out {
        e.seq = seq(keys.shard, &e.seq);
    }
    out
}

/// The merged-log key of a stored event.
fn order_of(e: &StoredEvent) -> (u64, u64, u64) {
    match split_seq(&e.seq) {
        Some((shard, id)) => merged_key(shard, id),
        None => (u64::MAX, u64::MAX, u64::MAX),
    }
}

/// How a stream is asked in one claim round.
#[derive(Clone, Copy)]
enum Fetch {
    /// Take over entries idle longer than this (`XAUTOCLAIM`).
    Reclaim(Duration),
    /// Read never-delivered entries (`XREADGROUP >`).
    Fresh,
}

impl RedisBackend {
    /// The state of `group` on stream `key`, `None` when it does not exist.
    async fn group_state(&self, key: &str, group: &str) -> Result<Option<GroupState>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let groups: Value = match self
            .bounded(
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(key)
                    .query_async(&mut conn),
            )
            .await
        {
            Ok(v) => v,
            // No stream yet: no group either.
            Err(QueueError::Unavailable(e)) if e.contains("no such key") => return Ok(None),
            Err(e) => return Err(e),
        };
        let Value::Array(groups) = groups else {
            return Ok(None);
        };
        let info = groups.iter().find_map(|g| match g {
            Value::Array(info)
                if info_field(info, "name").and_then(text).as_deref() == Some(group) =>
            {
                Some(info.clone())
            }
            _ => None,
        });
        let Some(info) = info else { return Ok(None) };
        let pending: u64 = info_field(&info, "pending")
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .unwrap_or(0);
        let last_delivered = info_field(&info, "last-delivered-id")
            .and_then(text)
            .unwrap_or_else(|| "0-0".into());
        let unread: Option<u64> =
            info_field(&info, "lag").and_then(|v| redis::from_redis_value_ref(v).ok());
        let summary: Value = self
            .bounded(
                redis::cmd("XPENDING")
                    .arg(key)
                    .arg(group)
                    .query_async(&mut conn),
            )
            .await?;
        let oldest_pending = match &summary {
            Value::Array(parts) if pending > 0 => parts.get(1).and_then(text),
            _ => None,
        };
        Ok(Some(GroupState {
            oldest_pending,
            last_delivered,
            pending,
            unread,
        }))
    }

    /// Every consumer group of stream `key` (none without a stream).
    async fn group_names(&self, key: &str) -> Result<Vec<String>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let groups: Value = match self
            .bounded(
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(key)
                    .query_async(&mut conn),
            )
            .await
        {
            Ok(v) => v,
            Err(QueueError::Unavailable(e)) if e.contains("no such key") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Value::Array(groups) = groups else {
            return Ok(Vec::new());
        };
        Ok(groups
            .iter()
            .filter_map(|g| match g {
                Value::Array(info) => info_field(info, "name").and_then(text),
                _ => None,
            })
            .collect())
    }

    /// The first entry of stream `key` after stream id `id`, if any.
    async fn first_after(&self, key: &str, id: &str) -> Result<Option<StoredEvent>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let reply: Value = self
            .bounded(
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(format!("({id}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(entries(&reply, key).into_iter().next())
    }

    /// Creates `group` on stream `key` at its start, if missing.
    async fn ensure_group_on(&self, key: &str, group: &str) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let created: Result<String, QueueError> = self
            .bounded(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(key)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn),
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(QueueError::Unavailable(e)) if e.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Up to `count` entries of one stream for `consumer`. A partition
    /// whose stream has no group yet (it came with a higher partition
    /// count after the reader started) gets the group, from its start.
    /// Returns the entries and, for a reclaim, the cursor to go on from
    /// (`0-0` once the pending list is scanned through).
    async fn fetch(
        &self,
        keys: &ShardKeys,
        group: &str,
        consumer: &str,
        count: usize,
        how: Fetch,
        cursor: &str,
    ) -> Result<(Vec<StoredEvent>, String), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let mut cmd = match how {
            Fetch::Reclaim(after) => {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                // A claim scans from 0-0 (no cursor state kept between
                // claims; the pending list is bounded by what readers
                // hold), its later rounds on from where the last stopped,
                // so they do not take back what this claim already took.
                // 0 takes over every pending entry (not `ms`, whose floor
                // of 1 would spare those claimed this millisecond).
                cmd.arg(&keys.events)
                    .arg(group)
                    .arg(consumer)
                    .arg(after.as_millis() as u64)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count);
                cmd
            }
            Fetch::Fresh => {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(&keys.events)
                    .arg(">");
                cmd
            }
        };
        let reply: Value = match self.bounded(cmd.query_async(&mut conn)).await {
            Ok(v) => v,
            Err(QueueError::Unavailable(e)) if e.contains("NOGROUP") => {
                self.ensure_group_on(&keys.events, group).await?;
                cmd = cmd.clone();
                self.bounded(cmd.query_async(&mut conn)).await?
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let mut next = "0-0".to_string();
        match (how, &reply) {
            // [next cursor, entries, deleted ids]
            (Fetch::Reclaim(_), Value::Array(parts)) => {
                if let Some(v) = parts.get(1) {
                    out = entries_of(v, keys);
                }
                if let Some(cursor) = parts.first().and_then(text) {
                    next = cursor;
                }
            }
            // [[stream key, entries]] (or a map), nil when nothing is new.
            (Fetch::Fresh, Value::Array(streams)) => {
                for stream in streams {
                    if let Value::Array(kv) = stream
                        && let Some(list) = kv.get(1)
                    {
                        out.extend(entries_of(list, keys));
                    }
                }
            }
            (Fetch::Fresh, Value::Map(streams)) => {
                for (_, list) in streams {
                    out.extend(entries_of(list, keys));
                }
            }
            _ => {}
        }
        Ok((out, next))
    }

    /// Up to about `want` entries over all `streams`: an equal share of
    /// each first, then what is left from the streams that filled theirs.
    /// May return a few more than `want` (the first round's shares round
    /// up, so every stream is asked at once); the caller hands them back.
    async fn gather(
        &self,
        streams: &[Arc<ShardKeys>],
        group: &str,
        consumer: &str,
        want: usize,
        how: Fetch,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        if want == 0 || streams.is_empty() {
            return Ok(Vec::new());
        }
        let first = want.div_ceil(streams.len());
        let mut out = Vec::new();
        let mut asks: Vec<(Arc<ShardKeys>, usize, String)> = streams
            .iter()
            .map(|k| (k.clone(), first, "0-0".to_string()))
            .collect();
        for _ in 0..CLAIM_ROUNDS {
            let got = futures::future::try_join_all(
                asks.iter()
                    .map(|(keys, n, cursor)| self.fetch(keys, group, consumer, *n, how, cursor)),
            )
            .await?;
            // Events are large: grown step by step, the batch was copied
            // over and over (a few percent of the relay's CPU at full load).
            out.reserve(got.iter().map(|(events, _)| events.len()).sum());
            // Streams that filled their share may have more (a reclaim
            // scan that came round to 0-0 has not).
            let mut full = Vec::new();
            for ((keys, n, _), (events, cursor)) in asks.iter().zip(got) {
                let more = match how {
                    Fetch::Reclaim(_) => cursor != "0-0",
                    Fetch::Fresh => true,
                };
                if events.len() >= *n && more {
                    full.push((keys.clone(), cursor));
                }
                out.extend(events);
            }
            let left = want.saturating_sub(out.len());
            if left == 0 || full.is_empty() {
                break;
            }
            let open = vec![u64::MAX; full.len()];
            let quotas = plan_quotas(&open, left, self.layout.next_start(full.len()));
            asks = full
                .into_iter()
                .zip(quotas)
                .filter(|(_, q)| *q > 0)
                .map(|((keys, cursor), q)| (keys, q, cursor))
                .collect();
        }
        Ok(out)
    }

    /// Makes claimed entries at once reclaimable by anyone.
    async fn give_back(&self, group: &str, consumer: &str, events: &[StoredEvent]) {
        let mut by_stream: BTreeMap<Shard, Vec<String>> = BTreeMap::new();
        for e in events {
            if let Some((shard, id)) = split_seq(&e.seq) {
                by_stream.entry(shard).or_default().push(id.to_string());
            }
        }
        for (shard, ids) in by_stream {
            let keys = self.layout.keys(shard);
            let result: Result<Value, QueueError> = async {
                let mut conn = self.connection(&self.conn).await?;
                self.bounded(
                    redis::cmd("XCLAIM")
                        .arg(&keys.events)
                        .arg(group)
                        .arg(consumer)
                        .arg(0)
                        .arg(&ids)
                        .arg("IDLE")
                        .arg(GIVE_BACK_IDLE_MS)
                        .arg("JUSTID")
                        .query_async(&mut conn),
                )
                .await
            }
            .await;
            if let Err(error) = result {
                // Still claimed by us: reclaimed after `reclaim_after`.
                tracing::warn!(%error, "cannot hand back events read past a claim's max");
            }
        }
    }

    /// What `group` still owes on stream `key`.
    async fn stream_backlog(&self, key: &str, group: &str) -> Result<Backlog, QueueError> {
        let Some(state) = self.group_state(key, group).await? else {
            return Ok(Backlog::default());
        };
        let first_unread = self.first_after(key, &state.last_delivered).await?;
        let unread = match state.unread {
            Some(n) => n,
            // Redis cannot tell the lag after some trims: count.
            None => {
                let mut conn = self.connection(&self.conn).await?;
                let after = format!("({}", state.last_delivered);
                let ids: Vec<Value> = self
                    .bounded(
                        redis::cmd("XRANGE")
                            .arg(key)
                            .arg(after)
                            .arg("+")
                            .query_async(&mut conn),
                    )
                    .await?;
                ids.len() as u64
            }
        };
        let oldest = [
            state.oldest_pending.as_deref().map(id_millis),
            first_unread.map(|e| e.stored_at),
        ]
        .into_iter()
        .flatten()
        .min();
        Ok(Backlog {
            pending: state.pending + unread,
            oldest_at: oldest,
        })
    }

    /// `EventLog::trim` on stream `key`; returns how many went.
    async fn stream_trim(
        &self,
        key: &str,
        before: Millis,
        groups: &[String],
    ) -> Result<u64, QueueError> {
        // The oldest id some group still owes: its oldest pending entry or
        // the first entry after what it has read. A group that does not
        // exist yet owes nothing (it will start at the oldest retained).
        let mut keep_from: Option<(u64, u64)> = None;
        for group in groups {
            let Some(state) = self.group_state(key, group).await? else {
                continue;
            };
            let owed = [
                state.oldest_pending,
                self.first_after(key, &state.last_delivered)
                    .await?
                    .map(|e| e.seq),
            ];
            for id in owed.into_iter().flatten() {
                let k = id_key(&id);
                keep_from = Some(keep_from.map_or(k, |m| m.min(k)));
            }
        }
        let mut min_id = (before, 0);
        if let Some(keep) = keep_from {
            min_id = min_id.min(keep);
        }
        let mut conn = self.connection(&self.conn).await?;
        let trimmed: u64 = self
            .bounded(
                redis::cmd("XTRIM")
                    .arg(key)
                    .arg("MINID")
                    .arg(format!("{}-{}", min_id.0, min_id.1))
                    .query_async(&mut conn),
            )
            .await?;
        // Claims on trimmed entries stay in the groups' pending lists
        // (Redis keeps them); acknowledge them so backlogs count only
        // what can still be sent.
        let boundary = format!("({}-{}", min_id.0, min_id.1);
        let groups = match min_id {
            // Nothing can be older than 0-0 (and Redis refuses "(0-0").
            (0, 0) => Vec::new(),
            _ => self.group_names(key).await?,
        };
        for group in groups {
            for _ in 0..100 {
                let dangling: Value = self
                    .bounded(
                        redis::cmd("XPENDING")
                            .arg(key)
                            .arg(&group)
                            .arg("-")
                            .arg(&boundary)
                            .arg(1000)
                            .query_async(&mut conn),
                    )
                    .await?;
                let ids: Vec<String> = match &dangling {
                    Value::Array(rows) => rows
                        .iter()
                        .filter_map(|row| match row {
                            Value::Array(fields) => fields.first().and_then(text),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                if ids.is_empty() {
                    break;
                }
                let _: i64 = self
                    .bounded(
                        redis::cmd("XACK")
                            .arg(key)
                            .arg(&group)
                            .arg(&ids)
                            .query_async(&mut conn),
                    )
                    .await?;
            }
        }
        Ok(trimmed)
    }
}

/// Positions by the stream they are in (unknown ones dropped: no stream
/// of ours holds them).
fn by_stream(seqs: &[EventSeq]) -> BTreeMap<Shard, Vec<String>> {
    let mut out: BTreeMap<Shard, Vec<String>> = BTreeMap::new();
    for seq in seqs {
        if let Some((shard, id)) = split_seq(seq) {
            out.entry(shard).or_default().push(id.to_string());
        }
    }
    out
}

/// `EventLog::renew`: resets the idle time (`XCLAIM ... 0 JUSTID`) of the
/// entries `ARGV[2]` still holds in group `ARGV[1]`, checking each owner
/// first (`XPENDING` of that one id), so a claim another consumer took over
/// is not taken back. Returns how many were renewed.
static RENEW: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
",
    )
});

#[async_trait]
impl EventLog for RedisBackend {
    async fn publish(&self, events: &[Event]) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut inv = scripts::PUBLISH.prepare_invoke();
        inv.key(&self.layout.keys(Shard::Legacy).events);
        super::event_args(&mut inv, events)?;
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn publish_suppressing(
        &self,
        events: &[Event],
        suppress: &[SuppressionEntry],
    ) -> Result<(), QueueError> {
        // The shared stream sits under `{prefix}` with the list: one slot.
        let mut inv = scripts::PUBLISH_SUPPRESSING.prepare_invoke();
        inv.key(&self.layout.keys(Shard::Legacy).events)
            .key(&self.layout.shared.supp);
        super::event_args(&mut inv, events)?;
        super::suppression_args(&mut inv, suppress)?;
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn ensure_group(&self, group: &str) -> Result<(), QueueError> {
        let streams = self.stream_shards().await?;
        futures::future::try_join_all(
            streams
                .iter()
                .map(|k| self.ensure_group_on(&k.events, group)),
        )
        .await?;
        Ok(())
    }

    async fn claim(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let streams = self.stream_shards().await?;
        let mut out = self
            .gather(
                &streams,
                group,
                consumer,
                max,
                Fetch::Reclaim(reclaim_after),
            )
            .await?;
        out.sort_by_cached_key(order_of);
        if out.len() < max {
            let mut fresh = self
                .gather(&streams, group, consumer, max - out.len(), Fetch::Fresh)
                .await?;
            fresh.sort_by_cached_key(order_of);
            out.extend(fresh);
        }
        if out.len() > max {
            let extra = out.split_off(max);
            self.give_back(group, consumer, &extra).await;
        }
        Ok(out)
    }

    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError> {
        let streams = by_stream(seqs);
        let acks = streams.iter().map(|(shard, ids)| async move {
            let keys = self.layout.keys(*shard);
            let mut conn = self.connection(&self.conn).await?;
            self.bounded(
                redis::cmd("XACK")
                    .arg(&keys.events)
                    .arg(group)
                    .arg(ids)
                    .query_async::<i64>(&mut conn),
            )
            .await
        });
        futures::future::try_join_all(acks).await?;
        Ok(())
    }

    async fn renew(
        &self,
        group: &str,
        consumer: &str,
        seqs: &[EventSeq],
    ) -> Result<u64, QueueError> {
        let streams = by_stream(seqs);
        let renewals = streams.iter().map(|(shard, ids)| async move {
            let keys = self.layout.keys(*shard);
            let mut inv = RENEW.prepare_invoke();
            inv.key(&keys.events).arg(group).arg(consumer).arg(ids);
            let mut conn = self.connection(&self.conn).await?;
            self.bounded(inv.invoke_async::<u64>(&mut conn)).await
        });
        Ok(futures::future::try_join_all(renewals)
            .await?
            .into_iter()
            .sum())
    }

    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError> {
        let streams = self.stream_shards().await?;
        let each = futures::future::try_join_all(
            streams
                .iter()
                .map(|k| self.stream_backlog(&k.events, group)),
        )
        .await?;
        Ok(Backlog {
            pending: each.iter().map(|b| b.pending).sum(),
            oldest_at: each.iter().filter_map(|b| b.oldest_at).min(),
        })
    }

    async fn read(
        &self,
        after: Option<&EventSeq>,
        max: usize,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let after = match after {
            Some(seq) => Some(
                split_seq(seq)
                    .ok_or_else(|| QueueError::NotFound(format!("event position {seq}")))?,
            ),
            None => None,
        };
        let streams = self.stream_shards().await?;
        let ranges = self
            .each_ok(&streams, |k, mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(&k.events)
                    .arg(range_start(k.shard, after))
                    .arg("+")
                    .arg("COUNT")
                    .arg(max)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        let mut out: Vec<StoredEvent> = streams
            .iter()
            .zip(&ranges)
            .flat_map(|(k, reply)| entries_of(reply, k))
            .collect();
        out.sort_by_cached_key(order_of);
        out.truncate(max);
        Ok(out)
    }

    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError> {
        let streams = self.stream_shards().await?;
        let trimmed = futures::future::try_join_all(
            streams
                .iter()
                .map(|k| self.stream_trim(&k.events, before, groups)),
        )
        .await?;
        Ok(TrimReport {
            trimmed: trimmed.into_iter().sum(),
            dropped_unacked: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically_and_carry_their_time() {
        assert!(id_key("999-5") < id_key("1000-0"));
        assert!(id_key("1000-2") < id_key("1000-10"));
        assert_eq!(id_millis("1700000000123-4"), 1_700_000_000_123);
    }
}
