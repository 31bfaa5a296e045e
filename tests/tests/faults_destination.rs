//! Fault: the destination misbehaves (drops the connection mid-DATA,
//! answers 421, stalls past the relay's timeout). Messages are deferred and
//! retried, not bounced, and delivered once the destination recovers.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

use std::time::Duration;

use petrel_crds::config::Duration as CfgDuration;
use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::bench::sink::Behavior;
use petrel_tests::bench::verify::verify;
use petrel_tests::redis::Persistence;

const LIMIT: Duration = Duration::from_secs(90);
const MESSAGES: u64 = 10;

/// Fails the destination with `behavior`, sends, waits for the relay to have
/// tried, recovers the destination, and checks every message arrived. With
/// `chunking` the destination offers CHUNKING, so the relay sends BDAT and
/// the failure hits `BDAT ... LAST` instead of the end of DATA.
async fn deferred_then_delivered(behavior: Behavior, chunking: bool, run_id: &str) {
    let s = Scenario::start(1, Persistence::None, |c| {
        c.delivery.retry_schedule = vec![CfgDuration::from_secs(1)];
        // Stalls are cut by the relay's data timeout.
        c.delivery.timeouts.data = CfgDuration::from_secs(2);
        c.delivery.timeouts.command = CfgDuration::from_secs(2);
        c.delivery.timeouts.greeting = CfgDuration::from_secs(2);
    })
    .await
    .expect("scenario");
    s.sink.set_chunking(chunking);
    s.sink.set_behavior(behavior);
    let report = s.send(run_id, MESSAGES, 2, 2).await;
    let accepted = accepted_ids(&report);
    assert_eq!(
        accepted.len() as u64,
        MESSAGES,
        "inbound refused: {:?} {:?}",
        report.transient.first(),
        report.failed.first()
    );

    // Let the relay hit the failure at least twice (first try + a retry).
    assert!(
        s.sink.wait_attempts(2, Duration::from_secs(30)).await,
        "relay never tried the destination:\n{}",
        s.logs()
    );
    assert_eq!(
        s.sink.unique(),
        0,
        "delivered while the destination was failing?"
    );

    s.sink.set_behavior(Behavior::Accept);
    let all = s
        .sink
        .wait_for(MESSAGES, MESSAGES * 2, Duration::from_secs(45))
        .await;
    let verdict = verify(&accepted, &[], &s.sink.arrivals(), 2, 2);
    assert!(
        all && verdict.is_clean(),
        "{behavior:?}: {}; {} of {MESSAGES} arrived\n{}",
        verdict.summary(),
        s.sink.unique(),
        s.logs()
    );
    // Every attempt that got as far as the message used BDAT when offered.
    if chunking {
        assert!(s.sink.chunked() >= MESSAGES, "{behavior:?}: no BDAT");
    } else {
        assert_eq!(s.sink.chunked(), 0);
    }
    // Deferred, not bounced: no DSN went to the sender (it would arrive at
    // the same sink, without an X-Bench-Id).
    assert_eq!(
        s.sink.anonymous(),
        0,
        "{behavior:?}: a DSN was sent for a temporary failure"
    );
    let _ = s;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_drops_mid_data_then_recovers() {
    tokio::time::timeout(
        LIMIT,
        deferred_then_delivered(Behavior::DropMidData, false, "drop"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_answers_421_after_data_then_recovers() {
    tokio::time::timeout(
        LIMIT,
        deferred_then_delivered(Behavior::Reply421AfterData, false, "r421"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_greets_421_then_recovers() {
    tokio::time::timeout(
        LIMIT,
        deferred_then_delivered(Behavior::Greeting421, false, "g421"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_stalls_past_timeout_then_recovers() {
    tokio::time::timeout(
        LIMIT,
        deferred_then_delivered(Behavior::StallAfterData, false, "stall"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_451_after_data_then_recovers() {
    tokio::time::timeout(
        LIMIT,
        deferred_then_delivered(Behavior::TempFailAfterData, false, "t451"),
    )
    .await
    .expect("test timed out");
}

/// The same failures at a destination that offers CHUNKING: the relay's
/// BDAT transaction is deferred and retried like a DATA one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_destination_over_bdat_defers_then_delivers() {
    tokio::time::timeout(LIMIT * 4, async {
        for (behavior, run_id) in [
            (Behavior::DropMidData, "bdat-drop"),
            (Behavior::Reply421AfterData, "bdat-r421"),
            (Behavior::StallAfterData, "bdat-stall"),
            (Behavior::TempFailAfterData, "bdat-t451"),
        ] {
            deferred_then_delivered(behavior, true, run_id).await;
        }
    })
    .await
    .expect("test timed out");
}
