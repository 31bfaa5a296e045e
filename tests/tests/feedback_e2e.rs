//! The feedback loop end to end: the whole relay in process
//! (`server::run_until`) with a submission listener and a `role: feedback`
//! listener, a spawned redis-server, the in-process DNS and the SMTP sink
//! as the destination's MX. The sink accepts the relay's mail (so the VERP
//! envelope sender is observed and checked with the key), then the test
//! plays the remote MTA: it builds an RFC 3464 DSN (or an RFC 5965 ARF
//! report) with mail-builder the way an MTA does and sends it by SMTP to
//! the feedback listener. Suppressions and events are read back through a
//! second, independent connection to the backend.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::MimePart;
use petrel_relay::config::RelayConfig;
use petrel_relay::events::{BounceType, Event, EventType};
use petrel_relay::feedback::FeedbackKeys;
use petrel_relay::queue::{self, Backend, SuppressionReason};
use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Received, SmtpSink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
const RETURN_PATH: &str = "bounces.example.test";

fn dkim_key() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples/local/dkim-example.test.key")
}

/// A line-by-line SMTP client: sends a command, checks the reply code.
struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(port: u16) -> Client {
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (r, writer) = stream.into_split();
        let mut c = Client {
            reader: BufReader::new(r),
            writer,
        };
        c.expect("220").await;
        c.cmd("EHLO mta.dest.test", "250").await;
        c
    }

    async fn expect(&mut self, code: &str) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.unwrap();
            assert!(!line.is_empty(), "connection closed; so far {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        assert!(all.starts_with(code), "expected {code}, got {all:?}");
        all
    }

    async fn cmd(&mut self, line: &str, code: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.expect(code).await
    }

    /// One transaction; returns the reply to the end of DATA.
    async fn send(&mut self, from: &str, rcpts: &[&str], message: &[u8]) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250").await;
        }
        self.cmd("DATA", "354").await;
        let mut data = Vec::new();
        for line in message.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.writer.write_all(&data).await.unwrap();
        self.expect("250").await
    }
}

fn config(
    smtp_port: u16,
    feedback_port: u16,
    http_port: u16,
    redis_url: &str,
    dns: std::net::SocketAddr,
    mx_port: u16,
    feedback_key: &Path,
) -> String {
    let key = dkim_key();
    let key = key.display();
    let feedback_key = feedback_key.display();
    format!(
        r#"
hostname: relay.test
listeners:
  - {{name: smtp, address: "127.0.0.1:{smtp_port}", tls: none, auth: none}}
  - {{name: feedback, address: "127.0.0.1:{feedback_port}", tls: none, auth: none, role: feedback}}
trustedNetworks: ["127.0.0.0/8"]
http: {{address: "127.0.0.1:{http_port}"}}
feedback: {{keyFile: "{feedback_key}"}}
domains:
  - domain: example.test
    returnPathDomain: {RETURN_PATH}
    dkim: {{selector: example, algorithm: ed25519, keyFile: "{key}"}}
  - domain: plain.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: "{key}"}}
queue:
  redis: {{url: "{redis_url}", keyPrefix: feedback-e2e}}
  lease: 30s
delivery:
  transport: mx
  mx: {{port: {mx_port}, nameservers: ["{dns}"]}}
  retrySchedule: [1s]
  timeouts: {{connect: 5s, greeting: 5s, command: 5s, data: 5s}}
"#
    )
}

/// The header block of a received message (what an MTA returns as
/// text/rfc822-headers), with the Return-Path the final MTA adds.
fn returned_headers(got: &Received) -> String {
    let text = String::from_utf8_lossy(&got.data);
    let headers = text.split("\r\n\r\n").next().unwrap_or_default();
    format!("Return-Path: <{}>\r\n{headers}\r\n", got.mail_from)
}

/// An RFC 3464 DSN as an MTA builds it: multipart/report with a human
/// part, message/delivery-status and text/rfc822-headers.
fn dsn(
    to: &str,
    recipient: &str,
    action: &str,
    status: &str,
    diagnostic: &str,
    headers: &str,
) -> Vec<u8> {
    let per_message =
        "Reporting-MTA: dns; mx.dest.test\r\nArrival-Date: Wed, 2 Dec 2026 01:00:00 +0000\r\n";
    let per_recipient = format!(
        "Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\nAction: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; inner.dest.test\r\nDiagnostic-Code: smtp; {diagnostic}\r\n"
    );
    let status_part = format!("{per_message}\r\n{per_recipient}");
    MessageBuilder::new()
        .from(("Mail Delivery System", "MAILER-DAEMON@mx.dest.test"))
        .to(to)
        .subject("Undelivered Mail Returned to Sender")
        .header("Auto-Submitted", mail_builder::headers::raw::Raw::new("auto-replied"))
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            vec![
                MimePart::new("text/plain", "This is the mail system at host mx.dest.test.\r\n\r\nYour message could not be delivered.\r\n"),
                MimePart::new("message/delivery-status", status_part),
                MimePart::new("text/rfc822-headers", headers.to_string()),
            ],
        ))
        .write_to_vec()
        .unwrap()
}

/// An RFC 5965 ARF report as a mailbox provider's feedback loop sends it.
fn arf(to: &str, recipient: &str, original: &[u8]) -> Vec<u8> {
    let report = format!(
        "Feedback-Type: abuse\r\nUser-Agent: SomeProviderFBL/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: {recipient}\r\nArrival-Date: Wed, 2 Dec 2026 01:00:00 +0000\r\n"
    );
    MessageBuilder::new()
        .from("fbl@provider.test")
        .to(to)
        .subject("Abuse report")
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "feedback-report"),
            vec![
                MimePart::new(
                    "text/plain",
                    "This is an email abuse report for a message you sent.\r\n",
                ),
                MimePart::new("message/feedback-report", report),
                MimePart::new("message/rfc822", original.to_vec()),
            ],
        ))
        .write_to_vec()
        .unwrap()
}

async fn events(backend: &Backend) -> Vec<Event> {
    backend
        .events
        .read(None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

async fn metrics(http_port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay.test\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

fn counter(metrics: &str, kind: &str) -> u64 {
    let needle = format!("petrel_feedback_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends through the submission listener and waits for the sink to have
/// `total` messages; returns the new ones.
async fn deliver(
    port: u16,
    sink: &SmtpSink,
    from: &str,
    rcpts: &[&str],
    total: usize,
) -> Vec<Received> {
    let before = sink.received().len();
    let mut c = Client::connect(port).await;
    let message = format!(
        "From: {from}\r\nTo: {}\r\nSubject: news\r\nMessage-ID: <{}@example.test>\r\n\r\nhello\r\n",
        rcpts.join(", "),
        rcpts[0].replace('@', ".")
    );
    c.send(from, rcpts, message.as_bytes()).await;
    c.cmd("QUIT", "221").await;
    let got = sink.wait_for(total, Duration::from_secs(30)).await;
    assert_eq!(got.len(), total, "the sink got the mail");
    got[before..].to_vec()
}

#[tokio::test]
async fn bounces_complaints_and_unsubscribes_come_back_through_the_feedback_listener() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        let sink = SmtpSink::start().await.expect("sink");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);

        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("feedback.key");
        std::fs::write(&key_path, "0123456789abcdef0123456789abcdef-feedback-e2e\n").unwrap();
        let keys = FeedbackKeys::load(&key_path).unwrap();
        let (smtp_port, feedback_port, http_port) = (free_port(), free_port(), free_port());
        let yaml = config(smtp_port, feedback_port, http_port, &redis.url(), dns.addr(), sink.port(), &key_path);
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let parsed = RelayConfig::from_yaml(&yaml).unwrap();
        let backend = queue::open(&parsed.queue).await.unwrap();

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            petrel_relay::server::run_until(&path, async move {
                let _ = stopped.await;
            })
            .await
        });

        // Without a returnPathDomain the envelope sender is the app's.
        let got = deliver(smtp_port, &sink, "app@plain.test", &["p@dest.test"], 1).await;
        assert_eq!(got[0].mail_from, "app@plain.test");

        // With one: one transaction per recipient, each with its own VERP
        // sender that opens with the key for exactly that recipient.
        let got = deliver(smtp_port, &sink, "app@example.test", &["gone@dest.test", "late@dest.test"], 3).await;
        let mut by_rcpt = std::collections::HashMap::new();
        for r in &got {
            assert_eq!(r.rcpt_to.len(), 1, "one recipient per VERP transaction");
            let (local, domain) = r.mail_from.rsplit_once('@').unwrap();
            assert_eq!(domain, RETURN_PATH);
            assert!(local.len() <= 64, "{local}");
            let token = local.strip_prefix("b+").expect("b+ prefix");
            let claims = keys.open_verp(token, &[r.rcpt_to[0].as_str()], &["example.test"]).expect("the token verifies");
            assert_eq!(claims.recipient, r.rcpt_to[0]);
            assert_eq!(claims.sending_domain, "example.test");
            by_rcpt.insert(r.rcpt_to[0].clone(), (r.clone(), claims.queue_id));
        }
        let (gone, queue_id) = by_rcpt["gone@dest.test"].clone();
        assert_ne!(by_rcpt["late@dest.test"].0.mail_from, gone.mail_from);

        let mut fb = Client::connect(feedback_port).await;

        // (e) The feedback listener relays nothing.
        fb.cmd("MAIL FROM:<spammer@evil.test>", "250").await;
        let refused = fb.cmd("RCPT TO:<victim@dest.test>", "550").await;
        assert!(refused.starts_with("550 5.7.1"), "{refused}");
        let refused = fb.cmd("RCPT TO:<app@example.test>", "550").await;
        assert!(refused.starts_with("550 5.7.1"), "{refused}");
        fb.cmd("RSET", "250").await;
        let auth = fb.cmd("AUTH PLAIN AGFiYwBkZWY=", "5").await;
        assert!(auth.starts_with('5'), "no AUTH on the feedback listener: {auth}");

        // (a) An asynchronous hard bounce to the VERP address.
        let bounce = dsn(
            &gone.mail_from,
            "gone@dest.test",
            "failed",
            "5.1.1",
            "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown",
            &returned_headers(&gone),
        );
        fb.send("", &[&gone.mail_from], &bounce).await;
        // Durable before the 250: read at once.
        let entry = backend
            .state
            .suppressed("gone@dest.test", "any.test", queue::now_millis())
            .await
            .unwrap()
            .expect("suppressed after the DSN");
        assert_eq!(entry.reason, SuppressionReason::Bounce);
        assert_eq!(entry.scope, None);
        assert!(entry.remote_reply.as_deref().unwrap().contains("User unknown"));
        let all = events(&backend).await;
        let bounced: Vec<&Event> = all
            .iter()
            .filter(|e| e.kind == EventType::Bounced && e.is_async == Some(true))
            .collect();
        assert_eq!(bounced.len(), 1, "{all:?}");
        let b = bounced[0];
        assert_eq!(b.recipient.as_deref(), Some("gone@dest.test"));
        assert_eq!(b.queue_id.as_deref(), Some(queue_id.as_str()));
        assert_eq!(b.sending_domain.as_deref(), Some("example.test"));
        assert_eq!(b.bounce_type, Some(BounceType::Hard));
        assert_eq!(b.enhanced_status.as_deref(), Some("5.1.1"));
        assert_eq!(b.remote_mta.as_deref(), Some("inner.dest.test"));
        assert!(b.response.as_deref().unwrap().contains("User unknown"));
        assert_eq!(b.header_message_id.as_deref(), Some("gone.dest.test@example.test"));

        // (c) A 4.x.x DSN: a delayed event, nobody suppressed.
        let (late, _) = by_rcpt["late@dest.test"].clone();
        let delayed = dsn(&late.mail_from, "late@dest.test", "delayed", "4.4.7", "451 4.4.7 mailbox busy", &returned_headers(&late));
        fb.send("", &[&late.mail_from], &delayed).await;
        assert!(
            backend.state.suppressed("late@dest.test", "example.test", queue::now_millis()).await.unwrap().is_none()
        );
        let all = events(&backend).await;
        let d: Vec<&Event> = all.iter().filter(|e| e.kind == EventType::Delayed).collect();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].recipient.as_deref(), Some("late@dest.test"));
        assert_eq!(d[0].enhanced_status.as_deref(), Some("4.4.7"));
        assert_eq!(d[0].is_async, Some(true));
        assert_eq!(all.iter().filter(|e| e.kind == EventType::Bounced && e.recipient.as_deref() == Some("late@dest.test")).count(), 0);

        // (b) An ARF report sent to the registered feedback-loop address,
        // with the whole original (its Return-Path carries the VERP token).
        let got = deliver(smtp_port, &sink, "app@example.test", &["annoyed@dest.test"], 4).await;
        let annoyed = &got[0];
        let mut original = format!("Return-Path: <{}>\r\n", annoyed.mail_from).into_bytes();
        original.extend_from_slice(&annoyed.data);
        let report = arf(&format!("fbl@{RETURN_PATH}"), "annoyed@dest.test", &original);
        fb.send("fbl@provider.test", &[&format!("fbl@{RETURN_PATH}")], &report).await;
        let entry = backend
            .state
            .suppressed("annoyed@dest.test", "plain.test", queue::now_millis())
            .await
            .unwrap()
            .expect("suppressed after the complaint");
        assert_eq!(entry.reason, SuppressionReason::Complaint);
        assert_eq!(entry.scope, None);
        let all = events(&backend).await;
        let c = all.iter().find(|e| e.kind == EventType::Complained).expect("complained event");
        assert_eq!(c.recipient.as_deref(), Some("annoyed@dest.test"));
        assert_eq!(c.feedback_type.as_deref(), Some("abuse"));
        assert_eq!(c.sending_domain.as_deref(), Some("example.test"));

        // Mail to the mailto unsubscribe address from the recipient.
        let local = keys.unsubscribe_mailto_local("example.test", "leaver@dest.test");
        let unsubscribe = b"From: leaver@dest.test\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n";
        fb.send("leaver@dest.test", &[&format!("{local}@{RETURN_PATH}")], unsubscribe).await;
        let entry = backend
            .state
            .suppressed("leaver@dest.test", "example.test", queue::now_millis())
            .await
            .unwrap()
            .expect("unsubscribed from example.test");
        assert_eq!(entry.reason, SuppressionReason::Unsubscribe);
        assert_eq!(entry.scope.as_deref(), Some("example.test"));
        assert!(
            backend.state.suppressed("leaver@dest.test", "plain.test", queue::now_millis()).await.unwrap().is_none(),
            "plain.test may still send"
        );
        assert!(events(&backend).await.iter().any(|e| e.kind == EventType::Unsubscribed));

        // (d) Forged and malformed input: 250, nothing suppressed, counted.
        let before = metrics(http_port).await;
        let forged_keys = FeedbackKeys::from_secret(b"not the relay's key, 32 bytes or more");
        let forged_sender = forged_keys
            .verp_sender(&queue_id, "example.test", "victim@dest.test", RETURN_PATH)
            .unwrap();
        let forged = dsn(&forged_sender, "victim@dest.test", "failed", "5.1.1", "550 5.1.1 no such user", "Subject: x\r\nMessage-ID: <victim@example.test>\r\n");
        let reply = fb.send("", &[&forged_sender], &forged).await;
        assert!(reply.starts_with("250"), "{reply}");
        // A real token, a recipient it was not sealed for.
        let wrong = dsn(&gone.mail_from, "victim@dest.test", "failed", "5.1.1", "550 5.1.1 no", "Subject: x\r\n");
        fb.send("", &[&gone.mail_from], &wrong).await;
        // A Message-ID of ours alone attributes nothing.
        let by_id = dsn(&format!("postmaster@{RETURN_PATH}"), "victim@dest.test", "failed", "5.1.1", "550 5.1.1 no",
            &format!("Message-ID: <{queue_id}@relay.test>\r\nTo: victim@dest.test\r\n"));
        fb.send("", &[&format!("postmaster@{RETURN_PATH}")], &by_id).await;
        let malformed = b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nyour mail bounced, sorry\r\n--b--\r\n";
        fb.send("", &[&gone.mail_from], malformed).await;
        fb.send("", &[&gone.mail_from], b"\x00\xff\xfe garbage without headers").await;
        let forged_unsubscribe = format!("{}@{RETURN_PATH}", keys.unsubscribe_mailto_local("example.test", "someone@dest.test"));
        fb.send("attacker@evil.test", &[&forged_unsubscribe], b"From: attacker@evil.test\r\n\r\nunsubscribe\r\n").await;
        fb.cmd("QUIT", "221").await;
        for address in ["victim@dest.test", "someone@dest.test"] {
            assert!(
                backend.state.suppressed(address, "example.test", queue::now_millis()).await.unwrap().is_none(),
                "{address} must not be suppressed"
            );
        }
        let after = metrics(http_port).await;
        assert_eq!(counter(&after, "unattributed") - counter(&before, "unattributed"), 4, "{after}");
        assert_eq!(counter(&after, "unparsed") - counter(&before, "unparsed"), 2, "{after}");
        assert_eq!(counter(&after, "bounce"), 1);
        assert_eq!(counter(&after, "delayed"), 1);
        assert_eq!(counter(&after, "complaint"), 1);
        assert_eq!(counter(&after, "unsubscribe"), 1);
        let all = events(&backend).await;
        assert!(
            !all.iter().any(|e| e.recipient.as_deref() == Some("victim@dest.test")),
            "forged reports leave no event"
        );
        assert!(
            !all.iter().any(|e| e.kind == EventType::Rejected),
            "refusals on the feedback listener are no events"
        );

        // (f) The fallback: an ARF report whose returned headers carry only
        // the original Message-ID and To (no Return-Path, no
        // List-Unsubscribe) is attributed by the record stored at accept,
        // and only to a recipient of that message.
        let got = deliver(smtp_port, &sink, "app@example.test", &["fan@dest.test", "co@dest.test"], 6).await;
        let fan = got.iter().find(|r| r.rcpt_to[0] == "fan@dest.test").expect("fan's copy");
        let token = fan.mail_from.strip_prefix("b+").unwrap().rsplit_once('@').unwrap().0;
        let fan_queue_id = keys.open_verp(token, &["fan@dest.test"], &["example.test"]).unwrap().queue_id;
        let bare = |message_id: &str, to: &str| format!("Message-ID: <{message_id}>\r\nTo: {to}\r\n\r\nhello\r\n").into_bytes();
        let fbl = format!("fbl@{RETURN_PATH}");
        let before = metrics(http_port).await;
        let mut fb = Client::connect(feedback_port).await;
        // A Message-ID the relay never sent, naming a real recipient.
        let unknown = arf(&fbl, "fan@dest.test", &bare("never-sent@example.test", "fan@dest.test"));
        let reply = fb.send("fbl@provider.test", &[&fbl], &unknown).await;
        assert!(reply.starts_with("250"), "{reply}");
        // The real Message-ID, naming someone it was not sent to.
        let stranger = arf(&fbl, "stranger@dest.test", &bare("fan.dest.test@example.test", "stranger@dest.test"));
        let reply = fb.send("fbl@provider.test", &[&fbl], &stranger).await;
        assert!(reply.starts_with("250"), "{reply}");
        for address in ["fan@dest.test", "co@dest.test", "stranger@dest.test"] {
            assert!(
                backend.state.suppressed(address, "example.test", queue::now_millis()).await.unwrap().is_none(),
                "{address} must not be suppressed by a report the record does not back"
            );
        }
        let after = metrics(http_port).await;
        assert_eq!(counter(&after, "unattributed") - counter(&before, "unattributed"), 2, "{after}");
        assert_eq!(counter(&after, "complaint"), 1, "{after}");
        // The real Message-ID and a real recipient.
        let genuine = arf(&fbl, "fan@dest.test", &bare("fan.dest.test@example.test", "fan@dest.test"));
        let reply = fb.send("fbl@provider.test", &[&fbl], &genuine).await;
        assert!(reply.starts_with("250"), "{reply}");
        fb.cmd("QUIT", "221").await;
        let entry = backend
            .state
            .suppressed("fan@dest.test", "example.test", queue::now_millis())
            .await
            .unwrap()
            .expect("suppressed after the complaint found by Message-ID");
        assert_eq!(entry.reason, SuppressionReason::Complaint);
        assert!(
            backend.state.suppressed("co@dest.test", "example.test", queue::now_millis()).await.unwrap().is_none(),
            "the co-recipient is not reported"
        );
        let all = events(&backend).await;
        let c: Vec<&Event> = all
            .iter()
            .filter(|e| e.kind == EventType::Complained && e.recipient.as_deref() == Some("fan@dest.test"))
            .collect();
        assert_eq!(c.len(), 1, "{all:?}");
        assert_eq!(c[0].queue_id.as_deref(), Some(fan_queue_id.as_str()));
        assert_eq!(c[0].sending_domain.as_deref(), Some("example.test"));
        assert_eq!(c[0].header_message_id.as_deref(), Some("fan.dest.test@example.test"));
        assert!(!all.iter().any(|e| e.recipient.as_deref() == Some("stranger@dest.test")));
        let last = metrics(http_port).await;
        assert_eq!(counter(&last, "complaint"), 2, "{last}");
        assert_eq!(counter(&last, "unattributed"), counter(&after, "unattributed"), "{last}");

        let _ = stop.send(());
        relay.await.unwrap().unwrap();
    })
    .await
    .expect("test timed out");
}
