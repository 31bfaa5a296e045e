//! `RelayConfig`: the relay's configuration file.
//!
//! This is the one contract between the operator (which renders it into a
//! ConfigMap) and the relay (which reads it, and re-reads it when the mounted
//! file changes). The local quick start uses the same format, so everything a
//! pod can do a laptop can do too.
//!
//! Loading is strict: unknown fields are errors, and [`RelayConfig::validate`]
//! reports every problem at once, each naming the field path
//! (`listeners[1].port: 587 is already used by listeners[0]`), so a typo in a
//! rendered ConfigMap or a hand-written file is found before the relay starts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod duration;
mod events;
mod feedback;
mod outbound_tls;
mod redis_url;
mod startup;
mod tracking;
mod validate;

pub use duration::Duration;
pub use events::{EVENT_TYPES, EventsConfig, Webhook};
pub use feedback::{
    DomainUnsubscribe, FeedbackConfig, FeedbackIdPart, ListenerRole, Percent, Reputation,
    UnsubscribeMode, parse_feedback_id,
};
pub use outbound_tls::{OutboundTls, OutboundTlsConfig, TlsPolicyOverride};
pub use redis_url::{RedisTarget, parse_redis_url};
pub use startup::{StartupConfig, StartupDelivery, StartupHttp, StartupListener, StartupQueue};
pub use tracking::{DomainTracking, TrackingConfig};
pub use validate::{ConfigError, FieldError};

/// The whole relay configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Name the relay gives itself in its SMTP greeting, EHLO, Received
    /// headers and DSNs. Should resolve to the relay's egress address.
    #[serde(default = "default_hostname")]
    pub hostname: String,

    /// SMTP listeners. At least one.
    pub listeners: Vec<Listener>,

    /// Certificate and key for listeners with TLS. Re-read when the files
    /// change, so cert-manager renewals need no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,

    /// File of AUTH users, one `user:hash` per line (hash from
    /// `petrel-relay hash-password`). Re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_users_file: Option<PathBuf>,

    /// Client networks allowed to relay without AUTH (CIDR). Keep this to
    /// the pod network or loopback: anything wider is an open relay.
    #[serde(default)]
    pub trusted_networks: Vec<IpNet>,

    /// Domains the relay signs and sends for. Mail from any other domain is
    /// refused with 550 5.7.1.
    #[serde(default)]
    pub domains: Vec<SendingDomain>,

    /// Where accepted messages wait for delivery.
    pub queue: QueueConfig,

    /// How queued messages leave the relay.
    #[serde(default)]
    pub delivery: DeliveryConfig,

    /// Per-session and per-message limits.
    #[serde(default)]
    pub limits: Limits,

    /// The HTTP server for metrics, health and the send API.
    #[serde(default)]
    pub http: HttpConfig,

    /// Engagement tracking: the key of tracking tokens. Which domains track
    /// opens and clicks is `domains[].tracking`.
    #[serde(default, skip_serializing_if = "TrackingConfig::is_default")]
    pub tracking: TrackingConfig,
    /// The event log (retention) and the webhooks events are sent to.
    #[serde(default, skip_serializing_if = "EventsConfig::is_default")]
    pub events: EventsConfig,
    /// The feedback loop: the key of VERP and unsubscribe tokens. Which
    /// domains use it is `domains[].returnPathDomain` and
    /// `domains[].unsubscribe`.
    #[serde(default, skip_serializing_if = "FeedbackConfig::is_default")]
    pub feedback: FeedbackConfig,
    /// Threads that run the relay's sessions, deliveries and queue calls,
    /// read at start. `1` runs them all on one event loop, with no
    /// wake-ups between threads; scale out with more pods. Unset: `1` when
    /// the process may use two CPUs or fewer (the kernel's CPU quota
    /// counts, so a pod's CPU limit does), else one per CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<u16>,
}

fn default_hostname() -> String {
    "localhost".to_string()
}

/// One SMTP listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Name used in logs and metrics (`smtp`, `submission`).
    pub name: String,
    /// Address to listen on, `ip:port`.
    pub address: SocketAddr,
    /// TLS on this listener.
    #[serde(default)]
    pub tls: TlsMode,
    /// Whether AUTH is offered, and whether it is needed to relay.
    #[serde(default)]
    pub auth: AuthMode,
    /// Offer AUTH on a connection without TLS. Off by default: passwords
    /// would cross the network in clear.
    #[serde(default)]
    pub allow_insecure_auth: bool,
    /// `submission` (apps relay through it; the default) or `feedback`
    /// (the return path: DSNs, ARF reports and mailto unsubscribes for the
    /// configured return-path domains only; never relays).
    #[serde(default, skip_serializing_if = "ListenerRole::is_default")]
    pub role: ListenerRole,
}

/// TLS on an SMTP listener or an outbound connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text only.
    #[default]
    None,
    /// Plain text, upgraded by STARTTLS (port 587 style).
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// AUTH policy of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// AUTH not offered; only trusted networks relay.
    #[default]
    None,
    /// AUTH offered; trusted networks relay without it.
    Optional,
    /// AUTH needed to relay, even from a trusted network.
    Required,
}

/// PEM certificate chain and private key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain (`tls.crt` of a kubernetes.io/tls Secret).
    pub cert_file: PathBuf,
    /// PEM private key (`tls.key`).
    pub key_file: PathBuf,
}

/// A domain the relay sends for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendingDomain {
    /// The domain of MAIL FROM addresses (and subdomains are not included).
    pub domain: String,
    /// The active DKIM key. Exactly one per domain: the operator switches it
    /// in place during rotation, and the relay re-reads it.
    pub dkim: DkimConfig,
    /// AUTH users allowed to send as this domain. Empty: any authenticated
    /// user. Trusted-network clients are not users and may always send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_users: Vec<String>,
    /// What to do with a recipient on the suppression list.
    #[serde(default)]
    pub on_suppressed: SuppressedAction,
    /// Custom return-path (bounce) domain for MAIL FROM on outbound mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path_domain: Option<String>,
    /// Sending rate limits, shared by all relay pods.
    #[serde(default, skip_serializing_if = "RateLimits::is_unlimited")]
    pub rate_limits: RateLimits,
    /// Whether the message's RFC 5322 From (and Sender) must be a sending
    /// domain the client may use, checked at the end of DATA for mail
    /// whose envelope sender is in this domain. `enforce` keeps DKIM `d=`
    /// aligned with From for DMARC and stops a user allowed only this
    /// domain from writing `From: ceo@bank.test`.
    #[serde(default)]
    pub from_header: FromHeaderPolicy,
    /// Open and click tracking of this domain's HTML mail. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<DomainTracking>,
    /// RFC 8058 one-click unsubscribe headers. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<DomainUnsubscribe>,
    /// Template of a signed `Feedback-ID` header (Gmail's feedback loop),
    /// e.g. `{tag:campaign}:{tag:customer}:{domain}:petrel`. None when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_id: Option<String>,
    /// Bounce and complaint thresholds that pause the domain.
    #[serde(default, skip_serializing_if = "Reputation::is_default")]
    pub reputation: Reputation,
}

/// Whether the header From is bound to the sending domains of the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FromHeaderPolicy {
    /// From and Sender must name sending domains the client may use;
    /// otherwise 550 5.7.1 at the end of DATA (HTTP 403).
    #[default]
    Enforce,
    /// No check (mail forwarded on behalf of other domains).
    Off,
}

/// DKIM signing key of a domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimConfig {
    /// Selector: the key's record is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// Signing algorithm; must match the key file.
    pub algorithm: DkimAlgorithm,
    /// PEM private key (PKCS#8 for ed25519, PKCS#1 or PKCS#8 for RSA).
    pub key_file: PathBuf,
}

/// DKIM key algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    /// ed25519-sha256 (RFC 8463): small keys and records.
    Ed25519,
    /// rsa-sha256 with a 2048-bit key: what every verifier understands.
    Rsa2048,
}

/// What happens to mail for a suppressed recipient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuppressedAction {
    /// Refuse at RCPT with 550 5.1.1, so the app sees it at once.
    #[default]
    Refuse,
    /// Accept and drop, with an event, so the app is not told.
    Drop,
}

/// Sending rate limits of one domain; absent fields are unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimits {
    /// Deliveries per second, paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_second: Option<u32>,
    /// Deliveries per hour, paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u32>,
    /// Deliveries per day, paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u32>,
    /// Messages accepted per day; beyond it MAIL FROM gets 451 4.7.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_quota: Option<u32>,
}

impl RateLimits {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == RateLimits::default()
    }
}

/// Queue backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueConfig {
    /// Redis, shared by every relay pod. Exactly one of `redis` and
    /// `embedded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisQueue>,
    /// A local file, for one node (quick start, small installs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedQueue>,
    /// How long a delivery worker holds a unit before another may take it.
    /// A worker that dies loses its lease after this long.
    #[serde(default = "default_lease")]
    pub lease: Duration,
    /// Longest wait for the backend before a client gets 451 4.3.0.
    #[serde(default = "default_queue_timeout")]
    pub timeout: Duration,
}

fn default_lease() -> Duration {
    Duration::from_secs(600)
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Redis connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisQueue {
    /// Queue URL: `redis://host:port[/db]`, `redis+sentinel://s1:port,s2:port/<master>[/db]`
    /// or `redis+cluster://n1:port,n2:port`. One of `url` and `urlFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// File holding the URL (a mounted Secret), so passwords stay out of
    /// the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// Prefix of every key. A message's keys carry its partition's hash
    /// tag (`{prefix:N:…}`), so they live on one Redis Cluster slot;
    /// shared state (suppression list, counters, slots) is under `{prefix}`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Replicas that must acknowledge a message (Redis `WAIT`) before the
    /// client gets 250. 0: the primary's acknowledgement is enough.
    #[serde(default)]
    pub wait_replicas: u32,
    /// Partitions of the queue, each under its own `{prefix:N:…}` hash tag,
    /// so Redis Cluster spreads messages, bodies and indexes over every
    /// master. A message lives in one partition, chosen from its id.
    /// 1 to 1024. Changing it on a live queue is safe: the highest count
    /// ever used is recorded in Redis and every partition up to it is
    /// still leased from.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_key_prefix() -> String {
    "petrel".to_string()
}

fn default_partitions() -> u32 {
    16
}

/// Most partitions `queue.redis.partitions` may name: each partition is
/// one more script call per lease round, and 1024 already spreads a queue
/// over far more masters than a cluster has.
pub const MAX_PARTITIONS: u32 = 1024;

/// Embedded single-node queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedQueue {
    /// Database file; its directory is created when missing.
    pub path: PathBuf,
}

/// How mail leaves the relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Transport for every message.
    #[serde(default)]
    pub transport: Transport,
    /// MX transport settings.
    #[serde(default)]
    pub mx: MxConfig,
    /// Smarthost settings; required when `transport: smarthost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<Smarthost>,
    /// Maildir settings; required when `transport: maildir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maildir: Option<MaildirConfig>,
    /// Waits between attempts; the last repeats until `maxQueueLifetime`.
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule: Vec<Duration>,
    /// Age at which an undelivered message bounces.
    #[serde(default = "default_max_queue_lifetime")]
    pub max_queue_lifetime: Duration,
    /// Send a "delayed" DSN once a message has waited this long. Off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_dsn_after: Option<Duration>,
    /// Default outbound TLS mode: `opportunistic` (STARTTLS when offered,
    /// any certificate), `encrypted` (TLS mandatory, any certificate) or
    /// `verified` (TLS mandatory, certificate verified against the MX
    /// name). `required` is accepted as an alias of `verified`.
    #[serde(default)]
    pub outbound_tls: OutboundTls,
    /// Trust anchors and per-destination overrides of `outboundTls`.
    #[serde(default, skip_serializing_if = "OutboundTlsConfig::is_empty")]
    pub tls: OutboundTlsConfig,
    /// MTA-STS (RFC 8461): look up and honour recipient domains' policies.
    #[serde(default = "default_true")]
    pub mta_sts: bool,
    /// DANE (RFC 7672): look up DNSSEC-validated TLSA records of MX hosts
    /// and, where usable ones exist, require TLS verified against them.
    #[serde(default = "default_true")]
    pub dane: bool,
    /// TLS-RPT (RFC 8460): count outbound TLS results per policy domain
    /// and send the daily aggregate report to the domain's `rua`.
    #[serde(default = "default_true")]
    pub tls_rpt: bool,
    /// Who the TLS-RPT reports say they are from.
    #[serde(default)]
    pub tls_report: TlsReportConfig,
    /// Connections to one destination, summed over all relay pods.
    #[serde(default = "default_per_destination_concurrency")]
    pub per_destination_concurrency: u32,
    /// Messages per second to one destination, summed over all pods.
    /// Unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_destination_rate: Option<u32>,
    /// Concurrent delivery tasks in this pod.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// How long a hard-bounced recipient stays suppressed. Forever when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppression_ttl: Option<Duration>,
    /// Outbound SMTP timeouts (RFC 5321 4.5.3.2).
    #[serde(default)]
    pub timeouts: OutboundTimeouts,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            transport: Transport::default(),
            mx: MxConfig::default(),
            smarthost: None,
            maildir: None,
            retry_schedule: default_retry_schedule(),
            max_queue_lifetime: default_max_queue_lifetime(),
            delayed_dsn_after: None,
            outbound_tls: OutboundTls::default(),
            tls: OutboundTlsConfig::default(),
            mta_sts: true,
            dane: true,
            tls_rpt: true,
            tls_report: TlsReportConfig::default(),
            per_destination_concurrency: default_per_destination_concurrency(),
            per_destination_rate: None,
            workers: default_workers(),
            suppression_ttl: None,
            timeouts: OutboundTimeouts::default(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_retry_schedule() -> Vec<Duration> {
    [60, 300, 900, 1800, 3600, 7200, 14400]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

fn default_max_queue_lifetime() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}

fn default_per_destination_concurrency() -> u32 {
    10
}

fn default_workers() -> u32 {
    64
}

/// The sender of TLS-RPT aggregate reports (RFC 8460 section 4.4).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsReportConfig {
    /// `organization-name` of the report. The relay's hostname when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_name: Option<String>,
    /// `contact-info` of the report (an address or URL). `postmaster@`
    /// the relay's hostname when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_info: Option<String>,
}

/// Delivery transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Look up each destination's MX and deliver there.
    #[default]
    Mx,
    /// Hand every message to one upstream server.
    Smarthost,
    /// Write each message into a local Maildir (quick start, tests).
    Maildir,
}

/// MX transport settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MxConfig {
    /// Port on the destination's servers; 25 except in tests.
    #[serde(default = "default_mx_port")]
    pub port: u16,
    /// DNS servers (`ip:port`). The system resolver when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
    /// HTTPS port of MTA-STS policy hosts (`mta-sts.<domain>`): 443 except
    /// in tests, which cannot bind 443. Leave it alone in production.
    #[serde(
        default = "default_mta_sts_port",
        skip_serializing_if = "is_default_mta_sts_port"
    )]
    pub mta_sts_port: u16,
    /// Extra DNSSEC trust anchors for DANE, added to the built-in root
    /// anchor: a file of DNSKEY records in zone-file form
    /// (`example.internal. IN DNSKEY 257 3 15 <base64>`), for private or
    /// test zones whose chain does not reach the public root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_anchor_file: Option<PathBuf>,
}

impl Default for MxConfig {
    fn default() -> Self {
        MxConfig {
            port: default_mx_port(),
            nameservers: Vec::new(),
            mta_sts_port: default_mta_sts_port(),
            trust_anchor_file: None,
        }
    }
}

fn default_mx_port() -> u16 {
    25
}

fn default_mta_sts_port() -> u16 {
    443
}

fn is_default_mta_sts_port(port: &u16) -> bool {
    *port == default_mta_sts_port()
}

/// Upstream server for `transport: smarthost`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Smarthost {
    /// Host name or IP address.
    pub host: String,
    /// Port, usually 587 or 465.
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    /// TLS towards the smarthost.
    #[serde(default = "default_smarthost_tls")]
    pub tls: TlsMode,
    /// AUTH user name; no AUTH when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the AUTH password (a mounted Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

fn default_smarthost_port() -> u16 {
    587
}

fn default_smarthost_tls() -> TlsMode {
    TlsMode::Starttls
}

/// Maildir transport settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaildirConfig {
    /// Root of the Maildir tree (`cur`, `new`, `tmp` are created).
    pub path: PathBuf,
}

/// Outbound SMTP timeouts, defaults from RFC 5321 4.5.3.2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTimeouts {
    /// TCP connect and TLS handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect: Duration,
    /// Greeting (RFC: 5 minutes).
    #[serde(default = "default_greeting_timeout")]
    pub greeting: Duration,
    /// Each command's reply (RFC: 5 minutes for MAIL and RCPT).
    #[serde(default = "default_command_timeout")]
    pub command: Duration,
    /// Reply to the end of DATA (RFC: 10 minutes).
    #[serde(default = "default_data_timeout")]
    pub data: Duration,
}

impl Default for OutboundTimeouts {
    fn default() -> Self {
        OutboundTimeouts {
            connect: default_connect_timeout(),
            greeting: default_greeting_timeout(),
            command: default_command_timeout(),
            data: default_data_timeout(),
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_greeting_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}

/// Inbound limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest message in bytes, advertised as SIZE.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: u32,
    /// Longest command or text line in bytes, CRLF included (RFC 5321:
    /// at least 512 for commands, 1000 for text).
    #[serde(default = "default_max_line_length")]
    pub max_line_length: u32,
    /// Concurrent connections per relay pod.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Concurrent connections from one client IP.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: u32,
    /// Errors in one session before 421 and disconnect.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Idle wait for the next command (RFC 5321: 5 minutes).
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Duration,
    /// Wait for each chunk of DATA (RFC 5321: 3 minutes per block).
    #[serde(default = "default_data_block_timeout")]
    pub data_timeout: Duration,
    /// Failed AUTH attempts per client IP, over all pods, before it is
    /// blocked for `authBlockFor`.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    /// How long a client stays blocked after too many AUTH failures.
    #[serde(default = "default_auth_block_for")]
    pub auth_block_for: Duration,
    /// Grace period for sessions in progress at shutdown.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
    /// Longest wait for an inbound TLS handshake (implicit TLS or after
    /// STARTTLS). Short, unlike `commandTimeout`: a client that connects and
    /// never sends its ClientHello would otherwise hold a connection slot
    /// for minutes.
    #[serde(default = "default_tls_handshake_timeout")]
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_line_length: default_max_line_length(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_errors: default_max_errors(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_block_timeout(),
            max_auth_failures: default_max_auth_failures(),
            auth_block_for: default_auth_block_for(),
            shutdown_grace: default_shutdown_grace(),
            tls_handshake_timeout: default_tls_handshake_timeout(),
        }
    }
}

fn default_max_message_size() -> u64 {
    25 * 1024 * 1024
}

fn default_max_recipients() -> u32 {
    100
}

fn default_max_line_length() -> u32 {
    4096
}

fn default_max_connections() -> u32 {
    4096
}

fn default_max_connections_per_client() -> u32 {
    200
}

fn default_max_errors() -> u32 {
    10
}

fn default_data_block_timeout() -> Duration {
    Duration::from_secs(180)
}

fn default_max_auth_failures() -> u32 {
    5
}

fn default_auth_block_for() -> Duration {
    Duration::from_secs(600)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// HTTP server: `/metrics`, `/healthz`, `/readyz`, send API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address, `ip:port`.
    #[serde(default = "default_http_address")]
    pub address: SocketAddr,
    /// Accept Basic credentials on the send API over plain HTTP from
    /// clients outside `trustedNetworks`. Off by default: the password
    /// would cross the network in clear.
    #[serde(default)]
    pub allow_insecure_auth: bool,
    /// Serve the HTTP listener (send API, metrics, probes, admin and
    /// tracking endpoints) over TLS with the relay's certificate
    /// (`tls.certFile`/`tls.keyFile`, re-read when they change). Basic
    /// credentials are then accepted from any client. Needs a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Send API requests in flight in this pod; more get 429 before their
    /// body is read. `/healthz`, `/readyz` and `/metrics` are not counted.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u32,
    /// Send API requests in flight from one client IP.
    #[serde(default = "default_max_concurrent_requests_per_client")]
    pub max_concurrent_requests_per_client: u32,
    /// Longest time a client may take to send a send API request body.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Duration,
    /// A file holding the bearer token for the admin API
    /// (`/admin/v1/...`, e.g. `events tail` against a running relay).
    /// Without it only loopback and `trustedNetworks` peers may use it;
    /// with it, any peer presenting `Authorization: Bearer <token>`, and
    /// loopback and trusted peers still.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            address: default_http_address(),
            allow_insecure_auth: false,
            tls: false,
            max_concurrent_requests: default_max_concurrent_requests(),
            max_concurrent_requests_per_client: default_max_concurrent_requests_per_client(),
            request_timeout: default_request_timeout(),
            admin_token_file: None,
        }
    }
}

fn default_max_concurrent_requests() -> u32 {
    64
}

fn default_max_concurrent_requests_per_client() -> u32 {
    16
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_http_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

impl RelayConfig {
    /// Parses YAML strictly and validates it. Every error names its field.
    pub fn from_yaml(text: &str) -> Result<RelayConfig, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: RelayConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = strip_location(&inner);
            // serde_yaml names the path itself for some errors; say it once.
            if let Some((prefix, rest)) = message.split_once(": ")
                && !prefix.is_empty()
                && path.starts_with(prefix)
            {
                message = rest.to_string();
            }
            if let Some(loc) = inner.location() {
                message = format!("{message} (line {}, column {})", loc.line(), loc.column());
            }
            ConfigError::Invalid(vec![FieldError::new(path, message)])
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        RelayConfig::from_yaml(&text)
    }

    /// Serialises to YAML, the form the operator puts in a ConfigMap.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml::to_string(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }

    /// The configured domain for `domain`, compared case-insensitively.
    pub fn domain(&self, domain: &str) -> Option<&SendingDomain> {
        self.domains
            .iter()
            .find(|d| d.domain.eq_ignore_ascii_case(domain))
    }

    /// Domains keyed by lower-cased name, for lookups on the hot path.
    pub fn domain_map(&self) -> BTreeMap<String, &SendingDomain> {
        self.domains
            .iter()
            .map(|d| (d.domain.to_ascii_lowercase(), d))
            .collect()
    }
}

/// serde_yaml appends " at line L column C" to messages; we report the
/// location our own way, once.
fn strip_location(err: &serde_yaml::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::None => "none",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
        })
    }
}
