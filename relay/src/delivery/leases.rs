//! What a delivery holds and keeps renewed while it runs: each unit's
//! queue lease ([`Renewer`]) and the destination's connection slot
//! ([`SlotGuard`]).
//!
//! A destination's connection slot while a group delivers over it (and
//! while its connection waits in the pool): renewed like the unit leases,
//! so a delivery longer than the slot's TTL keeps it and the cluster-wide
//! `delivery.perDestinationConcurrency` holds, and given back when done,
//! dropped, or aborted.
//!
//! A slot can still be lost (the backend away for longer than the TTL, or
//! a pod paused): then [`SlotGuard::lost`] says so and the group stops
//! starting new units on its connection (see `group::deliver_group`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::millis;

use crate::queue::{Lease, Millis, QueueError, SharedState, now_millis};

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

/// Keeps one unit's lease renewed while it is being delivered, so SMTP
/// timeouts that add up past the lease do not let another worker take the
/// unit over and deliver it again. Stops when dropped: after the delivery,
/// and on every early exit (panic, or the group aborted at shutdown).
///
/// The delivery keeps its original [`Lease`]: renewal keeps the token, so
/// settling with it works; only its `expires_at` is stale, which makes
/// `record`'s retry window err on the short side.
pub(crate) struct Renewer(tokio::task::JoinHandle<()>);

impl Renewer {
    pub(crate) fn start(
        queue: &Arc<dyn crate::queue::Queue>,
        lease: &Lease,
        lease_for: Duration,
    ) -> Self {
        Renewer(tokio::spawn(keep_lease_renewed(
            queue.clone(),
            lease.clone(),
            lease_for,
        )))
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews `lease` until aborted or lost. A lost lease is only logged: the
/// delivery goes on, and recording its outcome reports the loss.
async fn keep_lease_renewed(
    queue: Arc<dyn crate::queue::Queue>,
    mut lease: Lease,
    lease_for: Duration,
) {
    use crate::queue::QueueError;
    while let Some(wait) = renew_wait(lease.expires_at, now_millis(), lease_for) {
        tokio::time::sleep(wait).await;
        match queue.renew(&lease, now_millis(), lease_for).await {
            Ok(renewed) => lease = renewed,
            Err(QueueError::LeaseLost(_)) => {
                tracing::warn!(unit = %lease.unit.id, "lease lost during delivery; another worker may deliver the unit too");
                return;
            }
            // Tried again sooner next time: the wait halves what is left.
            Err(error) => {
                tracing::warn!(%error, unit = %lease.unit.id, "cannot renew a lease; trying again");
            }
        }
    }
    tracing::warn!(unit = %lease.unit.id, "lease expired during delivery; another worker may deliver the unit too");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::embedded::EmbeddedBackend;
    use crate::queue::memory::MemoryBackend;
    use crate::queue::{MessageFlags, NewMessage, Queue};

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

    #[test]
    fn leases_are_renewed_every_third_or_before_they_run_out() {
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
        assert_eq!(renew_wait(999_999, 1_000_000, minute), None);
    }

    fn message(id: &str, recipients: &[&str]) -> NewMessage {
        NewMessage {
            id: id.into(),
            mail_from: "s@example.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
            sending_domain: "example.test".into(),
            received_at: now_millis(),
            flags: MessageFlags::default(),
            tags: Default::default(),
            header_message_id: None,
        }
    }

    #[tokio::test]
    async fn a_dropped_slot_guard_gives_the_slot_back() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let config = petrel_crds::config::EmbeddedQueue {
                path: dir.path().join("q.redb"),
            };
            let state: Arc<dyn crate::queue::SharedState> = Arc::new(
                EmbeddedBackend::open(&config, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
            let hour = Duration::from_secs(3600);
            let token = state.acquire_slot("dest:x", 1, hour).await.unwrap();
            let guard = SlotGuard::hold(state.clone(), "dest:x", token.unwrap(), hour);
            assert!(
                state
                    .acquire_slot("dest:x", 1, hour)
                    .await
                    .unwrap()
                    .is_none()
            );
            // As when the task holding it panics or is aborted.
            drop(guard);
            loop {
                if state
                    .acquire_slot("dest:x", 1, hour)
                    .await
                    .unwrap()
                    .is_some()
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot never came back");
    }

    #[tokio::test]
    async fn a_renewed_lease_outlives_its_expiry_until_the_renewer_is_dropped() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let config = petrel_crds::config::EmbeddedQueue {
                path: dir.path().join("q.redb"),
            };
            let queue: Arc<dyn Queue> = Arc::new(
                EmbeddedBackend::open(&config, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
            queue
                .enqueue(
                    message("m1", &["a@renewed.test", "b@idle.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            // Long enough that a renewal every third of it is not missed
            // on a loaded machine.
            let lease_for = Duration::from_secs(3);
            let leases = queue.lease(now_millis(), 10, lease_for).await.unwrap();
            let renewed = leases
                .iter()
                .find(|l| l.unit.domain == "renewed.test")
                .unwrap();
            let idle = leases
                .iter()
                .find(|l| l.unit.domain == "idle.test")
                .unwrap();
            let renewer = Renewer::start(&queue, renewed, lease_for);

            // Past the original expiry only the unit nobody renewed is due.
            let past = renewed.expires_at + 300;
            tokio::time::sleep(Duration::from_millis(past.saturating_sub(now_millis()))).await;
            let due = queue.lease(now_millis(), 10, lease_for).await.unwrap();
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].unit.id, idle.unit.id);
            queue.complete(&due[0]).await.unwrap();

            // Dropped (the delivery ended without settling): renewal stops
            // and the unit comes back once its last renewal runs out.
            drop(renewer);
            let back = loop {
                let due = queue.lease(now_millis(), 10, lease_for).await.unwrap();
                if let Some(lease) = due.into_iter().next() {
                    break lease;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(back.unit.id, renewed.unit.id);
            // The first lease was taken over, so it cannot settle any more.
            assert!(matches!(
                queue.complete(renewed).await,
                Err(QueueError::LeaseLost(_))
            ));
        })
        .await
        .expect("test timed out");
    }
}
