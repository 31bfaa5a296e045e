//! Fault: DNS answers SERVFAIL or nothing at all for the destination's MX.
//! Both are temporary: messages are deferred (no DSN) and delivered once
//! DNS answers again.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

use std::net::Ipv4Addr;
use std::time::Duration;

use petrel_crds::config::Duration as CfgDuration;
use petrel_tests::bench::relay::Destination;
use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::bench::verify::verify;
use petrel_tests::dns::{DnsServer, Failure};
use petrel_tests::redis::Persistence;

const LIMIT: Duration = Duration::from_secs(120);
const MESSAGES: u64 = 5;
const DOMAIN: &str = "example.net";

async fn deferred_on_dns_failure(failure: Failure, run_id: &str) {
    let dns = DnsServer::start().await.expect("dns");
    dns.set_failure(DOMAIN, failure);
    // The sender's domain resolves to the sink, so a (wrong) DSN would show.
    dns.add_a("mx.example.net", Ipv4Addr::LOCALHOST);
    dns.add_mx("example.test", 10, "mx.example.net");
    let ns = dns.addr();
    let s = Scenario::start_with(
        1,
        Persistence::None,
        |sink| Destination::Mx {
            port: sink.port(),
            nameservers: vec![ns],
        },
        |c| c.delivery.retry_schedule = vec![CfgDuration::from_secs(1)],
    )
    .await
    .expect("scenario");

    let report = s.send(run_id, MESSAGES, 1, 1).await;
    let accepted = accepted_ids(&report);
    assert_eq!(
        accepted.len() as u64,
        MESSAGES,
        "inbound refused: {:?}",
        report.transient.first()
    );

    // Wait until the relay has asked about the domain at least twice: a
    // first attempt and a retry, both failing. No event to await on a
    // foreign resolver: poll the server's query log.
    let asked = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let n = dns
                .queries()
                .iter()
                .filter(|(name, _)| name.trim_end_matches('.').eq_ignore_ascii_case(DOMAIN))
                .count();
            if n >= 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    assert!(
        asked,
        "{failure:?}: relay never retried the MX lookup:\n{}",
        s.logs()
    );
    assert_eq!(s.sink.unique(), 0);

    // Records first, then lift the failure: never a moment of NXDOMAIN.
    dns.add_mx(DOMAIN, 10, "mx.example.net");
    dns.clear_failure(DOMAIN);
    let all = s
        .sink
        .wait_for(MESSAGES, MESSAGES, Duration::from_secs(45))
        .await;
    let verdict = verify(&accepted, &[], &s.sink.arrivals(), 1, 2);
    assert!(
        all && verdict.is_clean(),
        "{failure:?}: {}\n{}",
        verdict.summary(),
        s.logs()
    );
    // Deferred, not bounced: a DSN to sender@example.test would reach the
    // sink (example.test's MX) without an X-Bench-Id.
    assert_eq!(
        s.sink.anonymous(),
        0,
        "{failure:?}: DSN sent for a DNS failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_dns_servfail_defers_then_delivers() {
    tokio::time::timeout(
        LIMIT,
        deferred_on_dns_failure(Failure::ServFail, "servfail"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_dns_timeout_defers_then_delivers() {
    tokio::time::timeout(
        LIMIT,
        deferred_on_dns_failure(Failure::Timeout, "dnstimeout"),
    )
    .await
    .expect("test timed out");
}
