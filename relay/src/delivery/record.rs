//! Applies a settled attempt: [`super::settle::plan`] decides, and
//! [`record`] stores the decision in one queue operation (retried through
//! short backend outages); only then are metrics counted and the outcome
//! logged.

use std::time::Duration;

use petrel_crds::config::RelayConfig;

use super::DeliveryContext;
use super::classify::Outcome;
use super::retry::policy;
use super::settle::{self, Fate, Plan, RcptOutcome, SettleInput};
use super::{limits, millis};
use crate::metrics::destination_group;
use crate::queue::{Lease, Millis, Settlement, now_millis};

/// Applies the outcomes: [`settle::plan`] decides, one atomic
/// `Queue::settle` stores the unit's fate with its DSNs, events and
/// suppression entries, and only once that is stored are the metrics
/// counted and the outcome logged, so a failed settlement (the unit is
/// delivered again after its lease) never counts or suppresses twice.
pub(crate) async fn settle(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    lease: &Lease,
    data: &[u8],
    outcomes: Vec<RcptOutcome>,
) {
    let unit = &lease.unit;
    let now = now_millis();
    let policy = policy(cfg);
    let needs_attempts = outcomes
        .iter()
        .any(|o| matches!(&o.result, Err(f) if f.outcome() != Outcome::Permanent));
    let attempts = if needs_attempts {
        limits::effective_attempts(ctx.state.as_ref(), &unit.id, unit.attempts).await
    } else {
        unit.attempts
    };
    let input = SettleInput {
        unit,
        data,
        attempts,
        policy: &policy,
        hostname: &cfg.hostname,
        relay: &ctx.relay,
        suppression_ttl: cfg.delivery.suppression_ttl.map(|d| d.get()),
        now,
    };
    let plan = settle::plan(&input, outcomes);
    if let Err(error) = record(ctx, lease, &plan.settlement).await {
        tracing::warn!(%error, unit = %unit.id, "cannot record the outcome in the queue; the unit may be delivered again");
        return;
    }
    count_and_log(ctx, unit, &plan, now);
}

/// Metrics and one log line per recipient of a stored settlement.
fn count_and_log(
    ctx: &DeliveryContext,
    unit: &crate::queue::DeliveryUnit,
    plan: &Plan,
    now: Millis,
) {
    let dest = destination_group(&unit.domain);
    let attempt = unit.attempts.saturating_add(1);
    let domain = unit.sending_domain.as_str();
    for r in &plan.records {
        let remote = r.remote.as_deref().unwrap_or("-");
        let tls_policy = r.tls_policy.unwrap_or("-");
        let rcpt = r.recipient.as_str();
        match &r.fate {
            Fate::Delivered(reply) => {
                ctx.metrics
                    .delivered
                    .with_label_values(&[domain, dest])
                    .inc();
                let latency = now.saturating_sub(unit.received_at) as f64 / 1000.0;
                ctx.metrics
                    .delivery_latency
                    .with_label_values(&[domain])
                    .observe(latency);
                tracing::info!(
                    outcome = "delivered", message_id = %unit.message_id, sending_domain = %domain,
                    destination = %unit.domain, recipient = %rcpt, remote, reply = %reply, tls = r.tls, tls_policy, attempt,
                    "delivered"
                );
            }
            Fate::Deferred(failure) => {
                ctx.metrics
                    .deferred
                    .with_label_values(&[domain, dest])
                    .inc();
                tracing::info!(
                    outcome = "deferred", message_id = %unit.message_id, sending_domain = %domain,
                    destination = %unit.domain, recipient = %rcpt, remote,
                    reply = %failure, tls = r.tls, tls_policy, attempt, next_attempt_at = plan.retry_at.unwrap_or(0), "deferred"
                );
            }
            Fate::Bounced {
                failure,
                hard,
                expired,
            } => {
                ctx.metrics
                    .bounced
                    .with_label_values(&[domain, dest, &failure.class()])
                    .inc();
                if *expired {
                    tracing::info!(
                        outcome = "expired", message_id = %unit.message_id, sending_domain = %domain,
                        destination = %unit.domain, recipient = %rcpt, remote,
                        reply = %failure, tls = r.tls, tls_policy, attempt, "gave up: maximum queue lifetime reached"
                    );
                } else {
                    tracing::info!(
                        outcome = "bounced", message_id = %unit.message_id, sending_domain = %domain,
                        destination = %unit.domain, recipient = %rcpt, remote,
                        reply = %failure, tls = r.tls, tls_policy, attempt, hard = *hard, "bounced"
                    );
                }
            }
        }
    }
    for event in &plan.settlement.events {
        ctx.metrics
            .events
            .with_label_values(&[event.kind.as_str()])
            .inc();
    }
    if plan.settlement.enqueue.is_empty()
        && plan
            .records
            .iter()
            .any(|r| matches!(r.fate, Fate::Bounced { .. }))
    {
        tracing::debug!(unit = %unit.id, "no DSN: null sender or the message is a DSN");
    }
}

/// Pauses before recording an outcome again while the backend is down.
const RECORD_BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// Records `op` in the queue, trying again for a few seconds while the
/// backend is unreachable (a Redis failover, say) and the lease has time
/// left. Giving up at once would let the lease run out, and the next worker
/// would deliver the message again, or bounce it again after the DSN went
/// out. The operations are guarded by the lease token, so a retry after a
/// timeout that did apply fails harmlessly instead of applying twice.
async fn record(
    ctx: &DeliveryContext,
    lease: &Lease,
    settlement: &Settlement,
) -> Result<(), crate::queue::QueueError> {
    use crate::queue::QueueError;
    let mut pauses = RECORD_BACKOFF.iter();
    loop {
        let result = ctx.queue.settle(lease, settlement.clone()).await;
        let transient = matches!(
            result,
            Err(QueueError::Unavailable(_) | QueueError::Timeout(_))
        );
        match pauses.next() {
            Some(pause)
                if transient && now_millis().saturating_add(millis(*pause)) < lease.expires_at =>
            {
                tracing::debug!(unit = %lease.unit.id, ?pause, "queue unavailable; recording the outcome again");
                tokio::time::sleep(*pause).await;
            }
            Some(_) | None => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::classify::{Failure, Reply};
    use super::*;
    use crate::metrics::RelayMetrics;
    use crate::queue::memory::MemoryBackend;
    use crate::queue::{Backend, MessageFlags, NewMessage, Queue, SharedState};
    use crate::reload::Reloading;
    use std::sync::Arc;

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

    fn test_context(backend: &Arc<MemoryBackend>) -> (DeliveryContext, RelayConfig) {
        let yaml = "hostname: relay.test\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:2525\n\
                    domains: []\nqueue:\n  embedded:\n    path: /nonexistent/q.redb\n";
        let cfg = RelayConfig::from_yaml(yaml).expect("test config");
        let (_registry, metrics) = RelayMetrics::standalone();
        let ctx = DeliveryContext::new(
            Reloading::fixed(cfg.clone()),
            Backend::of(backend.clone()),
            metrics,
        )
        .unwrap();
        (ctx, cfg)
    }

    fn bounce() -> RcptOutcome {
        RcptOutcome {
            result: Err(Failure::Reply(Reply::new(
                550,
                Some([5, 1, 1]),
                "no such user",
            ))),
            remote: Some("mx.dest.test".into()),
            tls: true,
            tls_policy: Some("verified"),
        }
    }

    fn delivered() -> RcptOutcome {
        RcptOutcome {
            result: Ok(Reply::new(250, Some([2, 0, 0]), "ok")),
            remote: Some("mx.dest.test".into()),
            tls: true,
            tls_policy: Some("dane"),
        }
    }

    /// Issue 13 item 5: the bounce, its DSN and its suppression entry are
    /// one settlement. The backend failing at that point (twice, then
    /// back) neither re-delivers the bounced recipient nor writes its
    /// suppression, metrics or events twice.
    #[tokio::test]
    async fn a_bounce_and_its_dsn_are_settled_once_through_a_backend_failure() {
        use crate::events::{BounceType, EventType};
        tokio::time::timeout(Duration::from_secs(30), async {
            let backend = Arc::new(MemoryBackend::default());
            let (ctx, cfg) = test_context(&backend);
            backend
                .enqueue(
                    message("m1", &["gone@dest.test", "ok@dest.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            let lease = backend
                .lease(now_millis(), 10, Duration::from_secs(60))
                .await
                .unwrap()
                .remove(0);
            backend.fail_next_settles(2);
            settle(
                &ctx,
                &cfg,
                &lease,
                b"Subject: x\r\n\r\n",
                vec![bounce(), delivered()],
            )
            .await;

            assert_eq!(backend.settle_calls(), 3, "two failures, then stored");
            // The unit is gone; the only unit left is the DSN's.
            let units = backend.units();
            assert_eq!(units.len(), 1, "{units:?}");
            assert!(units[0].flags.is_dsn);
            assert_eq!(units[0].recipients, vec!["s@example.test"]);
            assert_eq!(backend.enqueued().len(), 2, "the message and one DSN");
            assert!(
                backend
                    .suppressed("gone@dest.test", "example.test", now_millis())
                    .await
                    .unwrap()
                    .is_some()
            );
            let m = &ctx.metrics;
            assert_eq!(
                m.bounced
                    .with_label_values(&["example.test", "other", "5.1"])
                    .get(),
                1
            );
            assert_eq!(
                m.delivered
                    .with_label_values(&["example.test", "other"])
                    .get(),
                1
            );
            let events = backend.events();
            let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
            assert_eq!(
                kinds,
                [EventType::Bounced, EventType::Delivered, EventType::Dsn]
            );
            assert_eq!(events[0].bounce_type, Some(BounceType::Hard));
            assert_eq!(events[0].enhanced_status.as_deref(), Some("5.1.1"));
            assert_eq!(
                events[0].response.as_deref(),
                Some("550 5.1.1 no such user")
            );
            assert_eq!(events[0].remote_mta.as_deref(), Some("mx.dest.test"));
            assert_eq!(events[0].tls, Some(true));
            assert_eq!(events[0].tls_policy.as_deref(), Some("verified"));
            assert_eq!(events[1].tls_policy.as_deref(), Some("dane"));
            let json = serde_json::to_value(&events[1]).unwrap();
            assert_eq!(json["tlsPolicy"], "dane", "{json}");
            assert_eq!(json["tls"], true, "{json}");
            assert_eq!(events[0].attempt, Some(1));
            assert_eq!(
                events[2].dsn_queue_id.as_deref(),
                Some(units[0].message_id.as_str())
            );
            assert_eq!(m.events.with_label_values(&["bounced"]).get(), 1);
        })
        .await
        .expect("test timed out");
    }

    /// When the settlement cannot be stored at all, nothing of it is: no
    /// suppression, no DSN, no events, no metrics. The unit comes back
    /// after its lease (at-least-once) with both recipients.
    #[tokio::test]
    async fn an_unstored_settlement_writes_nothing() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let backend = Arc::new(MemoryBackend::default());
            let (ctx, cfg) = test_context(&backend);
            backend
                .enqueue(
                    message("m1", &["gone@dest.test", "ok@dest.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            let lease = backend
                .lease(now_millis(), 10, Duration::from_millis(1))
                .await
                .unwrap()
                .remove(0);
            backend.fail_next_settles(100);
            settle(&ctx, &cfg, &lease, b"", vec![bounce(), delivered()]).await;
            assert!(backend.events().is_empty());
            assert_eq!(backend.enqueued().len(), 1);
            assert!(
                backend
                    .suppressed("gone@dest.test", "example.test", now_millis())
                    .await
                    .unwrap()
                    .is_none()
            );
            assert_eq!(
                ctx.metrics
                    .bounced
                    .with_label_values(&["example.test", "other", "5.1"])
                    .get(),
                0
            );
            let units = backend.units();
            assert_eq!(units[0].recipients.len(), 2);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_delivery_is_recorded_through_a_short_backend_outage() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("q.redb");
            let yaml = format!(
                "hostname: relay.test\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:2525\n\
                 domains: []\nqueue:\n  embedded:\n    path: \"{}\"\n",
                path.display()
            );
            let cfg = RelayConfig::from_yaml(&yaml).expect("test config");
            let flaky = Arc::new(MemoryBackend::default());
            flaky.fail_next_settles(2);
            let (_registry, metrics) = RelayMetrics::standalone();
            let ctx = DeliveryContext::new(
                Reloading::fixed(cfg.clone()),
                Backend::of(flaky.clone()),
                metrics,
            )
            .unwrap();
            flaky
                .enqueue(message("m1", &["a@dest.test"]), Vec::new())
                .await
                .unwrap();
            let leases = flaky
                .lease(now_millis(), 10, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(leases.len(), 1);
            let delivered = RcptOutcome {
                result: Ok(Reply::new(250, Some([2, 0, 0]), "ok")),
                remote: None,
                tls: false,
                tls_policy: None,
            };
            settle(&ctx, &cfg, &leases[0], b"", vec![delivered]).await;
            // Without retries the outcome is lost, the unit stays leased
            // and is delivered again once the lease runs out.
            let stats = flaky.stats(now_millis()).await.unwrap();
            assert_eq!(stats.messages, 0, "{stats:?}");
        })
        .await
        .expect("test timed out");
    }
}
