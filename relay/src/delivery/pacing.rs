//! Pacing a rate-limited destination (`delivery.perDestinationRate`): the
//! units over the rate are each given a send time of their own, spread at
//! the rate, and postponed once to it, rather than handed back every
//! second until the rate lets them through (which made Redis work grow
//! with the throttled backlog).
//!
//! The send times come from a line shared by all pods: a counter of the
//! places handed out (`rate:dest:<domain>:line`, reserved atomically, a
//! group's surplus at once) and the time of place 0 (`...:base`). Place
//! `n` goes at `base + n * 1000 / rate` ms. When the line has run dry (its
//! next place is less than a window from now) the base is moved so the
//! next place is one window ahead: the current window is full, which is
//! why there is a surplus. Two pods moving the base at once can give
//! places that overlap a little; the per-second counter still decides at
//! send time, and a unit it refuses takes a new place at the end.

use std::ops::Range;
use std::time::Duration;

use crate::queue::{Millis, QueueError, SharedState};

/// The rate's window: `perDestinationRate` is per second.
const WINDOW: Millis = 1000;

/// The send times of a group's surplus and where the line starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// The time of place 0 to use from now on.
    pub base: Millis,
    /// The base moved (it must be stored).
    pub rebased: bool,
    /// One send time per reserved place, in order.
    pub at: Vec<Millis>,
}

/// Send times for the places `places` of a line whose place 0 is at
/// `base` (none yet: a new line), at `rate` per second, decided at `now`.
pub(crate) fn schedule(
    places: Range<u64>,
    base: Option<Millis>,
    rate: u32,
    now: Millis,
) -> Schedule {
    let rate = u64::from(rate.max(1));
    let offset = |place: u64| place.saturating_mul(WINDOW) / rate;
    let earliest = now.saturating_add(WINDOW);
    let (base, rebased) = match base {
        Some(b) if b.saturating_add(offset(places.start)) >= earliest => (b, false),
        // A new line, or one that ran dry: its next place one window out.
        Some(_) | None => (earliest.saturating_sub(offset(places.start)), true),
    };
    let at = places.map(|p| base.saturating_add(offset(p))).collect();
    Schedule { base, rebased, at }
}

fn line_key(destination: &str) -> String {
    format!("rate:dest:{destination}:line")
}

fn base_key(destination: &str) -> String {
    format!("rate:dest:{destination}:base")
}

/// Reserves `count` places in `destination`'s line and returns their send
/// times: three backend round trips for the whole surplus (reserve, read
/// the base, store a moved base). `keep` is how long the line is kept
/// (the queue lifetime: no unit waits longer).
pub(crate) async fn reserve(
    state: &dyn SharedState,
    destination: &str,
    rate: u32,
    count: usize,
    keep: Duration,
    now: Millis,
) -> Result<Vec<Millis>, QueueError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let n = u64::try_from(count).unwrap_or(u64::MAX);
    let end = state.incr_counter(&line_key(destination), n, keep).await?;
    let places = end.saturating_sub(n)..end;
    let base = state
        .get_value(&base_key(destination))
        .await?
        .and_then(|v| v.parse::<Millis>().ok());
    let plan = schedule(places, base, rate, now);
    if plan.rebased {
        state
            .set_value(&base_key(destination), &plan.base.to_string(), keep)
            .await?;
    }
    Ok(plan.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000_000;

    #[test]
    fn a_new_line_starts_one_window_out_and_spreads_at_the_rate() {
        let s = schedule(0..4, None, 10, NOW);
        assert!(s.rebased);
        assert_eq!(s.at, [NOW + 1000, NOW + 1100, NOW + 1200, NOW + 1300]);
    }

    #[test]
    fn later_places_follow_the_line_without_moving_it() {
        let first = schedule(0..4, None, 10, NOW);
        // Another group (or pod) reserves the next places a moment later.
        let next = schedule(4..6, Some(first.base), 10, NOW + 50);
        assert!(!next.rebased);
        assert_eq!(next.base, first.base);
        assert_eq!(next.at, [NOW + 1400, NOW + 1500]);
    }

    #[test]
    fn a_long_backlog_reaches_far_ahead_at_exactly_the_rate() {
        // 100,000 units at 10/s: the last goes 10,000 s after the first.
        let s = schedule(0..100_000, None, 10, NOW);
        assert_eq!(s.at[99_999] - s.at[0], 9_999_900);
        // At most 10 in any one second.
        let first_second = s.at.iter().filter(|&&t| t < s.at[0] + 1000).count();
        assert_eq!(first_second, 10);
    }

    #[test]
    fn a_line_that_ran_dry_moves_ahead_instead_of_bursting() {
        // Places 0..10 went out long ago; the next ones must not all be due
        // at once because their times are in the past.
        let s = schedule(10..13, Some(NOW - 60_000), 5, NOW);
        assert!(s.rebased);
        assert_eq!(s.at, [NOW + 1000, NOW + 1200, NOW + 1400]);
        // Less than a window ahead counts as dry too: the window is full.
        let close = schedule(10..11, Some(NOW - 1_500), 5, NOW);
        assert!(close.rebased);
        assert_eq!(close.at, [NOW + 1000]);
    }

    #[test]
    fn rates_that_do_not_divide_a_second_do_not_drift() {
        let s = schedule(0..7, None, 3, NOW);
        let gaps: Vec<u64> = s.at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [333, 333, 334, 333, 333, 334]);
        // A zero rate (refused by validation) is treated as one per second.
        assert_eq!(schedule(0..2, None, 0, NOW).at, [NOW + 1000, NOW + 2000]);
    }

    #[tokio::test]
    async fn reserving_shares_one_line_between_callers() {
        let state = crate::queue::memory::MemoryBackend::default();
        let day = Duration::from_secs(86_400);
        let a = reserve(&state, "d.test", 10, 3, day, NOW).await.unwrap();
        let b = reserve(&state, "d.test", 10, 2, day, NOW + 10)
            .await
            .unwrap();
        let other = reserve(&state, "e.test", 10, 1, day, NOW).await.unwrap();
        assert_eq!(a, [NOW + 1000, NOW + 1100, NOW + 1200]);
        assert_eq!(b, [NOW + 1300, NOW + 1400]);
        assert_eq!(other, [NOW + 1000]);
        assert!(
            reserve(&state, "d.test", 10, 0, day, NOW)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
