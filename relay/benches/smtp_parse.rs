//! SMTP command parsing as the inbound session does it: smtp-proto's
//! `Request::parse` on one line, plus the relay's raw-path extraction for
//! MAIL/RCPT. Run: `cargo bench -p petrel-relay --bench smtp_parse`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use petrel_relay::inbound::envelope::raw_path;
use smtp_proto::Request;

const LINES: &[(&str, &[u8])] = &[
    ("ehlo", b"EHLO client.example.test\r\n"),
    (
        "mail",
        b"MAIL FROM:<sender@example.test> SIZE=20480 BODY=8BITMIME\r\n",
    ),
    (
        "rcpt",
        b"RCPT TO:<recipient.name@example.net> NOTIFY=FAILURE,DELAY\r\n",
    ),
    (
        "rcpt_quoted",
        b"RCPT TO:<\"odd local part\"@example.net>\r\n",
    ),
    ("data", b"DATA\r\n"),
    (
        "garbage",
        b"\x00\xffGARBAGE that is not a command at all\r\n",
    ),
];

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp_command");
    for (name, line) in LINES {
        group.throughput(Throughput::Bytes(line.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                let line = black_box(*line);
                let parsed = Request::parse(&mut line.iter()).is_ok();
                (parsed, raw_path(line).map(str::len))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
