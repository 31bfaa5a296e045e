//! Per-destination connection slots are shared through the queue backend:
//! while every slot is taken (here by the test, standing in for another
//! pod), units wait without failing, then go out once a slot frees up.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Mode, SmtpSink};

use delivery_support::{LIMIT, Relay, message, mx_config, until};

#[tokio::test]
async fn a_unit_waits_for_a_destination_slot_without_counting_an_attempt() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.per_destination_concurrency = 1;
        let relay = Relay::start(config).await;
        let state = relay.ctx.state.clone();

        // Another pod holds the only connection slot to dest.test.
        let token = state
            .acquire_slot("dest:dest.test", 1, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("slot free");
        relay
            .ctx
            .queue
            .enqueue(
                message("m-slot", "sender@example.test", &["user@dest.test"], "slot"),
                Vec::new(),
            )
            .await
            .unwrap();
        let s = state.clone();
        assert!(
            until(Duration::from_secs(20), || {
                let s = s.clone();
                async move { s.counter("throttled:m-slot:dest.test").await.unwrap_or(0) >= 2 }
            })
            .await,
            "the unit was handed back at least twice"
        );
        assert_eq!(sink.connections(), 0, "no connection beyond the limit");
        let m = &relay.ctx.metrics;
        assert_eq!(
            m.deferred
                .with_label_values(&["example.test", "other"])
                .get(),
            0,
            "waiting is not a failure"
        );

        state.release_slot("dest:dest.test", &token).await.unwrap();
        let got = sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, vec!["user@dest.test"]);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn per_destination_rate_paces_without_failing() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.per_destination_rate = Some(1);
        let backend = petrel_relay::queue::open(&config.queue).await.unwrap();
        for i in 0..3 {
            let rcpt = format!("u{i}@dest.test");
            backend
                .queue
                .enqueue(
                    message(
                        &format!("m-rate-{i}"),
                        "sender@example.test",
                        &[&rcpt],
                        "rate",
                    ),
                    Vec::new(),
                )
                .await
                .unwrap();
        }
        let relay = Relay::start(config).await;
        let got = sink.wait_for(3, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 3, "all delivered in the end");
        // At one per second, units had to wait: each for its own place in
        // the destination's line (see delivery_pacing.rs). The three units
        // go out as concurrent groups (dispatch), and groups that reserve
        // at once may get overlapping places; a unit the rate then refuses
        // takes one new place at the end. So at least one place, and at
        // most one retake per waiting unit, never one per second of waiting.
        let places = relay
            .ctx
            .state
            .counter("rate:dest:dest.test:line")
            .await
            .unwrap();
        assert!(
            (1..=4).contains(&places),
            "units over the rate took places: {places}"
        );
        let m = &relay.ctx.metrics;
        assert_eq!(
            m.deferred
                .with_label_values(&["example.test", "other"])
                .get(),
            0
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A unit that can never get a slot is not held forever: once past the
/// maximum queue lifetime it expires, and the sender gets a DSN.
#[tokio::test]
async fn a_unit_held_back_past_its_lifetime_expires_with_a_dsn() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_mx("example.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.per_destination_concurrency = 1;
        let lifetime = config.delivery.max_queue_lifetime.get();
        let relay = Relay::start(config).await;
        let state = relay.ctx.state.clone();

        // Another pod holds the only slot to dest.test for the whole test.
        state
            .acquire_slot("dest:dest.test", 1, Duration::from_secs(600))
            .await
            .unwrap()
            .expect("slot free");
        let mut msg = message(
            "m-old",
            "sender@example.test",
            &["user@dest.test"],
            "too old",
        );
        let age = u64::try_from((lifetime + Duration::from_secs(60)).as_millis()).unwrap();
        msg.received_at = msg.received_at.saturating_sub(age);
        relay.ctx.queue.enqueue(msg, Vec::new()).await.unwrap();

        let got = sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1, "a DSN, not the message: {got:?}");
        assert!(got[0].mail_from.is_empty(), "from <>");
        assert_eq!(got[0].rcpt_to, vec!["sender@example.test"]);
        let text = String::from_utf8_lossy(&got[0].data);
        assert!(
            text.contains("Final-Recipient: rfc822; user@dest.test"),
            "{text}"
        );
        assert!(text.contains("Action: failed"), "{text}");
        assert!(text.contains("Status: 4.4.7"), "{text}");
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Issue 13 item 4: a destination slot lives a lease (the TTL), but a
/// delivery to a slow server takes longer. Two relays (pods) sharing one
/// Redis deliver to one destination limited to two connections, with a
/// two-second lease and a server that waits a second before every reply:
/// each unit takes several seconds, so without renewal the slots expire
/// mid-delivery and other groups open more connections. The sink counts
/// connections open at once; it must never see more than the limit.
#[tokio::test]
async fn slow_deliveries_keep_their_slots_and_the_limit_holds_across_pods() {
    const LIMIT_CONNECTIONS: u32 = 2;
    const MESSAGES: usize = 6;
    tokio::time::timeout(Duration::from_secs(120), async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        sink.set_mode(Mode::Stall(Duration::from_secs(1)));
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.per_destination_concurrency = LIMIT_CONNECTIONS;
        // Below the 10 s validation floor on purpose: the slot TTL is the
        // lease, and one unit takes longer than this.
        config.queue.lease = Duration::from_secs(2).into();
        let backend = petrel_relay::queue::open(&config.queue).await.unwrap();
        for i in 0..MESSAGES {
            let rcpt = format!("u{i}@dest.test");
            backend
                .queue
                .enqueue(
                    message(
                        &format!("m-slow-{i}"),
                        "sender@example.test",
                        &[&rcpt],
                        "slow",
                    ),
                    Vec::new(),
                )
                .await
                .unwrap();
        }
        let pods = [
            Relay::start(config.clone()).await,
            Relay::start(config).await,
        ];
        let got = sink.wait_for(MESSAGES, Duration::from_secs(100)).await;
        assert_eq!(got.len(), MESSAGES, "all delivered in the end");
        let max = sink.max_concurrent_connections();
        assert!(
            max <= LIMIT_CONNECTIONS as usize,
            "{max} connections were open at once; the limit is {LIMIT_CONNECTIONS}"
        );
        assert!(max >= 1);
        for pod in pods {
            pod.stop().await;
        }
    })
    .await
    .expect("test timed out");
}
