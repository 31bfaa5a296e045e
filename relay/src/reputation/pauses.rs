//! This pod's recent answers to "is this sending domain paused?", so the
//! hot paths (every MAIL FROM and `POST /v1/send`, every delivery batch)
//! do not read the shared record from the backend each time: at a few
//! thousand messages a second those reads were two of the seven Redis
//! round trips a message cost.
//!
//! An answer is reused for [`FRESH_FOR`]. Changes this pod makes (an
//! evaluation, a resume) replace it at once; a pause or resume made by
//! another pod is seen here within [`FRESH_FOR`]. Pauses are decided over
//! windows of hours, so a second of lag lets through at most a second of
//! one pod's mail, which the pause then holds like any other queued mail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::state::DomainState;
use crate::queue::Millis;

/// How long an answer read from the backend is reused.
pub const FRESH_FOR: Millis = 1_000;

/// Whether an answer noted at `noted_at` may still be used at `now`. A
/// clock that went back makes it stale rather than fresh for as long as
/// the jump.
pub fn is_fresh(noted_at: Millis, now: Millis) -> bool {
    noted_at <= now && now - noted_at < FRESH_FOR
}

#[derive(Clone, Debug)]
struct Noted {
    at: Millis,
    /// The pause's message when paused.
    paused: Option<String>,
}

/// The answers, per lower-cased sending domain. Cheap to clone; clones
/// share them.
#[derive(Clone, Default)]
pub struct Pauses {
    noted: Arc<Mutex<HashMap<String, Noted>>>,
}

impl Pauses {
    /// The answer for `domain` if one fresh at `now` is noted: `Some(None)`
    /// when not paused, `Some(Some(message))` when paused.
    pub fn fresh(&self, domain: &str, now: Millis) -> Option<Option<String>> {
        let noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted
            .get(domain)
            .filter(|n| is_fresh(n.at, now))
            .map(|n| n.paused.clone())
    }

    /// Notes `record`, just read or written, as the answer for `domain`.
    pub fn note(&self, domain: &str, record: &DomainState, now: Millis) {
        let paused = record.is_paused().then(|| {
            record
                .message
                .clone()
                .unwrap_or_else(|| "reputation".into())
        });
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted.insert(domain.to_string(), Noted { at: now, paused });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reputation::Level;

    fn paused(message: &str) -> DomainState {
        DomainState {
            level: Level::Paused,
            message: Some(message.into()),
            ..DomainState::default()
        }
    }

    #[test]
    fn an_answer_is_reused_for_a_second_then_read_again() {
        assert!(is_fresh(1_000, 1_000));
        assert!(is_fresh(1_000, 1_999));
        assert!(!is_fresh(1_000, 2_000));
        // The clock went back: read again rather than trust it longer.
        assert!(!is_fresh(5_000, 4_000));
    }

    #[test]
    fn the_latest_note_wins_and_clones_share_it() {
        let pauses = Pauses::default();
        let other = pauses.clone();
        assert_eq!(pauses.fresh("example.test", 0), None);
        pauses.note("example.test", &DomainState::default(), 100);
        assert_eq!(other.fresh("example.test", 200), Some(None));
        other.note("example.test", &paused("bounce rate 7%"), 300);
        assert_eq!(
            pauses.fresh("example.test", 400),
            Some(Some("bounce rate 7%".to_string()))
        );
        assert_eq!(pauses.fresh("example.test", 300 + FRESH_FOR), None);
        assert_eq!(pauses.fresh("other.test", 400), None);
    }
}
