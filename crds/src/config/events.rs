//! `events`: the event outbox (what became of every message). Webhooks
//! that consume it are configured here too.

use serde::{Deserialize, Serialize};

use super::Duration;

/// The event outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsConfig {
    /// How long events are kept in the outbox (`3d`). Older events are
    /// trimmed, except those a webhook has not acknowledged yet.
    #[serde(default = "default_retention")]
    pub retention: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: default_retention(),
        }
    }
}

fn default_retention() -> Duration {
    Duration::from_secs(3 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_defaults_to_three_days() {
        let empty: EventsConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty.retention.as_secs(), 3 * 24 * 3600);
        let set: EventsConfig = serde_yaml::from_str("retention: 12h").unwrap();
        assert_eq!(set.retention.as_secs(), 12 * 3600);
        assert!(serde_yaml::from_str::<EventsConfig>("retension: 1d").is_err());
    }
}
