//! A destination's connection slot while a group delivers over it (and
//! while its connection waits in the pool): renewed like the unit leases,
//! so a delivery longer than the slot's TTL keeps it and the cluster-wide
//! `delivery.perDestinationConcurrency` holds, and given back when done,
//! dropped, or aborted.
//!
//! A slot can still be lost (the backend away for longer than the TTL, or
//! a pod paused): then [`SlotGuard::lost`] says so and the group stops
//! starting new units on its connection (see `worker::deliver_group`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::queue::{Millis, QueueError, SharedState, now_millis};

/// A held slot: renewed in the background until released or dropped.
pub(crate) struct SlotGuard {
    state: Arc<dyn SharedState>,
    key: String,
    token: Option<String>,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl SlotGuard {
    /// Takes one of `limit` slots named `key` for `ttl`, renewed every
    /// third of it. `None` when all are taken.
    pub(crate) async fn acquire(
        state: &Arc<dyn SharedState>,
        key: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<Option<SlotGuard>, QueueError> {
        let Some(token) = state.acquire_slot(key, limit, ttl).await? else {
            return Ok(None);
        };
        Ok(Some(SlotGuard::hold(state.clone(), key, token, ttl)))
    }

    /// Starts renewing a slot already taken with `token`.
    pub(crate) fn hold(
        state: Arc<dyn SharedState>,
        key: &str,
        token: String,
        ttl: Duration,
    ) -> SlotGuard {
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn(keep_renewed(
            state.clone(),
            key.to_string(),
            token.clone(),
            ttl,
            lost.clone(),
        ));
        SlotGuard {
            state,
            key: key.to_string(),
            token: Some(token),
            lost,
            renewer,
        }
    }

    /// The slot expired before it could be renewed: another pod may hold
    /// it now, so this one must not open or use a connection on it.
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the slot back and waits for the backend to confirm.
    pub(crate) async fn release(mut self) {
        self.renewer.abort();
        if let Some(token) = self.token.take()
            && let Err(error) = self.state.release_slot(&self.key, &token).await
        {
            tracing::warn!(%error, slot = %self.key, "cannot release a connection slot; it expires with its ttl");
        }
    }
}

impl Drop for SlotGuard {
    /// A group that panics, or is aborted when the shutdown grace runs out,
    /// must not hold the slot until its TTL and starve the destination.
    fn drop(&mut self) {
        self.renewer.abort();
        let Some(token) = self.token.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let state = self.state.clone();
            let key = std::mem::take(&mut self.key);
            handle.spawn(async move {
                if let Err(error) = state.release_slot(&key, &token).await {
                    tracing::warn!(%error, slot = %key, "cannot release a connection slot; it expires with its ttl");
                }
            });
        }
    }
}

/// Renews the slot until aborted; marks it lost when the backend says it
/// is gone or it ran out before a renewal got through.
async fn keep_renewed(
    state: Arc<dyn SharedState>,
    key: String,
    token: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    // Our own clock's view of the expiry; Redis uses its own, so renewing
    // every third of the TTL leaves room for the two to disagree.
    let mut expires_at = now_millis().saturating_add(millis(ttl));
    while let Some(wait) = renew_wait(expires_at, now_millis(), ttl) {
        tokio::time::sleep(wait).await;
        let asked = now_millis();
        match state.renew_slot(&key, &token, ttl).await {
            Ok(true) => expires_at = asked.saturating_add(millis(ttl)),
            Ok(false) => break,
            // Tried again sooner next time: the wait halves what is left.
            Err(error) => {
                tracing::warn!(%error, slot = %key, "cannot renew a connection slot; trying again");
            }
        }
    }
    lost.store(true, Ordering::SeqCst);
    tracing::warn!(slot = %key, "connection slot lost during delivery");
}

/// How long to wait before renewing something expiring at `expires_at`:
/// every third of `ttl`, or sooner, at half the time left, so one that is
/// already short (or a renewal that failed) is renewed before it runs
/// out. `None` once it has expired: there is nothing left to renew.
pub(crate) fn renew_wait(expires_at: Millis, now: Millis, ttl: Duration) -> Option<Duration> {
    let left = expires_at.checked_sub(now).filter(|&l| l > 0)?;
    let third = millis(ttl) / 3;
    Some(Duration::from_millis(third.min(left / 2)))
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryBackend;

    #[test]
    fn renewals_come_every_third_or_before_running_out() {
        let minute = Duration::from_secs(60);
        assert_eq!(
            renew_wait(1_060_000, 1_000_000, minute),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            renew_wait(1_010_000, 1_000_000, minute),
            Some(Duration::from_secs(5))
        );
        assert_eq!(renew_wait(1_000_000, 1_000_000, minute), None);
    }

    #[tokio::test]
    async fn a_held_slot_outlives_its_ttl_and_comes_back_when_dropped() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let state: Arc<dyn SharedState> = Arc::new(MemoryBackend::default());
            let ttl = Duration::from_millis(150);
            let guard = SlotGuard::acquire(&state, "dest:x", 1, ttl)
                .await
                .unwrap()
                .expect("slot free");
            tokio::time::sleep(ttl * 4).await;
            assert!(!guard.lost());
            assert!(
                state
                    .acquire_slot("dest:x", 1, ttl)
                    .await
                    .unwrap()
                    .is_none(),
                "the renewed slot is still held past its ttl"
            );
            // As when the task holding it panics or is aborted.
            drop(guard);
            while state
                .acquire_slot("dest:x", 1, ttl)
                .await
                .unwrap()
                .is_none()
            {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot never came back");
    }

    #[tokio::test]
    async fn a_slot_taken_away_is_reported_lost() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let state: Arc<dyn SharedState> = Arc::new(MemoryBackend::default());
            let ttl = Duration::from_millis(150);
            let guard = SlotGuard::acquire(&state, "dest:y", 1, ttl)
                .await
                .unwrap()
                .expect("slot free");
            // Another party clears it (as an expiry while the backend was
            // away would): the next renewal finds it gone.
            state
                .release_slot("dest:y", guard.token.as_deref().unwrap())
                .await
                .unwrap();
            while !guard.lost() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the loss was never noticed");
    }
}
