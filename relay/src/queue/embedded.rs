//! Embedded backend: the queue in one local redb file, for a single relay
//! (the quick start and small installs).
//!
//! Each operation is one redb write transaction, so it is atomic, and a
//! committed transaction with [`Durability::Immediate`] is on disk: an
//! enqueue that returned `Ok` survives a crash. Leases, slots and counters
//! commit without fsync ([`Durability::None`]; the next durable commit
//! carries them): only this process holds leases and slots, so after a
//! crash losing them is exactly right (the units are due again).
//!
//! redb is synchronous: every operation runs on the blocking pool.
//!
//! Tables mirror the Redis layout (see `queue::redis`): message data and
//! unit counts by message id, unit records by unit id, and ordered indexes
//! `(time, id)` for due units, lease expiries and receive times.
//!
//! The event outbox is a table of events by sequence number, written in
//! the same transaction as the queue change they describe, with a cursor
//! and a pending (claimed, unacked) table per consumer group (module
//! `embedded_events`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::embedded_events::{self, append_events};
use super::redis::in_force;
use super::{
    DeliveryUnit, LEASE_DATA_BUDGET, Lease, LeasedUnit, Millis, NewMessage, Queue, QueueError,
    QueueStats, Settlement, SharedState, SuppressionEntry, now_millis, settled_unit,
    suppression_key, units_of,
};
use crate::config::EmbeddedQueue;
use crate::events::Event;

/// Message id -> message bytes.
pub(super) const DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("data");
/// Message id -> units not yet finished.
pub(super) const LEFT: TableDefinition<&str, u64> = TableDefinition::new("left");
/// (received_at, message id): oldest message first.
pub(super) const RECEIVED: TableDefinition<(u64, &str), ()> = TableDefinition::new("received");
/// Unit id -> [`super::DeliveryUnit`] JSON.
pub(super) const UNITS: TableDefinition<&str, &[u8]> = TableDefinition::new("units");
/// (next attempt, unit id) of every unit not leased.
pub(super) const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
/// Unit id -> (lease expiry, token) of every leased unit.
pub(super) const LEASES: TableDefinition<&str, (u64, &str)> = TableDefinition::new("leases");
/// (lease expiry, unit id): leases in expiry order.
pub(super) const LEASE_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("lease_expiry");
/// [`SuppressionEntry::key`] -> [`SuppressionEntry`] JSON.
pub(super) const SUPPRESSION: TableDefinition<&str, &[u8]> = TableDefinition::new("suppression");
/// Counter key -> (total, end of window).
const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
/// (slot key, token) -> expiry.
const SLOTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("slots");
/// Cache key -> (expiry, value).
const VALUES: TableDefinition<&str, (u64, &str)> = TableDefinition::new("values");
/// (next attempt, unit id) of every unit of a held destination (module
/// `embedded_control`); such a unit is in neither `due` nor `leases`.
pub(super) const HELD: TableDefinition<(u64, &str), ()> = TableDefinition::new("held");
/// Held destination -> held since.
pub(super) const HOLDS: TableDefinition<&str, u64> = TableDefinition::new("holds");

/// Expired leases moved back to due per lease call (as in Redis).
const RECLAIM_BATCH: usize = 1000;

/// The embedded queue and shared state. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBackend {
    pub(super) db: Arc<Database>,
    timeout: Duration,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBackend {
    /// Opens (or creates) the database file, creating its directory. Fails
    /// when another process has the file open.
    pub async fn open(config: &EmbeddedQueue, timeout: Duration) -> Result<Self, QueueError> {
        let path = config.path.clone();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, QueueError> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    QueueError::Unavailable(format!("creating {}: {e}", dir.display()))
                })?;
            }
            let db = Database::create(&path).map_err(|e| {
                QueueError::Unavailable(format!("opening queue file {}: {e}", path.display()))
            })?;
            // Create every table once, so readers never meet a missing one.
            let txn = db.begin_write()?;
            txn.open_table(DATA)?;
            txn.open_table(LEFT)?;
            txn.open_table(RECEIVED)?;
            txn.open_table(UNITS)?;
            txn.open_table(DUE)?;
            txn.open_table(LEASES)?;
            txn.open_table(LEASE_EXPIRY)?;
            txn.open_table(SUPPRESSION)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(SLOTS)?;
            embedded_events::create_tables(&txn)?;
            txn.open_table(VALUES)?;
            txn.open_table(HELD)?;
            txn.open_table(HOLDS)?;
            txn.commit()?;
            Ok(db)
        })
        .await
        .map_err(|e| QueueError::Unavailable(format!("queue open task failed: {e}")))??;
        Ok(EmbeddedBackend {
            db: Arc::new(db),
            timeout,
        })
    }

    /// Runs `f` on the blocking pool under the configured timeout. On
    /// timeout the transaction may still commit later, which is what
    /// [`QueueError::Timeout`] warns about.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, QueueError> + Send + 'static,
    {
        let db = self.db.clone();
        let task = tokio::task::spawn_blocking(move || f(&db));
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(QueueError::Unavailable(format!(
                "queue task failed: {join}"
            ))),
            Err(_) => Err(QueueError::Timeout(self.timeout)),
        }
    }
}

/// Removes a leased unit whose lease was taken; the message goes with its
/// last unit.
fn finish_unit(txn: &WriteTransaction, lease: &Lease) -> Result<(), QueueError> {
    txn.open_table(UNITS)?.remove(lease.unit.id.as_str())?;
    let message_id = lease.unit.message_id.as_str();
    let mut left = txn.open_table(LEFT)?;
    let remaining = left
        .get(message_id)?
        .map(|v| v.value())
        .unwrap_or(0)
        .saturating_sub(1);
    if remaining == 0 {
        left.remove(message_id)?;
        txn.open_table(DATA)?.remove(message_id)?;
        txn.open_table(RECEIVED)?
            .remove((lease.unit.received_at, message_id))?;
    } else {
        left.insert(message_id, remaining)?;
    }
    Ok(())
}

/// A message and its unit records, encoded for [`store_message`].
struct Encoded {
    message: NewMessage,
    units: Vec<(String, Millis, Vec<u8>)>,
}

fn encode_message(message: NewMessage) -> Result<Option<Encoded>, QueueError> {
    let units = units_of(&message)
        .iter()
        .map(|u| Ok((u.id.clone(), u.next_attempt_at, encode(u, &u.id)?)))
        .collect::<Result<Vec<_>, QueueError>>()?;
    // Nothing to deliver: storing it would only leave garbage.
    Ok((!units.is_empty()).then_some(Encoded { message, units }))
}

/// Stores a message and its units unless its id is stored already;
/// true when stored.
fn store_message(txn: &WriteTransaction, m: &Encoded) -> Result<bool, QueueError> {
    let id = m.message.id.as_str();
    let mut data = txn.open_table(DATA)?;
    if data.get(id)?.is_some() {
        return Ok(false);
    }
    data.insert(id, m.message.data.as_slice())?;
    txn.open_table(LEFT)?.insert(id, m.units.len() as u64)?;
    txn.open_table(RECEIVED)?
        .insert((m.message.received_at, id), ())?;
    let mut unit_table = txn.open_table(UNITS)?;
    let mut due = txn.open_table(DUE)?;
    for (unit_id, at, json) in &m.units {
        unit_table.insert(unit_id.as_str(), json.as_slice())?;
        due.insert((*at, unit_id.as_str()), ())?;
    }
    Ok(true)
}

/// Checks that `lease` still holds its unit and releases the lease;
/// [`QueueError::LeaseLost`] when another lease took over.
fn take_lease(txn: &WriteTransaction, lease: &Lease) -> Result<(), QueueError> {
    let id = lease.unit.id.as_str();
    let mut leases = txn.open_table(LEASES)?;
    let held = leases.get(id)?.map(|v| {
        let (expiry, token) = v.value();
        (expiry, token == lease.token)
    });
    match held {
        Some((expiry, true)) => {
            leases.remove(id)?;
            txn.open_table(LEASE_EXPIRY)?.remove((expiry, id))?;
            Ok(())
        }
        _ => Err(QueueError::LeaseLost(id.to_string())),
    }
}

/// Keys of an index table `(time, id)` with time <= `now`, at most `max`.
fn due_keys(
    table: &impl ReadableTable<(u64, &'static str), ()>,
    now: Millis,
    max: usize,
) -> Result<Vec<(u64, String)>, QueueError> {
    let mut out = Vec::new();
    for entry in table
        .range::<(u64, &str)>(..(now.saturating_add(1), ""))?
        .take(max)
    {
        let (key, _) = entry?;
        let (at, id) = key.value();
        out.push((at, id.to_string()));
    }
    Ok(out)
}

/// Entries of an index table `(time, id)`: (time <= now, time > now).
fn count_split(
    table: &impl ReadableTable<(u64, &'static str), ()>,
    now: Millis,
) -> Result<(u64, u64), QueueError> {
    let bound = (now.saturating_add(1), "");
    let early = table.range::<(u64, &str)>(..bound)?.count() as u64;
    let total = table.len()?;
    Ok((early, total.saturating_sub(early)))
}

/// Suppression entries as (key, JSON), normalised, encoded before
/// entering the blocking task.
pub(super) fn encode_suppression(
    entries: &[SuppressionEntry],
) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
    entries
        .iter()
        .map(|e| {
            let e = e.clone().normalised();
            let key = e.key();
            let json = encode(&e, &key)?;
            Ok((key, json))
        })
        .collect()
}

/// Writes encoded suppression entries in `txn`.
pub(super) fn store_suppression(
    txn: &redb::WriteTransaction,
    entries: &[(String, Vec<u8>)],
) -> Result<(), QueueError> {
    let mut table = txn.open_table(SUPPRESSION)?;
    for (key, json) in entries {
        table.insert(key.as_str(), json.as_slice())?;
    }
    Ok(())
}

pub(super) fn encode<T: serde::Serialize>(value: &T, key: &str) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(value).map_err(|e| QueueError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    key: &str,
) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(super) fn relaxed(txn: &mut WriteTransaction) -> Result<(), QueueError> {
    txn.set_durability(Durability::None)
        .map_err(|e| QueueError::Unavailable(e.to_string()))
}

/// A settlement encoded for the file, applied inside a write transaction.
struct PreparedSettle {
    lease: Lease,
    retry: Option<(Millis, Vec<u8>)>,
    messages: Vec<Encoded>,
    events: Vec<Vec<u8>>,
    suppress: Vec<(String, Vec<u8>)>,
}

impl PreparedSettle {
    fn new(lease: &Lease, settlement: &Settlement) -> Result<PreparedSettle, QueueError> {
        let retry = match settled_unit(&lease.unit, settlement.op.clone(), now_millis()) {
            Some(unit) => Some((unit.next_attempt_at, encode(&unit, &unit.id)?)),
            None => None,
        };
        let messages = settlement
            .enqueue
            .iter()
            .cloned()
            .filter_map(|m| encode_message(m).transpose())
            .collect::<Result<Vec<_>, QueueError>>()?;
        Ok(PreparedSettle {
            lease: lease.clone(),
            retry,
            messages,
            events: embedded_events::encode_events(&settlement.events)?,
            suppress: encode_suppression(&settlement.suppress)?,
        })
    }

    /// Writes the settlement; [`QueueError::LeaseLost`] before writing
    /// anything when the lease is not ours.
    fn apply(&self, txn: &WriteTransaction) -> Result<(), QueueError> {
        let lease = &self.lease;
        take_lease(txn, lease)?;
        match &self.retry {
            Some((at, json)) => {
                let id = lease.unit.id.as_str();
                txn.open_table(UNITS)?.insert(id, json.as_slice())?;
                txn.open_table(DUE)?.insert((*at, id), ())?;
            }
            None => finish_unit(txn, lease)?,
        }
        for m in &self.messages {
            store_message(txn, m)?;
        }
        append_events(txn, &self.events, now_millis())?;
        store_suppression(txn, &self.suppress)?;
        Ok(())
    }
}

/// Reclaims expired leases and leases up to `max` due units inside `txn`.
fn lease_in(
    txn: &WriteTransaction,
    now: Millis,
    max: usize,
    expires_at: Millis,
    token: &str,
) -> Result<Vec<Lease>, QueueError> {
    let mut out = Vec::new();
    {
        let mut due = txn.open_table(DUE)?;
        let mut leases = txn.open_table(LEASES)?;
        let mut expiry = txn.open_table(LEASE_EXPIRY)?;
        for (at, id) in due_keys(&expiry, now, RECLAIM_BATCH)? {
            expiry.remove((at, id.as_str()))?;
            leases.remove(id.as_str())?;
            due.insert((at, id.as_str()), ())?;
        }
        let units = txn.open_table(UNITS)?;
        let holds = txn.open_table(HOLDS)?;
        let mut held = txn.open_table(HELD)?;
        let holding = !holds.is_empty()?;
        for (at, id) in due_keys(&due, now, max)? {
            due.remove((at, id.as_str()))?;
            let Some(json) = units.get(id.as_str())? else {
                continue;
            };
            let unit = match decode::<DeliveryUnit>(json.value(), &id) {
                Ok(unit) => unit,
                Err(error) => {
                    // As in Redis: one bad record must not stall
                    // the rest; it stays leased until expiry.
                    tracing::error!(%error, "undecodable unit record skipped");
                    leases.insert(id.as_str(), (expires_at, ""))?;
                    expiry.insert((expires_at, id.as_str()), ())?;
                    continue;
                }
            };
            // A held destination's unit waits in `held` instead
            // (see `queue::control`).
            if holding && holds.get(unit.domain.as_str())?.is_some() {
                held.insert((at, id.as_str()), ())?;
                continue;
            }
            leases.insert(id.as_str(), (expires_at, token))?;
            expiry.insert((expires_at, id.as_str()), ())?;
            out.push(Lease {
                unit,
                token: token.to_string(),
                expires_at,
            });
        }
    }
    Ok(out)
}

#[async_trait]
impl Queue for EmbeddedBackend {
    async fn enqueue(&self, message: NewMessage, events: Vec<Event>) -> Result<(), QueueError> {
        let Some(encoded) = encode_message(message)? else {
            return Ok(());
        };
        let events = embedded_events::encode_events(&events)?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            if !store_message(&txn, &encoded)? {
                // Enqueued before (a retry after a timeout): stored once,
                // events included. Dropping the transaction aborts it.
                return Ok(());
            }
            append_events(&txn, &events, now_millis())?;
            txn.commit()?;
            Ok(())
        })
        .await
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
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        self.run(move |db| {
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            let out = lease_in(&txn, now, max, expires_at, &token)?;
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    async fn lease_with_data(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<LeasedUnit>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        self.run(move |db| {
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            let leases = lease_in(&txn, now, max, expires_at, &token)?;
            // The bytes from the same transaction: one trip to the file.
            let mut out = Vec::with_capacity(leases.len());
            {
                let data = txn.open_table(DATA)?;
                let mut read: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
                let mut budget = LEASE_DATA_BUDGET;
                for lease in leases {
                    let id = lease.unit.message_id.clone();
                    let bytes = match read.get(&id) {
                        Some(bytes) => Some(bytes.clone()),
                        None if budget > 0 => match data.get(id.as_str())? {
                            Some(v) => {
                                let bytes = Arc::new(v.value().to_vec());
                                budget = budget.saturating_sub(bytes.len());
                                read.insert(id, bytes.clone());
                                Some(bytes)
                            }
                            None => None,
                        },
                        None => None,
                    };
                    out.push(LeasedUnit { lease, data: bytes });
                }
            }
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: Millis,
        lease_for: Duration,
    ) -> Result<Lease, QueueError> {
        let lease = lease.clone();
        let expires_at = now.saturating_add(lease_for.as_millis() as u64);
        self.run(move |db| {
            let mut txn = db.begin_write()?;
            // Like a lease: losing it in a crash only makes the unit due.
            relaxed(&mut txn)?;
            {
                let id = lease.unit.id.as_str();
                let mut leases = txn.open_table(LEASES)?;
                let expiry = leases.get(id)?.and_then(|v| {
                    let (expiry, token) = v.value();
                    (token == lease.token).then_some(expiry)
                });
                // Expired at `now` as in `lease`: an expiry <= now is due.
                let Some(expiry) = expiry.filter(|&at| at > now) else {
                    return Err(QueueError::LeaseLost(id.to_string()));
                };
                leases.insert(id, (expires_at, lease.token.as_str()))?;
                let mut index = txn.open_table(LEASE_EXPIRY)?;
                index.remove((expiry, id))?;
                index.insert((expires_at, id), ())?;
            }
            txn.commit()?;
            Ok(Lease {
                expires_at,
                ..lease
            })
        })
        .await
    }

    async fn message_data(&self, message_id: &str) -> Result<Vec<u8>, QueueError> {
        let id = message_id.to_string();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let data = txn.open_table(DATA)?;
            let value = data.get(id.as_str())?;
            value
                .map(|v| v.value().to_vec())
                .ok_or(QueueError::NotFound(id))
        })
        .await
    }

    async fn settle(&self, lease: &Lease, settlement: Settlement) -> Result<(), QueueError> {
        let item = PreparedSettle::new(lease, &settlement)?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            item.apply(&txn)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn settle_many(&self, batch: &[(Lease, Settlement)]) -> Vec<Result<(), QueueError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        // Items that cannot be encoded fail alone; the rest share one
        // transaction, so one commit (one fsync) settles the batch.
        let mut results: Vec<Option<Result<(), QueueError>>> = Vec::with_capacity(batch.len());
        let mut items = Vec::new();
        for (i, (lease, settlement)) in batch.iter().enumerate() {
            match PreparedSettle::new(lease, settlement) {
                Ok(item) => {
                    items.push((i, item));
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let applied = self
            .run(move |db| {
                let txn = db.begin_write()?;
                let mut done = Vec::with_capacity(items.len());
                for (i, item) in &items {
                    // A lost lease is found before anything of the item is
                    // written, so it leaves the transaction clean.
                    match item.apply(&txn) {
                        Ok(()) => done.push((*i, None)),
                        Err(QueueError::LeaseLost(id)) => done.push((*i, Some(id))),
                        Err(error) => return Err(error),
                    }
                }
                txn.commit()?;
                Ok(done)
            })
            .await;
        match applied {
            Ok(done) => {
                for (i, lost) in done {
                    results[i] = Some(match lost {
                        None => Ok(()),
                        Some(id) => Err(QueueError::LeaseLost(id)),
                    });
                }
            }
            Err(error) => {
                // Nothing of the transaction was stored.
                let text = error.to_string();
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(match &error {
                        QueueError::Timeout(d) => QueueError::Timeout(*d),
                        _ => QueueError::Unavailable(text.clone()),
                    }));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(QueueError::Unavailable("not settled".into()))))
            .collect()
    }

    async fn stats(&self, now: Millis) -> Result<QueueStats, QueueError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let (due, deferred) = count_split(&txn.open_table(DUE)?, now)?;
            let (expired, leased) = count_split(&txn.open_table(LEASE_EXPIRY)?, now)?;
            let oldest = txn.open_table(RECEIVED)?.first()?.map(|(k, _)| k.value().0);
            Ok(QueueStats {
                due: due + expired,
                deferred,
                leased,
                messages: txn.open_table(LEFT)?.len()?,
                oldest_received_at: oldest,
                held: txn.open_table(HELD)?.len()?,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.run(|db| {
            db.begin_read()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SharedState for EmbeddedBackend {
    async fn suppress(&self, entry: SuppressionEntry) -> Result<(), QueueError> {
        let encoded = encode_suppression(std::slice::from_ref(&entry))?;
        self.run(move |db| {
            let txn = db.begin_write()?;
            store_suppression(&txn, &encoded)?;
            txn.commit()?;
            Ok(())
        })
        .await
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
        let sending_domain = sending_domain.to_string();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SUPPRESSION)?;
            for key in &keys {
                if let Some(json) = table.get(key.as_str())? {
                    let entry: SuppressionEntry = decode(json.value(), key)?;
                    if entry.applies(&sending_domain, now) {
                        return Ok(Some(entry));
                    }
                }
            }
            Ok(None)
        })
        .await
    }

    async fn unsuppress(&self, address: &str, scope: Option<&str>) -> Result<bool, QueueError> {
        let key = suppression_key(address, scope);
        self.run(move |db| {
            let txn = db.begin_write()?;
            let removed = txn.open_table(SUPPRESSION)?.remove(key.as_str())?.is_some();
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn list_suppressed(&self, now: Millis) -> Result<Vec<SuppressionEntry>, QueueError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(SUPPRESSION)?.iter()? {
                let (key, json) = entry?;
                let entry: SuppressionEntry = decode(json.value(), key.value())?;
                if in_force(&entry, now) {
                    out.push(entry);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn incr_counter(&self, key: &str, by: u64, window: Duration) -> Result<u64, QueueError> {
        let key = key.to_string();
        self.run(move |db| {
            let now = now_millis();
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            let total = {
                let mut table = txn.open_table(COUNTERS)?;
                let current = table.get(key.as_str())?.map(|v| v.value());
                let (total, ends) = match current {
                    Some((total, ends)) if ends > now => (total.saturating_add(by), ends),
                    _ => (
                        by,
                        now.saturating_add(window.as_millis() as u64).max(now + 1),
                    ),
                };
                table.insert(key.as_str(), (total, ends))?;
                total
            };
            txn.commit()?;
            Ok(total)
        })
        .await
    }

    async fn counter(&self, key: &str) -> Result<u64, QueueError> {
        let key = key.to_string();
        self.run(move |db| {
            let now = now_millis();
            let txn = db.begin_read()?;
            let current = txn
                .open_table(COUNTERS)?
                .get(key.as_str())?
                .map(|v| v.value());
            Ok(match current {
                Some((total, ends)) if ends > now => total,
                _ => 0,
            })
        })
        .await
    }

    async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, QueueError> {
        let keys = keys.to_vec();
        self.run(move |db| {
            let now = now_millis();
            let txn = db.begin_read()?;
            let table = txn.open_table(COUNTERS)?;
            let mut out = Vec::with_capacity(keys.len());
            for key in &keys {
                out.push(match table.get(key.as_str())?.map(|v| v.value()) {
                    Some((total, ends)) if ends > now => total,
                    _ => 0,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn acquire_slot(
        &self,
        key: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<Option<String>, QueueError> {
        let key = key.to_string();
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.run(move |db| {
            let now = now_millis();
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            let taken = {
                let mut table = txn.open_table(SLOTS)?;
                let mut held = 0u32;
                let mut expired = Vec::new();
                for entry in table.range::<(&str, &str)>((key.as_str(), "")..)? {
                    let (k, expiry) = entry?;
                    let (slot_key, slot_token) = k.value();
                    if slot_key != key {
                        break;
                    }
                    if expiry.value() <= now {
                        expired.push(slot_token.to_string());
                    } else {
                        held += 1;
                    }
                }
                for t in &expired {
                    table.remove((key.as_str(), t.as_str()))?;
                }
                if held < limit {
                    let expiry = now.saturating_add(ttl.as_millis() as u64);
                    table.insert((key.as_str(), token.as_str()), expiry)?;
                    true
                } else {
                    false
                }
            };
            txn.commit()?;
            Ok(taken.then_some(token))
        })
        .await
    }

    async fn renew_slot(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        let key = key.to_string();
        let token = token.to_string();
        self.run(move |db| {
            let now = now_millis();
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            let renewed = {
                let mut table = txn.open_table(SLOTS)?;
                let expiry = table
                    .get((key.as_str(), token.as_str()))?
                    .map(|e| e.value());
                match expiry {
                    Some(expiry) if expiry > now => {
                        let expiry = now.saturating_add(ttl.as_millis() as u64);
                        table.insert((key.as_str(), token.as_str()), expiry)?;
                        true
                    }
                    Some(_) => {
                        table.remove((key.as_str(), token.as_str()))?;
                        false
                    }
                    None => false,
                }
            };
            txn.commit()?;
            Ok(renewed)
        })
        .await
    }

    async fn release_slot(&self, key: &str, token: &str) -> Result<(), QueueError> {
        let key = key.to_string();
        let token = token.to_string();
        self.run(move |db| {
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            txn.open_table(SLOTS)?
                .remove((key.as_str(), token.as_str()))?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_value(&self, key: &str) -> Result<Option<String>, QueueError> {
        let key = key.to_string();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(VALUES)?;
            let Some(entry) = table.get(key.as_str())? else {
                return Ok(None);
            };
            let (expires, value) = entry.value();
            Ok((expires > now_millis()).then(|| value.to_string()))
        })
        .await
    }

    async fn set_value(&self, key: &str, value: &str, ttl: Duration) -> Result<(), QueueError> {
        let key = key.to_string();
        let value = value.to_string();
        self.run(move |db| {
            let expires = now_millis().saturating_add(ttl.as_millis() as u64).max(1);
            let mut txn = db.begin_write()?;
            relaxed(&mut txn)?;
            {
                let mut table = txn.open_table(VALUES)?;
                // Drop expired entries on the way, so the table stays small.
                let now = now_millis();
                table.retain(|_, (at, _)| at > now)?;
                table.insert(key.as_str(), (expires, value.as_str()))?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// redb failures: the file cannot be used right now.
macro_rules! unavailable_from {
    ($($t:ty),*) => {$(
        impl From<$t> for QueueError {
            fn from(e: $t) -> Self {
                QueueError::Unavailable(format!("embedded queue: {e}"))
            }
        }
    )*};
}
unavailable_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
