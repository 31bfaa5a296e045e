//! One counted TLS session, as TLS-RPT describes it (RFC 8460 section
//! 4.4): the policy that applied and the outcome.

use serde::{Deserialize, Serialize};

/// `policy-type` (RFC 8460 section 4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    /// An MTA-STS policy.
    #[serde(rename = "sts")]
    Sts,
    /// DANE TLSA records.
    #[serde(rename = "tlsa")]
    Tlsa,
    /// No policy (e.g. the MTA-STS policy could not be fetched).
    #[serde(rename = "no-policy-found")]
    NoPolicyFound,
}

/// The policy a session was held to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyDesc {
    /// Its type.
    pub policy_type: PolicyType,
    /// `policy-string`: the MTA-STS policy's lines or the TLSA records.
    pub strings: Vec<String>,
    /// `mx-host`: the MTA-STS `mx` patterns (empty for TLSA).
    pub mx_host: Vec<String>,
}

impl PolicyDesc {
    /// An MTA-STS policy, as published (`version: STSv1` first).
    pub fn sts(policy: &crate::delivery::mta_sts::Policy) -> PolicyDesc {
        let mut strings = vec![
            "version: STSv1".to_string(),
            format!("mode: {}", policy.mode.as_str()),
        ];
        strings.extend(policy.mx.iter().map(|m| format!("mx: {m}")));
        strings.push(format!("max_age: {}", policy.max_age));
        PolicyDesc {
            policy_type: PolicyType::Sts,
            strings,
            mx_host: policy.mx.clone(),
        }
    }

    /// No usable policy.
    pub fn none() -> PolicyDesc {
        PolicyDesc {
            policy_type: PolicyType::NoPolicyFound,
            strings: Vec::new(),
            mx_host: Vec::new(),
        }
    }
}

/// One entry of `failure-details`, less the count.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FailureDetail {
    /// `result-type` (RFC 8460 section 4.3), e.g. `certificate-host-mismatch`.
    pub result_type: String,
    /// `sending-mta-ip`: our address on the failed connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    /// `receiving-mx-hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_mx_hostname: Option<String>,
    /// `receiving-ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
}

/// How a session went.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// TLS negotiated as the policy asks.
    Success,
    /// It was not.
    Failure(FailureDetail),
}

/// One session to count: for `domain` (the policy domain, i.e. the
/// recipient domain, lower case), under `policy`, with `outcome`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// The policy domain.
    pub domain: String,
    /// The policy in force.
    pub policy: PolicyDesc,
    /// What happened.
    pub outcome: Outcome,
}

impl Entry {
    /// A stable name for the counter of this kind of session: the same
    /// on every pod and build (SHA-256 of the JSON form), short enough
    /// for a key whatever the policy's length.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = ring::digest::digest(&ring::digest::SHA256, &json);
        hash.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The UTC day of `millis` as `YYYY-MM-DD`, the unit of counting.
pub fn day_of(millis: crate::queue::Millis) -> String {
    chrono::DateTime::from_timestamp_millis(millis as i64)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::mta_sts::{Mode, Policy};

    #[test]
    fn digests_tell_kinds_of_sessions_apart_and_are_stable() {
        let policy = PolicyDesc::sts(&Policy {
            mode: Mode::Testing,
            mx: vec!["*.dest.test".into()],
            max_age: 86_400,
        });
        assert_eq!(
            policy.strings,
            [
                "version: STSv1",
                "mode: testing",
                "mx: *.dest.test",
                "max_age: 86400"
            ]
        );
        let ok = Entry {
            domain: "dest.test".into(),
            policy: policy.clone(),
            outcome: Outcome::Success,
        };
        let bad = Entry {
            outcome: Outcome::Failure(FailureDetail {
                result_type: "certificate-host-mismatch".into(),
                receiving_mx_hostname: Some("mx.dest.test".into()),
                ..FailureDetail::default()
            }),
            ..ok.clone()
        };
        assert_eq!(ok.digest(), ok.clone().digest());
        assert_ne!(ok.digest(), bad.digest());
        assert_eq!(ok.digest().len(), 24);
        let back: Entry = serde_json::from_str(&serde_json::to_string(&bad).unwrap()).unwrap();
        assert_eq!(back, bad);
    }

    #[test]
    fn days_are_utc() {
        // 2026-12-01T23:59:59.999Z and a millisecond later.
        assert_eq!(day_of(1_796_169_599_999), "2026-12-01");
        assert_eq!(day_of(1_796_169_600_000), "2026-12-02");
    }
}
