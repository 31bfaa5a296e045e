//! `petrel-relay queue ...` as an operator runs it, against a relay whose
//! destination defers (the harness SMTP sink answering 451 after DATA):
//! `list` shows the message with its last reply, `retry` makes it due (the
//! sink sees another attempt), `hold` stops attempts and shows in `stats`
//! and `/metrics`, `release` lets them resume, `delete` drops a message with
//! a `deleted` event, `bounce` sends a DSN that the sink receives for the
//! sender, and bad ids give their exit codes. Every `--json` answer is
//! parsed with serde_json.
//!
//! Three ways the CLI reaches the queue: Redis directly (a spawned
//! redis-server, relay running), the embedded file held by a running relay
//! (through its admin API), and the embedded file with no relay running
//! (opened directly; the relay started afterwards delivers the DSN).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petrel_tests::dns::DnsServer;
use petrel_tests::ports::free_port;
use petrel_tests::redis::RedisServer;
use petrel_tests::relay_proc::{RelayProc, relay_bin};
use petrel_tests::smtp_sink::{Reply, SmtpSink};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Upper bound for a whole test.
const LIMIT: Duration = Duration::from_secs(240);
/// Longest wait for a SIGTERMed relay to exit.
const GRACE: Duration = Duration::from_secs(60);
/// How long an attempt or a delivery may take to show.
const DELIVERY: Duration = Duration::from_secs(60);
/// How long a held destination is watched for attempts that must not come.
const QUIET: Duration = Duration::from_secs(3);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// What one CLI run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// `petrel-relay <args> --config <config>`, in the config's directory
/// (the relay's working directory: the queue path is relative to it).
async fn cli(config: &Path, args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        DELIVERY,
        Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .current_dir(config.parent().expect("config in a directory"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("petrel-relay {args:?} hung"))
    .expect("run petrel-relay");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `queue <args> --json`, which must exit `code`; its parsed output.
async fn queue(config: &Path, args: &[&str], code: i32) -> Value {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    all.push("--json");
    let run = cli(config, &all).await;
    assert_eq!(
        run.code, code,
        "queue {args:?}: exit {}\n{}\n{}",
        run.code, run.stdout, run.stderr
    );
    run.json()
}

/// The `queue list --json` row of message `id`, if listed.
async fn row(config: &Path, id: &str) -> Option<Value> {
    let list = queue(config, &["list"], 0).await;
    list.as_array()
        .expect("list is an array")
        .iter()
        .find(|r| r["queueId"] == id)
        .cloned()
}

/// Polls `queue list` until `want` holds for message `id`'s row.
async fn wait_row(config: &Path, id: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        if let Some(r) = row(config, id).await
            && want(&r)
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never {what}: {:?}",
            row(config, id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until the sink has seen `n` messages to the final dot.
async fn wait_transactions(sink: &SmtpSink, n: usize) {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while sink.transactions() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sink saw {} attempts, wanted {n}",
            sink.transactions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one message over SMTP; returns the queue id from the 250 reply.
async fn send(smtp: SocketAddr, to: &str, subject: &str) -> String {
    let stream = TcpStream::connect(smtp).await.expect("connect");
    let mut r = BufReader::new(stream);
    async fn reply(r: &mut BufReader<TcpStream>) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.expect("read");
            assert!(!line.is_empty(), "closed after {all}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }
    async fn cmd(r: &mut BufReader<TcpStream>, line: &str, want: &str) -> String {
        r.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        let got = reply(r).await;
        assert!(got.starts_with(want), "{line} -> {got}");
        got
    }
    assert!(reply(&mut r).await.starts_with("220"));
    cmd(&mut r, "EHLO client.test", "250").await;
    cmd(&mut r, "MAIL FROM:<app@example.test>", "250").await;
    cmd(&mut r, &format!("RCPT TO:<{to}>"), "250").await;
    cmd(&mut r, "DATA", "354").await;
    let body =
        format!("From: <app@example.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nhello\r\n.");
    let done = cmd(&mut r, &body, "250").await;
    cmd(&mut r, "QUIT", "221").await;
    // "250 2.0.0 Ok: queued as <id>"
    done.trim()
        .rsplit(' ')
        .next()
        .expect("queue id in the reply")
        .to_string()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    raw
}

/// Polls `/metrics` until a line starts with `line`.
async fn wait_metric(http: SocketAddr, line: &str) {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let body = http_get(http, "/metrics").await;
        if body.lines().any(|l| l.starts_with(line)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line:?} in /metrics:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Redis,
    Embedded,
}

/// Everything one scenario runs against.
struct Setup {
    _dir: tempfile::TempDir,
    _redis: Option<RedisServer>,
    _dns: DnsServer,
    sink: SmtpSink,
    config: PathBuf,
    dir: PathBuf,
    smtp: SocketAddr,
    http: SocketAddr,
}

async fn setup(store: Store) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let redis = match store {
        Store::Redis => Some(RedisServer::start().await.expect("redis")),
        Store::Embedded => None,
    };
    let sink = SmtpSink::start().await.expect("sink");
    let dns = DnsServer::start().await.expect("dns");
    for domain in ["dest.test", "other.test", "example.test"] {
        dns.add_mx(domain, 10, "mx.sink.test");
    }
    dns.add_a("mx.sink.test", Ipv4Addr::LOCALHOST);
    let (smtp, http) = (loopback(free_port()), loopback(free_port()));
    let queue = match &redis {
        Some(r) => format!("redis:\n    url: \"{}\"", r.url()),
        None => "embedded:\n    path: .petrel/queue.redb".to_string(),
    };
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
  {queue}
  lease: 10s
delivery:
  transport: mx
  mx:
    port: {port}
    nameservers: ["{dns}"]
  # Long enough that only `queue retry` brings an attempt on.
  retrySchedule: [1h]
  timeouts:
    connect: 5s
    greeting: 5s
    command: 5s
    data: 5s
http:
  address: "{http}"
"#,
        key = repo()
            .join("examples/local/dkim-example.test.key")
            .display(),
        port = sink.port(),
        dns = dns.addr(),
    );
    let config = dir.path().join("relay.yaml");
    std::fs::write(&config, yaml).unwrap();
    Setup {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        _redis: redis,
        _dns: dns,
        sink,
        config,
        smtp,
        http,
    }
}

/// Bad ids: not found is 3, not an id at all is 2, JSON error on stdout.
async fn bad_ids(config: &Path) {
    let missing = queue(config, &["show", "no-such-id"], 3).await;
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-id")
    );
    assert_eq!(missing["error"]["exitCode"], 3);
    queue(config, &["bounce", "no-such-id"], 3).await;
    queue(config, &["delete", "no such id"], 2).await;
    queue(config, &["release", "never-held.test"], 3).await;
    let usage = cli(config, &["queue", "list", "--state", "sideways"]).await;
    assert_eq!(usage.code, 2, "{}", usage.stderr);
}

/// The first two messages, deferred once each; returns their queue ids.
async fn two_deferred(s: &Setup) -> (String, String) {
    s.sink
        .on_data(Reply::new(451, "4.7.1 greylisted, try later"));
    let first = send(s.smtp, "user@dest.test", "first").await;
    let second = send(s.smtp, "user@other.test", "second").await;
    for id in [&first, &second] {
        let r = wait_row(&s.config, id, "deferred", |r| {
            r["state"] == "deferred" && r["attempts"] == 1
        })
        .await;
        assert!(
            r["lastReply"].as_str().unwrap().contains("greylisted"),
            "{r}"
        );
        assert_eq!(r["sender"], "app@example.test");
    }
    (first, second)
}

/// The DSN the sink got for the sender, as text.
async fn wait_dsn(sink: &SmtpSink) -> String {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        if let Some(m) = sink
            .received()
            .into_iter()
            .find(|m| m.rcpt_to == vec!["app@example.test".to_string()])
        {
            return m.text();
        }
        assert!(tokio::time::Instant::now() < deadline, "no DSN delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scenario with a relay running throughout.
async fn live(store: Store) {
    let s = setup(store).await;
    let relay = RelayProc::start(&s.dir, &s.config, s.smtp, s.http).await;
    let (first, second) = two_deferred(&s).await;
    let cfg = s.config.as_path();

    let show = queue(cfg, &["show", &first], 0).await;
    assert_eq!(show["queueId"], first.as_str());
    assert_eq!(show["units"][0]["history"].as_array().unwrap().len(), 1);
    assert!(
        show["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "Subject" && h[1] == "first"),
        "{show}"
    );

    // retry: due now, so the sink sees another attempt.
    let attempts = s.sink.transactions();
    let retried = queue(cfg, &["retry", &first], 0).await;
    assert_eq!(retried["units"], 1);
    wait_transactions(&s.sink, attempts + 1).await;
    wait_row(cfg, &first, "retried", |r| r["attempts"] == 2).await;

    // hold: not attempted, even when asked to retry; visible in stats and metrics.
    let held = queue(cfg, &["hold", "dest.test"], 0).await;
    assert_eq!(held["action"], "hold");
    wait_row(cfg, &first, "held", |r| r["state"] == "held").await;
    let attempts = s.sink.transactions();
    let retried = queue(cfg, &["retry", "--domain", "dest.test"], 0).await;
    assert_eq!(
        (retried["units"].as_u64(), retried["held"].as_u64()),
        (Some(0), Some(1))
    );
    let stats = queue(cfg, &["stats"], 0).await;
    assert_eq!(stats["units"]["held"], 1, "{stats}");
    assert_eq!(stats["holds"][0]["domain"], "dest.test");
    let dest = stats["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "dest.test")
        .cloned()
        .unwrap();
    assert_eq!(dest["held"], true);
    wait_metric(s.http, "petrel_queue_held_destinations 1").await;
    wait_metric(s.http, "petrel_queue_units{state=\"held\"} 1").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        s.sink.transactions(),
        attempts,
        "a held destination was attempted"
    );
    assert_eq!(row(cfg, &first).await.unwrap()["attempts"], 2);

    // release: back to waiting, and a retry reaches the sink again.
    let released = queue(cfg, &["release", "dest.test"], 0).await;
    assert_eq!(released["units"], 1);
    wait_row(cfg, &first, "released", |r| r["state"] == "deferred").await;
    queue(cfg, &["retry", &first], 0).await;
    wait_transactions(&s.sink, attempts + 1).await;

    // delete: gone, with a `deleted` event.
    let deleted = queue(cfg, &["delete", &second], 0).await;
    assert_eq!(deleted["units"], 1);
    assert!(row(cfg, &second).await.is_none());
    let events = cli(cfg, &["events", "tail", "--type", "deleted"]).await;
    assert_eq!(events.code, 0, "{}", events.stderr);
    let deleted_events: Vec<Value> = events
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(deleted_events.len(), 1, "{}", events.stdout);
    assert_eq!(deleted_events[0]["queueId"], second.as_str());
    assert_eq!(deleted_events[0]["recipient"], "user@other.test");

    // bounce: a DSN to the sender, which the sink now accepts.
    wait_row(cfg, &first, "settled", |r| r["state"] != "leased").await;
    s.sink.reset();
    let bounced = queue(cfg, &["bounce", &first, "--reason", "operator test"], 0).await;
    assert_eq!(bounced["units"], 1);
    assert_eq!(bounced["dsnQueueIds"].as_array().unwrap().len(), 1);
    let dsn = wait_dsn(&s.sink).await;
    assert!(dsn.contains("Status: 5.0.0"), "{dsn}");
    assert!(dsn.contains("operator test"), "{dsn}");
    assert!(dsn.contains("user@dest.test"), "{dsn}");
    assert!(row(cfg, &first).await.is_none());

    bad_ids(cfg).await;
    let log = relay.log();
    assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
    drop(log);
}

/// The embedded file with no relay running: the CLI opens it itself.
async fn offline() {
    let s = setup(Store::Embedded).await;
    let relay = RelayProc::start(&s.dir, &s.config, s.smtp, s.http).await;
    let (first, second) = two_deferred(&s).await;
    assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
    let cfg = s.config.as_path();

    queue(cfg, &["retry", &first], 0).await;
    assert_eq!(row(cfg, &first).await.unwrap()["state"], "due");
    queue(cfg, &["hold", "dest.test"], 0).await;
    assert_eq!(row(cfg, &first).await.unwrap()["state"], "held");
    assert_eq!(queue(cfg, &["stats"], 0).await["units"]["held"], 1);
    queue(cfg, &["release", "dest.test"], 0).await;
    assert_eq!(row(cfg, &first).await.unwrap()["state"], "due");
    queue(cfg, &["delete", &second], 0).await;
    assert!(row(cfg, &second).await.is_none());
    let events = cli(cfg, &["events", "tail", "--type", "deleted"]).await;
    assert_eq!(events.stdout.lines().count(), 1, "{}", events.stdout);
    let bounced = queue(cfg, &["bounce", &first], 0).await;
    let dsn_id = bounced["dsnQueueIds"][0].as_str().unwrap().to_string();
    // The DSN waits in the file, from the null sender to the sender.
    let dsn_row = row(cfg, &dsn_id).await.expect("DSN queued");
    assert_eq!(dsn_row["sender"], "");
    assert_eq!(dsn_row["recipients"][0], "app@example.test");
    bad_ids(cfg).await;

    // A relay started on the file delivers it.
    s.sink.reset();
    let relay = RelayProc::start(&s.dir, &s.config, s.smtp, s.http).await;
    let dsn = wait_dsn(&s.sink).await;
    assert!(dsn.contains("Status: 5.0.0"), "{dsn}");
    assert!(relay.terminate(GRACE).await, "SIGTERM must exit 0");
}

#[tokio::test]
async fn queue_control_on_redis_with_a_running_relay() {
    tokio::time::timeout(LIMIT, live(Store::Redis))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn queue_control_through_the_admin_api_of_the_relay_holding_the_file() {
    tokio::time::timeout(LIMIT, live(Store::Embedded))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn queue_control_on_the_embedded_file_with_no_relay_running() {
    tokio::time::timeout(LIMIT, offline())
        .await
        .expect("test timed out");
}
