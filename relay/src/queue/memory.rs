//! An in-memory [`Queue`], [`SharedState`] and [`EventLog`] for tests
//! (the relay's unit tests and the fuzz targets), with switches to make
//! the backend fail. It keeps the contract's semantics (leases with
//! tokens, atomic settlements, consumer groups) in one mutex, so code
//! under test behaves as against a real backend; the real backends have
//! their own conformance suite in `tests/tests/queue_conformance.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::control::{Hold, QueueControl, UnitState, UnitView, released};
use super::redis::in_force;
use super::{
    DeliveryUnit, Lease, Millis, NewMessage, Queue, QueueError, QueueStats, Settlement,
    SharedState, SuppressionEntry, now_millis, settled_unit, suppression_key, units_of,
};
use crate::events::{Backlog, Event, EventLog, EventSeq, StoredEvent, TrimReport};

/// A consumer group: its cursor and its claims (seq -> claimed at, consumer).
type Group = (u64, BTreeMap<u64, (Millis, String)>);

#[derive(Default)]
struct Store {
    /// Stored messages by id, with the units not yet finished.
    messages: BTreeMap<String, (NewMessage, usize)>,
    /// Every message ever stored, in order (what tests look at).
    enqueued: Vec<NewMessage>,
    units: BTreeMap<String, DeliveryUnit>,
    /// Unit id -> (lease expiry, token).
    leases: HashMap<String, (Millis, String)>,
    suppression: BTreeMap<String, SuppressionEntry>,
    /// Counter -> (total, end of window).
    counters: HashMap<String, (u64, Millis)>,
    /// Slot key -> tokens with expiry.
    slots: HashMap<String, Vec<(String, Millis)>>,
    /// Cache key -> (expiry, value).
    values: HashMap<String, (Millis, String)>,
    next_seq: u64,
    events: BTreeMap<u64, (Millis, Event)>,
    /// Group -> (cursor, seq -> (claimed at, consumer)).
    groups: BTreeMap<String, Group>,
    /// Held destination -> since.
    holds: BTreeMap<String, Millis>,
    /// Units moved out of reach of lease by a hold.
    held: BTreeSet<String>,
}

impl Store {
    fn suppress(&mut self, entries: impl IntoIterator<Item = SuppressionEntry>) {
        for entry in entries {
            let entry = entry.normalised();
            self.suppression.insert(entry.key(), entry);
        }
    }

    fn store_message(&mut self, message: &NewMessage) -> bool {
        let units = units_of(message);
        if units.is_empty() || self.messages.contains_key(&message.id) {
            return false;
        }
        self.messages
            .insert(message.id.clone(), (message.clone(), units.len()));
        self.enqueued.push(message.clone());
        for unit in units {
            self.units.insert(unit.id.clone(), unit);
        }
        true
    }

    fn append(&mut self, events: &[Event]) {
        let now = now_millis();
        for event in events {
            self.next_seq += 1;
            self.events.insert(self.next_seq, (now, event.clone()));
        }
    }

    fn finish(&mut self, unit: &DeliveryUnit) {
        self.units.remove(&unit.id);
        if let Some((_, left)) = self.messages.get_mut(&unit.message_id) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.messages.remove(&unit.message_id);
            }
        }
    }
}

/// The in-memory backend. `Default` is an empty, working one.
#[derive(Default)]
pub struct MemoryBackend {
    store: Mutex<Store>,
    down: AtomicBool,
    enqueue_down: AtomicBool,
    failing_settles: AtomicU32,
    failing_publishes: AtomicU32,
    settle_calls: AtomicU32,
}

impl MemoryBackend {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock must not hide the
        // state from the assertion that follows.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gate(&self) -> Result<(), QueueError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(QueueError::Unavailable("memory backend down (test)".into()));
        }
        Ok(())
    }

    /// Takes one from `counter` if it is above zero: true when it was.
    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Every operation fails with [`QueueError::Unavailable`] while set.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Only [`Queue::enqueue`] fails while set (the rest keeps working).
    pub fn set_enqueue_down(&self, down: bool) {
        self.enqueue_down.store(down, Ordering::SeqCst);
    }

    /// The next `n` settlements fail (unapplied) as if the backend were away.
    pub fn fail_next_settles(&self, n: u32) {
        self.failing_settles.store(n, Ordering::SeqCst);
    }

    /// The next `n` publishes fail as if the backend were away.
    pub fn fail_next_publishes(&self, n: u32) {
        self.failing_publishes.store(n, Ordering::SeqCst);
    }

    /// Settle calls so far, failed ones included.
    pub fn settle_calls(&self) -> u32 {
        self.settle_calls.load(Ordering::SeqCst)
    }

    /// Every message stored so far, in order (finished ones included).
    pub fn enqueued(&self) -> Vec<NewMessage> {
        self.store().enqueued.clone()
    }

    /// Every event in the outbox, in log order.
    pub fn events(&self) -> Vec<Event> {
        self.store()
            .events
            .values()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Units still in the queue (leased or not).
    pub fn units(&self) -> Vec<DeliveryUnit> {
        self.store().units.values().cloned().collect()
    }

    /// The current value of a counter, ignoring its window.
    pub fn counter_value(&self, key: &str) -> Option<u64> {
        self.store().counters.get(key).map(|(v, _)| *v)
    }
}

#[async_trait]
impl Queue for MemoryBackend {
    async fn enqueue(&self, message: NewMessage, events: Vec<Event>) -> Result<(), QueueError> {
        self.gate()?;
        if self.enqueue_down.load(Ordering::SeqCst) {
            return Err(QueueError::Unavailable("enqueue failed (test)".into()));
        }
        let mut store = self.store();
        if store.store_message(&message) {
            store.append(&events);
        }
        Ok(())
    }

    async fn lease(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        self.gate()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let mut store = self.store();
        let store = &mut *store;
        let due: Vec<&DeliveryUnit> = store
            .units
            .values()
            .filter(|u| {
                u.next_attempt_at <= now
                    && !store.held.contains(&u.id)
                    && store
                        .leases
                        .get(&u.id)
                        .is_none_or(|(expiry, _)| *expiry <= now)
            })
            .collect();
        // As the real backends: a due unit of a held destination moves to
        // the held set instead of being leased.
        let (held, free): (Vec<&DeliveryUnit>, Vec<&DeliveryUnit>) = due
            .into_iter()
            .partition(|u| store.holds.contains_key(&u.domain));
        let mut due = free;
        for unit in held {
            store.held.insert(unit.id.clone());
        }
        due.sort_by_key(|u| (u.next_attempt_at, u.id.clone()));
        let leases: Vec<Lease> = due
            .into_iter()
            .take(max)
            .map(|unit| Lease {
                unit: unit.clone(),
                token: token.clone(),
                expires_at,
            })
            .collect();
        for lease in &leases {
            store
                .leases
                .insert(lease.unit.id.clone(), (expires_at, token.clone()));
        }
        Ok(leases)
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: Millis,
        lease_for: Duration,
    ) -> Result<Lease, QueueError> {
        self.gate()?;
        let mut store = self.store();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        match store.leases.get_mut(&lease.unit.id) {
            Some((expiry, token)) if *token == lease.token && *expiry > now => {
                *expiry = expires_at;
                Ok(Lease {
                    expires_at,
                    ..lease.clone()
                })
            }
            _ => Err(QueueError::LeaseLost(lease.unit.id.clone())),
        }
    }

    async fn message_data(&self, message_id: &str) -> Result<Vec<u8>, QueueError> {
        self.gate()?;
        self.store()
            .messages
            .get(message_id)
            .map(|(m, _)| m.data.clone())
            .ok_or_else(|| QueueError::NotFound(message_id.to_string()))
    }

    async fn settle(&self, lease: &Lease, settlement: Settlement) -> Result<(), QueueError> {
        self.settle_calls.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        if Self::take(&self.failing_settles) {
            return Err(QueueError::Unavailable("settle failed (test)".into()));
        }
        let mut store = self.store();
        let id = &lease.unit.id;
        if store.leases.get(id).is_none_or(|(_, t)| *t != lease.token) {
            return Err(QueueError::LeaseLost(id.clone()));
        }
        store.leases.remove(id);
        match settled_unit(&lease.unit, settlement.op, now_millis()) {
            Some(unit) => {
                store.units.insert(unit.id.clone(), unit);
            }
            None => store.finish(&lease.unit),
        }
        for message in &settlement.enqueue {
            store.store_message(message);
        }
        store.append(&settlement.events);
        store.suppress(settlement.suppress);
        Ok(())
    }

    async fn stats(&self, now: Millis) -> Result<QueueStats, QueueError> {
        self.gate()?;
        let store = self.store();
        let mut stats = QueueStats {
            messages: store.messages.len() as u64,
            oldest_received_at: store.messages.values().map(|(m, _)| m.received_at).min(),
            ..QueueStats::default()
        };
        for unit in store.units.values() {
            match store.leases.get(&unit.id) {
                Some((expiry, _)) if *expiry > now => stats.leased += 1,
                None if store.held.contains(&unit.id) => stats.held += 1,
                _ if unit.next_attempt_at <= now => stats.due += 1,
                _ => stats.deferred += 1,
            }
        }
        Ok(stats)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.gate()
    }
}

#[async_trait]
impl SharedState for MemoryBackend {
    async fn suppress(&self, entry: SuppressionEntry) -> Result<(), QueueError> {
        self.gate()?;
        self.store().suppress([entry]);
        Ok(())
    }

    async fn suppressed(
        &self,
        address: &str,
        sending_domain: &str,
        now: Millis,
    ) -> Result<Option<SuppressionEntry>, QueueError> {
        self.gate()?;
        let store = self.store();
        Ok([None, Some(sending_domain)]
            .into_iter()
            .filter_map(|scope| store.suppression.get(&suppression_key(address, scope)))
            .find(|e| e.applies(sending_domain, now))
            .cloned())
    }

    async fn unsuppress(&self, address: &str, scope: Option<&str>) -> Result<bool, QueueError> {
        self.gate()?;
        Ok(self
            .store()
            .suppression
            .remove(&suppression_key(address, scope))
            .is_some())
    }

    async fn list_suppressed(&self, now: Millis) -> Result<Vec<SuppressionEntry>, QueueError> {
        self.gate()?;
        Ok(self
            .store()
            .suppression
            .values()
            .filter(|e| in_force(e, now))
            .cloned()
            .collect())
    }

    async fn incr_counter(&self, key: &str, by: u64, window: Duration) -> Result<u64, QueueError> {
        self.gate()?;
        let now = now_millis();
        let mut store = self.store();
        let entry = store.counters.entry(key.to_string()).or_insert((0, 0));
        if entry.1 <= now {
            *entry = (
                0,
                now.saturating_add(window.as_millis() as u64).max(now + 1),
            );
        }
        entry.0 = entry.0.saturating_add(by);
        Ok(entry.0)
    }

    async fn counter(&self, key: &str) -> Result<u64, QueueError> {
        self.gate()?;
        let now = now_millis();
        Ok(match self.store().counters.get(key) {
            Some((total, ends)) if *ends > now => *total,
            _ => 0,
        })
    }

    async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, QueueError> {
        self.gate()?;
        let now = now_millis();
        let store = self.store();
        Ok(keys
            .iter()
            .map(|key| match store.counters.get(key) {
                Some((total, ends)) if *ends > now => *total,
                _ => 0,
            })
            .collect())
    }

    async fn acquire_slot(
        &self,
        key: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<Option<String>, QueueError> {
        self.gate()?;
        let now = now_millis();
        let mut store = self.store();
        let held = store.slots.entry(key.to_string()).or_default();
        held.retain(|(_, expiry)| *expiry > now);
        if held.len() >= limit as usize {
            return Ok(None);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        held.push((token.clone(), now.saturating_add(ttl.as_millis() as u64)));
        Ok(Some(token))
    }

    async fn renew_slot(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        self.gate()?;
        let now = now_millis();
        let mut store = self.store();
        let Some(held) = store.slots.get_mut(key) else {
            return Ok(false);
        };
        held.retain(|(_, expiry)| *expiry > now);
        Ok(match held.iter_mut().find(|(t, _)| t == token) {
            Some((_, expiry)) => {
                *expiry = now.saturating_add(ttl.as_millis() as u64);
                true
            }
            None => false,
        })
    }

    async fn release_slot(&self, key: &str, token: &str) -> Result<(), QueueError> {
        self.gate()?;
        if let Some(held) = self.store().slots.get_mut(key) {
            held.retain(|(t, _)| t != token);
        }
        Ok(())
    }
    async fn get_value(&self, key: &str) -> Result<Option<String>, QueueError> {
        self.gate()?;
        let now = now_millis();
        Ok(self
            .store()
            .values
            .get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, v)| v.clone()))
    }

    async fn set_value(&self, key: &str, value: &str, ttl: Duration) -> Result<(), QueueError> {
        self.gate()?;
        let expires = now_millis().saturating_add(ttl.as_millis() as u64).max(1);
        self.store()
            .values
            .insert(key.to_string(), (expires, value.to_string()));
        Ok(())
    }
}

fn seq_of(n: u64) -> EventSeq {
    format!("{n:020}")
}

fn parse_seq(seq: &str) -> Result<u64, QueueError> {
    seq.parse().map_err(|_| QueueError::Corrupt {
        key: seq.to_string(),
        reason: "not an event sequence number".into(),
    })
}

fn stored(n: u64, at: Millis, event: &Event) -> StoredEvent {
    StoredEvent {
        seq: seq_of(n),
        stored_at: at,
        event: event.clone(),
    }
}

#[async_trait]
impl EventLog for MemoryBackend {
    async fn publish(&self, events: &[Event]) -> Result<(), QueueError> {
        self.gate()?;
        if Self::take(&self.failing_publishes) {
            return Err(QueueError::Unavailable("publish failed (test)".into()));
        }
        self.store().append(events);
        Ok(())
    }

    async fn publish_suppressing(
        &self,
        events: &[Event],
        suppress: &[SuppressionEntry],
    ) -> Result<(), QueueError> {
        self.gate()?;
        if Self::take(&self.failing_publishes) {
            return Err(QueueError::Unavailable("publish failed (test)".into()));
        }
        let mut store = self.store();
        store.append(events);
        store.suppress(suppress.iter().cloned());
        Ok(())
    }

    async fn ensure_group(&self, group: &str) -> Result<(), QueueError> {
        self.gate()?;
        self.store().groups.entry(group.to_string()).or_default();
        Ok(())
    }

    async fn claim(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        self.gate()?;
        let now = now_millis();
        let idle_since = now.saturating_sub(reclaim_after.as_millis() as u64);
        let mut store = self.store();
        let store = &mut *store;
        let Some((cursor, pending)) = store.groups.get_mut(group) else {
            return Err(QueueError::NotFound(format!("event group {group}")));
        };
        let mut out = Vec::new();
        for (n, (at, who)) in pending.iter_mut() {
            if out.len() >= max {
                break;
            }
            if *at <= idle_since
                && let Some((stored_at, event)) = store.events.get(n)
            {
                *at = now;
                *who = consumer.to_string();
                out.push(stored(*n, *stored_at, event));
            }
        }
        for (n, (stored_at, event)) in store.events.range(*cursor + 1..) {
            if out.len() >= max {
                break;
            }
            pending.insert(*n, (now, consumer.to_string()));
            out.push(stored(*n, *stored_at, event));
            *cursor = *n;
        }
        Ok(out)
    }

    async fn ack(&self, group: &str, seqs: &[EventSeq]) -> Result<(), QueueError> {
        self.gate()?;
        let seqs = seqs
            .iter()
            .map(|s| parse_seq(s))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((_, pending)) = self.store().groups.get_mut(group) {
            for n in seqs {
                pending.remove(&n);
            }
        }
        Ok(())
    }

    async fn renew(
        &self,
        group: &str,
        consumer: &str,
        seqs: &[EventSeq],
    ) -> Result<u64, QueueError> {
        self.gate()?;
        let seqs = seqs
            .iter()
            .map(|s| parse_seq(s))
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_millis();
        let mut renewed = 0;
        if let Some((_, pending)) = self.store().groups.get_mut(group) {
            for n in seqs {
                if let Some((at, who)) = pending.get_mut(&n)
                    && who == consumer
                {
                    *at = now;
                    renewed += 1;
                }
            }
        }
        Ok(renewed)
    }

    async fn backlog(&self, group: &str) -> Result<Backlog, QueueError> {
        self.gate()?;
        let store = self.store();
        let Some((cursor, pending)) = store.groups.get(group) else {
            return Ok(Backlog::default());
        };
        let owed = pending
            .keys()
            .filter_map(|n| store.events.get(n))
            .chain(store.events.range(*cursor + 1..).map(|(_, v)| v));
        let mut backlog = Backlog::default();
        for (at, _) in owed {
            backlog.pending += 1;
            backlog.oldest_at = Some(backlog.oldest_at.map_or(*at, |o| o.min(*at)));
        }
        Ok(backlog)
    }

    async fn read(
        &self,
        after: Option<&EventSeq>,
        max: usize,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        self.gate()?;
        let from = match after {
            Some(seq) => parse_seq(seq)?.saturating_add(1),
            None => 0,
        };
        Ok(self
            .store()
            .events
            .range(from..)
            .take(max)
            .map(|(n, (at, e))| stored(*n, *at, e))
            .collect())
    }

    async fn trim(&self, before: Millis, groups: &[String]) -> Result<TrimReport, QueueError> {
        self.gate()?;
        let mut store = self.store();
        let keep_from = groups
            .iter()
            .filter_map(|g| store.groups.get(g))
            .map(|(cursor, pending)| {
                let first = pending.keys().next().copied().unwrap_or(u64::MAX);
                first.min(cursor + 1)
            })
            .min()
            .unwrap_or(u64::MAX);
        let doomed: Vec<u64> = store
            .events
            .range(..keep_from)
            .take_while(|(_, (at, _))| *at < before)
            .map(|(n, _)| *n)
            .collect();
        for n in &doomed {
            store.events.remove(n);
        }
        Ok(TrimReport {
            trimmed: doomed.len() as u64,
            dropped_unacked: 0,
        })
    }
}

#[async_trait]
impl QueueControl for MemoryBackend {
    async fn units(&self, now: Millis) -> Result<Vec<UnitView>, QueueError> {
        self.gate()?;
        let store = self.store();
        Ok(store
            .units
            .values()
            .map(|unit| {
                let state = match store.leases.get(&unit.id) {
                    Some((expiry, _)) if *expiry > now => UnitState::Leased,
                    None if store.held.contains(&unit.id) => UnitState::Held,
                    _ if unit.next_attempt_at <= now => UnitState::Due,
                    _ => UnitState::Deferred,
                };
                UnitView {
                    unit: unit.clone(),
                    state,
                }
            })
            .collect())
    }

    async fn claim(
        &self,
        unit_ids: &[String],
        now: Millis,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        self.gate()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        let mut store = self.store();
        let mut out = Vec::new();
        for id in unit_ids {
            let Some(unit) = store.units.get(id).cloned() else {
                continue;
            };
            if store.leases.get(id).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            store.held.remove(id);
            store.leases.insert(id.clone(), (expires_at, token.clone()));
            out.push(Lease {
                unit,
                token: token.clone(),
                expires_at,
            });
        }
        Ok(out)
    }

    async fn holds(&self) -> Result<Vec<Hold>, QueueError> {
        self.gate()?;
        Ok(self
            .store()
            .holds
            .iter()
            .map(|(domain, since)| Hold {
                domain: domain.clone(),
                since: *since,
            })
            .collect())
    }

    async fn hold(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        self.gate()?;
        let mut store = self.store();
        let store = &mut *store;
        store.holds.entry(domain.to_string()).or_insert(now);
        let mut moved = 0;
        for unit in store.units.values().filter(|u| u.domain == domain) {
            if !store.leases.contains_key(&unit.id) && store.held.insert(unit.id.clone()) {
                moved += 1;
            }
        }
        Ok(moved)
    }

    async fn release(&self, domain: &str, now: Millis) -> Result<u64, QueueError> {
        self.gate()?;
        let mut store = self.store();
        let store = &mut *store;
        let since = store.holds.remove(domain);
        let ids: Vec<String> = store
            .held
            .iter()
            .filter(|id| store.units.get(*id).is_some_and(|u| u.domain == domain))
            .cloned()
            .collect();
        if since.is_none() && ids.is_empty() {
            return Err(QueueError::NotFound(format!("hold on {domain}")));
        }
        for id in &ids {
            store.held.remove(id);
            if let Some(unit) = store.units.get_mut(id) {
                *unit = released(unit, since.unwrap_or(now), now);
            }
        }
        Ok(ids.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{MessageFlags, Reschedule, SettleOp};

    fn message(id: &str, at: Millis) -> NewMessage {
        NewMessage {
            id: id.into(),
            mail_from: "s@e.test".into(),
            recipients: vec!["a@x.org".into()],
            data: b"Subject: t\r\n\r\nbody\r\n".to_vec(),
            sending_domain: "e.test".into(),
            received_at: at,
            flags: MessageFlags::default(),
            tags: Default::default(),
            header_message_id: None,
        }
    }

    #[tokio::test]
    async fn postpone_puts_the_unit_back_without_counting_an_attempt() {
        let q = MemoryBackend::default();
        q.enqueue(message("m", 10), Vec::new()).await.unwrap();
        let lease = q
            .lease(10, 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        q.retry(
            &lease,
            Reschedule {
                recipients: lease.unit.recipients.clone(),
                next_attempt_at: 20,
                last_error: "451 4.7.1 later".into(),
                delay_notified: false,
            },
        )
        .await
        .unwrap();
        let lease = q
            .lease(20, 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        q.settle(&lease, Settlement::only(SettleOp::Postpone { until: 500 }))
            .await
            .unwrap();
        assert!(
            q.lease(499, 1, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty()
        );
        let again = q
            .lease(500, 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(again.unit.attempts, 1);
        assert_eq!(again.unit.last_error.as_deref(), Some("451 4.7.1 later"));
        assert!(matches!(
            q.complete(&lease).await,
            Err(QueueError::LeaseLost(_))
        ));
    }
}
