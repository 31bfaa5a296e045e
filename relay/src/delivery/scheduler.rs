//! The lease loop: lease due units up to the free worker permits, group
//! them by destination, and let [`super::dispatch`] spread each
//! destination's units over up to `perDestinationConcurrency` groups
//! ([`super::group`]), one connection each.
//!
//! Concurrency: at most `workers` units are in flight in this pod (a
//! semaphore, waiting units included); each destination group takes one of
//! the destination's connection slots, shared by all pods, or goes back to
//! the queue for a moment. A throttled or slow destination holds only its
//! own units, so it never holds up another.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{Id, JoinError, JoinSet};

use super::DeliveryContext;
use super::dispatch::Dispatch;
use super::group::deliver_group;
use crate::queue::{Lease, LeasedUnit, SettleOp, Settlement, now_millis};

/// Longest pause between queue polls when nothing is due.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Pause after the queue backend failed.
const BACKEND_PAUSE: Duration = Duration::from_secs(1);
/// How long a wake from an enqueue waits for more enqueues before leasing.
const GATHER: Duration = Duration::from_millis(2);
/// Units leased per poll, at most.
const MAX_BATCH: usize = 100;
/// How often queue gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// Runs the delivery workers until `shutdown` completes, then lets
/// deliveries in progress finish for up to `limits.shutdownGrace` (their
/// leases expire and another worker takes them otherwise).
pub async fn run(
    ctx: Arc<DeliveryContext>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let workers = ctx.config.get().delivery.workers.max(1) as usize;
    let permits = Arc::new(Semaphore::new(workers));
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Which destination each running group delivers to.
    let mut running: HashMap<Id, String> = HashMap::new();
    let mut dispatch = Dispatch::default();
    // Message bytes leased with units still waiting in `dispatch`.
    let mut prefetched = Prefetched::new();
    // Aborted when the loop ends (this handle dropped with it).
    let gauges = AbortOnDrop(crate::queue_gauges::spawn(
        ctx.queue.clone(),
        ctx.control.clone(),
        ctx.metrics.clone(),
        STATS_EVERY,
    ));
    // Set when a lease took all that was due: until then (or a wake) the
    // loop does not lease again.
    let mut drained_until: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    tracing::info!(workers, "delivery workers started");
    loop {
        while let Some(done) = tasks.try_join_next_with_id() {
            ended(&mut dispatch, &mut running, done);
        }
        ctx.pool.sweep();
        let cfg = ctx.config.get();
        let limit = groups_per_destination(&cfg.delivery);
        for batch in dispatch.start(limit) {
            let domain = batch.domain.clone();
            // The bytes go with the batch; a unit whose bytes were taken by
            // another batch (same message, other destination) fetches them.
            let data = data_of(&batch.leases, &prefetched);
            for lease in &batch.leases {
                prefetched.remove(&lease.unit.message_id);
            }
            let handle = tasks.spawn(deliver_group(
                ctx.clone(),
                cfg.clone(),
                batch.domain,
                batch.leases,
                data,
                batch.permit,
            ));
            running.insert(handle.id(), domain);
        }
        let available = permits.available_permits();
        if available == 0 {
            // Every permit is in a running group or waits for one (which
            // then runs): a group ending frees one or the other.
            tokio::select! {
                _ = &mut shutdown => break,
                Some(done) = tasks.join_next_with_id() => {
                    ended(&mut dispatch, &mut running, done);
                    continue
                }
            }
        }
        if let Some(at) = drained_until {
            // The last lease took everything due: lease again when this pod
            // enqueues, or after the idle pause (other pods' mail, retries
            // falling due), not after every group ending, which found an
            // empty queue and cost a round of queue calls each time.
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(at) => {}
                _ = ctx.wake.notified() => {
                    // Let the next few enqueues land: one lease for them all.
                    tokio::time::sleep(GATHER).await;
                }
                // A group ending may let waiting units start.
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    ended(&mut dispatch, &mut running, done);
                    continue
                }
            }
            drained_until = None;
            continue;
        }
        let lease_for = cfg.queue.lease.get();
        let asked = available.min(MAX_BATCH);
        // The units with their message bytes, in one round trip.
        let leased = match ctx
            .queue
            .lease_with_data(now_millis(), asked, lease_for)
            .await
        {
            Ok(leased) => leased,
            Err(error) => {
                tracing::warn!(%error, "cannot lease from the queue");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(BACKEND_PAUSE) => continue,
                }
            }
        };
        if leased.len() < asked {
            drained_until = Some(tokio::time::Instant::now() + IDLE_POLL);
        }
        let (leases, data) = split_prefetched(leased);
        prefetched.extend(data);
        for (domain, group) in group_by_destination(leases) {
            let n = u32::try_from(group.len()).unwrap_or(u32::MAX);
            // Never blocks long: we leased no more units than free permits.
            let Ok(permit) = permits.clone().acquire_many_owned(n).await else {
                break;
            };
            dispatch.add(domain, group, permit);
        }
    }
    // Units that never reached a connection go back at once, due now, for
    // another pod (not an attempt): waiting out their lease would delay them.
    let now = now_millis();
    for lease in dispatch.take_waiting() {
        let op = Settlement::only(SettleOp::Postpone { until: now });
        if let Err(error) = ctx.queue.settle(&lease, op).await {
            tracing::warn!(%error, unit = %lease.unit.id, "cannot hand back a waiting unit; its lease will expire");
        }
    }
    drop(gauges);
    let grace = ctx.config.get().limits.shutdown_grace.get();
    tracing::info!(in_flight = tasks.len(), ?grace, "delivery workers stopping");
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    for pooled in ctx.pool.drain() {
        pooled.session.conn.client.quit().await;
        if let Some(slot) = pooled.slot {
            slot.release().await;
        }
    }
}

/// Books a finished (or panicked) group as ended.
fn ended(
    dispatch: &mut Dispatch,
    running: &mut HashMap<Id, String>,
    done: Result<(Id, ()), JoinError>,
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => e.id(),
    };
    if let Some(domain) = running.remove(&id) {
        dispatch.finished(&domain);
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Message bytes that came with the leases, by message id.
pub(crate) type Prefetched = HashMap<String, Arc<Vec<u8>>>;

/// Splits leased units into the leases and the bytes that came with them.
fn split_prefetched(leased: Vec<LeasedUnit>) -> (Vec<Lease>, Prefetched) {
    let mut data = Prefetched::new();
    let leases = leased
        .into_iter()
        .map(|l| {
            if let Some(bytes) = l.data {
                data.insert(l.lease.unit.message_id.clone(), bytes);
            }
            l.lease
        })
        .collect();
    (leases, data)
}

/// The bytes of one group's messages (shared, not copied).
fn data_of(group: &[Lease], data: &Prefetched) -> Prefetched {
    group
        .iter()
        .filter_map(|l| {
            let id = &l.unit.message_id;
            data.get(id).map(|bytes| (id.clone(), bytes.clone()))
        })
        .collect()
}

/// Leases grouped by destination domain, keeping lease order inside a group.
pub fn group_by_destination(leases: Vec<Lease>) -> BTreeMap<String, Vec<Lease>> {
    let mut groups: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
    for lease in leases {
        groups
            .entry(lease.unit.domain.clone())
            .or_default()
            .push(lease);
    }
    groups
}

/// Groups one destination may have running in this pod. A rate-limited
/// destination gets one: its surplus is paced through a shared line
/// (`pacing`), and groups of one pod reserving places at the same moment
/// got overlapping places, which the rate then refused and re-placed
/// (a churn the pacing test measured at 4x). Pods still share the line.
fn groups_per_destination(delivery: &petrel_crds::config::DeliveryConfig) -> usize {
    match delivery.per_destination_rate {
        Some(_) => 1,
        None => delivery.per_destination_concurrency.max(1) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{DeliveryUnit, MessageFlags};

    fn lease(domain: &str, id: &str) -> Lease {
        Lease {
            unit: DeliveryUnit {
                id: id.into(),
                message_id: id.into(),
                domain: domain.into(),
                recipients: vec![format!("a@{domain}")],
                mail_from: "s@example.test".into(),
                sending_domain: "example.test".into(),
                received_at: 0,
                flags: MessageFlags::default(),
                attempts: 0,
                next_attempt_at: 0,
                last_error: None,
                delay_notified: false,
                tags: Default::default(),
                header_message_id: None,
                history: Vec::new(),
                held_ms: 0,
            },
            token: "t".into(),
            expires_at: 0,
        }
    }

    #[test]
    fn groups_by_destination_in_lease_order() {
        let groups = group_by_destination(vec![
            lease("b.test", "1"),
            lease("a.test", "2"),
            lease("b.test", "3"),
        ]);
        let ids: Vec<(&str, Vec<&str>)> = groups
            .iter()
            .map(|(d, l)| (d.as_str(), l.iter().map(|l| l.unit.id.as_str()).collect()))
            .collect();
        assert_eq!(ids, vec![("a.test", vec!["2"]), ("b.test", vec!["1", "3"])]);
    }
}
