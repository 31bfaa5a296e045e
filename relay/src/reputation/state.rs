//! What the pods share about one domain, and how it changes, pure.
//!
//! A pause is remembered: once paused a domain stays paused however its
//! rates move (bounces age out of the window, but nothing was sent to
//! prove the list got better) until it is resumed, by the admin API (the
//! operator's `petrel.dev/resume` annotation) or by `autoResumeAfter`.
//! Resuming starts a new window: the counters are keyed by a
//! `generation` the resume increments, so the old counts are left behind
//! in one write instead of deleted key by key.

use serde::{Deserialize, Serialize};

use super::rates::{Counts, Level, Reason, Verdict};
use crate::config::Reputation;
use crate::queue::Millis;

/// A domain's shared record (one JSON value per domain in the backend).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainState {
    /// Counter generation; a resume starts the next one.
    pub generation: u64,
    /// Ok, warning or paused.
    pub level: Level,
    /// The threshold concerned.
    pub reason: Option<Reason>,
    /// `bounce rate 7.2% over 24h exceeds 5%`.
    pub message: Option<String>,
    /// When the current level began (None when ok).
    pub since: Option<Millis>,
    /// The counts the level was decided on.
    pub counts: Counts,
}

impl DomainState {
    /// Whether new mail is refused and queued mail held.
    pub fn is_paused(&self) -> bool {
        self.level == Level::Paused
    }
}

/// What an evaluation does to the stored record.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Nothing worth a write.
    Keep,
    /// Store this record (a new level, or new counts).
    Store(DomainState),
    /// The pause ran out (`autoResumeAfter`): resume, new window.
    AutoResume,
}

/// The record after assessing `counts` (`verdict`) at `now`.
pub fn next(
    stored: &DomainState,
    counts: Counts,
    verdict: &Verdict,
    config: &Reputation,
    now: Millis,
) -> Change {
    if stored.is_paused() {
        if !config.enabled {
            // Switching the guard off lifts a pause, without a new window.
            return Change::Store(from_verdict(stored, counts, verdict, now));
        }
        if let (Some(after), Some(since)) = (config.auto_resume_after, stored.since) {
            let after =
                u64::try_from(std::time::Duration::from(after).as_millis()).unwrap_or(u64::MAX);
            if now >= since.saturating_add(after) {
                return Change::AutoResume;
            }
        }
        // The pause keeps its reason, message and counts: what paused it.
        return Change::Keep;
    }
    let fresh = from_verdict(stored, counts, verdict, now);
    if fresh == *stored {
        Change::Keep
    } else {
        Change::Store(fresh)
    }
}

fn from_verdict(
    stored: &DomainState,
    counts: Counts,
    verdict: &Verdict,
    now: Millis,
) -> DomainState {
    let since = match verdict.level {
        Level::Ok => None,
        level if level == stored.level => stored.since.or(Some(now)),
        _ => Some(now),
    };
    DomainState {
        generation: stored.generation,
        level: verdict.level,
        reason: verdict.reason,
        message: verdict.message.clone(),
        since,
        counts,
    }
}

/// The record right after a resume: ok, nothing counted, a new window.
pub fn resumed(stored: &DomainState) -> DomainState {
    DomainState {
        generation: stored.generation.wrapping_add(1),
        ..DomainState::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::rates::assess;
    use super::*;

    const H: Millis = 3_600_000;

    fn counts(delivered: u64, bounced: u64) -> Counts {
        Counts {
            delivered,
            bounced,
            complaints: 0,
        }
    }

    fn step(stored: &DomainState, c: Counts, config: &Reputation, now: Millis) -> DomainState {
        match next(stored, c, &assess(&c, config), config, now) {
            Change::Keep => stored.clone(),
            Change::Store(s) => s,
            Change::AutoResume => resumed(stored),
        }
    }

    #[test]
    fn a_pause_sticks_until_resumed_and_a_resume_starts_a_new_window() {
        let config = Reputation::default();
        let s0 = DomainState::default();
        let warned = step(&s0, counts(970, 30), &config, H);
        assert_eq!(warned.level, Level::Warning);
        assert_eq!(warned.since, Some(H));
        // Still warning later: `since` stays when the warning began.
        let warned2 = step(&warned, counts(960, 30), &config, 2 * H);
        assert_eq!(warned2.since, Some(H));
        let paused = step(&warned2, counts(464, 36), &config, 3 * H);
        assert!(paused.is_paused());
        assert_eq!(paused.since, Some(3 * H));
        assert_eq!(
            paused.message.as_deref(),
            Some("bounce rate 7.2% over 24h exceeds 5%")
        );
        // The bounces age out of the window: still paused, same message.
        let later = step(&paused, counts(0, 0), &config, 40 * H);
        assert_eq!(later, paused);
        let resumed = resumed(&later);
        assert_eq!(resumed.level, Level::Ok);
        assert_eq!(resumed.generation, paused.generation + 1);
        assert_eq!(resumed.counts, Counts::default());
    }

    #[test]
    fn auto_resume_after_the_configured_time_only() {
        let config = Reputation {
            auto_resume_after: Some(std::time::Duration::from_secs(6 * 3600).into()),
            ..Reputation::default()
        };
        let paused = step(&DomainState::default(), counts(464, 36), &config, H);
        assert!(paused.is_paused());
        let bad = counts(464, 36);
        assert_eq!(
            next(&paused, bad, &assess(&bad, &config), &config, 7 * H - 1),
            Change::Keep
        );
        assert_eq!(
            next(&paused, bad, &assess(&bad, &config), &config, 7 * H),
            Change::AutoResume
        );
    }

    #[test]
    fn unchanged_counts_write_nothing_and_disabling_lifts_a_pause() {
        let config = Reputation::default();
        let s = step(&DomainState::default(), counts(10, 0), &config, H);
        let c = counts(10, 0);
        assert_eq!(
            next(&s, c, &assess(&c, &config), &config, 2 * H),
            Change::Keep
        );
        let paused = step(&s, counts(464, 36), &config, H);
        let off = Reputation {
            enabled: false,
            ..Reputation::default()
        };
        let lifted = step(&paused, counts(464, 36), &off, 2 * H);
        assert_eq!(lifted.level, Level::Warning);
        assert_eq!(lifted.generation, paused.generation);
    }
}
