//! End-to-end tests of the `petrel-relay` binary as a user runs it: the
//! README quick start (examples/local/relay.yaml, embedded queue, Maildir),
//! the open-relay refusal, "250 means durable" across a `kill -9` with the
//! embedded queue, and the same binary over a spawned Redis with MX delivery
//! to the harness SMTP sink. Every peer is real and on 127.0.0.1: SMTP over
//! TCP, HTTP for metrics and health, DNS from the in-process server, and the
//! DKIM signature is checked with mail-auth's verifier against that DNS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use petrel_crds::config::RelayConfig;
use petrel_tests::dns::{DnsServer, Failure};
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::relay_proc::RelayProc;
use petrel_tests::smtp_sink::SmtpSink;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Upper bound for a whole test.
const LIMIT: Duration = Duration::from_secs(120);
/// How long a delivery may take (a retry after 1s, lease expiry after a kill).
const DELIVERY: Duration = Duration::from_secs(60);

/// The default `limits.shutdownGrace`, which every config here keeps.
const GRACE: Duration = Duration::from_secs(30);

/// The repository root, for the example config and key.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The quick start config and the key it names.
fn example_config() -> PathBuf {
    repo().join("examples/local/relay.yaml")
}

fn example_key() -> PathBuf {
    repo().join("examples/local/dkim-example.test.key")
}

/// The DKIM TXT record published for the example key, taken from the
/// comment in relay.yaml, so the test checks what the README tells users.
fn example_dkim_record() -> String {
    let text = std::fs::read_to_string(example_config()).expect("read relay.yaml");
    let line = text
        .lines()
        .find_map(|l| l.find("v=DKIM1;").map(|i| l[i..].trim().to_string()))
        .expect("relay.yaml names its public key in a comment");
    assert!(line.contains("k=ed25519; p="), "{line}");
    line
}

/// A minimal SMTP client over plain TCP: one command, one (multi-line) reply.
struct Smtp {
    reader: BufReader<TcpStream>,
}

impl Smtp {
    async fn connect(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr).await.expect("connect to relay");
        let mut smtp = Smtp {
            reader: BufReader::new(stream),
        };
        let greeting = smtp.reply().await;
        assert!(greeting.starts_with("220"), "greeting: {greeting}");
        smtp
    }

    /// Reads one reply; returns all its lines joined with '\n'.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("read reply");
            assert!(n > 0, "connection closed after {lines:?}");
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        let stream = self.reader.get_mut();
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write command");
        self.reply().await
    }

    /// Sends `cmd`, asserting the reply starts with `expect`.
    async fn expect(&mut self, line: &str, expect: &str) -> String {
        let reply = self.cmd(line).await;
        assert!(
            reply.starts_with(expect),
            "{line} -> {reply}, wanted {expect}"
        );
        reply
    }

    /// EHLO, MAIL, RCPT, DATA with `body` (no leading dots), QUIT; returns
    /// the reply to the final dot.
    async fn send(addr: SocketAddr, from: &str, to: &str, body: &str) -> String {
        let mut c = Smtp::connect(addr).await;
        c.expect("EHLO client.test", "250").await;
        c.expect(&format!("MAIL FROM:<{from}>"), "250").await;
        c.expect(&format!("RCPT TO:<{to}>"), "250").await;
        c.expect("DATA", "354").await;
        let mut data = body.replace("\r\n", "\n").replace('\n', "\r\n");
        if !data.ends_with("\r\n") {
            data.push_str("\r\n");
        }
        data.push('.');
        let reply = c.cmd(&data).await;
        c.expect("QUIT", "221").await;
        reply
    }
}

/// A message without Message-ID and Date, so the relay must add them.
fn message(from: &str, to: &str, subject: &str) -> String {
    format!(
        "From: Sender <{from}>\nTo: <{to}>\nSubject: {subject}\n\nHello from the quick start.\nSecond line.\n"
    )
}

/// GET over HTTP/1.1 with `Connection: close`; returns (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to http");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample of `name` whose labels contain every one of
/// `labels` (`domain="example.test"`), if exported.
fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Verifies every DKIM signature of `message` against `dns`; returns the
/// signature's d= and s=.
async fn verify_dkim(dns: SocketAddr, message: &[u8]) -> (String, String) {
    let mut conn = ConnectionConfig::udp();
    conn.port = dns.port();
    let ns = NameServerConfig::new(dns.ip(), true, vec![conn]);
    let authenticator = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![ns]),
        ResolverOpts::default(),
    )
    .expect("resolver");
    let parsed = AuthenticatedMessage::parse(message).expect("parse message");
    let results = authenticator.verify_dkim(&parsed).await;
    let text = String::from_utf8_lossy(message);
    assert_eq!(results.len(), 1, "one signature:\n{text}");
    assert_eq!(*results[0].result(), DkimResult::Pass, "{text}");
    let sig = results[0].signature().expect("signature parsed");
    (sig.d.clone(), sig.s.clone())
}

/// The harness DNS with the example key's record published.
async fn dns_with_dkim() -> DnsServer {
    let dns = DnsServer::start().await.expect("dns");
    dns.add_txt("example._domainkey.example.test", &example_dkim_record());
    dns
}

/// Waits until a file appears in `dir` (a Maildir `new/`); there is no
/// event across processes, so this polls, bounded by `DELIVERY`.
async fn wait_for_file(dir: &Path) -> PathBuf {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            if let Some(file) = files.into_iter().next() {
                return file;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing delivered into {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls /metrics until `name{labels}` reaches `want` (counters move after
/// the delivery the test saw); returns the last body for diagnostics.
async fn wait_for_metric(http: SocketAddr, name: &str, labels: &[&str], want: f64) -> String {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let (status, body) = http_get(http, "/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        if metric(&body, name, labels) == Some(want) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} never reached {want}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// The quick start config with fresh ports and the key at its repo path.
fn quickstart_config(smtp: SocketAddr, http: SocketAddr) -> RelayConfig {
    let text = std::fs::read_to_string(example_config()).expect("read relay.yaml");
    let mut config: RelayConfig = serde_yaml::from_str(&text).expect("relay.yaml parses");
    assert_eq!(
        config.listeners.len(),
        1,
        "the quick start has one listener"
    );
    config.listeners[0].address = smtp;
    config.http.address = http;
    config.domains[0].dkim.key_file = example_key();
    config
}

/// Writes `config` (validated on the way, as the relay will) as relay.yaml.
fn write_config(dir: &Path, config: &RelayConfig) -> PathBuf {
    config.validate().expect("test config validates");
    let path = dir.join("relay.yaml");
    std::fs::write(&path, config.to_yaml().expect("serialise")).expect("write config");
    path
}

#[tokio::test]
async fn quick_start_signs_delivers_to_maildir_and_reports_metrics() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        let config = write_config(dir.path(), &quickstart_config(smtp, http));
        let dns = dns_with_dkim().await;
        let relay = RelayProc::start(dir.path(), &config, smtp, http).await;

        let (status, _) = http_get(relay.http, "/healthz").await;
        assert_eq!(status, 200, "/healthz");
        let reply = Smtp::send(
            relay.smtp,
            "app@example.test",
            "someone@example.org",
            &message("app@example.test", "someone@example.org", "quick start"),
        )
        .await;
        assert!(reply.starts_with("250"), "end of DATA: {reply}");

        // The Maildir is relative to the working directory, as in the README.
        let file = wait_for_file(&dir.path().join(".petrel/maildir/new")).await;
        let delivered = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&delivered).into_owned();
        let headers = text.split("\r\n\r\n").next().unwrap_or_default();
        for name in ["Received:", "Message-ID:", "Date:", "DKIM-Signature:"] {
            assert!(
                headers.lines().any(|l| l.starts_with(name)),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("Hello from the quick start."), "{text}");
        let (d, s) = verify_dkim(dns.addr(), &delivered).await;
        assert_eq!((d.as_str(), s.as_str()), ("example.test", "example"));

        let body = wait_for_metric(
            relay.http,
            "petrel_recipients_delivered_total",
            &["domain=\"example.test\""],
            1.0,
        )
        .await;
        assert_eq!(
            metric(
                &body,
                "petrel_messages_received_total",
                &["domain=\"example.test\""]
            ),
            Some(1.0),
            "{body}"
        );
        let (status, body) = http_get(relay.http, "/readyz").await;
        assert_eq!(status, 200, "/readyz: {body}");

        assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
    })
    .await
    .expect("test timed out");
}

/// A config on the embedded queue (under `dir`) delivering by MX with DNS
/// from `dns`, every MX on `mx_port`, retrying after 1s.
fn mx_embedded_config(
    smtp: SocketAddr,
    http: SocketAddr,
    dns: SocketAddr,
    mx_port: u16,
) -> RelayConfig {
    let yaml = format!(
        r#"
hostname: relay.example.test
listeners:
  - name: smtp
    address: "{smtp}"
trustedNetworks: [127.0.0.0/8]
domains:
  - domain: example.test
    dkim:
      selector: example
      algorithm: ed25519
      keyFile: "{key}"
queue:
  embedded:
    path: .petrel/queue.redb
  # The shortest lease allowed: after a kill -9 mid-attempt the unit is due
  # again quickly.
  lease: 10s
delivery:
  transport: mx
  mx:
    port: {mx_port}
    nameservers: ["{dns}"]
  retrySchedule: [1s]
  timeouts:
    connect: 5s
    greeting: 5s
    command: 5s
    data: 5s
http:
  address: "{http}"
"#,
        key = example_key().display(),
    );
    RelayConfig::from_yaml(&yaml).expect("mx config")
}

#[tokio::test]
async fn refuses_open_relay_and_keeps_accepted_mail_across_kill_9() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let sink = SmtpSink::start().await.unwrap();
        let dns = dns_with_dkim().await;
        // The destination's DNS is down: delivery defers, the message stays queued.
        dns.set_failure("dest.test", Failure::ServFail);
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        let config = write_config(
            dir.path(),
            &mx_embedded_config(smtp, http, dns.addr(), sink.port()),
        );
        let relay = RelayProc::start(dir.path(), &config, smtp, http).await;

        // Not a configured sending domain: no relaying, even from a trusted network.
        let mut c = Smtp::connect(relay.smtp).await;
        c.expect("EHLO client.test", "250").await;
        c.expect("MAIL FROM:<someone@not-configured.test>", "550 5.7.1")
            .await;
        c.expect("QUIT", "221").await;

        let reply = Smtp::send(
            relay.smtp,
            "app@example.test",
            "user@dest.test",
            &message("app@example.test", "user@dest.test", "durable"),
        )
        .await;
        assert!(reply.starts_with("250"), "end of DATA: {reply}");
        // Wait until the relay has tried (and failed) to resolve the
        // destination, so the kill lands on a message that is really queued.
        let mx_queries = || {
            dns.queries()
                .iter()
                .filter(|(name, _)| name.trim_end_matches('.').eq_ignore_ascii_case("dest.test"))
                .count()
        };
        let deadline = tokio::time::Instant::now() + DELIVERY;
        while mx_queries() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no MX lookup:\n{}",
                relay.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.crash().await;
        assert!(
            sink.received().is_empty(),
            "nothing delivered while DNS fails"
        );

        // Restart on the same state; it must pick the message up again
        // (another lookup) while DNS still fails ...
        let before = mx_queries();
        let relay = RelayProc::start(dir.path(), &config, smtp, http).await;
        let deadline = tokio::time::Instant::now() + DELIVERY;
        while mx_queries() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "restarted relay never retried the queued message:\n{}",
                relay.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ... and deliver it once DNS answers.
        dns.clear_failure("dest.test");
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let got = sink.wait_for(1, DELIVERY).await;
        assert_eq!(got.len(), 1, "delivered after restart:\n{}", relay.log());
        assert_eq!(got[0].rcpt_to, vec!["user@dest.test".to_string()]);
        assert_eq!(got[0].mail_from, "app@example.test");
        verify_dkim(dns.addr(), &got[0].data).await;
        assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
        assert_eq!(sink.received().len(), 1, "delivered once");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn redis_queue_delivers_by_mx_with_valid_dkim() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start().await.unwrap();
        let sink = SmtpSink::start().await.unwrap();
        let dns = dns_with_dkim().await;
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        let mut config = mx_embedded_config(smtp, http, dns.addr(), sink.port());
        config.queue.embedded = None;
        config.queue.redis =
            Some(serde_yaml::from_str(&format!("url: \"{}\"", redis.url())).expect("redis queue"));
        let config = write_config(dir.path(), &config);
        let relay = RelayProc::start(dir.path(), &config, smtp, http).await;

        let reply = Smtp::send(
            relay.smtp,
            "app@example.test",
            "user@dest.test",
            &message("app@example.test", "user@dest.test", "over redis"),
        )
        .await;
        assert!(reply.starts_with("250"), "end of DATA: {reply}");
        let got = sink.wait_for(1, DELIVERY).await;
        assert_eq!(got.len(), 1, "delivered:\n{}", relay.log());
        assert_eq!(got[0].rcpt_to, vec!["user@dest.test".to_string()]);
        let (d, s) = verify_dkim(dns.addr(), &got[0].data).await;
        assert_eq!((d.as_str(), s.as_str()), ("example.test", "example"));
        assert!(
            !dir.path().join(".petrel").exists(),
            "the Redis variant writes no local state"
        );
        wait_for_metric(
            relay.http,
            "petrel_recipients_delivered_total",
            &["domain=\"example.test\""],
            1.0,
        )
        .await;
        assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
    })
    .await
    .expect("test timed out");
}
