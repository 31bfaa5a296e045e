//! MTA-STS end to end: `_mta-sts` TXT and MX from the in-process DNS, the
//! policy from an HTTPS server on 127.0.0.1 whose certificate the relay
//! trusts through `delivery.tls.caFile`, and the SMTP sink as the MX.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use petrel_crds::config::RelayConfig;
use petrel_tests::dns::DnsServer;
use petrel_tests::https::HttpsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;
use petrel_tests::tls::TestCa;

use delivery_support::{LIMIT, Relay, message, mx_config, until};

const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

struct World {
    redis: RedisServer,
    dns: DnsServer,
    sink: SmtpSink,
    https: HttpsServer,
    dir: tempfile::TempDir,
    _policy_ca: TestCa,
}

/// `dest.test` publishes an MTA-STS policy (`body`, id 1) on an HTTPS
/// server for `mta-sts.dest.test`; its MX `mx.dest.test` is the sink,
/// whose certificate names `cert_name`.
async fn world(cert_name: &str, body: &str) -> World {
    let redis = RedisServer::start().await.expect("redis");
    let dns = DnsServer::start().await.expect("dns");
    for domain in ["dest.test", "example.test"] {
        dns.add_mx(domain, 10, "mx.dest.test");
    }
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    dns.add_txt("_mta-sts.dest.test", "v=STSv1; id=1;");
    dns.add_a("mta-sts.dest.test", Ipv4Addr::LOCALHOST);
    let sink = SmtpSink::builder()
        .hostname(cert_name)
        .start()
        .await
        .expect("sink");
    let policy_ca = TestCa::new().unwrap();
    let https = HttpsServer::start(&policy_ca.issue_server_cert(&["mta-sts.dest.test"]).unwrap())
        .await
        .expect("https");
    https.respond(200, "text/plain; charset=utf-8", body);
    let dir = tempfile::tempdir().unwrap();
    // One anchor file for both: the policy host's CA and the sink's.
    let anchors = format!("{}{}", policy_ca.cert_pem(), sink.ca().unwrap().cert_pem());
    std::fs::write(dir.path().join("anchors.pem"), anchors).unwrap();
    World {
        redis,
        dns,
        sink,
        https,
        dir,
        _policy_ca: policy_ca,
    }
}

impl World {
    /// Default `outboundTls: opportunistic`: whatever is stricter comes
    /// from MTA-STS.
    fn config(&self) -> RelayConfig {
        let mut config = mx_config(&self.redis.url(), self.dns.addr(), self.sink.port());
        config.delivery.tls.ca_file = Some(self.dir.path().join("anchors.pem"));
        config.delivery.mx.mta_sts_port = self.https.port();
        config.validate().expect("valid config");
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
async fn enforce_delivers_to_a_matching_mx_over_verified_tls_and_caches_the_policy() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", &policy("enforce", "*.dest.test")).await;
        let relay = Relay::start(w.config()).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("s-ok", "sender@example.test", &["user@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls);
        assert_eq!(
            relay
                .ctx
                .metrics
                .outbound_tls
                .with_label_values(&["mta-sts", "tls"])
                .get(),
            1,
            "the session ran under the MTA-STS policy"
        );
        let requests = w.https.requests();
        assert!(
            requests.contains(&(POLICY_PATH.to_string(), "mta-sts.dest.test".to_string())),
            "{requests:?}"
        );
        let cached = relay
            .ctx
            .state
            .get_value("mta-sts:dest.test")
            .await
            .unwrap()
            .expect("policy cached in the shared state");
        let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
        assert_eq!(cached["id"], "1");
        assert_eq!(cached["policy"]["mode"], "enforce");

        // Same id: the next delivery uses the cache, no second fetch.
        let fetches = w.https.requests().len();
        relay
            .ctx
            .queue
            .enqueue(
                message("s-ok2", "sender@example.test", &["two@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(w.sink.wait_for(2, Duration::from_secs(20)).await.len(), 2);
        assert_eq!(w.https.requests().len(), fetches, "cached policy reused");

        // A new id with a broken policy host: the cached policy stays.
        w.dns.clear("_mta-sts.dest.test");
        w.dns.add_txt("_mta-sts.dest.test", "v=STSv1; id=2;");
        w.https.respond(500, "text/plain", "oops");
        relay
            .ctx
            .queue
            .enqueue(
                message("s-ok3", "sender@example.test", &["three@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(w.sink.wait_for(3, Duration::from_secs(20)).await.len(), 3);
        assert!(w.https.requests().len() > fetches, "refresh attempted");
        let cached = relay
            .ctx
            .state
            .get_value("mta-sts:dest.test")
            .await
            .unwrap()
            .unwrap();
        assert!(cached.contains("\"id\":\"1\""), "old policy kept: {cached}");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The MX certificate names `other.example`: the relay is opportunistic
/// by config, but the domain's `enforce` policy makes it defer, and it
/// never sends the message, encrypted or not.
#[tokio::test]
async fn enforce_defers_on_a_certificate_mismatch_and_never_sends_plain_text() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example", &policy("enforce", "mx.dest.test")).await;
        let relay = Relay::start(w.config()).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("s-bad", "sender@example.test", &["user@dest.test"], "sts"),
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
        assert_eq!(sink.transactions(), 0, "nothing sent");
        assert!(
            relay
                .ctx
                .metrics
                .outbound_tls
                .with_label_values(&["mta-sts", "certificate-host-mismatch"])
                .get()
                >= 1
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The policy allows only `mx.other.test`: the relay does not even
/// connect to `mx.dest.test`.
#[tokio::test]
async fn enforce_defers_when_no_mx_host_matches() {
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", &policy("enforce", "mx.other.test")).await;
        let relay = Relay::start(w.config()).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("s-mx", "sender@example.test", &["user@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(until(Duration::from_secs(15), || async { deferred(&relay) >= 2 }).await);
        assert_eq!(
            w.sink.connections(),
            0,
            "a host outside the policy is never tried"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `testing` changes nothing about delivery: the wrong certificate and the
/// unlisted MX still get the mail (opportunistic, as configured).
#[tokio::test]
async fn testing_mode_delivers_despite_a_mismatch() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example", &policy("testing", "mx.other.test")).await;
        let relay = Relay::start(w.config()).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("s-test", "sender@example.test", &["user@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(!w.https.requests().is_empty(), "the policy was fetched");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A policy host with a certificate the relay does not trust is no policy
/// at all (nothing cached): delivery goes on as configured.
#[tokio::test]
async fn an_untrusted_policy_host_is_ignored() {
    tokio::time::timeout(LIMIT, async {
        let w = world("other.example", &policy("enforce", "mx.other.test")).await;
        let mut config = w.config();
        // Trust only the sink's CA, not the policy host's.
        let only_sink = w.dir.path().join("sink.pem");
        std::fs::write(&only_sink, w.sink.ca().unwrap().cert_pem()).unwrap();
        config.delivery.tls.ca_file = Some(only_sink);
        let relay = Relay::start(config).await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "s-untrusted",
                    "sender@example.test",
                    &["user@dest.test"],
                    "sts",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(w.sink.wait_for(1, Duration::from_secs(20)).await.len(), 1);
        assert_eq!(
            relay
                .ctx
                .state
                .get_value("mta-sts:dest.test")
                .await
                .unwrap(),
            None
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// RFC 8461 section 5.1: the cached `enforce` policy (same TXT id) allows
/// none of the MX hosts, but the policy host now serves one that does: the
/// relay refetches before deferring, delivers, and caches the new policy.
/// A refetch that brings nothing new defers, and is not repeated for
/// every message.
#[tokio::test]
async fn enforce_refetches_the_policy_before_deferring_when_no_mx_matches() {
    use petrel_relay::delivery::mta_sts::{Cached, Mode, Policy};
    tokio::time::timeout(LIMIT, async {
        let w = world("mx.dest.test", &policy("enforce", "*.dest.test")).await;
        let stale = Cached {
            id: "1".into(),
            policy: Policy {
                mode: Mode::Enforce,
                mx: vec!["mx.other.test".into()],
                max_age: 86_400,
            },
            fetched_at: petrel_relay::queue::now_millis(),
        };
        let relay = Relay::start(w.config()).await;
        relay
            .ctx
            .state
            .set_value(
                "mta-sts:dest.test",
                &serde_json::to_string(&stale).unwrap(),
                Duration::from_secs(86_400),
            )
            .await
            .unwrap();
        relay
            .ctx
            .queue
            .enqueue(
                message("s-re", "sender@example.test", &["user@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls);
        assert_eq!(w.https.requests().len(), 1, "one refetch");
        let cached = relay
            .ctx
            .state
            .get_value("mta-sts:dest.test")
            .await
            .unwrap()
            .unwrap();
        let cached: Cached = serde_json::from_str(&cached).unwrap();
        assert_eq!(cached.policy.mx, ["*.dest.test"], "new policy cached");
        assert_eq!(cached.id, "1");

        // Now the served policy matches nothing either: the refetch
        // (its five-minute memory expired: a 1 ms value) brings nothing
        // that matches, so the unit defers, and the next attempt does not
        // fetch again.
        w.https
            .respond(200, "text/plain", &policy("enforce", "mx.elsewhere.test"));
        relay
            .ctx
            .state
            .set_value("mta-sts-refetched:dest.test", "1", Duration::from_millis(1))
            .await
            .unwrap();
        relay
            .ctx
            .state
            .set_value(
                "mta-sts:dest.test",
                &serde_json::to_string(&stale).unwrap(),
                Duration::from_secs(86_400),
            )
            .await
            .unwrap();
        relay
            .ctx
            .queue
            .enqueue(
                message("s-re2", "sender@example.test", &["two@dest.test"], "sts"),
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(until(Duration::from_secs(15), || async { deferred(&relay) >= 2 }).await);
        assert_eq!(w.sink.transactions(), 1, "nothing more sent");
        assert_eq!(
            w.https.requests().len(),
            2,
            "refetched once, not once per attempt"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
