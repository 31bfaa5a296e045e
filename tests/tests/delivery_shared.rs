//! Two relays' delivery workers on one Redis share the queue: every unit
//! is delivered, and none by both while its lease is valid.

mod delivery_support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config, until};

const MESSAGES: usize = 60;

#[tokio::test]
async fn two_relays_share_the_work_and_never_deliver_a_unit_twice() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();

        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.workers = 4;
        let a = Relay::start(config.clone()).await;
        let b = Relay::start(config).await;

        for i in 0..MESSAGES {
            let rcpt = format!("user{i}@dest.test");
            a.ctx
                .queue
                .enqueue(
                    message(&format!("m{i}"), "sender@example.test", &[&rcpt], "shared"),
                    Vec::new(),
                )
                .await
                .unwrap();
        }
        let got = sink.wait_for(MESSAGES, Duration::from_secs(40)).await;
        assert_eq!(got.len(), MESSAGES, "every message delivered");
        let mut per_rcpt: BTreeMap<String, usize> = BTreeMap::new();
        for r in &got {
            for rcpt in &r.rcpt_to {
                *per_rcpt.entry(rcpt.clone()).or_default() += 1;
            }
        }
        assert_eq!(per_rcpt.len(), MESSAGES);
        assert!(
            per_rcpt.values().all(|&n| n == 1),
            "a unit was delivered twice: {per_rcpt:?}"
        );
        // The sink records a message when it answers 250; the relays count
        // it a moment later, when they read that reply.
        let (ra, rb) = (&a, &b);
        assert!(
            until(Duration::from_secs(10), || async {
                ra.delivered("example.test") + rb.delivered("example.test") >= MESSAGES as u64
            })
            .await
        );
        let (da, db) = (a.delivered("example.test"), b.delivered("example.test"));
        assert_eq!(da + db, MESSAGES as u64, "each unit counted once");
        eprintln!("relay a delivered {da}, relay b delivered {db}");
        a.stop().await;
        b.stop().await;
    })
    .await
    .expect("test timed out");
}
