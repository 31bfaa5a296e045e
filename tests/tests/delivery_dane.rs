//! DANE (RFC 7672) against real peers: a DNSSEC-signed zone served by the
//! in-process DNS server (signed in the test, its key given to the relay as
//! a trust anchor), TLSA records for the SMTP sink's certificate, and the
//! sink as the MX.
//!
//! The zones: the root is signed (the anchor, also for the unsigned child),
//! `dane.test` is signed with its own key (anchored too), `plain.test` is
//! an unsigned delegation (the root's signed NSEC proves it has no
//! DS: insecure, not bogus).

mod delivery_support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use petrel_crds::config::RelayConfig;
use petrel_relay::delivery::dane::lookup::{self, Security, TlsaAnswer};
use petrel_relay::delivery::dane::tlsa::{Digest, Part, association};
use petrel_relay::delivery::dane::{anchors, tlsa};
use petrel_relay::delivery::mx;
use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config, until};

/// The DNS server with the three zones and the anchor file's text.
struct Zones {
    dns: DnsServer,
    anchors: String,
}

async fn zones() -> Zones {
    let dns = DnsServer::start().await.expect("dns");
    // The root is signed too: the relay checks that its nameservers serve
    // DNSSEC by validating the root DNSKEY before it trusts any answer.
    let parent = dns.sign_zone(".").expect("sign the root");
    let child = dns.sign_zone("dane.test").expect("sign dane.test");
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
    /// The anchors as a `delivery.mx.trustAnchorFile` in `dir`.
    fn anchor_file(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("anchors.zone");
        std::fs::write(&path, &self.anchors).expect("write anchors");
        path
    }

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
        z.dns
            .add_tlsa("_25._tcp.mx.dane.test", 3, 1, 1, data.clone());
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

/// Redis, the zones, a sink as `mx.dane.test` and `mx.plain.test`, and a
/// relay config trusting the zones' keys.
struct World {
    redis: RedisServer,
    zones: Zones,
    sink: SmtpSink,
    dir: tempfile::TempDir,
}

async fn world(sink: SmtpSink) -> World {
    World {
        redis: RedisServer::start().await.expect("redis"),
        zones: zones().await,
        sink,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

async fn sink() -> SmtpSink {
    SmtpSink::builder()
        .hostname("mx.dane.test")
        .start()
        .await
        .expect("sink")
}

impl World {
    fn config(&self) -> RelayConfig {
        let mut config = mx_config(&self.redis.url(), self.zones.dns.addr(), self.sink.port());
        config.delivery.mx.trust_anchor_file = Some(self.zones.anchor_file(self.dir.path()));
        config
    }

    /// Publish `usage selector matching data` for the MX host on the
    /// sink's port (`_<port>._tcp.mx.dane.test`).
    fn tlsa(&self, usage: u8, selector: u8, matching: u8, data: Vec<u8>) {
        let name = format!("_{}._tcp.mx.dane.test", self.sink.port());
        self.zones
            .dns
            .add_tlsa(&name, usage, selector, matching, data);
    }

    /// DANE-EE SPKI SHA-256 of the sink's certificate.
    fn tlsa_for_sink(&self) {
        let leaf = self.sink.leaf_cert().expect("sink has TLS");
        let data = association(leaf, Part::PublicKey, Digest::Sha256).expect("spki");
        self.tlsa(3, 1, 1, data);
    }
}

async fn send(relay: &Relay, id: &str, rcpt: &str) {
    relay
        .ctx
        .queue
        .enqueue(
            message(id, "sender@example.test", &[rcpt], "dane"),
            Vec::new(),
        )
        .await
        .expect("enqueue");
}

fn tls_count(relay: &Relay, policy: &str, result: &str) -> u64 {
    relay
        .ctx
        .metrics
        .outbound_tls
        .with_label_values(&[policy, result])
        .get()
}

fn deferred(relay: &Relay) -> u64 {
    relay
        .ctx
        .metrics
        .deferred
        .with_label_values(&["example.test", "other"])
        .get()
}

/// Deferred at least once with nothing sent (neither over TLS nor in
/// plain text).
async fn assert_deferred_unsent(relay: &Relay, sink: &SmtpSink) {
    assert!(
        until(Duration::from_secs(20), || async { deferred(relay) >= 1 }).await,
        "deferred"
    );
    assert_eq!(sink.transactions(), 0, "nothing sent");
}

#[tokio::test]
async fn dane_ee_match_delivers_over_tls() {
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        w.tlsa_for_sink();
        let relay = Relay::start(w.config()).await;
        send(&relay, "ee-ok", "user@dane.test").await;
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls, "DANE delivery is over TLS");
        assert_eq!(tls_count(&relay, "dane", "tls"), 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn dane_ta_chains_to_the_published_anchor_and_checks_the_name() {
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        let ca = w.sink.ca().expect("sink CA").cert_der().clone();
        w.tlsa(
            2,
            0,
            1,
            association(&ca, Part::Certificate, Digest::Sha256).unwrap(),
        );
        let relay = Relay::start(w.config()).await;
        send(&relay, "ta-ok", "user@dane.test").await;
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls);
        assert_eq!(tls_count(&relay, "dane", "tls"), 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The anchor is right but the certificate names another host: DANE-TA
/// checks the name (DANE-EE would not).
#[tokio::test]
async fn dane_ta_defers_on_a_certificate_for_another_name() {
    tokio::time::timeout(LIMIT, async {
        let other = SmtpSink::builder()
            .hostname("other.example")
            .start()
            .await
            .expect("sink");
        let w = world(other).await;
        let ca = w.sink.ca().expect("sink CA").cert_der().clone();
        w.tlsa(
            2,
            0,
            1,
            association(&ca, Part::Certificate, Digest::Sha256).unwrap(),
        );
        let relay = Relay::start(w.config()).await;
        send(&relay, "ta-name", "user@dane.test").await;
        assert_deferred_unsent(&relay, &w.sink).await;
        assert!(tls_count(&relay, "dane", "certificate-host-mismatch") >= 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_certificate_matching_no_tlsa_record_defers_and_never_sends_plain_text() {
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        w.tlsa(3, 1, 1, vec![0x5a; 32]);
        let relay = Relay::start(w.config()).await;
        send(&relay, "ee-bad", "user@dane.test").await;
        assert_deferred_unsent(&relay, &w.sink).await;
        assert!(w.sink.connections() >= 1, "the host was tried");
        assert!(tls_count(&relay, "dane", "tlsa-invalid") >= 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// STARTTLS stripped (the sink offers none) while TLSA records exist: the
/// default `opportunistic` would send in plain text, DANE defers.
#[tokio::test]
async fn a_missing_starttls_defers_when_tlsa_records_exist() {
    tokio::time::timeout(LIMIT, async {
        let plain = SmtpSink::builder()
            .hostname("mx.dane.test")
            .starttls(false)
            .start()
            .await
            .expect("sink");
        let w = world(plain).await;
        w.tlsa(3, 1, 1, vec![0x5a; 32]);
        let relay = Relay::start(w.config()).await;
        send(&relay, "stripped", "user@dane.test").await;
        assert_deferred_unsent(&relay, &w.sink).await;
        assert!(tls_count(&relay, "dane", "starttls-not-supported") >= 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A forged (badly signed) TLSA answer: the host is not used at all.
#[tokio::test]
async fn a_bogus_tlsa_answer_defers_without_connecting() {
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        w.tlsa_for_sink();
        w.zones
            .dns
            .corrupt_signatures(&format!("_{}._tcp.mx.dane.test", w.sink.port()));
        let relay = Relay::start(w.config()).await;
        send(&relay, "bogus", "user@dane.test").await;
        assert_deferred_unsent(&relay, &w.sink).await;
        assert_eq!(
            w.sink.connections(),
            0,
            "no connection to a host with bogus TLSA"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// An unsigned zone (provably insecure) falls back to today's policy:
/// opportunistic TLS, any certificate.
#[tokio::test]
async fn an_unsigned_zone_falls_back_to_the_configured_policy() {
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        let relay = Relay::start(w.config()).await;
        send(&relay, "plain", "user@plain.test").await;
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(tls_count(&relay, "opportunistic", "tls"), 1);
        assert_eq!(tls_count(&relay, "dane", "tls"), 0);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `dane.test` also publishes an MTA-STS `enforce` policy listing the MX,
/// but the sink's certificate chains to no anchor the relay trusts for
/// PKIX: MTA-STS alone would defer. Its DANE-EE record matches, and DANE
/// wins for that host (RFC 8461 section 2): delivered, policy `dane`.
#[tokio::test]
async fn dane_wins_over_an_mta_sts_enforce_policy() {
    use petrel_tests::https::HttpsServer;
    use petrel_tests::tls::TestCa;
    tokio::time::timeout(LIMIT, async {
        let w = world(sink().await).await;
        w.tlsa_for_sink();
        w.zones.dns.add_txt("_mta-sts.dane.test", "v=STSv1; id=1;");
        w.zones.dns.add_a("mta-sts.dane.test", Ipv4Addr::LOCALHOST);
        let policy_ca = TestCa::new().unwrap();
        let https =
            HttpsServer::start(&policy_ca.issue_server_cert(&["mta-sts.dane.test"]).unwrap())
                .await
                .expect("https");
        https.respond(
            200,
            "text/plain; charset=utf-8",
            "version: STSv1\r\nmode: enforce\r\nmx: mx.dane.test\r\nmax_age: 86400\r\n",
        );
        let ca_file = w.dir.path().join("policy-ca.pem");
        std::fs::write(&ca_file, policy_ca.cert_pem()).unwrap();
        let mut config = w.config();
        config.delivery.tls.ca_file = Some(ca_file);
        config.delivery.mx.mta_sts_port = https.port();
        let relay = Relay::start(config).await;
        send(&relay, "sts-dane", "user@dane.test").await;
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls);
        assert!(
            !https.requests().is_empty(),
            "the MTA-STS policy was fetched"
        );
        assert_eq!(tls_count(&relay, "dane", "tls"), 1);
        assert_eq!(tls_count(&relay, "mta-sts", "tls"), 0);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
