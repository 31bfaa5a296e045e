//! One conformance suite for both queue backends (design: "Queue contract").
//!
//! Every case in [`cases`] is a function of an opened [`Backend`]; the
//! `conformance!` macro runs each against a private `redis-server` and
//! against an embedded redb file in a temp dir. Time is passed explicitly
//! (`now`), so lease expiry is tested without sleeping. Crash cases (Redis
//! killed, restarted from its AOF, embedded file reopened) need control of
//! the store and are written per backend at the end.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use petrel_relay::config::{EmbeddedQueue, QueueConfig, RedisQueue};
use petrel_relay::events::{Event, EventType};
use petrel_relay::queue::{
    self, Backend, Lease, MessageFlags, Millis, NewMessage, QueueError, Reschedule, SettleOp,
    Settlement, SuppressionEntry, SuppressionReason, UnitState, UnitView,
};
use petrel_tests::redis::{Persistence, RedisServer};

/// Upper bound of every test.
const LIMIT: Duration = Duration::from_secs(60);
/// A fixed "now" far from the real clock: backends must use the `now` given.
const T: Millis = 1_700_000_000_000;
const MINUTE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- fixtures

/// The store behind one test's backend; dropping it kills or deletes it.
/// Redis with the partition count the backend opens with.
enum Store {
    Redis(Box<RedisServer>, u32),
    Embedded(tempfile::TempDir),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Redis with the default 16 partitions.
    Redis,
    /// Redis with every message in one partition.
    RedisOnePartition,
    Embedded,
}

fn config_for(store: &Store, timeout: Duration) -> QueueConfig {
    let (redis, embedded) = match store {
        Store::Redis(server, partitions) => (
            Some(RedisQueue {
                url: Some(server.url()),
                url_file: None,
                key_prefix: "petrel-test".into(),
                wait_replicas: 0,
                partitions: *partitions,
            }),
            None,
        ),
        Store::Embedded(dir) => (
            None,
            Some(EmbeddedQueue {
                path: dir.path().join("spool").join("queue.redb"),
            }),
        ),
    };
    QueueConfig {
        redis,
        embedded,
        lease: MINUTE.into(),
        timeout: timeout.into(),
    }
}

async fn store(kind: Kind, persistence: Persistence) -> Store {
    let redis = || async {
        Box::new(
            RedisServer::builder()
                .persistence(persistence)
                .start()
                .await
                .expect("redis-server starts"),
        )
    };
    match kind {
        Kind::Redis => Store::Redis(redis().await, 16),
        Kind::RedisOnePartition => Store::Redis(redis().await, 1),
        Kind::Embedded => Store::Embedded(tempfile::tempdir().expect("temp dir")),
    }
}

async fn open(config: &QueueConfig) -> Backend {
    queue::open(config).await.expect("backend opens")
}

/// Runs one generic case against a fresh store of `kind`, bounded in time.
async fn run<F, Fut>(kind: Kind, case: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::time::timeout(LIMIT, async {
        let store = store(kind, Persistence::None).await;
        let backend = open(&config_for(&store, Duration::from_secs(5))).await;
        case(backend).await;
        drop(store);
    })
    .await
    .expect("test timed out");
}

/// Polls `ping` until the backend answers again (after a Redis restart the
/// connection manager reconnects in the background; there is no event to
/// await). Bounded by the test's timeout.
async fn until_reachable(b: &Backend) {
    while b.queue.ping().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message(id: &str, recipients: &[&str], received_at: Millis) -> NewMessage {
    NewMessage {
        id: id.to_string(),
        mail_from: "sender@example.test".into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        data: format!("Message-ID: <{id}@example.test>\r\nSubject: test\r\n\r\nbody of {id}\r\n")
            .into_bytes(),
        sending_domain: "example.test".into(),
        received_at,
        flags: MessageFlags {
            smtputf8: false,
            eight_bit: true,
            is_dsn: false,
            per_recipient: false,
            ..MessageFlags::default()
        },
        tags: Default::default(),
        header_message_id: Some(format!("{id}@example.test")),
    }
}

fn sorted_domains(leases: &[Lease]) -> Vec<String> {
    let mut d: Vec<String> = leases.iter().map(|l| l.unit.domain.clone()).collect();
    d.sort();
    d
}

fn later(recipients: Vec<String>, at: Millis) -> Reschedule {
    Reschedule {
        recipients,
        next_attempt_at: at,
        last_error: "451 4.7.1 greylisted".into(),
        delay_notified: false,
    }
}

// ------------------------------------------------------------------- cases

/// An event about `recipient`, told apart by its id.
fn event(kind: EventType, recipient: &str) -> Event {
    Event::new(kind, "relay-test", queue::now_millis()).with_recipient(recipient)
}

/// The ids of events, in order.
fn ids(events: &[petrel_relay::events::StoredEvent]) -> Vec<String> {
    events.iter().map(|e| e.event.id.clone()).collect()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Every leased unit carries the bytes of its own message, one of `messages`.
fn assert_each_has_its_bytes(leased: &[queue::LeasedUnit], messages: &[&NewMessage]) {
    for l in leased {
        let want = messages
            .iter()
            .find(|m| m.id == l.lease.unit.message_id)
            .map(|m| &m.data)
            .expect("a unit of a message this test enqueued");
        assert_eq!(l.data.as_deref(), Some(want), "{}", l.lease.unit.id);
    }
}

mod cases {
    use super::*;

    pub async fn outbox_events_are_written_with_the_enqueue(b: Backend) {
        let accepted = vec![
            event(EventType::Accepted, "a@x.org"),
            event(EventType::Accepted, "b@y.org"),
        ];
        b.queue
            .enqueue(message("m1", &["a@x.org", "b@y.org"], T), accepted.clone())
            .await
            .unwrap();
        let stored = b.events.read(None, 100).await.unwrap();
        assert_eq!(
            stored.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
            accepted
        );
        assert!(stored.iter().all(|e| e.stored_at > 0));
        // The same message again (a client retry after a timeout): stored
        // once, and so are its events.
        b.queue
            .enqueue(
                message("m1", &["a@x.org", "b@y.org"], T),
                vec![event(EventType::Accepted, "a@x.org")],
            )
            .await
            .unwrap();
        assert_eq!(b.events.read(None, 100).await.unwrap().len(), 2);
        // A message with nothing to deliver stores no events either.
        b.queue
            .enqueue(
                message("m2", &[], T),
                vec![event(EventType::Accepted, "x@x.org")],
            )
            .await
            .unwrap();
        assert_eq!(b.events.read(None, 100).await.unwrap().len(), 2);
    }

    pub async fn outbox_events_dsns_and_suppression_are_written_with_the_settlement(b: Backend) {
        b.queue
            .enqueue(message("m", &["gone@x.org", "ok@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease = b.queue.lease(T, 1, MINUTE).await.unwrap().remove(0);
        let dsn = message("dsn-1", &["sender@example.test"], T);
        let settlement = Settlement {
            op: SettleOp::Retry(later(vec!["ok@x.org".into()], T + 60_000)),
            enqueue: vec![dsn.clone()],
            events: vec![
                event(EventType::Bounced, "gone@x.org"),
                event(EventType::Dsn, "gone@x.org"),
                event(EventType::Deferred, "ok@x.org"),
            ],
            suppress: vec![SuppressionEntry {
                address: "Gone@X.org".into(),
                reason: SuppressionReason::Bounce,
                scope: None,
                remote_reply: Some("550 5.1.1 no".into()),
                created_at: T,
                expires_at: None,
            }],
        };
        // A settlement under a lease that was taken over writes nothing.
        let stolen = Lease {
            token: "not-the-token".into(),
            ..lease.clone()
        };
        assert!(matches!(
            b.queue.settle(&stolen, settlement.clone()).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert!(b.events.read(None, 10).await.unwrap().is_empty());
        assert!(
            b.state
                .suppressed("gone@x.org", "any.test", T)
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            b.queue.message_data("dsn-1").await,
            Err(QueueError::NotFound(_))
        ));

        b.queue.settle(&lease, settlement.clone()).await.unwrap();
        let stored = b.events.read(None, 10).await.unwrap();
        assert_eq!(
            stored.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
            settlement.events
        );
        assert!(
            b.state
                .suppressed("gone@x.org", "any.test", T)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(b.queue.message_data("dsn-1").await.unwrap(), dsn.data);
        // The unit is rescheduled and the DSN is due now.
        let due = b.queue.lease(T, 10, MINUTE).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].unit.message_id, "dsn-1");
        let retried = b.queue.lease(T + 60_000, 10, MINUTE).await.unwrap();
        let unit = retried.iter().find(|l| l.unit.message_id == "m").unwrap();
        assert_eq!(unit.unit.recipients, vec!["ok@x.org"]);
        // Settling again under the spent lease is refused, nothing doubled.
        assert!(b.queue.settle(&lease, settlement).await.is_err());
        assert_eq!(b.events.read(None, 10).await.unwrap().len(), 3);
    }

    pub async fn outbox_claims_are_exclusive_acked_and_reclaimed(b: Backend) {
        let events: Vec<Event> = (0..5)
            .map(|i| event(EventType::Delivered, &format!("r{i}@x.org")))
            .collect();
        b.events.publish(&events).await.unwrap();
        let all: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        b.events.ensure_group("webhook:a").await.unwrap();
        b.events.ensure_group("webhook:a").await.unwrap();
        assert_eq!(
            b.events.backlog("webhook:a").await.unwrap().pending,
            5,
            "a new group starts at the oldest retained event"
        );

        let one = b.events.claim("webhook:a", "pod-1", 3, HOUR).await.unwrap();
        assert_eq!(ids(&one), all[..3]);
        let two = b
            .events
            .claim("webhook:a", "pod-2", 10, HOUR)
            .await
            .unwrap();
        assert_eq!(
            ids(&two),
            all[3..],
            "claimed events are not handed out twice"
        );
        assert!(
            b.events
                .claim("webhook:a", "pod-2", 10, HOUR)
                .await
                .unwrap()
                .is_empty()
        );

        let seqs: Vec<String> = two.iter().map(|e| e.seq.clone()).collect();
        b.events.ack("webhook:a", &seqs).await.unwrap();
        let backlog = b.events.backlog("webhook:a").await.unwrap();
        assert_eq!(backlog.pending, 3, "pod-1's batch is still unacked");
        assert_eq!(backlog.oldest_at, Some(one[0].stored_at));

        // pod-1 died: once its claims are older than reclaim_after, pod-2
        // takes them over (ZERO: at once).
        let taken = b
            .events
            .claim("webhook:a", "pod-2", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&taken), all[..3]);
        let seqs: Vec<String> = taken.iter().map(|e| e.seq.clone()).collect();
        b.events.ack("webhook:a", &seqs).await.unwrap();
        let backlog = b.events.backlog("webhook:a").await.unwrap();
        assert_eq!((backlog.pending, backlog.oldest_at), (0, None));
        assert!(
            b.events
                .claim("webhook:a", "pod-3", 10, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );

        // Another group reads the whole log on its own.
        b.events.ensure_group("webhook:b").await.unwrap();
        let other = b
            .events
            .claim("webhook:b", "pod-1", 10, HOUR)
            .await
            .unwrap();
        assert_eq!(ids(&other), all);
        // A later event reaches both groups.
        let late = event(EventType::Bounced, "late@x.org");
        b.events.publish(std::slice::from_ref(&late)).await.unwrap();
        assert_eq!(b.events.backlog("webhook:a").await.unwrap().pending, 1);
        let next = b
            .events
            .claim("webhook:a", "pod-1", 10, HOUR)
            .await
            .unwrap();
        assert_eq!(ids(&next), vec![late.id]);
        assert_eq!(b.events.backlog("webhook:b").await.unwrap().pending, 6);
    }

    pub async fn outbox_reads_in_log_order_from_any_position(b: Backend) {
        let mut published = Vec::new();
        for batch in 0..3 {
            let events: Vec<Event> = (0..4)
                .map(|i| event(EventType::Accepted, &format!("b{batch}-{i}@x.org")))
                .collect();
            b.events.publish(&events).await.unwrap();
            published.extend(events.into_iter().map(|e| e.id));
        }
        let first = b.events.read(None, 5).await.unwrap();
        assert_eq!(ids(&first), published[..5]);
        let rest = b.events.read(Some(&first[4].seq), 100).await.unwrap();
        assert_eq!(ids(&rest), published[5..]);
        assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(
            b.events
                .read(Some(&rest.last().unwrap().seq), 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(b.events.read(None, 0).await.unwrap().is_empty());
    }

    pub async fn outbox_trim_keeps_what_a_group_has_not_acked(b: Backend) {
        let events: Vec<Event> = (0..6)
            .map(|i| event(EventType::Delivered, &format!("r{i}@x.org")))
            .collect();
        b.events.publish(&events).await.unwrap();
        b.events.ensure_group("webhook:a").await.unwrap();
        let claimed = b.events.claim("webhook:a", "pod-1", 3, HOUR).await.unwrap();
        b.events
            .ack(
                "webhook:a",
                &[claimed[0].seq.clone(), claimed[1].seq.clone()],
            )
            .await
            .unwrap();
        let groups = vec!["webhook:a".to_string(), "webhook:gone".to_string()];

        // Nothing is older than the epoch.
        let report = b.events.trim(0, &groups).await.unwrap();
        assert_eq!(report.trimmed, 0);

        // Everything is old, but the third is claimed and unacked and the
        // last three unread: only the two acked ones go.
        let future = queue::now_millis() + 3_600_000;
        let report = b.events.trim(future, &groups).await.unwrap();
        assert_eq!((report.trimmed, report.dropped_unacked), (2, 0));
        let left = b.events.read(None, 100).await.unwrap();
        let all: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids(&left), all[2..]);
        // The group still gets what it is owed.
        let rest = b
            .events
            .claim("webhook:a", "pod-2", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&rest), all[2..]);

        // With no group left to serve, retention alone decides.
        let report = b.events.trim(future, &[]).await.unwrap();
        assert_eq!(report.trimmed, 4);
        assert!(b.events.read(None, 100).await.unwrap().is_empty());
        let backlog = b.events.backlog("webhook:a").await.unwrap();
        assert_eq!(backlog.pending, 0, "trimmed events are no longer owed");
    }

    pub async fn enqueue_splits_into_units_per_domain(b: Backend) {
        let msg = message("m1", &["a@x.org", "b@Y.org", "c@X.ORG"], T);
        b.queue.enqueue(msg.clone(), Vec::new()).await.unwrap();

        let leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        assert_eq!(sorted_domains(&leases), vec!["x.org", "y.org"]);
        let x = leases.iter().find(|l| l.unit.domain == "x.org").unwrap();
        assert_eq!(x.unit.recipients, vec!["a@x.org", "c@X.ORG"]);
        assert_eq!(x.unit.message_id, "m1");
        assert_eq!(x.unit.mail_from, "sender@example.test");
        assert_eq!(x.unit.sending_domain, "example.test");
        assert_eq!(x.unit.received_at, T);
        assert_eq!(x.unit.attempts, 0);
        assert!(x.unit.flags.eight_bit);
        assert_eq!(x.expires_at, T + 60_000);
        assert_eq!(b.queue.message_data("m1").await.unwrap(), msg.data);
        assert!(matches!(
            b.queue.message_data("nope").await,
            Err(QueueError::NotFound(_))
        ));
    }

    pub async fn lease_takes_only_due_units_up_to_max(b: Backend) {
        b.queue
            .enqueue(
                message("early", &["a@x.org", "b@y.org", "c@z.org"], T),
                Vec::new(),
            )
            .await
            .unwrap();
        b.queue
            .enqueue(message("late", &["a@x.org"], T + 5_000), Vec::new())
            .await
            .unwrap();

        assert!(b.queue.lease(T - 1, 10, MINUTE).await.unwrap().is_empty());
        assert!(b.queue.lease(T, 0, MINUTE).await.unwrap().is_empty());
        let first = b.queue.lease(T, 2, MINUTE).await.unwrap();
        assert_eq!(first.len(), 2);
        let second = b.queue.lease(T + 10, 10, MINUTE).await.unwrap();
        assert_eq!(second.len(), 1, "only the third unit of `early` is due");
        assert_eq!(second[0].unit.message_id, "early");
        let third = b.queue.lease(T + 5_000, 10, MINUTE).await.unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].unit.message_id, "late");
    }

    pub async fn expired_lease_makes_the_unit_due_again(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease_for = Duration::from_secs(1);

        let first = b.queue.lease(T, 10, lease_for).await.unwrap();
        assert_eq!(first.len(), 1);
        assert!(
            b.queue
                .lease(T + 999, 10, lease_for)
                .await
                .unwrap()
                .is_empty()
        );
        let stats = b.queue.stats(T + 1_000).await.unwrap();
        assert_eq!(
            (stats.due, stats.leased),
            (1, 0),
            "expired lease counts as due"
        );

        let second = b.queue.lease(T + 1_000, 10, lease_for).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].unit.id, first[0].unit.id);
        assert_ne!(second[0].token, first[0].token);

        // The slow first worker cannot clobber the one that took over.
        assert!(matches!(
            b.queue.complete(&first[0]).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(
            b.queue
                .retry(&first[0], later(vec!["a@x.org".into()], T + 5_000))
                .await,
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(
            b.queue.fail(&first[0]).await,
            Err(QueueError::LeaseLost(_))
        ));
        b.queue.complete(&second[0]).await.unwrap();
        // Finishing twice is a lost lease too, not a double decrement.
        assert!(matches!(
            b.queue.complete(&second[0]).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert_eq!(b.queue.stats(T + 1_000).await.unwrap().messages, 0);
    }

    pub async fn renew_extends_the_lease_past_its_old_expiry(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease_for = Duration::from_secs(1);
        let first = b.queue.lease(T, 10, lease_for).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].expires_at, T + 1_000);

        let renewed = b.queue.renew(&first[0], T + 500, lease_for).await.unwrap();
        assert_eq!(renewed.expires_at, T + 1_500);
        assert_eq!(renewed.token, first[0].token);
        assert_eq!(renewed.unit, first[0].unit);
        // At the old expiry the unit is still held, so no one else gets it.
        assert!(
            b.queue
                .lease(T + 1_000, 10, lease_for)
                .await
                .unwrap()
                .is_empty()
        );
        let stats = b.queue.stats(T + 1_000).await.unwrap();
        assert_eq!((stats.due, stats.leased), (0, 1));
        // Renewing again, from the renewed lease or the original (same
        // token), keeps extending it.
        let again = b
            .queue
            .renew(&first[0], T + 1_200, lease_for)
            .await
            .unwrap();
        assert_eq!(again.expires_at, T + 2_200);
        assert!(
            b.queue
                .lease(T + 2_199, 10, lease_for)
                .await
                .unwrap()
                .is_empty()
        );
        // The new expiry still ends the lease: the unit is due again then.
        let taken = b.queue.lease(T + 2_200, 10, lease_for).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].unit.id, first[0].unit.id);
    }

    pub async fn renew_of_an_expired_or_taken_over_lease_is_lost(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease_for = Duration::from_secs(1);
        let first = b.queue.lease(T, 10, lease_for).await.unwrap();
        assert_eq!(first.len(), 1);

        // Expired at `now`, even before anyone leased the unit again.
        assert!(matches!(
            b.queue.renew(&first[0], T + 1_000, lease_for).await,
            Err(QueueError::LeaseLost(_))
        ));
        // A failed renewal changes nothing: the unit is due at the old expiry.
        let second = b.queue.lease(T + 1_000, 10, lease_for).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].token, first[0].token);

        // The stale token cannot renew the new owner's lease, even though
        // the unit is leased and unexpired.
        assert!(matches!(
            b.queue.renew(&first[0], T + 1_100, lease_for).await,
            Err(QueueError::LeaseLost(_))
        ));
        // And the new owner's expiry was not moved by it.
        let stats = b.queue.stats(T + 2_000).await.unwrap();
        assert_eq!((stats.due, stats.leased), (1, 0));

        // Nor can a finished unit be renewed.
        b.queue.complete(&second[0]).await.unwrap();
        assert!(matches!(
            b.queue.renew(&second[0], T + 1_100, lease_for).await,
            Err(QueueError::LeaseLost(_))
        ));
    }

    pub async fn complete_after_renew_uses_the_same_token(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        let lease_for = Duration::from_secs(1);
        let mut leases = b.queue.lease(T, 10, lease_for).await.unwrap();
        leases.sort_by(|a, b| a.unit.domain.cmp(&b.unit.domain));
        assert_eq!(sorted_domains(&leases), vec!["x.org", "y.org"]);

        // After renewals the original lease (same token) still settles
        // the unit.
        b.queue.renew(&leases[0], T + 900, lease_for).await.unwrap();
        b.queue.renew(&leases[1], T + 900, lease_for).await.unwrap();
        b.queue.complete(&leases[0]).await.unwrap();
        b.queue
            .retry(&leases[1], later(vec!["b@y.org".into()], T + 5_000))
            .await
            .unwrap();
        let stats = b.queue.stats(T + 1_500).await.unwrap();
        assert_eq!((stats.due, stats.deferred, stats.leased), (0, 1, 0));
        assert_eq!(stats.messages, 1);
        // The retried unit comes back once, with the same token rules.
        let again = b.queue.lease(T + 5_000, 10, lease_for).await.unwrap();
        assert_eq!(again.len(), 1);
        let renewed = b
            .queue
            .renew(&again[0], T + 5_500, lease_for)
            .await
            .unwrap();
        b.queue.complete(&renewed).await.unwrap();
        assert_eq!(b.queue.stats(T + 6_000).await.unwrap().messages, 0);
    }

    pub async fn retry_reschedules_the_remaining_recipients(b: Backend) {
        b.queue
            .enqueue(
                message("m", &["a@x.org", "b@x.org", "c@x.org"], T),
                Vec::new(),
            )
            .await
            .unwrap();
        let lease = b.queue.lease(T, 10, MINUTE).await.unwrap().remove(0);
        b.queue
            .retry(&lease, later(vec!["b@x.org".into()], T + 300_000))
            .await
            .unwrap();

        assert!(
            b.queue
                .lease(T + 299_999, 10, MINUTE)
                .await
                .unwrap()
                .is_empty()
        );
        let again = b
            .queue
            .lease(T + 300_000, 10, MINUTE)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(again.unit.id, lease.unit.id);
        assert_eq!(again.unit.recipients, vec!["b@x.org"]);
        assert_eq!(again.unit.attempts, 1);
        assert_eq!(again.unit.next_attempt_at, T + 300_000);
        assert_eq!(
            again.unit.last_error.as_deref(),
            Some("451 4.7.1 greylisted")
        );
        assert!(!again.unit.delay_notified);

        let mut r = later(vec!["b@x.org".into()], T + 900_000);
        r.delay_notified = true;
        b.queue.retry(&again, r).await.unwrap();
        let third = b
            .queue
            .lease(T + 900_000, 10, MINUTE)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(third.unit.attempts, 2);
        assert!(third.unit.delay_notified);
        // The old lease died with the retry.
        assert!(matches!(
            b.queue.complete(&again).await,
            Err(QueueError::LeaseLost(_))
        ));
        // The message is still there until its last unit goes.
        assert!(b.queue.message_data("m").await.is_ok());
    }

    pub async fn postpone_puts_the_unit_back_without_counting_an_attempt(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease = b.queue.lease(T, 10, MINUTE).await.unwrap().remove(0);
        b.queue
            .retry(&lease, later(vec!["b@x.org".into()], T + 1_000))
            .await
            .unwrap();
        let retried = b
            .queue
            .lease(T + 1_000, 10, MINUTE)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(retried.unit.attempts, 1);

        // Postponed far beyond any queue lifetime: no expiry check applies,
        // and the event goes out in the same step.
        let until = T + 30 * 24 * 3_600_000;
        let mut settlement = Settlement::only(SettleOp::Postpone { until });
        settlement.events = vec![event(EventType::Deferred, "b@x.org")];
        b.queue.settle(&retried, settlement).await.unwrap();

        let stats = b.queue.stats(T + 1_000).await.unwrap();
        assert_eq!((stats.due, stats.deferred, stats.leased), (0, 1, 0));
        assert!(
            b.queue
                .lease(until - 1, 10, MINUTE)
                .await
                .unwrap()
                .is_empty()
        );
        let again = b.queue.lease(until, 10, MINUTE).await.unwrap().remove(0);
        assert_eq!(again.unit.id, lease.unit.id);
        assert_eq!(again.unit.attempts, 1, "a postponement is not an attempt");
        assert_eq!(again.unit.recipients, vec!["b@x.org"]);
        assert_eq!(again.unit.next_attempt_at, until);
        assert_eq!(
            again.unit.last_error.as_deref(),
            Some("451 4.7.1 greylisted")
        );
        // The postponed lease is over: settling it again is refused.
        assert!(matches!(
            b.queue.complete(&retried).await,
            Err(QueueError::LeaseLost(_))
        ));
        let stored = b.events.read(None, 10).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].event.recipient.as_deref(), Some("b@x.org"));
        b.queue.complete(&again).await.unwrap();
        assert_eq!(b.queue.stats(until).await.unwrap().messages, 0);
    }

    pub async fn control_lists_units_with_state_and_attempt_history(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        b.queue
            .enqueue(message("later", &["c@z.org"], T + 5_000), Vec::new())
            .await
            .unwrap();
        let leases = b.queue.lease(T, 1, MINUTE).await.unwrap();
        let x = &leases[0];
        let views = b.control.units(T).await.unwrap();
        assert_eq!(views.len(), 3);
        let state =
            |views: &[UnitView], id: &str| views.iter().find(|v| v.unit.id == id).map(|v| v.state);
        assert_eq!(state(&views, &x.unit.id), Some(UnitState::Leased));
        assert_eq!(state(&views, "later:z.org"), Some(UnitState::Deferred));

        b.queue
            .retry(x, later(x.unit.recipients.clone(), T + 60_000))
            .await
            .unwrap();
        let views = b.control.units(T + 1).await.unwrap();
        let unit = views.iter().find(|v| v.unit.id == x.unit.id).unwrap();
        assert_eq!(unit.state, UnitState::Deferred);
        assert_eq!(unit.unit.next_attempt_at, T + 60_000);
        assert_eq!(unit.unit.history.len(), 1);
        assert_eq!(unit.unit.history[0].reply, "451 4.7.1 greylisted");
        // A lease expired at `now` lists as due.
        let views = b.control.units(T + 60_000 + 1).await.unwrap();
        assert_eq!(state(&views, &x.unit.id), Some(UnitState::Due));
    }

    pub async fn hold_keeps_a_destination_from_lease_until_released(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        assert_eq!(b.control.hold("x.org", T).await.unwrap(), 1);
        assert_eq!(b.control.holds().await.unwrap()[0].domain, "x.org");
        // Mail arriving during the hold is held as soon as it is due.
        b.queue
            .enqueue(message("new", &["c@x.org"], T + 1_000), Vec::new())
            .await
            .unwrap();
        let leased = b.queue.lease(T + 1_000, 10, MINUTE).await.unwrap();
        assert_eq!(sorted_domains(&leased), vec!["y.org"]);
        let stats = b.queue.stats(T + 1_000).await.unwrap();
        assert_eq!((stats.held, stats.due, stats.leased), (2, 0, 1));
        assert!(
            b.queue
                .lease(T + 3_600_000, 10, MINUTE)
                .await
                .unwrap()
                .iter()
                .all(|l| l.unit.domain != "x.org"),
            "held units are never leased"
        );
        let views = b.control.units(T + 1_000).await.unwrap();
        assert_eq!(
            views.iter().filter(|v| v.state == UnitState::Held).count(),
            2
        );

        assert_eq!(b.control.release("x.org", T + 10_000).await.unwrap(), 2);
        assert!(b.control.holds().await.unwrap().is_empty());
        let back = b.queue.lease(T + 10_000, 10, MINUTE).await.unwrap();
        assert_eq!(back.len(), 2);
        let old = back.iter().find(|l| l.unit.message_id == "m").unwrap();
        let new = back.iter().find(|l| l.unit.message_id == "new").unwrap();
        assert_eq!(old.unit.held_ms, 10_000, "held from the hold on");
        assert_eq!(new.unit.held_ms, 9_000, "held from its arrival on");
        assert!(matches!(
            b.control.release("x.org", T + 20_000).await,
            Err(QueueError::NotFound(_))
        ));
    }

    pub async fn claim_takes_waiting_and_held_units_but_not_leased_ones(b: Backend) {
        b.queue
            .enqueue(
                message("m", &["a@x.org", "b@y.org", "c@z.org"], T),
                Vec::new(),
            )
            .await
            .unwrap();
        b.control.hold("z.org", T).await.unwrap();
        let leased = b.queue.lease(T, 1, MINUTE).await.unwrap().remove(0);
        let ids: Vec<String> = ["m:x.org", "m:y.org", "m:z.org", "nope:x.org"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let claimed = b.control.claim(&ids, T + 1, MINUTE).await.unwrap();
        let mut got: Vec<String> = claimed.iter().map(|l| l.unit.id.clone()).collect();
        got.sort();
        let mut want: Vec<String> = vec!["m:z.org".into()];
        want.extend(
            ["m:x.org", "m:y.org"]
                .iter()
                .filter(|id| **id != leased.unit.id)
                .map(|s| s.to_string()),
        );
        want.sort();
        assert_eq!(got, want);
        // A claim is an ordinary lease: settled through the queue.
        for lease in &claimed {
            b.queue
                .settle(lease, Settlement::only(SettleOp::Fail))
                .await
                .unwrap();
        }
        let stats = b.queue.stats(T + 1).await.unwrap();
        assert_eq!((stats.leased, stats.held, stats.messages), (1, 0, 1));
        b.queue.complete(&leased).await.unwrap();
        assert_eq!(b.queue.stats(T + 1).await.unwrap().messages, 0);
    }

    pub async fn retry_with_no_recipients_left_finishes_the_unit(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await
            .unwrap();
        let lease = b.queue.lease(T, 10, MINUTE).await.unwrap().remove(0);
        b.queue.retry(&lease, later(vec![], T + 1)).await.unwrap();
        assert_eq!(b.queue.stats(T + 10).await.unwrap().messages, 0);
        assert!(b.queue.lease(T + 10, 10, MINUTE).await.unwrap().is_empty());
    }

    pub async fn completing_the_last_unit_deletes_the_message(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        b.queue
            .enqueue(message("other", &["c@z.org"], T + 1), Vec::new())
            .await
            .unwrap();
        let leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        assert_eq!(leases.len(), 2);

        b.queue.complete(&leases[0]).await.unwrap();
        assert!(b.queue.message_data("m").await.is_ok());
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.oldest_received_at), (2, Some(T)));

        b.queue.complete(&leases[1]).await.unwrap();
        assert!(matches!(
            b.queue.message_data("m").await,
            Err(QueueError::NotFound(_))
        ));
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.oldest_received_at), (1, Some(T + 1)));
        assert!(b.queue.message_data("other").await.is_ok());
    }

    pub async fn fail_removes_the_unit_like_complete(b: Backend) {
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        let leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        b.queue.fail(&leases[0]).await.unwrap();
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.leased), (1, 1));
        b.queue.fail(&leases[1]).await.unwrap();
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!(stats, queue::QueueStats::default());
        assert!(
            b.queue
                .lease(T + 3_600_000, 10, MINUTE)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn stats_count_units_by_state(b: Backend) {
        assert_eq!(
            b.queue.stats(T).await.unwrap(),
            queue::QueueStats::default()
        );
        b.queue
            .enqueue(
                message("a", &["1@x.org", "2@y.org", "3@z.org"], T),
                Vec::new(),
            )
            .await
            .unwrap();
        b.queue
            .enqueue(message("b", &["4@w.org"], T + 100), Vec::new())
            .await
            .unwrap();

        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!(stats.due, 3);
        assert_eq!(stats.deferred, 1, "b is not due before T+100");
        assert_eq!(stats.leased, 0);
        assert_eq!(stats.messages, 2);
        assert_eq!(stats.oldest_received_at, Some(T));

        let leases = b.queue.lease(T, 2, MINUTE).await.unwrap();
        b.queue
            .retry(
                &leases[0],
                later(leases[0].unit.recipients.clone(), T + 600_000),
            )
            .await
            .unwrap();
        let stats = b.queue.stats(T + 100).await.unwrap();
        assert_eq!((stats.due, stats.deferred, stats.leased), (2, 1, 1));
        assert!(b.queue.ping().await.is_ok());
    }

    pub async fn enqueue_of_the_same_id_stores_it_once(b: Backend) {
        let msg = message("dup", &["a@x.org"], T);
        b.queue.enqueue(msg.clone(), Vec::new()).await.unwrap();
        b.queue.enqueue(msg, Vec::new()).await.unwrap();
        assert_eq!(b.queue.lease(T, 10, MINUTE).await.unwrap().len(), 1);
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 1);
    }

    pub async fn suppression_list_adds_expires_and_removes(b: Backend) {
        let entry = |address: &str, expires_at| SuppressionEntry {
            address: address.into(),
            reason: SuppressionReason::Bounce,
            scope: None,
            remote_reply: Some("550 5.1.1 no such user".into()),
            created_at: T,
            expires_at,
        };
        b.state.suppress(entry("Bounce@X.org", None)).await.unwrap();
        b.state
            .suppress(entry("temp@x.org", Some(T + 1_000)))
            .await
            .unwrap();

        let found = b
            .state
            .suppressed("bounce@x.ORG", "any.test", T)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.address, "bounce@x.org");
        assert_eq!(
            found.remote_reply.as_deref(),
            Some("550 5.1.1 no such user")
        );
        assert!(
            b.state
                .suppressed("temp@x.org", "any.test", T + 999)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            b.state
                .suppressed("temp@x.org", "any.test", T + 1_000)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            b.state
                .suppressed("other@x.org", "any.test", T)
                .await
                .unwrap()
                .is_none()
        );

        let mut listed: Vec<String> = b
            .state
            .list_suppressed(T)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.address)
            .collect();
        listed.sort();
        assert_eq!(listed, vec!["bounce@x.org", "temp@x.org"]);
        assert_eq!(b.state.list_suppressed(T + 1_000).await.unwrap().len(), 1);

        // Replacing an entry keeps one entry, with the new content.
        let mut manual = entry("temp@x.org", None);
        manual.reason = SuppressionReason::Manual;
        b.state.suppress(manual).await.unwrap();
        let found = b
            .state
            .suppressed("temp@x.org", "any.test", T + 5_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.reason, SuppressionReason::Manual);

        assert!(b.state.unsuppress("BOUNCE@x.org", None).await.unwrap());
        assert!(!b.state.unsuppress("bounce@x.org", None).await.unwrap());
        assert!(
            b.state
                .suppressed("bounce@x.org", "any.test", T)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(b.state.list_suppressed(T).await.unwrap().len(), 1);
    }

    /// Unsubscribes are scoped to a sending domain; bounces and
    /// complaints apply to every domain. An address may have both, each
    /// removed on its own; events and entries published together are both
    /// stored.
    pub async fn suppression_is_scoped_to_a_sending_domain(b: Backend) {
        let entry = |reason, scope: Option<&str>| SuppressionEntry {
            address: "Rcpt@X.org".into(),
            reason,
            scope: scope.map(str::to_string),
            remote_reply: None,
            created_at: T,
            expires_at: None,
        };
        let unsubscribed = Event {
            sending_domain: Some("shop.test".into()),
            ..event(EventType::Unsubscribed, "rcpt@x.org")
        };
        b.events
            .publish_suppressing(
                std::slice::from_ref(&unsubscribed),
                &[entry(SuppressionReason::Unsubscribe, Some("Shop.test"))],
            )
            .await
            .unwrap();
        let found = b
            .state
            .suppressed("rcpt@x.org", "SHOP.test", T)
            .await
            .unwrap()
            .expect("suppressed for shop.test");
        assert_eq!(found.reason, SuppressionReason::Unsubscribe);
        assert_eq!(found.scope.as_deref(), Some("shop.test"));
        assert!(
            b.state
                .suppressed("rcpt@x.org", "news.test", T)
                .await
                .unwrap()
                .is_none(),
            "another sending domain is not affected"
        );
        let stored = b.events.read(None, 10).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].event, unsubscribed);

        // A bounce applies everywhere and wins over the scoped entry.
        b.state
            .suppress(entry(SuppressionReason::Bounce, None))
            .await
            .unwrap();
        for domain in ["shop.test", "news.test"] {
            let found = b
                .state
                .suppressed("rcpt@x.org", domain, T)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(found.reason, SuppressionReason::Bounce, "{domain}");
        }
        let mut listed: Vec<(SuppressionReason, Option<String>)> = b
            .state
            .list_suppressed(T)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.reason, e.scope))
            .collect();
        listed.sort_by_key(|(_, scope)| scope.clone());
        assert_eq!(
            listed,
            vec![
                (SuppressionReason::Bounce, None),
                (SuppressionReason::Unsubscribe, Some("shop.test".into())),
            ]
        );
        assert!(b.state.unsuppress("rcpt@x.org", None).await.unwrap());
        assert!(
            b.state
                .suppressed("rcpt@x.org", "news.test", T)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            b.state
                .suppressed("rcpt@x.org", "shop.test", T)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            b.state
                .unsuppress("rcpt@x.org", Some("shop.test"))
                .await
                .unwrap()
        );
        assert!(b.state.list_suppressed(T).await.unwrap().is_empty());
    }

    pub async fn counters_add_up_within_their_window(b: Backend) {
        assert_eq!(b.state.counter("auth:10.0.0.1").await.unwrap(), 0);
        assert_eq!(
            b.state
                .incr_counter("auth:10.0.0.1", 1, MINUTE)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            b.state
                .incr_counter("auth:10.0.0.1", 2, MINUTE)
                .await
                .unwrap(),
            3
        );
        assert_eq!(b.state.counter("auth:10.0.0.1").await.unwrap(), 3);
        assert_eq!(b.state.counter("auth:10.0.0.2").await.unwrap(), 0);

        // A short window: the total drops to 0 when it ends, and the next
        // increment starts a new window. Real time here (the trait takes
        // none), so poll for the end.
        let short = Duration::from_millis(100);
        assert_eq!(b.state.incr_counter("rate:d", 5, short).await.unwrap(), 5);
        // A later increment does not extend the window.
        assert_eq!(b.state.incr_counter("rate:d", 1, MINUTE).await.unwrap(), 6);
        while b.state.counter("rate:d").await.unwrap() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(b.state.incr_counter("rate:d", 1, MINUTE).await.unwrap(), 1);
        assert_eq!(b.state.counter("auth:10.0.0.1").await.unwrap(), 3);
    }

    pub async fn values_are_shared_replaced_and_expire(b: Backend) {
        assert_eq!(b.state.get_value("mta-sts:x.org").await.unwrap(), None);
        b.state
            .set_value("mta-sts:x.org", "one", MINUTE)
            .await
            .unwrap();
        assert_eq!(
            b.state.get_value("mta-sts:x.org").await.unwrap().as_deref(),
            Some("one")
        );
        b.state
            .set_value("mta-sts:x.org", "two", MINUTE)
            .await
            .unwrap();
        assert_eq!(
            b.state.get_value("mta-sts:x.org").await.unwrap().as_deref(),
            Some("two")
        );
        assert_eq!(b.state.get_value("mta-sts:y.org").await.unwrap(), None);
        // A short time to live: the value disappears by itself.
        b.state
            .set_value("mta-sts:y.org", "short", Duration::from_millis(100))
            .await
            .unwrap();
        while b.state.get_value("mta-sts:y.org").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            b.state.get_value("mta-sts:x.org").await.unwrap().as_deref(),
            Some("two")
        );
    }

    pub async fn slots_respect_their_limit_and_ttl(b: Backend) {
        let a = b
            .state
            .acquire_slot("mx:x.org", 2, MINUTE)
            .await
            .unwrap()
            .unwrap();
        let c = b
            .state
            .acquire_slot("mx:x.org", 2, MINUTE)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(a, c);
        assert!(
            b.state
                .acquire_slot("mx:x.org", 2, MINUTE)
                .await
                .unwrap()
                .is_none()
        );
        // Another key has its own slots.
        assert!(
            b.state
                .acquire_slot("mx:y.org", 1, MINUTE)
                .await
                .unwrap()
                .is_some()
        );

        b.state.release_slot("mx:x.org", &a).await.unwrap();
        let d = b.state.acquire_slot("mx:x.org", 2, MINUTE).await.unwrap();
        assert!(d.is_some());
        assert!(
            b.state
                .acquire_slot("mx:x.org", 2, MINUTE)
                .await
                .unwrap()
                .is_none()
        );
        // Releasing an unknown token is harmless.
        b.state
            .release_slot("mx:x.org", "not-a-token")
            .await
            .unwrap();

        // A dead holder's slot comes back after its ttl.
        let ttl = Duration::from_millis(100);
        assert!(
            b.state
                .acquire_slot("mx:z.org", 1, ttl)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            b.state
                .acquire_slot("mx:z.org", 1, ttl)
                .await
                .unwrap()
                .is_none()
        );
        while b
            .state
            .acquire_slot("mx:z.org", 1, ttl)
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn slots_are_renewed_only_by_their_holder(b: Backend) {
        let short = Duration::from_millis(200);
        let a = b
            .state
            .acquire_slot("mx:r.org", 1, short)
            .await
            .unwrap()
            .expect("slot free");
        assert!(b.state.renew_slot("mx:r.org", &a, MINUTE).await.unwrap());
        // Past its first ttl the renewed slot is still taken.
        tokio::time::sleep(short * 3).await;
        assert!(
            b.state
                .acquire_slot("mx:r.org", 1, MINUTE)
                .await
                .unwrap()
                .is_none(),
            "a renewed slot outlives its first ttl"
        );
        assert!(
            !b.state
                .renew_slot("mx:r.org", "not-a-token", MINUTE)
                .await
                .unwrap()
        );
        assert!(
            !b.state
                .renew_slot("mx:other.org", &a, MINUTE)
                .await
                .unwrap()
        );
        // Released: renewing does not take it back.
        b.state.release_slot("mx:r.org", &a).await.unwrap();
        assert!(!b.state.renew_slot("mx:r.org", &a, MINUTE).await.unwrap());
        let c = b
            .state
            .acquire_slot("mx:r.org", 1, MINUTE)
            .await
            .unwrap()
            .expect("released slot is free");

        // Expired: lost, and its renewal cannot push the count over the limit.
        let tiny = Duration::from_millis(50);
        let d = b
            .state
            .acquire_slot("mx:s.org", 1, tiny)
            .await
            .unwrap()
            .expect("slot free");
        tokio::time::sleep(tiny * 6).await;
        assert!(!b.state.renew_slot("mx:s.org", &d, MINUTE).await.unwrap());
        let e = b
            .state
            .acquire_slot("mx:s.org", 1, MINUTE)
            .await
            .unwrap()
            .expect("the expired slot is free");
        assert!(!b.state.renew_slot("mx:s.org", &d, MINUTE).await.unwrap());
        assert!(b.state.renew_slot("mx:s.org", &e, MINUTE).await.unwrap());
        assert!(
            b.state
                .acquire_slot("mx:s.org", 1, MINUTE)
                .await
                .unwrap()
                .is_none()
        );
        assert!(b.state.renew_slot("mx:r.org", &c, MINUTE).await.unwrap());
    }

    pub async fn two_consumers_never_lease_the_same_unit(b: Backend) {
        const MESSAGES: usize = 60;
        for i in 0..MESSAGES {
            let msg = message(&format!("m{i}"), &["a@x.org", "b@y.org"], T);
            b.queue.enqueue(msg, Vec::new()).await.unwrap();
        }
        let consumer = |b: Backend| async move {
            let mut seen = Vec::new();
            loop {
                let leases = b.queue.lease(T, 7, MINUTE).await.unwrap();
                if leases.is_empty() {
                    return seen;
                }
                for lease in leases {
                    b.queue.complete(&lease).await.unwrap();
                    seen.push(lease.unit.id);
                }
            }
        };
        let (one, two) = tokio::join!(
            tokio::spawn(consumer(b.clone())),
            tokio::spawn(consumer(b.clone()))
        );
        let (one, two) = (one.unwrap(), two.unwrap());
        let mut all: Vec<String> = one.iter().chain(two.iter()).cloned().collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "a unit was leased twice");
        assert_eq!(total, MESSAGES * 2);
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 0);
    }

    pub async fn lease_with_data_returns_each_units_bytes(b: Backend) {
        let one = message("m1", &["a@x.org", "b@y.org"], T);
        let two = message("m2", &["c@z.org"], T);
        for m in [&one, &two] {
            b.queue.enqueue(m.clone(), Vec::new()).await.unwrap();
        }
        assert!(
            b.queue
                .lease_with_data(T, 0, MINUTE)
                .await
                .unwrap()
                .is_empty()
        );
        let leased = b.queue.lease_with_data(T, 10, MINUTE).await.unwrap();
        assert_eq!(leased.len(), 3);
        assert_each_has_its_bytes(&leased, &[&one, &two]);
        // They are leases like any other: leased, not due, and settle.
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.due, stats.leased), (0, 3));
        assert!(
            b.queue
                .lease_with_data(T, 10, MINUTE)
                .await
                .unwrap()
                .is_empty()
        );
        for l in &leased {
            b.queue.complete(&l.lease).await.unwrap();
        }
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 0);
    }

    pub async fn settle_many_settles_each_lease_on_its_own(b: Backend) {
        for i in 0..6 {
            b.queue
                .enqueue(message(&format!("m{i}"), &["a@x.org"], T), Vec::new())
                .await
                .unwrap();
        }
        assert!(b.queue.settle_many(&[]).await.is_empty());
        let mut leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        leases.sort_by(|a, b| a.unit.message_id.cmp(&b.unit.message_id));
        assert_eq!(leases.len(), 6);
        let stolen = Lease {
            token: "not-the-token".into(),
            ..leases[1].clone()
        };
        let bounce = SuppressionEntry {
            address: "a@x.org".into(),
            reason: SuppressionReason::Bounce,
            scope: None,
            remote_reply: Some("550 5.1.1 no".into()),
            created_at: T,
            expires_at: None,
        };
        let batch = vec![
            (leases[0].clone(), Settlement::only(SettleOp::Complete)),
            (stolen, Settlement::only(SettleOp::Complete)),
            (
                leases[2].clone(),
                Settlement::only(SettleOp::Retry(later(vec!["a@x.org".into()], T + 60_000))),
            ),
            (
                leases[3].clone(),
                Settlement {
                    op: SettleOp::Fail,
                    enqueue: vec![message("dsn-3", &["sender@example.test"], T)],
                    events: vec![event(EventType::Bounced, "a@x.org")],
                    suppress: vec![bounce],
                },
            ),
            (
                leases[4].clone(),
                Settlement::only(SettleOp::Postpone { until: T + 5_000 }),
            ),
            (leases[5].clone(), Settlement::only(SettleOp::Complete)),
        ];
        let results = b.queue.settle_many(&batch).await;
        assert_eq!(results.len(), 6);
        assert!(
            results[0].is_ok() && results[2..].iter().all(Result::is_ok),
            "{results:?}"
        );
        assert!(matches!(results[1], Err(QueueError::LeaseLost(_))));
        // The lost one is still leased; the others are settled as asked.
        let units = b.control.units(T).await.unwrap();
        let state = |id: &str| {
            units
                .iter()
                .find(|v| v.unit.message_id == id)
                .map(|v| (v.state, v.unit.attempts))
        };
        assert_eq!(state("m0"), None);
        assert_eq!(state("m1"), Some((UnitState::Leased, 0)));
        assert_eq!(state("m2"), Some((UnitState::Deferred, 1)));
        assert_eq!(state("m3"), None);
        assert_eq!(state("m4"), Some((UnitState::Deferred, 0)));
        assert_eq!(state("m5"), None);
        assert_eq!(state("dsn-3"), Some((UnitState::Due, 0)));
        assert_eq!(b.events.read(None, 10).await.unwrap().len(), 1);
        assert!(
            b.state
                .suppressed("a@x.org", "example.test", T)
                .await
                .unwrap()
                .is_some()
        );
        // Settling the same batch again: every lease is spent now.
        let again = b.queue.settle_many(&batch).await;
        assert!(
            again
                .iter()
                .all(|r| matches!(r, Err(QueueError::LeaseLost(_)))),
            "{again:?}"
        );
        assert_eq!(b.events.read(None, 10).await.unwrap().len(), 1);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redis_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Kind::Redis, super::cases::$case).await;
                }
            )*
        }
        mod redis_one_partition {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Kind::RedisOnePartition, super::cases::$case).await;
                }
            )*
        }
        mod embedded_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Kind::Embedded, super::cases::$case).await;
                }
            )*
        }
    };
}

conformance!(
    outbox_events_are_written_with_the_enqueue,
    outbox_events_dsns_and_suppression_are_written_with_the_settlement,
    outbox_claims_are_exclusive_acked_and_reclaimed,
    outbox_reads_in_log_order_from_any_position,
    outbox_trim_keeps_what_a_group_has_not_acked,
    enqueue_splits_into_units_per_domain,
    lease_takes_only_due_units_up_to_max,
    expired_lease_makes_the_unit_due_again,
    renew_extends_the_lease_past_its_old_expiry,
    renew_of_an_expired_or_taken_over_lease_is_lost,
    complete_after_renew_uses_the_same_token,
    retry_reschedules_the_remaining_recipients,
    retry_with_no_recipients_left_finishes_the_unit,
    postpone_puts_the_unit_back_without_counting_an_attempt,
    control_lists_units_with_state_and_attempt_history,
    hold_keeps_a_destination_from_lease_until_released,
    claim_takes_waiting_and_held_units_but_not_leased_ones,
    completing_the_last_unit_deletes_the_message,
    fail_removes_the_unit_like_complete,
    stats_count_units_by_state,
    enqueue_of_the_same_id_stores_it_once,
    suppression_list_adds_expires_and_removes,
    suppression_is_scoped_to_a_sending_domain,
    counters_add_up_within_their_window,
    values_are_shared_replaced_and_expire,
    slots_respect_their_limit_and_ttl,
    slots_are_renewed_only_by_their_holder,
    two_consumers_never_lease_the_same_unit,
    lease_with_data_returns_each_units_bytes,
    settle_many_settles_each_lease_on_its_own,
);

// ------------------------------------------------- crashes and restarts

/// Every unit in the queue, grouped by message id (leases them all).
async fn units_by_message(b: &Backend, now: Millis) -> HashMap<String, usize> {
    let mut by_message = HashMap::new();
    loop {
        let leases = b.queue.lease(now, 100, MINUTE).await.unwrap();
        if leases.is_empty() {
            return by_message;
        }
        for lease in leases {
            *by_message.entry(lease.unit.message_id).or_default() += 1;
        }
    }
}

#[tokio::test]
async fn redis_enqueue_fails_while_redis_is_down_and_leaves_nothing_half_written() {
    tokio::time::timeout(LIMIT, async {
        let mut server = RedisServer::builder()
            .persistence(Persistence::AofAlways)
            .start()
            .await
            .unwrap();
        let b = open(&redis_config(&server.url(), 0, Duration::from_secs(2))).await;
        b.queue.ping().await.unwrap();

        // Enqueue in the background while Redis is killed under it.
        let (first_ok, ok_seen) = tokio::sync::oneshot::channel();
        let producer = tokio::spawn({
            let b = b.clone();
            async move {
                let mut first_ok = Some(first_ok);
                let mut acked = Vec::new();
                let mut refused = 0;
                // Until Redis is gone: however fast it is, the kill lands
                // mid-stream.
                for i in 0.. {
                    let id = format!("m{i}");
                    match b
                        .queue
                        .enqueue(
                            message(&id, &["a@x.org", "b@y.org", "c@z.org"], T),
                            Vec::new(),
                        )
                        .await
                    {
                        Ok(()) => {
                            acked.push(id);
                            if acked.len() == 20
                                && let Some(tx) = first_ok.take()
                            {
                                let _ = tx.send(());
                            }
                        }
                        Err(QueueError::Unavailable(_) | QueueError::Timeout(_)) => refused += 1,
                        Err(other) => panic!("unexpected error {other}"),
                    }
                    if refused >= 5 {
                        break;
                    }
                }
                (acked, refused)
            }
        });
        ok_seen.await.unwrap();
        server.kill().await.unwrap();
        let (acked, refused) = producer.await.unwrap();
        assert!(refused > 0, "enqueue kept succeeding with Redis dead");
        assert!(matches!(
            b.queue
                .enqueue(message("while-down", &["a@x.org"], T), Vec::new())
                .await,
            Err(QueueError::Unavailable(_) | QueueError::Timeout(_))
        ));
        assert!(b.queue.ping().await.is_err());

        server.restart().await.unwrap();
        until_reachable(&b).await;
        let units = units_by_message(&b, T).await;
        for id in &acked {
            assert_eq!(units.get(id), Some(&3), "acknowledged {id} lost or partial");
        }
        for (id, n) in &units {
            assert_eq!(*n, 3, "{id} is half written");
        }
        assert!(!units.contains_key("while-down"));
        assert_eq!(
            b.queue.stats(T).await.unwrap().messages as usize,
            units.len()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn redis_queue_survives_a_restart_with_aof() {
    tokio::time::timeout(LIMIT, async {
        // `always`: with `everysec` Redis may postpone the AOF write while a
        // background fsync is slow, so the last acknowledged write (here the
        // suppression) can die with a SIGKILL; one CI run on a busy disk lost it.
        let mut server = RedisServer::builder()
            .persistence(Persistence::AofAlways)
            .start()
            .await
            .unwrap();
        let b = open(&redis_config(&server.url(), 0, Duration::from_secs(2))).await;
        let msg = message("m", &["a@x.org", "b@y.org"], T);
        b.queue.enqueue(msg.clone(), Vec::new()).await.unwrap();
        let leased = b
            .queue
            .lease(T, 1, Duration::from_secs(1))
            .await
            .unwrap()
            .remove(0);
        b.state
            .suppress(SuppressionEntry {
                address: "gone@x.org".into(),
                reason: SuppressionReason::Bounce,
                scope: None,
                remote_reply: None,
                created_at: T,
                expires_at: None,
            })
            .await
            .unwrap();

        server.kill().await.unwrap();
        server.restart().await.unwrap();
        until_reachable(&b).await;

        assert_eq!(b.queue.message_data("m").await.unwrap(), msg.data);
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.due, stats.leased), (1, 1, 1));
        // The lease survived too, and expires as it would have.
        b.queue.complete(&leased).await.unwrap();
        assert_eq!(b.queue.lease(T, 10, MINUTE).await.unwrap().len(), 1);
        assert!(
            b.state
                .suppressed("gone@x.org", "any.test", T)
                .await
                .unwrap()
                .is_some()
        );
    })
    .await
    .expect("test timed out");
}

/// A Redis that forgot its scripts (a restart, a `SCRIPT FLUSH`): the
/// enqueue, whose script runs inside a `MULTI` after the message's `HSET`,
/// loads it and runs the whole transaction again, storing the message once;
/// the lease loads its own and still hands out every message's bytes.
#[tokio::test]
async fn redis_scripts_forgotten_under_a_running_relay_are_loaded_again() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start().await.unwrap();
        let b = open(&redis_config(&server.url(), 0, Duration::from_secs(2))).await;
        let one = message("m1", &["a@x.org"], T);
        let two = message("m2", &["b@y.org", "c@z.org"], T);
        b.queue.enqueue(one.clone(), Vec::new()).await.unwrap();
        server.raw_command(&["SCRIPT", "FLUSH"]).await.unwrap();
        b.queue.enqueue(two.clone(), Vec::new()).await.unwrap();
        // Retried after a timeout, it is still stored once.
        b.queue.enqueue(two.clone(), Vec::new()).await.unwrap();
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.due), (2, 3));

        server.raw_command(&["SCRIPT", "FLUSH"]).await.unwrap();
        let leased = b.queue.lease_with_data(T, 10, MINUTE).await.unwrap();
        assert_eq!(leased.len(), 3);
        assert_each_has_its_bytes(&leased, &[&one, &two]);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn redis_outbox_survives_a_restart_with_aof() {
    tokio::time::timeout(LIMIT, async {
        // `always`, for the reason given in redis_queue_survives_a_restart_with_aof.
        let mut server = RedisServer::builder()
            .persistence(Persistence::AofAlways)
            .start()
            .await
            .unwrap();
        let b = open(&redis_config(&server.url(), 0, Duration::from_secs(2))).await;
        let accepted = vec![event(EventType::Accepted, "a@x.org")];
        b.queue
            .enqueue(message("m", &["a@x.org"], T), accepted.clone())
            .await
            .unwrap();
        let rejected = vec![event(EventType::Rejected, "b@x.org")];
        b.events.publish(&rejected).await.unwrap();
        b.events.ensure_group("webhook:a").await.unwrap();
        // The accepted event sits in its message's partition stream, the
        // rejected one in the shared stream: written within a millisecond,
        // either may come first in the merged log (see module `events`).
        let claimed = b.events.claim("webhook:a", "pod-1", 1, HOUR).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let log = b.events.read(None, 10).await.unwrap();
        assert_eq!(claimed[0].event, log[0].event);

        server.kill().await.unwrap();
        server.restart().await.unwrap();
        until_reachable(&b).await;

        let all = b.events.read(None, 10).await.unwrap();
        assert_eq!(ids(&all), ids(&log));
        let mut both = ids(&all);
        both.sort();
        let mut want = vec![accepted[0].id.clone(), rejected[0].id.clone()];
        want.sort();
        assert_eq!(both, want);
        // The group, its claim and its cursor survived: the claimed event
        // is still owed, the other still unread. (Redis does not keep a
        // claim's age over a restart, so the claim may be handed out again
        // at once: a duplicate, never a loss.)
        let backlog = b.events.backlog("webhook:a").await.unwrap();
        assert_eq!(backlog.pending, 2);
        let mut owed = ids(&b
            .events
            .claim("webhook:a", "pod-2", 10, HOUR)
            .await
            .unwrap());
        owed.extend(ids(&b
            .events
            .claim("webhook:a", "pod-2", 10, Duration::ZERO)
            .await
            .unwrap()));
        owed.sort();
        owed.dedup();
        let mut want = vec![accepted[0].id.clone(), rejected[0].id.clone()];
        want.sort();
        assert_eq!(owed, want);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn embedded_outbox_survives_a_reopen() {
    tokio::time::timeout(LIMIT, async {
        let store = store(Kind::Embedded, Persistence::None).await;
        let config = config_for(&store, Duration::from_secs(5));
        let accepted = vec![event(EventType::Accepted, "a@x.org")];
        {
            let b = open(&config).await;
            b.queue
                .enqueue(message("m", &["a@x.org"], T), accepted.clone())
                .await
                .unwrap();
            b.events.ensure_group("webhook:a").await.unwrap();
        }
        let b = open(&config).await;
        let claimed = b
            .events
            .claim("webhook:a", "pod-1", 10, HOUR)
            .await
            .unwrap();
        assert_eq!(ids(&claimed), vec![accepted[0].id.clone()]);
        // Numbering continues after a reopen and a full trim.
        b.events
            .ack("webhook:a", &[claimed[0].seq.clone()])
            .await
            .unwrap();
        b.events
            .trim(queue::now_millis() + 60_000, &[])
            .await
            .unwrap();
        let later = event(EventType::Delivered, "a@x.org");
        b.events
            .publish(std::slice::from_ref(&later))
            .await
            .unwrap();
        let next = b.events.read(None, 10).await.unwrap();
        assert!(next[0].seq > claimed[0].seq);
        drop(store);
    })
    .await
    .expect("test timed out");
}

fn redis_config(url: &str, wait_replicas: u32, timeout: Duration) -> QueueConfig {
    QueueConfig {
        redis: Some(RedisQueue {
            url: Some(url.to_string()),
            url_file: None,
            key_prefix: "petrel-test".into(),
            wait_replicas,
            partitions: 16,
        }),
        embedded: None,
        lease: MINUTE.into(),
        timeout: timeout.into(),
    }
}

#[tokio::test]
async fn redis_url_is_read_from_url_file_and_prefix_isolates_queues() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, format!("  {}\n", server.url())).unwrap();
        let mut config = redis_config("unused", 0, Duration::from_secs(2));
        let redis = config.redis.as_mut().unwrap();
        redis.url = None;
        redis.url_file = Some(file);
        let a = open(&config).await;
        a.queue.ping().await.unwrap();
        a.queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await
            .unwrap();

        let mut other = config.clone();
        other.redis.as_mut().unwrap().key_prefix = "other".into();
        let b = open(&other).await;
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 0);
        assert_eq!(a.queue.stats(T).await.unwrap().messages, 1);

        let mut missing = config.clone();
        missing.redis.as_mut().unwrap().url_file = Some(PathBuf::from("/nonexistent/url"));
        assert!(matches!(
            queue::open(&missing).await,
            Err(QueueError::Unavailable(_))
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn redis_wait_replicas_refuses_and_rolls_back_without_enough_replicas() {
    tokio::time::timeout(LIMIT, async {
        let primary = RedisServer::builder()
            .args(["--repl-diskless-sync-delay", "0"])
            .start()
            .await
            .unwrap();
        let b = open(&redis_config(&primary.url(), 1, Duration::from_secs(2))).await;
        let result = b
            .queue
            .enqueue(message("m", &["a@x.org"], T), Vec::new())
            .await;
        assert!(
            matches!(
                result,
                Err(QueueError::NotReplicated {
                    acked: 0,
                    wanted: 1
                })
            ),
            "{result:?}"
        );
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 0, "rolled back");

        // With a replica attached, the same enqueue is acknowledged. The
        // replica syncs in the background: retry until it has.
        let port = primary.port().to_string();
        let _replica = RedisServer::builder()
            .args(["--replicaof", "127.0.0.1", port.as_str()])
            .start()
            .await
            .unwrap();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = format!("r{attempt}");
            match b
                .queue
                .enqueue(message(&id, &["a@x.org"], T), Vec::new())
                .await
            {
                Ok(()) => break,
                Err(QueueError::NotReplicated { .. }) => continue,
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(b.queue.stats(T).await.unwrap().messages, 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn embedded_queue_survives_a_reopen() {
    tokio::time::timeout(LIMIT, async {
        let store = Store::Embedded(tempfile::tempdir().unwrap());
        let config = config_for(&store, Duration::from_secs(5));
        let msg = message("m", &["a@x.org", "b@y.org"], T);
        {
            let b = open(&config).await;
            b.queue.enqueue(msg.clone(), Vec::new()).await.unwrap();
            let lease = b.queue.lease(T, 1, MINUTE).await.unwrap().remove(0);
            b.queue.complete(&lease).await.unwrap();
            b.state.incr_counter("k", 1, MINUTE).await.unwrap();
            // Opening the same file twice at once is refused.
            assert!(matches!(
                queue::open(&config).await,
                Err(QueueError::Unavailable(_))
            ));
        }
        let b = open(&config).await;
        assert_eq!(b.queue.message_data("m").await.unwrap(), msg.data);
        let leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        assert_eq!(leases.len(), 1, "the completed unit stays completed");
        assert_eq!(leases[0].unit.domain, "y.org");
        drop(store);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn open_refuses_a_config_without_exactly_one_backend() {
    let config = QueueConfig {
        redis: None,
        embedded: None,
        lease: MINUTE.into(),
        timeout: MINUTE.into(),
    };
    assert!(matches!(
        queue::open(&config).await,
        Err(QueueError::Unavailable(_))
    ));
}

/// Not a test: rough throughput figures, printed (`--ignored --nocapture`).
/// Timings are never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand"]
async fn bench_enqueue_and_lease_round_trip() {
    for kind in [Kind::Redis, Kind::Embedded] {
        let persistence = match kind {
            Kind::Redis | Kind::RedisOnePartition => Persistence::Aof,
            Kind::Embedded => Persistence::None,
        };
        let store = store(kind, persistence).await;
        let b = open(&config_for(&store, Duration::from_secs(10))).await;
        for size in [1024usize, 20 * 1024] {
            const CLIENTS: usize = 50;
            const PER_CLIENT: usize = 40;
            let started = std::time::Instant::now();
            let mut tasks = Vec::new();
            for c in 0..CLIENTS {
                let b = b.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..PER_CLIENT {
                        let mut msg = message(&format!("s{size}-c{c}-{i}"), &["a@x.org"], T);
                        msg.data = vec![b'x'; size];
                        b.queue.enqueue(msg, Vec::new()).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let total = CLIENTS * PER_CLIENT;
            let enq = started.elapsed();
            let started = std::time::Instant::now();
            let mut done = 0;
            loop {
                let leases = b.queue.lease(T, 100, MINUTE).await.unwrap();
                if leases.is_empty() {
                    break;
                }
                for lease in leases {
                    b.queue.message_data(&lease.unit.message_id).await.unwrap();
                    b.queue.complete(&lease).await.unwrap();
                    done += 1;
                }
            }
            let deq = started.elapsed();
            assert_eq!(done, total);
            println!(
                "{kind:?} {size} B: enqueue {total} with {CLIENTS} concurrent callers in {enq:?} \
                 ({:.0}/s); lease+data+complete in {deq:?} ({:.0}/s)",
                total as f64 / enq.as_secs_f64(),
                total as f64 / deq.as_secs_f64(),
            );
        }
        drop(b);
        drop(store);
    }
}

#[tokio::test]
async fn redis_undecodable_unit_does_not_stall_the_others() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start().await.unwrap();
        let b = open(&redis_config(&server.url(), 0, Duration::from_secs(2))).await;
        b.queue
            .enqueue(message("m", &["a@x.org", "b@y.org"], T), Vec::new())
            .await
            .unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // Into a partition the queue already uses.
        let units: Vec<String> = redis::cmd("KEYS")
            .arg("{petrel-test:*}:unit")
            .query_async(&mut conn)
            .await
            .unwrap();
        let tag = units[0].trim_end_matches(":unit");
        let _: () = redis::pipe()
            .hset(format!("{tag}:unit"), "bad:x.org", "not json")
            .zadd(format!("{tag}:due"), "bad:x.org", T)
            .query_async(&mut conn)
            .await
            .unwrap();

        let leases = b.queue.lease(T, 10, MINUTE).await.unwrap();
        assert_eq!(sorted_domains(&leases), vec!["x.org", "y.org"]);
        assert_eq!(b.queue.stats(T).await.unwrap().leased, 3);
    })
    .await
    .expect("test timed out");
}

// ------------------------------------------------------------ Redis Cluster

/// A free port whose cluster bus port (+10000) is free and valid too.
fn cluster_port() -> u16 {
    loop {
        let port = petrel_tests::ports::free_port();
        if port <= 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Three masters, no replicas, slots spread by `redis-cli --cluster create`.
async fn start_cluster() -> Vec<RedisServer> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node = RedisServer::builder()
            .port(cluster_port())
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ])
            .start()
            .await
            .expect("cluster node starts");
        nodes.push(node);
    }
    let mut create = tokio::process::Command::new("redis-cli");
    create.args(["--cluster", "create"]);
    for node in &nodes {
        create.arg(format!("127.0.0.1:{}", node.port()));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Every node must agree the cluster is up; gossip has no event to await.
    for node in &nodes {
        while !node
            .raw_command(&["CLUSTER", "INFO"])
            .await
            .unwrap()
            .contains("cluster_state:ok")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes
}

#[tokio::test]
async fn redis_cluster_passes_the_conformance_cases() {
    tokio::time::timeout(LIMIT, async {
        let nodes = start_cluster().await;
        let seeds: Vec<String> = nodes
            .iter()
            .take(2)
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let url = format!("redis+cluster://{}", seeds.join(","));
        // Each case under its own prefix, so the queues land on different
        // slots (and nodes) of the one cluster.
        // Each case once with one partition and once with 16.
        macro_rules! on_cluster {
            ($($case:ident),* $(,)?) => {$(
                for partitions in [1, 16] {
                    let mut config = redis_config(&url, 0, Duration::from_secs(5));
                    let redis = config.redis.as_mut().unwrap();
                    redis.key_prefix = format!("{}-{partitions}", stringify!($case));
                    redis.partitions = partitions;
                    cases::$case(open(&config).await).await;
                }
            )*};
        }
        on_cluster!(
            outbox_events_are_written_with_the_enqueue,
            outbox_events_dsns_and_suppression_are_written_with_the_settlement,
            outbox_claims_are_exclusive_acked_and_reclaimed,
            outbox_reads_in_log_order_from_any_position,
            outbox_trim_keeps_what_a_group_has_not_acked,
            enqueue_splits_into_units_per_domain,
            lease_takes_only_due_units_up_to_max,
            expired_lease_makes_the_unit_due_again,
            renew_extends_the_lease_past_its_old_expiry,
            renew_of_an_expired_or_taken_over_lease_is_lost,
            retry_reschedules_the_remaining_recipients,
            postpone_puts_the_unit_back_without_counting_an_attempt,
            hold_keeps_a_destination_from_lease_until_released,
            claim_takes_waiting_and_held_units_but_not_leased_ones,
            completing_the_last_unit_deletes_the_message,
            stats_count_units_by_state,
            enqueue_of_the_same_id_stores_it_once,
            suppression_list_adds_expires_and_removes,
            suppression_is_scoped_to_a_sending_domain,
            counters_add_up_within_their_window,
            values_are_shared_replaced_and_expire,
            slots_respect_their_limit_and_ttl,
            slots_are_renewed_only_by_their_holder,
            two_consumers_never_lease_the_same_unit,
            lease_with_data_returns_each_units_bytes,
            settle_many_settles_each_lease_on_its_own,
        );
        // The prefixes really were spread over the nodes.
        let mut used = 0;
        for node in &nodes {
            let reply = node.raw_command(&["DBSIZE"]).await.unwrap();
            if reply.trim() != ":0" {
                used += 1;
            }
        }
        assert!(used >= 2, "all queues landed on one node");
    })
    .await
    .expect("test timed out");
}

// ----------------------------------------------------------------- Sentinel

/// A `redis-server --sentinel` watching `master_port` as `mymaster`.
struct Sentinel {
    port: u16,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Sentinel {
    async fn start(master_port: u16) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = petrel_tests::ports::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile sentinel.log\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster 500\n\
                 sentinel failover-timeout mymaster 2000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server --sentinel runs");
        let sentinel = Sentinel {
            port,
            _dir: dir,
            _child: child,
        };
        // Until it knows the replica (from the primary's INFO); no event
        // to await from a child process.
        loop {
            if let Ok(replicas) = sentinel.replicas().await
                && !replicas.is_empty()
            {
                return sentinel;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn replicas(&self) -> redis::RedisResult<Vec<redis::Value>> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg("mymaster")
            .query_async(&mut conn)
            .await
    }
}

#[tokio::test]
async fn redis_sentinel_failover_keeps_replicated_messages() {
    tokio::time::timeout(LIMIT, async {
        let mut primary = RedisServer::builder()
            .args(["--repl-diskless-sync-delay", "0"])
            .start()
            .await
            .unwrap();
        let port = primary.port().to_string();
        let replica = RedisServer::builder()
            .args(["--replicaof", "127.0.0.1", port.as_str()])
            .start()
            .await
            .unwrap();
        // Online only after the initial sync.
        while !primary
            .raw_command(&["INFO", "replication"])
            .await
            .unwrap()
            .contains("state=online")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sentinel = Sentinel::start(primary.port()).await;
        let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port);

        // waitReplicas 1: acknowledged only once the replica has it.
        let b = open(&redis_config(&url, 1, Duration::from_secs(2))).await;
        let msg = message("m1", &["a@x.org", "b@y.org"], T);
        b.queue.enqueue(msg.clone(), Vec::new()).await.unwrap();

        primary.kill().await.unwrap();
        // The Sentinel promotes the replica; the backend finds it again.
        while b.queue.message_data("m1").await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(b.queue.message_data("m1").await.unwrap(), msg.data);
        assert!(
            replica
                .raw_command(&["ROLE"])
                .await
                .unwrap()
                .contains("master")
        );
        // No replica is left, so waitReplicas 1 cannot be met now...
        assert!(matches!(
            b.queue
                .enqueue(message("m2", &["a@x.org"], T), Vec::new())
                .await,
            Err(QueueError::NotReplicated {
                acked: 0,
                wanted: 1
            })
        ));
        // ...but the promoted primary takes writes.
        let relaxed = open(&redis_config(&url, 0, Duration::from_secs(2))).await;
        relaxed
            .queue
            .enqueue(message("m3", &["c@z.org"], T), Vec::new())
            .await
            .unwrap();
        let units = units_by_message(&relaxed, T).await;
        assert_eq!(units.get("m1"), Some(&2));
        assert_eq!(units.get("m3"), Some(&1));
        assert!(
            !units.contains_key("m2"),
            "the unreplicated message was rolled back"
        );
    })
    .await
    .expect("test timed out");
}

// ------------------------------------------------------------- partitions

fn partitioned(url: &str, prefix: &str, partitions: u32) -> QueueConfig {
    let mut config = redis_config(url, 0, Duration::from_secs(10));
    let redis = config.redis.as_mut().unwrap();
    redis.key_prefix = prefix.into();
    redis.partitions = partitions;
    config
}

/// Leases and completes everything due at `now`; the message ids done.
async fn drain(b: &Backend, now: Millis) -> Vec<String> {
    let mut done = Vec::new();
    loop {
        let leased = b.queue.lease_with_data(now, 100, MINUTE).await.unwrap();
        if leased.is_empty() {
            done.sort();
            return done;
        }
        for l in leased {
            assert!(l.data.is_some(), "no bytes for {}", l.lease.unit.id);
            b.queue.complete(&l.lease).await.unwrap();
            done.push(l.lease.unit.id);
        }
    }
}

#[tokio::test]
async fn redis_cluster_spreads_queued_messages_over_every_master() {
    tokio::time::timeout(LIMIT, async {
        let nodes = start_cluster().await;
        let url = format!("redis+cluster://127.0.0.1:{}", nodes[0].port());
        let b = open(&partitioned(&url, "petrel", 16)).await;
        const MESSAGES: usize = 3_000;
        let mut tasks = Vec::new();
        for c in 0..20 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                for i in (c..MESSAGES).step_by(20) {
                    let m = message(&format!("spread-{i}"), &["a@x.org"], T);
                    b.queue.enqueue(m, Vec::new()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(b.queue.stats(T).await.unwrap().messages, MESSAGES as u64);
        // Messages per master: the `data` hashes of the partitions it holds.
        let mut per_node = Vec::new();
        for node in &nodes {
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut keys: Vec<String> = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("{petrel:*}:data")
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let mut held = 0u64;
            for key in keys {
                let n: u64 = redis::cmd("HLEN")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                held += n;
            }
            per_node.push(held);
        }
        println!("messages per master: {per_node:?}");
        assert_eq!(per_node.iter().sum::<u64>(), MESSAGES as u64);
        for held in &per_node {
            let share = *held as f64 / MESSAGES as f64;
            assert!(
                (0.2333..=0.4333).contains(&share),
                "a master holds {:.1}% of the messages: {per_node:?}",
                share * 100.0
            );
        }
        // And the queue, spread, still delivers every one of them.
        assert_eq!(drain(&b, T).await.len(), MESSAGES);
    })
    .await
    .expect("test timed out");
}

/// Writes `message` as the single-tag layout of before partitions did
/// (script ENQUEUE on `{prefix}` keys), with one `accepted` event.
async fn write_legacy(conn: &mut redis::aio::MultiplexedConnection, prefix: &str, m: &NewMessage) {
    let units = queue::units_of(m);
    let k = |name: &str| format!("{{{prefix}}}:{name}");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset(k("data"), &m.id, &m.data)
        .hset(k("left"), &m.id, units.len())
        .zadd(k("received"), &m.id, m.received_at);
    for unit in &units {
        pipe.hset(k("unit"), &unit.id, serde_json::to_vec(unit).unwrap())
            .zadd(k("due"), &unit.id, unit.next_attempt_at);
    }
    let accepted = event(EventType::Accepted, &m.recipients[0]);
    pipe.cmd("XADD")
        .arg(k("events"))
        .arg("*")
        .arg("e")
        .arg(serde_json::to_vec(&accepted).unwrap());
    let () = pipe.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn redis_relay_drains_the_single_tag_layout_then_uses_partitions() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start().await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let old = [
            message("old-1", &["a@x.org", "b@y.org"], T),
            message("old-2", &["c@x.org"], T),
        ];
        for m in &old {
            write_legacy(&mut conn, "petrel-test", m).await;
        }

        let b = open(&partitioned(&server.url(), "petrel-test", 16)).await;
        b.queue
            .enqueue(message("new-1", &["d@x.org"], T), Vec::new())
            .await
            .unwrap();
        let stats = b.queue.stats(T).await.unwrap();
        assert_eq!((stats.messages, stats.due), (3, 4));
        let listed: Vec<String> = b
            .control
            .units(T)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.unit.id)
            .collect();
        assert_eq!(listed.len(), 4);
        // The old events reach readers like the new ones.
        assert_eq!(b.events.read(None, 10).await.unwrap().len(), 2);
        b.events.ensure_group("webhook:a").await.unwrap();
        assert_eq!(b.events.backlog("webhook:a").await.unwrap().pending, 2);

        // Leased with their bytes and settled where they are.
        let done = drain(&b, T).await;
        assert_eq!(
            done,
            vec!["new-1:x.org", "old-1:x.org", "old-1:y.org", "old-2:x.org"]
        );
        assert_eq!(b.queue.stats(T).await.unwrap(), Default::default());
        // Nothing of the old layout's queue is left behind; the new
        // message went to its partition, not to the old keys.
        for name in ["data", "left", "received", "unit", "due", "leased", "token"] {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{{petrel-test}}:{name}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!exists, "{{petrel-test}}:{name} is still there");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn redis_changing_partitions_strands_nothing() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start().await.unwrap();
        // 16 -> 4: a pod with the new count next to (or after) one with
        // the old, messages queued under both.
        let sixteen = open(&partitioned(&server.url(), "shrink", 16)).await;
        for i in 0..40 {
            let m = message(&format!("a{i}"), &["r@x.org"], T);
            sixteen.queue.enqueue(m, Vec::new()).await.unwrap();
        }
        let four = open(&partitioned(&server.url(), "shrink", 4)).await;
        for i in 0..40 {
            let m = message(&format!("b{i}"), &["r@x.org"], T);
            four.queue.enqueue(m, Vec::new()).await.unwrap();
        }
        // The pod with 4 counts, lists and leases all 16 partitions.
        assert_eq!(four.queue.stats(T).await.unwrap().messages, 80);
        assert_eq!(four.control.units(T).await.unwrap().len(), 80);
        let mut want: Vec<String> = (0..40)
            .flat_map(|i| [format!("a{i}:x.org"), format!("b{i}:x.org")])
            .collect();
        want.sort();
        assert_eq!(drain(&four, T).await, want);
        assert_eq!(sixteen.queue.stats(T).await.unwrap().messages, 0);

        // 1 -> 16.
        let one = open(&partitioned(&server.url(), "grow", 1)).await;
        for i in 0..30 {
            let m = message(&format!("c{i}"), &["r@x.org"], T);
            one.queue.enqueue(m, Vec::new()).await.unwrap();
        }
        let grown = open(&partitioned(&server.url(), "grow", 16)).await;
        for i in 0..30 {
            let m = message(&format!("d{i}"), &["r@x.org"], T);
            grown.queue.enqueue(m, Vec::new()).await.unwrap();
        }
        assert_eq!(grown.queue.stats(T).await.unwrap().messages, 60);
        // And back to 1 in a pod started later: it still sees all 16.
        let back = open(&partitioned(&server.url(), "grow", 1)).await;
        assert_eq!(back.queue.stats(T).await.unwrap().messages, 60);
        let mut want: Vec<String> = (0..30)
            .flat_map(|i| [format!("c{i}:x.org"), format!("d{i}:x.org")])
            .collect();
        want.sort();
        assert_eq!(drain(&back, T).await, want);
        assert_eq!(grown.queue.stats(T).await.unwrap().messages, 0);
    })
    .await
    .expect("test timed out");
}
