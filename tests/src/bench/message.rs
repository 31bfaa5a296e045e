//! Test messages that carry their own identity and send time.
//!
//! Every injected message has an `X-Bench-Id` header (unique per run) and an
//! `X-Bench-Sent` header (microseconds since the Unix epoch when the client
//! started sending it). The sink reads both back, so delivery can be proven
//! per message and accept-to-delivered latency measured across processes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header naming the message uniquely within a run.
pub const ID_HEADER: &str = "X-Bench-Id";
/// Header with the send time, microseconds since the Unix epoch.
pub const SENT_HEADER: &str = "X-Bench-Sent";

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Time elapsed since `micros` (a [`now_micros`] stamp), zero if in the future.
pub fn since_micros(micros: u64) -> Duration {
    Duration::from_micros(now_micros().saturating_sub(micros))
}

/// A message of about `size` bytes (headers included) in wire form: CRLF
/// lines, no line starting with `.`, without the terminating `.` line.
pub fn build(id: &str, from: &str, to: &[String], size: usize, sent_micros: u64) -> Vec<u8> {
    let mut out = String::with_capacity(size + 512);
    out.push_str(&format!("From: <{from}>\r\n"));
    out.push_str(&format!(
        "To: {}\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(&format!("Subject: petrel bench {id}\r\n"));
    out.push_str("Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n");
    out.push_str(&format!("Message-ID: <{id}@bench.test>\r\n"));
    out.push_str(&format!("{ID_HEADER}: {id}\r\n"));
    out.push_str(&format!("{SENT_HEADER}: {sent_micros}\r\n"));
    out.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n");
    const LINE: &str =
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen.\r\n";
    while out.len() + LINE.len() <= size {
        out.push_str(LINE);
    }
    if out.len() < size {
        let pad = size - out.len();
        if pad > 2 {
            out.push_str(&"x".repeat(pad - 2));
            out.push_str("\r\n");
        }
    }
    out.into_bytes()
}

/// Reads `X-Bench-Id` and `X-Bench-Sent` from one header line (without CRLF).
/// Header names are matched case-insensitively, as relays may re-fold them.
pub fn parse_header(line: &[u8]) -> Option<BenchHeader<'_>> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, rest) = line.split_at(colon);
    let value = std::str::from_utf8(&rest[1..]).ok()?.trim();
    if name.eq_ignore_ascii_case(ID_HEADER.as_bytes()) {
        Some(BenchHeader::Id(value))
    } else if name.eq_ignore_ascii_case(SENT_HEADER.as_bytes()) {
        value.parse().ok().map(BenchHeader::Sent)
    } else {
        None
    }
}

/// One of the two bench headers, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum BenchHeader<'a> {
    /// The message id.
    Id(&'a str),
    /// The send time in microseconds since the epoch.
    Sent(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_message_has_requested_size_and_headers() {
        for size in [300, 1024, 20 * 1024] {
            let m = build(
                "run-1",
                "a@example.test",
                &["b@example.net".into()],
                size,
                42,
            );
            assert!(
                m.len() <= size && m.len() + 2 >= size,
                "size {size}: {}",
                m.len()
            );
            let text = String::from_utf8(m).unwrap();
            assert!(text.ends_with("\r\n"));
            assert!(!text.split("\r\n").any(|l| l.starts_with('.')));
            assert!(text.contains("X-Bench-Id: run-1\r\n"));
        }
    }

    #[test]
    fn parses_bench_headers() {
        assert_eq!(
            parse_header(b"X-Bench-Id: r-7"),
            Some(BenchHeader::Id("r-7"))
        );
        assert_eq!(
            parse_header(b"x-bench-sent:  123"),
            Some(BenchHeader::Sent(123))
        );
        assert_eq!(parse_header(b"X-Bench-Sent: nope"), None);
        assert_eq!(parse_header(b"Subject: X-Bench-Id: 1"), None);
        assert_eq!(parse_header(b"no colon"), None);
    }
}
