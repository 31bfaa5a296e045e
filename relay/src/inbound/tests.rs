//! Session tests over `tokio::io::duplex`, with an in-memory queue so each
//! case can look at exactly what was enqueued (the real backends are
//! exercised end to end in `tests/tests/inbound_*.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::watch;

use super::*;
use crate::config::{Listener, RelayConfig};
use crate::queue::*;

type Mem = crate::queue::memory::MemoryBackend;

struct Fixture {
    _dir: tempfile::TempDir,
    mem: Arc<Mem>,
    ctx: Arc<InboundContext>,
    shutdown: watch::Sender<bool>,
    public_key: Vec<u8>,
}

const PASSWORD: &str = "correct horse";

fn fixture(extra: &str) -> Fixture {
    use mail_auth::common::crypto::Ed25519Key;
    let dir = tempfile::tempdir().unwrap();
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let public_key = Ed25519Key::from_pkcs8_der(&der).unwrap().public_key();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    std::fs::write(
        dir.path().join("dkim.pem"),
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let hash = auth::hash_password(PASSWORD).unwrap();
    std::fs::write(
        dir.path().join("users"),
        format!("alice:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    let d = dir.path().display();
    let yaml = format!(
        r#"
hostname: relay.test
listeners: [{{name: smtp, address: "127.0.0.1:2525", auth: optional, allowInsecureAuth: true}}]
authUsersFile: {d}/users
trustedNetworks: ["10.0.0.0/8"]
queue: {{embedded: {{path: {d}/queue}}}}
domains:
  - domain: example.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/dkim.pem}}
  - domain: corp.test
    allowedUsers: [alice]
    onSuppressed: drop
    rateLimits: {{dailyQuota: 1}}
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/dkim.pem}}
  - domain: broken.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/missing.pem}}
{extra}"#
    );
    let config = RelayConfig::from_yaml(&yaml).unwrap();
    let mem = Arc::new(Mem::default());
    let (_, metrics) = crate::metrics::RelayMetrics::standalone();
    let ctx = InboundContext::new(Reloading::fixed(config), mem.clone(), mem.clone(), metrics)
        .unwrap()
        .with_events(mem.clone());
    let (shutdown, _) = watch::channel(false);
    Fixture {
        _dir: dir,
        mem,
        ctx: Arc::new(ctx),
        shutdown,
        public_key,
    }
}

struct Client {
    io: BufReader<DuplexStream>,
}

impl Client {
    /// Reads one (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                return if all.is_empty() { "EOF".into() } else { all };
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn send(&mut self, text: &str) {
        self.io.get_mut().write_all(text.as_bytes()).await.unwrap();
    }

    /// Sends a command and checks the reply starts with `want`.
    async fn cmd(&mut self, line: &str, want: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        let reply = self.reply().await;
        assert!(
            reply.starts_with(want),
            "{line:?}: wanted {want:?}, got {reply:?}"
        );
        reply
    }
}

impl Fixture {
    fn connect_from(&self, peer: &str) -> (Client, tokio::task::JoinHandle<()>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = peer.parse().unwrap();
        let listener: Listener = self.ctx.config.get().listeners[0].clone();
        let session = Session::new(
            b,
            SessionState::new(peer),
            self.ctx.clone(),
            Arc::new(listener),
            self.shutdown.subscribe(),
        );
        let task = tokio::spawn(async move {
            session.run().await;
        });
        (
            Client {
                io: BufReader::new(a),
            },
            task,
        )
    }

    async fn connect(&self, peer: &str) -> Client {
        let (mut c, _) = self.connect_from(peer);
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 relay.test"), "{greeting}");
        c
    }

    fn messages(&self) -> Vec<NewMessage> {
        self.mem.enqueued()
    }
}

fn plain(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn trusted_client_sends_a_signed_message() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        let ehlo = c.cmd("EHLO client.test", "250-relay.test").await;
        for ext in ["PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"] {
            assert!(ehlo.contains(ext), "{ext} in {ehlo}");
        }
        assert!(!ehlo.contains("STARTTLS"), "no TLS configured: {ehlo}");
        c.cmd("MAIL FROM:<app@Example.test> BODY=8BITMIME", "250 2.1.0").await;
        c.cmd("RCPT TO:<a@x.org>", "250 2.1.5").await;
        c.cmd("RCPT TO:<b@y.org>", "250 2.1.5").await;
        c.cmd("DATA", "354").await;
        let reply = c.cmd("From: app@example.test\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.", "250 2.0.0 Ok: queued as ").await;
        c.cmd("QUIT", "221 2.0.0").await;
        let msgs = f.messages();
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert!(reply.contains(&m.id));
        assert_eq!(m.id.len(), 32);
        assert_eq!(m.mail_from, "app@Example.test");
        assert_eq!(m.sending_domain, "example.test");
        assert_eq!(m.recipients, vec!["a@x.org", "b@y.org"]);
        assert!(m.flags.eight_bit && !m.flags.smtputf8);
        let text = String::from_utf8(m.data.clone()).unwrap();
        assert!(text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.test"), "{text}");
        assert!(text.contains("\r\nReceived: from client.test ([10.1.2.3])\r\n\tby relay.test (Petrel) with ESMTP\r\n"), "{text}");
        assert!(text.contains(&format!("Message-ID: <{}@relay.test>\r\n", m.id)), "{text}");
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(text.ends_with("\r\n\r\n.dot\r\nbody\r\n"), "{text:?}");
        verify_ed25519(&m.data, &f.public_key).await;
    })
    .await;
}

/// Verifies the DKIM signature with mail-auth's verifier, the public key
/// served from a pre-filled TXT cache (no DNS).
async fn verify_ed25519(message: &[u8], public_key: &[u8]) {
    use base64::Engine;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters};
    let record = format!(
        "v=DKIM1; k=ed25519; p={}",
        base64::engine::general_purpose::STANDARD.encode(public_key)
    );
    let key = DomainKey::parse(record.as_bytes()).unwrap();
    let cache = TxtCache::default();
    cache.0.lock().unwrap().insert(
        "s1._domainkey.example.test.".into(),
        mail_auth::Txt::DomainKey(Arc::new(key)),
    );
    // Only loopback as name server: a cache miss must fail, never leave the machine.
    use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    let dns = ResolverConfig::from_name_servers(vec![NameServerConfig::udp([127, 0, 0, 1].into())]);
    let auth = MessageAuthenticator::new(dns, ResolverOpts::default()).unwrap();
    let msg = AuthenticatedMessage::parse(message).unwrap();
    let results = auth
        .verify_dkim(Parameters::new(&msg).with_txt_cache(&cache))
        .await;
    assert!(!results.is_empty());
    assert!(
        results.iter().all(|r| *r.result() == DkimResult::Pass),
        "{results:?}"
    );
}

#[derive(Default)]
struct TxtCache(Mutex<HashMap<Box<str>, mail_auth::Txt>>);

impl mail_auth::ResolverCache<Box<str>, mail_auth::Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().get(name).cloned()
    }
    fn remove<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().remove(name)
    }
    fn insert(&self, key: Box<str>, value: mail_auth::Txt, _: std::time::Instant) {
        self.0.lock().unwrap().insert(key, value);
    }
}

#[tokio::test]
async fn out_of_sequence_and_unknown_commands() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("MAIL FROM:<a@example.test>", "503 5.5.1").await;
        c.cmd("HELO client.test", "250 relay.test").await;
        c.cmd("RCPT TO:<a@x.org>", "503 5.5.1").await;
        c.cmd("DATA", "503 5.5.1").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "503 5.5.1 Nested")
            .await;
        c.cmd("DATA", "503 5.5.1 Need RCPT").await;
        c.cmd("RSET", "250 2.0.0").await;
        c.cmd("RCPT TO:<a@x.org>", "503 5.5.1").await;
        c.cmd("VRFY alice", "252 2.1.5").await;
        c.cmd("HELP", "214").await;
        c.cmd("NOOP", "250 2.0.0").await;
        c.cmd("FROB", "500 5.5.1").await;
        c.cmd("EXPN list", "502 5.5.1").await;
        c.cmd("MAIL FROM:a@example.test", "501 5.5.2").await;
        c.cmd("QUIT", "221").await;
        assert!(f.messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn no_open_relay() {
    bounded(async {
        let f = fixture("limits: {maxErrors: 50}\n");
        // Untrusted and unauthenticated: AUTH is offered, so 530.
        let mut c = f.connect("192.0.2.1:4000").await;
        c.cmd("EHLO outside.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "530 5.7.0").await;
        // Trusted, but not a sending domain of ours.
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO inside.test", "250").await;
        let r = c.cmd("MAIL FROM:<a@other.test>", "550 5.7.1").await;
        assert!(r.contains("other.test is not a sending domain"), "{r}");
        c.cmd("MAIL FROM:<>", "550 5.7.1").await;
        c.cmd("MAIL FROM:<@evil.test:a@example.test>", "550 5.7.1")
            .await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        for (rcpt, want) in [
            ("<@relay.test:victim@far.test>", "550 5.7.1"),
            ("<victim%far.test@example.test>", "550 5.7.1"),
            ("<far.test!victim@example.test>", "550 5.7.1"),
            ("<\"victim@far.test\"@example.test>", "550 5.7.1"),
            ("<victim@far.test@example.test>", "501 5.1.3"),
            ("<victim>", "501 5.1.3"),
            ("<victim@[10.0.0.5]>", "501 5.1.3"),
            ("<\"a\rb\"@x.test>", "501 5.1.3"),
            ("<jörg@x.test>", "553 5.6.7"),
        ] {
            c.cmd(&format!("RCPT TO:{rcpt}"), want).await;
        }
        c.cmd("QUIT", "221").await;
        assert!(f.messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn auth_users_send_only_as_allowed_domains() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("192.0.2.1:4000").await;
        c.cmd("EHLO outside.test", "250").await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("bob", PASSWORD)),
            "235 2.7.0",
        )
        .await;
        c.cmd("AUTH PLAIN", "503 5.5.1").await;
        let r = c.cmd("MAIL FROM:<a@corp.test>", "550 5.7.1").await;
        assert!(r.contains("bob may not send as corp.test"), "{r}");
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<z@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: x\r\n\r\nhi\r\n.", "250 2.0.0").await;
        let m = &f.messages()[0];
        assert!(String::from_utf8_lossy(&m.data).contains("with ESMTPA"));

        // LOGIN, with the user name in the first challenge.
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut c = f.connect("192.0.2.1:4001").await;
        c.cmd("EHLO outside.test", "250").await;
        c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
        c.cmd(&b64("alice"), "334 UGFzc3dvcmQ6").await;
        c.cmd(&b64(PASSWORD), "235 2.7.0").await;
        c.cmd("MAIL FROM:<a@corp.test>", "250").await;
        // Cancelled exchange and unknown mechanism.
        let mut c = f.connect("192.0.2.1:4002").await;
        c.cmd("EHLO outside.test", "250").await;
        c.cmd("AUTH LOGIN", "334").await;
        c.cmd("*", "501 5.0.0").await;
        c.cmd("AUTH CRAM-MD5", "504 5.5.4").await;
        c.cmd("AUTH PLAIN !!!", "501 5.5.2").await;
    })
    .await;
}

#[tokio::test]
async fn auth_guessing_is_blocked_per_client() {
    bounded(async {
        let f = fixture("limits: {maxAuthFailures: 3, maxErrors: 100}\n");
        let mut c = f.connect("192.0.2.9:4000").await;
        c.cmd("EHLO guesser.test", "250").await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("alice", "guess1")),
            "535 5.7.8",
        )
        .await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("nobody", "guess2")),
            "535 5.7.8",
        )
        .await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("alice", "guess3")),
            "421 4.7.0",
        )
        .await;
        assert_eq!(c.reply().await, "EOF");
        // A new connection from the same address is still blocked, even
        // with the right password; another address is not.
        let mut c = f.connect("192.0.2.9:4001").await;
        c.cmd("EHLO guesser.test", "250").await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("alice", PASSWORD)),
            "421 4.7.0",
        )
        .await;
        let mut c = f.connect("192.0.2.10:4001").await;
        c.cmd("EHLO other.test", "250").await;
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", PASSWORD)), "235")
            .await;
        assert_eq!(f.mem.counter_value("auth-fail:192.0.2.9"), Some(3));
    })
    .await;
}

#[tokio::test]
async fn limits_on_size_recipients_lines_and_errors() {
    bounded(async {
        let f = fixture(
            "limits: {maxMessageSize: 2048, maxRecipients: 2, maxLineLength: 1000, maxErrors: 6}\n",
        );
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test> SIZE=4096", "552 5.3.4")
            .await;
        c.cmd("MAIL FROM:<a@example.test> SIZE=50", "250").await;
        c.cmd("RCPT TO:<a@x.org>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("RCPT TO:<c@x.org>", "452 4.5.3").await;
        c.cmd("DATA", "354").await;
        let big = "x".repeat(900);
        c.cmd(
            &format!("Subject: big\r\n\r\n{big}\r\n{big}\r\n{big}\r\n."),
            "552 5.3.4",
        )
        .await;
        // The session is still in step after the oversized message.
        c.cmd("NOOP", "250").await;
        c.cmd(&format!("NOOP {}", "y".repeat(1200)), "500 5.5.6")
            .await;
        c.cmd("NOOP", "250").await;
        c.cmd("FROB", "500").await;
        c.cmd("FROB", "500").await;
        // The sixth error (452 is not one) is answered, then the session ends.
        c.cmd("FROB", "500").await;
        assert!(c.reply().await.starts_with("421 4.7.0"));
        assert_eq!(c.reply().await, "EOF");
        assert!(f.messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<a@x.org>\r\nRCPT TO:<bad>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n").await;
        for want in ["250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "354"] {
            let r = c.reply().await;
            assert!(r.starts_with(want), "wanted {want}, got {r}");
        }
        c.send("Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<c@x.org>\r\nDATA\r\n").await;
        for want in ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354"] {
            let r = c.reply().await;
            assert!(r.starts_with(want), "wanted {want}, got {r}");
        }
        // An empty message ends at once.
        c.send(".\r\nQUIT\r\n").await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert!(c.reply().await.starts_with("221"));
        let msgs = f.messages();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].recipients, vec!["a@x.org", "b@y.org"]);
        assert_eq!(msgs[1].recipients, vec!["c@x.org"]);
    })
    .await;
}

async fn suppress(f: &Fixture, address: &str) {
    f.mem
        .suppress(SuppressionEntry {
            address: address.to_string(),
            reason: crate::queue::SuppressionReason::Bounce,
            scope: None,
            remote_reply: None,
            created_at: 0,
            expires_at: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn suppressed_recipients_are_refused_or_dropped() {
    bounded(async {
        let f = fixture("");
        suppress(&f, "gone@x.org").await;
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        let r = c.cmd("RCPT TO:<Gone@X.org>", "550 5.1.1").await;
        assert!(r.contains("(bounce)"), "{r}");
        c.cmd("RSET", "250").await;
        // corp.test drops instead; with no one left, nothing is queued.
        c.cmd("MAIL FROM:<a@corp.test>", "250").await;
        c.cmd("RCPT TO:<gone@x.org>", "250 2.1.5").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: x\r\n\r\nhi\r\n.", "250 2.0.0").await;
        assert!(f.messages().is_empty());
    })
    .await;
}

/// Events recorded in the background: waits until `n` are in the outbox.
async fn events_soon(f: &Fixture, n: usize) -> Vec<crate::events::Event> {
    loop {
        let events = f.mem.events();
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn refusals_drops_and_acceptances_become_events() {
    use crate::events::EventType;
    bounded(async {
        let f = fixture("");
        suppress(&f, "gone@x.org").await;
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<gone@x.org>", "550 5.1.1").await;
        let events = events_soon(&f, 1).await;
        assert_eq!(events[0].kind, EventType::Rejected);
        assert_eq!(events[0].recipient.as_deref(), Some("gone@x.org"));
        assert_eq!(events[0].from.as_deref(), Some("a@example.test"));
        assert_eq!(events[0].enhanced_status.as_deref(), Some("5.1.1"));
        assert!(events[0].response.as_deref().unwrap().starts_with("550 5.1.1"));
        // Protocol noise is no event.
        c.cmd("FROB", "500").await;
        c.cmd("RSET", "250").await;
        // corp.test drops: a `suppressed` event with the accepted ones.
        c.cmd("MAIL FROM:<a@corp.test>", "250").await;
        c.cmd("RCPT TO:<gone@x.org>", "250").await;
        c.cmd("RCPT TO:<ok@y.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd(
            "X-Petrel-Tags: order=17, campaign=spring\r\nMessage-ID: <m1@corp.test>\r\nSubject: x\r\n\r\nhi\r\n.",
            "250 2.0.0",
        )
        .await;
        let msg = &f.messages()[0];
        let text = String::from_utf8_lossy(&msg.data);
        assert!(!text.to_ascii_lowercase().contains("x-petrel-tags"), "{text}");
        assert_eq!(msg.tags.get("order").map(String::as_str), Some("17"));
        assert_eq!(msg.header_message_id.as_deref(), Some("m1@corp.test"));
        let events = f.mem.events();
        let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventType::Rejected, EventType::Accepted, EventType::Suppressed]);
        for e in &events[1..] {
            assert_eq!(e.queue_id.as_deref(), Some(msg.id.as_str()));
            assert_eq!(e.header_message_id.as_deref(), Some("m1@corp.test"));
            assert_eq!(e.tags, msg.tags);
        }
        assert_eq!(events[1].recipient.as_deref(), Some("ok@y.org"));
        assert_eq!(events[2].recipient.as_deref(), Some("gone@x.org"));
        // A bad tag header refuses the message, naming the tag, and is a
        // `rejected` event per recipient.
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        let r = c
            .cmd("X-Petrel-Tags: bad key=1\r\nSubject: x\r\n\r\nhi\r\n.", "550 5.6.0")
            .await;
        assert!(r.contains("\"bad key\""), "{r}");
        let events = events_soon(&f, 4).await;
        assert_eq!(events[3].kind, EventType::Rejected);
        assert_eq!(events[3].recipient.as_deref(), Some("b@x.org"));
        assert_eq!(f.messages().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_refusal_is_sent_when_its_event_cannot_be_recorded() {
    bounded(async {
        let f = fixture("");
        suppress(&f, "gone@x.org").await;
        f.mem.fail_next_publishes(1);
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<gone@x.org>", "550 5.1.1").await;
        let lost = &f.ctx.metrics.events_lost;
        while lost.with_label_values(&["rejected"]).get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(f.mem.events().is_empty());
        // The session goes on.
        c.cmd("RCPT TO:<ok@x.org>", "250").await;
    })
    .await;
}

#[tokio::test]
async fn daily_quota_is_shared_and_enforced_at_mail() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@corp.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: x\r\n\r\nhi\r\n.", "250 2.0.0").await;
        c.cmd("MAIL FROM:<a@corp.test>", "451 4.7.1").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        assert_eq!(f.messages().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn queue_or_key_failure_is_temporary_and_stores_nothing() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@broken.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: x\r\n\r\nhi\r\n.", "451 4.3.0").await;
        f.mem.set_enqueue_down(true);
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: x\r\n\r\nhi\r\n.", "451 4.3.0").await;
        assert!(f.messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn utf8_needs_smtputf8() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test> SMTPUTF8", "250").await;
        c.cmd("RCPT TO:<jörg@bücher.example>", "250").await;
        c.cmd("DATA", "354").await;
        c.cmd("Subject: ü\r\n\r\nhi\r\n.", "250").await;
        assert!(f.messages()[0].flags.smtputf8);
    })
    .await;
}

#[tokio::test]
async fn shutdown_sends_421_to_idle_sessions() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        f.shutdown.send_replace(true);
        assert!(c.reply().await.starts_with("421 4.3.2"));
        assert_eq!(c.reply().await, "EOF");
        let (mut late, _) = f.connect_from("10.1.2.3:4001");
        assert!(late.reply().await.starts_with("421 4.3.2"));
    })
    .await;
}

#[tokio::test]
async fn idle_clients_time_out() {
    bounded(async {
        let f = fixture("limits: {commandTimeout: 1s}\n");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        // Say nothing: the session gives up with 421 and closes.
        let r = c.reply().await;
        assert!(r.starts_with("421 4.4.2"), "{r}");
        assert_eq!(c.reply().await, "EOF");
    })
    .await;
}

#[tokio::test]
async fn insecure_auth_is_not_offered_without_tls() {
    bounded(async {
        let f = fixture("");
        let mut ctx_config = (*f.ctx.config.get()).clone();
        ctx_config.listeners[0].allow_insecure_auth = false;
        let (a, b) = tokio::io::duplex(1 << 16);
        let listener = Arc::new(ctx_config.listeners[0].clone());
        let session = Session::new(
            b,
            SessionState::new("192.0.2.1:1".parse().unwrap()),
            f.ctx.clone(),
            listener,
            f.shutdown.subscribe(),
        );
        tokio::spawn(session.run());
        let mut c = Client {
            io: BufReader::new(a),
        };
        c.reply().await;
        let ehlo = c.cmd("EHLO x.test", "250").await;
        assert!(!ehlo.contains("AUTH"), "{ehlo}");
        c.cmd(
            &format!("AUTH PLAIN {}", plain("alice", PASSWORD)),
            "530 5.7.0",
        )
        .await;
    })
    .await;
}

/// Garbage in, replies out: random bytes and mangled commands never panic
/// the session, and it always ends (a cheap stand-in for a fuzz target).
#[tokio::test]
async fn random_input_never_panics() {
    use rand::{Rng, SeedableRng};
    bounded(async {
        let f = fixture("limits: {maxErrors: 1000, maxLineLength: 1000, maxMessageSize: 2048}\n");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let words: &[&[u8]] = &[
            b"EHLO x",
            b"HELO",
            b"MAIL FROM:<",
            b"RCPT TO:<",
            b"DATA",
            b"BDAT 5",
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"STARTTLS",
            b"RSET",
            b"NOOP",
            b"VRFY",
            b"@",
            b"\"",
            b"%",
            b"!",
            b">",
            b" SIZE=",
            b" BODY=8BITMIME",
            b" SMTPUTF8",
            b"\r\n",
            b"\n",
            b".",
            b"\r\n.\r\n",
            b"\xff\xfe",
            b"\0",
            b"=",
            b"*",
        ];
        for _ in 0..200 {
            let (mut c, task) = f.connect_from("10.9.9.9:1");
            let mut input = Vec::new();
            for _ in 0..rng.random_range(1..40) {
                if rng.random_bool(0.2) {
                    let n = rng.random_range(1..64);
                    input.extend((0..n).map(|_| rng.random::<u8>()));
                } else {
                    input.extend_from_slice(words[rng.random_range(0..words.len())]);
                }
            }
            input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            c.io.get_mut().write_all(&input).await.unwrap();
            c.io.get_mut().shutdown().await.unwrap();
            // Drain replies until the session closes.
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut c.io, &mut sink)
                .await
                .unwrap();
            task.await.expect("session panicked");
        }
    })
    .await;
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    bounded(async {
        let f = fixture("limits: {maxMessageSize: 2048}\n");
        let mut c = f.connect("10.1.2.3:4000").await;
        let ehlo = c.cmd("EHLO client.test", "250").await;
        assert!(ehlo.contains("CHUNKING"), "{ehlo}");
        // Out of sequence: the chunk is skipped, the session stays in step.
        c.send("BDAT 6\r\nNOOP\r\n").await;
        assert!(c.reply().await.starts_with("503 5.5.1"));
        c.cmd("NOOP", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        let part1 = "Subject: chunks\r\n\r\nfirst ";
        let part2 = "line\n.not stuffed\r\n";
        c.send(&format!("BDAT {}\r\n{part1}", part1.len())).await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        c.cmd("DATA", "503 5.5.1").await;
        // Pipelined: the last chunk and an empty LAST in one write.
        c.send(&format!("BDAT {}\r\n{part2}BDAT 0 LAST\r\n", part2.len()))
            .await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued as"));
        let m = &f.messages()[0];
        let text = String::from_utf8_lossy(&m.data);
        // Bare LF normalised to CRLF; BDAT data is never dot-unstuffed.
        assert!(
            text.ends_with("\r\n\r\nfirst line\r\n.not stuffed\r\n"),
            "{text}"
        );
        verify_ed25519(&m.data, &f.public_key).await;

        // Oversize chunks are read and dropped; LAST gets 552.
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        let big = "z".repeat(1500);
        c.send(&format!("BDAT 1500\r\n{big}")).await;
        assert!(c.reply().await.starts_with("250"));
        c.send(&format!("BDAT 1500 LAST\r\n{big}")).await;
        assert!(c.reply().await.starts_with("552 5.3.4"));
        c.cmd("NOOP", "250").await;
        assert_eq!(f.messages().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn http_submissions_take_the_same_path() {
    use crate::http::{Credentials, HttpClient, Submission, Submit};
    use crate::refusal::Refusal;
    bounded(async {
        let f = fixture("");
        suppress(&f, "gone@x.org").await;
        let submit = InboundSubmit::new(f.ctx.clone());
        // Over TLS unless said otherwise: plaintext credentials are a
        // case of their own below.
        let send = async |peer: &str,
                          creds: Option<(&str, &str)>,
                          tls: bool,
                          from: &str,
                          rcpts: &[&str]|
               -> Result<String, Refusal> {
            let client = HttpClient {
                peer: peer.parse().unwrap(),
                credentials: creds.map(|(u, p)| Credentials {
                    username: u.into(),
                    password: p.into(),
                }),
                tls,
            };
            let who = submit.authorize(client).await?;
            let submission = Submission {
                mail_from: from.into(),
                recipients: rcpts.iter().map(|r| r.to_string()).collect(),
                data: b"From: a@example.test\r\nSubject: api\r\n\r\nhello\r\n".to_vec(),
                tags: Default::default(),
            };
            submit.submit(who, submission).await
        };
        let id = send(
            "10.1.2.3",
            None,
            false,
            "a@example.test",
            &["b@x.org", "b@x.org"],
        )
        .await
        .unwrap();
        let m = &f.messages()[0];
        assert_eq!(m.id, id);
        assert_eq!(m.recipients, vec!["b@x.org"]);
        assert!(String::from_utf8_lossy(&m.data).contains("with HTTP\r\n"));
        verify_ed25519(&m.data, &f.public_key).await;

        let code = |r: Result<String, Refusal>| {
            let e = r.unwrap_err();
            (e.code(), e.esc().to_string())
        };
        assert_eq!(
            code(send("192.0.2.1", None, false, "a@example.test", &["b@x.org"]).await),
            (530, "5.7.0".into())
        );
        assert_eq!(
            code(
                send(
                    "192.0.2.1",
                    Some(("alice", "nope")),
                    true,
                    "a@example.test",
                    &["b@x.org"]
                )
                .await
            ),
            (535, "5.7.8".into())
        );
        // Basic credentials in clear from outside the trusted networks are
        // refused before the password is looked at (no failure counted).
        let failures = f
            .ctx
            .metrics
            .auth_failures
            .with_label_values(&["http"])
            .get();
        let plain = send(
            "192.0.2.1",
            Some(("alice", PASSWORD)),
            false,
            "a@example.test",
            &["b@x.org"],
        )
        .await;
        assert_eq!(plain.unwrap_err(), Refusal::PlaintextCredentials);
        assert_eq!(
            f.ctx
                .metrics
                .auth_failures
                .with_label_values(&["http"])
                .get(),
            failures
        );
        assert_eq!(
            code(send("10.1.2.3", None, false, "a@bank.test", &["b@x.org"]).await),
            (550, "5.7.1".into())
        );
        assert_eq!(
            code(send("10.1.2.3", None, false, "a@example.test", &["v%far@x.org"]).await),
            (550, "5.7.1".into())
        );
        assert_eq!(
            code(send("10.1.2.3", None, false, "a@example.test", &["gone@x.org"]).await),
            (550, "5.1.1".into())
        );
        // The HTTP API has no SMTP parser in front of it: CRLF and control
        // characters in a quoted local part, and address literals, are
        // refused by the policy checks themselves.
        for (rcpt, want) in [
            ("\"a\r\nRSET\"@x.org", (501, "5.1.3".into())),
            ("\"a\u{0}b\"@x.org", (501, "5.1.3".into())),
            ("v@[10.0.0.5]", (550, "5.7.1".into())),
        ] {
            assert_eq!(
                code(send("10.1.2.3", None, false, "a@example.test", &[rcpt]).await),
                want,
                "{rcpt:?}"
            );
        }
        // From a trusted network, credentials in clear are fine.
        let id = send(
            "10.1.2.3",
            Some(("alice", PASSWORD)),
            false,
            "a@corp.test",
            &["gone@x.org"],
        )
        .await
        .unwrap();
        assert_eq!(id, "dropped");
        assert_eq!(f.messages().len(), 1);
    })
    .await;
}

/// Sends `payload` a byte at a time until the session hangs up (writes
/// fail once it has dropped its end); true when it hung up early.
async fn dribble(c: &mut Client, payload: &[u8]) -> bool {
    for &b in payload {
        if c.io.get_mut().write_all(&[b]).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

#[tokio::test]
async fn clients_dribbling_a_byte_at_a_time_are_cut_off() {
    bounded(async {
        let f = fixture("limits: {commandTimeout: 1s, dataTimeout: 1s}\n");
        // In a command: the line must be complete within commandTimeout,
        // however steadily the bytes come.
        let mut c = f.connect("10.1.2.3:4000").await;
        assert!(dribble(&mut c, b"EHLO a-very-slow-client.example.test\r\n").await);
        let reply = c.reply().await;
        assert!(reply.starts_with("421 4.4.2"), "{reply}");

        // In DATA: each line within dataTimeout.
        let mut c = f.connect("10.1.2.3:4001").await;
        c.cmd("EHLO slow.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        assert!(
            dribble(
                &mut c,
                b"Subject: a line that takes far too long to finish\r\n"
            )
            .await
        );
        let reply = c.reply().await;
        assert!(reply.starts_with("421 4.4.2"), "{reply}");
        assert!(f.messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn recipient_refusals_of_bulk_senders_are_not_errors() {
    bounded(async {
        let f = fixture("limits: {maxErrors: 2, maxRecipients: 1}\n");
        for i in 0..5 {
            suppress(&f, &format!("gone{i}@x.org")).await;
        }
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO bulk.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        for i in 0..5 {
            c.cmd(&format!("RCPT TO:<gone{i}@x.org>"), "550 5.1.1")
                .await;
        }
        c.cmd("RCPT TO:<ok@x.org>", "250").await;
        for i in 0..5 {
            c.cmd(&format!("RCPT TO:<more{i}@x.org>"), "452 4.5.3")
                .await;
        }
        c.cmd("DATA", "354").await;
        c.cmd("Subject: bulk\r\n\r\nhi\r\n.", "250 2.0.0").await;
        assert_eq!(f.messages()[0].recipients, vec!["ok@x.org"]);
    })
    .await;
}

/// SMTP smuggling: a bare-LF dot does not end DATA, so the "smuggled"
/// commands stay inside the one message (and leave as a dot-stuffed line).
#[tokio::test]
async fn bare_lf_dot_does_not_end_data() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.send("Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@x.org>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert!(c.reply().await.starts_with("221"));
        let msgs = f.messages();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].recipients, vec!["b@x.org"]);
        let text = String::from_utf8_lossy(&msgs[0].data);
        assert!(text.ends_with("hello\r\n.\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@x.org>\r\nDATA\r\nsmuggled\r\n"), "{text}");
    })
    .await;
}

/// SMTP smuggling with bare CR: `<CR>.<CR>` does not end DATA and is
/// stored as CRLF lines, so delivery dot-stuffs it and no next hop that
/// takes a lone CR for a line end can see an end of DATA in it.
#[tokio::test]
async fn bare_cr_dot_is_stored_as_crlf_lines() {
    bounded(async {
        let f = fixture("");
        let mut c = f.connect("10.1.2.3:4000").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<a@example.test>", "250").await;
        c.cmd("RCPT TO:<b@x.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.send("Subject: s\r\n\r\nhello\r.\rMAIL FROM:<evil@example.test>\r\n.\r\nQUIT\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert!(c.reply().await.starts_with("221"));
        let msgs = f.messages();
        assert_eq!(msgs.len(), 1);
        let data = &msgs[0].data;
        let bare = (0..data.len()).any(|i| {
            (data[i] == b'\r' && data.get(i + 1) != Some(&b'\n'))
                || (data[i] == b'\n' && (i == 0 || data[i - 1] != b'\r'))
        });
        assert!(
            !bare,
            "bare CR or LF left in {:?}",
            String::from_utf8_lossy(data)
        );
        let text = String::from_utf8_lossy(data);
        assert!(
            text.ends_with("hello\r\n.\r\nMAIL FROM:<evil@example.test>\r\n"),
            "{text}"
        );
    })
    .await;
}

/// Guesses sent at once on many connections from one client cannot all
/// pass the throttle check before the first failure is counted: the check
/// and the password verification share a bounded turn, so at most one
/// guess per turn gets through before the client is blocked.
#[tokio::test]
async fn concurrent_guesses_cannot_outrun_the_throttle() {
    bounded(async {
        let f = fixture("limits: {maxAuthFailures: 1, maxErrors: 100}\n");
        let mut clients = Vec::new();
        for port in 0..8 {
            let mut c = f.connect(&format!("192.0.2.20:{}", 5000 + port)).await;
            c.cmd("EHLO guesser.test", "250").await;
            clients.push(c);
        }
        for c in clients.iter_mut() {
            c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", "guess")))
                .await;
        }
        for c in clients.iter_mut() {
            let r = c.reply().await;
            assert!(
                r.starts_with("535 5.7.8") || r.starts_with("421 4.7.0"),
                "{r}"
            );
        }
        let counted = f.mem.counter_value("auth-fail:192.0.2.20").unwrap_or(0);
        assert!(
            (1..=auth_slots() as u64).contains(&counted),
            "{counted} guesses checked, at most {} expected",
            auth_slots()
        );
    })
    .await;
}

/// RFC 4954: when the throttle counter cannot be read, AUTH gets the
/// temporary authentication failure 454 4.7.0 (never a pass).
#[tokio::test]
async fn auth_with_the_backend_down_is_a_temporary_failure() {
    bounded(async {
        let f = fixture("");
        f.mem.set_down(true);
        let mut c = f.connect("192.0.2.1:4000").await;
        c.cmd("EHLO outside.test", "250").await;
        c.cmd(
            &format!("AUTH PLAIN {}", plain("alice", PASSWORD)),
            "454 4.7.0",
        )
        .await;
        c.cmd("MAIL FROM:<a@example.test>", "530 5.7.0").await;
    })
    .await;
}
