//! The relay's HTTP side end to end: real SMTP traffic over TCP into the
//! inbound listener and JSON through `POST /v1/send` (the same accept path),
//! a spawned redis-server as the queue, then `/metrics` scraped over HTTP:
//! the counters moved by exactly what was sent. `/readyz`
//! follows the real Redis going away and coming back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::common::crypto::Ed25519Key;
use petrel_relay::config::RelayConfig;
use petrel_relay::http::{Health, HttpState, serve};
use petrel_relay::inbound::{InboundContext, InboundSubmit, listener::serve_on};
use petrel_relay::metrics::RelayMetrics;
use petrel_relay::queue;
use petrel_relay::reload::Reloading;
use petrel_tests::redis::RedisServer;
use prometheus::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const LIMIT: Duration = Duration::from_secs(60);

struct Relay {
    _dir: tempfile::TempDir,
    smtp: SocketAddr,
    http: SocketAddr,
    redis: RedisServer,
    health: Health,
    _shutdown: watch::Sender<bool>,
    _http_stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Relay {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display().to_string();
    let key = Ed25519Key::generate_pkcs8().expect("ed25519 key");
    std::fs::write(
        dir.path().join("ed.pem"),
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(&key)
        ),
    )
    .expect("key file");
    let redis = RedisServer::start().await.expect("redis-server");
    let smtp_socket = TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
    let http_socket = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (smtp, http) = (
        smtp_socket.local_addr().expect("addr"),
        http_socket.local_addr().expect("addr"),
    );
    let yaml = format!(
        r#"
hostname: relay.test
listeners:
  - {{name: smtp, address: "{smtp}", tls: none, auth: none}}
trustedNetworks: ["127.0.0.0/8"]
queue:
  redis: {{url: "{}", keyPrefix: metrics}}
  timeout: 2s
domains:
  - domain: example.test
    dkim: {{selector: s1, algorithm: ed25519, keyFile: {d}/ed.pem}}
http:
  address: "{http}"
"#,
        redis.url()
    );
    let config = RelayConfig::from_yaml(&yaml).expect("config");
    let backend = queue::open(&config.queue).await.expect("queue");

    // One registry for every stage, exposed whole by /metrics.
    let registry = Registry::new();
    let metrics = RelayMetrics::register(&registry).expect("metrics");
    let ctx = InboundContext::new(
        Reloading::fixed(config.clone()),
        backend.queue.clone(),
        backend.state.clone(),
        metrics.clone(),
    )
    .expect("inbound context");
    let ctx = Arc::new(ctx);
    let ctx_for_smtp = ctx.clone();
    let (shutdown, rx) = watch::channel(false);
    let listener = config.listeners[0].clone();
    tokio::spawn(async move {
        if let Err(e) = serve_on(smtp_socket, listener, ctx_for_smtp, rx).await {
            panic!("SMTP listener failed: {e}");
        }
    });

    let health = Health::new();
    health.set_config_loaded(true);
    // The send API goes through the same accept path as SMTP.
    let state = HttpState::new(registry, health.clone(), backend.queue.clone())
        .expect("http state")
        .with_send_api(Arc::new(InboundSubmit::new(ctx)));
    let (http_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(http_socket, state, async move {
        let _ = stopped.await;
    }));
    petrel_relay::queue_gauges::spawn(
        backend.queue.clone(),
        backend.control.clone(),
        metrics,
        Duration::from_millis(50),
    );
    Relay {
        _dir: dir,
        smtp,
        http,
        redis,
        health,
        _shutdown: shutdown,
        _http_stop: http_stop,
    }
}

/// One (possibly multi-line) SMTP reply.
async fn reply(io: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await.expect("read") == 0 {
            return all;
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return all;
        }
    }
}

/// One SMTP conversation: each command with the reply code it must get.
async fn smtp(addr: SocketAddr, script: &[(&str, &str)]) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut io = BufReader::new(stream);
    let greeting = reply(&mut io).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    for (line, want) in script {
        io.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        let got = reply(&mut io).await;
        assert!(
            got.starts_with(want),
            "{line:?}: wanted {want}, got {got:?}"
        );
    }
}

async fn send_one(addr: SocketAddr, from: &str, rcpts: &[&str]) {
    let mail = format!("MAIL FROM:<{from}>");
    let mut script: Vec<(String, &str)> = vec![("EHLO client.test".into(), "250"), (mail, "250")];
    for r in rcpts {
        script.push((format!("RCPT TO:<{r}>"), "250"));
    }
    script.push(("DATA".into(), "354"));
    script.push((
        format!(
            "From: <{from}>\r\nTo: <{}>\r\nSubject: hi\r\n\r\nhello\r\n.",
            rcpts[0]
        ),
        "250",
    ));
    script.push(("QUIT".into(), "221"));
    let borrowed: Vec<(&str, &str)> = script.iter().map(|(l, w)| (l.as_str(), *w)).collect();
    smtp(addr, &borrowed).await;
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect http");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

async fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect http");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

/// The value of the sample `series` (name with labels, as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_real_smtp_and_http_traffic() {
    tokio::time::timeout(LIMIT, async {
        let relay = start().await;
        for i in 0..3 {
            send_one(
                relay.smtp,
                "app@example.test",
                &[&format!("user{i}@dest.test"), "boss@other.test"],
            )
            .await;
        }
        // Not a sending domain: refused before DATA, nothing queued.
        smtp(
            relay.smtp,
            &[
                ("EHLO client.test", "250"),
                ("MAIL FROM:<x@elsewhere.test>", "550"),
                ("QUIT", "221"),
            ],
        )
        .await;
        // One more through the HTTP send API, and one it refuses the same way.
        let (status, body) = http_post(
            relay.http,
            "/v1/send",
            r#"{"from":"app@example.test","to":["user9@dest.test"],"subject":"hi","text":"hello"}"#,
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let (status, body) = http_post(
            relay.http,
            "/v1/send",
            r#"{"from":"x@elsewhere.test","to":["user9@dest.test"],"subject":"hi","text":"hello"}"#,
        )
        .await;
        assert_eq!(status, 403, "{body}");

        let (status, text) = http_get(relay.http, "/metrics").await;
        assert_eq!(status, 200);
        for (result, n) in [("accepted", 1.0), ("refused", 1.0)] {
            let series = format!("petrel_http_send_requests_total{{result=\"{result}\"}}");
            assert_eq!(sample(&text, &series), Some(n), "{text}");
        }
        assert_eq!(
            sample(
                &text,
                r#"petrel_messages_received_total{domain="example.test"}"#
            ),
            Some(4.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"petrel_dkim_signed_total{algorithm="ed25519-sha256",domain="example.test"}"#
            ),
            Some(4.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "petrel_queue_enqueue_duration_seconds_count"),
            Some(4.0),
            "{text}"
        );
        let rejections: f64 = text
            .lines()
            .filter(|l| l.starts_with("petrel_smtp_rejections_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(
            rejections, 2.0,
            "one refusal over SMTP, one over HTTP: {text}"
        );
        assert!(
            !text.contains("elsewhere.test"),
            "refused domains never become labels"
        );
        assert!(
            !text.contains("dest.test"),
            "recipient domains never become labels"
        );

        // Three messages to two destination domains each, one to one: seven
        // due units, reported by the periodic gauge updater.
        let mut units = None;
        while units != Some(7.0) {
            let (_, text) = http_get(relay.http, "/metrics").await;
            units = sample(&text, r#"petrel_queue_units{state="due"}"#);
            if units != Some(7.0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn readyz_follows_the_real_queue_backend() {
    tokio::time::timeout(LIMIT, async {
        let mut relay = start().await;
        assert_eq!(
            http_get(relay.http, "/readyz").await,
            (200, "ready\n".to_string())
        );
        relay.redis.kill().await.expect("kill redis");
        let (status, body) = http_get(relay.http, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("queue backend"), "{body}");
        assert_eq!(
            http_get(relay.http, "/healthz").await.0,
            200,
            "liveness ignores Redis"
        );
        let (_, text) = http_get(relay.http, "/metrics").await;
        assert_eq!(sample(&text, "petrel_relay_ready"), Some(0.0));

        relay.redis.restart().await.expect("restart redis");
        // The client reconnects lazily; readiness returns once it has.
        loop {
            if http_get(relay.http, "/readyz").await.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay.health.start_draining();
        assert_eq!(
            http_get(relay.http, "/readyz").await,
            (503, "not ready: draining\n".to_string())
        );
    })
    .await
    .expect("test finished in time");
}
