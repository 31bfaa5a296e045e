//! Engagement tracking end to end: the whole relay (`server::run_until`)
//! over a spawned Redis, messages of every shape built with mail-builder
//! and sent over real SMTP, delivered into a Maildir, parsed with
//! mail-parser, DKIM-verified with mail-auth against the in-process DNS,
//! and every tracked link followed through the relay's real HTTP server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::{BodyPart, MimePart};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use petrel_relay::config::RelayConfig;
use petrel_relay::events::EventType;
use petrel_relay::queue;
use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
const TRACK_HOST: &str = "track.example.test";

/// The links every test message carries: two to track, the rest to leave.
const LINKS: &str = r##"<p><a href="https://shop.example.org/sale?id=7&amp;utm=mail">Sale</a>
<a href="http://blog.example.org/post">Blog</a>
<a href="mailto:help@example.test">Mail us</a> <a href="tel:+15550100">Call</a>
<a href="#top">Top</a> <a href="/relative">Rel</a>
<a href="https://private.example.org/account" data-petrel-track="off">Account</a></p>"##;
const TRACKED: [&str; 2] = [
    "https://shop.example.org/sale?id=7&utm=mail",
    "http://blog.example.org/post",
];
const UNTRACKED: [&str; 5] = [
    "mailto:help@example.test",
    "tel:+15550100",
    "#top",
    "/relative",
    "https://private.example.org/account",
];

struct Relay {
    dir: tempfile::TempDir,
    smtp: SocketAddr,
    http: SocketAddr,
    dns: DnsServer,
    backend: queue::Backend,
    _redis: RedisServer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let dns = DnsServer::start().await.unwrap();
        let ed = Ed25519Key::generate_pkcs8().unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(&ed)
        );
        std::fs::write(dir.path().join("ed.pem"), pem).unwrap();
        let public = Ed25519Key::from_pkcs8_der(&ed).unwrap().public_key();
        for domain in ["example.test", "plain.test"] {
            dns.add_txt(
                &format!("s1._domainkey.{domain}"),
                &format!("v=DKIM1; k=ed25519; p={}", B64.encode(&public)),
            );
        }
        std::fs::write(dir.path().join("tracking.key"), "k".repeat(40)).unwrap();
        let redis = RedisServer::start().await.unwrap();
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let yaml = format!(
            r#"
hostname: relay.test
listeners:
  - {{name: smtp, address: "{smtp}"}}
trustedNetworks: ["127.0.0.0/8"]
http: {{address: "{http}"}}
queue:
  redis: {{url: "{}", keyPrefix: tracking}}
  timeout: 5s
delivery:
  transport: maildir
  maildir: {{path: {d}/Maildir}}
tracking: {{keyFile: {d}/tracking.key}}
domains:
  - domain: example.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/ed.pem}}
    tracking: {{opens: true, clicks: true, domain: {TRACK_HOST}, https: false}}
  - domain: plain.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/ed.pem}}
"#,
            redis.url()
        );
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let config = RelayConfig::from_yaml(&yaml).unwrap();
        let backend = queue::open(&config.queue).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            petrel_relay::server::run_until(&path, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        petrel_tests::ports::wait_for_port(http, Duration::from_secs(30))
            .await
            .unwrap();
        petrel_tests::ports::wait_for_port(smtp, Duration::from_secs(30))
            .await
            .unwrap();
        Relay {
            dir,
            smtp,
            http,
            dns,
            backend,
            _redis: redis,
            stop: Some(stop),
            task,
        }
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("Maildir/new")
    }

    /// Sends `data` over SMTP and returns the delivered file.
    async fn send(&self, from: &str, to: &str, data: &[u8]) -> Vec<u8> {
        let (_, mut delivered) = self.send_to(from, &[to], data).await;
        delivered.remove(0)
    }

    /// Sends `data` to every address in `to` in one transaction; returns
    /// the queue id of the 250 reply and the files delivered (one per
    /// recipient, in no particular order).
    async fn send_to(&self, from: &str, to: &[&str], data: &[u8]) -> (String, Vec<Vec<u8>>) {
        let before = files(&self.maildir());
        let stream = TcpStream::connect(self.smtp).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut expect = async |w: &mut tokio::net::tcp::OwnedWriteHalf, line: &str, code: &str| {
            if !line.is_empty() {
                w.write_all(line.as_bytes()).await.unwrap();
            }
            loop {
                let mut reply = String::new();
                r.read_line(&mut reply).await.unwrap();
                assert!(reply.starts_with(code), "{line:?} -> {reply:?}");
                if reply.as_bytes().get(3) != Some(&b'-') {
                    return reply;
                }
            }
        };
        expect(&mut w, "", "220").await;
        expect(&mut w, "EHLO client.test\r\n", "250").await;
        expect(&mut w, &format!("MAIL FROM:<{from}>\r\n"), "250").await;
        for to in to {
            expect(&mut w, &format!("RCPT TO:<{to}>\r\n"), "250").await;
        }
        expect(&mut w, "DATA\r\n", "354").await;
        let mut stuffed = Vec::new();
        for line in data.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                stuffed.push(b'.');
            }
            stuffed.extend_from_slice(line);
        }
        if !stuffed.ends_with(b"\r\n") {
            stuffed.extend_from_slice(b"\r\n");
        }
        w.write_all(&stuffed).await.unwrap();
        let queued = expect(&mut w, ".\r\n", "250").await;
        expect(&mut w, "QUIT\r\n", "221").await;
        let queue_id = queued.trim_end().rsplit(' ').next().unwrap().to_string();
        let dir = self.maildir();
        loop {
            let new: Vec<PathBuf> = files(&dir)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if new.len() >= to.len() {
                let delivered = new.iter().map(|f| std::fs::read(f).unwrap()).collect();
                return (queue_id, delivered);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn verify_dkim(&self, message: &[u8]) {
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
    }

    /// `GET path` with `Host: host`: status and headers (lower-cased names).
    async fn get(&self, host: &str, path: &str, ua: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = TcpStream::connect(self.http).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, raw[split + 4..].to_vec())
    }

    async fn events(&self, kind: EventType) -> Vec<petrel_relay::events::Event> {
        let stored = self.backend.events.read(None, 10_000).await.unwrap();
        stored
            .into_iter()
            .map(|s| s.event)
            .filter(|e| e.kind == kind)
            .collect()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Raw bytes of every text/plain part and every non-text part, in order.
fn untouched_parts(message: &[u8]) -> Vec<Vec<u8>> {
    let parsed = MessageParser::new().parse(message).unwrap();
    parsed
        .parts
        .iter()
        .filter(|p| {
            !matches!(p.body, PartType::Multipart(_))
                && !p.content_type().is_some_and(|c| {
                    c.ctype().eq_ignore_ascii_case("text")
                        && c.subtype().is_some_and(|s| s.eq_ignore_ascii_case("html"))
                })
        })
        .filter(|p| p.offset_header != 0)
        .map(|p| message[p.offset_header as usize..p.offset_end as usize].to_vec())
        .collect()
}

/// The decoded HTML parts.
fn html_parts(message: &[u8]) -> Vec<String> {
    let parsed = MessageParser::new().parse(message).unwrap();
    parsed
        .parts
        .iter()
        .filter_map(|p| match &p.body {
            PartType::Html(h) => Some(h.to_string()),
            _ => None,
        })
        .collect()
}

/// `href`/`src` values in `html` starting with `prefix`.
fn urls_with(html: &str, prefix: &str) -> Vec<String> {
    html.match_indices(prefix)
        .map(|(i, _)| {
            html[i..]
                .split(['"', '\'', ' ', '>'])
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn html_doc(extra: &str) -> String {
    format!(
        "<html><head><title>Hi</title></head><body><h1>Caf\u{e9} {extra}</h1>\r\n{LINKS}\r\n</body></html>"
    )
}

fn base() -> MessageBuilder<'static> {
    MessageBuilder::new()
        .from(("Shop", "news@example.test"))
        .to("reader@dest.example")
        .subject("Campaign")
}

/// Every shape, each with a name.
fn shapes() -> Vec<(&'static str, Vec<u8>)> {
    let text = "Plain text version: https://shop.example.org/sale?id=7 \u{e9}t\u{e9}\r\n";
    let html_only = base()
        .html_body(html_doc("html only"))
        .write_to_vec()
        .unwrap();
    let alternative = base()
        .text_body(text)
        .html_body(html_doc("alternative"))
        .write_to_vec()
        .unwrap();
    let related = base()
        .body(MimePart::new(
            "multipart/alternative",
            vec![
                MimePart::new("text/plain", text),
                MimePart::new(
                    "multipart/related",
                    vec![
                        MimePart::new("text/html", html_doc("<img src=\"cid:logo\">related")),
                        MimePart::new(
                            "image/png",
                            BodyPart::Binary(vec![0x89, b'P', b'N', b'G', 0, 1, 2, 3].into()),
                        )
                        .inline()
                        .cid("logo"),
                    ],
                ),
            ],
        ))
        .write_to_vec()
        .unwrap();
    let b64_html = B64.encode(html_doc("base64").as_bytes());
    let b64_lines: Vec<&str> = b64_html
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let base64 = base()
        .body(MimePart::new(
            "multipart/alternative",
            vec![
                MimePart::new("text/plain", text),
                MimePart::new(
                    ContentType::new("text/html").attribute("charset", "utf-8"),
                    BodyPart::Text(b64_lines.join("\r\n").into()),
                )
                .transfer_encoding("base64"),
            ],
        ))
        .write_to_vec()
        .unwrap();
    // ISO-8859-1 bytes, quoted-printable.
    let latin1_bytes: Vec<u8> = html_doc("latin1").chars().map(|c| c as u8).collect();
    let latin1_qp =
        String::from_utf8(petrel_relay::tracking::transfer::encode_qp(&latin1_bytes)).unwrap();
    let latin1 = base()
        .body(MimePart::new(
            "multipart/alternative",
            vec![
                MimePart::new(
                    ContentType::new("text/plain").attribute("charset", "iso-8859-1"),
                    BodyPart::Text("Plain latin1 =E9t=E9\r\n".into()),
                )
                .transfer_encoding("quoted-printable"),
                MimePart::new(
                    ContentType::new("text/html").attribute("charset", "iso-8859-1"),
                    BodyPart::Text(latin1_qp.into()),
                )
                .transfer_encoding("quoted-printable"),
            ],
        ))
        .write_to_vec()
        .unwrap();
    vec![
        ("html only", html_only),
        ("multipart/alternative", alternative),
        ("nested related with inline image", related),
        ("base64 html", base64),
        ("iso-8859-1 quoted-printable", latin1),
    ]
}

#[tokio::test]
async fn every_shape_is_tracked_signed_and_resolves_through_the_endpoint() {
    tokio::time::timeout(LIMIT, async {
        let relay = Relay::start().await;
        let click_prefix = format!("http://{TRACK_HOST}/c/");
        let open_prefix = format!("http://{TRACK_HOST}/o/");
        let mut first_open_path = None;
        for (shape, original) in shapes() {
            let delivered = relay
                .send("news@example.test", "reader@dest.example", &original)
                .await;
            relay.verify_dkim(&delivered).await;
            assert_eq!(
                untouched_parts(&delivered),
                untouched_parts(&original),
                "{shape}: text and other parts byte-identical"
            );
            let htmls = html_parts(&delivered);
            assert_eq!(htmls.len(), 1, "{shape}");
            let html = &htmls[0];
            for url in UNTRACKED {
                assert!(
                    html.contains(&format!("href=\"{url}\"")),
                    "{shape}: {url} kept\n{html}"
                );
            }
            let clicks = urls_with(html, &click_prefix);
            assert_eq!(clicks.len(), TRACKED.len(), "{shape}: {html}");
            for (link, want) in clicks.iter().zip(TRACKED) {
                let path = &link[click_prefix.len() - 3..];
                let (status, headers, _) = relay
                    .get(TRACK_HOST, path, "Mozilla/5.0 (X11; Linux)")
                    .await;
                assert_eq!(status, 302, "{shape}: {link}");
                assert_eq!(
                    header(&headers, "location").as_deref(),
                    Some(want),
                    "{shape}"
                );
            }
            let opens = urls_with(html, &open_prefix);
            assert_eq!(opens.len(), 1, "{shape}: one pixel");
            assert!(
                html.contains("width=\"1\" height=\"1\" alt=\"\"></body>"),
                "{shape}: pixel before </body>"
            );
            first_open_path.get_or_insert_with(|| opens[0][open_prefix.len() - 3..].to_string());
        }

        // The pixel: a 43-byte GIF nobody may cache; two fetches, one unique open.
        let path = first_open_path.unwrap();
        for ua in [
            "Mozilla/5.0 (X11; Linux)",
            "Mozilla/5.0 (via ggpht.com GoogleImageProxy)",
        ] {
            let (status, headers, body) = relay.get(TRACK_HOST, &path, ua).await;
            assert_eq!(status, 200);
            assert_eq!(body.len(), 43);
            assert_eq!(
                header(&headers, "content-type").as_deref(),
                Some("image/gif")
            );
            assert!(
                header(&headers, "cache-control")
                    .unwrap()
                    .contains("no-store")
            );
        }
        let opened = relay.events(EventType::Opened).await;
        assert_eq!(opened.len(), 2);
        assert_eq!(
            opened.iter().filter(|e| e.unique == Some(true)).count(),
            1,
            "exactly one unique open"
        );
        assert_eq!(opened[0].recipient.as_deref(), Some("reader@dest.example"));
        assert_eq!(opened[0].sending_domain.as_deref(), Some("example.test"));
        assert_eq!(
            opened.iter().filter(|e| e.machine == Some(true)).count(),
            1,
            "Gmail's proxy is a machine"
        );
        let clicked = relay.events(EventType::Clicked).await;
        assert_eq!(clicked.len(), 2 * 5);
        assert!(
            clicked
                .iter()
                .all(|e| e.url.as_deref().is_some_and(|u| TRACKED.contains(&u)))
        );
        assert_eq!(
            clicked[0].user_agent.as_deref(),
            Some("Mozilla/5.0 (X11; Linux)")
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn forged_truncated_and_foreign_host_tokens_get_404() {
    tokio::time::timeout(LIMIT, async {
        let relay = Relay::start().await;
        let (_, original) = shapes().remove(0);
        let delivered = relay
            .send("news@example.test", "reader@dest.example", &original)
            .await;
        let html = &html_parts(&delivered)[0];
        let prefix = format!("http://{TRACK_HOST}");
        let link = urls_with(html, &format!("{prefix}/c/"))[0].clone();
        let path = &link[prefix.len()..];
        let token = &path[3..];
        let mut flipped = token.as_bytes().to_vec();
        flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
        let cases = [
            (TRACK_HOST, format!("/c/{}", &token[..token.len() - 2])),
            (
                TRACK_HOST,
                format!("/c/{}", String::from_utf8(flipped).unwrap()),
            ),
            (TRACK_HOST, "/c/aHR0cHM6Ly9ldmlsLmV4YW1wbGUv".to_string()),
            (TRACK_HOST, format!("/o/{token}.gif")),
            ("relay.test", path.to_string()),
            ("evil.example", path.to_string()),
        ];
        for (host, path) in cases {
            let (status, headers, _) = relay.get(host, &path, "curl").await;
            assert_eq!(status, 404, "{host}{path}");
            assert_eq!(header(&headers, "location"), None);
        }
        assert!(relay.events(EventType::Clicked).await.is_empty());
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn tracking_off_or_opted_out_leaves_the_message_as_sent() {
    tokio::time::timeout(LIMIT, async {
        let relay = Relay::start().await;
        // A domain without tracking: the delivered file ends with exactly the
        // bytes sent (the relay only prepends its trace and signature).
        let original = MessageBuilder::new()
            .from("news@plain.test")
            .to("reader@dest.example")
            .subject("Untracked")
            .text_body("text")
            .html_body(html_doc("off"))
            .write_to_vec()
            .unwrap();
        let delivered = relay
            .send("news@plain.test", "reader@dest.example", &original)
            .await;
        let mut sent = original.clone();
        if !sent.ends_with(b"\r\n") {
            sent.extend_from_slice(b"\r\n");
        }
        assert!(
            delivered.ends_with(&sent),
            "byte-identical to what was sent"
        );
        relay.verify_dkim(&delivered).await;

        // A tracking domain, opted out by header: untouched, header removed.
        let opted = base()
            .header(
                "X-Petrel-Track",
                mail_builder::headers::raw::Raw::new("off"),
            )
            .html_body(html_doc("opted out"))
            .write_to_vec()
            .unwrap();
        let delivered = relay
            .send("news@example.test", "reader@dest.example", &opted)
            .await;
        let text = String::from_utf8_lossy(&delivered);
        assert!(
            !text.to_ascii_lowercase().contains("x-petrel-track"),
            "{text}"
        );
        assert!(!text.contains(TRACK_HOST), "{text}");
        let body = |m: &[u8]| {
            let mut b = m[m.windows(4).position(|w| w == b"\r\n\r\n").unwrap()..].to_vec();
            if !b.ends_with(b"\r\n") {
                b.extend_from_slice(b"\r\n");
            }
            b
        };
        assert_eq!(body(&delivered), body(&opted));
        relay.verify_dkim(&delivered).await;
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Issue 16: a tracked message to three recipients is queued as one copy
/// per recipient, each with tokens naming its recipient, so each
/// recipient's first open is unique; and opens and clicks carry the
/// message's tags and Message-ID.
#[tokio::test]
async fn each_recipient_gets_its_own_tokens_and_events_carry_tags() {
    tokio::time::timeout(LIMIT, async {
        let relay = Relay::start().await;
        let key =
            petrel_relay::tracking::TokenKey::load(&relay.dir.path().join("tracking.key")).unwrap();
        let rcpts = ["ann@dest.example", "bob@dest.example", "cy@other.example"];
        let original = MessageBuilder::new()
            .from(("Shop", "news@example.test"))
            .to(rcpts.to_vec())
            .subject("Campaign")
            .message_id("spring-17@example.test")
            .header(
                "X-Petrel-Tags",
                mail_builder::headers::raw::Raw::new("campaign=spring, order=17"),
            )
            .text_body("text")
            .html_body(html_doc("three"))
            .write_to_vec()
            .unwrap();
        let (queue_id, delivered) = relay.send_to("news@example.test", &rcpts, &original).await;
        assert_eq!(delivered.len(), 3, "one body per recipient");
        let click_prefix = format!("http://{TRACK_HOST}/c/");
        let open_prefix = format!("http://{TRACK_HOST}/o/");
        let mut pixels = Vec::new();
        let mut seen = Vec::new();
        for body in &delivered {
            relay.verify_dkim(body).await;
            let text = String::from_utf8_lossy(body);
            let delivered_to = text
                .lines()
                .find_map(|l| l.strip_prefix("Delivered-To: "))
                .unwrap()
                .to_string();
            let html = &html_parts(body)[0];
            let opens = urls_with(html, &open_prefix);
            assert_eq!(opens.len(), 1);
            let token = opens[0][open_prefix.len()..].strip_suffix(".gif").unwrap();
            let claims = key.open(token).unwrap();
            assert_eq!(
                claims.recipient, delivered_to,
                "the pixel names its recipient"
            );
            let index = rcpts.iter().position(|r| *r == delivered_to).unwrap();
            assert_eq!(
                claims.queue_id,
                format!("{queue_id}.{}", index + 1),
                "copy ids keep the client's queue id"
            );
            for link in urls_with(html, &click_prefix) {
                let claims = key.open(&link[click_prefix.len()..]).unwrap();
                assert_eq!(claims.recipient, delivered_to, "{link}");
            }
            seen.push(delivered_to);
            pixels.push(opens[0][open_prefix.len() - 3..].to_string());
        }
        seen.sort();
        assert_eq!(seen, rcpts.to_vec(), "every recipient got exactly one copy");
        assert_ne!(delivered[0], delivered[1]);

        // Each pixel fetched twice: one unique open per recipient.
        for path in &pixels {
            for _ in 0..2 {
                let (status, _, _) = relay
                    .get(TRACK_HOST, path, "Mozilla/5.0 (X11; Linux)")
                    .await;
                assert_eq!(status, 200);
            }
        }
        let opened = relay.events(EventType::Opened).await;
        assert_eq!(opened.len(), 6);
        for rcpt in rcpts {
            let mine: Vec<_> = opened
                .iter()
                .filter(|e| e.recipient.as_deref() == Some(rcpt))
                .collect();
            assert_eq!(mine.len(), 2, "{rcpt}");
            assert_eq!(
                mine.iter().filter(|e| e.unique == Some(true)).count(),
                1,
                "{rcpt}: one unique open"
            );
        }
        let clicked = {
            let html = &html_parts(&delivered[0])[0];
            let link = urls_with(html, &click_prefix)[0].clone();
            let (status, _, _) = relay
                .get(TRACK_HOST, &link[click_prefix.len() - 3..], "Mozilla/5.0")
                .await;
            assert_eq!(status, 302);
            relay.events(EventType::Clicked).await
        };
        assert_eq!(clicked.len(), 1);
        for event in opened.iter().chain(&clicked) {
            assert_eq!(
                event.tags.get("campaign").map(String::as_str),
                Some("spring"),
                "{event:?}"
            );
            assert_eq!(event.tags.get("order").map(String::as_str), Some("17"));
            assert_eq!(
                event.header_message_id.as_deref(),
                Some("spring-17@example.test")
            );
            assert!(
                event
                    .queue_id
                    .as_deref()
                    .unwrap()
                    .starts_with(&format!("{queue_id}."))
            );
        }
        // The accepted events name the copies too, one per recipient.
        let accepted = relay.events(EventType::Accepted).await;
        let mut ids: Vec<_> = accepted
            .iter()
            .filter(|e| e.queue_id.as_deref().unwrap_or("").starts_with(&queue_id))
            .map(|e| (e.recipient.clone().unwrap(), e.queue_id.clone().unwrap()))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![
                ("ann@dest.example".to_string(), format!("{queue_id}.1")),
                ("bob@dest.example".to_string(), format!("{queue_id}.2")),
                ("cy@other.example".to_string(), format!("{queue_id}.3")),
            ]
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Several recipients but nothing to track (a text-only message): one
/// message, as before, under the client's queue id.
#[tokio::test]
async fn an_untracked_message_to_several_recipients_is_not_split() {
    tokio::time::timeout(LIMIT, async {
        let relay = Relay::start().await;
        let rcpts = ["ann@dest.example", "bob@dest.example"];
        let original = MessageBuilder::new()
            .from("news@example.test")
            .to(rcpts.to_vec())
            .subject("Plain")
            .text_body("no HTML here")
            .write_to_vec()
            .unwrap();
        let (queue_id, delivered) = relay.send_to("news@example.test", &rcpts, &original).await;
        assert_eq!(delivered.len(), 2);
        let accepted = relay.events(EventType::Accepted).await;
        assert_eq!(accepted.len(), 2);
        assert!(
            accepted
                .iter()
                .all(|e| e.queue_id.as_deref() == Some(queue_id.as_str())),
            "{accepted:?}"
        );
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
