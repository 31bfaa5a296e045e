//! The event outbox on Redis: the stream `{prefix}:events`, written by the
//! queue scripts (`ENQUEUE`, `SETTLE`, `PUBLISH`) and read here.
//!
//! Each reader (a webhook) is a consumer group. `claim` first takes over
//! entries another consumer has held longer than `reclaim_after`
//! (`XAUTOCLAIM`), then reads new ones (`XREADGROUP >`); `ack` is `XACK`.
//! Trimming (`XTRIM MINID`) never passes the oldest entry any given group
//! has not acknowledged, so nothing a webhook still owes is dropped.
//!
//! A stream id is `<ms>-<n>` of the Redis server's clock, so it doubles
//! as the time the event was stored.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

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

/// Orders stream ids numerically (`<ms>-<n>`).
fn id_key(id: &str) -> (u64, u64) {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
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

impl RedisBackend {
    /// The state of `group`, `None` when it does not exist.
    async fn group_state(&self, group: &str) -> Result<Option<GroupState>, QueueError> {
        let key = &self.keys.events;
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
            Value::Map(_) => None,
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

    /// Every consumer group of the stream (none without a stream).
    async fn group_names(&self) -> Result<Vec<String>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let groups: Value = match self
            .bounded(
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&self.keys.events)
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

    /// The first entry after `id`, if any.
    async fn first_after(&self, id: &str) -> Result<Option<StoredEvent>, QueueError> {
        Ok(EventLog::read(self, Some(&id.to_string()), 1)
            .await?
            .into_iter()
            .next())
    }
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
        inv.key(&self.keys.events);
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
        let mut inv = scripts::PUBLISH_SUPPRESSING.prepare_invoke();
        inv.key(&self.keys.events).key(&self.keys.supp);
        super::event_args(&mut inv, events)?;
        super::suppression_args(&mut inv, suppress)?;
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn ensure_group(&self, group: &str) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let created: Result<String, QueueError> = self
            .bounded(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.keys.events)
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
        let key = &self.keys.events;
        let mut conn = self.connection(&self.conn).await?;
        // Reply: [next cursor, entries, deleted ids]. Scanning from 0-0
        // each time keeps no cursor state; the pending list is bounded by
        // what readers hold, which is small.
        let reclaimed: Value = self
            .bounded(
                redis::cmd("XAUTOCLAIM")
                    .arg(key)
                    .arg(group)
                    .arg(consumer)
                    // 0 takes over every pending entry (not `ms`, whose
                    // floor of 1 would spare those claimed this millisecond).
                    .arg(reclaim_after.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(max)
                    .query_async(&mut conn),
            )
            .await?;
        let mut out = match &reclaimed {
            Value::Array(parts) => parts.get(1).map(|v| entries(v, key)).unwrap_or_default(),
            _ => Vec::new(),
        };
        if out.len() < max {
            let fresh: Value = self
                .bounded(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(group)
                        .arg(consumer)
                        .arg("COUNT")
                        .arg(max - out.len())
                        .arg("STREAMS")
                        .arg(key)
                        .arg(">")
                        .query_async(&mut conn),
                )
                .await?;
            // [[stream key, entries]] or nil when nothing is new.
            if let Value::Array(streams) = &fresh {
                for stream in streams {
                    if let Value::Array(kv) = stream
                        && let Some(list) = kv.get(1)
                    {
                        out.extend(entries(list, key));
                    }
                }
            }
            if let Value::Map(streams) = &fresh {
                for (_, list) in streams {
                    out.extend(entries(list, key));
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(
                redis::cmd("XACK")
                    .arg(&self.keys.events)
                    .arg(group)
                    .arg(seqs)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn renew(
        &self,
        group: &str,
        consumer: &str,
        seqs: &[EventSeq],
    ) -> Result<u64, QueueError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let mut inv = RENEW.prepare_invoke();
        inv.key(&self.keys.events).arg(group).arg(consumer);
        for seq in seqs {
            inv.arg(seq);
        }
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError> {
        let Some(state) = self.group_state(group).await? else {
            return Ok(Backlog::default());
        };
        let first_unread = self.first_after(&state.last_delivered).await?;
        let unread = match state.unread {
            Some(n) => n,
            // Redis cannot tell the lag after some trims: count.
            None => {
                let mut conn = self.connection(&self.conn).await?;
                let after = format!("({}", state.last_delivered);
                let ids: Vec<Value> = self
                    .bounded(
                        redis::cmd("XRANGE")
                            .arg(&self.keys.events)
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

    async fn read(
        &self,
        after: Option<&EventSeq>,
        max: usize,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_string(),
        };
        let mut conn = self.connection(&self.conn).await?;
        let reply: Value = self
            .bounded(
                redis::cmd("XRANGE")
                    .arg(&self.keys.events)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(max)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(entries(&reply, &self.keys.events))
    }

    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError> {
        // The oldest id some group still owes: its oldest pending entry or
        // the first entry after what it has read. A group that does not
        // exist yet owes nothing (it will start at the oldest retained).
        let mut keep_from: Option<(u64, u64)> = None;
        for group in groups {
            let Some(state) = self.group_state(group).await? else {
                continue;
            };
            let owed = [
                state.oldest_pending,
                self.first_after(&state.last_delivered)
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
                    .arg(&self.keys.events)
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
            _ => self.group_names().await?,
        };
        for group in groups {
            for _ in 0..100 {
                let dangling: Value = self
                    .bounded(
                        redis::cmd("XPENDING")
                            .arg(&self.keys.events)
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
                            .arg(&self.keys.events)
                            .arg(&group)
                            .arg(&ids)
                            .query_async(&mut conn),
                    )
                    .await?;
            }
        }
        Ok(TrimReport {
            trimmed,
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
