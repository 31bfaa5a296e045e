//! `SendingDomain`: a domain an SmtpRelay signs and relays mail for, with its
//! DKIM, SPF and DMARC policy. The operator lists every DNS record the domain
//! needs in its status and checks each one in DNS.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::config::{DomainUnsubscribe, UnsubscribeMode};
use crate::status::{Condition, DkimAlgorithm, DnsRecord};

/// Condition type: DNS verified, DKIM active and bound to an existing relay.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: every record in `status.dnsRecords` is served by DNS as expected.
pub const CONDITION_DNS_VERIFIED: &str = "DnsVerified";
/// Condition type: the relay signs this domain's mail with a key whose record DNS serves.
pub const CONDITION_DKIM_ACTIVE: &str = "DkimActive";
/// Condition type: the relay's reputation guard paused this domain's mail.
pub const CONDITION_PAUSED: &str = "Paused";
/// Condition type: a bounce or complaint rate is above half its threshold.
pub const CONDITION_REPUTATION_WARNING: &str = "ReputationWarning";
/// Condition type: the operator could read the relay's reputation of this domain (when False,
/// Paused and ReputationWarning keep their last known state).
pub const CONDITION_REPUTATION_SYNCED: &str = "ReputationSynced";
/// Paused reason: the hard-bounce rate exceeds `spec.reputation.maxBounceRate`.
pub const REASON_BOUNCE_RATE_EXCEEDED: &str = "BounceRateExceeded";
/// Paused reason: the complaint rate exceeds `spec.reputation.maxComplaintRate`.
pub const REASON_COMPLAINT_RATE_EXCEEDED: &str = "ComplaintRateExceeded";
/// Annotation that resumes a paused domain (`kubectl annotate sendingdomain X petrel.dev/resume=now`);
/// the operator removes it once the relay has resumed.
pub const RESUME_ANNOTATION: &str = "petrel.dev/resume";

/// Rotation interval of operator-created DKIM keys when the spec does not set one.
pub const DEFAULT_ROTATION_INTERVAL: &str = "90d";

/// A domain Petrel sends mail for.
// Several printcolumns share `type_ = "string"`, which this lint misreads as a repeat.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.dev",
    version = "v1alpha1",
    kind = "SendingDomain",
    namespaced,
    status = "SendingDomainStatus",
    derive = "PartialEq",
    shortname = "sd",
    category = "petrel",
    doc = "A domain Petrel relays and DKIM-signs mail for. Its status lists every DNS record to publish (SPF, DKIM, DMARC, return path), each with its verification state.",
    printcolumn(
        name = "DOMAIN",
        type_ = "string",
        json_path = ".spec.domain",
        description = "The sending domain"
    ),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
        description = "DNS verified and DKIM active"
    ),
    printcolumn(
        name = "DNS",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="DnsVerified")].reason"#,
        description = "DNS verification state"
    ),
    printcolumn(
        name = "PAUSED",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Paused")].status"#,
        description = "Whether the reputation guard paused the domain"
    ),
    printcolumn(
        name = "SELECTOR",
        type_ = "string",
        json_path = ".status.activeSelector",
        description = "DKIM selector signing now"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.returnPathDomain) || self.returnPathDomain != self.domain").message("returnPathDomain must differ from domain (leave it unset to use the domain itself)").field_path(".returnPathDomain"))]
#[serde(rename_all = "camelCase")]
pub struct SendingDomainSpec {
    /// The domain in the From header and envelope sender, for example `example.com`. Immutable.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("domain is immutable; create a new SendingDomain instead"))]
    pub domain: String,

    /// The SmtpRelay (same namespace) that relays and signs this domain's mail.
    pub relay_ref: RelayRef,

    /// DKIM signing. By default the operator creates and rotates a DkimKey for the domain.
    #[serde(default)]
    pub dkim: DkimSpec,

    /// The SPF record the operator computes (on the return-path domain when one is set).
    #[serde(default)]
    pub spf: SpfSpec,

    /// The DMARC record the operator computes at `_dmarc.<domain>`.
    #[serde(default)]
    pub dmarc: DmarcSpec,

    /// Custom envelope-sender (bounce) domain, for example `bounces.example.com`. SPF is then
    /// checked there, and it needs its own SPF and MX records. Must be `domain` or a subdomain of
    /// its organisational domain for DMARC SPF alignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub return_path_domain: Option<String>,

    /// Sending rate limits for this domain across all relay pods. Unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsSpec>,

    /// AUTH users allowed to send as this domain. Empty means any authenticated user of the
    /// relay; clients from trusted networks may always send.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub allowed_users: Vec<String>,

    /// What the relay does with mail to suppressed (hard-bounced) recipients.
    #[serde(default)]
    pub suppression: SuppressionSpec,

    /// `enforce` (default): the message's From header (and Sender, when present) must be a
    /// sending domain the client may use, or the relay answers 550 5.7.1 at the end of DATA
    /// (HTTP 403); DKIM `d=` then always aligns with From for DMARC. `off`: no check.
    #[serde(default)]
    pub from_header: FromHeaderPolicy,

    /// Open and click tracking of this domain's HTML mail. Off when unset. Needs the relay's
    /// `spec.tracking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::tracking::TrackingSpec>,
    /// Publish `status.dnsRecords` through a DNS controller instead of by hand.
    #[serde(default)]
    pub dns_publish: DnsPublishSpec,

    /// RFC 8058 one-click unsubscribe: the relay adds `List-Unsubscribe` (an `https://` link
    /// under `baseUrl`, plus a `mailto:` on the return-path domain when one is set) and
    /// `List-Unsubscribe-Post` before DKIM signing. Off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<DomainUnsubscribe>,

    /// Template of a signed `Feedback-ID` header for Gmail's feedback loop, with `{domain}` and
    /// `{tag:NAME}` (a message tag) placeholders, for example
    /// `{tag:campaign}:{tag:customer}:{domain}:petrel`. No header when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\x00-\x1f\x7f]+$"))]
    pub feedback_id: Option<String>,

    /// Reputation guard: pause this domain's mail (451 4.7.1 for new mail, queued mail held)
    /// when its hard-bounce or complaint rate over a rolling window exceeds a threshold, until
    /// `kubectl annotate sendingdomain NAME petrel.dev/resume=now`. Defaults apply when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<ReputationSpec>,
}

/// Thresholds of the reputation guard. Unset fields take the defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.maxBounceRate) || self.maxBounceRate.matches('[1-9]')").message("maxBounceRate must be above 0%").field_path(".maxBounceRate"),
    validation = Rule::new("!has(self.maxComplaintRate) || self.maxComplaintRate.matches('[1-9]')").message("maxComplaintRate must be above 0%").field_path(".maxComplaintRate")
)]
#[serde(rename_all = "camelCase")]
pub struct ReputationSpec {
    /// Whether the guard pauses the domain (default true). Off, rates are still measured,
    /// exported and reported as conditions.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Hard bounces / (delivered + hard bounces) above which the domain pauses, for example
    /// `5%` (the default). Half of it raises the ReputationWarning condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 12),
        regex(pattern = r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]{1,6})?)%$")
    )]
    pub max_bounce_rate: Option<String>,
    /// Complaints / delivered above which the domain pauses, for example `0.1%` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 12),
        regex(pattern = r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]{1,6})?)%$")
    )]
    pub max_complaint_rate: Option<String>,
    /// Fewest messages (delivered + hard bounces) in the window before a rate counts
    /// (default 500), so a handful of bounces on a quiet day pauses nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_volume: Option<i64>,
    /// Length of the rolling window, for example `24h` (the default); at least `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub window: Option<String>,
    /// Resume by itself this long after pausing, for example `6h`. Unset: a pause lasts until
    /// the `petrel.dev/resume` annotation resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub auto_resume_after: Option<String>,
}

fn default_true() -> bool {
    true
}

impl Default for ReputationSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bounce_rate: None,
            max_complaint_rate: None,
            min_volume: None,
            window: None,
            auto_resume_after: None,
        }
    }
}

/// Whether the From header must be a sending domain the client may use.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FromHeaderPolicy {
    /// From and Sender must be sending domains the client may use.
    #[default]
    Enforce,
    /// No check.
    Off,
}

/// How the operator publishes the domain's DNS records.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsPublishSpec {
    /// Keep an external-dns `DNSEndpoint` (externaldns.k8s.io/v1alpha1) with every record of
    /// `status.dnsRecords`, owned by this SendingDomain and deleted when turned off. Needs
    /// external-dns running with `--source=crd --managed-record-types=TXT,MX` and the operator's
    /// DNSEndpoint RBAC (chart value `externalDns.enabled`). Verification still reports what DNS serves.
    #[serde(default)]
    pub external_dns: bool,
}

/// Reference to an SmtpRelay in the same namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayRef {
    /// Name of the SmtpRelay.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// DKIM settings of a domain: either let the operator manage a key (algorithm, rotation) or
/// reference an existing DkimKey.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.keyRef) || (!has(self.algorithm) && !has(self.rotationInterval) && !has(self.selectorPrefix))").message("keyRef names an existing DkimKey: set algorithm, rotationInterval and selectorPrefix there, not here").field_path(".keyRef"))]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Key algorithm: rsa2048 (default, verified everywhere) or ed25519.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<DkimAlgorithm>,
    /// How often the key rotates, for example `90d` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub rotation_interval: Option<String>,
    /// First part of generated selectors (`<prefix>-<date>`). Defaults to `petrel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub selector_prefix: Option<String>,
    /// Name of an existing DkimKey (same namespace, same domain) to sign with instead of one
    /// the operator creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key_ref: Option<String>,
}

impl DkimSpec {
    /// The algorithm of an operator-created key.
    pub fn effective_algorithm(&self) -> DkimAlgorithm {
        self.algorithm.unwrap_or_default()
    }

    /// The rotation interval of an operator-created key.
    pub fn effective_rotation_interval(&self) -> &str {
        self.rotation_interval
            .as_deref()
            .unwrap_or(DEFAULT_ROTATION_INTERVAL)
    }
}

/// The `all` mechanism closing the SPF record.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpfAll {
    /// `~all`: other senders are suspicious but not rejected.
    #[default]
    Softfail,
    /// `-all`: other senders fail SPF.
    Fail,
}

impl SpfAll {
    /// The SPF mechanism text.
    pub fn mechanism(self) -> &'static str {
        match self {
            Self::Softfail => "~all",
            Self::Fail => "-all",
        }
    }
}

/// SPF policy. The record is `v=spf1` + the relay's egress IPs + `includes` + `mechanisms` + `all`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpfSpec {
    /// Domains whose SPF record is included, for example `_spf.google.com` for mail also sent
    /// through Google Workspace.
    #[serde(default)]
    #[schemars(
        length(max = 8),
        inner(
            length(min = 1, max = 253),
            regex(
                pattern = r"^([a-zA-Z0-9_]([-a-zA-Z0-9_]*[a-zA-Z0-9_])?\.)+[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
            )
        )
    )]
    pub includes: Vec<String>,
    /// Extra SPF mechanisms verbatim, for example `ip4:198.51.100.0/24` or `a:mx.example.com`.
    #[serde(default)]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[+?~-]?(ip4|ip6|a|mx|ptr|exists|include)(:[^\s]+)?$")
        )
    )]
    pub mechanisms: Vec<String>,
    /// softfail (`~all`, default) or fail (`-all`).
    #[serde(default)]
    pub all: SpfAll,
}

/// DMARC policy for mail failing alignment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    /// Monitor only (`p=none`), the safe start.
    #[default]
    None,
    /// Treat failing mail as suspicious (`p=quarantine`).
    Quarantine,
    /// Reject failing mail (`p=reject`).
    Reject,
}

impl DmarcPolicy {
    /// The `p=` tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Quarantine => "quarantine",
            Self::Reject => "reject",
        }
    }
}

/// DMARC identifier alignment mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Alignment {
    /// Organisational domains must match (`r`).
    #[default]
    Relaxed,
    /// Domains must match exactly (`s`).
    Strict,
}

impl Alignment {
    /// The `adkim=`/`aspf=` tag value.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Relaxed => "r",
            Self::Strict => "s",
        }
    }
}

/// DMARC record settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// none (default), quarantine or reject.
    #[serde(default)]
    pub policy: DmarcPolicy,
    /// Addresses for aggregate reports, as `mailto:` URIs.
    #[serde(default)]
    #[schemars(
        length(max = 4),
        inner(length(max = 320), regex(pattern = r"^mailto:[^\s,;!]+@[^\s,;!]+$"))
    )]
    pub rua: Vec<String>,
    /// Percentage of failing mail the policy applies to.
    #[serde(default = "default_pct")]
    #[schemars(range(min = 0, max = 100))]
    pub pct: i32,
    /// DKIM alignment: relaxed (default) or strict.
    #[serde(default)]
    pub adkim: Alignment,
    /// SPF alignment: relaxed (default) or strict.
    #[serde(default)]
    pub aspf: Alignment,
}

impl Default for DmarcSpec {
    fn default() -> Self {
        Self {
            policy: DmarcPolicy::None,
            rua: Vec::new(),
            pct: default_pct(),
            adkim: Alignment::Relaxed,
            aspf: Alignment::Relaxed,
        }
    }
}

fn default_pct() -> i32 {
    100
}

/// Sending rate limits of one domain. Mail over a limit is deferred with 451 4.7.1.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// Messages per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_second: Option<i32>,
    /// Messages per hour (sliding window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_hour: Option<i32>,
    /// Messages per 24 hours (sliding window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_day: Option<i32>,
    /// Hard cap of messages per UTC calendar day; beyond it mail is refused with 550 5.7.1
    /// until midnight UTC (a budget, unlike the rate limits that defer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub daily_quota: Option<i32>,
}

/// What to do with mail to a suppressed recipient.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnSuppressed {
    /// Refuse the recipient at RCPT TO with 550 5.1.1, so the app learns at once.
    #[default]
    Refuse,
    /// Accept and silently drop (counted in metrics), for apps that cannot handle refusals.
    Drop,
}

/// Suppression list handling.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionSpec {
    /// refuse (default) or drop.
    #[serde(default)]
    pub on_suppressed: OnSuppressed,
}

/// Observed state of a SendingDomain.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SendingDomainStatus {
    /// Ready, DnsVerified and DkimActive, with reasons; Paused, ReputationWarning and
    /// ReputationSynced from the relay's reputation guard.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Every DNS record the domain needs, each with its verification state.
    #[serde(default)]
    pub dns_records: Vec<DnsRecord>,
    /// The DKIM selector the relay signs this domain's mail with now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,
    /// The DkimKey providing this domain's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_key_name: Option<String>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    const EXAMPLE: &str = r#"
apiVersion: petrel.dev/v1alpha1
kind: SendingDomain
metadata: {name: example-com, namespace: mail}
spec:
  domain: example.com
  relayRef: {name: main}
  dkim: {algorithm: ed25519, rotationInterval: 30d}
  spf: {includes: [_spf.google.com], all: fail}
  dmarc: {policy: quarantine, rua: ["mailto:dmarc@example.com"], adkim: strict}
  returnPathDomain: bounces.example.com
  rateLimits: {perSecond: 10, dailyQuota: 100000}
  allowedUsers: [app]
  suppression: {onSuppressed: drop}
  unsubscribe: {enabled: true, baseUrl: "https://u.example.com", mode: replace}
  feedbackId: "{tag:campaign}:{domain}:petrel"
  reputation: {maxBounceRate: 2%, window: 6h}
"#;

    #[test]
    fn example_parses() {
        let sd: SendingDomain = serde_yaml::from_str(EXAMPLE).expect("parses");
        assert_eq!(sd.spec.dkim.effective_algorithm(), DkimAlgorithm::Ed25519);
        assert_eq!(sd.spec.dkim.effective_rotation_interval(), "30d");
        assert_eq!(sd.spec.spf.all.mechanism(), "-all");
        assert_eq!(sd.spec.dmarc.pct, 100);
        assert_eq!(sd.spec.dmarc.adkim.tag(), "s");
        assert_eq!(sd.spec.dmarc.aspf.tag(), "r");
        assert_eq!(sd.spec.suppression.on_suppressed, OnSuppressed::Drop);
        let unsubscribe = sd.spec.unsubscribe.as_ref().expect("unsubscribe");
        assert_eq!(unsubscribe.mode, UnsubscribeMode::Replace);
        let reputation = sd.spec.reputation.as_ref().expect("reputation");
        assert!(reputation.enabled, "enabled by default");
        assert_eq!(reputation.max_bounce_rate.as_deref(), Some("2%"));
        let back: SendingDomain =
            serde_json::from_str(&serde_json::to_string(&sd).expect("serializes")).expect("parses");
        assert_eq!(back, sd);
    }

    #[test]
    fn defaults() {
        let spec: SendingDomainSpec =
            serde_yaml::from_str("{domain: example.org, relayRef: {name: main}}").expect("parses");
        assert_eq!(spec.dkim.effective_algorithm(), DkimAlgorithm::Rsa2048);
        assert_eq!(
            spec.dkim.effective_rotation_interval(),
            DEFAULT_ROTATION_INTERVAL
        );
        assert_eq!(spec.spf.all, SpfAll::Softfail);
        assert_eq!(spec.dmarc, DmarcSpec::default());
        assert_eq!(spec.suppression.on_suppressed, OnSuppressed::Refuse);
        assert!(spec.rate_limits.is_none());
    }

    #[test]
    fn schema_carries_cel_rules() {
        let crd = serde_json::to_string(&SendingDomain::crd()).expect("serializes");
        for needle in [
            "self == oldSelf",
            "!has(self.keyRef) || (!has(self.algorithm)",
            "self.returnPathDomain != self.domain",
            "self.maxBounceRate.matches('[1-9]')",
            r#""name":"PAUSED""#,
            r#""enum":["add-if-missing","replace"]"#,
            r#""shortNames":["sd"]"#,
            r#""name":"SELECTOR""#,
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}
