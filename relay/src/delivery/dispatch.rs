//! Between the lease loop and the destination groups: leased units wait
//! here, per destination, for one of that destination's connections, and a
//! destination with many units is spread over up to
//! `delivery.perDestinationConcurrency` connections at once.
//!
//! Without it every lease batch for one destination went to one group, one
//! unit after another over one connection, while the batch held every free
//! worker permit: under load the pod delivered over a single connection at
//! a time (measured: delivery at ~50% of accept on 1 KB mail, the relay's
//! CPU mostly idle waiting on round trips).

use std::collections::{BTreeMap, HashMap};

use tokio::sync::OwnedSemaphorePermit;

use crate::queue::Lease;

/// Units for one destination, each holding one worker permit.
struct Waiting {
    leases: Vec<Lease>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Units handed to one destination group (one connection).
pub(crate) struct Batch {
    /// Destination domain.
    pub domain: String,
    /// Its units, in lease order.
    pub leases: Vec<Lease>,
    /// One worker permit per unit.
    pub permit: OwnedSemaphorePermit,
}

/// The waiting units and the groups running, per destination.
#[derive(Default)]
pub(crate) struct Dispatch {
    waiting: BTreeMap<String, Waiting>,
    running: HashMap<String, usize>,
}

/// How `waiting` units are shared over `free` connections: as evenly as
/// possible, never an empty batch. Empty when nothing waits or no
/// connection is free.
pub fn batch_sizes(waiting: usize, free: usize) -> Vec<usize> {
    let parts = waiting.min(free);
    if parts == 0 {
        return Vec::new();
    }
    let (base, extra) = (waiting / parts, waiting % parts);
    (0..parts).map(|i| base + usize::from(i < extra)).collect()
}

impl Dispatch {
    /// Adds leased units of `domain`, with one permit per unit.
    pub fn add(&mut self, domain: String, leases: Vec<Lease>, permit: OwnedSemaphorePermit) {
        let entry = self.waiting.entry(domain).or_insert_with(|| Waiting {
            leases: Vec::new(),
            permit: None,
        });
        entry.leases.extend(leases);
        match &mut entry.permit {
            Some(p) => p.merge(permit),
            None => entry.permit = Some(permit),
        }
    }

    /// The batches to start now with at most `limit` groups running per
    /// destination; counts them as running.
    pub fn start(&mut self, limit: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (domain, waiting) in &mut self.waiting {
            let running = self.running.get(domain).copied().unwrap_or(0);
            let sizes = batch_sizes(waiting.leases.len(), limit.saturating_sub(running));
            if sizes.is_empty() {
                continue;
            }
            let mut rest = std::mem::take(&mut waiting.leases).into_iter();
            for size in sizes {
                let leases: Vec<Lease> = rest.by_ref().take(size).collect();
                let permit = match &mut waiting.permit {
                    Some(p) if p.num_permits() > size => p.split(size),
                    p => p.take(),
                };
                let Some(permit) = permit else { break };
                out.push(Batch {
                    domain: domain.clone(),
                    leases,
                    permit,
                });
            }
            *self.running.entry(domain.clone()).or_default() +=
                out.iter().filter(|b| b.domain == *domain).count();
            // Nothing is left over (one permit per unit), but were it, it
            // would wait rather than be dropped.
            waiting.leases = rest.collect();
            if waiting.leases.is_empty() {
                emptied.push(domain.clone());
            }
        }
        for domain in emptied {
            self.waiting.remove(&domain);
        }
        out
    }

    /// A group of `domain` ended.
    pub fn finished(&mut self, domain: &str) {
        if let Some(n) = self.running.get_mut(domain) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(domain);
            }
        }
    }

    /// Every unit still waiting (at shutdown, to hand back).
    pub fn take_waiting(&mut self) -> Vec<Lease> {
        std::mem::take(&mut self.waiting)
            .into_values()
            .flat_map(|w| w.leases)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::queue::{DeliveryUnit, MessageFlags};

    fn lease(domain: &str, id: usize) -> Lease {
        Lease {
            unit: DeliveryUnit {
                id: id.to_string(),
                message_id: id.to_string(),
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
    fn batches_share_units_evenly_over_free_connections() {
        let cases: [(usize, usize, &[usize]); 6] = [
            (0, 5, &[]),
            (5, 0, &[]),
            (1, 20, &[1]),
            (10, 3, &[4, 3, 3]),
            (
                64,
                20,
                &[4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
            ),
            (3, 3, &[1, 1, 1]),
        ];
        for (waiting, free, want) in cases {
            let got = batch_sizes(waiting, free);
            assert_eq!(got, want, "{waiting} over {free}");
            assert_eq!(got.iter().sum::<usize>(), waiting.min(waiting * free));
        }
    }

    fn ids(b: &Batch) -> Vec<&str> {
        b.leases.iter().map(|l| l.unit.id.as_str()).collect()
    }

    #[tokio::test]
    async fn spreads_a_destination_and_waits_for_a_free_connection() {
        let permits = Arc::new(Semaphore::new(10));
        let mut d = Dispatch::default();
        let take = |n| permits.clone().try_acquire_many_owned(n).unwrap();
        d.add(
            "a.test".into(),
            (0..5).map(|i| lease("a.test", i)).collect(),
            take(5),
        );
        d.add("b.test".into(), vec![lease("b.test", 9)], take(1));
        let batches = d.start(2);
        let got: Vec<(&str, Vec<&str>, usize)> = batches
            .iter()
            .map(|b| (b.domain.as_str(), ids(b), b.permit.num_permits()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.test", vec!["0", "1", "2"], 3),
                ("a.test", vec!["3", "4"], 2),
                ("b.test", vec!["9"], 1),
            ]
        );
        // Both connections of a.test are busy: new units wait.
        d.add("a.test".into(), vec![lease("a.test", 5)], take(1));
        assert!(d.start(2).is_empty());
        assert_eq!(permits.available_permits(), 3);
        d.finished("a.test");
        let next = d.start(2);
        assert_eq!(next.len(), 1);
        assert_eq!(ids(&next[0]), vec!["5"]);
        // Permits come back as the batches end.
        drop(batches);
        drop(next);
        assert_eq!(permits.available_permits(), 10);
        assert!(d.take_waiting().is_empty());
    }

    #[tokio::test]
    async fn waiting_units_are_handed_over_at_shutdown() {
        let permits = Arc::new(Semaphore::new(4));
        let mut d = Dispatch::default();
        d.add(
            "a.test".into(),
            vec![lease("a.test", 1)],
            permits.clone().try_acquire_many_owned(1).unwrap(),
        );
        let running = d.start(1);
        d.add(
            "a.test".into(),
            vec![lease("a.test", 2), lease("a.test", 3)],
            permits.clone().try_acquire_many_owned(2).unwrap(),
        );
        assert!(d.start(1).is_empty());
        let left: Vec<String> = d.take_waiting().into_iter().map(|l| l.unit.id).collect();
        assert_eq!(left, vec!["2", "3"]);
        drop(running);
        assert_eq!(permits.available_permits(), 4);
    }
}
