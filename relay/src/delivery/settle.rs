//! What one delivery attempt of a unit comes to, decided without I/O:
//! [`plan`] turns the unit, each recipient's outcome, the retry policy and
//! the time into a [`Settlement`] (the unit's fate, DSNs, events,
//! suppression entries, all stored by one atomic `Queue::settle`) and the
//! per-recipient records the worker logs and counts once that succeeded.

use std::time::Duration;

use super::classify::{Failure, Outcome, Reply, is_hard_bounce};
use super::dsn::{self, DsnAction, DsnContext, DsnRecipient};
use super::retry::{RetryDecision, RetryPolicy};
use super::smtp_client::RcptResult;
use super::suppression;
use crate::events::{BounceType, Event, EventType, format_timestamp};
use crate::queue::{DeliveryUnit, Millis, Reschedule, SettleOp, Settlement};

/// One recipient's result of an attempt.
#[derive(Clone, Debug)]
pub(crate) struct RcptOutcome {
    /// The reply, or why it failed.
    pub result: RcptResult,
    /// The host that answered, when one did.
    pub remote: Option<String>,
    /// Whether the connection used TLS.
    pub tls: bool,
    /// The TLS policy that applied (`dane`, `mta-sts`, `verified`,
    /// `encrypted`, `opportunistic`, `none`), when a server was tried.
    pub tls_policy: Option<&'static str>,
}

/// Everything [`plan`] needs besides the outcomes.
pub(crate) struct SettleInput<'a> {
    /// The unit as leased.
    pub unit: &'a DeliveryUnit,
    /// The original message (its header goes into DSNs).
    pub data: &'a [u8],
    /// Attempts that count towards the retry schedule (throttled ones
    /// excluded), before this one.
    pub attempts: u32,
    /// The retry schedule and queue lifetime.
    pub policy: &'a RetryPolicy,
    /// The relay's hostname (DSN Reporting-MTA).
    pub hostname: &'a str,
    /// The name events carry in `relay`.
    pub relay: &'a str,
    /// How long a hard bounce suppresses its address (forever when `None`).
    pub suppression_ttl: Option<Duration>,
    /// Now.
    pub now: Millis,
}

/// What became of one recipient, for logs and metrics.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fate {
    /// Delivered with this reply.
    Delivered(Reply),
    /// Will be retried at the settlement's next attempt.
    Deferred(Failure),
    /// Failed for good; `expired` when only the queue lifetime ran out.
    Bounced {
        /// The failure.
        failure: Failure,
        /// The address is bad (suppressed).
        hard: bool,
        /// Gave up after temporary failures.
        expired: bool,
    },
}

/// One recipient's line in the plan.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RcptRecord {
    /// The recipient.
    pub recipient: String,
    /// What happened.
    pub fate: Fate,
    /// The host that answered.
    pub remote: Option<String>,
    /// Whether the connection used TLS.
    pub tls: bool,
    /// The TLS policy that applied, when a server was tried.
    pub tls_policy: Option<&'static str>,
}

/// The decided outcome of an attempt.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// What `Queue::settle` stores, atomically.
    pub settlement: Settlement,
    /// Per recipient, in the unit's order (for logs and metrics).
    pub records: Vec<RcptRecord>,
    /// When the unit is tried again, if it is.
    pub retry_at: Option<Millis>,
}

/// A base event about `recipient` of `unit`: every event of a message
/// carries its ids, envelope and tags.
pub(crate) fn unit_event(
    kind: EventType,
    unit: &DeliveryUnit,
    recipient: &str,
    relay: &str,
    now: Millis,
) -> Event {
    let mut e = Event::new(kind, relay, now).with_recipient(recipient);
    e.queue_id = Some(unit.message_id.clone());
    e.header_message_id = unit.header_message_id.clone();
    e.sending_domain = Some(unit.sending_domain.clone());
    e.from = Some(unit.mail_from.clone());
    e.tags = unit.tags.clone();
    e
}

/// The reply text and enhanced status of a failure: the server's reply,
/// or the local reason with the status a DSN would give it.
fn failure_response(failure: &Failure) -> (String, String) {
    match failure.reply() {
        Some(r) => (r.one_line(), r.enhanced().unwrap_or_else(|| r.dsn_status())),
        None => (failure.to_string(), failure.dsn_status()),
    }
}

fn dsn_recipient(
    rcpt: &str,
    failure: &Failure,
    remote: &Option<String>,
    action: DsnAction,
) -> DsnRecipient {
    DsnRecipient {
        address: rcpt.to_string(),
        action,
        status: failure.dsn_status(),
        remote_mta: remote.clone(),
        diagnostic: Some(match failure.reply() {
            Some(r) => r.one_line(),
            None => failure.to_string(),
        }),
        diagnostic_is_smtp: failure.reply().is_some(),
    }
}

/// Decides the settlement of one attempt. Pure: same input, same plan
/// (but for the fresh event and DSN ids).
pub(crate) fn plan(input: &SettleInput<'_>, outcomes: Vec<RcptOutcome>) -> Plan {
    let unit = input.unit;
    let now = input.now;
    let attempt = unit.attempts.saturating_add(1);
    let event = |kind, r: &RcptRecord| {
        let mut e = unit_event(kind, unit, &r.recipient, input.relay, now);
        e.attempt = Some(attempt);
        e.remote_mta = r.remote.clone();
        e.tls = r.remote.as_ref().map(|_| r.tls);
        e.tls_policy = r.tls_policy.map(str::to_string);
        e
    };

    let mut records = Vec::with_capacity(unit.recipients.len());
    let mut failed: Vec<(String, Failure, RcptOutcome)> = Vec::new();
    for (rcpt, o) in unit.recipients.iter().zip(outcomes) {
        match o.result {
            Ok(reply) => records.push(RcptRecord {
                recipient: rcpt.clone(),
                fate: Fate::Delivered(reply),
                remote: o.remote,
                tls: o.tls,
                tls_policy: o.tls_policy,
            }),
            Err(failure) => failed.push((
                rcpt.clone(),
                failure.clone(),
                RcptOutcome {
                    result: Err(failure),
                    ..o
                },
            )),
        }
    }
    let any_temporary = failed
        .iter()
        .any(|(_, f, _)| f.outcome() != Outcome::Permanent);
    let retry_at = match any_temporary.then(|| {
        input
            .policy
            .decide(unit.lifetime_start(), input.attempts, now)
    }) {
        Some(RetryDecision::RetryAt(at)) => Some(at),
        Some(RetryDecision::Expire) | None => None,
    };
    for (rcpt, failure, o) in failed {
        let fate = match (failure.outcome(), retry_at) {
            (Outcome::Permanent, _) => Fate::Bounced {
                hard: is_hard_bounce(&failure),
                failure,
                expired: false,
            },
            (Outcome::Temporary | Outcome::Delivered, Some(_)) => Fate::Deferred(failure),
            (Outcome::Temporary | Outcome::Delivered, None) => Fate::Bounced {
                failure,
                hard: false,
                expired: true,
            },
        };
        records.push(RcptRecord {
            recipient: rcpt,
            fate,
            remote: o.remote,
            tls: o.tls,
            tls_policy: o.tls_policy,
        });
    }
    // Back to the unit's order (delivered ones were pushed first).
    records.sort_by_key(|r| unit.recipients.iter().position(|x| *x == r.recipient));

    let mut settlement = Settlement::only(SettleOp::Complete);
    let mut bounced = Vec::new();
    let mut deferred = Vec::new();
    for r in &records {
        match &r.fate {
            Fate::Delivered(reply) => {
                let e = event(EventType::Delivered, r).with_response(&reply.one_line());
                settlement.events.push(e);
            }
            Fate::Deferred(failure) => {
                let (response, status) = failure_response(failure);
                let mut e = event(EventType::Deferred, r);
                e.response = Some(response);
                e.enhanced_status = Some(status);
                e.next_attempt_at = retry_at.map(format_timestamp);
                settlement.events.push(e);
                deferred.push(dsn_recipient(
                    &r.recipient,
                    failure,
                    &r.remote,
                    DsnAction::Delayed,
                ));
            }
            Fate::Bounced {
                failure,
                hard,
                expired,
            } => {
                let (response, status) = failure_response(failure);
                let mut e = event(EventType::Bounced, r);
                e.response = Some(response);
                e.enhanced_status = Some(status);
                e.bounce_type = Some(match (expired, hard) {
                    (true, _) => BounceType::Expired,
                    (false, true) => BounceType::Hard,
                    (false, false) => BounceType::Soft,
                });
                settlement.events.push(e);
                if *hard {
                    settlement.suppress.push(suppression::entry(
                        &r.recipient,
                        crate::queue::SuppressionReason::Bounce,
                        None,
                        Some(failure.to_string()),
                        now,
                        input.suppression_ttl,
                    ));
                }
                bounced.push(dsn_recipient(
                    &r.recipient,
                    failure,
                    &r.remote,
                    DsnAction::Failed,
                ));
            }
        }
    }

    let dsn_ctx = |until| DsnContext {
        hostname: input.hostname,
        unit,
        original: input.data,
        now,
        will_retry_until: until,
    };
    let mut dsn_events = |kind, message: &crate::queue::NewMessage, report: &[DsnRecipient]| {
        for r in report {
            let mut e = unit_event(kind, unit, &r.address, input.relay, now);
            e.dsn_queue_id = Some(message.id.clone());
            settlement.events.push(e);
        }
    };
    let mut enqueue = Vec::new();
    if let Some(message) = dsn::build(&dsn_ctx(None), &bounced) {
        dsn_events(EventType::Dsn, &message, &bounced);
        enqueue.push(message);
    }
    let mut delay_notified = unit.delay_notified;
    if retry_at.is_some()
        && !deferred.is_empty()
        && input
            .policy
            .delayed_dsn_due(unit.received_at, unit.delay_notified, now)
    {
        let until = input.policy.expires_at(unit.lifetime_start());
        if let Some(message) = dsn::build(&dsn_ctx(Some(until)), &deferred) {
            dsn_events(EventType::Delayed, &message, &deferred);
            enqueue.push(message);
        }
        // Sent, or nobody to warn: either way only once.
        delay_notified = true;
    }
    settlement.enqueue = enqueue;

    settlement.op = match retry_at.filter(|_| !deferred.is_empty()) {
        Some(at) => {
            let last_error = records
                .iter()
                .rev()
                .find_map(|r| match &r.fate {
                    Fate::Deferred(f) => Some(f.to_string()),
                    _ => None,
                })
                .unwrap_or_default();
            SettleOp::Retry(Reschedule {
                recipients: deferred.iter().map(|d| d.address.clone()).collect(),
                next_attempt_at: at,
                last_error,
                delay_notified,
            })
        }
        None if !bounced.is_empty() => SettleOp::Fail,
        None => SettleOp::Complete,
    };
    Plan {
        settlement,
        records,
        retry_at: retry_at.filter(|_| !deferred.is_empty()),
    }
}
