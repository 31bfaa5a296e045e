//! Redis backend: one queue shared by every relay pod.
//!
//! Layout (all keys under one `{prefix}` hash tag, see `Keys`):
//!
//! | key                  | type | content                                  |
//! |----------------------|------|------------------------------------------|
//! | `{p}:data`           | hash | message id -> message bytes              |
//! | `{p}:left`           | hash | message id -> units not yet finished     |
//! | `{p}:received`       | zset | message id -> received_at (oldest age)   |
//! | `{p}:unit`           | hash | unit id -> [`DeliveryUnit`] JSON         |
//! | `{p}:due`            | zset | unit id -> next attempt (ms)             |
//! | `{p}:leased`         | zset | unit id -> lease expiry (ms)             |
//! | `{p}:token`          | hash | unit id -> lease token                   |
//! | `{p}:held`           | zset | unit id -> next attempt (held destination) |
//! | `{p}:holds`          | hash | held domain -> held since (ms)           |
//! | `{p}:supp`           | hash | address -> [`SuppressionEntry`] JSON     |
//! | `{p}:ctr:<key>`      | str  | counter, PEXPIRE = its window            |
//! | `{p}:slot:<key>`     | zset | slot token -> expiry (server clock, ms)  |
//! | `{p}:events`         | stream | the event outbox: field `e` = event JSON, one consumer group per reader (module `events`) |
//!
//! A unit is in exactly one of `due`, `leased` and `held` (module
//! `control`: `queue hold`). Every change that spans
//! keys is one Lua script (module `scripts`), so it is atomic.
//!
//! The single hash tag is a deliberate trade-off: on Redis Cluster the
//! whole queue lives in one slot, hence on one primary. Scripts can then
//! touch any queue key atomically, which is what the contract needs;
//! scaling out is by running several relays against separate prefixes, not
//! by spreading one queue. Sentinel and single servers are unaffected.
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
mod scripts;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use self::conn::{Conn, Connector, Target};
use super::{
    DeliveryUnit, Lease, Millis, NewMessage, Queue, QueueError, QueueStats, Settlement,
    SharedState, SuppressionEntry, settled_unit, suppression_key, units_of,
};
use crate::config::RedisQueue;
use crate::config::parse_redis_url;
use crate::events::Event;

/// Expired leases moved back to due per [`Queue::lease`] call: bounds the
/// work of one script after an outage (the rest follow on later calls).
const RECLAIM_BATCH: usize = 1000;

/// The fixed key names of one queue.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
    data: String,
    left: String,
    received: String,
    unit: String,
    due: String,
    leased: String,
    token: String,
    supp: String,
    events: String,
    held: String,
    holds: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}");
        let k = |name: &str| format!("{tag}:{name}");
        Keys {
            data: k("data"),
            left: k("left"),
            received: k("received"),
            unit: k("unit"),
            due: k("due"),
            leased: k("leased"),
            token: k("token"),
            supp: k("supp"),
            events: k("events"),
            held: k("held"),
            holds: k("holds"),
            prefix: tag,
        }
    }

    fn counter(&self, key: &str) -> String {
        format!("{}:ctr:{key}", self.prefix)
    }

    fn slot(&self, key: &str) -> String {
        format!("{}:slot:{key}", self.prefix)
    }

    fn value(&self, key: &str) -> String {
        format!("{}:kv:{key}", self.prefix)
    }
}

/// The Redis queue and shared state. Cheap to clone (one multiplexed
/// connection that reconnects by itself).
#[derive(Clone)]
pub struct RedisBackend {
    conn: Connector,
    /// Used for enqueue when `waitReplicas > 0`: `WAIT` blocks its
    /// connection until the replicas answer, and leases and completions
    /// must not queue up behind it.
    write_conn: Connector,
    keys: Arc<Keys>,
    wait_replicas: u32,
    timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.keys.prefix)
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
            keys: Arc::new(Keys::new(&config.key_prefix)),
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
    async fn rollback(&self, message_id: &str, unit_ids: &[String], event_ids: &[String]) {
        if let Err(error) = self.try_rollback(message_id, unit_ids, event_ids).await {
            tracing::warn!(%message_id, %error, "could not roll back an under-replicated message");
        }
    }

    async fn try_rollback(
        &self,
        message_id: &str,
        unit_ids: &[String],
        event_ids: &[String],
    ) -> Result<(), QueueError> {
        let k = &self.keys;
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
    let units = units_of(message);
    inv.arg(&message.id)
        .arg(&message.data)
        .arg(message.received_at)
        .arg(units.len());
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
        let k = &self.keys;
        let mut inv = scripts::ENQUEUE.prepare_invoke();
        inv.key(&k.data)
            .key(&k.left)
            .key(&k.received)
            .key(&k.unit)
            .key(&k.due)
            .key(&k.events);
        let units = message_args(&mut inv, &message)?;
        event_args(&mut inv, &events)?;
        // One deadline for connecting, writing and WAIT: the client is
        // waiting for its reply to DATA.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut conn = self.bounded_until(deadline, self.write_conn.get()).await?;
        let reply: Vec<redis::Value> = self
            .bounded_until(deadline, inv.invoke_async(&mut conn))
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
                let _ =
                    tokio::spawn(async move { this.rollback(&id, &ids, &event_ids).await }).await;
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
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = &self.keys;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let mut inv = scripts::LEASE.prepare_invoke();
        inv.key(&k.due)
            .key(&k.leased)
            .key(&k.unit)
            .key(&k.token)
            .key(&k.holds)
            .key(&k.held)
            .arg(now)
            .arg(max)
            .arg(expires_at)
            .arg(&token)
            .arg(RECLAIM_BATCH);
        let mut conn = self.connection(&self.conn).await?;
        let records: Vec<Vec<u8>> = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(records
            .iter()
            .filter_map(|bytes| match decode::<DeliveryUnit>(bytes, &k.unit) {
                Ok(unit) => Some(Lease {
                    unit,
                    token: token.clone(),
                    expires_at,
                }),
                Err(error) => {
                    // Skipped, not fatal: one bad record must not stall the
                    // units leased with it. It stays leased until expiry.
                    tracing::error!(%error, "undecodable unit record skipped");
                    None
                }
            })
            .collect())
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: Millis,
        lease_for: Duration,
    ) -> Result<Lease, QueueError> {
        let k = &self.keys;
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
        let mut conn = self.connection(&self.conn).await?;
        let data: Option<Vec<u8>> = self.bounded(conn.hget(&self.keys.data, message_id)).await?;
        data.ok_or_else(|| QueueError::NotFound(message_id.to_string()))
    }

    async fn settle(&self, lease: &Lease, settlement: Settlement) -> Result<(), QueueError> {
        let k = &self.keys;
        let mut inv = scripts::SETTLE.prepare_invoke();
        inv.key(&k.data)
            .key(&k.left)
            .key(&k.received)
            .key(&k.unit)
            .key(&k.due)
            .key(&k.leased)
            .key(&k.token)
            .key(&k.events)
            .key(&k.supp)
            .arg(&lease.unit.id)
            .arg(&lease.token)
            .arg(&lease.unit.message_id);
        match settled_unit(&lease.unit, settlement.op, super::now_millis()) {
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
        suppression_args(&mut inv, &settlement.suppress)?;
        let mut conn = self.connection(&self.conn).await?;
        let done: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        lease_held(done, &lease.unit.id)
    }

    async fn stats(&self, now: Millis) -> Result<QueueStats, QueueError> {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        // MULTI/EXEC: one consistent snapshot (all keys share one slot).
        pipe.atomic()
            .zcount(&k.due, "-inf", now)
            .zcount(&k.due, format!("({now}"), "+inf")
            .zcount(&k.leased, "-inf", now)
            .zcount(&k.leased, format!("({now}"), "+inf")
            .hlen(&k.left)
            .zrange_withscores(&k.received, 0, 0)
            .zcard(&k.held);
        let mut conn = self.connection(&self.conn).await?;
        type Reply = (u64, u64, u64, u64, u64, Vec<(String, f64)>, u64);
        let (due, deferred, expired, leased, messages, oldest, held): Reply =
            self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(QueueStats {
            // An expired lease is due again, even before a lease call moves it.
            due: due + expired,
            deferred,
            leased,
            messages,
            oldest_received_at: oldest.first().map(|(_, score)| *score as Millis),
            held,
        })
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
        let _: i64 = self.bounded(conn.hset(&self.keys.supp, &key, json)).await?;
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
                    .arg(&self.keys.supp)
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
            .bounded(conn.hdel(&self.keys.supp, suppression_key(address, scope)))
            .await?;
        Ok(removed > 0)
    }

    async fn list_suppressed(&self, now: Millis) -> Result<Vec<SuppressionEntry>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let all: HashMap<String, Vec<u8>> = self.bounded(conn.hgetall(&self.keys.supp)).await?;
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
        inv.key(self.keys.counter(key)).arg(by).arg(ms(window));
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    async fn counter(&self, key: &str) -> Result<u64, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let value: Option<u64> = self.bounded(conn.get(self.keys.counter(key))).await?;
        Ok(value.unwrap_or(0))
    }

    async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, QueueError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.keys.counter(key));
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
        inv.key(self.keys.slot(key))
            .arg(limit)
            .arg(ms(ttl))
            .arg(&token);
        let mut conn = self.connection(&self.conn).await?;
        let taken: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok((taken == 1).then_some(token))
    }

    async fn renew_slot(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        let mut inv = scripts::RENEW_SLOT.prepare_invoke();
        inv.key(self.keys.slot(key)).arg(token).arg(ms(ttl));
        let mut conn = self.connection(&self.conn).await?;
        let renewed: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(renewed == 1)
    }

    async fn release_slot(&self, key: &str, token: &str) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let _: i64 = self.bounded(conn.zrem(self.keys.slot(key), token)).await?;
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<String>, QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        self.bounded(conn.get(self.keys.value(key))).await
    }

    async fn set_value(&self, key: &str, value: &str, ttl: Duration) -> Result<(), QueueError> {
        let mut conn = self.connection(&self.conn).await?;
        let () = self
            .bounded(conn.pset_ex(self.keys.value(key), value, ms(ttl).max(1)))
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
    fn every_key_shares_one_hash_tag() {
        let k = Keys::new("petrel");
        for key in [
            &k.data,
            &k.left,
            &k.received,
            &k.unit,
            &k.due,
            &k.leased,
            &k.token,
            &k.supp,
            &k.events,
            &k.held,
            &k.holds,
        ] {
            assert!(key.starts_with("{petrel}:"), "{key}");
        }
        assert_eq!(k.counter("auth:1.2.3.4"), "{petrel}:ctr:auth:1.2.3.4");
        assert_eq!(k.slot("mx:gmail"), "{petrel}:slot:mx:gmail");
    }

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
