//! What feedback changes: suppression entries and the events describing
//! them, stored together in one atomic step
//! ([`EventLog::publish_suppressing`]) before the relay answers (250 on
//! the feedback listener, 200 on the unsubscribe endpoint).

use crate::events::{Event, EventLog, EventType};
use crate::queue::{Millis, QueueError, SharedState, SuppressionEntry, SuppressionReason};

use super::token::UnsubscribeClaims;

/// How an unsubscribe came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// RFC 8058 one-click: `POST /u/<token>` with `List-Unsubscribe=One-Click`.
    OneClick,
    /// The confirm button of the page `GET /u/<token>` shows.
    Page,
    /// Mail to `u+<token>@<returnPathDomain>` through the feedback listener.
    Mailto,
}

impl Via {
    /// How `suppression list` shows it.
    pub fn describe(self) -> &'static str {
        match self {
            Via::OneClick => "one-click unsubscribe (RFC 8058 POST)",
            Via::Page => "unsubscribe page",
            Via::Mailto => "mailto unsubscribe",
        }
    }
}

/// Suppresses `claims.recipient` for `claims.sending_domain` (reason
/// `unsubscribe`) and records an `unsubscribed` event, atomically.
/// Idempotent: when the recipient is already unsubscribed from that domain
/// nothing is written again (no second event). `relay` is the name events
/// carry ([`crate::events::relay_name`]).
pub async fn unsubscribe(
    state: &dyn SharedState,
    events: &dyn EventLog,
    claims: &UnsubscribeClaims,
    via: Via,
    now: Millis,
    relay: &str,
) -> Result<(), QueueError> {
    let domain = claims.sending_domain.to_ascii_lowercase();
    if let Some(existing) = state.suppressed(&claims.recipient, &domain, now).await?
        && existing.reason == SuppressionReason::Unsubscribe
        && existing.scope.as_deref() == Some(domain.as_str())
    {
        return Ok(());
    }
    let entry = SuppressionEntry {
        address: claims.recipient.clone(),
        reason: SuppressionReason::Unsubscribe,
        scope: Some(domain.clone()),
        remote_reply: Some(via.describe().to_string()),
        created_at: now,
        expires_at: None,
    }
    .normalised();
    let mut event = Event::new(EventType::Unsubscribed, relay, now).with_recipient(&entry.address);
    event.sending_domain = Some(domain);
    event.queue_id = claims.queue_id.clone();
    events.publish_suppressing(&[event], &[entry]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryBackend;

    #[tokio::test]
    async fn unsubscribing_is_scoped_and_idempotent() {
        let backend = MemoryBackend::default();
        let claims = UnsubscribeClaims {
            sending_domain: "Example.com".into(),
            recipient: "A@x.test".into(),
            queue_id: Some("q1".into()),
        };
        for _ in 0..2 {
            unsubscribe(&backend, &backend, &claims, Via::OneClick, 1_000, "relay-0")
                .await
                .unwrap();
        }
        let entry = backend
            .suppressed("a@x.test", "example.com", 2_000)
            .await
            .unwrap()
            .expect("suppressed for example.com");
        assert_eq!(entry.reason, SuppressionReason::Unsubscribe);
        assert_eq!(entry.scope.as_deref(), Some("example.com"));
        assert!(
            backend
                .suppressed("a@x.test", "other.test", 2_000)
                .await
                .unwrap()
                .is_none(),
            "another domain may still send"
        );
        let stored = backend.read(None, 10).await.unwrap();
        assert_eq!(stored.len(), 1, "one event for two unsubscribes");
        let e = &stored[0].event;
        assert_eq!(e.kind, EventType::Unsubscribed);
        assert_eq!(e.recipient.as_deref(), Some("a@x.test"));
        assert_eq!(e.sending_domain.as_deref(), Some("example.com"));
        assert_eq!(e.queue_id.as_deref(), Some("q1"));
    }
}
