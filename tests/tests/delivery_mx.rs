//! Delivery end to end: a real Redis queue, the in-process DNS server and
//! the SMTP sink as the destination's MX, over TCP on 127.0.0.1.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use petrel_relay::queue::now_millis;
use petrel_tests::dns::{DnsServer, Failure};
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Mode, Reply, SmtpSink};

use delivery_support::{LIMIT, Relay, message, mx_config, until};

/// Redis, DNS with `dest.test` and `example.test` (the senders' domain,
/// where bounces go) both pointing at the sink, and the sink.
struct World {
    redis: RedisServer,
    dns: DnsServer,
    sink: SmtpSink,
}

async fn world(sink: SmtpSink) -> World {
    let redis = RedisServer::start().await.expect("redis");
    let dns = DnsServer::start().await.expect("dns");
    for domain in ["dest.test", "example.test"] {
        dns.add_mx(domain, 10, "mx.dest.test");
    }
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    World { redis, dns, sink }
}

impl World {
    async fn relay(&self) -> Relay {
        Relay::start(mx_config(
            &self.redis.url(),
            self.dns.addr(),
            self.sink.port(),
        ))
        .await
    }
}

#[tokio::test]
async fn delivered_with_starttls_when_offered() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        let relay = w.relay().await;
        let msg = message(
            "m-tls",
            "sender@example.test",
            &["user@dest.test", "other@DEST.test"],
            "tls",
        );
        relay.ctx.queue.enqueue(msg, Vec::new()).await.unwrap();

        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert!(
            r.tls,
            "STARTTLS was offered, so the session must be encrypted"
        );
        assert_eq!(r.ehlo, "relay.test");
        assert_eq!(r.mail_from, "sender@example.test");
        assert_eq!(
            r.rcpt_to,
            vec!["user@dest.test", "other@DEST.test"],
            "one transaction for the unit"
        );
        assert!(
            r.text().contains("\r\n.leading dot\r\n"),
            "dot-stuffing undone by the sink: {}",
            r.text()
        );

        // The unit is done and the message gone from the queue.
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(10), || {
                let q = q.clone();
                async move {
                    q.stats(now_millis())
                        .await
                        .map(|s| s.messages == 0)
                        .unwrap_or(false)
                }
            })
            .await
        );
        assert_eq!(relay.delivered("example.test"), 2);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn plaintext_when_starttls_not_offered_and_deferred_when_required() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::builder().starttls(false).start().await.unwrap()).await;
        let mut config = mx_config(&w.redis.url(), w.dns.addr(), w.sink.port());
        config.delivery.outbound_tls = petrel_crds::config::OutboundTls::Encrypted;
        let strict = Relay::start(config).await;
        strict
            .ctx
            .queue
            .enqueue(
                message(
                    "m-req",
                    "sender@example.test",
                    &["user@dest.test"],
                    "required",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        // The relay connects, sees no STARTTLS, and defers without sending.
        let sink = &w.sink;
        assert!(
            until(Duration::from_secs(10), || async {
                sink.connections() >= 2
            })
            .await,
            "retried"
        );
        assert_eq!(
            sink.transactions(),
            0,
            "nothing may be sent in plain text under `encrypted`"
        );
        strict.stop().await;

        // An opportunistic relay delivers the same unit in plain text.
        let relaxed = w.relay().await;
        let got = sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert!(!got[0].tls);
        relaxed.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn retried_after_dropped_connection_and_4xx_then_delivered() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.sink.set_mode(Mode::DropMidData);
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-retry",
                    "sender@example.test",
                    &["user@dest.test"],
                    "retry",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let sink = &w.sink;
        assert!(
            until(Duration::from_secs(10), || async {
                sink.connections() >= 1
            })
            .await
        );
        // Next connection: a normal server that answers 451 once, then 250.
        sink.set_mode(Mode::Normal);
        sink.on_next_data(Reply::new(451, "4.3.0 try again later"));
        let got = sink.wait_for(1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "delivered after the retries");
        assert!(
            // The 451 connection may be reused from the idle pool for the
            // successful retry, so two connections at least.
            sink.connections() >= 2,
            "the dropped one, then the 451 and the success: {}",
            sink.connections()
        );
        assert!(
            sink.transactions() >= 2,
            "the 451 transaction and the accepted one"
        );
        assert_eq!(got[0].rcpt_to, vec!["user@dest.test"]);
        assert!(
            relay
                .ctx
                .metrics
                .deferred
                .with_label_values(&["example.test", "other"])
                .get()
                >= 2
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

fn dsn_text(received: &petrel_tests::smtp_sink::Received) -> (String, String) {
    let msg = MessageParser::default()
        .parse(&received.data)
        .expect("DSN parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let status = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "message" && c.subtype() == Some("delivery-status"))
        })
        .expect("a message/delivery-status part");
    let headers = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "text" && c.subtype() == Some("rfc822-headers"))
        })
        .expect("a text/rfc822-headers part");
    (
        String::from_utf8_lossy(status.contents()).into_owned(),
        String::from_utf8_lossy(headers.contents()).into_owned(),
    )
}

#[tokio::test]
async fn bounced_with_a_dsn_after_5xx_and_suppressed() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.sink
            .on_rcpt("bad@dest.test", Reply::new(550, "5.1.1 no such user"));
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-bounce",
                    "sender@example.test",
                    &["good@dest.test", "bad@dest.test"],
                    "bounce me",
                ),
                Vec::new(),
            )
            .await
            .unwrap();

        // The good recipient gets the message, the sender gets the DSN.
        let got = w.sink.wait_for(2, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let original = got
            .iter()
            .find(|r| !r.mail_from.is_empty())
            .expect("the message");
        assert_eq!(original.rcpt_to, vec!["good@dest.test"]);
        let dsn = got
            .iter()
            .find(|r| r.mail_from.is_empty())
            .expect("a DSN from <>");
        assert_eq!(dsn.rcpt_to, vec!["sender@example.test"]);

        let (status, headers) = dsn_text(dsn);
        assert!(
            status.contains("Reporting-MTA: dns; relay.test"),
            "{status}"
        );
        assert!(
            status.contains("Final-Recipient: rfc822; bad@dest.test"),
            "{status}"
        );
        assert!(!status.contains("good@dest.test"), "{status}");
        assert!(status.contains("Action: failed"), "{status}");
        assert!(status.contains("Status: 5.1.1"), "{status}");
        assert!(status.contains("Remote-MTA: dns; mx.dest.test"), "{status}");
        assert!(
            status.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"),
            "{status}"
        );
        assert!(headers.contains("Subject: bounce me"), "{headers}");

        // The hard bounce is on the suppression list, with the reply.
        let entry = relay
            .ctx
            .state
            .suppressed("bad@dest.test", "any.test", now_millis())
            .await
            .unwrap()
            .expect("suppressed");
        assert_eq!(entry.reason, petrel_relay::queue::SuppressionReason::Bounce);
        assert!(entry.remote_reply.unwrap().contains("550 5.1.1"));
        assert!(
            relay
                .ctx
                .state
                .suppressed("good@dest.test", "any.test", now_millis())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            relay
                .ctx
                .metrics
                .bounced
                .with_label_values(&["example.test", "other", "5.1"])
                .get(),
            1
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn dns_servfail_defers_and_never_bounces() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.dns.set_failure("flaky.test", Failure::ServFail);
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-servfail",
                    "sender@example.test",
                    &["user@flaky.test"],
                    "servfail",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(20), || {
                let q = q.clone();
                async move {
                    q.stats(now_millis())
                        .await
                        .map(|s| s.deferred == 1)
                        .unwrap_or(false)
                }
            })
            .await,
            "the unit is deferred"
        );
        let m = &relay.ctx.metrics;
        assert!(
            until(Duration::from_secs(20), || async {
                m.deferred
                    .with_label_values(&["example.test", "other"])
                    .get()
                    >= 2
            })
            .await,
            "retried"
        );
        assert_eq!(w.sink.received().len(), 0, "no DSN while DNS is failing");

        // DNS recovers: the message is delivered, not bounced.
        w.dns.clear_failure("flaky.test");
        w.dns.add_mx("flaky.test", 10, "mx.dest.test");
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].mail_from, "sender@example.test");
        assert_eq!(got[0].rcpt_to, vec!["user@flaky.test"]);
        assert_eq!(
            m.bounced
                .with_label_values(&["example.test", "other", "4.4"])
                .get(),
            0
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn null_mx_and_nxdomain_bounce_at_once() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.dns.add_mx("nomail.test", 0, ".");
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-null",
                    "sender@example.test",
                    &["x@nomail.test"],
                    "null mx",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-nx",
                    "sender@example.test",
                    &["y@nowhere.test"],
                    "nxdomain",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(2, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 2, "two DSNs");
        let mut statuses: Vec<String> = got
            .iter()
            .map(|r| {
                assert_eq!(r.mail_from, "");
                assert_eq!(r.rcpt_to, vec!["sender@example.test"]);
                dsn_text(r).0
            })
            .collect();
        statuses.sort();
        assert!(
            statuses
                .iter()
                .any(|s| s.contains("Final-Recipient: rfc822; x@nomail.test")
                    && s.contains("Status: 5.1.10")),
            "{statuses:?}"
        );
        assert!(
            statuses
                .iter()
                .any(|s| s.contains("Final-Recipient: rfc822; y@nowhere.test")
                    && s.contains("Status: 5.1.2")),
            "{statuses:?}"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A server refusing the sender at MAIL FROM says nothing about the
/// recipients' addresses: the message bounces, nobody is suppressed.
#[tokio::test]
async fn a_refused_sender_bounces_without_suppressing_the_recipients() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        // No enhanced code, as many servers answer: 550 alone must not be
        // taken for "no such mailbox" when it answers MAIL FROM.
        w.sink.on_mail(Reply::new(550, "sender rejected"));
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-sender-refused",
                    "sender@example.test",
                    &["someone@dest.test"],
                    "refused sender",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(20), || {
                let q = q.clone();
                async move {
                    q.stats(now_millis())
                        .await
                        .map(|s| s.messages == 0)
                        .unwrap_or(false)
                }
            })
            .await,
            "the message and its DSN are settled"
        );
        assert!(
            relay
                .ctx
                .metrics
                .bounced
                .with_label_values(&["example.test", "other", "5.x"])
                .get()
                >= 1
        );
        for address in ["someone@dest.test", "sender@example.test"] {
            assert!(
                relay
                    .ctx
                    .state
                    .suppressed(address, "any.test", now_millis())
                    .await
                    .unwrap()
                    .is_none(),
                "{address} suppressed for a MAIL FROM refusal"
            );
        }
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_bounce_to_the_null_sender_is_dropped_not_looped() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.sink
            .on_rcpt("gone@dest.test", Reply::new(550, "5.1.1 gone"));
        let relay = w.relay().await;
        let mut msg = message(
            "m-null-sender",
            "",
            &["gone@dest.test", "ok@dest.test"],
            "from <>",
        );
        msg.sending_domain = "example.test".into();
        relay.ctx.queue.enqueue(msg, Vec::new()).await.unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got[0].rcpt_to, vec!["ok@dest.test"]);
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(10), || {
                let q = q.clone();
                async move {
                    q.stats(now_millis())
                        .await
                        .map(|s| s.messages == 0)
                        .unwrap_or(false)
                }
            })
            .await,
            "the unit is settled"
        );
        assert_eq!(w.sink.received().len(), 1, "no DSN to <>");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn delayed_warning_once_then_bounce_at_expiry() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        w.sink
            .on_rcpt("slow@dest.test", Reply::new(451, "4.2.0 mailbox busy"));
        let mut config = mx_config(&w.redis.url(), w.dns.addr(), w.sink.port());
        config.delivery.delayed_dsn_after = Some(petrel_crds::config::Duration::from_secs(1));
        config.delivery.max_queue_lifetime = petrel_crds::config::Duration::from_secs(4);
        let relay = Relay::start(config).await;
        relay
            .ctx
            .queue
            .enqueue(
                message("m-slow", "sender@example.test", &["slow@dest.test"], "slow"),
                Vec::new(),
            )
            .await
            .unwrap();
        // First the warning, then (after 4 s) the bounce.
        let got = w.sink.wait_for(2, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let (first, _) = dsn_text(&got[0]);
        let (second, _) = dsn_text(&got[1]);
        assert!(
            first.contains("Action: delayed") && first.contains("Will-Retry-Until: "),
            "{first}"
        );
        assert!(first.contains("Status: 4.2.0"), "{first}");
        assert!(
            second.contains("Action: failed") && second.contains("Status: 4.2.0"),
            "{second}"
        );
        assert!(
            second.contains("Diagnostic-Code: smtp; 451 4.2.0 mailbox busy"),
            "{second}"
        );
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(10), || {
                let q = q.clone();
                async move {
                    q.stats(now_millis())
                        .await
                        .map(|s| s.messages == 0)
                        .unwrap_or(false)
                }
            })
            .await
        );
        assert_eq!(w.sink.received().len(), 2, "one warning only");
        assert!(
            relay
                .ctx
                .state
                .suppressed("slow@dest.test", "any.test", now_millis())
                .await
                .unwrap()
                .is_none(),
            "a temporary failure is not a hard bounce"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Units leased together for one destination go out over parallel
/// connections, up to `perDestinationConcurrency`, instead of one after
/// another over one.
#[tokio::test]
async fn units_for_one_destination_spread_over_its_connections() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        let backend = petrel_relay::queue::open(
            &mx_config(&w.redis.url(), w.dns.addr(), w.sink.port()).queue,
        )
        .await
        .unwrap();
        for i in 0..6 {
            let rcpt = format!("u{i}@dest.test");
            backend
                .queue
                .enqueue(
                    message(
                        &format!("m-spread-{i}"),
                        "sender@example.test",
                        &[&rcpt],
                        "spread",
                    ),
                    Vec::new(),
                )
                .await
                .unwrap();
        }
        let mut config = mx_config(&w.redis.url(), w.dns.addr(), w.sink.port());
        config.delivery.per_destination_concurrency = 3;
        let relay = Relay::start(config).await;
        let got = w.sink.wait_for(6, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 6);
        assert_eq!(w.sink.connections(), 3, "six units over three connections");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn units_for_one_destination_share_a_connection() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        // Queue first, start the workers after: one lease batch, one group.
        let backend = petrel_relay::queue::open(
            &mx_config(&w.redis.url(), w.dns.addr(), w.sink.port()).queue,
        )
        .await
        .unwrap();
        for i in 0..3 {
            let rcpt = format!("u{i}@dest.test");
            backend
                .queue
                .enqueue(
                    message(
                        &format!("m-reuse-{i}"),
                        "sender@example.test",
                        &[&rcpt],
                        "reuse",
                    ),
                    Vec::new(),
                )
                .await
                .unwrap();
        }
        // One connection allowed: the scheduler would otherwise spread the
        // three units over three parallel connections.
        let mut config = mx_config(&w.redis.url(), w.dns.addr(), w.sink.port());
        config.delivery.per_destination_concurrency = 1;
        let relay = Relay::start(config).await;
        let got = w.sink.wait_for(3, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 3);
        assert_eq!(
            w.sink.connections(),
            1,
            "three transactions over one connection"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_unreachable_mx_falls_back_to_the_next_one() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        // The preferred MX has only an IPv6 address where nothing listens
        // (the sink is on 127.0.0.1); the second is the sink.
        w.dns.add_mx("fallback.test", 5, "v6.fallback.test");
        w.dns
            .add_aaaa("v6.fallback.test", std::net::Ipv6Addr::LOCALHOST);
        w.dns.add_mx("fallback.test", 10, "mx.dest.test");
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-fallback",
                    "sender@example.test",
                    &["user@fallback.test"],
                    "fallback",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, vec!["user@fallback.test"]);
        let queried_v6 = w
            .dns
            .queries()
            .iter()
            .any(|(name, rtype)| name == "v6.fallback.test" && rtype.to_string() == "AAAA");
        assert!(
            queried_v6,
            "the IPv6 address was looked up: {:?}",
            w.dns.queries()
        );
        assert_eq!(
            relay
                .ctx
                .metrics
                .deferred
                .with_label_values(&["example.test", "other"])
                .get(),
            0,
            "the next MX was tried in the same attempt"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn smtputf8_message_to_a_server_without_it_bounces_5_6_7() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::builder().smtputf8(false).start().await.unwrap()).await;
        let relay = w.relay().await;
        let mut msg = message("m-utf8", "sender@example.test", &["josé@dest.test"], "utf8");
        msg.flags.smtputf8 = true;
        relay.ctx.queue.enqueue(msg, Vec::new()).await.unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].mail_from, "", "only the DSN arrives");
        let (status, _) = dsn_text(&got[0]);
        assert!(
            status.contains("Final-Recipient: utf-8; josé@dest.test"),
            "{status}"
        );
        assert!(status.contains("Status: 5.6.7"), "{status}");
        assert!(
            relay
                .ctx
                .state
                .suppressed("josé@dest.test", "any.test", now_millis())
                .await
                .unwrap()
                .is_none(),
            "not an address failure"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_domain_without_mx_gets_mail_at_its_address() {
    tokio::time::timeout(LIMIT, async {
        let w = world(SmtpSink::start().await.unwrap()).await;
        // RFC 5321 5.1: no MX, so the domain's own A record is the server.
        w.dns.add_a("implicit.test", Ipv4Addr::LOCALHOST);
        let relay = w.relay().await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-implicit",
                    "sender@example.test",
                    &["user@implicit.test"],
                    "implicit",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = w.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, vec!["user@implicit.test"]);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
