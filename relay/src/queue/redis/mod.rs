//! Redis backend: one queue shared by every relay pod.
//!
//! Layout. The queue is split into `partitions` (config
//! `queue.redis.partitions`, default 16), each under its own hash tag
//! `{prefix:N}`, so on Redis Cluster messages, bodies and indexes spread
//! over every master. A message lives in one partition, chosen from its id
//! (module `layout`); the DSNs a settlement writes stay in the partition of
//! the unit that produced them, so every script touches one slot only.
//! Per partition (`{p:N}`):
//!
//! | key                  | type | content                                  |
//! |----------------------|------|------------------------------------------|
//! | `{p:N}:data`         | hash | message id -> message bytes              |
//! | `{p:N}:left`         | hash | message id -> units not yet finished     |
//! | `{p:N}:received`     | zset | message id -> received_at (oldest age)   |
//! | `{p:N}:unit`         | hash | unit id -> [`DeliveryUnit`] JSON         |
//! | `{p:N}:due`          | zset | unit id -> next attempt (ms)             |
//! | `{p:N}:leased`       | zset | unit id -> lease expiry (ms)             |
//! | `{p:N}:token`        | hash | unit id -> lease token (`N.<random>`)    |
//! | `{p:N}:held`         | zset | unit id -> next attempt (held destination) |
//! | `{p:N}:events`       | stream | the partition's event outbox: field `e` = event JSON (module `events`) |
//! | `{p:N}:supp-out`     | hash | suppression entries a settlement wrote, until moved to `{p}:supp` |
//!
//! Shared by all partitions, under the plain `{p}` tag (no script mixes
//! them with partition keys):
//!
//! | key                  | type | content                                  |
//! |----------------------|------|------------------------------------------|
//! | `{p}:supp`           | hash | address -> [`SuppressionEntry`] JSON     |
//! | `{p}:holds`          | hash | held domain -> held since (ms); lease passes the held domains to each partition's script |
//! | `{p}:meta`           | hash | `partitions` -> highest partition count ever used |
//! | `{p}:events`         | stream | events of `publish` / `publish_suppressing` (with `{p}:supp`) |
//! | `{p}:ctr:<key>`      | str  | counter, PEXPIRE = its window            |
//! | `{p}:slot:<key>`     | zset | slot token -> expiry (server clock, ms)  |
//! | `{p}:kv:<key>`       | str  | shared value with a TTL                  |
//!
//! The single-tag layout of before (`{p}:data`, `{p}:unit`, `{p}:due`, ...)
//! is the *legacy shard*: never enqueued to, but leased, settled, listed
//! and counted like a partition while it holds units, so a relay upgraded
//! on a full queue delivers it; once empty it is only probed (two `HLEN`s
//! every few seconds, for pods of the old version still running during
//! a rollout). Module `partitions` keeps that view, and the highest
//! partition count ever used (`{p}:meta`), so shrinking `partitions`
//! strands nothing: every partition up to it is still leased from.
//!
//! A unit is in exactly one of `due`, `leased` and `held` of its shard
//! (module `control`: `queue hold`). Every change that spans keys is one
//! Lua script on one shard (module `scripts`), so it is atomic. The one
//! exception is a hard bounce's suppression entry: written atomically with
//! the settlement into the partition's `supp-out`, then moved to the
//! shared list right after (and by a sweep after a crash), so it can be
//! late by a moment but never lost.
//!
//! Leases spread over partitions fairly: a cheap count of what is due in
//! each, then quotas (equal shares, rotating start, unused shares passed
//! on) and one lease script per partition, all in flight at once; each
//! returns the message bytes with the units (`lease_with_data`).
//!
//! The URL scheme picks the topology (one server, `redis+sentinel://`,
//! `redis+cluster://`): see module `conn`.
//!
//! Redis must not evict queue keys: run it with `maxmemory-policy
//! noeviction` (an evicted unit is a lost message) and with AOF, so an
//! acknowledged write survives a restart. Times in `due`/`leased` are the
//! callers' clocks (`now`); slots and counters use Redis's own clock.

mod conn;
mod control;
mod events;
mod layout;
mod lease;
mod partitions;
mod scripts;
mod settle;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use self::conn::{Conn, Connector, Target};
use self::layout::{Shard, ShardKeys, plan_quotas, shard_of_token};
use self::partitions::Layout;
use super::{
    DeliveryUnit, LEASE_DATA_BUDGET, Lease, LeasedUnit, Millis, NewMessage, Queue, QueueError,
    QueueStats, Settlement, SharedState, SuppressionEntry, settled_unit, suppression_key, units_of,
};
use crate::config::RedisQueue;
use crate::config::parse_redis_url;
use crate::events::Event;

/// Expired leases moved back to due per partition and lease call: bounds
/// the work of one script after an outage (the rest follow on later calls).
const RECLAIM_BATCH: usize = 1000;

/// The Redis queue and shared state. Cheap to clone (one multiplexed
/// connection that reconnects by itself).
#[derive(Clone)]
pub struct RedisBackend {
    conn: Connector,
    /// Used for enqueue when `waitReplicas > 0`: `WAIT` blocks its
    /// connection until the replicas answer, and leases and completions
    /// must not queue up behind it.
    write_conn: Connector,
    layout: Arc<Layout>,
    wait_replicas: u32,
    timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.layout.prefix())
            .field("wait_replicas", &self.wait_replicas)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects lazily: a relay starts while Redis is still down and
    /// reports not ready until it answers, instead of crash-looping.
    /// Every operation is bounded by `timeout`.
    pub async fn open(config: &RedisQueue, timeout: Duration) -> Result<Self, QueueError> {
        check_prefix(&config.key_prefix)?;
        if !(1..=crate::config::MAX_PARTITIONS).contains(&config.partitions) {
            return Err(QueueError::Unavailable(format!(
                "queue.redis.partitions must be between 1 and {} (got {})",
                crate::config::MAX_PARTITIONS,
                config.partitions
            )));
        }
        let url = read_url(config.url.as_deref(), config.url_file.as_deref()).await?;
        let target = parse_redis_url(&url)
            .map_err(|e| QueueError::Unavailable(format!("invalid redis url: {e}")))?;
        let connector = || {
            Connector::new(&target, timeout)
                .map_err(|e| QueueError::Unavailable(format!("invalid redis url: {e}")))
        };
        let conn = connector()?;
        let write_conn = match (&target, config.wait_replicas) {
            (Target::Single(_) | Target::Sentinel { .. }, 1..) => connector()?,
            _ => conn.clone(),
        };
        Ok(RedisBackend {
            conn,
            write_conn,
            layout: Arc::new(Layout::new(&config.key_prefix, config.partitions)),
            wait_replicas: config.wait_replicas,
            timeout,
        })
    }

    /// A connection from `connector`, within the configured timeout.
    async fn connection(&self, connector: &Connector) -> Result<Conn, QueueError> {
        self.bounded(connector.get()).await
    }

    /// Runs `fut` under the configured timeout.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, QueueError> {
        self.bounded_until(tokio::time::Instant::now() + self.timeout, fut)
            .await
    }

    /// Runs `fut` until `deadline`, when several calls share one timeout.
    async fn bounded_until<T>(
        &self,
        deadline: tokio::time::Instant,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.conn.invalidate(&error);
                self.write_conn.invalidate(&error);
                Err(unavailable(error))
            }
            Err(_) => {
                self.conn.invalidate_after_timeout();
                self.write_conn.invalidate_after_timeout();
                Err(QueueError::Timeout(self.timeout))
            }
        }
    }

    /// Removes a message whose write was not replicated enough (best
    /// effort: the caller reports the failure either way).
    async fn rollback(
        &self,
        keys: &ShardKeys,
        message_id: &str,
        unit_ids: &[String],
        event_ids: &[String],
    ) {
        if let Err(error) = self
            .try_rollback(keys, message_id, unit_ids, event_ids)
            .await
        {
            tracing::warn!(%message_id, %error, "could not roll back an under-replicated message");
        }
    }

    /// The message's bytes (a plain `HSET`, so they never pass through
    /// Lua) and the `ENQUEUE` script in one `MULTI`: no other client sees
    /// the bytes without the units or the units without the bytes. A
    /// script missing after a Redis restart fails inside the transaction
    /// with NOSCRIPT after the `HSET` ran; it is loaded and the whole
    /// transaction runs again, rewriting the same bytes.
    async fn store_in_one(
        &self,
        conn: &mut Conn,
        deadline: tokio::time::Instant,
        k: &ShardKeys,
        message: &NewMessage,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<redis::Value>, QueueError> {
        for round in 0..2 {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .ignore_errors()
                .hset(&k.data, &message.id, &message.data)
                .ignore()
                .invoke_script(inv);
            let mut replies: Vec<redis::RedisResult<Vec<redis::Value>>> =
                self.bounded_until(deadline, pipe.query_async(conn)).await?;
            match replies.pop() {
                Some(Err(e)) if round == 0 && lease::is_noscript(&e) => {
                    self.bounded_until(deadline, scripts::ENQUEUE.load_async(conn))
                        .await?;
                }
                Some(reply) => return reply.map_err(unavailable),
                None => break,
            }
        }
        Err(QueueError::Unavailable(
            "the enqueue transaction returned no reply".into(),
        ))
    }

    async fn try_rollback(
        &self,
        k: &ShardKeys,
        message_id: &str,
        unit_ids: &[String],
        event_ids: &[String],
    ) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let mut inv = scripts::ROLLBACK.prepare_invoke();
        inv.key(&k.data)
            .key(&k.left)
            .key(&k.received)
            .key(&k.unit)
            .key(&k.due)
            .key(&k.leased)
            .key(&k.events)
            .arg(message_id)
            .arg(unit_ids.len())
            .arg(unit_ids)
            .arg(event_ids);
        let _removed: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }
}

/// The URL from `url`, or the trimmed content of `urlFile` (a mounted
/// Secret, so the password stays out of the ConfigMap).
async fn read_url(url: Option<&str>, url_file: Option<&Path>) -> Result<String, QueueError> {
    match (url, url_file) {
        (Some(url), None) => Ok(url.trim().to_string()),
        (None, Some(path)) => tokio::fs::read_to_string(path)
            .await
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                QueueError::Unavailable(format!("reading redis urlFile {}: {e}", path.display()))
            }),
        _ => Err(QueueError::Unavailable(
            "queue.redis needs exactly one of url and urlFile".into(),
        )),
    }
}

/// The prefix becomes the hash tag `{prefix}`: braces inside it would end
/// the tag early, and an empty tag `{}` is no tag at all (keys would spread
/// over Cluster slots and the scripts would fail).
fn check_prefix(prefix: &str) -> Result<(), QueueError> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(QueueError::Unavailable(format!(
            "queue.redis.keyPrefix {prefix:?} must be non-empty and without braces"
        )));
    }
    Ok(())
}

fn unavailable(e: redis::RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// A script's 0/1 answer to "did the caller still hold the lease?".
fn lease_held(done: i64, unit_id: &str) -> Result<(), QueueError> {
    if done == 1 {
        Ok(())
    } else {
        Err(QueueError::LeaseLost(unit_id.to_string()))
    }
}

fn encode<T: serde::Serialize>(value: &T, key: &str) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(value).map_err(|e| QueueError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], key: &str) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Milliseconds of a duration for Redis arguments, at least 1 (a zero
/// `PEXPIRE` would delete the key at once).
fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// Appends the `store_message` arguments of `message` (see `scripts`) and
/// returns its units.
fn message_args(
    inv: &mut redis::ScriptInvocation<'_>,
    message: &NewMessage,
) -> Result<Vec<DeliveryUnit>, QueueError> {
    inv.arg(&message.id)
        .arg(&message.data)
        .arg(message.received_at);
    unit_args(inv, message)
}

/// Appends the unit count and (unit id, unit json, due at) per unit of
/// `message`, as `ENQUEUE` takes them, and returns its units.
fn unit_args(
    inv: &mut redis::ScriptInvocation<'_>,
    message: &NewMessage,
) -> Result<Vec<DeliveryUnit>, QueueError> {
    let units = units_of(message);
    inv.arg(units.len());
    for unit in &units {
        inv.arg(&unit.id)
            .arg(encode(unit, &unit.id)?)
            .arg(unit.next_attempt_at);
    }
    Ok(units)
}

/// Appends an event count and the events' JSON.
fn event_args(inv: &mut redis::ScriptInvocation<'_>, events: &[Event]) -> Result<(), QueueError> {
    inv.arg(events.len());
    for event in events {
        inv.arg(encode(event, &event.id)?);
    }
    Ok(())
}

/// Suppression entries as script arguments: count, then (key, json)*.
fn suppression_args(
    inv: &mut redis::ScriptInvocation<'_>,
    entries: &[SuppressionEntry],
) -> Result<(), QueueError> {
    inv.arg(entries.len());
    for entry in entries {
        let entry = entry.clone().normalised();
        let key = entry.key();
        inv.arg(&key).arg(encode(&entry, &key)?);
    }
    Ok(())
}

#[async_trait]
impl Queue for RedisBackend {
    async fn enqueue(&self, message: NewMessage, events: Vec<Event>) -> Result<(), QueueError> {
        if units_of(&message).is_empty() {
            // Nothing to deliver: storing it would only leave garbage.
            return Ok(());
        }
        // One deadline for the first meta read, connecting, writing and
        // WAIT: the client is waiting for its reply to DATA.
        let deadline = tokio::time::Instant::now() + self.timeout;
        // The pod's partition count is recorded before its first write.
        tokio::time::timeout_at(deadline, self.view())
            .await
            .map_err(|_| QueueError::Timeout(self.timeout))??;
        let k = self.layout.keys(self.layout.home(&message.id));
        let mut inv = scripts::ENQUEUE.prepare_invoke();
        inv.key(&k.data)
            .key(&k.left)
            .key(&k.received)
            .key(&k.unit)
            .key(&k.due)
            .key(&k.events)
            .arg(&message.id)
            .arg(message.received_at);
        let units = unit_args(&mut inv, &message)?;
        event_args(&mut inv, &events)?;
        let mut conn = self.bounded_until(deadline, self.write_conn.get()).await?;
        let reply = self
            .store_in_one(&mut conn, deadline, &k, &message, &inv)
            .await?;
        let stored = matches!(reply.first(), Some(redis::Value::Int(1)));
        let event_ids: Vec<String> = reply
            .iter()
            .skip(1)
            .filter_map(|v| redis::from_redis_value_ref(v).ok())
            .collect();
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // Leave WAIT a margin to answer before our own deadline, so a
        // missing replica reads as NotReplicated rather than a timeout.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wait_for = left.saturating_sub(left / 5);
        let acked: i64 = self
            .bounded_until(
                deadline,
                redis::cmd("WAIT")
                    .arg(self.wait_replicas)
                    .arg(ms(wait_for))
                    .query_async(&mut conn),
            )
            .await?;
        let acked = u32::try_from(acked).unwrap_or(0);
        if acked < self.wait_replicas {
            // Only our own write is ours to undo; a message stored by an
            // earlier attempt (stored == 0) stays.
            if stored {
                let ids: Vec<String> = units.into_iter().map(|u| u.id).collect();
                // In its own task: the caller's deadline (the SMTP session
                // bounds enqueue by the same timeout) may drop this future
                // right after WAIT answered, and a rollback cut short would
                // leave a message stored that its client was told to resend.
                let this = self.clone();
                let id = message.id.clone();
                let _ = tokio::spawn(async move { this.rollback(&k, &id, &ids, &event_ids).await })
                    .await;
            }
            return Err(QueueError::NotReplicated {
                acked,
                wanted: self.wait_replicas,
            });
        }
        Ok(())
    }

    async fn lease(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        Ok(self
            .lease_from_shards(now, max, lease_for, 0)
            .await?
            .into_iter()
            .map(|l| l.lease)
            .collect())
    }

    async fn lease_with_data(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<LeasedUnit>, QueueError> {
        let mut leased = self
            .lease_from_shards(now, max, lease_for, LEASE_DATA_BUDGET)
            .await?;
        // What the budget left out is read here, one message at a time,
        // so callers always get the bytes when the message exists.
        for i in 0..leased.len() {
            if leased[i].data.is_none()
                && let Ok(data) = self.message_data(&leased[i].lease.unit.message_id).await
            {
                let data = Arc::new(data);
                let id = leased[i].lease.unit.message_id.clone();
                for other in leased[i..].iter_mut() {
                    if other.lease.unit.message_id == id && other.data.is_none() {
                        other.data = Some(data.clone());
                    }
                }
            }
        }
        Ok(leased)
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: Millis,
        lease_for: Duration,
    ) -> Result<Lease, QueueError> {
        let Some(shard) = shard_of_token(&lease.token) else {
            return Err(QueueError::LeaseLost(lease.unit.id.clone()));
        };
        let k = self.layout.keys(shard);
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let mut inv = scripts::RENEW.prepare_invoke();
        inv.key(&k.leased)
            .key(&k.token)
            .arg(&lease.unit.id)
            .arg(&lease.token)
            .arg(now)
            .arg(expires_at);
        let mut conn = self.connection(&self.conn).await?;
        let done: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        lease_held(done, &lease.unit.id)?;
        Ok(Lease {
            expires_at,
            ..lease.clone()
        })
    }

    async fn message_data(&self, message_id: &str) -> Result<Vec<u8>, QueueError> {
        let home = self.layout.keys(self.layout.home(message_id));
        let mut conn = self.connection(&self.conn).await?;
        let data: Option<Vec<u8>> = self.bounded(conn.hget(&home.data, message_id)).await?;
        if let Some(data) = data {
            return Ok(data);
        }
        // Not at home: a DSN (stored with the unit that bounced), a message
        // stored under another partition count, or a legacy one.
        let shards = self.queue_shards().await?;
        let found = self
            .each_ok(&shards, |keys, mut conn| async move {
                conn.hget::<_, _, Option<Vec<u8>>>(&keys.data, message_id)
                    .await
            })
            .await?;
        found
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| QueueError::NotFound(message_id.to_string()))
    }

    async fn settle(&self, lease: &Lease, settlement: Settlement) -> Result<(), QueueError> {
        self.settle_batch(&[(lease, &settlement)])
            .await
            .pop()
            .unwrap_or_else(|| Err(QueueError::LeaseLost(lease.unit.id.clone())))
    }

    async fn settle_many(&self, batch: &[(Lease, Settlement)]) -> Vec<Result<(), QueueError>> {
        let refs: Vec<(&Lease, &Settlement)> = batch.iter().map(|(l, s)| (l, s)).collect();
        self.settle_batch(&refs).await
    }

    async fn stats(&self, now: Millis) -> Result<QueueStats, QueueError> {
        let shards = self.queue_shards().await?;
        type Reply = (u64, u64, u64, u64, u64, Vec<(String, f64)>, u64);
        let replies: Vec<Reply> = self
            .each_ok(&shards, |k, mut conn| async move {
                let mut pipe = redis::pipe();
                // MULTI/EXEC: one consistent snapshot of the shard.
                pipe.atomic()
                    .zcount(&k.due, "-inf", now)
                    .zcount(&k.due, format!("({now}"), "+inf")
                    .zcount(&k.leased, "-inf", now)
                    .zcount(&k.leased, format!("({now}"), "+inf")
                    .hlen(&k.left)
                    .zrange_withscores(&k.received, 0, 0)
                    .zcard(&k.held);
                pipe.query_async(&mut conn).await
            })
            .await?;
        let mut stats = QueueStats::default();
        for (due, deferred, expired, leased, messages, oldest, held) in replies {
            // An expired lease is due again, even before a lease call moves it.
            stats.due += due + expired;
            stats.deferred += deferred;
            stats.leased += leased;
            stats.messages += messages;
            stats.held += held;
            if let Some((_, score)) = oldest.first() {
                let at = *score as Millis;
                stats.oldest_received_at = Some(stats.oldest_received_at.map_or(at, |o| o.min(at)));
            }
        }
        Ok(stats)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl SharedState for RedisBackend {
    async fn suppress(&self, entry: SuppressionEntry) -> Result<(), QueueError> {
        let entry = entry.normalised();
        let key = entry.key();
        let json = encode(&entry, &key)?;
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(conn.hset(&self.layout.shared.supp, &key, json))
            .await?;
        Ok(())
    }

    async fn suppressed(
        &self,
        address: &str,
        sending_domain: &str,
        now: Millis,
    ) -> Result<Option<SuppressionEntry>, QueueError> {
        let keys = [
            suppression_key(address, None),
            suppression_key(address, Some(sending_domain)),
        ];
        let mut conn = self.connection(&self.conn).await?;
        let found: Vec<Option<Vec<u8>>> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(&self.layout.shared.supp)
                    .arg(&keys[..])
                    .query_async(&mut conn),
            )
            .await?;
        for (json, key) in found.iter().zip(&keys) {
            if let Some(json) = json {
                let entry: SuppressionEntry = decode(json, key)?;
                if entry.applies(sending_domain, now) {
                    return Ok(Some(entry));
                }
            }
        }
        Ok(None)
    }

    async fn unsuppress(&self, address: &str, scope: Option<&str>) -> Result<bool, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let removed: i64 = self
            .bounded(conn.hdel(&self.layout.shared.supp, suppression_key(address, scope)))
            .await?;
        Ok(removed > 0)
    }

    async fn list_suppressed(&self, now: Millis) -> Result<Vec<SuppressionEntry>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let all: HashMap<String, Vec<u8>> =
            self.bounded(conn.hgetall(&self.layout.shared.supp)).await?;
        let mut entries = Vec::with_capacity(all.len());
        for (key, json) in all {
            let entry: SuppressionEntry = decode(&json, &key)?;
            if in_force(&entry, now) {
                entries.push(entry);
            }
        }
        entries.sort_by(|a, b| (&a.address, &a.scope).cmp(&(&b.address, &b.scope)));
        Ok(entries)
    }

    async fn incr_counter(&self, key: &str, by: u64, window: Duration) -> Result<u64, QueueError> {
        let mut inv = scripts::INCR.prepare_invoke();
        inv.key(self.layout.shared.counter(key))
            .arg(by)
            .arg(ms(window));
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    async fn counter(&self, key: &str) -> Result<u64, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let value: Option<u64> = self
            .bounded(conn.get(self.layout.shared.counter(key)))
            .await?;
        Ok(value.unwrap_or(0))
    }

    async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, QueueError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.layout.shared.counter(key));
        }
        let mut conn = self.connection(&self.conn).await?;
        let values: Vec<Option<u64>> = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(values.into_iter().map(|v| v.unwrap_or(0)).collect())
    }

    async fn acquire_slot(
        &self,
        key: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<Option<String>, QueueError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut inv = scripts::ACQUIRE.prepare_invoke();
        inv.key(self.layout.shared.slot(key))
            .arg(limit)
            .arg(ms(ttl))
            .arg(&token);
        let mut conn = self.connection(&self.conn).await?;
        let taken: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok((taken == 1).then_some(token))
    }

    async fn renew_slot(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        let mut inv = scripts::RENEW_SLOT.prepare_invoke();
        inv.key(self.layout.shared.slot(key))
            .arg(token)
            .arg(ms(ttl));
        let mut conn = self.connection(&self.conn).await?;
        let renewed: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(renewed == 1)
    }

    async fn release_slot(&self, key: &str, token: &str) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self
            .bounded(conn.zrem(self.layout.shared.slot(key), token))
            .await?;
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<String>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(conn.get(self.layout.shared.value(key))).await
    }

    async fn set_value(&self, key: &str, value: &str, ttl: Duration) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let () = self
            .bounded(conn.pset_ex(self.layout.shared.value(key), value, ms(ttl).max(1)))
            .await?;
        Ok(())
    }
}

/// Whether a suppression entry applies at `now`.
pub(crate) fn in_force(entry: &SuppressionEntry, now: Millis) -> bool {
    entry.expires_at.is_none_or(|at| at > now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SuppressionReason;

    #[test]
    fn prefixes_that_would_break_the_hash_tag_are_refused() {
        assert!(check_prefix("petrel").is_ok());
        assert!(check_prefix("petrel:prod").is_ok());
        for bad in ["", "a{b", "a}b", "{x}"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn suppression_expiry_is_exclusive() {
        let entry = SuppressionEntry {
            address: "a@x.org".into(),
            reason: SuppressionReason::Manual,
            scope: None,
            remote_reply: None,
            created_at: 0,
            expires_at: Some(10),
        };
        assert!(in_force(&entry, 9));
        assert!(!in_force(&entry, 10));
    }
}
