//! Leasing across partitions: count what each shard has due, split the
//! batch fairly ([`plan_quotas`]), then one `LEASE` script per shard with
//! work, each naming the messages to read with its units, then one
//! `HMGET` per shard for their bytes.
//!
//! On one server (or a Sentinel's primary) each step is one pipeline, so
//! a lease costs two round trips whatever the partition count; measured
//! before, sixteen concurrent requests per step went out as about as many
//! writes and were the largest share of the queue's round trips per
//! message. A Cluster spreads the shards over nodes, so there each shard
//! gets its own request, all in flight at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

use super::conn::Conn;
use super::layout::token;
use super::{
    DeliveryUnit, Lease, LeasedUnit, Millis, QueueError, RECLAIM_BATCH, RedisBackend, ShardKeys,
    decode, plan_quotas, scripts,
};

/// A `LEASE` reply: (unit JSON, message id to read or nil)*.
type LeaseReply = Vec<Option<Vec<u8>>>;

/// An `HMGET` reply per shard read, in order; the outer error is the
/// whole round trip failing.
type BodyReplies = Result<Vec<Result<Vec<Option<Vec<u8>>>, QueueError>>, QueueError>;

/// What one lease round asks of one shard.
struct ShardLease {
    keys: Arc<ShardKeys>,
    quota: usize,
    token: String,
}

impl ShardLease {
    fn invocation<'a>(
        &'a self,
        now: Millis,
        expires_at: Millis,
        share: usize,
        holds: &'a [String],
    ) -> redis::ScriptInvocation<'a> {
        let k = &self.keys;
        let mut inv = scripts::LEASE.prepare_invoke();
        inv.key(&k.due)
            .key(&k.leased)
            .key(&k.unit)
            .key(&k.token)
            .key(&k.held)
            .key(&k.data)
            .arg(now)
            .arg(self.quota)
            .arg(expires_at)
            .arg(&self.token)
            .arg(RECLAIM_BATCH)
            .arg(share)
            .arg(holds);
        inv
    }
}

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
        let conn = self.connection(&self.conn).await?;
        let (holds, counts) = match &conn {
            Conn::Single(_) => self.counts_in_one(conn.clone(), &shards, now).await?,
            Conn::Cluster(_) => {
                let (holds, counts) =
                    tokio::join!(self.held_domains(), self.counts_each(&shards, now));
                (holds?, counts?)
            }
        };
        // A shard that did not answer is left out of this round.
        let available: Vec<u64> = counts.into_iter().map(|c| c.unwrap_or(0)).collect();
        let quotas = plan_quotas(&available, max, self.layout.next_start(shards.len()));
        let chosen: Vec<ShardLease> = shards
            .into_iter()
            .zip(quotas)
            .filter(|(_, q)| *q > 0)
            .map(|(keys, quota)| ShardLease {
                token: token(keys.shard),
                keys,
                quota,
            })
            .collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let share = budget / chosen.len();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let replies = match &conn {
            Conn::Single(_) => {
                self.lease_in_one(conn.clone(), &chosen, now, expires_at, share, &holds)
                    .await?
            }
            Conn::Cluster(_) => {
                self.each(&chosen, |s, mut conn| {
                    let inv = s.invocation(now, expires_at, share, &holds);
                    async move { inv.invoke_async::<LeaseReply>(&mut conn).await }
                })
                .await?
            }
        };
        let mut out = Vec::new();
        let mut reads = Vec::new();
        let mut failed = None;
        for (s, reply) in chosen.iter().zip(replies) {
            match reply {
                Ok(reply) => {
                    let first = out.len();
                    let ids = decode_leases(&s.keys, &s.token, expires_at, reply, &mut out);
                    if !ids.is_empty() {
                        reads.push(BodyRead {
                            keys: s.keys.clone(),
                            ids,
                            units: first..out.len(),
                        });
                    }
                }
                // The other shards' leases stand: losing them here would
                // leave their units leased, undelivered, until expiry.
                Err(error) => failed = Some(error),
            }
        }
        if !reads.is_empty() {
            self.read_bodies(&conn, &reads, &mut out).await;
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

    /// Reads the bytes the `LEASE` scripts named, one `HMGET` per shard
    /// (one pipeline on one server), and gives them to the units of those
    /// messages. What does not arrive stays `None`; the caller reads it
    /// message by message.
    async fn read_bodies(&self, conn: &Conn, reads: &[BodyRead], out: &mut [LeasedUnit]) {
        let replies: BodyReplies = match conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for r in reads {
                    pipe.cmd("HMGET").arg(&r.keys.data).arg(&r.ids);
                }
                let mut conn = conn.clone();
                self.bounded(pipe.query_async::<Vec<RedisResult<Vec<Option<Vec<u8>>>>>>(&mut conn))
                    .await
                    .map(|replies| {
                        replies
                            .into_iter()
                            .map(|r| r.map_err(super::unavailable))
                            .collect()
                    })
            }
            Conn::Cluster(_) => {
                self.each(reads, |r, mut conn| async move {
                    redis::cmd("HMGET")
                        .arg(&r.keys.data)
                        .arg(&r.ids)
                        .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                        .await
                })
                .await
            }
        };
        let replies = match replies {
            Ok(replies) => replies,
            Err(error) => {
                tracing::warn!(%error, "reading leased messages failed; reading them one by one");
                return;
            }
        };
        for (r, reply) in reads.iter().zip(replies) {
            let bodies = match reply {
                Ok(bodies) => bodies,
                Err(error) => {
                    tracing::warn!(%error, "reading leased messages failed; reading them one by one");
                    continue;
                }
            };
            let bodies: HashMap<&str, Arc<Vec<u8>>> = r
                .ids
                .iter()
                .zip(bodies)
                .filter_map(|(id, body)| Some((id.as_str(), Arc::new(body?))))
                .collect();
            for unit in &mut out[r.units.clone()] {
                unit.data = bodies.get(unit.lease.unit.message_id.as_str()).cloned();
            }
        }
    }

    /// The held destinations and each shard's due units and expired
    /// leases, in one pipeline.
    async fn counts_in_one(
        &self,
        mut conn: Conn,
        shards: &[Arc<ShardKeys>],
        now: Millis,
    ) -> Result<(Vec<String>, Vec<Result<u64, QueueError>>), QueueError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HKEYS").arg(&self.layout.shared.holds);
        for k in shards {
            pipe.zcount(&k.due, "-inf", now)
                .zcount(&k.leased, "-inf", now);
        }
        let values: Vec<Value> = self.bounded(pipe.query_async(&mut conn)).await?;
        let mut values = values.into_iter();
        let parsed = || -> RedisResult<(Vec<String>, Vec<u64>)> {
            let holds = match values.next() {
                Some(v) => redis::from_redis_value(v)?,
                None => Vec::new(),
            };
            let counts = values
                .map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
                .collect::<RedisResult<Vec<u64>>>()?;
            Ok((holds, counts))
        };
        let (holds, counts) = parsed().map_err(super::unavailable)?;
        let counts = counts.chunks(2).map(|c| Ok(c.iter().sum())).collect();
        Ok((holds, counts))
    }

    /// Each shard's due units and expired leases, one request per shard.
    async fn counts_each(
        &self,
        shards: &[Arc<ShardKeys>],
        now: Millis,
    ) -> Result<Vec<Result<u64, QueueError>>, QueueError> {
        self.each(shards, |k, mut conn| async move {
            let (due, expired): (u64, u64) = redis::pipe()
                .zcount(&k.due, "-inf", now)
                .zcount(&k.leased, "-inf", now)
                .query_async(&mut conn)
                .await?;
            Ok(due + expired)
        })
        .await
    }

    /// The `LEASE` scripts of every chosen shard in one pipeline, one
    /// result per shard. Scripts in a pipeline are not loaded on demand:
    /// after a Redis restart every one of them answers NOSCRIPT having done
    /// nothing, so the script is loaded and just those run again.
    async fn lease_in_one(
        &self,
        mut conn: Conn,
        chosen: &[ShardLease],
        now: Millis,
        expires_at: Millis,
        share: usize,
        holds: &[String],
    ) -> Result<Vec<Result<LeaseReply, QueueError>>, QueueError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut results: Vec<Option<Result<LeaseReply, QueueError>>> =
            chosen.iter().map(|_| None).collect();
        for round in 0..2 {
            let pending: Vec<usize> = (0..chosen.len())
                .filter(|i| results[*i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &pending {
                pipe.invoke_script(&chosen[i].invocation(now, expires_at, share, holds));
            }
            let replies: Vec<RedisResult<LeaseReply>> = self
                .bounded_until(deadline, pipe.query_async(&mut conn))
                .await?;
            let mut missing = false;
            for (&i, reply) in pending.iter().zip(replies) {
                match reply {
                    Err(e) if is_noscript(&e) && round == 0 => missing = true,
                    other => results[i] = Some(other.map_err(super::unavailable)),
                }
            }
            if missing {
                self.bounded_until(deadline, scripts::LEASE.load_async(&mut conn))
                    .await?;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(QueueError::Unavailable("NOSCRIPT".into()))))
            .collect())
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

pub(super) fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// The messages one shard's `LEASE` named, to read in one `HMGET`, and
/// the range of leased units they belong to.
struct BodyRead {
    keys: Arc<ShardKeys>,
    ids: Vec<String>,
    units: std::ops::Range<usize>,
}

/// Turns a `LEASE` reply (unit JSON, message id or nil)* into leases
/// without bytes, and returns the ids of the messages to read for them.
fn decode_leases(
    keys: &ShardKeys,
    token: &str,
    expires_at: Millis,
    reply: Vec<Option<Vec<u8>>>,
    out: &mut Vec<LeasedUnit>,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut items = reply.into_iter();
    while let (Some(unit), Some(read)) = (items.next(), items.next()) {
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
        if read.is_some() {
            ids.push(unit.message_id.clone());
        }
        out.push(LeasedUnit {
            lease: Lease {
                unit,
                token: token.to_string(),
                expires_at,
            },
            data: None,
        });
    }
    ids
}
