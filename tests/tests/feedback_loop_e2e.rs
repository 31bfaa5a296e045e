//! The feedback loop end to end through the whole relay
//! (`server::run_until`) over a spawned Redis: deliveries to a real SMTP
//! server found by MX through the in-process DNS, refusals over real
//! SMTP, the HTTP send API and the admin API on the relay's HTTP port.
//!
//! Unsubscribe: the delivered message carries `List-Unsubscribe`,
//! `List-Unsubscribe-Post` and `Feedback-ID` inside a DKIM signature
//! mail-auth verifies; POST unsubscribes (then that domain's mail to the
//! recipient is refused, another domain's is not), GET does not, a forged
//! token 404s.
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
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use mail_parser::MessageParser;
use petrel_relay::config::RelayConfig;
use petrel_relay::events::EventType;
use petrel_relay::queue::{
    self, MessageFlags, NewMessage, SettleOp, Settlement, SuppressionReason, now_millis,
};
use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::{Reply, SmtpSink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(180);

struct World {
    dir: tempfile::TempDir,
    dns: DnsServer,
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
            dns,
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

impl World {
    /// The one DKIM signature of `message` verifies against the DNS, and
    /// its `h=` names every header of `signed`; returns the `h=` names.
    async fn verify_dkim(&self, message: &[u8], signed: &[&str]) -> Vec<String> {
        let mut conn = ConnectionConfig::udp();
        conn.port = self.dns.addr().port();
        let ns = NameServerConfig::new(self.dns.addr().ip(), true, vec![conn]);
        let resolver = MessageAuthenticator::new(
            ResolverConfig::from_name_servers(vec![ns]),
            ResolverOpts::default(),
        )
        .unwrap();
        let parsed = AuthenticatedMessage::parse(message).unwrap();
        let results = resolver.verify_dkim(&parsed).await;
        assert_eq!(results.len(), 1, "one signature");
        assert_eq!(*results[0].result(), DkimResult::Pass);
        let text = String::from_utf8_lossy(message);
        let sig = text
            .split("\r\n")
            .skip_while(|l| !l.to_ascii_lowercase().starts_with("dkim-signature:"))
            .take_while(|l| !l.is_empty())
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.starts_with([' ', '\t']))
            .map(|(_, l)| l.trim())
            .collect::<String>();
        let h: Vec<String> = sig
            .split(';')
            .map(str::trim)
            .find_map(|t| t.strip_prefix("h="))
            .unwrap_or_else(|| panic!("no h= in {sig}"))
            .split(':')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        for name in signed {
            assert!(
                h.contains(&name.to_ascii_lowercase()),
                "{name} not in h={h:?}"
            );
        }
        h
    }
}

/// The unfolded value of the header `name` (first one), if present.
fn header(message: &[u8], name: &str) -> Option<String> {
    let parsed = MessageParser::default().parse(message)?;
    let raw = parsed
        .headers_raw()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.to_string())?;
    Some(raw.replace("\r\n", "").trim().to_string())
}

/// How many fields named `name` the header section has.
fn count_headers(message: &[u8], name: &str) -> usize {
    let parsed = MessageParser::default().parse(message).unwrap();
    parsed
        .headers_raw()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
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

const UNSUBSCRIBE_DOMAINS: &str = r#"
  - domain: example.test
    dkim: {selector: s1, algorithm: ed25519, keyFile: KEY}
    returnPathDomain: bounces.example.test
    unsubscribe: {enabled: true, baseUrl: "https://u.example.test/x"}
    feedbackId: "{tag:campaign}:{domain}:petrel"
  - domain: other.test
    dkim: {selector: s1, algorithm: ed25519, keyFile: KEY}
    unsubscribe: {enabled: true, baseUrl: "https://u.other.test", mode: replace}
"#;

const FORM: &str = "Content-Type: application/x-www-form-urlencoded\r\n";

#[tokio::test]
async fn signed_unsubscribe_headers_and_one_click_post_unsubscribe_for_that_domain_only() {
    tokio::time::timeout(LIMIT, async {
        let w = World::new(UNSUBSCRIBE_DOMAINS).await;
        let relay = w.start().await;
        w.send(
            "app@example.test",
            "reader@dest.test",
            "X-Petrel-Tags: campaign=spring\r\n",
        )
        .await;
        assert!(
            until(Duration::from_secs(30), async || !w
                .delivered_to("reader@dest.test")
                .is_empty())
            .await,
            "delivered"
        );
        let got = w.delivered_to("reader@dest.test").remove(0).data;
        w.verify_dkim(
            &got,
            &["List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID"],
        )
        .await;
        let list = header(&got, "List-Unsubscribe").expect("List-Unsubscribe");
        assert_eq!(
            header(&got, "List-Unsubscribe-Post").as_deref(),
            Some("List-Unsubscribe=One-Click")
        );
        assert_eq!(
            header(&got, "Feedback-ID").as_deref(),
            Some("spring:example.test:petrel")
        );
        // <https://u.example.test/x/u/TOKEN>, <mailto:u+T@bounces.example.test>
        let entries: Vec<&str> = list.split(',').map(|e| e.trim()).collect();
        assert_eq!(entries.len(), 2, "{list}");
        let url = entries[0]
            .strip_prefix("<https://u.example.test/x/u/")
            .and_then(|e| e.strip_suffix('>'))
            .unwrap_or_else(|| panic!("{list}"));
        let token = url.to_string();
        assert!(
            entries[1].starts_with("<mailto:u+") && entries[1].ends_with("@bounces.example.test>"),
            "{list}"
        );
        let path = format!("/u/{token}");
        let suppressed = async || {
            relay
                .backend
                .state
                .suppressed("reader@dest.test", "example.test", now_millis())
                .await
                .unwrap()
        };

        // GET shows a confirm page and unsubscribes no one.
        let (status, page) = w.http("GET", &path, "", "").await;
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("<form method=\"post\""), "{page}");
        assert!(
            page.contains("name=\"List-Unsubscribe\" value=\"One-Click\""),
            "{page}"
        );
        assert!(suppressed().await.is_none(), "a GET unsubscribed");

        // Forged or broken tokens: 404, nothing written.
        let mut forged = token.clone().into_bytes();
        let i = forged.len() / 2;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        for bad in [forged.as_str(), "nope", &token[..token.len() - 2]] {
            let (status, _) = w.http("GET", &format!("/u/{bad}"), "", "").await;
            assert_eq!(status, 404, "GET {bad}");
            let (status, _) = w
                .http(
                    "POST",
                    &format!("/u/{bad}"),
                    FORM,
                    "List-Unsubscribe=One-Click",
                )
                .await;
            assert_eq!(status, 404, "POST {bad}");
        }
        // A POST without the one-click body does nothing either.
        let (status, _) = w.http("POST", &path, FORM, "hello=1").await;
        assert_eq!(status, 400);
        assert!(suppressed().await.is_none());

        // The one-click POST: 200, suppressed for example.test, an event.
        let (status, body) = w
            .http("POST", &path, FORM, "List-Unsubscribe=One-Click")
            .await;
        assert_eq!(status, 200, "{body}");
        let entry = suppressed().await.expect("suppressed for example.test");
        assert_eq!(entry.reason, SuppressionReason::Unsubscribe);
        assert_eq!(entry.scope.as_deref(), Some("example.test"));
        let events = relay.backend.events.read(None, 10_000).await.unwrap();
        let unsub: Vec<_> = events
            .iter()
            .filter(|e| e.event.kind == EventType::Unsubscribed)
            .collect();
        assert_eq!(unsub.len(), 1, "{unsub:?}");
        assert_eq!(
            unsub[0].event.recipient.as_deref(),
            Some("reader@dest.test")
        );
        assert_eq!(
            unsub[0].event.sending_domain.as_deref(),
            Some("example.test")
        );
        // Idempotent: a second POST is fine and writes no second event.
        let (status, _) = w
            .http("POST", &path, FORM, "List-Unsubscribe=One-Click")
            .await;
        assert_eq!(status, 200);

        // example.test may no longer send to the reader (onSuppressed:
        // refuse); other.test still may.
        let replies = w
            .smtp(&[
                "EHLO client.test",
                "MAIL FROM:<app@example.test>",
                "RCPT TO:<reader@dest.test>",
                "RSET",
                "MAIL FROM:<app@other.test>",
                "RCPT TO:<reader@dest.test>",
                "QUIT",
            ])
            .await;
        assert!(replies[2].starts_with("550 5.1.1"), "{replies:?}");
        assert!(replies[5].starts_with("250"), "{replies:?}");
        assert_eq!(
            relay
                .backend
                .events
                .read(None, 10_000)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.event.kind == EventType::Unsubscribed)
                .count(),
            1
        );

        // A message to two recipients goes out as one signed copy each,
        // every link naming its own recipient.
        let replies = w
            .smtp(&[
                "EHLO client.test",
                "MAIL FROM:<app@example.test>",
                "RCPT TO:<one@dest.test>",
                "RCPT TO:<two@dest.test>",
                "DATA",
                "From: <app@example.test>\r\nTo: <one@dest.test>, <two@dest.test>\r\nSubject: both\r\n\r\nHi.\r\n.",
                "QUIT",
            ])
            .await;
        assert!(replies[5].starts_with("250"), "{replies:?}");
        assert!(
            until(Duration::from_secs(30), async || !w.delivered_to("one@dest.test").is_empty()
                && !w.delivered_to("two@dest.test").is_empty())
            .await
        );
        let mut tokens = Vec::new();
        for rcpt in ["one@dest.test", "two@dest.test"] {
            let copies = w.delivered_to(rcpt);
            assert_eq!(copies.len(), 1, "one copy for {rcpt}");
            assert_eq!(copies[0].rcpt_to, vec![rcpt.to_string()]);
            w.verify_dkim(&copies[0].data, &["List-Unsubscribe"]).await;
            let list = header(&copies[0].data, "List-Unsubscribe").unwrap();
            let token = list
                .split('>')
                .next()
                .and_then(|e| e.strip_prefix("<https://u.example.test/x/u/"))
                .unwrap()
                .to_string();
            let (status, page) = w.http("GET", &format!("/u/{token}"), "", "").await;
            assert_eq!(status, 200);
            assert!(page.contains(rcpt), "{rcpt}: {page}");
            tokens.push(token);
        }
        assert_ne!(tokens[0], tokens[1]);

        // An app's own List-Unsubscribe: kept (add-if-missing) for
        // example.test, replaced for other.test (mode: replace); either
        // way the signature covers what goes out.
        let apps = "List-Unsubscribe: <mailto:app-unsub@example.test>\r\n";
        w.send("app@example.test", "kept@dest.test", apps).await;
        w.send(
            "app@other.test",
            "replaced@dest.test",
            &apps.replace("example", "other"),
        )
        .await;
        assert!(
            until(Duration::from_secs(30), async || !w
                .delivered_to("kept@dest.test")
                .is_empty()
                && !w.delivered_to("replaced@dest.test").is_empty())
            .await
        );
        let kept = w.delivered_to("kept@dest.test").remove(0).data;
        w.verify_dkim(&kept, &["List-Unsubscribe"]).await;
        assert_eq!(
            header(&kept, "List-Unsubscribe").as_deref(),
            Some("<mailto:app-unsub@example.test>")
        );
        assert_eq!(count_headers(&kept, "List-Unsubscribe-Post"), 0);
        let replaced = w.delivered_to("replaced@dest.test").remove(0).data;
        w.verify_dkim(&replaced, &["List-Unsubscribe", "List-Unsubscribe-Post"])
            .await;
        assert_eq!(count_headers(&replaced, "List-Unsubscribe"), 1);
        let ours = header(&replaced, "List-Unsubscribe").unwrap();
        assert!(ours.starts_with("<https://u.other.test/u/"), "{ours}");
        assert!(
            !ours.contains("mailto"),
            "no return path, no mailto: {ours}"
        );
        assert_eq!(
            count_headers(&replaced, "Feedback-ID"),
            0,
            "no feedbackId configured"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
