//! The feedback loop's settings: the relay-wide `feedback:` section (the
//! key of VERP and unsubscribe tokens), each listener's `role`, and each
//! domain's `unsubscribe`, `feedbackId` and `reputation`.
//!
//! A domain with a `returnPathDomain` sends with a traceable envelope
//! sender (`b+<token>@<returnPathDomain>`), so a bounce that comes back
//! hours later to a `role: feedback` listener names the message and the
//! recipient it is about. Every relay pod must share the token key.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validate::FieldError;
use super::{AuthMode, Duration, RelayConfig};

/// Relay-wide feedback settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeedbackConfig {
    /// File holding the secret (at least 32 bytes, raw or base64 text)
    /// from which the relay derives the keys of VERP and unsubscribe
    /// tokens (each with its own purpose label, so the file may be the
    /// same as `tracking.keyFile`). Required with the Redis queue when a
    /// domain has a `returnPathDomain` or enables `unsubscribe` (all pods
    /// must share it); with the embedded queue the relay creates
    /// `feedback.key` beside the queue file when absent, and logs so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl FeedbackConfig {
    /// True when nothing is set (the section is left out of rendered YAML).
    pub fn is_default(&self) -> bool {
        *self == FeedbackConfig::default()
    }
}

/// What a listener is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerRole {
    /// Apps submit mail to relay (today's behaviour).
    #[default]
    Submission,
    /// The return path: accepts mail only for the configured return-path
    /// domains (DSNs, ARF reports, mailto unsubscribes), never relays,
    /// needs no AUTH, and answers everything else with 550 5.7.1.
    Feedback,
}

impl ListenerRole {
    /// True for the default role (left out of rendered YAML).
    pub fn is_default(&self) -> bool {
        *self == ListenerRole::Submission
    }
}

/// RFC 8058 one-click unsubscribe of one sending domain
/// (`domains[].unsubscribe`, and as is the SendingDomain's `spec.unsubscribe`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainUnsubscribe {
    /// Add `List-Unsubscribe` and `List-Unsubscribe-Post` to this domain's
    /// mail (before DKIM signing, so the signature covers them).
    #[serde(default)]
    pub enabled: bool,
    /// `https://` URL routed to the relay's HTTP port; links are
    /// `<baseUrl>/u/<token>`.
    #[schemars(
        length(min = 9, max = 1024),
        regex(pattern = r"^https://[^/?#\s][^?#\s]*$")
    )]
    pub base_url: String,
    /// What to do when the message already has a `List-Unsubscribe`.
    #[serde(default)]
    pub mode: UnsubscribeMode,
}

/// Whether an app's own `List-Unsubscribe` is kept: add-if-missing (default) or replace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UnsubscribeMode {
    /// Keep the app's header (and its `List-Unsubscribe-Post`), add ours
    /// only to messages without one.
    #[default]
    AddIfMissing,
    /// Replace the app's headers with ours.
    Replace,
}

/// A percentage, written `5%` or `0.1%` (a bare number means percent too).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    /// `value` percent.
    pub const fn new(value: f64) -> Percent {
        Percent(value)
    }

    /// The value in percent (5.0 for `5%`).
    pub fn percent(self) -> f64 {
        self.0
    }

    /// The value as a fraction (0.05 for `5%`).
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

// Rates are compared, never hashed; a config never holds NaN (parse refuses it).
impl Eq for Percent {}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Percent, String> {
        let number = s.trim().strip_suffix('%').unwrap_or(s.trim()).trim();
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage (write 5% or 0.1%)"))?;
        if !value.is_finite() || !(0.0..=100.0).contains(&value) {
            return Err(format!("{s:?} must be between 0% and 100%"));
        }
        Ok(Percent(value))
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Percent, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string().parse(),
            Raw::Text(t) => t.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// The reputation guard of one sending domain (`domains[].reputation`):
/// over a rolling window shared by all pods, a domain whose hard-bounce
/// or complaint rate exceeds its threshold is paused (451 4.7.1 for new
/// mail, queued mail held) until resumed; half a threshold warns first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reputation {
    /// Whether the guard pauses the domain. When off, rates are still
    /// measured and exported.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Hard bounces / (delivered + hard bounces) above which the domain pauses.
    #[serde(default = "default_max_bounce_rate")]
    pub max_bounce_rate: Percent,
    /// Complaints / delivered above which the domain pauses.
    #[serde(default = "default_max_complaint_rate")]
    pub max_complaint_rate: Percent,
    /// Fewest messages (delivered + hard bounces) in the window before a
    /// rate counts: a handful of bounces on a quiet day pauses nothing.
    #[serde(default = "default_min_volume")]
    pub min_volume: u64,
    /// Length of the rolling window.
    #[serde(default = "default_window")]
    pub window: Duration,
    /// Resume by itself this long after pausing. Absent: a pause lasts
    /// until the `petrel.dev/resume` annotation (or the admin API) resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume_after: Option<Duration>,
}

fn default_true() -> bool {
    true
}

fn default_max_bounce_rate() -> Percent {
    Percent(5.0)
}

fn default_max_complaint_rate() -> Percent {
    Percent(0.1)
}

fn default_min_volume() -> u64 {
    500
}

fn default_window() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for Reputation {
    fn default() -> Self {
        Reputation {
            enabled: true,
            max_bounce_rate: default_max_bounce_rate(),
            max_complaint_rate: default_max_complaint_rate(),
            min_volume: default_min_volume(),
            window: default_window(),
            auto_resume_after: None,
        }
    }
}

impl Reputation {
    /// True for the defaults (left out of rendered YAML).
    pub fn is_default(&self) -> bool {
        *self == Reputation::default()
    }
}

/// Placeholders a `feedbackId` template may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedbackIdPart {
    /// Text copied as is.
    Literal(String),
    /// `{domain}`: the sending domain.
    Domain,
    /// `{tag:NAME}`: the message's tag `NAME` (empty when absent).
    Tag(String),
}

/// Parses a `feedbackId` template such as
/// `{tag:campaign}:{tag:customer}:{domain}:petrel`.
pub fn parse_feedback_id(template: &str) -> Result<Vec<FeedbackIdPart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(FeedbackIdPart::Literal(rest[..open].to_string()));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let name = &after[..close];
        parts.push(match name.split_once(':') {
            None if name == "domain" => FeedbackIdPart::Domain,
            Some(("tag", tag)) if !tag.is_empty() => FeedbackIdPart::Tag(tag.to_string()),
            _ => {
                return Err(format!(
                    "unknown placeholder {{{name}}} (use {{domain}} or {{tag:NAME}})"
                ));
            }
        });
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unmatched '}}' in {template:?}"));
    }
    if !rest.is_empty() {
        parts.push(FeedbackIdPart::Literal(rest.to_string()));
    }
    if template.bytes().any(|b| b.is_ascii_control()) {
        return Err("must not contain control characters".to_string());
    }
    Ok(parts)
}

impl RelayConfig {
    /// True when some domain sends with a traceable return path or adds
    /// unsubscribe headers, so the relay needs the feedback key.
    pub fn feedback_key_needed(&self) -> bool {
        self.domains.iter().any(|d| {
            d.return_path_domain.is_some() || d.unsubscribe.as_ref().is_some_and(|u| u.enabled)
        })
    }

    pub(super) fn check_feedback(&self, errors: &mut Vec<FieldError>) {
        for (i, l) in self.listeners.iter().enumerate() {
            if l.role == ListenerRole::Feedback && l.auth != AuthMode::None {
                errors.push(FieldError::new(
                    format!("listeners[{i}].auth"),
                    "must be none on a listener with role: feedback (bounces and reports \
                     come from any server, unauthenticated)",
                ));
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            if let Some(u) = &d.unsubscribe {
                let at = format!("domains[{i}].unsubscribe.baseUrl");
                let rest = u.base_url.strip_prefix("https://");
                match rest {
                    None => errors.push(FieldError::new(at, "must be an https:// URL")),
                    Some(rest)
                        if rest.is_empty()
                            || rest.starts_with('/')
                            || rest.contains(['?', '#', ' ']) =>
                    {
                        errors.push(FieldError::new(
                            at,
                            "must be https://host[/path] without query or fragment",
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some(t) = &d.feedback_id
                && let Err(why) = parse_feedback_id(t)
            {
                errors.push(FieldError::new(format!("domains[{i}].feedbackId"), why));
            }
            let r = &d.reputation;
            let at = |f: &str| format!("domains[{i}].reputation.{f}");
            if r.max_bounce_rate.percent() <= 0.0 {
                errors.push(FieldError::new(at("maxBounceRate"), "must be above 0%"));
            }
            if r.max_complaint_rate.percent() <= 0.0 {
                errors.push(FieldError::new(at("maxComplaintRate"), "must be above 0%"));
            }
            if r.min_volume == 0 {
                errors.push(FieldError::new(at("minVolume"), "must be at least 1"));
            }
            if std::time::Duration::from(r.window) < std::time::Duration::from_secs(60) {
                errors.push(FieldError::new(at("window"), "must be at least 1m"));
            }
        }
        if let Some(path) = &self.feedback.key_file
            && path.as_os_str().is_empty()
        {
            errors.push(FieldError::new("feedback.keyFile", "must not be empty"));
        }
        if self.feedback_key_needed()
            && self.feedback.key_file.is_none()
            && self.queue.embedded.is_none()
        {
            errors.push(FieldError::new(
                "feedback.keyFile",
                "required with the redis queue when a domain has a returnPathDomain or \
                 enables unsubscribe: every pod must seal and open tokens with the same key",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_parse_with_or_without_the_sign() {
        assert_eq!("5%".parse::<Percent>().unwrap().fraction(), 0.05);
        assert_eq!(" 0.1 % ".parse::<Percent>().unwrap().percent(), 0.1);
        let p: Percent = serde_yaml::from_str("2.5").unwrap();
        assert_eq!(p.percent(), 2.5);
        assert_eq!(serde_yaml::to_string(&Percent(0.1)).unwrap().trim(), "0.1%");
        for bad in ["abc", "101%", "-1%", "NaN%"] {
            assert!(bad.parse::<Percent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reputation_defaults_are_the_documented_ones() {
        let r: Reputation = serde_yaml::from_str("{}").unwrap();
        assert_eq!(r, Reputation::default());
        assert!(r.enabled);
        assert_eq!(r.max_bounce_rate.percent(), 5.0);
        assert_eq!(r.max_complaint_rate.percent(), 0.1);
        assert_eq!(r.min_volume, 500);
        assert_eq!(
            std::time::Duration::from(r.window),
            std::time::Duration::from_secs(86_400)
        );
    }

    #[test]
    fn feedback_id_templates() {
        assert_eq!(
            parse_feedback_id("{tag:campaign}:{domain}:petrel").unwrap(),
            vec![
                FeedbackIdPart::Tag("campaign".into()),
                FeedbackIdPart::Literal(":".into()),
                FeedbackIdPart::Domain,
                FeedbackIdPart::Literal(":petrel".into()),
            ]
        );
        for bad in ["{tag:}", "{nope}", "{domain", "x}", "{tag:a}\r\n"] {
            assert!(parse_feedback_id(bad).is_err(), "{bad:?}");
        }
    }
}
