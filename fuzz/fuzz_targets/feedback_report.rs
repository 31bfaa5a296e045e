//! What the feedback listener does with a mail: RFC 3464 / RFC 5965
//! parsing (mail-parser for MIME, the field groups by hand) and the plan
//! (attribution, suppression, events) over arbitrary bytes.
//!
//! Properties: no panic; without a valid token (the fuzzer does not know
//! the key) nothing is attributed: no suppression entry, no event, no
//! unsubscribe.

#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_relay::config::RelayConfig;
use petrel_relay::feedback::FeedbackKeys;
use petrel_relay::feedback::receive::{Incoming, plan};
use petrel_relay::feedback::report::parse;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data);
    let config = RelayConfig::from_yaml(
        "hostname: relay.test\nlisteners: [{name: fb, address: \"127.0.0.1:2525\", tls: none, auth: none, role: feedback}]\ndomains:\n  - domain: example.test\n    returnPathDomain: bounces.example.test\n    dkim: {selector: s, algorithm: ed25519, keyFile: /dev/null}\nqueue: {embedded: {path: /tmp/q.redb}}\n",
    );
    let Ok(config) = config else { return };
    let keys = FeedbackKeys::from_secret(&[9u8; 32]);
    let recipients = vec!["b+abcdefghijklmnopqrstuvwxyz234567abcdefghij@bounces.example.test".to_string()];
    let p = plan(
        &keys,
        &config,
        Incoming {
            mail_from: "",
            recipients: &recipients,
            raw: data,
        },
        "relay-fuzz",
        0,
    );
    assert!(p.suppress.is_empty() && p.events.is_empty() && p.unsubscribe.is_none());
});
