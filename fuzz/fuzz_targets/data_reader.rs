//! The DATA reader: smtp-proto's `DataReceiver` (dot-unstuffing, end at
//! CRLF.CRLF), as the relay's session uses it, then the relay's header
//! preparation on what it produced.
//!
//! Properties: no panic; the result does not depend on how the input was
//! split into reads (a chunk boundary must never change where a message
//! ends: that is how SMTP smuggling works); output never exceeds input;
//! `normalize_crlf` leaves no bare LF.

#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_relay::inbound::headers;
use smtp_proto::request::receiver::DataReceiver;

/// Feeds `input` in `chunk`-sized reads; returns (message, consumed, ended).
fn read(input: &[u8], chunk: usize) -> (Vec<u8>, usize, bool) {
    let mut receiver = DataReceiver::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    for piece in input.chunks(chunk) {
        let mut iter = piece.iter();
        let done = receiver.ingest(&mut iter, &mut out);
        consumed += piece.len() - iter.len();
        if done {
            return (out, consumed, true);
        }
    }
    (out, consumed, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let whole = read(input, input.len().max(1));
    let split = read(input, chunk);
    assert_eq!(whole, split, "chunking changed the message (chunk {chunk})");
    let (message, consumed, _) = whole;
    assert!(message.len() <= consumed);

    let normalized = headers::normalize_crlf(message.clone());
    for (i, &b) in normalized.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && normalized[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    let hlen = headers::header_len(&normalized);
    assert!(hlen <= normalized.len());
    let _ = headers::has_header(&normalized[..hlen], "message-id");
});
