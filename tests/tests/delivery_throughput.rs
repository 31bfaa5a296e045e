//! A measurement, not a test (`#[ignore]`, no assertion on time): messages
//! per second from a Redis queue through one relay's delivery workers to
//! the SMTP sink. Run with
//! `cargo test --release -p petrel-tests --test delivery_throughput -- --ignored --nocapture`.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{Relay, message, mx_config};

const MESSAGES: usize = 2000;
const DOMAINS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn delivered_messages_per_second() {
    measure(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn delivered_messages_per_second_with_starttls() {
    measure(true).await;
}

async fn measure(tls: bool) {
    let redis = RedisServer::start().await.expect("redis");
    let dns = DnsServer::start().await.expect("dns");
    for d in 0..DOMAINS {
        dns.add_mx(&format!("d{d}.test"), 10, "mx.dest.test");
    }
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    let sink = SmtpSink::builder().starttls(tls).start().await.unwrap();
    let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
    config.delivery.workers = 64;
    let backend = petrel_relay::queue::open(&config.queue).await.unwrap();
    for i in 0..MESSAGES {
        let rcpt = format!("u{i}@d{}.test", i % DOMAINS);
        backend
            .queue
            .enqueue(
                message(&format!("b{i}"), "sender@example.test", &[&rcpt], "bench"),
                Vec::new(),
            )
            .await
            .unwrap();
    }
    let start = Instant::now();
    let relay = Relay::start(config).await;
    let got = sink.wait_for(MESSAGES, Duration::from_secs(300)).await;
    let elapsed = start.elapsed();
    eprintln!(
        "tls={tls}: delivered {} of {MESSAGES} in {:.2}s: {:.0} messages/s over {} connections",
        got.len(),
        elapsed.as_secs_f64(),
        got.len() as f64 / elapsed.as_secs_f64(),
        sink.connections()
    );
    relay.stop().await;
}
