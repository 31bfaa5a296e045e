//! Fault: `kill -9` one of two relays while it is delivering.
//!
//! Every message a client got 250 for must reach the destination at least
//! once (the dead relay's leases expire and the survivor delivers) and at
//! most twice (a delivery in flight at the kill may be repeated); none lost.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

use std::time::Duration;

use petrel_tests::bench::scenario::{Scenario, accepted_ids, refused_ids};
use petrel_tests::bench::verify::verify;
use petrel_tests::redis::Persistence;

// Generous: on a loaded 2-core machine the debug-built survivor needs a
// while to drain the dead relay's share once its leases expire.
const LIMIT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_kill9_one_of_two_relays_mid_delivery_loses_nothing() {
    tokio::time::timeout(LIMIT, async {
        let mut s = Scenario::start(2, Persistence::AofAlways, |_| {})
            .await
            .expect("scenario");
        // 1500 messages over two relays take long enough that the kill
        // lands while both are still accepting and delivering.
        let total = 1500;
        let sender = {
            let targets = s.targets();
            tokio::spawn(async move {
                let mut plan = petrel_tests::bench::inject::Plan::new(targets, total, 20);
                plan.run_id = "kill".into();
                plan.io_timeout = Duration::from_secs(10);
                petrel_tests::bench::inject::run(plan).await
            })
        };
        // Kill relay 0 once delivery is well under way.
        assert!(
            s.sink
                .wait_for(total / 5, total / 5, Duration::from_secs(60))
                .await,
            "nothing delivered before the kill:\n{}",
            s.logs()
        );
        s.relays[0].kill().await.expect("kill -9 relay 0");
        let report = sender.await.expect("injector");
        let accepted = accepted_ids(&report);
        // Clients of the dead relay fail fast and use up the remaining
        // messages, so only what was accepted before the kill is certain.
        assert!(
            accepted.len() as u64 >= total / 5,
            "too few accepted ({}): {:?}",
            accepted.len(),
            report.failed.first()
        );
        // The survivor delivers everything, including units leased by the
        // dead relay once their 10 s lease expires.
        let n = accepted.len() as u64;
        let all = s
            .sink
            .wait_for_ids(&accepted, Duration::from_secs(150))
            .await;
        let arrivals = s.sink.arrivals();
        let verdict = verify(&accepted, &[], &arrivals, 1, 2);
        eprintln!(
            "kill -9: {} accepted, {} refused, {} failed at the client; {} delivered, {} twice",
            accepted.len(),
            refused_ids(&report).len(),
            report.failed.len(),
            arrivals.len(),
            arrivals.values().filter(|a| a.deliveries > 1).count()
        );
        assert!(
            all && verdict.is_clean(),
            "after kill -9: {} (sink has {} of {n}); refused {}\n{}",
            verdict.summary(),
            s.sink.unique(),
            refused_ids(&report).len(),
            s.logs()
        );
        assert!(s.relays[1].is_running(), "survivor died:\n{}", s.logs());
    })
    .await
    .expect("test timed out");
}
