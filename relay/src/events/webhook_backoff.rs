//! When to try a failed batch again, when to give up on it, and how long a
//! claim must outlive a live dispatcher's silences (pure functions).

use std::time::Duration;

/// Pause after the `failures`-th consecutive failure (1 = the first):
/// `initial * 2^(failures-1)`, capped at `max`, then jittered into
/// `[d/2, d)` by `jitter` in `[0, 1)` ("equal jitter"), so pods retrying
/// one dead endpoint spread out instead of hammering it in step, and the
/// pause never collapses to zero.
pub fn backoff(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(32);
    let full = initial
        .checked_mul(1u32 << exponent.min(31))
        .unwrap_or(max)
        .min(max);
    let jitter = jitter.clamp(0.0, 1.0);
    full / 2 + full.mul_f64(jitter / 2.0)
}

/// Whether a batch failing since `first_failure_ms` is given up at `now_ms`.
pub fn gives_up(first_failure_ms: u64, now_ms: u64, retry_for: Duration) -> bool {
    now_ms.saturating_sub(first_failure_ms) >= retry_for.as_millis() as u64
}

/// How long events claimed by a dispatcher may go without renewal before
/// another pod takes them over. The dispatcher renews its claim before each
/// attempt and every third of this while it pauses, so the longest silence of
/// a live one is one request timeout plus a third of this: three request
/// timeouts (10 s at least) leaves a margin for a slow backend.
pub fn reclaim_after(request_timeout: Duration) -> Duration {
    (request_timeout * 3).max(Duration::from_secs(10))
}

/// How often a pausing dispatcher renews its claim.
pub fn renew_every(request_timeout: Duration) -> Duration {
    reclaim_after(request_timeout) / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn backoff_schedule_doubles_to_the_cap_and_stays_within_jitter_bounds() {
        // jitter 0 gives the lower bound d/2, jitter ~1 the upper bound d.
        let table = [
            (1, 5),
            (2, 10),
            (3, 20),
            (4, 40),
            (5, 80),
            (8, 600),
            (40, 600),
        ];
        for (failures, full) in table {
            let low = backoff(failures, S(5), S(600), 0.0);
            let high = backoff(failures, S(5), S(600), 0.999_999);
            assert_eq!(low, S(full) / 2, "failures {failures}");
            assert!(
                high < S(full) && high > S(full) * 99 / 100,
                "failures {failures}: {high:?}"
            );
        }
        // Out-of-range jitter is clamped, not trusted.
        assert_eq!(backoff(1, S(4), S(60), -3.0), S(2));
        assert_eq!(backoff(1, S(4), S(60), 7.0), S(4));
        // Huge attempt counts do not overflow.
        assert_eq!(backoff(u32::MAX, S(1), S(30), 0.0), S(15));
    }

    #[test]
    fn a_day_of_default_retries_is_many_attempts_not_a_few() {
        // With the defaults (5s doubling to 10m) 24h of failures is > 140
        // attempts even with the longest jitter: the endpoint gets a chance
        // about every 10 minutes for a whole day.
        let (mut elapsed, mut attempts) = (Duration::ZERO, 0u32);
        while elapsed < S(86_400) {
            attempts += 1;
            elapsed += backoff(attempts, S(5), S(600), 0.999);
        }
        assert!(attempts > 140, "{attempts}");
    }

    #[test]
    fn giving_up_happens_after_retry_for() {
        assert!(!gives_up(1_000, 1_000, S(10)));
        assert!(!gives_up(1_000, 10_999, S(10)));
        assert!(gives_up(1_000, 11_000, S(10)));
        // A clock that went backwards does not give up.
        assert!(!gives_up(5_000, 1_000, S(10)));
    }

    #[test]
    fn a_live_dispatcher_renews_well_before_its_claim_lapses() {
        for timeout in [S(1), S(10), S(300)] {
            let silence = timeout + renew_every(timeout);
            assert!(silence < reclaim_after(timeout), "{timeout:?}");
        }
        assert_eq!(reclaim_after(S(1)), S(10));
        assert_eq!(reclaim_after(S(10)), S(30));
    }
}
