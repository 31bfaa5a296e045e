//! Record verification against a real DNS server on 127.0.0.1 (the harness's
//! in-process hickory server): verified, missing, mismatch, SERVFAIL, timeout,
//! and a long RSA DKIM record served as several TXT strings.

use std::time::Duration;

use petrel_crds::status::{DkimAlgorithm, DnsRecordPurpose, DnsRecordState, DnsRecordType};
use petrel_operator::dkim_key::keygen;
use petrel_operator::dns::{HickoryTxtLookup, TxtLookup};
use petrel_operator::sending_domain::records::{DesiredRecord, TxtAnswer, evaluate};
use petrel_tests::dns::{DnsServer, Failure};

fn txt(name: &str, value: &str, purpose: DnsRecordPurpose) -> DesiredRecord {
    DesiredRecord {
        name: name.into(),
        type_: DnsRecordType::TXT,
        value: value.into(),
        purpose,
        note: None,
    }
}

async fn state(
    lookup: &HickoryTxtLookup,
    record: &DesiredRecord,
) -> (DnsRecordState, Option<String>) {
    let answer = lookup.lookup_txt(&record.name).await;
    evaluate(record, &answer)
}

#[tokio::test]
async fn verification_states_against_a_real_dns_server() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let dns = DnsServer::start().await.expect("dns server");
        let lookup =
            HickoryTxtLookup::new(&[dns.addr()], Duration::from_millis(500)).expect("resolver");

        let spf = txt(
            "example.com",
            "v=spf1 ip4:203.0.113.7 ~all",
            DnsRecordPurpose::Spf,
        );
        // Missing: NXDOMAIN.
        assert_eq!(state(&lookup, &spf).await.0, DnsRecordState::Missing);
        // Missing: the name exists but has no SPF record.
        dns.add_txt("example.com", "google-site-verification=abc");
        assert_eq!(state(&lookup, &spf).await.0, DnsRecordState::Missing);
        // Mismatch, with what DNS serves.
        dns.add_txt("example.com", "v=spf1 -all");
        let (s, observed) = state(&lookup, &spf).await;
        assert_eq!(s, DnsRecordState::Mismatch);
        assert_eq!(observed.as_deref(), Some("v=spf1 -all"));
        // Verified once fixed.
        dns.clear("example.com");
        dns.add_txt("example.com", "v=spf1 ip4:203.0.113.7 ~all");
        assert_eq!(state(&lookup, &spf).await.0, DnsRecordState::Verified);

        // SERVFAIL and timeouts are "unknown", not "missing".
        let dmarc = txt(
            "_dmarc.example.com",
            "v=DMARC1; p=none",
            DnsRecordPurpose::Dmarc,
        );
        dns.set_failure("_dmarc.example.com", Failure::ServFail);
        assert!(matches!(
            lookup.lookup_txt(&dmarc.name).await,
            TxtAnswer::Failed(_)
        ));
        assert_eq!(state(&lookup, &dmarc).await.0, DnsRecordState::Unknown);
        dns.set_failure("_dmarc.example.com", Failure::Timeout);
        assert_eq!(state(&lookup, &dmarc).await.0, DnsRecordState::Unknown);

        // An RSA key's record is longer than 255 bytes: served as several strings,
        // it still verifies.
        let key = keygen::generate(DkimAlgorithm::Rsa2048).expect("rsa key");
        assert!(key.dns_value.len() > 255);
        let dkim = txt(
            "s1._domainkey.example.com",
            &key.dns_value,
            DnsRecordPurpose::Dkim,
        );
        dns.add_txt(&dkim.name, &key.dns_value);
        assert_eq!(state(&lookup, &dkim).await.0, DnsRecordState::Verified);
    })
    .await
    .expect("bounded");
}

/// The return-path MX against a real DNS server: beside the SPF TXT at the
/// same name, pointing at the relay's feedback host (any preference), or not.
#[tokio::test]
async fn return_path_mx_verifies_against_a_real_dns_server() {
    use petrel_operator::sending_domain::records::return_path_mx;
    tokio::time::timeout(Duration::from_secs(30), async {
        let dns = DnsServer::start().await.expect("dns server");
        let lookup =
            HickoryTxtLookup::new(&[dns.addr()], Duration::from_millis(500)).expect("resolver");
        let spec: petrel_crds::sending_domain::SendingDomainSpec = serde_yaml::from_str(
            "{domain: example.com, relayRef: {name: main}, returnPathDomain: bounces.example.com}",
        )
        .expect("spec");
        let feedback: petrel_crds::smtp_relay::RelayFeedbackSpec =
            serde_yaml::from_str("{hostname: feedback.petrel.example.net}").expect("feedback");
        let mx = return_path_mx(&spec, Some(&feedback)).expect("MX");
        let check = |answer: TxtAnswer| evaluate(&mx, &answer).0;

        assert_eq!(
            check(lookup.lookup_mx(&mx.name).await),
            DnsRecordState::Missing
        );
        // The SPF record at the name is not an MX.
        dns.add_txt("bounces.example.com", "v=spf1 ip4:203.0.113.7 ~all");
        assert_eq!(
            check(lookup.lookup_mx(&mx.name).await),
            DnsRecordState::Missing
        );
        dns.add_mx("bounces.example.com", 10, "mx.example.com");
        let answer = lookup.lookup_mx(&mx.name).await;
        assert_eq!(answer, TxtAnswer::Records(vec!["10 mx.example.com".into()]));
        assert_eq!(check(answer), DnsRecordState::Mismatch);
        dns.clear("bounces.example.com");
        dns.add_mx("bounces.example.com", 5, "Feedback.Petrel.example.net");
        assert_eq!(
            check(lookup.lookup_mx(&mx.name).await),
            DnsRecordState::Verified
        );
        // The TXT lookup at the same name is unaffected by the MX.
        dns.add_txt("bounces.example.com", "v=spf1 ip4:203.0.113.7 ~all");
        assert_eq!(
            lookup.lookup_txt("bounces.example.com").await,
            TxtAnswer::Records(vec!["v=spf1 ip4:203.0.113.7 ~all".into()])
        );
        assert_eq!(
            check(lookup.lookup_mx(&mx.name).await),
            DnsRecordState::Verified
        );
        dns.set_failure("bounces.example.com", Failure::ServFail);
        assert_eq!(
            check(lookup.lookup_mx(&mx.name).await),
            DnsRecordState::Unknown
        );
    })
    .await
    .expect("bounded");
}
