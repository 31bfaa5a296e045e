//! Pure formatting for `kubectl petrel`: the status table and zone-file lines.

use kube::ResourceExt;
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use petrel_crds::status::{Condition, ConditionStatus, DnsRecord, DnsRecordState, DnsRecordType};

/// One row of the status table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// SmtpRelay, SendingDomain or DkimKey.
    pub kind: &'static str,
    /// Object name.
    pub name: String,
    /// The Ready (domains, keys) or Available (relays) condition's status.
    pub ready: String,
    /// Every condition as `Type=Status(Reason)`.
    pub conditions: String,
    /// What matters about the object in a few words.
    pub detail: String,
}

fn status_word(status: &ConditionStatus) -> &'static str {
    match status {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

fn summary(conditions: &[Condition]) -> String {
    if conditions.is_empty() {
        return "-".into();
    }
    conditions
        .iter()
        .map(|c| {
            let status = status_word(&c.status);
            if c.reason.is_empty() {
                format!("{}={status}", c.type_)
            } else {
                format!("{}={status}({})", c.type_, c.reason)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn condition(conditions: &[Condition], type_: &str) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map_or_else(|| "Unknown".into(), |c| status_word(&c.status).into())
}

/// A relay's row: Available, and its ready pods.
pub fn relay_row(relay: &SmtpRelay) -> Row {
    let status = relay.status.clone().unwrap_or_default();
    Row {
        kind: "SmtpRelay",
        name: relay.name_any(),
        ready: condition(&status.conditions, "Available"),
        conditions: summary(&status.conditions),
        detail: format!(
            "{}/{} pods ready, {} domains",
            status.ready_replicas,
            status.replicas,
            status.bound_domains.len()
        ),
    }
}

/// A domain's row: Ready, and how many DNS records DNS serves.
pub fn domain_row(sd: &SendingDomain) -> Row {
    let status = sd.status.clone().unwrap_or_default();
    let verified = status
        .dns_records
        .iter()
        .filter(|r| r.state == DnsRecordState::Verified)
        .count();
    Row {
        kind: "SendingDomain",
        name: sd.name_any(),
        ready: condition(&status.conditions, "Ready"),
        conditions: summary(&status.conditions),
        detail: format!(
            "{} via {}, {verified}/{} records verified",
            sd.spec.domain,
            sd.spec.relay_ref.name,
            status.dns_records.len()
        ),
    }
}

/// A key's row: Ready, and its selectors by phase.
pub fn key_row(key: &DkimKey) -> Row {
    let status = key.status.clone().unwrap_or_default();
    let mut detail = vec![format!(
        "active {}",
        status.active.as_ref().map_or("-", |k| k.selector.as_str())
    )];
    if let Some(next) = &status.next {
        detail.push(format!("next {}", next.selector));
    }
    if !status.retiring.is_empty() {
        let retiring: Vec<&str> = status
            .retiring
            .iter()
            .map(|k| k.selector.as_str())
            .collect();
        detail.push(format!("retiring {}", retiring.join(",")));
    }
    Row {
        kind: "DkimKey",
        name: key.name_any(),
        ready: condition(&status.conditions, "Ready"),
        conditions: summary(&status.conditions),
        detail: detail.join(", "),
    }
}

/// Rows as an aligned table with a header, like `kubectl get`.
pub fn table(rows: &[Row]) -> String {
    let header = Row {
        kind: "KIND",
        name: "NAME".into(),
        ready: "READY".into(),
        conditions: "CONDITIONS".into(),
        detail: "DETAIL".into(),
    };
    let all: Vec<&Row> = std::iter::once(&header).chain(rows).collect();
    let width = |f: fn(&Row) -> usize| all.iter().map(|r| f(r)).max().unwrap_or(0);
    let (kind, name, ready, conditions) = (
        width(|r| r.kind.len()),
        width(|r| r.name.chars().count()),
        width(|r| r.ready.len()),
        width(|r| r.conditions.chars().count()),
    );
    let mut out = String::new();
    for r in all {
        let line = format!(
            "{:kind$}  {:name$}  {:ready$}  {:conditions$}  {}",
            r.kind, r.name, r.ready, r.conditions, r.detail
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn state_word(state: DnsRecordState) -> &'static str {
    match state {
        DnsRecordState::Pending => "pending",
        DnsRecordState::Verified => "verified",
        DnsRecordState::Missing => "missing",
        DnsRecordState::Mismatch => "mismatch",
        DnsRecordState::Unknown => "unknown",
    }
}

/// Quotes a TXT value for a zone file unless it already is (long values are
/// listed as several quoted strings).
fn zone_txt(value: &str) -> String {
    if value.starts_with('"') {
        value.to_string()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The records to publish as zone-file lines (absolute names), each with a
/// comment giving its purpose and state, and what DNS served on a mismatch.
pub fn zone_lines(records: &[DnsRecord], ttl: u32) -> String {
    let mut out = String::new();
    for r in records {
        let (type_, value) = match r.type_ {
            DnsRecordType::TXT => ("TXT", zone_txt(&r.value)),
            DnsRecordType::MX => ("MX", r.value.clone()),
            DnsRecordType::CNAME => ("CNAME", r.value.clone()),
        };
        let mut comment = format!("{:?} {}", r.purpose, state_word(r.state)).to_lowercase();
        if let Some(observed) = r
            .observed
            .as_deref()
            .filter(|_| r.state == DnsRecordState::Mismatch)
        {
            comment.push_str(&format!(", DNS serves: {observed}"));
        }
        out.push_str(&format!(
            "{}. {ttl} IN {type_} {value} ; {comment}\n",
            r.name.trim_end_matches('.')
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_crds::status::DnsRecordPurpose;

    fn relay(status: &str) -> SmtpRelay {
        serde_yaml::from_str(&format!(
            "apiVersion: petrel.dev/v1alpha1\nkind: SmtpRelay\nmetadata: {{name: main}}\n\
             spec: {{redis: {{urlSecretRef: {{name: r, key: url}}}}}}\nstatus: {status}"
        ))
        .expect("relay")
    }

    const T: &str = "lastTransitionTime: '2026-01-01T00:00:00Z'";

    #[test]
    fn relay_rows_show_availability_and_pods() {
        let cases = [
            (
                format!(
                    "{{readyReplicas: 2, replicas: 2, boundDomains: [a.com], conditions: [{{type: Available, status: 'True', reason: MinimumReplicasAvailable, {T}}}, {{type: Degraded, status: 'False', reason: AsExpected, {T}}}]}}"
                ),
                Row {
                    kind: "SmtpRelay",
                    name: "main".into(),
                    ready: "True".into(),
                    conditions:
                        "Available=True(MinimumReplicasAvailable) Degraded=False(AsExpected)".into(),
                    detail: "2/2 pods ready, 1 domains".into(),
                },
            ),
            (
                "{}".to_string(),
                Row {
                    kind: "SmtpRelay",
                    name: "main".into(),
                    ready: "Unknown".into(),
                    conditions: "-".into(),
                    detail: "0/0 pods ready, 0 domains".into(),
                },
            ),
        ];
        for (status, want) in cases {
            assert_eq!(relay_row(&relay(&status)), want, "{status}");
        }
    }

    #[test]
    fn domain_and_key_rows() {
        let sd: SendingDomain = serde_yaml::from_str(&format!(
            "apiVersion: petrel.dev/v1alpha1\nkind: SendingDomain\nmetadata: {{name: ex}}\n\
             spec: {{domain: example.com, relayRef: {{name: main}}}}\n\
             status: {{conditions: [{{type: Ready, status: 'False', reason: RecordMissing, {T}}}], dnsRecords: [\
             {{name: example.com, type: TXT, value: 'v=spf1 -all', purpose: spf, state: verified}},\
             {{name: _dmarc.example.com, type: TXT, value: 'v=DMARC1; p=none', purpose: dmarc, state: missing}}]}}"
        ))
        .expect("domain");
        let row = domain_row(&sd);
        assert_eq!(row.ready, "False");
        assert_eq!(row.conditions, "Ready=False(RecordMissing)");
        assert_eq!(row.detail, "example.com via main, 1/2 records verified");

        let key: DkimKey = serde_yaml::from_str(
            "apiVersion: petrel.dev/v1alpha1\nkind: DkimKey\nmetadata: {name: ex}\nspec: {domain: example.com}\n\
             status: {active: {selector: s1, algorithm: ed25519, secretName: k1, dnsValue: x, phase: Active, createdAt: '2026-01-01T00:00:00Z'}, \
             next: {selector: s2, algorithm: ed25519, secretName: k2, dnsValue: y, phase: Pending, createdAt: '2026-01-01T00:00:00Z'}}",
        )
        .expect("key");
        assert_eq!(key_row(&key).detail, "active s1, next s2");
    }

    #[test]
    fn table_aligns_columns_under_a_header() {
        let rows = [
            Row {
                kind: "SmtpRelay",
                name: "main".into(),
                ready: "True".into(),
                conditions: "Available=True".into(),
                detail: "2/2".into(),
            },
            Row {
                kind: "DkimKey",
                name: "example-com".into(),
                ready: "False".into(),
                conditions: "-".into(),
                detail: "".into(),
            },
        ];
        assert_eq!(
            table(&rows),
            "KIND       NAME         READY  CONDITIONS      DETAIL\n\
             SmtpRelay  main         True   Available=True  2/2\n\
             DkimKey    example-com  False  -\n"
        );
    }

    fn record(name: &str, type_: DnsRecordType, value: &str, state: DnsRecordState) -> DnsRecord {
        DnsRecord {
            name: name.into(),
            type_,
            value: value.into(),
            purpose: DnsRecordPurpose::Dkim,
            state,
            observed: None,
            last_checked: None,
            message: None,
        }
    }

    #[test]
    fn zone_lines_quote_txt_once_and_show_states() {
        let mut mismatch = record(
            "example.com",
            DnsRecordType::TXT,
            "v=spf1 ip4:1.2.3.4 -all",
            DnsRecordState::Mismatch,
        );
        mismatch.purpose = DnsRecordPurpose::Spf;
        mismatch.observed = Some("v=spf1 -all".into());
        let records = [
            mismatch,
            record(
                "s1._domainkey.example.com",
                DnsRecordType::TXT,
                "\"v=DKIM1; p=AB\" \"CD\"",
                DnsRecordState::Verified,
            ),
            record(
                "bounces.example.com.",
                DnsRecordType::MX,
                "10 fb.example.net.",
                DnsRecordState::Pending,
            ),
        ];
        assert_eq!(
            zone_lines(&records, 3600),
            "example.com. 3600 IN TXT \"v=spf1 ip4:1.2.3.4 -all\" ; spf mismatch, DNS serves: v=spf1 -all\n\
             s1._domainkey.example.com. 3600 IN TXT \"v=DKIM1; p=AB\" \"CD\" ; dkim verified\n\
             bounces.example.com. 3600 IN MX 10 fb.example.net. ; dkim pending\n"
        );
    }
}
