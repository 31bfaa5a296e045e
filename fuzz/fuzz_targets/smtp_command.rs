//! SMTP command lines as the relay's session parses them: each line (up to
//! and including LF) through smtp-proto's `Request::parse`, and MAIL/RCPT
//! lines through the relay's own `raw_path` extraction.
//!
//! Properties: no panic; `raw_path` returns a strict sub-slice of its line.

#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_relay::inbound::envelope::raw_path;
use smtp_proto::Request;

fuzz_target!(|data: &[u8]| {
    for line in data.split_inclusive(|&b| b == b'\n') {
        let _ = Request::parse(&mut line.iter());
        if let Some(path) = raw_path(line) {
            assert!(path.len() < line.len());
        }
    }
});
