//! The Redis queue's hot path against a real `redis-server` (spawned here on
//! a free port, AOF everysec as in production): enqueue alone, and the full
//! enqueue -> lease -> complete round trip of one 1 KB message.
//! Run: `cargo bench -p petrel-relay --bench queue_redis` (needs
//! `redis-server` on PATH).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use petrel_relay::config::RedisQueue;
use petrel_relay::queue::redis::RedisBackend;
use petrel_relay::queue::{MessageFlags, NewMessage, Queue, now_millis};

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

fn queue(c: &mut Criterion) {
    let Some((_redis, port)) = start_redis() else {
        eprintln!("redis-server not available: skipping queue benches");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = RedisQueue {
        url: Some(format!("redis://127.0.0.1:{port}")),
        url_file: None,
        key_prefix: "bench".into(),
        wait_replicas: 0,
        partitions: 16,
    };
    let backend = rt
        .block_on(RedisBackend::open(&config, Duration::from_secs(5)))
        .expect("open redis queue");
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("queue_redis");
    group.bench_function("enqueue_1k", |b| {
        b.iter(|| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            rt.block_on(backend.enqueue(message(id), Vec::new()))
                .expect("enqueue")
        })
    });
    // Drain what enqueue_1k left so the round trip leases its own unit.
    rt.block_on(async {
        loop {
            let leases = backend
                .lease(now_millis() + 1000, 1000, Duration::from_secs(60))
                .await
                .expect("lease");
            if leases.is_empty() {
                break;
            }
            for l in &leases {
                backend.complete(l).await.expect("complete");
            }
        }
    });
    group.bench_function("enqueue_lease_complete_1k", |b| {
        b.iter(|| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            rt.block_on(async {
                backend
                    .enqueue(message(id), Vec::new())
                    .await
                    .expect("enqueue");
                let leases = backend
                    .lease(now_millis() + 1000, 1, Duration::from_secs(60))
                    .await
                    .expect("lease");
                for l in &leases {
                    backend.complete(l).await.expect("complete");
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, queue);
criterion_main!(benches);
