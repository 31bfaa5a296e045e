//! The event outbox of the embedded backend: redb tables written inside
//! the queue's own write transactions (see `embedded`).
//!
//! Events are numbered by a counter that never goes back (kept in
//! `EVENT_META`, so trimming every event does not reuse numbers). A
//! consumer group is a cursor (the last number it has read) plus its
//! pending entries (claimed, not acked) with who claimed them and when.

use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::embedded::{
    EmbeddedBackend, decode, encode, encode_suppression, relaxed, store_suppression,
};
use super::{Millis, QueueError, SuppressionEntry, now_millis};
use crate::events::{Backlog, Event, EventLog, EventSeq, StoredEvent, TrimReport};

/// Sequence number -> (stored at, event JSON).
const EVENTS: TableDefinition<u64, (u64, &[u8])> = TableDefinition::new("events");
/// `next` -> the next sequence number.
const EVENT_META: TableDefinition<&str, u64> = TableDefinition::new("event_meta");
/// Group -> the last sequence number it has read.
const EVENT_GROUPS: TableDefinition<&str, u64> = TableDefinition::new("event_groups");
/// (group, sequence number) -> (claimed at, consumer) of unacked events.
const EVENT_PENDING: TableDefinition<(&str, u64), (u64, &str)> =
    TableDefinition::new("event_pending");

/// Creates the tables (at open), so readers never meet a missing one.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), QueueError> {
    txn.open_table(EVENTS)?;
    txn.open_table(EVENT_META)?;
    txn.open_table(EVENT_GROUPS)?;
    txn.open_table(EVENT_PENDING)?;
    Ok(())
}

/// Events as JSON, encoded before entering the blocking task.
pub(super) fn encode_events(events: &[Event]) -> Result<Vec<Vec<u8>>, QueueError> {
    events.iter().map(|e| encode(e, &e.id)).collect()
}

/// Appends encoded events inside `txn`.
pub(super) fn append_events(
    txn: &WriteTransaction,
    events: &[Vec<u8>],
    now: Millis,
) -> Result<(), QueueError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut meta = txn.open_table(EVENT_META)?;
    let mut next = meta.get("next")?.map(|v| v.value()).unwrap_or(1);
    let mut table = txn.open_table(EVENTS)?;
    for json in events {
        table.insert(next, (now, json.as_slice()))?;
        next += 1;
    }
    meta.insert("next", next)?;
    Ok(())
}

/// The embedded form of an [`EventSeq`]: zero-padded, so the strings sort
/// like the numbers.
fn seq_string(n: u64) -> EventSeq {
    format!("{n:020}")
}

fn parse_seq(seq: &str) -> Result<u64, QueueError> {
    seq.parse().map_err(|_| QueueError::Corrupt {
        key: seq.to_string(),
        reason: "not an embedded event sequence number".into(),
    })
}

fn stored(n: u64, at: u64, json: &[u8]) -> Result<StoredEvent, QueueError> {
    Ok(StoredEvent {
        seq: seq_string(n),
        stored_at: at,
        event: decode(json, &seq_string(n))?,
    })
}

/// The oldest sequence number `group` has not acknowledged (its oldest
/// pending one or the first after its cursor), `None` for no such group.
fn oldest_owed(
    groups: &impl ReadableTable<&'static str, u64>,
    pending: &impl ReadableTable<(&'static str, u64), (u64, &'static str)>,
    group: &str,
) -> Result<Option<u64>, QueueError> {
    let Some(cursor) = groups.get(group)?.map(|v| v.value()) else {
        return Ok(None);
    };
    let first_pending = pending
        .range::<(&str, u64)>((group, 0)..=(group, u64::MAX))?
        .next()
        .transpose()?
        .map(|(k, _)| k.value().1);
    Ok(Some(
        first_pending.map_or(cursor + 1, |p| p.min(cursor + 1)),
    ))
}

#[async_trait]
impl EventLog for EmbeddedBackend {
    async fn publish(&self, events: &[Event]) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let events = encode_events(events)?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            append_events(&txn, &events, now_millis())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn publish_suppressing(
        &self,
        events: &[Event],
        suppress: &[SuppressionEntry],
    ) -> Result<(), QueueError> {
        let events = encode_events(events)?;
        let suppress = encode_suppression(suppress)?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            append_events(&txn, &events, now_millis())?;
            store_suppression(&txn, &suppress)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn ensure_group(&self, group: &str) -> Result<(), QueueError> {
        let group = group.to_string();
        self.run(move |db| {
            let txn = db.begin_write()?;
            {
                let mut groups = txn.open_table(EVENT_GROUPS)?;
                if groups.get(group.as_str())?.is_some() {
                    return Ok(());
                }
                // Cursor 0: the group starts at the oldest retained event.
                groups.insert(group.as_str(), 0)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
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
        let group = group.to_string();
        let consumer = consumer.to_string();
        self.run(move |db| {
            let now = now_millis();
            let idle_since = now.saturating_sub(reclaim_after.as_millis() as u64);
            let mut txn = db.begin_write()?;
            // Claims are redone after a crash (reclaim_after), as with a
            // dead pod's: no fsync needed for them.
            relaxed(&mut txn)?;
            let mut out = Vec::new();
            {
                let events = txn.open_table(EVENTS)?;
                let mut groups = txn.open_table(EVENT_GROUPS)?;
                let mut pending = txn.open_table(EVENT_PENDING)?;
                let Some(cursor) = groups.get(group.as_str())?.map(|v| v.value()) else {
                    return Err(QueueError::NotFound(format!("event group {group}")));
                };
                let g = group.as_str();
                let mut stale = Vec::new();
                for entry in pending.range::<(&str, u64)>((g, 0)..=(g, u64::MAX))? {
                    let (k, v) = entry?;
                    let (at, _) = v.value();
                    if at <= idle_since {
                        stale.push(k.value().1);
                    }
                }
                for n in stale {
                    if out.len() >= max {
                        break;
                    }
                    match events.get(n)? {
                        Some(v) => {
                            let (at, json) = v.value();
                            out.push(stored(n, at, json)?);
                            pending.insert((g, n), (now, consumer.as_str()))?;
                        }
                        // Trimmed meanwhile: nothing left to send.
                        None => {
                            pending.remove((g, n))?;
                        }
                    }
                }
                let mut last = cursor;
                if out.len() < max {
                    for entry in events.range(cursor + 1..)?.take(max - out.len()) {
                        let (k, v) = entry?;
                        let n = k.value();
                        let (at, json) = v.value();
                        out.push(stored(n, at, json)?);
                        pending.insert((g, n), (now, consumer.as_str()))?;
                        last = n;
                    }
                }
                if last != cursor {
                    groups.insert(g, last)?;
                }
            }
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let group = group.to_string();
        let seqs = seqs
            .iter()
            .map(|s| parse_seq(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            {
                let mut pending = txn.open_table(EVENT_PENDING)?;
                for n in seqs {
                    pending.remove((group.as_str(), n))?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
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
        let group = group.to_string();
        let consumer = consumer.to_string();
        let seqs = seqs
            .iter()
            .map(|s| parse_seq(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.run(move |db| {
            let now = now_millis();
            let mut txn = db.begin_write()?;
            // Like claims: a lost renewal only lets a claim lapse sooner.
            relaxed(&mut txn)?;
            let mut renewed = 0;
            {
                let mut pending = txn.open_table(EVENT_PENDING)?;
                for n in seqs {
                    let ours = pending
                        .get((group.as_str(), n))?
                        .is_some_and(|v| v.value().1 == consumer);
                    if ours {
                        pending.insert((group.as_str(), n), (now, consumer.as_str()))?;
                        renewed += 1;
                    }
                }
            }
            txn.commit()?;
            Ok(renewed)
        })
        .await
    }

    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError> {
        let group = group.to_string();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let groups = txn.open_table(EVENT_GROUPS)?;
            let pending = txn.open_table(EVENT_PENDING)?;
            let Some(cursor) = groups.get(group.as_str())?.map(|v| v.value()) else {
                return Ok(Backlog::default());
            };
            let g = group.as_str();
            let mut count = 0u64;
            let mut oldest: Option<Millis> = None;
            for entry in pending.range::<(&str, u64)>((g, 0)..=(g, u64::MAX))? {
                let (k, _) = entry?;
                if let Some(v) = events.get(k.value().1)? {
                    count += 1;
                    let at = v.value().0;
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
            }
            let mut unread = events.range(cursor + 1..)?;
            if let Some(first) = unread.next() {
                let (_, v) = first?;
                let at = v.value().0;
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
                count += 1 + unread.count() as u64;
            }
            Ok(Backlog {
                pending: count,
                oldest_at: oldest,
            })
        })
        .await
    }

    async fn read(
        &self,
        after: Option<&EventSeq>,
        max: usize,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        let from = match after {
            Some(seq) => parse_seq(seq)?.saturating_add(1),
            None => 0,
        };
        self.run(move |db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let mut out = Vec::new();
            for entry in events.range(from..)?.take(max) {
                let (k, v) = entry?;
                let (at, json) = v.value();
                out.push(stored(k.value(), at, json)?);
            }
            Ok(out)
        })
        .await
    }

    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError> {
        let names = groups.to_vec();
        self.run(move |db| {
            let txn = db.begin_write()?;
            let trimmed = {
                let mut events = txn.open_table(EVENTS)?;
                let group_table = txn.open_table(EVENT_GROUPS)?;
                let pending = txn.open_table(EVENT_PENDING)?;
                let mut keep_from = u64::MAX;
                for g in &names {
                    if let Some(n) = oldest_owed(&group_table, &pending, g)? {
                        keep_from = keep_from.min(n);
                    }
                }
                let mut doomed = Vec::new();
                for entry in events.range(..keep_from)? {
                    let (k, v) = entry?;
                    // Log order is store order: stop at the first young one.
                    if v.value().0 >= before {
                        break;
                    }
                    doomed.push(k.value());
                }
                for n in &doomed {
                    events.remove(*n)?;
                }
                doomed.len() as u64
            };
            txn.commit()?;
            Ok(TrimReport {
                trimmed,
                dropped_unacked: 0,
            })
        })
        .await
    }
}
