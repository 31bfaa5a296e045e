//! When to try a deferred unit again, and when to stop trying. Pure
//! functions of the unit's history and the config, so the schedule is
//! tested without clocks.

use std::time::Duration;

use crate::queue::Millis;

/// The retry policy from `delivery` in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Waits after the 1st, 2nd, ... failed attempt; the last repeats.
    pub schedule: Vec<Duration>,
    /// Age (from acceptance) after which a message bounces.
    pub max_lifetime: Duration,
    /// Age after which a "delayed" DSN goes out once; never when `None`.
    pub delayed_dsn_after: Option<Duration>,
}

/// What to do with recipients that failed temporarily.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time.
    RetryAt(Millis),
    /// The message is too old: bounce (status 4.4.7 in the DSN).
    Expire,
}

/// Fallback when the schedule is empty (validation should prevent it).
const DEFAULT_DELAY: Duration = Duration::from_secs(300);

/// The wait after `attempts` failed attempts (1 = first failure): step
/// `attempts - 1` of the schedule, the last step repeating.
pub fn delay_after(schedule: &[Duration], attempts: u32) -> Duration {
    let index = attempts.saturating_sub(1) as usize;
    schedule
        .get(index)
        .or(schedule.last())
        .copied()
        .unwrap_or(DEFAULT_DELAY)
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RetryPolicy {
    /// The decision after a temporary failure at `now`, for a message
    /// accepted at `received_at` that has now failed `attempts` times
    /// (this failure included).
    ///
    /// A retry that would fall after the expiry is pulled in to the expiry
    /// time, so the last attempt happens right at the deadline instead of
    /// the message bouncing without one.
    pub fn decide(&self, received_at: Millis, attempts: u32, now: Millis) -> RetryDecision {
        let expires_at = received_at.saturating_add(millis(self.max_lifetime));
        if now >= expires_at {
            return RetryDecision::Expire;
        }
        let next = now.saturating_add(millis(delay_after(&self.schedule, attempts)));
        RetryDecision::RetryAt(next.min(expires_at))
    }

    /// When the message expires.
    pub fn expires_at(&self, received_at: Millis) -> Millis {
        received_at.saturating_add(millis(self.max_lifetime))
    }

    /// Whether a "delayed" DSN is due now: configured, not yet sent, and
    /// the message is older than the threshold.
    pub fn delayed_dsn_due(&self, received_at: Millis, already_sent: bool, now: Millis) -> bool {
        match self.delayed_dsn_after {
            Some(after) => !already_sent && now.saturating_sub(received_at) >= millis(after),
            None => false,
        }
    }
}

/// A short wait for a unit that hit a rate or connection limit: a second
/// or so, spread by `jitter` (0..1000 ms) so pods do not retry in lockstep.
pub fn throttle_delay(base: Duration, jitter_ms: u64) -> Duration {
    base + Duration::from_millis(jitter_ms % 1000)
}

/// The retry policy `cfg` sets.
pub(crate) fn policy(cfg: &petrel_crds::config::RelayConfig) -> RetryPolicy {
    RetryPolicy {
        schedule: cfg
            .delivery
            .retry_schedule
            .iter()
            .map(|d| d.get())
            .collect(),
        max_lifetime: cfg.delivery.max_queue_lifetime.get(),
        delayed_dsn_after: cfg.delivery.delayed_dsn_after.map(|d| d.get()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![s(60), s(300), s(900)],
            max_lifetime: s(3600),
            delayed_dsn_after: Some(s(600)),
        }
    }

    #[test]
    fn schedule_steps_then_repeats_the_last() {
        let schedule = [s(60), s(300), s(900)];
        let got: Vec<u64> = (0..6)
            .map(|a| delay_after(&schedule, a).as_secs())
            .collect();
        assert_eq!(got, [60, 60, 300, 900, 900, 900]);
        assert_eq!(delay_after(&[], 3), DEFAULT_DELAY);
    }

    #[test]
    fn retries_until_the_lifetime_then_expires() {
        let p = policy();
        assert_eq!(p.decide(0, 1, 1_000), RetryDecision::RetryAt(61_000));
        assert_eq!(p.decide(0, 3, 10_000), RetryDecision::RetryAt(910_000));
        // The retry is pulled in to the deadline rather than skipped.
        assert_eq!(p.decide(0, 9, 3_000_000), RetryDecision::RetryAt(3_600_000));
        assert_eq!(p.decide(0, 9, 3_600_000), RetryDecision::Expire);
        assert_eq!(p.decide(0, 9, 9_999_999), RetryDecision::Expire);
    }

    #[test]
    fn delayed_dsn_goes_out_once_past_the_threshold() {
        let p = policy();
        assert!(!p.delayed_dsn_due(0, false, 599_999));
        assert!(p.delayed_dsn_due(0, false, 600_000));
        assert!(!p.delayed_dsn_due(0, true, 700_000));
        let off = RetryPolicy {
            delayed_dsn_after: None,
            ..policy()
        };
        assert!(!off.delayed_dsn_due(0, false, 9_999_999));
    }

    #[test]
    fn throttle_delay_is_short_and_jittered() {
        assert_eq!(throttle_delay(s(1), 250), Duration::from_millis(1250));
        assert_eq!(throttle_delay(s(1), 1999), Duration::from_millis(1999));
    }
}
