//! Engagement tracking settings: the relay-wide `tracking:` section (the
//! token key) and each domain's `domains[].tracking` opt-in.
//!
//! Tracking is off unless a domain turns it on. The key signs the tokens in
//! tracked links and open pixels, so a link cannot be forged into an open
//! redirect; every relay pod must share it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::RelayConfig;
use super::validate::{FieldError, check_domain_name};

/// Relay-wide tracking settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrackingConfig {
    /// File holding the secret (at least 32 bytes, any format: raw or
    /// base64 text) from which the relay derives the key of tracking tokens.
    /// Each use derives its own key from the file with a purpose label, so
    /// one file may also serve as `feedback.keyFile`. Required with the
    /// Redis queue when a domain enables tracking (all pods must share it);
    /// with the embedded queue the relay creates `tracking.key` beside the
    /// queue file when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl TrackingConfig {
    /// True when nothing is set (the section is left out of rendered YAML).
    pub fn is_default(&self) -> bool {
        *self == TrackingConfig::default()
    }
}

/// Open and click tracking of one sending domain (`domains[].tracking`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainTracking {
    /// Add a 1x1 image to HTML parts, whose fetch records an `opened` event.
    #[serde(default)]
    pub opens: bool,
    /// Rewrite `http(s)` links of HTML parts through the tracking domain,
    /// whose redirect records a `clicked` event.
    #[serde(default)]
    pub clicks: bool,
    /// Host name of tracked links and pixels (`track.example.com`): a CNAME
    /// to the relay's public HTTP endpoint (`SmtpRelay.spec.tracking.hostname`).
    pub domain: String,
    /// Write tracked URLs as `https://` (the Ingress in front of the relay
    /// terminates TLS). `false` writes `http://`, for tests only: mailbox
    /// providers warn about plain-HTTP links.
    #[serde(default = "default_https")]
    pub https: bool,
}

fn default_https() -> bool {
    true
}

impl DomainTracking {
    /// True when opens or clicks are on.
    pub fn enabled(&self) -> bool {
        self.opens || self.clicks
    }

    /// `https` or `http`, per [`DomainTracking::https`].
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }
}

impl RelayConfig {
    /// The tracking settings whose `domain` is `host` (case-insensitive,
    /// port ignored), with the sending domain they belong to.
    pub fn tracking_for_host(&self, host: &str) -> Option<(&str, &DomainTracking)> {
        let host = host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        self.domains.iter().find_map(|d| {
            d.tracking
                .as_ref()
                .filter(|t| t.enabled() && t.domain.eq_ignore_ascii_case(host))
                .map(|t| (d.domain.as_str(), t))
        })
    }

    /// True when some domain enables opens or clicks.
    pub fn tracking_enabled(&self) -> bool {
        self.domains
            .iter()
            .any(|d| d.tracking.as_ref().is_some_and(DomainTracking::enabled))
    }

    pub(super) fn check_tracking(&self, errors: &mut Vec<FieldError>) {
        for (i, d) in self.domains.iter().enumerate() {
            let Some(t) = &d.tracking else { continue };
            let at = format!("domains[{i}].tracking.domain");
            if let Err(why) = check_domain_name(&t.domain) {
                errors.push(FieldError::new(at, why));
            } else if t.domain.eq_ignore_ascii_case(&d.domain) {
                errors.push(FieldError::new(
                    at,
                    "must be a host of its own (track.example.com), not the sending domain",
                ));
            }
        }
        if let Some(path) = &self.tracking.key_file
            && path.as_os_str().is_empty()
        {
            errors.push(FieldError::new("tracking.keyFile", "must not be empty"));
        }
        if self.tracking_enabled()
            && self.tracking.key_file.is_none()
            && self.queue.embedded.is_none()
        {
            errors.push(FieldError::new(
                "tracking.keyFile",
                "required when a domain enables tracking with the redis queue: every pod must \
                 sign and check tokens with the same key",
            ));
        }
    }
}
