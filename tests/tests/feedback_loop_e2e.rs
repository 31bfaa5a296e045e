//! The feedback loop end to end through the whole relay
//! (`server::run_until`) over a spawned Redis: deliveries to a real SMTP
//! server found by MX through the in-process DNS, refusals over real
//! SMTP, the HTTP send API and the admin API on the relay's HTTP port.
//!
//! Reputation: hard bounces from the destination pause the sending
//! domain (451 4.7.1 at MAIL FROM, HTTP 503, queued mail held without an
//! attempt), the pause survives a relay restart, and the admin resume
//! lifts it and starts a new window.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::common::crypto::Ed25519Key;
use petrel_relay::config::RelayConfig;
use petrel_relay::queue::{self, MessageFlags, NewMessage, SettleOp, Settlement, now_millis};
use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Reply, SmtpSink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(180);

struct World {
    dir: tempfile::TempDir,
    _dns: DnsServer,
    sink: SmtpSink,
    _redis: RedisServer,
    smtp: SocketAddr,
    http: SocketAddr,
}

struct Relay {
    backend: queue::Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl World {
    async fn new(domains: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let dns = DnsServer::start().await.unwrap();
        let ed = Ed25519Key::generate_pkcs8().unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(&ed)
        );
        std::fs::write(dir.path().join("ed.pem"), pem).unwrap();
        let public = Ed25519Key::from_pkcs8_der(&ed).unwrap().public_key();
        for domain in ["example.test", "other.test"] {
            dns.add_txt(
                &format!("s1._domainkey.{domain}"),
                &format!("v=DKIM1; k=ed25519; p={}", B64.encode(&public)),
            );
            // DSNs to the apps go to the sink too.
            dns.add_mx(domain, 10, "mx.dest.test");
        }
        dns.add_mx("dest.test", 10, "mx.dest.test");
        dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
        std::fs::write(dir.path().join("feedback.key"), "f".repeat(40)).unwrap();
        let sink = SmtpSink::builder().starttls(false).start().await.unwrap();
        let redis = RedisServer::start().await.unwrap();
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = dir.path().display().to_string();
        let yaml = format!(
            r#"
hostname: relay.test
listeners:
  - {{name: smtp, address: "{smtp}"}}
trustedNetworks: ["127.0.0.0/8"]
http: {{address: "{http}"}}
queue:
  redis: {{url: "{redis}", keyPrefix: loop}}
  timeout: 5s
  lease: 30s
delivery:
  transport: mx
  mx: {{port: {port}, nameservers: ["{ns}"]}}
  retrySchedule: [1s]
  timeouts: {{connect: 5s, greeting: 5s, command: 5s, data: 5s}}
feedback: {{keyFile: {d}/feedback.key}}
domains:
{domains}"#,
            redis = redis.url(),
            port = sink.port(),
            ns = dns.addr(),
            domains = domains.replace("KEY", &format!("{d}/ed.pem")),
        );
        std::fs::write(dir.path().join("relay.yaml"), &yaml).unwrap();
        RelayConfig::from_yaml(&yaml).expect("test config");
        World {
            dir,
            _dns: dns,
            sink,
            _redis: redis,
            smtp,
            http,
        }
    }

    async fn start(&self) -> Relay {
        let path = self.dir.path().join("relay.yaml");
        let config = RelayConfig::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let backend = queue::open(&config.queue).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            petrel_relay::server::run_until(&path, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        for addr in [self.http, self.smtp] {
            petrel_tests::ports::wait_for_port(addr, Duration::from_secs(30))
                .await
                .unwrap();
        }
        Relay {
            backend,
            stop: Some(stop),
            task,
        }
    }

    /// One SMTP dialogue; returns every reply's last line, one per command.
    async fn smtp(&self, commands: &[&str]) -> Vec<String> {
        let stream = TcpStream::connect(self.smtp).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut replies = Vec::new();
        let read = async |r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>| loop {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        };
        read(&mut r).await;
        for c in commands {
            w.write_all(c.as_bytes()).await.unwrap();
            w.write_all(b"\r\n").await.unwrap();
            replies.push(read(&mut r).await);
        }
        replies
    }

    /// Sends one message over SMTP and expects it accepted.
    async fn send(&self, from: &str, to: &str, extra_headers: &str) {
        let data = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: hello\r\n{extra_headers}\r\nHello.\r\n."
        );
        let replies = self
            .smtp(&[
                "EHLO client.test",
                &format!("MAIL FROM:<{from}>"),
                &format!("RCPT TO:<{to}>"),
                "DATA",
                &data,
                "QUIT",
            ])
            .await;
        assert!(replies[4].starts_with("250"), "{replies:?}");
    }

    async fn http(&self, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
        http(self.http, method, path, headers, body).await
    }

    async fn reputation(&self) -> serde_json::Value {
        let (status, body) = self.http("GET", "/admin/v1/reputation", "", "").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn domain_state(&self, domain: &str) -> serde_json::Value {
        let all = self.reputation().await;
        all["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["domain"] == domain)
            .cloned()
            .unwrap_or_else(|| panic!("{domain} not listed: {all}"))
    }

    /// Messages the sink accepted from apps (DSNs to the apps left out).
    fn delivered_to(&self, rcpt: &str) -> Vec<petrel_tests::smtp_sink::Received> {
        self.sink
            .received()
            .into_iter()
            .filter(|r| !r.mail_from.is_empty() && r.rcpt_to.iter().any(|t| t == rcpt))
            .collect()
    }
}

impl Relay {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A raw HTTP/1.1 request: status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay.test\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` every 50 ms until it holds or `within` passes.
async fn until<F: AsyncFn() -> bool>(within: Duration, check: F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REPUTATION_DOMAINS: &str = r#"
  - domain: example.test
    dkim: {selector: s1, algorithm: ed25519, keyFile: KEY}
    reputation: {minVolume: 4, maxBounceRate: 20%}
  - domain: other.test
    dkim: {selector: s1, algorithm: ed25519, keyFile: KEY}
"#;

const PAUSED: &str =
    "451 4.7.1 sending for example.test is paused: bounce rate 50% over 24h exceeds 20%";

#[tokio::test]
async fn hard_bounces_pause_the_domain_until_the_admin_resumes_it() {
    tokio::time::timeout(LIMIT, async {
        let w = World::new(REPUTATION_DOMAINS).await;
        let relay = w.start().await;
        for bad in ["bad1@dest.test", "bad2@dest.test"] {
            w.sink.on_rcpt(bad, Reply::new(550, "5.1.1 no such user"));
        }
        // Two delivered, one bounced: 33% over 20%, but under minVolume 4.
        for to in ["good1@dest.test", "good2@dest.test", "bad1@dest.test"] {
            w.send("app@example.test", to, "").await;
        }
        assert!(
            until(Duration::from_secs(30), async || w.domain_state("example.test").await["volume"] == 3).await,
            "three outcomes counted: {}",
            w.reputation().await
        );
        assert_eq!(w.domain_state("example.test").await["state"], "ok");
        // A fourth: two of four bounced, 50% with volume 4: paused.
        w.send("app@example.test", "bad2@dest.test", "").await;
        assert!(
            until(Duration::from_secs(30), async || w.domain_state("example.test").await["state"] == "paused").await,
            "paused: {}",
            w.reputation().await
        );
        let s = w.domain_state("example.test").await;
        assert_eq!(s["reason"], "BounceRateExceeded");
        assert_eq!(s["message"], "bounce rate 50% over 24h exceeds 20%");
        assert_eq!(s["bounceRate"], 0.5);
        assert_eq!(s["complaintRate"], 0.0);
        assert_eq!(s["volume"], 4);
        assert!(s["since"].as_str().unwrap().ends_with('Z'), "{s}");
        let other = w.domain_state("other.test").await;
        assert_eq!(other["state"], "ok");
        assert_eq!(other["reason"], serde_json::Value::Null);

        // New mail: 451 at MAIL FROM over SMTP, 503 over HTTP; other
        // domains are not affected.
        let replies = w
            .smtp(&["EHLO client.test", "MAIL FROM:<app@example.test>", "RSET", "MAIL FROM:<app@other.test>", "QUIT"])
            .await;
        assert_eq!(replies[1].trim_end(), PAUSED, "{replies:?}");
        assert!(replies[3].starts_with("250"), "{replies:?}");
        let (status, body) = w
            .http(
                "POST",
                "/v1/send",
                "Content-Type: application/json\r\n",
                r#"{"from":"app@example.test","to":["good3@dest.test"],"subject":"hi","text":"hello"}"#,
            )
            .await;
        assert_eq!(status, 503, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body["error"]["message"],
            "sending for example.test is paused: bounce rate 50% over 24h exceeds 20%"
        );
        assert_eq!(body["error"]["code"], 451);
        assert_eq!(body["error"]["enhanced"], "4.7.1");

        // Mail already queued for the domain is held, without an attempt.
        relay
            .backend
            .queue
            .enqueue(
                NewMessage {
                    id: "held1".into(),
                    mail_from: "app@example.test".into(),
                    recipients: vec!["held@dest.test".into()],
                    data: b"From: app@example.test\r\nSubject: held\r\n\r\nheld\r\n".to_vec(),
                    sending_domain: "example.test".into(),
                    received_at: now_millis(),
                    flags: MessageFlags::default(),
                    tags: Default::default(),
                    header_message_id: None,
                },
                Vec::new(),
            )
            .await
            .unwrap();
        let held_metric = async || {
            let (_, text) = w.http("GET", "/metrics", "", "").await;
            text.lines().any(|l| {
                l.starts_with("petrel_reputation_held_total{domain=\"example.test\"}")
                    && !l.ends_with(" 0")
            })
        };
        assert!(until(Duration::from_secs(30), held_metric).await, "unit held");
        let (_, metrics) = w.http("GET", "/metrics", "", "").await;
        assert!(metrics.contains("petrel_reputation_state{domain=\"example.test\"} 2"), "{metrics}");
        assert!(metrics.contains("petrel_reputation_state{domain=\"other.test\"} 0"), "{metrics}");
        assert!(metrics.contains("petrel_reputation_bounce_rate{domain=\"example.test\"} 0.5"), "{metrics}");
        // A restart keeps the pause (it lives in Redis).
        relay.stop().await;
        let relay = w.start().await;
        assert_eq!(w.domain_state("example.test").await["state"], "paused");
        let replies = w.smtp(&["EHLO client.test", "MAIL FROM:<app@example.test>", "QUIT"]).await;
        assert_eq!(replies[1].trim_end(), PAUSED);

        // Resume through the admin API: ok, a new window, mail flows.
        let (status, body) = w
            .http("POST", "/admin/v1/reputation/example.test/resume", "", "")
            .await;
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, serde_json::json!({"domain": "example.test", "state": "ok"}));
        let s = w.domain_state("example.test").await;
        assert_eq!(s["state"], "ok", "{s}");
        assert_eq!(s["volume"], 0, "window reset: {s}");
        assert_eq!(s["since"], serde_json::Value::Null);
        let (status, body) = w
            .http("POST", "/admin/v1/reputation/nope.test/resume", "", "")
            .await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("\"error\""), "{body}");
        // Looking a minute ahead, the unit is there, never attempted.
        let ahead = now_millis() + petrel_relay::reputation::HOLD_FOR.as_millis() as u64 + 1_000;
        let leases = relay
            .backend
            .queue
            .lease(ahead, 10, Duration::from_secs(30))
            .await
            .unwrap();
        let held: Vec<_> = leases.iter().filter(|l| l.unit.message_id == "held1").collect();
        assert_eq!(held.len(), 1, "{leases:?}");
        assert_eq!(held[0].unit.attempts, 0);
        assert!(w.delivered_to("held@dest.test").is_empty(), "held mail was sent");
        // Hand it back due now rather than wait out the hold.
        for lease in &leases {
            relay
                .backend
                .queue
                .settle(lease, Settlement::only(SettleOp::Postpone { until: now_millis() }))
                .await
                .unwrap();
        }

        w.send("app@example.test", "good4@dest.test", "").await;
        assert!(
            until(Duration::from_secs(90), async || !w.delivered_to("good4@dest.test").is_empty()
                && !w.delivered_to("held@dest.test").is_empty())
            .await,
            "new and held mail delivered after the resume"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
