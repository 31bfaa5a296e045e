//! DKIM signing per message size, ed25519-sha256 against rsa-sha256 (2048
//! bit), through the relay's `DkimKeys` (keys cached after the first use).
//! The RSA key is generated with the `openssl` CLI at start; the ed25519 key
//! is the quick start's example key.
//! Run: `cargo bench -p petrel-relay --bench dkim_sign`.

use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use petrel_relay::config::{DkimAlgorithm, DkimConfig};
use petrel_relay::dkim::DkimKeys;

const ED25519_KEY: &str = include_str!("../../examples/local/dkim-example.test.key");

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: <a@example.test>\r\nTo: <b@example.net>\r\nSubject: bench\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <x@example.test>\r\n\r\n".to_vec();
    while m.len() < size {
        m.extend_from_slice(b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n");
    }
    m
}

fn rsa_key(dir: &Path) -> Option<std::path::PathBuf> {
    let path = dir.join("rsa.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(path)
}

fn sign(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ed_path = dir.path().join("ed25519.pem");
    std::fs::write(&ed_path, ED25519_KEY).expect("write key");
    let mut configs = vec![(
        "ed25519",
        DkimConfig {
            selector: "example".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: ed_path,
        },
    )];
    match rsa_key(dir.path()) {
        Some(path) => configs.push((
            "rsa2048",
            DkimConfig {
                selector: "example".into(),
                algorithm: DkimAlgorithm::Rsa2048,
                key_file: path,
            },
        )),
        None => eprintln!("openssl not available: skipping rsa2048"),
    }
    let mut group = c.benchmark_group("dkim_sign");
    for size in [1024usize, 20 * 1024, 1024 * 1024] {
        let msg = message(size);
        group.throughput(Throughput::Bytes(msg.len() as u64));
        for (name, config) in &configs {
            let keys = DkimKeys::new();
            keys.sign("example.test", config, &msg)
                .expect("first signature");
            group.bench_with_input(BenchmarkId::new(*name, size), &msg, |b, msg| {
                b.iter(|| keys.sign("example.test", config, black_box(msg)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sign);
criterion_main!(benches);
