//! REQUIRETLS (RFC 8689) on the way out, end to end: a Redis queue, the
//! in-process DNS and the SMTP sink as the MX, advertising REQUIRETLS or
//! not, with a certificate the relay trusts or not; and `TLS-Required: No`
//! reaching a host whose certificate `verified` would refuse.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use petrel_crds::config::{OutboundTls, RelayConfig};
use petrel_relay::queue::{MessageFlags, NewMessage};
use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config};

struct World {
    redis: RedisServer,
    dns: DnsServer,
    sink: SmtpSink,
    dir: tempfile::TempDir,
}

/// `dest.test` and the senders' `example.test` both at the sink, whose
/// certificate names `cert_name`; the sink offers REQUIRETLS when `offers`.
async fn world(cert_name: &str, offers: bool) -> World {
    let redis = RedisServer::start().await.expect("redis");
    let dns = DnsServer::start().await.expect("dns");
    for domain in ["dest.test", "example.test"] {
        dns.add_mx(domain, 10, "mx.dest.test");
    }
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    let sink = SmtpSink::builder()
        .hostname(cert_name)
        .requiretls(offers)
        .start()
        .await
        .expect("sink");
    World {
        redis,
        dns,
        sink,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

impl World {
    /// `trusted`: the sink's CA is a `delivery.tls.caFile`.
    fn config(&self, mode: OutboundTls, trusted: bool) -> RelayConfig {
        let mut config = mx_config(&self.redis.url(), self.dns.addr(), self.sink.port());
        config.delivery.outbound_tls = mode;
        if trusted {
            config.delivery.tls.ca_file =
                Some(self.sink.ca().unwrap().write_ca(self.dir.path()).unwrap());
        }
        config.validate().expect("valid config");
        config
    }
}

fn with_flags(mut m: NewMessage, flags: MessageFlags) -> NewMessage {
    m.flags = flags;
    m
}

fn requiretls(id: &str) -> NewMessage {
    with_flags(
        message(id, "sender@example.test", &["user@dest.test"], "secret"),
        MessageFlags {
            require_tls: true,
            ..MessageFlags::default()
        },
    )
}

#[tokio::test]
async fn requiretls_goes_over_verified_tls_to_a_server_that_offers_it() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", true).await;
        // Opportunistic by config: REQUIRETLS alone makes it verified.
        let relay = Relay::start(w.config(OutboundTls::Opportunistic, true)).await;
        relay
            .ctx
            .queue
            .enqueue(requiretls("r-ok"), Vec::new())
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, ["user@dest.test"]);
        assert!(got[0].tls, "over TLS");
        assert!(got[0].requiretls, "relayed with MAIL FROM ... REQUIRETLS");
        assert_eq!(
            relay
                .ctx
                .metrics
                .outbound_tls
                .with_label_values(&["verified", "tls"])
                .get(),
            1
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Returns the DSN the sink got for `sender@example.test`, checking the
/// original never arrived.
async fn the_bounce(w: &World) -> String {
    let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "only the DSN arrives");
    assert_eq!(got[0].rcpt_to, ["sender@example.test"]);
    assert_eq!(got[0].mail_from, "");
    got[0].text()
}

#[tokio::test]
async fn requiretls_bounces_with_5_7_30_when_the_server_does_not_offer_it() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", false).await;
        let relay = Relay::start(w.config(OutboundTls::Opportunistic, true)).await;
        relay
            .ctx
            .queue
            .enqueue(requiretls("r-no"), Vec::new())
            .await
            .unwrap();
        let dsn = the_bounce(&w).await;
        assert!(dsn.contains("5.7.30"), "{dsn}");
        assert!(dsn.contains("does not offer REQUIRETLS"), "{dsn}");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn requiretls_bounces_with_5_7_30_on_an_untrusted_certificate() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", true).await;
        // The sink's CA is not trusted: PKIX verification fails.
        let relay = Relay::start(w.config(OutboundTls::Opportunistic, false)).await;
        relay
            .ctx
            .queue
            .enqueue(requiretls("r-untrusted"), Vec::new())
            .await
            .unwrap();
        let dsn = the_bounce(&w).await;
        assert!(dsn.contains("5.7.30"), "{dsn}");
        assert!(dsn.contains("certificate-not-trusted"), "{dsn}");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `verified` by config and a certificate for another name: the default
/// message waits, the `TLS-Required: No` one is delivered (over TLS).
#[tokio::test]
async fn tls_required_no_reaches_a_host_that_verified_refuses() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example", false).await;
        let relay = Relay::start(w.config(OutboundTls::Verified, true)).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("n-default", "sender@example.test", &["one@dest.test"], "d"),
                Vec::new(),
            )
            .await
            .unwrap();
        relay
            .ctx
            .queue
            .enqueue(
                with_flags(
                    message("n-optional", "sender@example.test", &["two@dest.test"], "o"),
                    MessageFlags {
                        tls_optional: true,
                        ..MessageFlags::default()
                    },
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got[0].rcpt_to, ["two@dest.test"]);
        assert!(got[0].tls, "still TLS, just not verified");
        // The default message was refused for the certificate, not sent.
        assert!(
            relay
                .ctx
                .metrics
                .outbound_tls
                .with_label_values(&["verified", "certificate-host-mismatch"])
                .get()
                >= 1
        );
        assert_eq!(w.sink.transactions(), 1);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
