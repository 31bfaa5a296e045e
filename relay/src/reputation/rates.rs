//! The decision, pure: counts over the window in, rates and a verdict out.
//!
//! bounce rate = hard bounces / (delivered + hard bounces);
//! complaint rate = complaints / delivered. Below `minVolume` messages
//! (delivered + hard bounces) no rate counts: a handful of bounces on a
//! quiet day must not pause a domain. Half a threshold warns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Reputation;

/// What one sending domain did over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Recipients delivered.
    pub delivered: u64,
    /// Recipients hard-bounced (at delivery or by a returned DSN).
    pub bounced: u64,
    /// Complaints (ARF reports).
    pub complaints: u64,
}

impl Counts {
    /// Messages the rates are about: delivered + hard bounces.
    pub fn volume(&self) -> u64 {
        self.delivered.saturating_add(self.bounced)
    }

    /// Hard bounces / (delivered + hard bounces); 0 without volume.
    pub fn bounce_rate(&self) -> f64 {
        ratio(self.bounced, self.volume())
    }

    /// Complaints / delivered; 0 with nothing delivered.
    pub fn complaint_rate(&self) -> f64 {
        ratio(self.complaints, self.delivered)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Which threshold a domain crossed. Serialized as the operator's
/// condition reason (`BounceRateExceeded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// The bounce rate is over (or, warning, at half of) `maxBounceRate`.
    BounceRateExceeded,
    /// The complaint rate is over (or at half of) `maxComplaintRate`.
    ComplaintRateExceeded,
}

/// How a domain stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below half of every threshold (or too little volume to tell).
    #[default]
    Ok,
    /// At or over half of a threshold.
    Warning,
    /// Over a threshold: new mail refused, queued mail held.
    Paused,
}

impl Level {
    /// The value of `petrel_reputation_state{domain}`.
    pub fn gauge(self) -> i64 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Paused => 2,
        }
    }
}

/// What the counts say right now, before any pause is remembered.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Ok, warning, or over a threshold (Paused).
    pub level: Level,
    /// The threshold concerned (None when Ok).
    pub reason: Option<Reason>,
    /// `bounce rate 7.2% over 24h exceeds 5%` (None when Ok).
    pub message: Option<String>,
}

/// Assesses `counts` against the domain's thresholds. The bounce rate is
/// looked at first: a domain over both is paused for its bounces. With
/// the guard off (`enabled: false`) a domain can warn but never pause.
pub fn assess(counts: &Counts, config: &Reputation) -> Verdict {
    let ok = Verdict {
        level: Level::Ok,
        reason: None,
        message: None,
    };
    if counts.volume() < config.min_volume {
        return ok;
    }
    let window = format_window(config.window.into());
    let checks = [
        (
            Reason::BounceRateExceeded,
            "bounce rate",
            counts.bounce_rate(),
            config.max_bounce_rate,
        ),
        (
            Reason::ComplaintRateExceeded,
            "complaint rate",
            counts.complaint_rate(),
            config.max_complaint_rate,
        ),
    ];
    for (reason, what, rate, max) in checks {
        if rate > max.fraction() {
            let message = format!(
                "{what} {} over {window} exceeds {max}",
                format_percent(rate * 100.0)
            );
            let level = if config.enabled {
                Level::Paused
            } else {
                Level::Warning
            };
            return Verdict {
                level,
                reason: Some(reason),
                message: Some(message),
            };
        }
    }
    for (reason, what, rate, max) in checks {
        if rate >= max.fraction() / 2.0 {
            return Verdict {
                level: Level::Warning,
                reason: Some(reason),
                message: Some(format!(
                    "{what} {} over {window} is at least half of {max}",
                    format_percent(rate * 100.0)
                )),
            };
        }
    }
    ok
}

/// A percentage for people: one decimal from 1% up (`7.2`), two below
/// (`0.25`), trailing zeros dropped (`5`, `0.1`).
pub fn format_percent(percent: f64) -> String {
    let decimals = if percent >= 1.0 { 1 } else { 2 };
    let text = format!("{percent:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text}%")
}

/// A window as operators write it: `24h` rather than `1d` up to three
/// days, then days; minutes or seconds for short ones.
pub fn format_window(window: Duration) -> String {
    let secs = window.as_secs();
    if secs >= 3 * 86_400 && secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else if secs >= 3_600 && secs.is_multiple_of(3_600) {
        format!("{}h", secs / 3_600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Percent;

    fn counts(delivered: u64, bounced: u64, complaints: u64) -> Counts {
        Counts {
            delivered,
            bounced,
            complaints,
        }
    }

    #[test]
    fn rates_follow_the_documented_formulas() {
        let c = counts(464, 36, 2);
        assert_eq!(c.volume(), 500);
        assert!((c.bounce_rate() - 0.072).abs() < 1e-12);
        assert!((c.complaint_rate() - 2.0 / 464.0).abs() < 1e-12);
        assert_eq!(counts(0, 0, 3).bounce_rate(), 0.0);
        assert_eq!(counts(0, 4, 3).complaint_rate(), 0.0);
        assert_eq!(counts(0, 4, 0).bounce_rate(), 1.0);
    }

    #[test]
    fn verdicts_at_and_around_the_thresholds() {
        let config = Reputation::default(); // 5%, 0.1%, 500, 24h
        let table: Vec<(Counts, Level, Option<Reason>, Option<&str>)> = vec![
            (counts(0, 0, 0), Level::Ok, None, None),
            // Too little volume, however bad.
            (counts(100, 399, 50), Level::Ok, None, None),
            (
                counts(464, 36, 0),
                Level::Paused,
                Some(Reason::BounceRateExceeded),
                Some("bounce rate 7.2% over 24h exceeds 5%"),
            ),
            // Exactly at the threshold does not exceed it: a warning.
            (
                counts(950, 50, 0),
                Level::Warning,
                Some(Reason::BounceRateExceeded),
                Some("bounce rate 5% over 24h is at least half of 5%"),
            ),
            (
                counts(975, 25, 0),
                Level::Warning,
                Some(Reason::BounceRateExceeded),
                Some("bounce rate 2.5% over 24h is at least half of 5%"),
            ),
            (counts(976, 24, 0), Level::Ok, None, None),
            (
                counts(4000, 0, 6),
                Level::Paused,
                Some(Reason::ComplaintRateExceeded),
                Some("complaint rate 0.15% over 24h exceeds 0.1%"),
            ),
            (
                counts(5000, 0, 3),
                Level::Warning,
                Some(Reason::ComplaintRateExceeded),
                Some("complaint rate 0.06% over 24h is at least half of 0.1%"),
            ),
            // Over both: the bounces are named.
            (
                counts(900, 100, 10),
                Level::Paused,
                Some(Reason::BounceRateExceeded),
                Some("bounce rate 10% over 24h exceeds 5%"),
            ),
            // A warning on bounces does not hide complaints over the line.
            (
                counts(970, 30, 5),
                Level::Paused,
                Some(Reason::ComplaintRateExceeded),
                Some("complaint rate 0.52% over 24h exceeds 0.1%"),
            ),
        ];
        for (c, level, reason, message) in table {
            let v = assess(&c, &config);
            assert_eq!(v.level, level, "{c:?}");
            assert_eq!(v.reason, reason, "{c:?}");
            assert_eq!(v.message.as_deref(), message, "{c:?}");
        }
    }

    #[test]
    fn a_disabled_guard_warns_but_never_pauses() {
        let config = Reputation {
            enabled: false,
            ..Reputation::default()
        };
        let v = assess(&counts(464, 36, 0), &config);
        assert_eq!(v.level, Level::Warning);
        assert_eq!(v.reason, Some(Reason::BounceRateExceeded));
    }

    #[test]
    fn thresholds_and_windows_of_the_config_are_used() {
        let config = Reputation {
            max_bounce_rate: Percent::new(20.0),
            min_volume: 10,
            window: std::time::Duration::from_secs(3600).into(),
            ..Reputation::default()
        };
        assert_eq!(
            assess(&counts(7, 3, 0), &config).message.as_deref(),
            Some("bounce rate 30% over 1h exceeds 20%")
        );
        assert_eq!(assess(&counts(6, 3, 0), &config).level, Level::Ok);
    }

    #[test]
    fn formatting() {
        for (p, s) in [
            (7.2, "7.2%"),
            (10.0, "10%"),
            (0.25, "0.25%"),
            (0.1, "0.1%"),
            (0.0, "0%"),
            (100.0, "100%"),
        ] {
            assert_eq!(format_percent(p), s, "{p}");
        }
        for (secs, s) in [
            (86_400, "24h"),
            (2 * 86_400, "48h"),
            (7 * 86_400, "7d"),
            (3_600, "1h"),
            (90 * 60, "90m"),
            (61, "61s"),
        ] {
            assert_eq!(format_window(Duration::from_secs(secs)), s, "{secs}");
        }
    }
}
