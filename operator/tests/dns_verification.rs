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
