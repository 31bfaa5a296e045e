//! The suppression list, as `petrel-relay suppression list|add|remove`
//! and the delivery side use it. Addresses are compared lower-cased.

use std::time::Duration;

use crate::queue::{Millis, QueueError, SharedState, SuppressionEntry};

use super::classify::Failure;

/// Reason recorded for a recipient that hard-bounced.
pub const HARD_BOUNCE: &str = "hard-bounce";
/// Reason recorded for an entry added by hand.
pub const MANUAL: &str = "manual";

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The entry for a suppressed address.
pub fn entry(
    address: &str,
    reason: &str,
    remote_reply: Option<String>,
    now: Millis,
    ttl: Option<Duration>,
) -> SuppressionEntry {
    SuppressionEntry {
        address: address.trim().to_lowercase(),
        reason: reason.to_string(),
        remote_reply,
        created_at: now,
        expires_at: ttl.map(|t| now.saturating_add(millis(t))),
    }
}

/// Every entry in force at `now`, sorted by address.
pub async fn list(
    state: &dyn SharedState,
    now: Millis,
) -> Result<Vec<SuppressionEntry>, QueueError> {
    let mut entries = state.list_suppressed(now).await?;
    entries.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(entries)
}

/// Adds (or replaces) an entry by hand.
pub async fn add(
    state: &dyn SharedState,
    address: &str,
    reason: Option<&str>,
    ttl: Option<Duration>,
    now: Millis,
) -> Result<SuppressionEntry, QueueError> {
    let e = entry(address, reason.unwrap_or(MANUAL), None, now, ttl);
    state.suppress(e.clone()).await?;
    Ok(e)
}

/// Removes an entry; true when there was one.
pub async fn remove(state: &dyn SharedState, address: &str) -> Result<bool, QueueError> {
    state.unsuppress(&address.trim().to_lowercase()).await
}

/// Records a hard bounce with the remote reply (or the local reason).
pub async fn record_hard_bounce(
    state: &dyn SharedState,
    address: &str,
    failure: &Failure,
    now: Millis,
    ttl: Option<Duration>,
) -> Result<(), QueueError> {
    let reply = Some(failure.to_string());
    state
        .suppress(entry(address, HARD_BOUNCE, reply, now, ttl))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_lower_cased_and_expire() {
        let e = entry(
            " A@X.Test ",
            HARD_BOUNCE,
            Some("550 5.1.1".into()),
            1_000,
            Some(Duration::from_secs(2)),
        );
        assert_eq!(e.address, "a@x.test");
        assert_eq!(e.expires_at, Some(3_000));
        assert_eq!(entry("a@x", MANUAL, None, 5, None).expires_at, None);
    }
}
