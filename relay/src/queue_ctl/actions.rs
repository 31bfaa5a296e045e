//! `queue retry|bounce|delete|hold|release`. Message actions claim the
//! units (a lease) and end the lease with the ordinary atomic
//! [`crate::queue::Queue::settle`]: the change, its DSN and its events are
//! written in one step, as after a delivery attempt.

use serde::{Deserialize, Serialize};

use super::show::{not_found, units_of_id};
use super::{ActionContext, CtlError, RetryTarget};
use crate::delivery::dsn::{self, DsnAction, DsnContext, DsnRecipient};
use crate::delivery::settle::unit_event;
use crate::events::{BounceType, EventType};
use crate::queue::{Backend, Lease, Millis, QueueError, SettleOp, Settlement, UnitState, UnitView};

/// The enhanced status of an operator's bounce (RFC 3463 "other or
/// undefined status": nothing about the recipient is known to be wrong).
pub const BOUNCE_STATUS: &str = "5.0.0";

/// Which action ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `retry`.
    Retry,
    /// `bounce`.
    Bounce,
    /// `delete`.
    Delete,
    /// `hold`.
    Hold,
    /// `release`.
    Release,
}

/// What an action did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionReport {
    /// The action.
    pub action: Action,
    /// The queue id, unit id or domain it was given.
    pub target: String,
    /// Units changed (retried, bounced, deleted, held, released).
    pub units: u64,
    /// Units left alone because a worker is delivering them now.
    pub busy: u64,
    /// Units left alone because their destination is held (`retry`).
    pub held: u64,
    /// Queue ids of the DSNs sent (`bounce`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dsn_queue_ids: Vec<String>,
}

impl ActionReport {
    fn new(action: Action, target: &str) -> ActionReport {
        ActionReport {
            action,
            target: target.to_string(),
            units: 0,
            busy: 0,
            held: 0,
            dsn_queue_ids: Vec::new(),
        }
    }
}

/// Claims `views` except those leased by a worker; counts those as busy.
async fn claim(
    backend: &Backend,
    ctx: &ActionContext,
    views: &[UnitView],
    now: Millis,
    report: &mut ActionReport,
) -> Result<Vec<Lease>, CtlError> {
    let ids: Vec<String> = views
        .iter()
        .filter(|v| v.state != UnitState::Leased)
        .map(|v| v.unit.id.clone())
        .collect();
    let leases = backend.control.claim(&ids, now, ctx.lease_for).await?;
    report.busy = (views.len() - leases.len()) as u64;
    Ok(leases)
}

/// Settles a claimed unit; a claim lost meanwhile counts as busy.
async fn settle(
    backend: &Backend,
    lease: &Lease,
    settlement: Settlement,
    report: &mut ActionReport,
) -> Result<(), CtlError> {
    match backend.queue.settle(lease, settlement).await {
        Ok(()) => {
            report.units += 1;
            Ok(())
        }
        Err(QueueError::LeaseLost(_)) => {
            report.busy += 1;
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Makes the units of a message, or of a destination, due now. Held
/// units stay held (release their destination to send them).
pub async fn retry(
    backend: &Backend,
    ctx: &ActionContext,
    target: RetryTarget,
    now: Millis,
) -> Result<ActionReport, CtlError> {
    let units = backend.control.units(now).await?;
    let (name, views) = match &target {
        RetryTarget::Id(id) => {
            let id = super::check_id(id)?;
            let views = units_of_id(units, id);
            if views.is_empty() {
                return Err(not_found(id));
            }
            (id.to_string(), views)
        }
        RetryTarget::Domain(domain) => {
            let domain = super::check_domain(domain)?;
            let views = units
                .into_iter()
                .filter(|v| v.unit.domain == domain)
                .collect();
            (domain, views)
        }
    };
    let mut report = ActionReport::new(Action::Retry, &name);
    let (held, waiting): (Vec<UnitView>, Vec<UnitView>) =
        views.into_iter().partition(|v| v.state == UnitState::Held);
    report.held = held.len() as u64;
    for lease in claim(backend, ctx, &waiting, now, &mut report).await? {
        let settlement = Settlement::only(SettleOp::Postpone { until: now });
        settle(backend, &lease, settlement, &mut report).await?;
    }
    Ok(report)
}

/// Fails every unit of message `id` with a DSN to the sender (none for a
/// null sender or a DSN, as for any bounce) and a `bounced` event per
/// recipient (`bounceType` `admin`).
pub async fn bounce(
    backend: &Backend,
    ctx: &ActionContext,
    id: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<ActionReport, CtlError> {
    let views = units_of_id(backend.control.units(now).await?, id);
    if views.is_empty() {
        return Err(not_found(id));
    }
    let diagnostic = match reason.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => format!("bounced by the relay operator: {r}"),
        None => "bounced by the relay operator".to_string(),
    };
    let mut report = ActionReport::new(Action::Bounce, id);
    let leases = claim(backend, ctx, &views, now, &mut report).await?;
    let data = match leases.first() {
        Some(l) => match backend.queue.message_data(&l.unit.message_id).await {
            Ok(data) => data,
            // The header only identifies the message in the DSN.
            Err(QueueError::NotFound(_)) => Vec::new(),
            Err(error) => return Err(error.into()),
        },
        None => Vec::new(),
    };
    for lease in leases {
        let unit = &lease.unit;
        let mut settlement = Settlement::only(SettleOp::Fail);
        let recipients: Vec<DsnRecipient> = unit
            .recipients
            .iter()
            .map(|r| DsnRecipient {
                address: r.clone(),
                action: DsnAction::Failed,
                status: BOUNCE_STATUS.to_string(),
                remote_mta: None,
                diagnostic: Some(diagnostic.clone()),
                diagnostic_is_smtp: false,
            })
            .collect();
        for r in &recipients {
            let mut e = unit_event(EventType::Bounced, unit, &r.address, &ctx.relay, now);
            e.response = Some(diagnostic.clone());
            e.enhanced_status = Some(BOUNCE_STATUS.to_string());
            e.bounce_type = Some(BounceType::Admin);
            settlement.events.push(e);
        }
        let dsn_ctx = DsnContext {
            hostname: &ctx.hostname,
            unit,
            original: &data,
            now,
            will_retry_until: None,
        };
        let dsn_id = match dsn::build(&dsn_ctx, &recipients) {
            Some(message) => {
                for r in &recipients {
                    let mut e = unit_event(EventType::Dsn, unit, &r.address, &ctx.relay, now);
                    e.dsn_queue_id = Some(message.id.clone());
                    settlement.events.push(e);
                }
                let id = message.id.clone();
                settlement.enqueue.push(message);
                Some(id)
            }
            None => None,
        };
        let before = report.units;
        settle(backend, &lease, settlement, &mut report).await?;
        if report.units > before {
            report.dsn_queue_ids.extend(dsn_id);
        }
    }
    Ok(report)
}

/// Drops every unit of message `id` without a DSN, with a `deleted`
/// event per recipient.
pub async fn delete(
    backend: &Backend,
    ctx: &ActionContext,
    id: &str,
    now: Millis,
) -> Result<ActionReport, CtlError> {
    let views = units_of_id(backend.control.units(now).await?, id);
    if views.is_empty() {
        return Err(not_found(id));
    }
    let mut report = ActionReport::new(Action::Delete, id);
    for lease in claim(backend, ctx, &views, now, &mut report).await? {
        let mut settlement = Settlement::only(SettleOp::Fail);
        for r in &lease.unit.recipients {
            let mut e = unit_event(EventType::Deleted, &lease.unit, r, &ctx.relay, now);
            e.response = Some("deleted by the relay operator".to_string());
            settlement.events.push(e);
        }
        settle(backend, &lease, settlement, &mut report).await?;
    }
    Ok(report)
}

/// Holds a destination on every pod.
pub async fn hold(backend: &Backend, domain: &str, now: Millis) -> Result<ActionReport, CtlError> {
    let mut report = ActionReport::new(Action::Hold, domain);
    report.units = backend.control.hold(domain, now).await?;
    Ok(report)
}

/// Releases a held destination.
pub async fn release(
    backend: &Backend,
    domain: &str,
    now: Millis,
) -> Result<ActionReport, CtlError> {
    let mut report = ActionReport::new(Action::Release, domain);
    report.units = match backend.control.release(domain, now).await {
        Ok(n) => n,
        Err(QueueError::NotFound(_)) => {
            return Err(CtlError::NotFound(format!("{domain} is not held")));
        }
        Err(error) => return Err(error.into()),
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::queue::memory::MemoryBackend;
    use crate::queue::{NewMessage, Queue};

    fn ctx() -> ActionContext {
        ActionContext {
            hostname: "relay.example.test".into(),
            relay: "relay-test".into(),
            lease_for: Duration::from_secs(60),
        }
    }

    async fn backend_with(id: &str) -> (Arc<MemoryBackend>, Backend) {
        let mem = Arc::new(MemoryBackend::default());
        mem.enqueue(
            NewMessage {
                id: id.into(),
                mail_from: "sender@example.test".into(),
                recipients: vec!["a@x.org".into(), "b@y.org".into()],
                data: b"Subject: hi\r\nFrom: sender@example.test\r\n\r\nbody\r\n".to_vec(),
                sending_domain: "example.test".into(),
                received_at: 1_000,
                flags: Default::default(),
                tags: Default::default(),
                header_message_id: None,
            },
            Vec::new(),
        )
        .await
        .unwrap();
        let backend = Backend::of(mem.clone());
        (mem, backend)
    }

    #[tokio::test]
    async fn bounce_fails_every_unit_with_one_dsn_each_and_events() {
        let (mem, b) = backend_with("m1").await;
        let report = bounce(&b, &ctx(), "m1", Some("spam run"), 2_000)
            .await
            .unwrap();
        assert_eq!((report.units, report.busy), (2, 0));
        assert_eq!(report.dsn_queue_ids.len(), 2);
        let dsns: Vec<NewMessage> = mem
            .enqueued()
            .into_iter()
            .filter(|m| m.flags.is_dsn)
            .collect();
        assert_eq!(dsns.len(), 2);
        assert!(dsns.iter().all(|d| d.recipients == ["sender@example.test"]));
        let text = String::from_utf8_lossy(&dsns[0].data).to_string();
        assert!(text.contains("Status: 5.0.0"), "{text}");
        assert!(text.contains("spam run"));
        let events = mem.events();
        let bounced: Vec<_> = events
            .iter()
            .filter(|e| e.kind == EventType::Bounced)
            .collect();
        assert_eq!(bounced.len(), 2);
        assert!(
            bounced
                .iter()
                .all(|e| e.bounce_type == Some(BounceType::Admin))
        );
        assert!(mem.units().iter().all(|u| u.message_id != "m1"));
        assert!(matches!(
            bounce(&b, &ctx(), "m1", None, 3_000).await,
            Err(CtlError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn leased_units_are_left_alone_and_reported_busy() {
        let (mem, b) = backend_with("m2").await;
        let leased = mem.lease(1_000, 1, Duration::from_secs(600)).await.unwrap();
        assert_eq!(leased.len(), 1);
        let report = delete(&b, &ctx(), "m2", 2_000).await.unwrap();
        assert_eq!((report.units, report.busy), (1, 1));
        assert_eq!(mem.units().len(), 1);
        assert_eq!(
            mem.events()
                .iter()
                .filter(|e| e.kind == EventType::Deleted)
                .count(),
            1
        );
        assert_eq!(super::super::Output::Action(report).status() as u8, 4);
    }

    #[tokio::test]
    async fn hold_keeps_units_from_lease_and_release_brings_them_back() {
        let (mem, b) = backend_with("m3").await;
        let report = hold(&b, "x.org", 1_500).await.unwrap();
        assert_eq!(report.units, 1);
        let leases = mem.lease(2_000, 10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].unit.domain, "y.org");
        let r = retry(&b, &ctx(), RetryTarget::Domain("x.org".into()), 2_000)
            .await
            .unwrap();
        assert_eq!((r.units, r.held), (0, 1));
        assert_eq!(b.queue.stats(2_000).await.unwrap().held, 1);
        let released = release(&b, "x.org", 11_500).await.unwrap();
        assert_eq!(released.units, 1);
        let back = mem
            .lease(11_500, 10, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].unit.held_ms, 10_000);
        assert!(matches!(
            release(&b, "x.org", 12_000).await,
            Err(CtlError::NotFound(_))
        ));
    }
}
