//! `events`: how long the relay keeps its event log, and the signed
//! webhooks it delivers events to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Duration, FieldError};

/// Event log retention and webhooks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsConfig {
    /// How long events are kept in the queue backend. Events a webhook has
    /// not acknowledged yet are kept longer (or counted when dropped).
    #[serde(default = "default_retention")]
    pub retention: Duration,

    /// HTTP endpoints that receive every event (or the chosen types) as
    /// signed JSON batches. Changes take effect without a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: default_retention(),
            webhooks: Vec::new(),
        }
    }
}

impl EventsConfig {
    /// True when nothing differs from the defaults (omitted when rendering).
    pub fn is_default(&self) -> bool {
        *self == EventsConfig::default()
    }
}

fn default_retention() -> Duration {
    Duration::from_secs(3 * 86_400)
}

/// The event types a webhook may subscribe to (the `type` field of an
/// event). The relay checks that this list matches its own event types.
pub const EVENT_TYPES: [&str; 13] = [
    "accepted",
    "rejected",
    "delivered",
    "deferred",
    "delayed",
    "bounced",
    "suppressed",
    "dsn",
    "complained",
    "unsubscribed",
    "opened",
    "clicked",
    "deleted",
];

/// One webhook endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    /// Unique name (a DNS label: lower-case letters, digits, `-`). Names the
    /// webhook's consumer group in the queue (`webhook:<name>`) and its
    /// metrics label; renaming a webhook starts it from the oldest retained
    /// event again.
    pub name: String,

    /// Where batches are POSTed. `https://`, or `http://` only to loopback
    /// or in-cluster hosts (`localhost`, loopback IPs, `*.svc`,
    /// `*.cluster.local`).
    pub url: String,

    /// File holding the HMAC-SHA256 key that signs every request (a mounted
    /// Secret). Surrounding whitespace is ignored; re-read when it changes.
    pub secret_file: PathBuf,

    /// Event types to send; the others are skipped. All types when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,

    /// PEM file of extra CA certificates to trust for this endpoint, on top
    /// of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,

    /// Most events in one request.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: u32,

    /// Most bytes of JSON in one request body (a larger single event is
    /// still sent, alone).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: u32,

    /// Longest wait for one request, connect to the end of the response;
    /// a timeout is retried.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Duration,

    /// Pause after the first failed request; doubled (with jitter) after
    /// each further failure up to `retryMaxBackoff`.
    #[serde(default = "default_retry_initial_backoff")]
    pub retry_initial_backoff: Duration,

    /// Longest pause between two attempts of one batch.
    #[serde(default = "default_retry_max_backoff")]
    pub retry_max_backoff: Duration,

    /// How long a batch is retried before it is dropped (counted in
    /// `petrel_webhook_requests_total{result="dropped"}` and logged).
    #[serde(default = "default_retry_for")]
    pub retry_for: Duration,
}

/// Default of [`Webhook::batch_max_events`].
pub fn default_batch_max_events() -> u32 {
    100
}

/// Default of [`Webhook::batch_max_bytes`]: 256 KiB.
pub fn default_batch_max_bytes() -> u32 {
    256 * 1024
}

/// Default of [`Webhook::request_timeout`].
pub fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Default of [`Webhook::retry_initial_backoff`].
pub fn default_retry_initial_backoff() -> Duration {
    Duration::from_secs(5)
}

/// Default of [`Webhook::retry_max_backoff`].
pub fn default_retry_max_backoff() -> Duration {
    Duration::from_secs(600)
}

/// Default of [`Webhook::retry_for`]: 24 hours, as receivers expect.
pub fn default_retry_for() -> Duration {
    Duration::from_secs(86_400)
}

/// Bounds of the batch knobs: a request must stay something any receiver
/// accepts, and a batch must hold at least one event.
const MAX_BATCH_EVENTS: u32 = 1000;
const MIN_BATCH_BYTES: u32 = 1024;
const MAX_BATCH_BYTES: u32 = 10 * 1024 * 1024;
const MAX_REQUEST_TIMEOUT: u64 = 300;

impl Webhook {
    /// A webhook with every knob at its default.
    pub fn new(name: &str, url: &str, secret_file: impl Into<PathBuf>) -> Webhook {
        Webhook {
            name: name.to_string(),
            url: url.to_string(),
            secret_file: secret_file.into(),
            types: None,
            ca_file: None,
            batch_max_events: default_batch_max_events(),
            batch_max_bytes: default_batch_max_bytes(),
            request_timeout: default_request_timeout(),
            retry_initial_backoff: default_retry_initial_backoff(),
            retry_max_backoff: default_retry_max_backoff(),
            retry_for: default_retry_for(),
        }
    }

    /// Whether events of `kind` (an [`EVENT_TYPES`] name) go to this webhook.
    pub fn wants(&self, kind: &str) -> bool {
        match &self.types {
            None => true,
            Some(types) => types.iter().any(|t| t == kind),
        }
    }
}

/// Checks `events`, pushing errors that name `events.…` field paths.
pub(super) fn check(events: &EventsConfig, errors: &mut Vec<FieldError>) {
    if events.retention.get().is_zero() {
        errors.push(FieldError::new(
            "events.retention",
            "must be greater than zero",
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, w) in events.webhooks.iter().enumerate() {
        let at = format!("events.webhooks[{i}]");
        if let Err(why) = check_name(&w.name) {
            errors.push(FieldError::new(format!("{at}.name"), why));
        } else if let Some(first) = names.insert(&w.name, i) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!("{:?} is already used by events.webhooks[{first}]", w.name),
            ));
        }
        if let Err(why) = check_url(&w.url) {
            errors.push(FieldError::new(format!("{at}.url"), why));
        }
        if w.secret_file.as_os_str().is_empty() {
            errors.push(FieldError::new(
                format!("{at}.secretFile"),
                "must not be empty",
            ));
        }
        if let Some(types) = &w.types {
            if types.is_empty() {
                errors.push(FieldError::new(
                    format!("{at}.types"),
                    "an empty list would send nothing: remove the field for every type",
                ));
            }
            for (j, t) in types.iter().enumerate() {
                if !EVENT_TYPES.contains(&t.as_str()) {
                    errors.push(FieldError::new(
                        format!("{at}.types[{j}]"),
                        format!(
                            "unknown event type {t:?}; one of {}",
                            EVENT_TYPES.join(", ")
                        ),
                    ));
                }
            }
        }
        if w.batch_max_events == 0 || w.batch_max_events > MAX_BATCH_EVENTS {
            errors.push(FieldError::new(
                format!("{at}.batchMaxEvents"),
                format!(
                    "{} is not between 1 and {MAX_BATCH_EVENTS}",
                    w.batch_max_events
                ),
            ));
        }
        if !(MIN_BATCH_BYTES..=MAX_BATCH_BYTES).contains(&w.batch_max_bytes) {
            errors.push(FieldError::new(
                format!("{at}.batchMaxBytes"),
                format!(
                    "{} is not between {MIN_BATCH_BYTES} and {MAX_BATCH_BYTES}",
                    w.batch_max_bytes
                ),
            ));
        }
        let timeout = w.request_timeout.get();
        if timeout.is_zero() || timeout.as_secs() > MAX_REQUEST_TIMEOUT {
            errors.push(FieldError::new(
                format!("{at}.requestTimeout"),
                format!(
                    "{} is not between 1ms and {MAX_REQUEST_TIMEOUT}s",
                    w.request_timeout
                ),
            ));
        }
        for (name, value) in [
            ("retryInitialBackoff", w.retry_initial_backoff),
            ("retryMaxBackoff", w.retry_max_backoff),
            ("retryFor", w.retry_for),
        ] {
            if value.get().is_zero() {
                errors.push(FieldError::new(
                    format!("{at}.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        if w.retry_max_backoff < w.retry_initial_backoff {
            errors.push(FieldError::new(
                format!("{at}.retryMaxBackoff"),
                format!(
                    "{} is shorter than retryInitialBackoff ({})",
                    w.retry_max_backoff, w.retry_initial_backoff
                ),
            ));
        }
    }
}

/// A webhook name: a DNS label (RFC 1123), so it fits a metric label, a
/// consumer group name and a Kubernetes volume name.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a DNS label (1-63 lower-case letters, digits and '-', \
             not starting or ending with '-')"
        ))
    }
}

/// A webhook URL: `https://host[:port][/path]`, or `http://` when the host
/// is loopback or in-cluster, where the network itself is trusted.
pub fn check_url(url: &str) -> Result<(), String> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!(
            "{url:?} must start with https:// (or http:// in-cluster)"
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "{url:?} carries credentials; requests are authenticated by their signature"
        ));
    }
    let host = url_host(authority).ok_or_else(|| format!("{url:?} has no valid host"))?;
    if rest.contains(char::is_whitespace) {
        return Err(format!("{url:?} contains whitespace"));
    }
    if !secure && !is_internal_host(&host) {
        return Err(format!(
            "{url:?}: http:// is only allowed to loopback or in-cluster hosts \
             (localhost, 127.0.0.0/8, ::1, *.svc, *.cluster.local); use https://"
        ));
    }
    Ok(())
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), lower-cased,
/// or `None` when it is empty or the port is not a number.
fn url_host(authority: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(port) = port
        && port.parse::<u16>().ok().filter(|p| *p != 0).is_none()
    {
        return None;
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let valid = !host.is_empty()
        && (host.parse::<IpAddr>().is_ok()
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'));
    valid.then_some(host)
}

/// Loopback, or a name only the cluster's DNS answers.
fn is_internal_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    host == "localhost"
        || host.ends_with(".localhost")
        || host.ends_with(".svc")
        || host.ends_with(".cluster.local")
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

    #[test]
    fn url_validation_table() {
        for (url, ok) in [
            ("https://hooks.example.com/petrel", true),
            ("https://hooks.example.com:8443/a?b=c", true),
            ("https://203.0.113.7/x", true),
            ("http://127.0.0.1:8080/hook", true),
            ("http://127.5.0.1/hook", true),
            ("http://[::1]:9000/", true),
            ("http://localhost:3000", true),
            ("http://app.default.svc/events", true),
            ("http://app.default.svc.cluster.local:80/events", true),
            ("http://app.cluster.local/e", true),
            ("http://hooks.example.com/petrel", false),
            ("http://10.0.0.5/hook", false),
            ("http://svc.example.com/", false),
            ("http://example.svc.evil.com/", false),
            ("ftp://hooks.example.com/", false),
            ("hooks.example.com/petrel", false),
            ("https://", false),
            ("https:///path", false),
            ("https://user:pw@hooks.example.com/", false),
            ("https://hooks.example.com:99999/", false),
            ("https://hooks.example.com:/", false),
            ("https://[not-v6]/", false),
            ("https://hooks example.com/", false),
        ] {
            assert_eq!(check_url(url).is_ok(), ok, "{url}: {:?}", check_url(url));
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for (name, ok) in [
            ("app", true),
            ("app-2", true),
            ("a", true),
            ("", false),
            ("App", false),
            ("-app", false),
            ("app-", false),
            ("app.x", false),
            ("app_x", false),
            (&"a".repeat(64), false),
        ] {
            assert_eq!(check_name(name).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn every_webhook_error_names_its_field() {
        let mut bad = Webhook::new("app", "http://hooks.example.com/", "");
        bad.types = Some(vec!["delivered".into(), "deliverd".into()]);
        bad.batch_max_events = 0;
        bad.batch_max_bytes = 10;
        bad.request_timeout = Duration::from_secs(0);
        bad.retry_initial_backoff = Duration::from_secs(60);
        bad.retry_max_backoff = Duration::from_secs(30);
        let dup = Webhook::new("app", "https://ok.example.com/", "/s");
        let events = EventsConfig {
            retention: Duration::from_secs(0),
            webhooks: vec![Webhook::new("ok", "https://a.example/", "/s"), bad, dup],
        };
        let mut errors = Vec::new();
        check(&events, &mut errors);
        let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let expect = [
            "events.retention: must be greater than zero",
            "events.webhooks[1].url: \"http://hooks.example.com/\": http:// is only allowed",
            "events.webhooks[1].secretFile: must not be empty",
            "events.webhooks[1].types[1]: unknown event type \"deliverd\"",
            "events.webhooks[1].batchMaxEvents: 0 is not between 1 and 1000",
            "events.webhooks[1].batchMaxBytes: 10 is not between",
            "events.webhooks[1].requestTimeout",
            "events.webhooks[1].retryMaxBackoff: 30s is shorter",
            "events.webhooks[2].name: \"app\" is already used by events.webhooks[1]",
        ];
        for e in expect {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expect.len(), "{got:#?}");
    }

    #[test]
    fn an_empty_type_list_is_refused_and_absent_means_all() {
        let mut w = Webhook::new("app", "https://a.example/", "/s");
        assert!(w.wants("delivered") && w.wants("bounced"));
        w.types = Some(vec!["bounced".into()]);
        assert!(w.wants("bounced") && !w.wants("delivered"));
        w.types = Some(vec![]);
        let mut errors = Vec::new();
        check(
            &EventsConfig {
                retention: default_retention(),
                webhooks: vec![w],
            },
            &mut errors,
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "events.webhooks[0].types");
    }
}
