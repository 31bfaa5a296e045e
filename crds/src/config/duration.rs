//! Human-readable durations (`90s`, `5m`, `4h`, `5d`) for config files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way people write them: `30s`, `5m`, `1h30m`, `5d`.
///
/// Serialises back to the largest exact unit, so a rendered ConfigMap reads
/// like the CR it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// The std duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whole seconds.
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write e.g. 30s, 5m, 4h, 5d)")]
pub struct ParseDurationError {
    input: String,
    reason: String,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        // A bare number is ambiguous (seconds? milliseconds?); ask for a unit.
        if trimmed.chars().all(|c| c.is_ascii_digit()) {
            return Err(ParseDurationError {
                input: s.to_string(),
                reason: "a unit is required".to_string(),
            });
        }
        humantime::parse_duration(trimmed)
            .map(Duration)
            .map_err(|e| ParseDurationError {
                input: s.to_string(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let secs = d.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs != 0 && secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_human_durations() {
        for (input, secs, printed) in [
            ("30s", 30, "30s"),
            ("5m", 300, "5m"),
            ("90m", 5400, "90m"),
            ("4h", 14_400, "4h"),
            ("5d", 432_000, "5d"),
            ("1h 30m", 5400, "90m"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{input}");
            assert_eq!(d.to_string(), printed, "{input}");
        }
    }

    #[test]
    fn refuses_bare_numbers_and_garbage() {
        assert!("300".parse::<Duration>().is_err());
        assert!("5 fortnights".parse::<Duration>().is_err());
        assert!("".parse::<Duration>().is_err());
    }
}
