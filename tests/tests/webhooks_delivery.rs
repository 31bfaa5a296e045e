//! Webhooks end to end: messages sent over real SMTP to a relay process
//! produce signed event batches at a real HTTP receiver, which verifies
//! every signature and counts distinct events; a config reload adds a
//! webhook without a restart.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

mod webhooks_support;

use std::time::Duration;

use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::redis::Persistence;
use petrel_tests::webhook_receiver::WebhookReceiver;
use webhooks_support::*;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_every_event_arrives_signed_exactly_as_expected() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let receiver = WebhookReceiver::start(SECRET).await.unwrap();
        let hook = webhook("app", &receiver, &secret);
        let s = Scenario::start(1, Persistence::None, |c| {
            c.events.webhooks = vec![hook.clone()];
        })
        .await
        .expect("scenario");
        let report = s.send("basic", 40, 4, 1).await;
        let accepted = accepted_ids(&report);
        assert_eq!(
            accepted.len(),
            40,
            "all accepted: {:?}",
            report.failed.first()
        );
        let missing = wait_for_events(
            &receiver,
            &accepted,
            &["accepted", "delivered"],
            Duration::from_secs(60),
        )
        .await;
        assert!(
            missing.is_empty(),
            "missing events: {missing:?}\n{}",
            s.logs()
        );
        assert_eq!(receiver.bad_signatures(), 0, "every signature verifies");
        // Exactly the expected events: one accepted and one delivered per
        // message (one recipient each), nothing else.
        let counts = receiver.counts_by_type();
        assert_eq!(counts.get("accepted"), Some(&40), "{counts:?}");
        assert_eq!(counts.get("delivered"), Some(&40), "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 80, "{counts:?}");
        assert!(delivered_per_message(&receiver).values().all(|n| *n == 1));
        // The events carry what the README promises.
        let any = receiver.events().into_values().next().unwrap().event;
        for field in [
            "id",
            "type",
            "timestamp",
            "queueId",
            "recipient",
            "relay",
            "tags",
        ] {
            assert!(!any[field].is_null(), "event without {field}: {any}");
        }
        // Requests are counted by result.
        let metrics = scrape(s.relays[0].http_addr()).await;
        let ok = sample(
            &metrics,
            "petrel_webhook_requests_total",
            &["webhook=\"app\"", "result=\"success\""],
        );
        assert!(
            ok.is_some_and(|n| n >= 1.0),
            "success requests counted: {ok:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_only_the_subscribed_types_are_sent() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let all = WebhookReceiver::start(SECRET).await.unwrap();
        let delivered_only = WebhookReceiver::start(SECRET).await.unwrap();
        let mut narrow = webhook("narrow", &delivered_only, &secret);
        narrow.types = Some(vec!["delivered".into()]);
        let hooks = vec![webhook("all", &all, &secret), narrow];
        let s = Scenario::start(1, Persistence::None, |c| c.events.webhooks = hooks.clone())
            .await
            .expect("scenario");
        let accepted = accepted_ids(&s.send("types", 10, 2, 1).await);
        assert_eq!(accepted.len(), 10);
        let missing = wait_for_events(
            &all,
            &accepted,
            &["accepted", "delivered"],
            Duration::from_secs(60),
        )
        .await;
        assert!(missing.is_empty(), "{missing:?}");
        let missing = wait_for_events(
            &delivered_only,
            &accepted,
            &["delivered"],
            Duration::from_secs(60),
        )
        .await;
        assert!(missing.is_empty(), "{missing:?}");
        // Every accepted event was before its delivered one in the log, and
        // the narrow webhook skipped them: it has nothing but delivered.
        let counts = delivered_only.counts_by_type();
        assert_eq!(
            counts.keys().collect::<Vec<_>>(),
            ["delivered"],
            "{counts:?}"
        );
        assert_eq!(all.bad_signatures() + delivered_only.bad_signatures(), 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_config_reload_adds_a_webhook_live() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path());
        let receiver = WebhookReceiver::start(SECRET).await.unwrap();
        let s = Scenario::start(1, Persistence::None, |_| {})
            .await
            .expect("scenario");
        let before = accepted_ids(&s.send("before", 10, 2, 1).await);
        assert_eq!(before.len(), 10);
        assert!(
            s.sink.wait_for(10, 10, Duration::from_secs(30)).await,
            "delivered"
        );
        assert_eq!(receiver.requests(), 0);
        // Add the webhook to the running relay's config file.
        let mut config = s.relays[0].config().clone();
        config.events.webhooks = vec![webhook("late", &receiver, &secret)];
        std::fs::write(
            s.relays[0].dir().join("relay.yaml"),
            config.to_yaml().unwrap(),
        )
        .unwrap();
        // A new consumer group starts at the oldest retained event: the
        // events from before the webhook existed arrive too, then new ones.
        let missing = wait_for_events(
            &receiver,
            &before,
            &["accepted", "delivered"],
            Duration::from_secs(60),
        )
        .await;
        assert!(
            missing.is_empty(),
            "after reload: {missing:?}\n{}",
            s.logs()
        );
        let after = accepted_ids(&s.send("after", 10, 2, 1).await);
        let missing = wait_for_events(
            &receiver,
            &after,
            &["accepted", "delivered"],
            Duration::from_secs(60),
        )
        .await;
        assert!(missing.is_empty(), "new mail after reload: {missing:?}");
        assert_eq!(receiver.bad_signatures(), 0);
    })
    .await
    .expect("test timed out");
}
