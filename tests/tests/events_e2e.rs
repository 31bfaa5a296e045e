//! Events end to end: the whole relay in process (`server::run_until`),
//! real TCP SMTP in, a spawned redis-server, the in-process DNS and the
//! SMTP sink as every destination's MX. Events are read back from the
//! outbox through a second, independent connection to the backend.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use petrel_relay::config::RelayConfig;
use petrel_relay::events::{BounceType, Event, EventType};
use petrel_relay::queue::{self, SuppressionEntry, SuppressionReason};
use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Reply, SmtpSink};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(90);

fn key_file() -> PathBuf {
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
            // The relay binds its listener during start-up.
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

    async fn send(&mut self, from: &str, rcpts: &[&str], message: &str) {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250").await;
        }
        self.cmd("DATA", "354").await;
        self.cmd(&format!("{message}\r\n."), "250").await;
    }
}

/// The relay's config: SMTP on `smtp_port`, delivery by MX via `dns` to
/// the sink, the Redis queue at `redis_url`.
fn config(
    smtp_port: u16,
    http_port: u16,
    redis_url: &str,
    dns: std::net::SocketAddr,
    mx_port: u16,
) -> String {
    let key = key_file();
    let key = key.display();
    format!(
        r#"
hostname: relay.test
listeners:
  - {{name: smtp, address: "127.0.0.1:{smtp_port}", tls: none, auth: none}}
trustedNetworks: ["127.0.0.0/8"]
http: {{address: "127.0.0.1:{http_port}"}}
domains:
  - domain: example.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: "{key}"}}
  - domain: corp.test
    onSuppressed: drop
    dkim: {{selector: example, algorithm: ed25519, keyFile: "{key}"}}
queue:
  redis: {{url: "{redis_url}", keyPrefix: events-e2e}}
  lease: 30s
delivery:
  transport: mx
  mx: {{port: {mx_port}, nameservers: ["{dns}"]}}
  retrySchedule: [1s]
  timeouts: {{connect: 5s, greeting: 5s, command: 5s, data: 5s}}
"#
    )
}

fn count(events: &[Event], kind: EventType) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

#[tokio::test]
async fn every_outcome_is_an_event_with_its_tags() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        let sink = SmtpSink::start().await.expect("sink");
        for domain in ["dest.test", "example.test"] {
            dns.add_mx(domain, 10, "mx.dest.test");
        }
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        sink.on_rcpt("bad@dest.test", Reply::new(550, "5.1.1 no such user"));
        sink.on_rcpt("later@dest.test", Reply::new(451, "4.3.0 try later"));

        let dir = tempfile::tempdir().unwrap();
        let (smtp_port, http_port) = (free_port(), free_port());
        let yaml = config(smtp_port, http_port, &redis.url(), dns.addr(), sink.port());
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let parsed = RelayConfig::from_yaml(&yaml).unwrap();
        // Our own look into the same backend.
        let backend = queue::open(&parsed.queue).await.unwrap();
        backend
            .state
            .suppress(SuppressionEntry {
                address: "gone@dest.test".into(),
                reason: SuppressionReason::Bounce,
                scope: None,
                remote_reply: None,
                created_at: queue::now_millis(),
                expires_at: None,
            })
            .await
            .unwrap();

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            petrel_relay::server::run_until(&path, async move {
                let _ = stopped.await;
            })
            .await
        });

        let mut c = Client::connect(smtp_port).await;
        c.cmd("EHLO client.test", "250").await;
        for i in 0..3 {
            let rcpts = [format!("a{i}@dest.test"), format!("b{i}@dest.test")];
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            c.send(
                "sender@example.test",
                &rcpts,
                &format!(
                    "X-Petrel-Tags: order={i}, app=shop\r\nMessage-ID: <m{i}@example.test>\r\nFrom: sender@example.test\r\nSubject: m{i}\r\n\r\nhello {i}"
                ),
            )
            .await;
        }
        c.send("sender@example.test", &["bad@dest.test"], "Subject: bad\r\n\r\nx").await;
        c.send("sender@example.test", &["later@dest.test"], "Subject: later\r\n\r\nx").await;
        // example.test refuses suppressed recipients, corp.test drops them.
        c.cmd("MAIL FROM:<sender@example.test>", "250").await;
        c.cmd("RCPT TO:<gone@dest.test>", "550").await;
        c.cmd("RSET", "250").await;
        c.send(
            "sender@corp.test",
            &["gone@dest.test", "ok@dest.test"],
            "Subject: corp\r\n\r\nx",
        )
        .await;
        c.cmd("QUIT", "221").await;

        // Wait until every expected event is in the outbox.
        let events = loop {
            let events: Vec<Event> = backend
                .events
                .read(None, 1000)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event)
                .collect();
            let done = count(&events, EventType::Accepted) >= 9
                && count(&events, EventType::Delivered) >= 8
                && count(&events, EventType::Dsn) >= 1
                && count(&events, EventType::Deferred) >= 1
                && count(&events, EventType::Rejected) >= 1;
            if done {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(count(&events, EventType::Accepted), 9);
        assert_eq!(count(&events, EventType::Delivered), 8, "6 + the DSN + ok@");
        assert_eq!(count(&events, EventType::Bounced), 1);
        assert_eq!(count(&events, EventType::Dsn), 1);
        assert_eq!(count(&events, EventType::Rejected), 1);
        assert_eq!(count(&events, EventType::Suppressed), 1);
        let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), events.len(), "event ids are unique");

        // Tags and the header Message-ID in every event of the tagged mail.
        for i in 0..3 {
            let mid = format!("m{i}@example.test");
            let of_message: Vec<&Event> = events
                .iter()
                .filter(|e| e.header_message_id.as_deref() == Some(mid.as_str()))
                .collect();
            assert_eq!(of_message.len(), 4, "accepted + delivered for 2 recipients");
            let want = BTreeMap::from([
                ("app".to_string(), "shop".to_string()),
                ("order".to_string(), i.to_string()),
            ]);
            assert!(of_message.iter().all(|e| e.tags == want), "{of_message:?}");
            assert!(of_message.iter().all(|e| e.queue_id.is_some()));
        }
        let bounced = events.iter().find(|e| e.kind == EventType::Bounced).unwrap();
        assert_eq!(bounced.recipient.as_deref(), Some("bad@dest.test"));
        assert_eq!(bounced.bounce_type, Some(BounceType::Hard));
        assert_eq!(bounced.enhanced_status.as_deref(), Some("5.1.1"));
        assert!(bounced.response.as_deref().unwrap().contains("no such user"));
        let dsn = events.iter().find(|e| e.kind == EventType::Dsn).unwrap();
        assert!(dsn.dsn_queue_id.is_some());
        let deferred = events.iter().find(|e| e.kind == EventType::Deferred).unwrap();
        assert_eq!(deferred.recipient.as_deref(), Some("later@dest.test"));
        assert_eq!(deferred.attempt, Some(1));
        assert!(deferred.next_attempt_at.is_some());
        let rejected = events.iter().find(|e| e.kind == EventType::Rejected).unwrap();
        assert_eq!(rejected.recipient.as_deref(), Some("gone@dest.test"));
        assert!(rejected.response.as_deref().unwrap().starts_with("550"));
        let suppressed = events.iter().find(|e| e.kind == EventType::Suppressed).unwrap();
        assert_eq!(suppressed.recipient.as_deref(), Some("gone@dest.test"));
        let delivered = events
            .iter()
            .find(|e| e.kind == EventType::Delivered && e.recipient.as_deref() == Some("a0@dest.test"))
            .unwrap();
        assert_eq!(delivered.remote_mta.as_deref(), Some("mx.dest.test"));
        assert_eq!(delivered.attempt, Some(1));
        // The TLS policy that applied, as in `petrel_outbound_tls_total`.
        assert_eq!(delivered.tls_policy.as_deref(), Some("opportunistic"));
        assert_eq!(bounced.tls_policy.as_deref(), Some("opportunistic"));
        assert_eq!(deferred.tls_policy.as_deref(), Some("opportunistic"));

        // The tag header never reached a destination.
        for got in sink.received() {
            let text = String::from_utf8_lossy(&got.data).to_ascii_lowercase();
            assert!(!text.contains("x-petrel-tags"), "{text}");
        }

        // The admin API serves the same log to loopback, in order.
        let page = admin_get(http_port, "/admin/v1/events?limit=3").await;
        let page: serde_json::Value = serde_json::from_str(&page).unwrap();
        let first: Vec<&str> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(first, events[..3].iter().map(|e| e.id.as_str()).collect::<Vec<_>>());

        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(40), relay).await;
    })
    .await
    .expect("test timed out");
}

/// GET on the relay's HTTP port, body of a 200.
async fn admin_get(port: u16, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}
