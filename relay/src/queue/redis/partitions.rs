//! The partitions a pod works on right now, and running one step on many
//! of them at once.
//!
//! Which shards hold units is Redis state, not config: the highest
//! partition count ever used is kept in `{prefix}:meta` (script `META`),
//! so after `partitions` shrinks the partitions above it are still leased,
//! listed and counted, and nothing written there is stranded; and the
//! legacy single-tag shard is looked at while it still holds units. Both
//! are re-read every [`REFRESH_EVERY`], which also covers pods of an older
//! version still writing the legacy keys during a rolling upgrade.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::layout::{Shard, ShardKeys, SharedKeys, partition_of};
use super::{RedisBackend, scripts};
use crate::queue::QueueError;

/// Suppression entries (key, JSON) waiting in one shard's outbox.
pub(super) type Outboxed = (Arc<ShardKeys>, Vec<(String, Vec<u8>)>);

/// How long a pod trusts what it read of the meta key and the legacy shard.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// Shard keys and the partition view of one backend.
pub(super) struct Layout {
    prefix: String,
    /// `queue.redis.partitions`: where new messages go.
    configured: u32,
    pub(super) shared: SharedKeys,
    legacy: Arc<ShardKeys>,
    parts: RwLock<Vec<Arc<ShardKeys>>>,
    view: Mutex<Option<View>>,
    cursor: AtomicUsize,
    /// Some partition's suppression outbox may hold entries not yet moved
    /// to the shared list (after a crash or a failed move).
    sweep: AtomicBool,
}

/// What a pod works on.
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    /// Partitions 0..span may hold units.
    pub(super) span: u32,
    /// The legacy shard still holds units.
    pub(super) legacy: bool,
    at: Instant,
}

impl Layout {
    pub(super) fn new(prefix: &str, configured: u32) -> Layout {
        Layout {
            prefix: prefix.to_string(),
            configured: configured.max(1),
            shared: SharedKeys::new(prefix),
            legacy: Arc::new(ShardKeys::new(prefix, Shard::Legacy)),
            parts: RwLock::new(Vec::new()),
            view: Mutex::new(None),
            cursor: AtomicUsize::new(0),
            sweep: AtomicBool::new(true),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of `shard`.
    pub(super) fn keys(&self, shard: Shard) -> Arc<ShardKeys> {
        let Shard::Part(n) = shard else {
            return self.legacy.clone();
        };
        let n = n as usize;
        if let Some(keys) = self.parts.read().unwrap_or_else(|p| p.into_inner()).get(n) {
            return keys.clone();
        }
        let mut parts = self.parts.write().unwrap_or_else(|p| p.into_inner());
        while parts.len() <= n {
            let next = Shard::Part(parts.len() as u32);
            parts.push(Arc::new(ShardKeys::new(&self.prefix, next)));
        }
        parts[n].clone()
    }

    /// The partition a new message goes to.
    pub(super) fn home(&self, message_id: &str) -> Shard {
        Shard::Part(partition_of(message_id, self.configured))
    }

    /// A rotating start, so the shards first in line take turns.
    pub(super) fn next_start(&self, n: usize) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    pub(super) fn needs_sweep(&self) {
        self.sweep.store(true, Ordering::Relaxed);
    }

    fn fresh_view(&self) -> Option<View> {
        let view = *self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.filter(|v| v.at.elapsed() < REFRESH_EVERY)
    }
}

impl RedisBackend {
    /// The current view, read again from Redis when older than
    /// [`REFRESH_EVERY`]. The first call records this pod's partition
    /// count, so it is in the meta key before the pod enqueues anything.
    pub(super) async fn view(&self) -> Result<View, QueueError> {
        if let Some(view) = self.layout.fresh_view() {
            return Ok(view);
        }
        let shared = &self.layout.shared;
        let mut conn = self.connection(&self.conn).await?;
        let mut inv = scripts::META.prepare_invoke();
        inv.key(&shared.meta).arg(self.layout.configured);
        let span: u32 = self.bounded(inv.invoke_async(&mut conn)).await?;
        let legacy = &self.layout.legacy;
        let (units, messages): (u64, u64) = self
            .bounded(
                redis::pipe()
                    .hlen(&legacy.unit)
                    .hlen(&legacy.left)
                    .query_async(&mut conn),
            )
            .await?;
        let view = View {
            span: span.max(self.layout.configured),
            legacy: units + messages > 0,
            at: Instant::now(),
        };
        *self.layout.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
        if self.layout.sweep.swap(false, Ordering::Relaxed)
            && let Err(error) = self.sweep_suppressions(view.span).await
        {
            self.layout.needs_sweep();
            tracing::warn!(%error, "cannot move suppression entries out of the partition outboxes");
        }
        Ok(view)
    }

    /// The shards that may hold units: the legacy one while it is not
    /// drained, and every partition up to the highest count ever used.
    pub(super) async fn queue_shards(&self) -> Result<Vec<Arc<ShardKeys>>, QueueError> {
        let view = self.view().await?;
        let mut shards = Vec::with_capacity(view.span as usize + 1);
        if view.legacy {
            shards.push(self.layout.keys(Shard::Legacy));
        }
        shards.extend((0..view.span).map(|n| self.layout.keys(Shard::Part(n))));
        Ok(shards)
    }

    /// The shards whose event streams readers follow: the shared (legacy)
    /// stream always, since `publish` writes it, and every partition.
    pub(super) async fn stream_shards(&self) -> Result<Vec<Arc<ShardKeys>>, QueueError> {
        let view = self.view().await?;
        let mut shards = vec![self.layout.keys(Shard::Legacy)];
        shards.extend((0..view.span).map(|n| self.layout.keys(Shard::Part(n))));
        Ok(shards)
    }

    /// Runs `step` on every item (a shard's keys, or a shard with its
    /// call) at once: one request per item, all in flight together on the
    /// multiplexed connection, so a round costs one round trip, not one
    /// per shard; under one deadline. One result per item, in order; a
    /// connection failure fails them all.
    pub(super) async fn each<'a, I, T, F, Fut>(
        &self,
        items: &'a [I],
        step: F,
    ) -> Result<Vec<Result<T, QueueError>>, QueueError>
    where
        F: Fn(&'a I, super::conn::Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let conn = self.bounded_until(deadline, self.conn.get()).await?;
        let runs = items
            .iter()
            .map(|item| self.bounded_until(deadline, step(item, conn.clone())));
        Ok(futures::future::join_all(runs).await)
    }

    /// [`RedisBackend::each`] when every item must succeed.
    pub(super) async fn each_ok<'a, I, T, F, Fut>(
        &self,
        items: &'a [I],
        step: F,
    ) -> Result<Vec<T>, QueueError>
    where
        F: Fn(&'a I, super::conn::Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.each(items, step).await?.into_iter().collect()
    }

    /// Moves suppression entries a settlement wrote to partition outboxes
    /// into the shared list: first written there, then removed from the
    /// outbox, so a crash in between only writes an entry twice.
    pub(super) async fn move_suppressions(&self, entries: &[Outboxed]) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (_, list) in entries {
            for (key, json) in list {
                pipe.hset(&self.layout.shared.supp, key, json).ignore();
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.connection(&self.conn).await?;
        let () = self.bounded(pipe.query_async(&mut conn)).await?;
        let removals = entries
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(keys, list)| {
                let mut conn = conn.clone();
                let fields: Vec<&String> = list.iter().map(|(k, _)| k).collect();
                async move {
                    redis::cmd("HDEL")
                        .arg(&keys.supp_out)
                        .arg(fields)
                        .query_async::<i64>(&mut conn)
                        .await
                }
            });
        self.bounded(futures::future::try_join_all(removals))
            .await?;
        Ok(())
    }

    /// Moves whatever the partition outboxes still hold (a pod died
    /// between a settlement and the move).
    async fn sweep_suppressions(&self, span: u32) -> Result<(), QueueError> {
        let shards: Vec<Arc<ShardKeys>> = (0..span)
            .map(|n| self.layout.keys(Shard::Part(n)))
            .collect();
        let found = self
            .each_ok(&shards, |keys, mut conn| async move {
                redis::cmd("HGETALL")
                    .arg(&keys.supp_out)
                    .query_async::<Vec<(String, Vec<u8>)>>(&mut conn)
                    .await
            })
            .await?;
        let entries: Vec<Outboxed> = shards
            .into_iter()
            .zip(found)
            .filter(|(_, list)| !list.is_empty())
            .collect();
        self.move_suppressions(&entries).await
    }
}
