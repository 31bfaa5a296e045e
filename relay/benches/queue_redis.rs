//! The Redis queue's hot path against a real `redis-server` (spawned here on
//! a free port, AOF everysec as in production), per 1 KB message: enqueue;
//! lease + message bytes; settle. Lease and settle are timed per message in
//! batches of 100, both ways: one call per message (`lease` then
//! `message_data` each, `complete` each) and batched (`lease_with_data`,
//! one `settle_many`); with 1 and 16 partitions. Only the phase named is
//! timed (the queue is filled and drained around it untimed).
//! Run: `cargo bench -p petrel-relay --bench queue_redis` (needs
//! `redis-server` on PATH).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use petrel_relay::config::RedisQueue;
use petrel_relay::queue::redis::RedisBackend;
use petrel_relay::queue::{
    Lease, MessageFlags, NewMessage, Queue, SettleOp, Settlement, now_millis,
};

/// The server and its data dir (removed when dropped, after the kill).
struct Redis {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<(Redis, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = tempfile::tempdir().ok()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "everysec"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis { child, _dir: dir };
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((redis, port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn message(id: u64) -> NewMessage {
    NewMessage {
        id: format!("bench-{id}"),
        mail_from: "sender@example.test".into(),
        recipients: vec!["rcpt@example.net".into()],
        data: vec![b'x'; 1024],
        sending_domain: "example.test".into(),
        received_at: now_millis(),
        flags: MessageFlags::default(),
        tags: Default::default(),
        header_message_id: None,
    }
}

/// Messages per timed lease or settle round.
const BATCH: u64 = 100;
const LEASE_FOR: Duration = Duration::from_secs(60);

/// Enqueues `n` fresh messages (untimed set-up).
async fn fill(backend: &RedisBackend, next: &AtomicU64, n: u64) {
    for _ in 0..n {
        let id = next.fetch_add(1, Ordering::Relaxed);
        backend
            .enqueue(message(id), Vec::new())
            .await
            .expect("enqueue");
    }
}

/// Runs `iters` messages through `round` in batches of [`BATCH`] and adds
/// up the time each round reports.
async fn timed<F, Fut>(iters: u64, mut round: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Duration>,
{
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        left -= n;
        total += round(n).await;
    }
    total
}

async fn lease_all(backend: &RedisBackend, n: u64) -> Vec<Lease> {
    backend
        .lease(now_millis() + 1000, n as usize, LEASE_FOR)
        .await
        .expect("lease")
}

fn queue(c: &mut Criterion) {
    let Some((_redis, port)) = start_redis() else {
        eprintln!("redis-server not available: skipping queue benches");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let next = AtomicU64::new(0);
    for partitions in [1u32, 16] {
        let config = RedisQueue {
            url: Some(format!("redis://127.0.0.1:{port}")),
            url_file: None,
            key_prefix: format!("bench-{partitions}"),
            wait_replicas: 0,
            partitions,
        };
        let backend = rt
            .block_on(RedisBackend::open(&config, Duration::from_secs(5)))
            .expect("open redis queue");
        let (backend, next) = (&backend, &next);
        let mut group = c.benchmark_group(format!("queue_redis/partitions_{partitions}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(4));
        group.bench_function("enqueue_1k", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    fill(backend, next, iters).await;
                    let spent = started.elapsed();
                    // Drained untimed, so the next bench starts empty.
                    timed(iters, |n| async move {
                        for l in lease_all(backend, n).await {
                            backend.complete(&l).await.expect("complete");
                        }
                        Duration::ZERO
                    })
                    .await;
                    spent
                })
            })
        });
        group.bench_function("lease_data_1k/per_message", |b| {
            b.iter_custom(|iters| {
                rt.block_on(timed(iters, |n| async move {
                    fill(backend, next, n).await;
                    let started = Instant::now();
                    let leases = lease_all(backend, n).await;
                    for l in &leases {
                        backend
                            .message_data(&l.unit.message_id)
                            .await
                            .expect("data");
                    }
                    let spent = started.elapsed();
                    for l in &leases {
                        backend.complete(l).await.expect("complete");
                    }
                    spent
                }))
            })
        });
        group.bench_function("lease_data_1k/batched", |b| {
            b.iter_custom(|iters| {
                rt.block_on(timed(iters, |n| async move {
                    fill(backend, next, n).await;
                    let started = Instant::now();
                    let leased = backend
                        .lease_with_data(now_millis() + 1000, n as usize, LEASE_FOR)
                        .await
                        .expect("lease");
                    let spent = started.elapsed();
                    assert!(leased.iter().all(|l| l.data.is_some()));
                    for l in &leased {
                        backend.complete(&l.lease).await.expect("complete");
                    }
                    spent
                }))
            })
        });
        group.bench_function("settle_1k/per_message", |b| {
            b.iter_custom(|iters| {
                rt.block_on(timed(iters, |n| async move {
                    fill(backend, next, n).await;
                    let leases = lease_all(backend, n).await;
                    let started = Instant::now();
                    for l in &leases {
                        backend.complete(l).await.expect("complete");
                    }
                    started.elapsed()
                }))
            })
        });
        group.bench_function("settle_1k/batched", |b| {
            b.iter_custom(|iters| {
                rt.block_on(timed(iters, |n| async move {
                    fill(backend, next, n).await;
                    let batch: Vec<(Lease, Settlement)> = lease_all(backend, n)
                        .await
                        .into_iter()
                        .map(|l| (l, Settlement::only(SettleOp::Complete)))
                        .collect();
                    let started = Instant::now();
                    let results = backend.settle_many(&batch).await;
                    let spent = started.elapsed();
                    assert!(results.iter().all(Result::is_ok));
                    spent
                }))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, queue);
criterion_main!(benches);
