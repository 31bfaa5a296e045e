//! The suppression list, as `petrel-relay suppression list|add|remove`
//! and the delivery side use it. Addresses and scopes are compared
//! lower-cased.

use std::time::Duration;

use crate::queue::{Millis, QueueError, SharedState, SuppressionEntry, SuppressionReason};

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The entry for a suppressed address. `scope` is the sending domain it
/// applies to (`None`: every domain); `detail` says why in words.
pub fn entry(
    address: &str,
    reason: SuppressionReason,
    scope: Option<&str>,
    detail: Option<String>,
    now: Millis,
    ttl: Option<Duration>,
) -> SuppressionEntry {
    SuppressionEntry {
        address: address.to_string(),
        reason,
        scope: scope.map(str::to_string),
        remote_reply: detail,
        created_at: now,
        expires_at: ttl.map(|t| now.saturating_add(millis(t))),
    }
    .normalised()
}

/// Every entry in force at `now`, sorted by address, then scope.
pub async fn list(
    state: &dyn SharedState,
    now: Millis,
) -> Result<Vec<SuppressionEntry>, QueueError> {
    let mut entries = state.list_suppressed(now).await?;
    entries.sort_by(|a, b| (&a.address, &a.scope).cmp(&(&b.address, &b.scope)));
    Ok(entries)
}

/// What `suppression add` stores.
#[derive(Clone, Debug, Default)]
pub struct Manual<'a> {
    /// Why (default `manual`).
    pub reason: Option<SuppressionReason>,
    /// The sending domain it applies to; every domain when absent.
    pub scope: Option<&'a str>,
    /// A note shown by `list`.
    pub note: Option<String>,
    /// Lift it after this long; never when absent.
    pub ttl: Option<Duration>,
}

/// Adds (or replaces) an entry by hand.
pub async fn add(
    state: &dyn SharedState,
    address: &str,
    manual: Manual<'_>,
    now: Millis,
) -> Result<SuppressionEntry, QueueError> {
    let e = entry(
        address,
        manual.reason.unwrap_or(SuppressionReason::Manual),
        manual.scope,
        manual.note,
        now,
        manual.ttl,
    );
    state.suppress(e.clone()).await?;
    Ok(e)
}

/// Removes the entry of `address` in `scope`; with `scope` `None`, the
/// entry for every domain and every scoped one. Returns the entries
/// removed (in force or not).
pub async fn remove(
    state: &dyn SharedState,
    address: &str,
    scope: Option<&str>,
) -> Result<usize, QueueError> {
    let address = address.trim().to_lowercase();
    if let Some(scope) = scope {
        return Ok(usize::from(state.unsuppress(&address, Some(scope)).await?));
    }
    let mut removed = usize::from(state.unsuppress(&address, None).await?);
    // Expired entries are not listed; they no longer suppress anything.
    for e in state.list_suppressed(0).await? {
        if e.address == address
            && let Some(scope) = e.scope.as_deref()
        {
            removed += usize::from(state.unsuppress(&address, Some(scope)).await?);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_lower_cased_and_expire() {
        let e = entry(
            " A@X.Test ",
            SuppressionReason::Bounce,
            Some("Example.COM"),
            Some("550 5.1.1".into()),
            1_000,
            Some(Duration::from_secs(2)),
        );
        assert_eq!(e.address, "a@x.test");
        assert_eq!(e.scope.as_deref(), Some("example.com"));
        assert_eq!(e.key(), "a@x.test/example.com");
        assert_eq!(e.expires_at, Some(3_000));
        assert!(e.applies("example.com", 2_999));
        assert!(!e.applies("other.test", 2_999));
        assert!(!e.applies("example.com", 3_000));
        let global = entry("a@x", SuppressionReason::Manual, None, None, 5, None);
        assert_eq!(global.expires_at, None);
        assert_eq!(global.key(), "a@x");
        assert!(global.applies("any.test", u64::MAX));
    }

    #[test]
    fn entries_stored_before_typed_reasons_still_decode() {
        let table = [
            (
                r#"{"address":"a@x.org","reason":"hard-bounce","remote_reply":"550 5.1.1 no","created_at":1,"expires_at":null}"#,
                SuppressionReason::Bounce,
                Some("550 5.1.1 no"),
            ),
            (
                r#"{"address":"a@x.org","reason":"manual","remote_reply":null,"created_at":1,"expires_at":null}"#,
                SuppressionReason::Manual,
                None,
            ),
            (
                r#"{"address":"a@x.org","reason":"customer asked","remote_reply":null,"created_at":1,"expires_at":null}"#,
                SuppressionReason::Manual,
                Some("customer asked"),
            ),
            (
                r#"{"address":"a@x.org","reason":"unsubscribe","scope":"e.test","remote_reply":null,"created_at":1,"expires_at":null}"#,
                SuppressionReason::Unsubscribe,
                None,
            ),
        ];
        for (json, reason, detail) in table {
            let e: SuppressionEntry = serde_json::from_str(json).unwrap();
            assert_eq!(e.reason, reason, "{json}");
            assert_eq!(e.remote_reply.as_deref(), detail, "{json}");
            let again: SuppressionEntry =
                serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            assert_eq!(again, e);
        }
        let json = serde_json::to_value(entry(
            "a@x",
            SuppressionReason::Complaint,
            None,
            None,
            1,
            None,
        ))
        .unwrap();
        assert_eq!(json["reason"], "complaint");
    }
}
