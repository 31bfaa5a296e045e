//! The queue: where a message waits between "250 accepted" and delivery.
//!
//! Contract (both backends, one conformance suite in `tests/`):
//! - [`Queue::enqueue`] returns only once the message is durable (Redis
//!   acknowledged, plus `WAIT n` when configured; the embedded file
//!   committed). Callers reply 250 only after it returns `Ok`.
//! - A message is stored once and split into [`DeliveryUnit`]s, one per
//!   destination domain with that domain's recipients, each due at once.
//! - Workers [`Queue::lease`] due units; a lease that is not completed,
//!   retried or failed before it expires makes the unit due again
//!   (at-least-once). Completing a unit whose lease was lost is an error,
//!   so a slow worker cannot clobber the one that took over.
//! - Every state change is atomic: a crash leaves the whole change or none.
//!   That includes the events it produces (the outbox, [`EventLog`]): the
//!   `accepted` events are written by [`Queue::enqueue`], delivery outcomes,
//!   DSNs and suppression entries by [`Queue::settle`], each in the same
//!   step as the change they describe.
//!
//! [`SharedState`] holds what all relay pods must agree on besides the
//! queue: the suppression list, counters (AUTH throttle, rate limits,
//! quotas) and per-destination connection slots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod control;
pub mod embedded;
mod embedded_control;
mod embedded_events;
pub mod memory;
pub mod redis;

use crate::config::QueueConfig;
use crate::events::{Event, EventLog};
pub use control::{Hold, QueueControl, UnitState, UnitView};

/// An opened queue backend: the queue and the shared state, both served
/// by the same store. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    /// Messages and their delivery units.
    pub queue: Arc<dyn Queue>,
    /// Suppression list, counters and slots.
    pub state: Arc<dyn SharedState>,
    /// The event outbox.
    pub events: Arc<dyn EventLog>,
    /// Inspection and operator actions (`petrel-relay queue ...`).
    pub control: Arc<dyn QueueControl>,
}

impl Backend {
    /// One store serving every role.
    pub fn of<B: Queue + SharedState + EventLog + QueueControl>(backend: Arc<B>) -> Backend {
        Backend {
            queue: backend.clone(),
            state: backend.clone(),
            events: backend.clone(),
            control: backend,
        }
    }
}

/// Opens the backend `config` names (exactly one of `redis` and
/// `embedded`). Redis connects lazily, so a relay starts while Redis is
/// down and reports not ready through [`Queue::ping`]; the embedded file
/// is opened (and created) here.
pub async fn open(config: &QueueConfig) -> Result<Backend, QueueError> {
    match (&config.redis, &config.embedded) {
        (Some(redis), None) => {
            let backend = Arc::new(redis::RedisBackend::open(redis, config.timeout.get()).await?);
            Ok(Backend::of(backend))
        }
        (None, Some(embedded)) => {
            let backend =
                Arc::new(embedded::EmbeddedBackend::open(embedded, config.timeout.get()).await?);
            Ok(Backend::of(backend))
        }
        _ => Err(QueueError::Unavailable(
            "queue config needs exactly one of redis and embedded".into(),
        )),
    }
}

/// Milliseconds since the Unix epoch: the queue's only notion of time, so
/// tests and backends agree on it without sharing a clock object.
pub type Millis = u64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    to_millis(SystemTime::now())
}

/// A [`SystemTime`] in [`Millis`] (0 before the epoch).
pub fn to_millis(t: SystemTime) -> Millis {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the inbound side hands to the queue: one accepted, signed message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Queue id, unique per accepted message (also in logs and Received).
    pub id: String,
    /// Envelope sender; empty for the null sender `<>` (DSNs).
    pub mail_from: String,
    /// Envelope recipients, in the order given.
    pub recipients: Vec<String>,
    /// The message as it will be sent: headers (DKIM-Signature included)
    /// and body, CRLF line endings, not dot-stuffed.
    pub data: Vec<u8>,
    /// The configured sending domain the message was accepted for (the
    /// MAIL FROM domain); labels metrics and rate limits. For a DSN, the
    /// domain of the message that bounced.
    pub sending_domain: String,
    /// When the relay accepted it; the max queue lifetime counts from here.
    pub received_at: Millis,
    /// Properties the outbound side must negotiate.
    pub flags: MessageFlags,
    /// The app's tags (HTTP `tags`, SMTP `X-Petrel-Tags`), copied into
    /// every event of the message.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The `Message-ID` header, angle brackets removed, for events.
    #[serde(default)]
    pub header_message_id: Option<String>,
}

/// Properties of a message that outbound delivery must honour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageFlags {
    /// Needs SMTPUTF8 (UTF-8 in addresses or headers).
    pub smtputf8: bool,
    /// Declared BODY=8BITMIME.
    pub eight_bit: bool,
    /// The message is itself a DSN: never bounce it again.
    pub is_dsn: bool,
    /// One delivery unit per recipient rather than per destination domain:
    /// the domain sends with a VERP return path (`b+<token>@<returnPathDomain>`),
    /// which names one recipient.
    #[serde(default)]
    pub per_recipient: bool,
    /// Sent with `MAIL FROM:<..> REQUIRETLS` (RFC 8689): deliver only over
    /// verified TLS to servers that offer REQUIRETLS, else bounce (5.7.30).
    #[serde(default)]
    pub require_tls: bool,
    /// Carries `TLS-Required: No` (RFC 8689 section 5) without REQUIRETLS:
    /// the recipient domain's TLS policy (MTA-STS, DANE, `verified`) does
    /// not stop delivery; TLS is still used when offered.
    #[serde(default)]
    pub tls_optional: bool,
}

/// Part of a message bound for one destination domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryUnit {
    /// Unique id of the unit (message id + destination).
    pub id: String,
    /// The message this unit delivers.
    pub message_id: String,
    /// Destination domain, lower-cased.
    pub domain: String,
    /// Recipients still to deliver in this unit.
    pub recipients: Vec<String>,
    /// Envelope sender (copied from the message).
    pub mail_from: String,
    /// Sending domain (copied from the message).
    pub sending_domain: String,
    /// When the message was accepted.
    pub received_at: Millis,
    /// Message flags (copied from the message).
    pub flags: MessageFlags,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the unit is due next.
    pub next_attempt_at: Millis,
    /// The last temporary failure, for DSNs and `queue list`.
    pub last_error: Option<String>,
    /// A "delayed" DSN has been sent for this unit.
    pub delay_notified: bool,
    /// Tags (copied from the message).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The `Message-ID` header (copied from the message).
    #[serde(default)]
    pub header_message_id: Option<String>,
    /// The last [`HISTORY_LEN`] failed attempts, oldest first, for
    /// `queue show`; written by the same settlement that counts them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
    /// Time spent held (`queue hold`), added to the queue lifetime so a
    /// hold does not make mail expire.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_ms: Millis,
}

fn is_zero(n: &Millis) -> bool {
    *n == 0
}

/// Failed attempts kept per unit.
pub const HISTORY_LEN: usize = 10;

/// One failed attempt of a unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// When it was settled.
    pub at: Millis,
    /// The reply (or local reason) it failed with.
    pub reply: String,
}

impl DeliveryUnit {
    /// Where the queue lifetime counts from: acceptance, moved on by the
    /// time the unit spent held.
    pub fn lifetime_start(&self) -> Millis {
        self.received_at.saturating_add(self.held_ms)
    }
}

/// A unit held by one worker until `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The unit, as it was when leased.
    pub unit: DeliveryUnit,
    /// Proves this worker still owns the unit.
    pub token: String,
    /// After this the unit is due again for any worker.
    pub expires_at: Millis,
}

/// A leased unit with its message's bytes, read in the same round trip
/// as the lease ([`Queue::lease_with_data`]). Units of one message share
/// one copy of the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasedUnit {
    /// The lease.
    pub lease: Lease,
    /// The message bytes; `None` when the backend left them out (the
    /// batch's byte budget was spent, or the message could not be read):
    /// read them with [`Queue::message_data`] then.
    pub data: Option<Arc<Vec<u8>>>,
}

/// Most message bytes one [`Queue::lease_with_data`] call returns; the
/// bodies past it are left to [`Queue::message_data`], so a batch of
/// large messages cannot balloon memory.
pub const LEASE_DATA_BUDGET: usize = 16 * 1024 * 1024;

/// A temporary failure: what to keep and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reschedule {
    /// Recipients still to deliver (those delivered or bounced removed).
    pub recipients: Vec<String>,
    /// When to try again.
    pub next_attempt_at: Millis,
    /// The failure, for a later DSN.
    pub last_error: String,
    /// Set once a "delayed" DSN went out, so it goes out only once.
    pub delay_notified: bool,
}

/// How a lease ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOp {
    /// Every recipient was delivered (or dropped): the unit is done.
    Complete,
    /// Some recipients are left: try them again later. With no
    /// recipients left it finishes the unit like `Complete`.
    Retry(Reschedule),
    /// Every recipient left failed for good: the unit is done.
    Fail,
    /// Puts the unit back untouched, due at `until`: not an attempt
    /// (`attempts`, `last_error` and `delay_notified` stay as they were)
    /// and no expiry check, since nothing was tried. For units the worker
    /// leased but must not send yet: a paused sending domain, a
    /// rate-limited destination.
    Postpone {
        /// When the unit is due again.
        until: Millis,
    },
}

/// The unit record a settlement stores back in the queue, or `None` when
/// the settlement finishes the unit. One decision for every backend, so
/// they cannot disagree on what a retry or a postponement keeps.
pub(crate) fn settled_unit(unit: &DeliveryUnit, op: SettleOp, now: Millis) -> Option<DeliveryUnit> {
    match op {
        SettleOp::Retry(r) if !r.recipients.is_empty() => {
            let mut next = rescheduled(unit, r);
            next.history.push(AttemptRecord {
                at: now,
                reply: next.last_error.clone().unwrap_or_default(),
            });
            let excess = next.history.len().saturating_sub(HISTORY_LEN);
            next.history.drain(..excess);
            Some(next)
        }
        SettleOp::Postpone { until } => Some(DeliveryUnit {
            next_attempt_at: until,
            ..unit.clone()
        }),
        // A retry with nobody left finishes the unit.
        SettleOp::Retry(_) | SettleOp::Complete | SettleOp::Fail => None,
    }
}

/// The unit after a temporary failure: one more attempt, the remaining
/// recipients, the failure, and the delay notice kept once sent.
pub(crate) fn rescheduled(unit: &DeliveryUnit, r: Reschedule) -> DeliveryUnit {
    DeliveryUnit {
        recipients: r.recipients,
        attempts: unit.attempts.saturating_add(1),
        next_attempt_at: r.next_attempt_at,
        last_error: Some(r.last_error),
        delay_notified: unit.delay_notified || r.delay_notified,
        ..unit.clone()
    }
}

/// Everything one delivery attempt changes, applied atomically by
/// [`Queue::settle`]: the unit's fate, the DSNs it produced, the events
/// describing it, and the suppression entries of hard bounces. Either all
/// of it is stored or none, so a failed DSN can no longer leave bounced
/// recipients to be delivered again, and a retry after a failure never
/// writes a bounce's suppression or events twice.
#[derive(Clone, Debug, PartialEq)]
pub struct Settlement {
    /// What happens to the unit.
    pub op: SettleOp,
    /// Messages to enqueue with it (DSNs), each stored once by id.
    pub enqueue: Vec<NewMessage>,
    /// Events to append to the outbox.
    pub events: Vec<Event>,
    /// Suppression entries to add or replace.
    pub suppress: Vec<SuppressionEntry>,
}

impl Settlement {
    /// Just `op`, with nothing else to write.
    pub fn only(op: SettleOp) -> Settlement {
        Settlement {
            op,
            enqueue: Vec::new(),
            events: Vec::new(),
            suppress: Vec::new(),
        }
    }
}

/// Queue depth by state, for metrics and readiness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Units due now and not leased.
    pub due: u64,
    /// Units waiting for a later attempt.
    pub deferred: u64,
    /// Units leased by a worker.
    pub leased: u64,
    /// Messages stored.
    pub messages: u64,
    /// Accept time of the oldest stored message, if any.
    pub oldest_received_at: Option<Millis>,
    /// Units of held destinations (`queue hold`), in none of the above.
    pub held: u64,
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The backend cannot be reached or answered with an error; the caller
    /// should treat the operation as not done (451 for a client).
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time; the operation may or may not
    /// have happened, so the caller must not promise anything.
    #[error("queue backend timed out after {0:?}")]
    Timeout(Duration),
    /// Fewer replicas than `waitReplicas` acknowledged the write.
    #[error("only {acked} of {wanted} replicas acknowledged the write")]
    NotReplicated {
        /// Replicas that acknowledged.
        acked: u32,
        /// Replicas required.
        wanted: u32,
    },
    /// The lease expired and another worker may own the unit now.
    #[error("lease on unit {0} was lost")]
    LeaseLost(String),
    /// The message or unit is not in the queue.
    #[error("{0} not found in the queue")]
    NotFound(String),
    /// Stored data could not be decoded.
    #[error("corrupt queue entry {key}: {reason}")]
    Corrupt {
        /// The key or record.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

/// The message queue shared by inbound (enqueue) and delivery (the rest).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores the message and its delivery units, all due now. Durable when
    /// it returns `Ok`; on `Err` nothing of the message is visible, except
    /// after [`QueueError::Timeout`], when it may have been stored (the
    /// client retries on 451, so it may be delivered twice: SMTP is
    /// at-least-once). Enqueueing an id already stored is a no-op `Ok`,
    /// so it is never stored twice under one id. `events` (the `accepted`
    /// ones) are appended to the outbox in the same atomic step, and only
    /// when the message is stored.
    async fn enqueue(&self, message: NewMessage, events: Vec<Event>) -> Result<(), QueueError>;

    /// Leases up to `max` units due at `now` for `lease_for`.
    async fn lease(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<Lease>, QueueError>;

    /// Extends a lease to `now + lease_for`, so a delivery slower than one
    /// lease is not taken over and repeated by another worker. Returns the
    /// lease with its new `expires_at`. Atomic; [`QueueError::LeaseLost`]
    /// when `lease`'s token no longer owns the unit or the lease has
    /// expired at `now` (another worker may have taken it over already).
    async fn renew(
        &self,
        lease: &Lease,
        now: Millis,
        lease_for: Duration,
    ) -> Result<Lease, QueueError>;

    /// The stored message bytes.
    async fn message_data(&self, message_id: &str) -> Result<Vec<u8>, QueueError>;

    /// Ends (or reschedules) a leased unit and stores what came of it, all
    /// in one atomic step: [`Settlement`]. [`QueueError::LeaseLost`] (and
    /// nothing written) when `lease` no longer owns the unit.
    ///
    /// `Complete` and `Fail` remove the unit; the message is deleted with
    /// its last unit. `Retry` makes it due again at the given time, counts
    /// one attempt (`attempts + 1`), keeps `delay_notified` once set, and
    /// with no recipients left finishes the unit like `Complete`.
    /// `Postpone` makes it due again at `until` and changes nothing else.
    async fn settle(&self, lease: &Lease, settlement: Settlement) -> Result<(), QueueError>;

    /// Leases like [`Queue::lease`] and returns each unit with its
    /// message's bytes (up to [`LEASE_DATA_BUDGET`] in all), so a worker
    /// needs no second round trip per message. The default reads the
    /// bytes one message at a time; backends override it to do both in
    /// one step.
    async fn lease_with_data(
        &self,
        now: Millis,
        max: usize,
        lease_for: Duration,
    ) -> Result<Vec<LeasedUnit>, QueueError> {
        let leases = self.lease(now, max, lease_for).await?;
        let mut read: BTreeMap<String, Arc<Vec<u8>>> = BTreeMap::new();
        let mut budget = LEASE_DATA_BUDGET;
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let id = &lease.unit.message_id;
            let data = match read.get(id) {
                Some(data) => Some(data.clone()),
                None if budget > 0 => match self.message_data(id).await {
                    Ok(bytes) => {
                        budget = budget.saturating_sub(bytes.len());
                        let bytes = Arc::new(bytes);
                        read.insert(id.clone(), bytes.clone());
                        Some(bytes)
                    }
                    // Left to the caller, who reads (and handles) it again.
                    Err(_) => None,
                },
                None => None,
            };
            out.push(LeasedUnit { lease, data });
        }
        Ok(out)
    }

    /// Settles several leases, each exactly like [`Queue::settle`] (each
    /// atomic on its own, one result per lease in order). The default
    /// settles them one by one; backends override it to need fewer round
    /// trips.
    async fn settle_many(&self, batch: &[(Lease, Settlement)]) -> Vec<Result<(), QueueError>> {
        let mut out = Vec::with_capacity(batch.len());
        for (lease, settlement) in batch {
            out.push(self.settle(lease, settlement.clone()).await);
        }
        out
    }

    /// The unit is delivered: [`Queue::settle`] with nothing else to store.
    async fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        self.settle(lease, Settlement::only(SettleOp::Complete))
            .await
    }

    /// The unit failed for now: [`Queue::settle`] with `Retry` only.
    async fn retry(&self, lease: &Lease, reschedule: Reschedule) -> Result<(), QueueError> {
        self.settle(lease, Settlement::only(SettleOp::Retry(reschedule)))
            .await
    }

    /// The unit failed for good: [`Queue::settle`] with `Fail` only.
    async fn fail(&self, lease: &Lease) -> Result<(), QueueError> {
        self.settle(lease, Settlement::only(SettleOp::Fail)).await
    }

    /// Depth by state.
    async fn stats(&self, now: Millis) -> Result<QueueStats, QueueError>;

    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), QueueError>;
}

/// Why an address is suppressed. Lower-case in JSON and on the command
/// line (`bounce`, `complaint`, `unsubscribe`, `manual`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuppressionReason {
    /// A permanent failure: at delivery, or a DSN that came back later.
    /// Entries stored before reasons were typed say `hard-bounce`.
    #[serde(alias = "hard-bounce")]
    Bounce,
    /// A spam complaint (an ARF report from a feedback loop).
    Complaint,
    /// The recipient unsubscribed (one-click or mailto); scoped to the
    /// sending domain.
    Unsubscribe,
    /// Added by hand (`petrel-relay suppression add`).
    Manual,
}

impl SuppressionReason {
    /// Every reason, in declaration order.
    pub const ALL: [SuppressionReason; 4] = [
        SuppressionReason::Bounce,
        SuppressionReason::Complaint,
        SuppressionReason::Unsubscribe,
        SuppressionReason::Manual,
    ];

    /// The JSON and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::Bounce => "bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Unsubscribe => "unsubscribe",
            SuppressionReason::Manual => "manual",
        }
    }
}

impl std::fmt::Display for SuppressionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SuppressionReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "hard-bounce" {
            return Ok(SuppressionReason::Bounce);
        }
        SuppressionReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown suppression reason {s:?} (expected bounce, complaint, unsubscribe or manual)")
            })
    }
}

/// A suppressed recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredSuppression")]
pub struct SuppressionEntry {
    /// The address, lower-cased.
    pub address: String,
    /// Why.
    pub reason: SuppressionReason,
    /// The sending domain it applies to; every domain when absent
    /// (bounces, complaints and manual entries; unsubscribes are scoped).
    #[serde(default)]
    pub scope: Option<String>,
    /// The details of why: the remote server's reply or diagnostic, the
    /// feedback type of a complaint, how an unsubscribe came, a note.
    pub remote_reply: Option<String>,
    /// When it was added.
    pub created_at: Millis,
    /// When it stops applying; never when absent.
    pub expires_at: Option<Millis>,
}

impl SuppressionEntry {
    /// The key it is stored under: the address for an entry that applies
    /// to every domain (as before scopes existed, so old entries keep
    /// their key), `address/domain` for a scoped one. A domain never holds
    /// a `/`, so the two kinds never share a key.
    pub fn key(&self) -> String {
        suppression_key(&self.address, self.scope.as_deref())
    }

    /// Whether the entry applies to mail from `sending_domain` at `now`.
    pub fn applies(&self, sending_domain: &str, now: Millis) -> bool {
        self.expires_at.is_none_or(|at| at > now)
            && self
                .scope
                .as_deref()
                .is_none_or(|s| s.eq_ignore_ascii_case(sending_domain))
    }

    /// The same entry with address and scope lower-cased, as stored.
    pub fn normalised(mut self) -> SuppressionEntry {
        self.address = self.address.trim().to_lowercase();
        self.scope = self.scope.map(|s| s.trim().to_ascii_lowercase());
        self
    }
}

/// Storage key of the entry for `address` in `scope` (see
/// [`SuppressionEntry::key`]); both lower-cased.
pub fn suppression_key(address: &str, scope: Option<&str>) -> String {
    let address = address.trim().to_lowercase();
    match scope {
        None => address,
        Some(domain) => format!("{address}/{}", domain.trim().to_ascii_lowercase()),
    }
}

/// A suppression entry as stored by any version: `reason` was free text
/// (`hard-bounce`, `manual` or whatever `suppression add --reason` was
/// given) before reasons were typed. Unknown text decodes as `manual`
/// with the text kept as the details, so old lists still load.
#[derive(Deserialize)]
struct StoredSuppression {
    address: String,
    reason: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    remote_reply: Option<String>,
    created_at: Millis,
    #[serde(default)]
    expires_at: Option<Millis>,
}

impl From<StoredSuppression> for SuppressionEntry {
    fn from(s: StoredSuppression) -> SuppressionEntry {
        let (reason, remote_reply) = match s.reason.parse::<SuppressionReason>() {
            Ok(reason) => (reason, s.remote_reply),
            Err(_) => (SuppressionReason::Manual, s.remote_reply.or(Some(s.reason))),
        };
        SuppressionEntry {
            address: s.address,
            reason,
            scope: s.scope,
            remote_reply,
            created_at: s.created_at,
            expires_at: s.expires_at,
        }
    }
}

/// State all relay pods share through the queue backend.
#[async_trait]
pub trait SharedState: Send + Sync + 'static {
    /// Adds or replaces a suppression entry.
    async fn suppress(&self, entry: SuppressionEntry) -> Result<(), QueueError>;

    /// The entry that keeps mail from `sending_domain` from `address` at
    /// `now`, if any: the one for every domain first, else the one scoped
    /// to `sending_domain`.
    async fn suppressed(
        &self,
        address: &str,
        sending_domain: &str,
        now: Millis,
    ) -> Result<Option<SuppressionEntry>, QueueError>;

    /// Removes the entry for `address` in `scope` (`None`: the one for
    /// every domain); true when there was one.
    async fn unsuppress(&self, address: &str, scope: Option<&str>) -> Result<bool, QueueError>;

    /// Every entry still in force at `now`.
    async fn list_suppressed(&self, now: Millis) -> Result<Vec<SuppressionEntry>, QueueError>;

    /// Adds `by` to the fixed-window counter `key` (window starting at the
    /// first increment, lasting `window`) and returns the new total. Used
    /// for AUTH failures per client, rate limits and daily quotas.
    async fn incr_counter(&self, key: &str, by: u64, window: Duration) -> Result<u64, QueueError>;

    /// The counter's current total (0 when absent or expired).
    async fn counter(&self, key: &str) -> Result<u64, QueueError>;

    /// Several counters at once, in the order of `keys` (0 for absent or
    /// expired ones): one round trip instead of one per key, for sums over
    /// many buckets (the reputation guard's rolling windows).
    async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, QueueError>;

    /// Takes one of `limit` slots named `key` (per-destination connections
    /// over all pods) for at most `ttl`, so a dead pod's slots come back.
    /// `None` when all slots are taken.
    async fn acquire_slot(
        &self,
        key: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<Option<String>, QueueError>;

    /// Extends a slot taken by [`SharedState::acquire_slot`] to `ttl` from
    /// now, so a delivery longer than the slot's first TTL keeps it (the
    /// worker renews it with the unit leases). `false` when `token` no
    /// longer holds a slot under `key` (it expired or was released): the
    /// slot may be someone else's now and is not taken back.
    async fn renew_slot(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, QueueError>;

    /// Returns a slot taken by [`SharedState::acquire_slot`].
    async fn release_slot(&self, key: &str, token: &str) -> Result<(), QueueError>;

    /// The value stored under `key` by [`SharedState::set_value`], `None`
    /// when absent or past its time to live. A small cache shared by all
    /// pods (MTA-STS policies).
    async fn get_value(&self, key: &str) -> Result<Option<String>, QueueError>;

    /// Stores `value` under `key` for `ttl`, replacing any earlier value.
    async fn set_value(&self, key: &str, value: &str, ttl: Duration) -> Result<(), QueueError>;
}

/// The destination domain of an address: the part after the last `@`,
/// lower-cased. `None` for an address without a domain.
pub fn recipient_domain(address: &str) -> Option<String> {
    let (_, domain) = address.rsplit_once('@')?;
    if domain.is_empty() {
        return None;
    }
    Some(domain.to_ascii_lowercase())
}

/// Splits recipients by destination domain, keeping first-seen order of
/// domains and recipients: one delivery unit per group.
pub fn split_by_domain(recipients: &[String]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for rcpt in recipients {
        let domain = recipient_domain(rcpt).unwrap_or_default();
        match groups.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(rcpt.clone()),
            None => groups.push((domain, vec![rcpt.clone()])),
        }
    }
    groups
}

/// The units of a new message, all due at its receive time: one per
/// destination domain (id `message:domain`), or with
/// [`MessageFlags::per_recipient`] one per recipient (`message:domain:n`).
pub fn units_of(message: &NewMessage) -> Vec<DeliveryUnit> {
    let groups = split_by_domain(&message.recipients);
    let groups: Vec<(String, String, Vec<String>)> = if message.flags.per_recipient {
        groups
            .into_iter()
            .flat_map(|(domain, recipients)| {
                recipients.into_iter().enumerate().map(move |(i, r)| {
                    (
                        format!("{}:{domain}:{i}", message.id),
                        domain.clone(),
                        vec![r],
                    )
                })
            })
            .collect()
    } else {
        groups
            .into_iter()
            .map(|(domain, recipients)| (format!("{}:{domain}", message.id), domain, recipients))
            .collect()
    };
    groups
        .into_iter()
        .map(|(id, domain, recipients)| DeliveryUnit {
            id,
            message_id: message.id.clone(),
            domain,
            recipients,
            mail_from: message.mail_from.clone(),
            sending_domain: message.sending_domain.clone(),
            received_at: message.received_at,
            flags: message.flags,
            attempts: 0,
            next_attempt_at: message.received_at,
            last_error: None,
            delay_notified: false,
            tags: message.tags.clone(),
            header_message_id: message.header_message_id.clone(),
            history: Vec::new(),
            held_ms: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit() -> DeliveryUnit {
        DeliveryUnit {
            id: "m:x.org".into(),
            message_id: "m".into(),
            domain: "x.org".into(),
            recipients: vec!["a@x.org".into(), "b@x.org".into()],
            mail_from: "s@e.test".into(),
            sending_domain: "e.test".into(),
            received_at: 1,
            flags: Default::default(),
            attempts: 2,
            next_attempt_at: 1,
            last_error: None,
            delay_notified: true,
            tags: Default::default(),
            header_message_id: None,
            history: Vec::new(),
            held_ms: 0,
        }
    }

    #[test]
    fn retry_counts_the_attempt_and_keeps_the_delay_notice() {
        let unit = unit();
        let next = rescheduled(
            &unit,
            Reschedule {
                recipients: vec!["b@x.org".into()],
                next_attempt_at: 99,
                last_error: "451 4.7.1 later".into(),
                delay_notified: false,
            },
        );
        assert_eq!(next.attempts, 3);
        assert_eq!(next.recipients, vec!["b@x.org".to_string()]);
        assert_eq!(next.next_attempt_at, 99);
        assert!(next.delay_notified);
        assert_eq!(next.last_error.as_deref(), Some("451 4.7.1 later"));
    }

    #[test]
    fn retries_keep_the_last_attempts_with_their_replies() {
        let mut unit = unit();
        for i in 0..(HISTORY_LEN as u64 + 3) {
            let r = Reschedule {
                recipients: unit.recipients.clone(),
                next_attempt_at: i,
                last_error: format!("451 try {i}"),
                delay_notified: false,
            };
            unit = settled_unit(&unit, SettleOp::Retry(r), 100 + i).unwrap();
        }
        assert_eq!(unit.history.len(), HISTORY_LEN);
        assert_eq!(unit.history[0].reply, "451 try 3");
        assert_eq!(
            unit.history.last().unwrap().at,
            100 + HISTORY_LEN as u64 + 2
        );
        // A postponement is not an attempt: no history entry.
        let back = settled_unit(&unit, SettleOp::Postpone { until: 1 }, 999).unwrap();
        assert_eq!(back.history, unit.history);
    }

    #[test]
    fn postpone_moves_the_due_time_and_nothing_else() {
        let mut unit = unit();
        unit.last_error = Some("451 4.7.1 later".into());
        let back = settled_unit(&unit, SettleOp::Postpone { until: 77 }, 5).unwrap();
        assert_eq!(back.next_attempt_at, 77);
        assert_eq!(
            DeliveryUnit {
                next_attempt_at: unit.next_attempt_at,
                ..back
            },
            unit
        );
        assert_eq!(settled_unit(&unit, SettleOp::Complete, 5), None);
        assert_eq!(settled_unit(&unit, SettleOp::Fail, 5), None);
    }

    #[test]
    fn recipients_split_by_domain_case_insensitively() {
        let rcpts: Vec<String> = ["a@x.org", "b@Y.org", "c@X.ORG", "d@y.org"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let groups = split_by_domain(&rcpts);
        assert_eq!(
            groups,
            vec![
                (
                    "x.org".to_string(),
                    vec!["a@x.org".to_string(), "c@X.ORG".to_string()]
                ),
                (
                    "y.org".to_string(),
                    vec!["b@Y.org".to_string(), "d@y.org".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn units_carry_the_envelope_and_are_due_at_once() {
        let msg = NewMessage {
            id: "m1".into(),
            mail_from: "s@example.test".into(),
            recipients: vec!["a@x.org".into(), "b@y.org".into()],
            data: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            sending_domain: "example.test".into(),
            received_at: 1_000,
            flags: MessageFlags::default(),
            tags: BTreeMap::from([("k".into(), "v".into())]),
            header_message_id: Some("abc@example.test".into()),
        };
        let units = units_of(&msg);
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].id, "m1:x.org");
        assert_eq!(units[1].recipients, vec!["b@y.org".to_string()]);
        assert!(
            units
                .iter()
                .all(|u| u.next_attempt_at == 1_000 && u.attempts == 0)
        );
        assert!(
            units.iter().all(|u| u.tags == msg.tags
                && u.header_message_id.as_deref() == Some("abc@example.test"))
        );
    }

    #[test]
    fn per_recipient_messages_get_a_unit_per_recipient() {
        let msg = NewMessage {
            id: "m1".into(),
            mail_from: "s@example.test".into(),
            recipients: vec!["a@x.org".into(), "b@y.org".into(), "c@x.org".into()],
            data: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            sending_domain: "example.test".into(),
            received_at: 1_000,
            flags: MessageFlags {
                per_recipient: true,
                ..MessageFlags::default()
            },
            tags: BTreeMap::new(),
            header_message_id: None,
        };
        let units: Vec<(String, Vec<String>)> = units_of(&msg)
            .into_iter()
            .map(|u| (u.id, u.recipients))
            .collect();
        assert_eq!(
            units,
            vec![
                ("m1:x.org:0".to_string(), vec!["a@x.org".to_string()]),
                ("m1:x.org:1".to_string(), vec!["c@x.org".to_string()]),
                ("m1:y.org:0".to_string(), vec!["b@y.org".to_string()]),
            ]
        );
    }

    #[test]
    fn records_stored_before_tags_existed_still_decode() {
        let old = r#"{"id":"m:x.org","message_id":"m","domain":"x.org","recipients":["a@x.org"],
            "mail_from":"s@e.test","sending_domain":"e.test","received_at":1,
            "flags":{"smtputf8":false,"eight_bit":false,"is_dsn":false},"attempts":0,
            "next_attempt_at":1,"last_error":null,"delay_notified":false}"#;
        let unit: DeliveryUnit = serde_json::from_str(old).unwrap();
        assert!(unit.tags.is_empty());
        assert_eq!(unit.header_message_id, None);
    }
}
