//! The DNS records a sending domain needs (pure): SPF, DKIM for every key that
//! must be published, DMARC, and how to compare what DNS serves with them.

use petrel_crds::dkim_key::DkimKeyStatus;
use petrel_crds::sending_domain::SendingDomainSpec;
use petrel_crds::smtp_relay::RelayFeedbackSpec;
use petrel_crds::status::{DkimKeyPhase, DnsRecordPurpose, DnsRecordType};
use petrel_crds::tracking::RelayTrackingSpec;

pub use crate::dns_record::{DesiredRecord, TXT_CHUNK, TxtAnswer, evaluate, split_txt};

/// The SPF record: relay egress IPs as `ip4:`/`ip6:`, then includes, then
/// extra mechanisms, then `~all` or `-all`.
pub fn spf_value(spec: &SendingDomainSpec, egress_ips: &[String]) -> String {
    let mut terms = vec!["v=spf1".to_string()];
    for ip in egress_ips {
        let mechanism = if ip.contains(':') { "ip6" } else { "ip4" };
        terms.push(format!("{mechanism}:{ip}"));
    }
    terms.extend(spec.spf.includes.iter().map(|i| format!("include:{i}")));
    terms.extend(spec.spf.mechanisms.iter().cloned());
    terms.push(spec.spf.all.mechanism().to_string());
    terms.join(" ")
}

/// The DMARC record value.
pub fn dmarc_value(spec: &SendingDomainSpec) -> String {
    let d = &spec.dmarc;
    let mut tags = vec!["v=DMARC1".to_string(), format!("p={}", d.policy.as_str())];
    if !d.rua.is_empty() {
        tags.push(format!("rua={}", d.rua.join(",")));
    }
    if d.pct != 100 {
        tags.push(format!("pct={}", d.pct));
    }
    tags.push(format!("adkim={}", d.adkim.tag()));
    tags.push(format!("aspf={}", d.aspf.tag()));
    tags.join("; ")
}

/// Every record the domain needs, in a stable order: SPF, DKIM (active, next,
/// retiring), DMARC.
pub fn desired_records(
    spec: &SendingDomainSpec,
    egress_ips: &[String],
    keys: Option<&DkimKeyStatus>,
) -> Vec<DesiredRecord> {
    let domain = spec.domain.trim_end_matches('.');
    let mut records = Vec::new();
    let authorises_nothing =
        egress_ips.is_empty() && spec.spf.includes.is_empty() && spec.spf.mechanisms.is_empty();
    let (spf_name, mut spf_note) = match &spec.return_path_domain {
        Some(rp) => (
            rp.trim_end_matches('.').to_string(),
            Some("SPF is checked on the return-path (envelope sender) domain".to_string()),
        ),
        None => (domain.to_string(), None),
    };
    if authorises_nothing {
        spf_note = Some(
            "this SPF record authorises no sender: declare the relay's spec.egressIps or add spec.spf.includes"
                .to_string(),
        );
    }
    records.push(DesiredRecord {
        name: spf_name,
        type_: DnsRecordType::TXT,
        value: spf_value(spec, egress_ips),
        purpose: if spec.return_path_domain.is_some() {
            DnsRecordPurpose::ReturnPath
        } else {
            DnsRecordPurpose::Spf
        },
        note: spf_note,
    });
    for key in keys.into_iter().flat_map(DkimKeyStatus::published_keys) {
        let role = match key.phase {
            DkimKeyPhase::Active => "active key",
            DkimKeyPhase::Pending | DkimKeyPhase::Published => "next key, publish before it signs",
            DkimKeyPhase::Retiring => "retiring key, keep until it is removed from this list",
        };
        records.push(DesiredRecord {
            name: format!("{}._domainkey.{domain}", key.selector),
            type_: DnsRecordType::TXT,
            value: key.dns_value.clone(),
            purpose: DnsRecordPurpose::Dkim,
            note: Some(format!("DKIM {role} (selector {})", key.selector)),
        });
    }
    records.push(DesiredRecord {
        name: format!("_dmarc.{domain}"),
        type_: DnsRecordType::TXT,
        value: dmarc_value(spec),
        purpose: DnsRecordPurpose::Dmarc,
        note: None,
    });
    records
}

/// Preference of the return-path MX the operator asks for (the only MX of the name).
pub const RETURN_PATH_MX_PREFERENCE: u16 = 10;

/// The return-path domain's MX to the relay's feedback host, so bounces and
/// reports sent to the VERP envelope sender reach the feedback listener.
/// Without the relay's `spec.feedback` the record has no target yet: it is
/// listed with a note saying what to set (the domain's SPF record on the
/// return-path domain is in [`desired_records`]).
pub fn return_path_mx(
    spec: &SendingDomainSpec,
    relay: Option<&RelayFeedbackSpec>,
) -> Option<DesiredRecord> {
    let name = spec
        .return_path_domain
        .as_deref()?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let (value, note) = match relay {
        Some(f) => (
            format!(
                "{RETURN_PATH_MX_PREFERENCE} {}",
                f.hostname.trim_end_matches('.').to_ascii_lowercase()
            ),
            Some(
                "bounces and complaint reports reach the relay's feedback listener through this MX"
                    .to_string(),
            ),
        ),
        None => (
            String::new(),
            Some(format!(
                "set spec.feedback.hostname on SmtpRelay {}: bounces to {name} reach the relay's feedback listener through this MX",
                spec.relay_ref.name
            )),
        ),
    };
    Some(DesiredRecord {
        name,
        type_: DnsRecordType::MX,
        value,
        purpose: DnsRecordPurpose::ReturnPath,
        note,
    })
}

/// The tracking domain's CNAME to the relay's public tracking host, when the
/// domain tracks opens or clicks. Without a relay `spec.tracking` the record
/// has no target yet: it is listed with a note saying what to set.
pub fn tracking_record(
    spec: &SendingDomainSpec,
    relay: Option<&RelayTrackingSpec>,
) -> Option<DesiredRecord> {
    let tracking = spec.tracking.as_ref().filter(|t| t.opens || t.clicks)?;
    let (value, note) = match relay {
        Some(r) => (r.hostname.trim_end_matches('.').to_ascii_lowercase(), None),
        None => (
            String::new(),
            Some("set the relay's spec.tracking.hostname: the CNAME points there".to_string()),
        ),
    };
    Some(DesiredRecord {
        name: tracking.domain.trim_end_matches('.').to_ascii_lowercase(),
        type_: DnsRecordType::CNAME,
        value,
        purpose: DnsRecordPurpose::Tracking,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use petrel_crds::status::{DkimAlgorithm, DkimKeyEntry, DnsRecordState};

    fn spec(yaml: &str) -> SendingDomainSpec {
        serde_yaml::from_str(yaml).expect("valid spec")
    }

    fn key(selector: &str, phase: DkimKeyPhase, value: &str) -> DkimKeyEntry {
        DkimKeyEntry {
            selector: selector.into(),
            algorithm: DkimAlgorithm::Rsa2048,
            secret_name: format!("k-{selector}"),
            dns_value: value.into(),
            phase,
            created_at: Time(Timestamp::UNIX_EPOCH),
            published_at: None,
            activated_at: None,
            retired_at: None,
        }
    }

    #[test]
    fn spf_from_egress_includes_and_all() {
        let s = spec(
            "{domain: example.com, relayRef: {name: r}, spf: {includes: [_spf.google.com], mechanisms: [a], all: fail}}",
        );
        assert_eq!(
            spf_value(&s, &["203.0.113.7".into(), "2001:db8::1".into()]),
            "v=spf1 ip4:203.0.113.7 ip6:2001:db8::1 include:_spf.google.com a -all"
        );
        let plain = spec("{domain: example.com, relayRef: {name: r}}");
        assert_eq!(spf_value(&plain, &[]), "v=spf1 ~all");
    }

    #[test]
    fn dmarc_tags() {
        let s = spec(
            "{domain: example.com, relayRef: {name: r}, dmarc: {policy: reject, rua: ['mailto:a@example.com', 'mailto:b@example.net'], pct: 50, aspf: strict}}",
        );
        assert_eq!(
            dmarc_value(&s),
            "v=DMARC1; p=reject; rua=mailto:a@example.com,mailto:b@example.net; pct=50; adkim=r; aspf=s"
        );
        let d = spec("{domain: example.com, relayRef: {name: r}}");
        assert_eq!(dmarc_value(&d), "v=DMARC1; p=none; adkim=r; aspf=r");
    }

    #[test]
    fn records_for_every_published_key_and_return_path() {
        let s = spec(
            "{domain: example.com, relayRef: {name: r}, returnPathDomain: bounce.example.com}",
        );
        let status = DkimKeyStatus {
            active: Some(key("a", DkimKeyPhase::Active, "v=DKIM1; k=rsa; p=AAA")),
            next: Some(key("b", DkimKeyPhase::Pending, "v=DKIM1; k=rsa; p=BBB")),
            retiring: vec![key("old", DkimKeyPhase::Retiring, "v=DKIM1; k=rsa; p=OLD")],
            ..Default::default()
        };
        let bare = desired_records(
            &spec("{domain: example.com, relayRef: {name: r}}"),
            &[],
            None,
        );
        assert!(
            bare[0]
                .note
                .as_deref()
                .is_some_and(|n| n.contains("egressIps"))
        );
        let records = desired_records(&s, &["192.0.2.1".into()], Some(&status));
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bounce.example.com",
                "a._domainkey.example.com",
                "b._domainkey.example.com",
                "old._domainkey.example.com",
                "_dmarc.example.com"
            ]
        );
        assert_eq!(records[0].purpose, DnsRecordPurpose::ReturnPath);
        assert_eq!(records[0].value, "v=spf1 ip4:192.0.2.1 ~all");
        assert!(records.iter().all(|r| r.type_ == DnsRecordType::TXT));
    }

    #[test]
    fn long_txt_values_split_into_quoted_strings() {
        let value = format!("v=DKIM1; k=rsa; p={}", "A".repeat(392));
        let record = DesiredRecord {
            name: "s._domainkey.example.com".into(),
            type_: DnsRecordType::TXT,
            value: value.clone(),
            purpose: DnsRecordPurpose::Dkim,
            note: None,
        };
        let shown = record.presentation();
        let parts: Vec<&str> = shown.split("\" \"").collect();
        assert_eq!(parts.len(), 2);
        assert!(shown.starts_with('"') && shown.ends_with('"'));
        let joined: String = parts.concat().trim_matches('"').to_string();
        assert_eq!(joined, value);
        assert_eq!(parts[0].trim_start_matches('"').len(), TXT_CHUNK);
        // Exactly 255 bytes stays one unquoted string.
        let short = DesiredRecord {
            value: "x".repeat(255),
            ..record
        };
        assert_eq!(short.presentation(), "x".repeat(255));
    }

    #[test]
    fn split_respects_utf8_and_escapes() {
        let value = format!("{}é\"end", "a".repeat(254));
        let shown = split_txt(&value);
        assert_eq!(shown, format!("\"{}\" \"é\\\"end\"", "a".repeat(254)));
    }

    #[test]
    fn tracking_cname_points_at_the_relay_host_and_verifies() {
        let sd = spec(
            "{domain: example.com, relayRef: {name: r}, tracking: {opens: true, domain: Track.Example.com}}",
        );
        let relay = RelayTrackingSpec {
            hostname: "track.petrel.example.net".into(),
            key_secret_name: "k".into(),
        };
        let record = tracking_record(&sd, Some(&relay)).unwrap();
        assert_eq!(record.name, "track.example.com");
        assert_eq!(record.type_, DnsRecordType::CNAME);
        assert_eq!(record.value, "track.petrel.example.net");
        assert_eq!(record.purpose, DnsRecordPurpose::Tracking);
        let answer = |s: &str| TxtAnswer::Records(vec![s.to_string()]);
        let table = [
            (
                answer("Track.Petrel.Example.net."),
                DnsRecordState::Verified,
            ),
            (answer("elsewhere.example.net"), DnsRecordState::Mismatch),
            (TxtAnswer::NotFound, DnsRecordState::Missing),
            (TxtAnswer::Failed("timeout".into()), DnsRecordState::Unknown),
        ];
        for (answer, want) in table {
            assert_eq!(evaluate(&record, &answer).0, want, "{answer:?}");
        }
        let unset = tracking_record(&sd, None).unwrap();
        assert!(unset.note.is_some());
        assert_eq!(
            evaluate(&unset, &answer("x.example")).0,
            DnsRecordState::Mismatch
        );
        let off =
            spec("{domain: example.com, relayRef: {name: r}, tracking: {domain: t.example.com}}");
        assert_eq!(tracking_record(&off, Some(&relay)), None);
        assert_eq!(
            tracking_record(
                &spec("{domain: example.com, relayRef: {name: r}}"),
                Some(&relay)
            ),
            None
        );
    }

    #[test]
    fn return_path_mx_points_at_the_feedback_host_and_verifies() {
        let sd = spec(
            "{domain: example.com, relayRef: {name: main}, returnPathDomain: Bounces.example.com}",
        );
        let feedback: RelayFeedbackSpec =
            serde_yaml::from_str("{hostname: feedback.petrel.example.net}").unwrap();
        let record = return_path_mx(&sd, Some(&feedback)).unwrap();
        assert_eq!(record.name, "bounces.example.com");
        assert_eq!(record.type_, DnsRecordType::MX);
        assert_eq!(record.value, "10 feedback.petrel.example.net");
        assert_eq!(record.purpose, DnsRecordPurpose::ReturnPath);
        let answer = |s: &[&str]| TxtAnswer::Records(s.iter().map(|s| s.to_string()).collect());
        let table = [
            (
                answer(&["10 feedback.petrel.example.net"]),
                DnsRecordState::Verified,
            ),
            (
                answer(&["20 Feedback.Petrel.Example.net."]),
                DnsRecordState::Verified,
            ),
            (answer(&["10 mx.example.com"]), DnsRecordState::Mismatch),
            (
                answer(&["10 feedback.petrel.example.net", "20 mx.example.com"]),
                DnsRecordState::Mismatch,
            ),
            (TxtAnswer::NotFound, DnsRecordState::Missing),
            (TxtAnswer::Failed("timeout".into()), DnsRecordState::Unknown),
        ];
        for (answer, want) in table {
            assert_eq!(evaluate(&record, &answer).0, want, "{answer:?}");
        }
        // No feedback host on the relay: listed without a target, saying what to set.
        let unset = return_path_mx(&sd, None).unwrap();
        assert_eq!(unset.value, "");
        assert!(
            unset
                .note
                .as_deref()
                .is_some_and(|n| n.contains("spec.feedback.hostname on SmtpRelay main")),
            "{:?}",
            unset.note
        );
        assert_eq!(
            evaluate(&unset, &answer(&["10 x.example"])).0,
            DnsRecordState::Mismatch
        );
        // No return-path domain, no MX.
        assert_eq!(
            return_path_mx(
                &spec("{domain: example.com, relayRef: {name: main}}"),
                Some(&feedback)
            ),
            None
        );
    }

    #[test]
    fn evaluate_states() {
        let want = DesiredRecord {
            name: "example.com".into(),
            type_: DnsRecordType::TXT,
            value: "v=spf1 ip4:192.0.2.1 ~all".into(),
            purpose: DnsRecordPurpose::Spf,
            note: None,
        };
        let table = [
            (TxtAnswer::NotFound, DnsRecordState::Missing),
            (
                TxtAnswer::Failed("SERVFAIL".into()),
                DnsRecordState::Unknown,
            ),
            (
                TxtAnswer::Records(vec!["google-site-verification=x".into()]),
                DnsRecordState::Missing,
            ),
            (
                TxtAnswer::Records(vec![
                    "google-site-verification=x".into(),
                    "v=spf1  ip4:192.0.2.1 ~all".into(),
                ]),
                DnsRecordState::Verified,
            ),
            (
                TxtAnswer::Records(vec!["V=SPF1 +ip4:192.0.2.1   ~ALL".into()]),
                DnsRecordState::Verified,
            ),
            (
                TxtAnswer::Records(vec!["v=spf1 -all".into()]),
                DnsRecordState::Mismatch,
            ),
            (
                TxtAnswer::Records(vec![
                    "v=spf1 ip4:192.0.2.1 ~all".into(),
                    "v=spf1 -all".into(),
                ]),
                DnsRecordState::Mismatch,
            ),
        ];
        for (answer, expected) in table {
            assert_eq!(evaluate(&want, &answer).0, expected, "{answer:?}");
        }
        let (_, observed) = evaluate(&want, &TxtAnswer::Records(vec!["v=spf1 -all".into()]));
        assert_eq!(observed.as_deref(), Some("v=spf1 -all"));
        let dmarc = DesiredRecord {
            value: "v=DMARC1; p=none; adkim=r; aspf=r".into(),
            ..want
        };
        let served = TxtAnswer::Records(vec!["v=DMARC1;p=none;adkim=r;aspf=r;".into()]);
        assert_eq!(evaluate(&dmarc, &served).0, DnsRecordState::Verified);
        // Tag order, spacing, case and tags at their default do not matter to receivers.
        for same in [
            "v=DMARC1; p=none",
            "v=DMARC1 ; aspf=r ; adkim=r ; p=NONE ; pct=100",
        ] {
            let served = TxtAnswer::Records(vec![same.into()]);
            assert_eq!(
                evaluate(&dmarc, &served).0,
                DnsRecordState::Verified,
                "{same}"
            );
        }
        for different in [
            "v=DMARC1; p=reject",
            "v=DMARC1; p=none; adkim=s",
            "v=DMARC1; p=none; p=none",
        ] {
            let served = TxtAnswer::Records(vec![different.into()]);
            assert_eq!(
                evaluate(&dmarc, &served).0,
                DnsRecordState::Mismatch,
                "{different}"
            );
        }
        let dkim = DesiredRecord {
            name: "s._domainkey.example.com".into(),
            value: "v=DKIM1; k=rsa; p=MIIBIjANBgkqAbC".into(),
            purpose: DnsRecordPurpose::Dkim,
            ..dmarc
        };
        for same in [
            "v=DKIM1;k=rsa;p=MIIBIjANBgkqAbC",
            "v=DKIM1; p=MIIBIjAN BgkqAbC",
            "v=DKIM1; K=RSA; p=MIIBIjANBgkqAbC;",
        ] {
            let served = TxtAnswer::Records(vec![same.into()]);
            assert_eq!(
                evaluate(&dkim, &served).0,
                DnsRecordState::Verified,
                "{same}"
            );
        }
        // Base64 is case-sensitive: another key is a mismatch.
        let served = TxtAnswer::Records(vec!["v=DKIM1; k=rsa; p=miibijanbgkqabc".into()]);
        assert_eq!(evaluate(&dkim, &served).0, DnsRecordState::Mismatch);
    }
}
