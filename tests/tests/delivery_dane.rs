//! DANE (RFC 7672) against real peers: a DNSSEC-signed zone served by the
//! in-process DNS server (signed in the test, its key given to the relay as
//! a trust anchor), TLSA records for the SMTP sink's certificate, and the
//! sink as the MX.
//!
//! The zones: `test.` is signed (the anchor for the unsigned child),
//! `dane.test` is signed with its own key (anchored too), `plain.test` is
//! an unsigned delegation below `test.` (the signed NSEC proves it has no
//! DS: insecure, not bogus).

mod delivery_support;

use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use petrel_relay::delivery::dane::lookup::{self, Security, TlsaAnswer};
use petrel_relay::delivery::dane::{anchors, tlsa};
use petrel_relay::delivery::mx;
use petrel_tests::dns::DnsServer;

use delivery_support::LIMIT;

/// The DNS server with the three zones and the anchor file's text.
struct Zones {
    dns: DnsServer,
    anchors: String,
}

async fn zones() -> Zones {
    let dns = DnsServer::start().await.expect("dns");
    let parent = dns.sign_zone("test").expect("sign test.");
    let child = dns.sign_zone("dane.test").expect("sign dane.test");
    dns.add_ns("test", "ns.test");
    dns.add_ns("dane.test", "ns.dane.test");
    dns.add_mx("dane.test", 10, "mx.dane.test");
    dns.add_a("mx.dane.test", Ipv4Addr::LOCALHOST);
    dns.add_ns("plain.test", "ns.plain.test");
    dns.add_mx("plain.test", 10, "mx.plain.test");
    dns.add_a("mx.plain.test", Ipv4Addr::LOCALHOST);
    Zones {
        dns,
        anchors: format!("{}\n{}\n", parent.anchor_line(), child.anchor_line()),
    }
}

impl Zones {
    fn resolver(&self) -> TokioResolver {
        let anchors = anchors::parse(&self.anchors).expect("anchors");
        mx::build_validating_resolver(&[self.dns.addr()], Arc::new(anchors)).expect("resolver")
    }
}

#[tokio::test]
async fn validated_lookups_tell_secure_insecure_and_bogus_apart() {
    tokio::time::timeout(LIMIT, async {
        let z = zones().await;
        let data = vec![0xab; 32];
        z.dns.add_tlsa("_25._tcp.mx.dane.test", 3, 1, 1, data.clone());
        let r = z.resolver();

        assert_eq!(lookup::mx_security(&r, "dane.test").await, Security::Secure);
        match lookup::tlsa(&r, "mx.dane.test", 25).await {
            TlsaAnswer::Secure(records) => {
                assert_eq!(records.len(), 1);
                let usable = tlsa::Tlsa::usable(&records[0]).expect("usable");
                assert_eq!(usable.data, data);
            }
            other => panic!("expected secure TLSA, got {other:?}"),
        }

        assert_eq!(
            lookup::mx_security(&r, "plain.test").await,
            Security::Insecure
        );
        assert_eq!(
            lookup::tlsa(&r, "mx.plain.test", 25).await,
            TlsaAnswer::NotSecure
        );

        z.dns.corrupt_signatures("_25._tcp.mx.dane.test");
        let fresh = z.resolver();
        assert!(
            matches!(
                lookup::tlsa(&fresh, "mx.dane.test", 25).await,
                TlsaAnswer::Bogus(_)
            ),
            "a bad signature is bogus"
        );
    })
    .await
    .expect("test timed out");
}
