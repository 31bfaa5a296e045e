//! DATA reading as the inbound session does it: smtp-proto's
//! `DataReceiver` (dot-unstuffing, end at CRLF.CRLF) fed in 16 KiB reads,
//! then the relay's header preparation (Received, Message-ID, Date).
//! Run: `cargo bench -p petrel-relay --bench data_read`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use petrel_relay::inbound::headers::{self, TraceInfo};
use smtp_proto::request::receiver::DataReceiver;

/// A message of `size` bytes on the wire, ending with the `.` line; one line
/// in 20 starts with a dot to exercise unstuffing.
fn wire_message(size: usize) -> Vec<u8> {
    let mut m = b"From: <a@example.test>\r\nTo: <b@example.net>\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        if i % 20 == 0 {
            m.extend_from_slice(b"..a line that starts with a dot, stuffed by the client\r\n");
        } else {
            m.extend_from_slice(b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n");
        }
        i += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn read(wire: &[u8]) -> Vec<u8> {
    let mut receiver = DataReceiver::new();
    let mut out = Vec::with_capacity(wire.len());
    for chunk in wire.chunks(16 * 1024) {
        let mut iter = chunk.iter();
        if receiver.ingest(&mut iter, &mut out) {
            break;
        }
    }
    out
}

fn data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_read");
    let trace = TraceInfo {
        helo: "client.example.test",
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        hostname: "relay.example.test",
        protocol: "ESMTP",
        tls: None,
        id: "0123456789abcdef",
        date: "Mon, 23 Nov 2026 12:00:00 +0000",
    };
    for size in [1024usize, 20 * 1024, 1024 * 1024] {
        let wire = wire_message(size);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("receive", size), &wire, |b, wire| {
            b.iter(|| read(black_box(wire)))
        });
        group.bench_with_input(
            BenchmarkId::new("receive_and_prepare", size),
            &wire,
            |b, wire| b.iter(|| headers::prepare(read(black_box(wire)), &trace)),
        );
    }
    group.finish();
}

criterion_group!(benches, data);
criterion_main!(benches);
