//! A destination limited by `delivery.perDestinationRate` with a backlog:
//! the units over the rate are postponed once each to a send time of their
//! own, not handed back every second, so the Redis work stays with the
//! rate, not the backlog. Counted with `INFO commandstats` of a real
//! redis-server; delivered to the SMTP sink.
//!
//! The ignored bench (`bench_throttled_backlog_redis_cpu`) measures Redis
//! CPU with 100,000 units waiting for a 10 msg/s destination.

mod delivery_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use petrel_relay::queue::{Backend, now_millis};
use petrel_tests::bench::procstat;
use petrel_tests::dns::DnsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config, until};

/// Calls of every command so far, from `INFO commandstats`.
async fn redis_calls(redis: &RedisServer) -> u64 {
    let info = redis
        .raw_command(&["INFO", "commandstats"])
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| {
            let calls = l.split("calls=").nth(1)?;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The redis-server's pid, from `INFO server`.
async fn redis_pid(redis: &RedisServer) -> u32 {
    let info = redis
        .raw_command(&["INFO", "server"])
        .await
        .expect("INFO server");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("process_id in INFO server")
}

/// Enqueues `n` one-recipient messages to dest.test.
async fn fill(backend: &Backend, n: usize) {
    for i in 0..n {
        let rcpt = format!("u{i}@dest.test");
        backend
            .queue
            .enqueue(
                message(&format!("m{i}"), "sender@example.test", &[&rcpt], "paced"),
                Vec::new(),
            )
            .await
            .expect("enqueue");
    }
}

/// 40 units at 4 per second take ten seconds to go out. Handed back every
/// second, each is leased about five times: measured, 84 Redis commands
/// per unit (`INFO commandstats` counts the commands inside the queue's
/// Lua scripts too). Paced, each is postponed once: 37 per unit.
#[tokio::test]
async fn a_throttled_backlog_is_postponed_once_per_unit_and_all_delivered() {
    const UNITS: usize = 40;
    const RATE: u32 = 4;
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.per_destination_rate = Some(RATE);
        config.delivery.workers = 64;
        // One partition: the count below is about re-leasing, and every
        // idle lease poll costs two ZCOUNTs per partition (with 16, that
        // poll cost alone is ~100 commands per unit over this run).
        if let Some(r) = config.queue.redis.as_mut() {
            r.partitions = 1;
        }
        let backend = petrel_relay::queue::open(&config.queue).await.unwrap();
        fill(&backend, UNITS).await;

        let before = redis_calls(&redis).await;
        let started = Instant::now();
        let relay = Relay::start(config).await;
        let got = sink.wait_for(UNITS, Duration::from_secs(45)).await;
        let elapsed = started.elapsed();
        assert_eq!(got.len(), UNITS, "all delivered in the end");
        let q = backend.queue.clone();
        assert!(
            until(Duration::from_secs(10), || {
                let q = q.clone();
                async move { q.stats(now_millis()).await.is_ok_and(|s| s.messages == 0) }
            })
            .await,
            "every unit settled"
        );
        let calls = redis_calls(&redis).await - before;
        let per_unit = calls as f64 / UNITS as f64;
        println!(
            "{UNITS} units at {RATE}/s: {calls} Redis commands ({per_unit:.1} per unit) in {elapsed:?}"
        );

        // Every unit but the first second's went through the line once.
        let places = relay
            .ctx
            .state
            .counter("rate:dest:dest.test:line")
            .await
            .unwrap();
        assert!(
            (UNITS as u64 - u64::from(RATE)..=UNITS as u64 + 5).contains(&places),
            "surplus units took a place in the line each: {places}"
        );
        // Paced, a unit costs two leases, its postponement, data, rate
        // check and settlement, plus its share of the idle polls while the
        // line runs (37 measured); handed back each second, 84.
        assert!(
            per_unit < 55.0,
            "{calls} Redis commands for {UNITS} units: the backlog was re-leased"
        );
        let m = &relay.ctx.metrics;
        assert_eq!(
            m.deferred
                .with_label_values(&["example.test", "other"])
                .get(),
            0,
            "waiting for the rate is not a failure"
        );
        assert_eq!(relay.delivered("example.test"), UNITS as u64);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The bench: 100,000 units to one destination limited to 10 msg/s. After
/// the first pass has given every unit its send time, Redis CPU is sampled
/// over `PETREL_PACING_SECONDS` (default 60) of steady state; the target is
/// under 5% of one core. Prints, asserts nothing about time.
///
/// `cargo test --release -p petrel-tests --test delivery_pacing -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench: minutes long; run by hand"]
async fn bench_throttled_backlog_redis_cpu() {
    const UNITS: usize = 100_000;
    const RATE: u32 = 10;
    let seconds: u64 = std::env::var("PETREL_PACING_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let redis = RedisServer::start().await.expect("redis");
    let pid = redis_pid(&redis).await;
    let dns = DnsServer::start().await.expect("dns");
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
    let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
    config.delivery.per_destination_rate = Some(RATE);
    config.delivery.workers = 256;
    let backend = petrel_relay::queue::open(&config.queue).await.unwrap();

    let t = Instant::now();
    let fillers: Vec<_> = (0..8)
        .map(|w| {
            let backend = backend.clone();
            tokio::spawn(async move {
                for i in (w..UNITS).step_by(8) {
                    let rcpt = format!("u{i}@dest.test");
                    backend
                        .queue
                        .enqueue(
                            message(&format!("m{i}"), "sender@example.test", &[&rcpt], "b"),
                            Vec::new(),
                        )
                        .await
                        .expect("enqueue");
                }
            })
        })
        .collect();
    for f in fillers {
        f.await.unwrap();
    }
    println!("enqueued {UNITS} units in {:?}", t.elapsed());

    let t = Instant::now();
    let relay = Relay::start(config).await;
    // First pass: every unit leased once and given its place. Bounded, so
    // a relay that never gets there (handing units back every second)
    // is measured too.
    let first_pass = Duration::from_secs(180);
    loop {
        let stats = backend.queue.stats(now_millis()).await.unwrap();
        if (stats.due == 0 && stats.leased == 0) || t.elapsed() > first_pass {
            println!(
                "first pass over after {:?}: {} due, {} leased, {} deferred, {} delivered",
                t.elapsed(),
                stats.due,
                stats.leased,
                stats.deferred,
                sink.received().len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let cpu0 = procstat::cpu_time(pid).expect("redis cpu");
    let calls0 = redis_calls(&redis).await;
    let sent0 = sink.received().len();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t0.elapsed();
    let cpu = procstat::cpu_time(pid).expect("redis cpu") - cpu0;
    let calls = redis_calls(&redis).await - calls0;
    let sent = sink.received().len() - sent0;
    println!(
        "steady state over {wall:.1?}: Redis CPU {:.2}% of a core ({cpu:?}), {:.0} commands/s, \
         {sent} delivered ({:.1}/s, limit {RATE}/s)",
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        calls as f64 / wall.as_secs_f64(),
        sent as f64 / wall.as_secs_f64(),
    );
    relay.stop().await;
}
