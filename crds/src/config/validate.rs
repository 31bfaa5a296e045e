//! Validation of a parsed [`RelayConfig`]: every rule that serde's types
//! cannot express, each error naming the field path it is about.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use super::{AuthMode, RelayConfig, TlsMode, Transport};

/// One problem in a config file, at a field path such as `listeners[1].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, with `[i]` for list items.
    pub path: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl FieldError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file parsed, or failed to parse, with these problems.
    #[error("invalid config:\n{}", list(.0))]
    Invalid(Vec<FieldError>),
    /// The config could not be written as YAML.
    #[error("cannot serialise config: {0}")]
    Serialize(String),
}

impl ConfigError {
    /// The field errors, empty for I/O errors.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl RelayConfig {
    /// Checks every cross-field rule and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        self.check_hostname(&mut errors);
        self.check_listeners(&mut errors);
        self.check_trusted_networks(&mut errors);
        self.check_domains(&mut errors);
        self.check_queue(&mut errors);
        self.check_delivery(&mut errors);
        self.check_limits(&mut errors);
        super::events::check(&self.events, &mut errors);
        self.check_tracking(&mut errors);
        self.check_feedback(&mut errors);
        if self.worker_threads == Some(0) {
            errors.push(FieldError::new(
                "workerThreads",
                "must be at least 1; remove the field to size it from the CPUs",
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    fn check_hostname(&self, errors: &mut Vec<FieldError>) {
        if let Err(why) = check_domain_name(&self.hostname) {
            errors.push(FieldError::new("hostname", why));
        }
    }

    fn check_listeners(&self, errors: &mut Vec<FieldError>) {
        if self.listeners.is_empty() {
            errors.push(FieldError::new(
                "listeners",
                "at least one listener is required",
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ports: HashMap<u16, usize> = HashMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            if l.name.trim().is_empty() {
                errors.push(FieldError::new(format!("{at}.name"), "must not be empty"));
            } else if let Some(first) = names.insert(&l.name, i) {
                errors.push(FieldError::new(
                    format!("{at}.name"),
                    format!("{:?} is already used by listeners[{first}]", l.name),
                ));
            }
            let port = l.address.port();
            if port == 0 {
                errors.push(FieldError::new(
                    format!("{at}.address"),
                    "port 0 is not allowed",
                ));
            } else if let Some(&first) = ports.get(&port) {
                errors.push(FieldError::new(
                    format!("{at}.address"),
                    format!("port {port} is already used by listeners[{first}]"),
                ));
            } else {
                ports.insert(port, i);
            }
            if l.tls != TlsMode::None && self.tls.is_none() {
                errors.push(FieldError::new(
                    format!("{at}.tls"),
                    format!(
                        "{} needs certificate files: set tls.certFile and tls.keyFile",
                        l.tls
                    ),
                ));
            }
            if l.auth != AuthMode::None {
                if self.auth_users_file.is_none() {
                    errors.push(FieldError::new(
                        format!("{at}.auth"),
                        "AUTH needs a users file: set authUsersFile",
                    ));
                }
                if l.tls == TlsMode::None && !l.allow_insecure_auth {
                    errors.push(FieldError::new(
                        format!("{at}.auth"),
                        "AUTH without TLS would send passwords in clear: use tls: starttls or implicit, \
                         or set allowInsecureAuth: true",
                    ));
                }
            }
        }
        if self.http.tls && self.tls.is_none() {
            errors.push(FieldError::new(
                "http.tls",
                "serving HTTP over TLS needs certificate files: set tls.certFile and tls.keyFile",
            ));
        }
        if let Some(&i) = ports.get(&self.http.address.port()) {
            errors.push(FieldError::new(
                "http.address",
                format!(
                    "port {} is already used by listeners[{i}]",
                    self.http.address.port()
                ),
            ));
        }
    }

    fn check_trusted_networks(&self, errors: &mut Vec<FieldError>) {
        for (i, net) in self.trusted_networks.iter().enumerate() {
            if net.prefix_len() == 0 {
                errors.push(FieldError::new(
                    format!("trustedNetworks[{i}]"),
                    format!("{net} trusts every address and would make an open relay"),
                ));
            }
        }
    }

    fn check_domains(&self, errors: &mut Vec<FieldError>) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, d) in self.domains.iter().enumerate() {
            let at = format!("domains[{i}]");
            if let Err(why) = check_domain_name(&d.domain) {
                errors.push(FieldError::new(format!("{at}.domain"), why));
            } else if let Some(first) = seen.insert(d.domain.to_ascii_lowercase(), i) {
                errors.push(FieldError::new(
                    format!("{at}.domain"),
                    format!("{} is already configured by domains[{first}]", d.domain),
                ));
            }
            if let Err(why) = check_domain_name(&d.dkim.selector) {
                errors.push(FieldError::new(format!("{at}.dkim.selector"), why));
            }
            if d.dkim.key_file.as_os_str().is_empty() {
                errors.push(FieldError::new(
                    format!("{at}.dkim.keyFile"),
                    "must not be empty",
                ));
            }
            if let Some(rp) = &d.return_path_domain
                && let Err(why) = check_domain_name(rp)
            {
                errors.push(FieldError::new(format!("{at}.returnPathDomain"), why));
            }
            let limits = &d.rate_limits;
            for (name, value) in [
                ("perSecond", limits.per_second),
                ("perHour", limits.per_hour),
                ("perDay", limits.per_day),
                ("dailyQuota", limits.daily_quota),
            ] {
                if value == Some(0) {
                    errors.push(FieldError::new(
                        format!("{at}.rateLimits.{name}"),
                        "0 would stop all mail; remove the field for no limit",
                    ));
                }
            }
        }
    }

    fn check_queue(&self, errors: &mut Vec<FieldError>) {
        let q = &self.queue;
        match (&q.redis, &q.embedded) {
            (None, None) => errors.push(FieldError::new(
                "queue",
                "choose a backend: set queue.redis or queue.embedded",
            )),
            (Some(_), Some(_)) => errors.push(FieldError::new(
                "queue",
                "queue.redis and queue.embedded are exclusive: set one",
            )),
            (Some(r), None) => {
                match (&r.url, &r.url_file) {
                    (None, None) => {
                        errors.push(FieldError::new("queue.redis", "set url or urlFile"))
                    }
                    (Some(_), Some(_)) => errors.push(FieldError::new(
                        "queue.redis",
                        "url and urlFile are exclusive: set one",
                    )),
                    (Some(url), None) => {
                        // The queue's own parser: what passes here connects.
                        if let Err(why) = super::parse_redis_url(url) {
                            errors.push(FieldError::new("queue.redis.url", why));
                        }
                    }
                    (None, Some(_)) => {}
                }
                if r.key_prefix.is_empty()
                    || r.key_prefix.contains(['{', '}'])
                    || r.key_prefix.chars().any(char::is_whitespace)
                {
                    errors.push(FieldError::new(
                        "queue.redis.keyPrefix",
                        "must be non-empty, without braces or spaces (it becomes a hash tag)",
                    ));
                }
                if !(1..=super::MAX_PARTITIONS).contains(&r.partitions) {
                    errors.push(FieldError::new(
                        "queue.redis.partitions",
                        format!(
                            "must be between 1 and {} (got {})",
                            super::MAX_PARTITIONS,
                            r.partitions
                        ),
                    ));
                }
            }
            (None, Some(e)) => {
                if e.path.as_os_str().is_empty() {
                    errors.push(FieldError::new("queue.embedded.path", "must not be empty"));
                }
            }
        }
        if q.lease.as_secs() < 10 {
            errors.push(FieldError::new(
                "queue.lease",
                format!(
                    "{} is too short: a slow delivery would be taken twice (minimum 10s)",
                    q.lease
                ),
            ));
        }
        if q.timeout.get().is_zero() {
            errors.push(FieldError::new(
                "queue.timeout",
                "must be greater than zero",
            ));
        }
    }

    fn check_delivery(&self, errors: &mut Vec<FieldError>) {
        let d = &self.delivery;
        match d.transport {
            Transport::Smarthost if d.smarthost.is_none() => errors.push(FieldError::new(
                "delivery.smarthost",
                "required when delivery.transport is smarthost",
            )),
            Transport::Maildir if d.maildir.is_none() => errors.push(FieldError::new(
                "delivery.maildir",
                "required when delivery.transport is maildir",
            )),
            _ => {}
        }
        if let Some(s) = &d.smarthost {
            if s.host.trim().is_empty() {
                errors.push(FieldError::new(
                    "delivery.smarthost.host",
                    "must not be empty",
                ));
            }
            if s.port == 0 {
                errors.push(FieldError::new(
                    "delivery.smarthost.port",
                    "port 0 is not allowed",
                ));
            }
            if s.username.is_some() != s.password_file.is_some() {
                errors.push(FieldError::new(
                    "delivery.smarthost",
                    "username and passwordFile go together: set both or neither",
                ));
            }
        }
        if d.mx.port == 0 {
            errors.push(FieldError::new("delivery.mx.port", "port 0 is not allowed"));
        }
        if d.retry_schedule.is_empty() {
            errors.push(FieldError::new(
                "delivery.retrySchedule",
                "at least one interval is required",
            ));
        }
        for (i, step) in d.retry_schedule.iter().enumerate() {
            if step.get().is_zero() {
                errors.push(FieldError::new(
                    format!("delivery.retrySchedule[{i}]"),
                    "must be greater than zero",
                ));
            }
        }
        if d.max_queue_lifetime.get().is_zero() {
            errors.push(FieldError::new(
                "delivery.maxQueueLifetime",
                "must be greater than zero",
            ));
        }
        if let Some(delay) = d.delayed_dsn_after
            && delay >= d.max_queue_lifetime
        {
            errors.push(FieldError::new(
                "delivery.delayedDsnAfter",
                format!(
                    "{delay} is not before maxQueueLifetime ({})",
                    d.max_queue_lifetime
                ),
            ));
        }
        if d.per_destination_concurrency == 0 {
            errors.push(FieldError::new(
                "delivery.perDestinationConcurrency",
                "must be at least 1",
            ));
        }
        if d.per_destination_rate == Some(0) {
            errors.push(FieldError::new(
                "delivery.perDestinationRate",
                "0 would stop all mail; remove the field for no limit",
            ));
        }
        if d.workers == 0 {
            errors.push(FieldError::new("delivery.workers", "must be at least 1"));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, p) in d.tls.policies.iter().enumerate() {
            let at = format!("delivery.tls.policies[{i}].domain");
            if let Err(why) = check_domain_name(&p.domain) {
                errors.push(FieldError::new(at, why));
            } else if let Some(first) = seen.insert(p.domain.to_ascii_lowercase(), i) {
                errors.push(FieldError::new(
                    at,
                    format!(
                        "{:?} is already used by delivery.tls.policies[{first}]",
                        p.domain
                    ),
                ));
            }
        }
    }

    fn check_limits(&self, errors: &mut Vec<FieldError>) {
        let l = &self.limits;
        if l.max_message_size < 1024 {
            errors.push(FieldError::new(
                "limits.maxMessageSize",
                "must be at least 1024 bytes",
            ));
        }
        if l.max_recipients == 0 {
            errors.push(FieldError::new(
                "limits.maxRecipients",
                "must be at least 1",
            ));
        }
        if l.max_line_length < 1000 {
            errors.push(FieldError::new(
                "limits.maxLineLength",
                format!(
                    "{} is below RFC 5321's 1000 octets for a text line",
                    l.max_line_length
                ),
            ));
        }
        if l.max_connections == 0 {
            errors.push(FieldError::new(
                "limits.maxConnections",
                "must be at least 1",
            ));
        }
        if l.max_connections_per_client == 0 {
            errors.push(FieldError::new(
                "limits.maxConnectionsPerClient",
                "must be at least 1",
            ));
        } else if l.max_connections_per_client > l.max_connections {
            errors.push(FieldError::new(
                "limits.maxConnectionsPerClient",
                format!(
                    "{} is more than limits.maxConnections ({})",
                    l.max_connections_per_client, l.max_connections
                ),
            ));
        }
        if l.max_errors == 0 {
            errors.push(FieldError::new("limits.maxErrors", "must be at least 1"));
        }
        if l.max_auth_failures == 0 {
            errors.push(FieldError::new(
                "limits.maxAuthFailures",
                "must be at least 1",
            ));
        }
        for (name, value) in [
            ("commandTimeout", l.command_timeout),
            ("dataTimeout", l.data_timeout),
        ] {
            if value.get().is_zero() {
                errors.push(FieldError::new(
                    format!("limits.{name}"),
                    "must be greater than zero",
                ));
            }
        }
    }
}

/// A DNS name as used for domains, selectors and host names: dot-separated
/// labels of letters, digits and hyphens (RFC 1123), 253 bytes at most.
pub(super) fn check_domain_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!("{name:?} is not a valid DNS name"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::RelayConfig;

    const VALID: &str = r#"
hostname: relay.example.test
listeners:
  - name: smtp
    address: 127.0.0.1:2525
  - name: submission
    address: 127.0.0.1:2587
    tls: starttls
    auth: required
tls:
  certFile: /tls/tls.crt
  keyFile: /tls/tls.key
authUsersFile: /auth/users
trustedNetworks: [127.0.0.0/8, "::1/128"]
domains:
  - domain: example.test
    dkim: { selector: petrel1, algorithm: ed25519, keyFile: /keys/example.test.pem }
queue:
  redis: { url: "redis://127.0.0.1:6379" }
delivery:
  retrySchedule: [1m, 5m]
http:
  address: 127.0.0.1:9090
"#;

    fn errors_of(yaml: &str) -> Vec<String> {
        match RelayConfig::from_yaml(yaml) {
            Ok(_) => Vec::new(),
            Err(e) => e.field_errors().iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let c = RelayConfig::from_yaml(VALID).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.delivery.max_queue_lifetime.as_secs(), 5 * 86_400);
        assert_eq!(c.queue.redis.as_ref().unwrap().key_prefix, "petrel");
        assert_eq!(c.limits.max_recipients, 100);
        // What we write is what we read: the operator renders, the relay reads.
        let again = RelayConfig::from_yaml(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_path() {
        let yaml = VALID.replace(
            "    auth: required",
            "    auth: required\n    tsl: implicit",
        );
        let errors = errors_of(&yaml);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("listeners[1]"), "{errors:?}");
        assert!(errors[0].contains("unknown field `tsl`"), "{errors:?}");
        // The path is said once, not repeated by serde_yaml's own prefix.
        assert_eq!(errors[0].matches("listeners[1]").count(), 1, "{errors:?}");
    }

    #[test]
    fn http_tls_needs_certificate_files() {
        let yaml = "listeners: [{name: smtp, address: 127.0.0.1:2525}]\n\
                    queue: {embedded: {path: /q.redb}}\nhttp: {tls: true}\n";
        let errors = errors_of(yaml);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("http.tls: serving HTTP over TLS needs certificate files")),
            "{errors:?}"
        );
        let with_files = format!("{yaml}tls: {{certFile: /tls/crt, keyFile: /tls/key}}\n");
        assert!(
            !errors_of(&with_files)
                .iter()
                .any(|e| e.starts_with("http.tls")),
            "{:?}",
            errors_of(&with_files)
        );
    }

    #[test]
    fn bad_enum_values_name_the_field() {
        let errors = errors_of(&VALID.replace("tls: starttls", "tls: sometimes"));
        assert!(errors[0].starts_with("listeners[1].tls"), "{errors:?}");
    }

    #[test]
    fn every_cross_field_error_is_reported_at_once() {
        let yaml = r#"
hostname: "bad host"
listeners:
  - name: smtp
    address: 127.0.0.1:587
  - name: submission
    address: 0.0.0.0:587
    auth: required
trustedNetworks: [0.0.0.0/0]
domains:
  - domain: example.test
    dkim: { selector: s1, algorithm: rsa2048, keyFile: k }
  - domain: EXAMPLE.test
    dkim: { selector: "bad selector", algorithm: ed25519, keyFile: k }
queue:
  redis: { url: "http://x" }
  embedded: { path: q.redb }
delivery:
  transport: maildir
  retrySchedule: []
limits:
  maxLineLength: 200
http:
  address: 127.0.0.1:587
"#;
        let errors = errors_of(yaml);
        let expect = [
            "hostname: \"bad host\" is not a valid DNS name",
            "listeners[1].address: port 587 is already used by listeners[0]",
            "listeners[1].auth: AUTH needs a users file",
            "listeners[1].auth: AUTH without TLS",
            "http.address: port 587 is already used by listeners[0]",
            "trustedNetworks[0]: 0.0.0.0/0 trusts every address",
            "domains[1].domain: EXAMPLE.test is already configured by domains[0]",
            "domains[1].dkim.selector",
            "queue: queue.redis and queue.embedded are exclusive",
            "delivery.maildir: required when delivery.transport is maildir",
            "delivery.retrySchedule: at least one interval",
            "limits.maxLineLength: 200 is below",
        ];
        for e in expect {
            assert!(
                errors.iter().any(|got| got.starts_with(e)),
                "missing {e:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    }

    #[test]
    fn queue_partitions_must_be_between_one_and_the_maximum() {
        let with = |n: &str| {
            VALID.replace(
                "redis: { url: \"redis://127.0.0.1:6379\" }",
                &format!("redis: {{ url: \"redis://127.0.0.1:6379\", partitions: {n} }}"),
            )
        };
        assert_eq!(errors_of(&with("1")), Vec::<String>::new());
        assert_eq!(errors_of(&with("1024")), Vec::<String>::new());
        for bad in ["0", "1025"] {
            let errors = errors_of(&with(bad));
            assert_eq!(errors.len(), 1, "{errors:#?}");
            assert!(
                errors[0].starts_with("queue.redis.partitions: must be between 1 and 1024"),
                "{errors:#?}"
            );
        }
    }

    #[test]
    fn queue_urls_are_checked_by_the_queue_parser() {
        let url = |u: &str| VALID.replace("redis://127.0.0.1:6379", u);
        // A config file naming a cluster (and one naming Sentinels) loads.
        let path = std::env::temp_dir().join(format!("petrel-cluster-{}.yaml", std::process::id()));
        std::fs::write(&path, url("redis+cluster://:pw@r1:7000,r2:7001")).unwrap();
        let loaded = RelayConfig::load(&path);
        let _ = std::fs::remove_file(&path);
        let loaded = loaded.unwrap();
        assert_eq!(
            loaded.queue.redis.unwrap().url.as_deref(),
            Some("redis+cluster://:pw@r1:7000,r2:7001")
        );
        assert_eq!(
            errors_of(&url("redis+sentinel://s1:26379,s2:26379/mymaster")),
            Vec::<String>::new()
        );
        for (bad, why) in [
            (
                "redis+cluster://r1:7000/1",
                "queue.redis.url: a cluster URL takes no path",
            ),
            (
                "redis+sentinel://s1:26379",
                "queue.redis.url: a sentinel URL needs the master name",
            ),
            (
                "rediss://r:6380",
                "queue.redis.url: rediss:// (TLS to Redis) is not supported",
            ),
            ("http://x", "queue.redis.url: must start with redis://"),
        ] {
            let errors = errors_of(&url(bad));
            assert!(
                errors.len() == 1 && errors[0].starts_with(why),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn durations_without_units_are_refused() {
        let errors = errors_of(&VALID.replace("[1m, 5m]", "[60, 5m]"));
        assert!(
            errors[0].starts_with("delivery.retrySchedule[0]"),
            "{errors:?}"
        );
        assert!(errors[0].contains("a unit is required"), "{errors:?}");
    }
}
