//! The reputation guard on a fake clock, over real backends: outcomes go
//! into the real outbox, the `reputation` consumer group counts them into
//! the shared window, and two relay contexts on one spawned redis-server
//! see the same counts and the same pause. Counts and pauses outlive a
//! restart (new contexts on the same Redis; the embedded file reopened).

use std::time::Duration;

use petrel_relay::config::RelayConfig;
use petrel_relay::events::{BounceType, Event, EventType};
use petrel_relay::queue::{self, Backend, Millis};
use petrel_relay::reload::Reloading;
use petrel_relay::reputation::{Guard, Level, Reason, consumer};
use petrel_tests::redis::RedisServer;

const H: Millis = 3_600_000;
/// A fixed fake "now", far from the real clock, so nothing here depends on it.
const T0: Millis = 1_900_000_000_000;
const LIMIT: Duration = Duration::from_secs(60);

fn config(queue: &str) -> RelayConfig {
    RelayConfig::from_yaml(&format!(
        r#"
hostname: relay.test
listeners: [{{name: smtp, address: "127.0.0.1:2525"}}]
queue: {queue}
domains:
  - domain: example.com
    dkim: {{selector: s1, algorithm: ed25519, keyFile: /nonexistent.pem}}
    reputation: {{maxBounceRate: 5%, maxComplaintRate: 0.1%, minVolume: 500, window: 24h}}
  - domain: other.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: /nonexistent.pem}}
"#
    ))
    .unwrap()
}

/// The `queue` config of pods sharing `redis`.
fn redis_queue(redis: &RedisServer) -> String {
    format!("{{redis: {{url: \"{}\", keyPrefix: rep}}}}", redis.url())
}

struct Pod {
    backend: Backend,
    guard: Guard,
    config: RelayConfig,
    name: &'static str,
}

impl Pod {
    async fn open(config: RelayConfig, name: &'static str) -> Pod {
        let backend = queue::open(&config.queue).await.unwrap();
        backend.events.ensure_group(consumer::GROUP).await.unwrap();
        let guard = Guard::new(Reloading::fixed(config.clone()), backend.state.clone());
        Pod {
            backend,
            guard,
            config,
            name,
        }
    }

    /// Publishes `n` outcomes of `kind` for `domain` that happened at `at`.
    async fn outcomes(&self, domain: &str, kind: EventType, n: usize, at: Millis) {
        let events: Vec<Event> = (0..n)
            .map(|i| {
                let mut e =
                    Event::new(kind, self.name, at).with_recipient(&format!("r{i}@dest.test"));
                e.sending_domain = Some(domain.into());
                e.from = Some(format!("app@{domain}"));
                if kind == EventType::Bounced {
                    e.bounce_type = Some(BounceType::Hard);
                }
                e
            })
            .collect();
        self.backend.events.publish(&events).await.unwrap();
    }

    /// Consumes the outbox until this pod's consumer finds nothing more.
    async fn consume(&self, now: Millis) {
        loop {
            let (_, read) = consumer::consume_once(
                self.backend.events.as_ref(),
                self.guard.store(),
                &self.config,
                self.name,
                now,
            )
            .await
            .unwrap();
            if read == 0 {
                return;
            }
        }
    }

    async fn evaluate(&self, now: Millis) -> petrel_relay::reputation::DomainState {
        let sending = self.config.domain("example.com").unwrap();
        self.guard.evaluate(sending, now).await.unwrap()
    }
}

async fn run_the_scenario(a: &Pod, b: &Pod) {
    // 480 delivered and 12 bounced (2.4%) an hour ago: under minVolume.
    a.outcomes("example.com", EventType::Delivered, 480, T0 - H)
        .await;
    a.outcomes("example.com", EventType::Bounced, 12, T0 - H)
        .await;
    // Another domain's bounces count for that domain only.
    a.outcomes("other.test", EventType::Bounced, 400, T0 - H)
        .await;
    a.consume(T0).await;
    let s = b.evaluate(T0).await;
    assert_eq!(s.level, Level::Ok, "{s:?}");
    assert_eq!(s.counts.volume(), 492);

    // 8 more bounces: 500 messages, 20 bounced = 4%: at least half of 5%.
    b.outcomes("example.com", EventType::Bounced, 8, T0).await;
    b.consume(T0).await;
    let s = a.evaluate(T0).await;
    assert_eq!(s.level, Level::Warning, "{s:?}");
    assert_eq!(s.reason, Some(Reason::BounceRateExceeded));
    assert_eq!(s.since, Some(T0));

    // 16 more: 36 of 516 = 6.98%: paused, for both pods.
    a.outcomes("example.com", EventType::Bounced, 16, T0 + 1)
        .await;
    a.consume(T0 + 2).await;
    let s = b.evaluate(T0 + 2).await;
    assert_eq!(s.level, Level::Paused, "{s:?}");
    assert_eq!(
        s.message.as_deref(),
        Some("bounce rate 7% over 24h exceeds 5%")
    );
    let sending = a.config.domain("example.com").unwrap();
    let refusal = a.guard.refusal(sending).await.unwrap().expect("paused");
    assert_eq!(
        refusal.render(),
        "451 4.7.1 sending for example.com is paused: bounce rate 7% over 24h exceeds 5%\r\n"
    );
    assert_eq!(refusal.http_status(), 503);
    assert!(b.guard.is_paused("EXAMPLE.com").await.unwrap());
    assert!(!b.guard.is_paused("other.test").await.unwrap());

    // A day and more later the bounces left the window; the pause stays.
    let s = a.evaluate(T0 + 30 * H).await;
    assert_eq!(s.level, Level::Paused);
    assert_eq!(s.counts.bounced, 36, "the pause keeps what caused it");
}

async fn resume_resets(a: &Pod, b: &Pod) {
    let resumed = b.guard.resume("example.com").await.unwrap().unwrap();
    assert_eq!(resumed.level, Level::Ok);
    assert!(!a.guard.is_paused("example.com").await.unwrap());
    // The window starts again: the same moment counts nothing.
    let s = a.evaluate(T0 + 2).await;
    assert_eq!(s.level, Level::Ok);
    assert_eq!(s.counts.volume(), 0, "{s:?}");
    assert!(b.guard.resume("nope.test").await.unwrap().is_none());
}

#[tokio::test]
async fn two_contexts_on_one_redis_share_counts_and_pause_and_it_survives_a_restart() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.unwrap();
        let queue = redis_queue(&redis);
        let a = Pod::open(config(&queue), "pod-a").await;
        let b = Pod::open(config(&queue), "pod-b").await;
        run_the_scenario(&a, &b).await;
        drop((a, b));
        // A restart: new contexts, same Redis.
        let a = Pod::open(config(&queue), "pod-a2").await;
        let b = Pod::open(config(&queue), "pod-b2").await;
        assert!(a.guard.is_paused("example.com").await.unwrap());
        assert_eq!(a.evaluate(T0 + 3).await.counts.bounced, 36);
        resume_resets(&a, &b).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_embedded_backend_keeps_counts_and_pause_across_a_reopen() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let queue = format!("{{embedded: {{path: {}/q.redb}}}}", dir.path().display());
        let a = Pod::open(config(&queue), "pod-a").await;
        // One file, one process: the same context plays both pods.
        let b = Pod {
            backend: a.backend.clone(),
            guard: a.guard.clone(),
            config: a.config.clone(),
            name: "pod-a",
        };
        run_the_scenario(&a, &b).await;
        drop((a, b));
        let a = Pod::open(config(&queue), "pod-a").await;
        assert!(a.guard.is_paused("example.com").await.unwrap());
        let b = Pod {
            backend: a.backend.clone(),
            guard: a.guard.clone(),
            config: a.config.clone(),
            name: "pod-a",
        };
        resume_resets(&a, &b).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn complaints_pause_on_their_own_threshold_and_auto_resume_runs_out() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&format!(
            "{{embedded: {{path: {}/q.redb}}}}",
            dir.path().display()
        ));
        config.domains[0].reputation.auto_resume_after = Some(Duration::from_secs(6 * 3600).into());
        let a = Pod::open(config, "pod-a").await;
        a.outcomes("example.com", EventType::Delivered, 1000, T0)
            .await;
        let mut complaint = Event::new(EventType::Complained, "feedback", T0);
        complaint.sending_domain = Some("example.com".into());
        complaint.feedback_type = Some("abuse".into());
        a.backend
            .events
            .publish(&[complaint.clone(), complaint.clone()])
            .await
            .unwrap();
        a.consume(T0).await;
        // 2 / 1000 = 0.2% > 0.1%.
        let s = a.evaluate(T0).await;
        assert_eq!(s.level, Level::Paused, "{s:?}");
        assert_eq!(s.reason, Some(Reason::ComplaintRateExceeded));
        assert_eq!(
            s.message.as_deref(),
            Some("complaint rate 0.2% over 24h exceeds 0.1%")
        );
        assert_eq!(a.evaluate(T0 + 6 * H - 1).await.level, Level::Paused);
        let s = a.evaluate(T0 + 6 * H).await;
        assert_eq!(s.level, Level::Ok, "autoResumeAfter ran out: {s:?}");
        assert_eq!(s.counts.volume(), 0, "a new window");
    })
    .await
    .expect("test timed out");
}

/// The hot paths' answer (`recent_refusal`, `recently_paused`): a pause
/// this pod decides holds at once; one decided by another pod is seen
/// once this pod's last answer is [`pauses::FRESH_FOR`] old; the exact
/// reads see it at once.
#[tokio::test]
async fn a_pause_by_another_pod_reaches_the_hot_paths_within_a_second() {
    use petrel_relay::queue::now_millis;
    use petrel_relay::reputation::pauses::FRESH_FOR;
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.unwrap();
        let queue = redis_queue(&redis);
        let a = Pod::open(config(&queue), "pod-a").await;
        let b = Pod::open(config(&queue), "pod-b").await;
        let sending = a.config.domain("example.com").unwrap();
        let now = now_millis();
        assert!(
            a.guard
                .recent_refusal(sending, now)
                .await
                .unwrap()
                .is_none()
        );
        assert!(!a.guard.recently_paused("example.com", now).await.unwrap());

        // 30 of 530 bounced (5.7% over 5%): paused by pod b.
        b.outcomes("example.com", EventType::Delivered, 500, T0)
            .await;
        b.outcomes("example.com", EventType::Bounced, 30, T0).await;
        b.consume(T0).await;
        assert_eq!(b.evaluate(T0).await.level, Level::Paused);
        let paused =
            "451 4.7.1 sending for example.com is paused: bounce rate 5.7% over 24h exceeds 5%\r\n";
        // Pod b decided it: its own hot paths hold at once.
        let own = b.guard.recent_refusal(sending, now).await.unwrap();
        assert_eq!(own.expect("paused on b").render(), paused);
        // Pod a answered a moment ago and may keep that answer a second...
        assert!(
            a.guard
                .recent_refusal(sending, now)
                .await
                .unwrap()
                .is_none()
        );
        // ...but not longer, and the exact read never lags.
        let later = now_millis() + FRESH_FOR;
        let seen = a.guard.recent_refusal(sending, later).await.unwrap();
        assert_eq!(seen.expect("paused on a").render(), paused);
        assert!(a.guard.recently_paused("EXAMPLE.com", later).await.unwrap());
        assert!(!a.guard.recently_paused("other.test", later).await.unwrap());

        // A resume served by pod a lifts a's pause at once.
        a.guard.resume("example.com").await.unwrap().unwrap();
        assert!(!a.guard.recently_paused("example.com", later).await.unwrap());
        assert!(!b.guard.is_paused("example.com").await.unwrap());
    })
    .await
    .expect("test timed out");
}
