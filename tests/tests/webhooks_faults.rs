//! Webhooks under failure: the receiver answers 500 for a while and the
//! relay is SIGKILLed and restarted in between; once the receiver recovers
//! every event still arrives (Redis with AOF, and the embedded backend).
//! Two relays on one Redis: every event arrives, duplicates are counted.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

mod webhooks_support;

use std::time::Duration;

use petrel_tests::bench::inject::{self, Plan};
use petrel_tests::bench::relay::{Destination, RelayBuilder, RelayProcess};
use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::bench::sink::Sink;
use petrel_tests::redis::{Persistence, RedisServer};
use petrel_tests::webhook_receiver::WebhookReceiver;
use webhooks_support::*;

const LIMIT: Duration = Duration::from_secs(180);
const TYPES: &[&str] = &["accepted", "delivered"];

async fn send(relay: &RelayProcess, run: &str, n: u64) -> Vec<String> {
    let mut plan = Plan::new(vec![relay.smtp_addr()], n, 4);
    plan.run_id = run.into();
    plan.io_timeout = Duration::from_secs(10);
    let report = inject::run(plan).await;
    assert!(
        report.failed.is_empty(),
        "client failures: {:?}",
        report.failed.first()
    );
    accepted_ids(&report)
}

/// 500s, SIGKILL + restart while refused, more mail, recovery: nothing lost.
async fn refuse_kill_recover(mut relay: RelayProcess, receiver: WebhookReceiver, sink: Sink) {
    receiver.set_status(500);
    let mut accepted = send(&relay, "first", 20).await;
    assert!(
        receiver
            .wait_until(Duration::from_secs(30), |r| r.refused() >= 3)
            .await,
        "the relay never retried against the refusing receiver:\n{}",
        relay.log_tail(40)
    );
    relay.kill().await.expect("SIGKILL");
    relay.restart().await.expect("restart after SIGKILL");
    accepted.extend(send(&relay, "second", 20).await);
    let refused = receiver.refused();
    assert!(
        receiver
            .wait_until(Duration::from_secs(30), |r| r.refused() >= refused + 3)
            .await,
        "the restarted relay never retried:\n{}",
        relay.log_tail(40)
    );
    assert!(
        sink.wait_for(40, 40, Duration::from_secs(60)).await,
        "mail flows while the webhook fails"
    );
    assert_eq!(receiver.unique(), 0, "nothing recorded while refusing");
    receiver.set_status(200);
    // The dead process's claimed batch comes back after its reclaim time.
    let missing = wait_for_events(&receiver, &accepted, TYPES, Duration::from_secs(90)).await;
    assert!(
        missing.is_empty(),
        "lost events: {missing:?}\n{}",
        relay.log_tail(60)
    );
    assert_eq!(receiver.bad_signatures(), 0);
    assert!(
        delivered_per_message(&receiver).values().all(|n| *n == 1),
        "one delivered event per message"
    );
    eprintln!(
        "refuse/kill/recover: {} events, {} refused requests, {} duplicate copies",
        receiver.unique(),
        receiver.refused(),
        receiver.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_receiver_500s_and_relay_sigkill_lose_nothing_redis_aof() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let receiver = WebhookReceiver::start(SECRET).await.unwrap();
        let sink = Sink::start().await.unwrap();
        let redis = RedisServer::builder()
            .persistence(Persistence::AofAlways)
            .start()
            .await
            .unwrap();
        let hook = webhook("app", &receiver, &secret);
        let relay = RelayBuilder::new(&redis.url(), &Destination::Smarthost(sink.addr()))
            .unwrap()
            .with(|c| c.events.webhooks = vec![hook])
            .log_filter("warn,petrel_relay::events=info")
            .start()
            .await
            .expect("relay");
        refuse_kill_recover(relay, receiver, sink).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_receiver_500s_and_relay_sigkill_lose_nothing_embedded() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let receiver = WebhookReceiver::start(SECRET).await.unwrap();
        let sink = Sink::start().await.unwrap();
        let hook = webhook("app", &receiver, &secret);
        let queue = dir.path().join("queue.redb");
        // The Redis URL is replaced by the embedded queue.
        let relay = RelayBuilder::new("redis://127.0.0.1:1", &Destination::Smarthost(sink.addr()))
            .unwrap()
            .with(|c| {
                embedded(c, &queue);
                c.events.webhooks = vec![hook];
            })
            .log_filter("warn,petrel_relay::events=info")
            .start()
            .await
            .expect("relay");
        refuse_kill_recover(relay, receiver, sink).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_two_relays_on_one_redis_send_every_event() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let receiver = WebhookReceiver::start(SECRET).await.unwrap();
        let hook = webhook("app", &receiver, &secret);
        let s = Scenario::start(2, Persistence::None, |c| {
            c.events.webhooks = vec![hook.clone()]
        })
        .await
        .expect("scenario");
        let report = s.send("two", 100, 8, 1).await;
        let accepted = accepted_ids(&report);
        assert_eq!(accepted.len(), 100, "{:?}", report.failed.first());
        let missing = wait_for_events(&receiver, &accepted, TYPES, Duration::from_secs(90)).await;
        assert!(missing.is_empty(), "missing: {missing:?}\n{}", s.logs());
        assert_eq!(receiver.bad_signatures(), 0);
        assert_eq!(receiver.counts_by_type().values().sum::<usize>(), 200);
        // Consumer groups give each event to one relay; a copy only comes
        // from a claim taken over, which needs a relay silent for its
        // reclaim time: none here, so duplicates stay rare.
        let duplicates = receiver.duplicates();
        eprintln!(
            "two relays: {} events, {} duplicate copies, {} requests",
            receiver.unique(),
            duplicates,
            receiver.requests()
        );
        assert!(
            duplicates <= 20,
            "{duplicates} duplicate copies of 200 events"
        );
    })
    .await
    .expect("test timed out");
}

/// `EventLog::renew` on both real backends: it keeps only what the caller
/// still holds, so a dispatcher that lost its claim does not take it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_renew_keeps_only_the_callers_claims_on_both_backends() {
    use petrel_crds::config::{EmbeddedQueue, QueueConfig, RedisQueue};
    use petrel_relay::events::{Event, EventType};
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let configs = [
            (
                Some(RedisQueue {
                    url: Some(redis.url()),
                    url_file: None,
                    key_prefix: "petrel-renew".into(),
                    wait_replicas: 0,
                    partitions: 16,
                }),
                None,
            ),
            (
                None,
                Some(EmbeddedQueue {
                    path: dir.path().join("queue.redb"),
                }),
            ),
        ];
        for (redis_queue, embedded_queue) in configs {
            let which = if redis_queue.is_some() {
                "redis"
            } else {
                "embedded"
            };
            let backend = petrel_relay::queue::open(&QueueConfig {
                redis: redis_queue,
                embedded: embedded_queue,
                lease: Duration::from_secs(60).into(),
                timeout: Duration::from_secs(5).into(),
            })
            .await
            .expect("backend opens");
            let log = backend.events;
            log.ensure_group("webhook:app").await.unwrap();
            let events: Vec<Event> = (0..3)
                .map(|i| Event::new(EventType::Delivered, "relay", 1_000 + i))
                .collect();
            log.publish(&events).await.unwrap();
            let hour = Duration::from_secs(3600);
            let a = log.claim("webhook:app", "pod-a", 10, hour).await.unwrap();
            assert_eq!(a.len(), 3, "{which}");
            let seqs: Vec<String> = a.iter().map(|e| e.seq.clone()).collect();
            assert_eq!(
                log.renew("webhook:app", "pod-a", &seqs).await.unwrap(),
                3,
                "{which}"
            );
            assert_eq!(
                log.renew("webhook:app", "pod-b", &seqs).await.unwrap(),
                0,
                "{which}"
            );
            // pod-b takes over (as after pod-a's silence): pod-a's renewal
            // must not take them back.
            let b = log
                .claim("webhook:app", "pod-b", 10, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(b.len(), 3, "{which}");
            assert_eq!(
                log.renew("webhook:app", "pod-a", &seqs).await.unwrap(),
                0,
                "{which}"
            );
            assert_eq!(
                log.renew("webhook:app", "pod-b", &seqs).await.unwrap(),
                3,
                "{which}"
            );
            log.ack("webhook:app", &seqs).await.unwrap();
            assert_eq!(
                log.renew("webhook:app", "pod-b", &seqs).await.unwrap(),
                0,
                "{which}: acked"
            );
            assert_eq!(
                log.backlog("webhook:app").await.unwrap().pending,
                0,
                "{which}"
            );
        }
    })
    .await
    .expect("test timed out");
}
