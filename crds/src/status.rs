//! Status types shared by the three petrel.dev resources: Kubernetes-style
//! conditions, DNS record entries and DKIM key phases.
//!
//! Controllers compute a fresh list of conditions on every reconcile and
//! [`merge_conditions`] it with what is stored, so `lastTransitionTime` only
//! moves when a condition's status flips and an unchanged status produces no
//! patch (see [`conditions_equivalent`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Status of a condition, as in every Kubernetes API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell yet.
    Unknown,
}

impl ConditionStatus {
    /// `True` when `value` holds, `False` otherwise.
    pub fn from_bool(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One aspect of a resource's state, in the shape of `metav1.Condition`, so
/// tools such as `kubectl wait --for=condition=Ready` work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of condition in CamelCase, for example `Ready`, `DnsVerified` or `Available`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// Whether the condition holds: True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the condition's last transition, for example `RecordMissing`.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Human-readable explanation, saying what to do when the condition is not as wanted.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the condition's status last changed (not when it was last checked).
    pub last_transition_time: Time,
    /// The `metadata.generation` this condition was computed from; older than the
    /// resource's generation means the controller has not yet seen the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition computed now for the given generation.
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation,
        }
    }

    /// Whether the condition's status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }

    /// Equal in everything but `lastTransitionTime`.
    pub fn same_state(&self, other: &Condition) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present and `True`.
pub fn condition_is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(Condition::is_true)
}

/// Sets one condition in place: replaces the condition of the same type, keeping
/// its `lastTransitionTime` unless the status flips, or appends it.
///
/// Returns whether anything other than timestamps changed, so callers can skip a
/// status patch that would only churn.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            let changed = !existing.same_state(&new);
            *existing = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Merges freshly computed conditions into the stored ones: each desired
/// condition keeps the stored `lastTransitionTime` when its status is unchanged;
/// stored conditions of types not in `desired` are kept as they are (another
/// writer may own them). Order follows `existing`, then new types in `desired` order.
pub fn merge_conditions(existing: &[Condition], desired: Vec<Condition>) -> Vec<Condition> {
    let mut merged = existing.to_vec();
    for condition in desired {
        set_condition(&mut merged, condition);
    }
    merged
}

/// Whether two condition lists differ only in timestamps, i.e. whether writing
/// `b` over `a` would be a no-op for a reader.
pub fn conditions_equivalent(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|ca| find_condition(b, &ca.type_).is_some_and(|cb| ca.same_state(cb)))
}

/// Kind of DNS record a domain must publish.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum DnsRecordType {
    /// A text record (SPF, DKIM, DMARC).
    TXT,
    /// A mail exchanger record (for bounces to a custom return-path domain).
    MX,
    /// An alias record.
    CNAME,
}

/// Why a DNS record is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DnsRecordPurpose {
    /// SPF: authorises the relay's egress IPs to send for the envelope domain.
    Spf,
    /// DKIM: publishes a public key that receivers verify signatures with.
    Dkim,
    /// DMARC: the domain's policy for mail failing SPF and DKIM alignment.
    Dmarc,
    /// Return path: routes bounces for the custom return-path domain.
    ReturnPath,
    /// Tracking: the tracking domain's CNAME to the relay's public tracking host.
    Tracking,
}

/// What DNS answered for a record the last time it was checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DnsRecordState {
    /// Not checked yet.
    #[default]
    Pending,
    /// DNS serves the expected value.
    Verified,
    /// DNS has no such record (NXDOMAIN or no record of this type with the expected shape).
    Missing,
    /// DNS serves a record of this kind with a different value; see `observed`.
    Mismatch,
    /// The lookup itself failed (SERVFAIL, timeout); the record state is unknown.
    Unknown,
}

/// One DNS record the domain owner must publish, and what DNS currently serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    /// Fully qualified record name, without the trailing dot, for example `petrel-2026a._domainkey.example.com`.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Record type to create: TXT, MX or CNAME.
    #[serde(rename = "type")]
    pub type_: DnsRecordType,
    /// Value to publish. TXT values longer than 255 bytes are given as several
    /// quoted strings, the zone-file form most DNS providers accept as is.
    #[schemars(length(max = 4096))]
    pub value: String,
    /// Why the record is needed: spf, dkim, dmarc, returnPath or tracking.
    pub purpose: DnsRecordPurpose,
    /// Verification state: verified, missing, mismatch, unknown (lookup failed) or pending.
    #[serde(default)]
    pub state: DnsRecordState,
    /// The value DNS served when it differs from `value` (state mismatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub observed: Option<String>,
    /// When the record was last looked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<Time>,
    /// A hint for a person, for example which DKIM key the record belongs to or why a lookup failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// DKIM key algorithm: rsa2048 (RSA 2048-bit, SHA-256; the default, verified by every
/// receiver) or ed25519 (RFC 8463; short keys, not yet verified by every receiver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    /// RSA with a 2048-bit key and SHA-256: verified by every receiver; the
    /// public key needs a TXT value longer than 255 bytes (split into strings).
    #[default]
    Rsa2048,
    /// Ed25519-SHA256 (RFC 8463): short keys, but not all receivers verify it yet.
    Ed25519,
}

impl DkimAlgorithm {
    /// The `k=` tag of the DKIM DNS record.
    pub fn dns_key_type(self) -> &'static str {
        match self {
            Self::Rsa2048 => "rsa",
            Self::Ed25519 => "ed25519",
        }
    }
}

/// Lifecycle phase of one DKIM key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DkimKeyPhase {
    /// Generated and listed for publication; DNS does not serve it yet, so it must not sign.
    Pending,
    /// DNS serves its record (or, with `verifyDns: false`, `publishAhead` has passed): ready to sign.
    Published,
    /// The one key the relay signs with.
    Active,
    /// No longer signs; its record stays published for `retireAfter` so mail in flight still verifies.
    Retiring,
}

/// One DKIM key of a domain, as listed in a DkimKey's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyEntry {
    /// DKIM selector: the record lives at `<selector>._domainkey.<domain>`.
    #[schemars(length(max = 63))]
    pub selector: String,
    /// Signing algorithm of this key.
    pub algorithm: DkimAlgorithm,
    /// Name of the Secret (same namespace) holding the private key under `private.pem`.
    #[schemars(length(max = 253))]
    pub secret_name: String,
    /// The DKIM TXT record value to publish, for example `v=DKIM1; k=ed25519; p=...`.
    #[schemars(length(max = 4096))]
    pub dns_value: String,
    /// Lifecycle phase: Pending, Published, Active or Retiring.
    pub phase: DkimKeyPhase,
    /// When the key was generated.
    pub created_at: Time,
    /// When DNS was first seen serving the record (or the publish delay passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<Time>,
    /// When the key started signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Time>,
    /// When the key stopped signing; its record is removed `retireAfter` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    fn ready(status: ConditionStatus, reason: &str, at: i64) -> Condition {
        Condition::new("Ready", status, reason, "", Some(1), t(at))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut conditions = vec![ready(ConditionStatus::True, "Ok", 10)];
        let changed = set_condition(&mut conditions, ready(ConditionStatus::True, "Ok", 20));
        assert!(!changed, "only the timestamp differs");
        assert_eq!(conditions[0].last_transition_time, t(10));
    }

    #[test]
    fn set_condition_keeps_transition_time_when_only_reason_changes() {
        let mut conditions = vec![ready(ConditionStatus::False, "A", 10)];
        let changed = set_condition(&mut conditions, ready(ConditionStatus::False, "B", 20));
        assert!(changed);
        assert_eq!(conditions[0].reason, "B");
        assert_eq!(conditions[0].last_transition_time, t(10));
    }

    #[test]
    fn set_condition_moves_transition_time_on_flip() {
        let mut conditions = vec![ready(ConditionStatus::False, "A", 10)];
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "Ok", 20)
        ));
        assert_eq!(conditions[0].last_transition_time, t(20));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn set_condition_appends_new_types() {
        let mut conditions = vec![ready(ConditionStatus::True, "Ok", 10)];
        let dns = Condition::new(
            "DnsVerified",
            ConditionStatus::False,
            "Missing",
            "",
            None,
            t(5),
        );
        assert!(set_condition(&mut conditions, dns));
        assert_eq!(conditions.len(), 2);
        assert!(condition_is_true(&conditions, "Ready"));
        assert!(!condition_is_true(&conditions, "DnsVerified"));
        assert!(!condition_is_true(&conditions, "Absent"));
    }

    #[test]
    fn merge_and_equivalence() {
        let stored = vec![ready(ConditionStatus::True, "Ok", 10)];
        let merged = merge_conditions(&stored, vec![ready(ConditionStatus::True, "Ok", 99)]);
        assert_eq!(merged, stored);
        assert!(conditions_equivalent(&stored, &merged));
        let flipped = merge_conditions(&stored, vec![ready(ConditionStatus::False, "No", 99)]);
        assert!(!conditions_equivalent(&stored, &flipped));
        assert_eq!(flipped[0].last_transition_time, t(99));
    }

    #[test]
    fn condition_serializes_in_kubernetes_shape() {
        let c = ready(ConditionStatus::True, "Ok", 0);
        let json = serde_json::to_value(&c).expect("serializes");
        assert_eq!(json["type"], "Ready");
        assert_eq!(json["status"], "True");
        assert_eq!(json["lastTransitionTime"], "1970-01-01T00:00:00Z");
        assert_eq!(json["observedGeneration"], 1);
    }

    #[test]
    fn dns_record_round_trip() {
        let r = DnsRecord {
            name: "_dmarc.example.com".into(),
            type_: DnsRecordType::TXT,
            value: "v=DMARC1; p=none".into(),
            purpose: DnsRecordPurpose::Dmarc,
            state: DnsRecordState::Mismatch,
            observed: Some("v=DMARC1; p=reject".into()),
            last_checked: Some(t(1)),
            message: None,
        };
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["type"], "TXT");
        assert_eq!(json["purpose"], "dmarc");
        assert_eq!(json["state"], "mismatch");
        let back: DnsRecord = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, r);
    }
}
