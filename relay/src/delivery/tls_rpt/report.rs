//! The aggregate report (RFC 8460 section 4.4) of one policy domain for
//! one UTC day, from the day's counts: pure.

use std::collections::BTreeMap;

use serde::Serialize;

use super::record::{Entry, FailureDetail, Outcome, PolicyDesc, PolicyType};

/// Who sends the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitter {
    /// `organization-name`.
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// The relay's host name: the `TLS-Report-Submitter` and the domain
    /// part of `report-id`.
    pub hostname: String,
}

/// The report, field for field as RFC 8460 section 4.4 names them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// `organization-name`.
    pub organization_name: String,
    /// `date-range`.
    pub date_range: DateRange,
    /// `contact-info`.
    pub contact_info: String,
    /// `report-id`.
    pub report_id: String,
    /// `policies`.
    pub policies: Vec<PolicyReport>,
}

/// `date-range`: the whole UTC day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DateRange {
    /// `start-datetime`, RFC 3339.
    pub start_datetime: String,
    /// `end-datetime`, RFC 3339.
    pub end_datetime: String,
}

/// One element of `policies`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyReport {
    /// `policy`.
    pub policy: PolicyJson,
    /// `summary`.
    pub summary: Summary,
    /// `failure-details` (omitted when there were none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failure_details: Vec<FailureJson>,
}

/// `policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyJson {
    /// `policy-type`.
    pub policy_type: PolicyType,
    /// `policy-string`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_string: Vec<String>,
    /// `policy-domain`.
    pub policy_domain: String,
    /// `mx-host`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mx_host: Vec<String>,
}

/// `summary`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    /// `total-successful-session-count`.
    pub total_successful_session_count: u64,
    /// `total-failure-session-count`.
    pub total_failure_session_count: u64,
}

/// One element of `failure-details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailureJson {
    /// `result-type`.
    pub result_type: String,
    /// `sending-mta-ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    /// `receiving-mx-hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiving_mx_hostname: Option<String>,
    /// `receiving-ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
    /// `failed-session-count`.
    pub failed_session_count: u64,
}

/// `report-id`: unique per day, domain and submitter (section 4.4 asks
/// for a unique identifier; the RFC's example uses this shape).
pub fn report_id(day: &str, domain: &str, hostname: &str) -> String {
    format!("{day}T00:00:00Z_{domain}@{hostname}")
}

/// The report of `domain` for `day` (`YYYY-MM-DD`) from the day's
/// `counts` (entries of other domains are ignored); `None` when nothing
/// was counted for it.
pub fn build(
    submitter: &Submitter,
    day: &str,
    domain: &str,
    counts: &[(Entry, u64)],
) -> Option<Report> {
    let mut by_policy: BTreeMap<&PolicyDesc, (Summary, BTreeMap<&FailureDetail, u64>)> =
        BTreeMap::new();
    for (entry, count) in counts.iter().filter(|(e, _)| e.domain == domain) {
        let (summary, failures) = by_policy.entry(&entry.policy).or_default();
        match &entry.outcome {
            Outcome::Success => summary.total_successful_session_count += count,
            Outcome::Failure(detail) => {
                summary.total_failure_session_count += count;
                *failures.entry(detail).or_default() += count;
            }
        }
    }
    if by_policy.is_empty() {
        return None;
    }
    let policies = by_policy
        .into_iter()
        .map(|(policy, (summary, failures))| PolicyReport {
            policy: PolicyJson {
                policy_type: policy.policy_type,
                policy_string: policy.strings.clone(),
                policy_domain: domain.to_string(),
                mx_host: policy.mx_host.clone(),
            },
            summary,
            failure_details: failures
                .into_iter()
                .map(|(d, n)| FailureJson {
                    result_type: d.result_type.clone(),
                    sending_mta_ip: d.sending_mta_ip.clone(),
                    receiving_mx_hostname: d.receiving_mx_hostname.clone(),
                    receiving_ip: d.receiving_ip.clone(),
                    failed_session_count: n,
                })
                .collect(),
        })
        .collect();
    Some(Report {
        organization_name: submitter.organization.clone(),
        date_range: DateRange {
            start_datetime: format!("{day}T00:00:00Z"),
            end_datetime: format!("{day}T23:59:59Z"),
        },
        contact_info: submitter.contact.clone(),
        report_id: report_id(day, domain, &submitter.hostname),
        policies,
    })
}

/// The policy domains counted in `counts`, sorted, once each.
pub fn domains(counts: &[(Entry, u64)]) -> Vec<String> {
    let mut all: Vec<String> = counts.iter().map(|(e, _)| e.domain.clone()).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitter() -> Submitter {
        Submitter {
            organization: "Petrel Test".into(),
            contact: "postmaster@relay.test".into(),
            hostname: "relay.test".into(),
        }
    }

    fn entry(domain: &str, policy: PolicyDesc, outcome: Outcome) -> Entry {
        Entry {
            domain: domain.into(),
            policy,
            outcome,
        }
    }

    fn mismatch(mx: &str) -> Outcome {
        Outcome::Failure(FailureDetail {
            result_type: "certificate-host-mismatch".into(),
            receiving_mx_hostname: Some(mx.into()),
            receiving_ip: Some("192.0.2.1".into()),
            sending_mta_ip: Some("192.0.2.9".into()),
        })
    }

    #[test]
    fn counts_fold_into_one_policy_with_summary_and_details() {
        let sts = PolicyDesc {
            policy_type: PolicyType::Sts,
            strings: vec!["version: STSv1".into(), "mode: testing".into()],
            mx_host: vec!["*.dest.test".into()],
        };
        let counts = vec![
            (entry("dest.test", sts.clone(), Outcome::Success), 5),
            (
                entry("dest.test", sts.clone(), mismatch("mx1.dest.test")),
                2,
            ),
            (
                entry("dest.test", sts.clone(), mismatch("mx2.dest.test")),
                1,
            ),
            (entry("dest.test", PolicyDesc::none(), Outcome::Success), 1),
            (entry("other.test", sts, Outcome::Success), 7),
        ];
        let report = build(&submitter(), "2026-12-01", "dest.test", &counts).unwrap();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["report-id"],
            "2026-12-01T00:00:00Z_dest.test@relay.test"
        );
        assert_eq!(json["date-range"]["start-datetime"], "2026-12-01T00:00:00Z");
        assert_eq!(json["date-range"]["end-datetime"], "2026-12-01T23:59:59Z");
        let policies = json["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 2, "{json:#}");
        let sts = policies
            .iter()
            .find(|p| p["policy"]["policy-type"] == "sts")
            .unwrap();
        assert_eq!(sts["policy"]["policy-domain"], "dest.test");
        assert_eq!(sts["summary"]["total-successful-session-count"], 5);
        assert_eq!(sts["summary"]["total-failure-session-count"], 3);
        let details = sts["failure-details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        assert_eq!(details[0]["receiving-mx-hostname"], "mx1.dest.test");
        assert_eq!(details[0]["failed-session-count"], 2);
        let none = policies
            .iter()
            .find(|p| p["policy"]["policy-type"] == "no-policy-found")
            .unwrap();
        assert!(none.get("failure-details").is_none());
        assert!(build(&submitter(), "2026-12-01", "absent.test", &counts).is_none());
        assert_eq!(domains(&counts), ["dest.test", "other.test"]);
    }
}
