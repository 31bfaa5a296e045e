//! Outbound TLS modes end to end: a Redis queue, the in-process DNS server
//! and the SMTP sink (STARTTLS with its own test CA) as the MX.
//!
//! `verified` must deliver to a certificate for the MX name that chains to
//! a trusted anchor (`delivery.tls.caFile`), and defer, never falling back
//! to plain text, on a wrong name or an unknown issuer.

mod delivery_support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use petrel_crds::config::{Duration as CfgDuration, OutboundTls, RelayConfig, TlsPolicyOverride};
use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config, until};

/// Redis, DNS (`dest.test` and the senders' `example.test` both at
/// `mx.dest.test` = 127.0.0.1), and a sink whose certificate names
/// `cert_name` (and localhost, 127.0.0.1).
struct World {
    redis: RedisServer,
    dns: DnsServer,
    sink: SmtpSink,
    dir: tempfile::TempDir,
}

async fn world(cert_name: &str) -> World {
    let redis = RedisServer::start().await.expect("redis");
    let dns = DnsServer::start().await.expect("dns");
    for domain in ["dest.test", "example.test"] {
        dns.add_mx(domain, 10, "mx.dest.test");
    }
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    let sink = SmtpSink::builder()
        .hostname(cert_name)
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
    /// The sink's CA as a `delivery.tls.caFile`.
    fn ca_file(&self) -> PathBuf {
        self.sink
            .ca()
            .expect("sink has a CA")
            .write_ca(self.dir.path())
            .expect("write CA")
    }

    fn config(&self, mode: OutboundTls, ca_file: Option<PathBuf>) -> RelayConfig {
        let mut config = mx_config(&self.redis.url(), self.dns.addr(), self.sink.port());
        config.delivery.outbound_tls = mode;
        config.delivery.tls.ca_file = ca_file;
        config
    }
}

fn deferred(relay: &Relay) -> u64 {
    relay
        .ctx
        .metrics
        .deferred
        .with_label_values(&["example.test", "other"])
        .get()
}

#[tokio::test]
async fn verified_delivers_to_a_certificate_for_the_mx_name() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test").await;
        let relay = Relay::start(w.config(OutboundTls::Verified, Some(w.ca_file()))).await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "v-ok",
                    "sender@example.test",
                    &["user@dest.test"],
                    "verified",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls, "verified delivery is over TLS");
        assert_eq!(
            relay
                .ctx
                .metrics
                .outbound_tls
                .with_label_values(&["verified", "tls"])
                .get(),
            1
        );
        assert_eq!(got[0].rcpt_to, vec!["user@dest.test"]);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The sink's certificate names `other.example`, not the MX: `verified`
/// defers without ever sending, `encrypted` accepts it.
#[tokio::test]
async fn verified_defers_on_a_wrong_name_and_never_sends_in_plain_text() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example").await;
        let strict = Relay::start(w.config(OutboundTls::Verified, Some(w.ca_file()))).await;
        strict
            .ctx
            .queue
            .enqueue(
                message("v-name", "sender@example.test", &["user@dest.test"], "name"),
                Vec::new(),
            )
            .await
            .unwrap();
        let sink = &w.sink;
        assert!(
            until(Duration::from_secs(15), || async {
                sink.connections() >= 2
            })
            .await,
            "retried"
        );
        assert!(until(Duration::from_secs(5), || async { deferred(&strict) >= 1 }).await);
        assert_eq!(
            sink.transactions(),
            0,
            "nothing sent: not over TLS, not in plain text"
        );
        strict.stop().await;

        // The same unit, `encrypted`: TLS with any certificate.
        let relaxed = Relay::start(w.config(OutboundTls::Encrypted, None)).await;
        let got = sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls, "encrypted delivers over TLS only");
        relaxed.stop().await;
    })
    .await
    .expect("test timed out");
}

/// No `caFile`: the sink's CA is unknown (as a self-signed certificate
/// would be), so `verified` defers; an old config saying `required` means
/// `verified` too.
#[tokio::test]
async fn verified_defers_on_an_unknown_issuer_and_required_means_verified() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test").await;
        let yaml = w
            .config(OutboundTls::Opportunistic, None)
            .to_yaml()
            .unwrap()
            .replace("outboundTls: opportunistic", "outboundTls: required");
        assert!(yaml.contains("outboundTls: required"), "{yaml}");
        let config = RelayConfig::from_yaml(&yaml).expect("`required` still loads");
        assert_eq!(config.delivery.outbound_tls, OutboundTls::Verified);
        let relay = Relay::start(config).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("v-ca", "sender@example.test", &["user@dest.test"], "ca"),
                Vec::new(),
            )
            .await
            .unwrap();
        let sink = &w.sink;
        assert!(
            until(Duration::from_secs(15), || async {
                sink.connections() >= 2
            })
            .await
        );
        assert!(until(Duration::from_secs(5), || async { deferred(&relay) >= 1 }).await);
        assert_eq!(sink.transactions(), 0);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `delivery.tls.policies` makes one destination `verified` while the
/// default stays opportunistic; at expiry the sender gets a DSN that says
/// why (the DSN itself goes to `example.test`, opportunistic).
#[tokio::test]
async fn per_destination_verified_bounces_at_expiry_with_the_certificate_error() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example").await;
        let mut config = w.config(OutboundTls::Opportunistic, Some(w.ca_file()));
        config.delivery.tls.policies = vec![TlsPolicyOverride {
            domain: "DEST.test".into(),
            mode: OutboundTls::Verified,
        }];
        config.delivery.max_queue_lifetime = CfgDuration::from_secs(3);
        config.validate().expect("valid");
        let relay = Relay::start(config).await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "v-exp",
                    "sender@example.test",
                    &["user@dest.test"],
                    "expire",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "only the DSN arrives");
        let dsn = &got[0];
        assert_eq!(dsn.rcpt_to, vec!["sender@example.test"]);
        assert_eq!(dsn.mail_from, "", "a DSN has the null sender");
        let text = dsn.text();
        assert!(text.contains("user@dest.test"), "{text}");
        assert!(
            text.contains("certificate-host-mismatch")
                && text.contains("not valid for name \"mx.dest.test\""),
            "the DSN names the certificate problem: {text}"
        );
        let refused = relay
            .ctx
            .metrics
            .outbound_tls
            .with_label_values(&["verified", "certificate-host-mismatch"])
            .get();
        assert!(refused >= 1, "petrel_outbound_tls_total counts the refusal");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
