//! The `petrel-relay` binary under conditions a review and a real cluster
//! found wanting: a config reload that changes listener AUTH (live) and
//! the key prefix (restart needed), unauthenticated uploads that must not
//! be read, a TLS client that never says hello, and logs in a file. Real
//! process, real TCP, a spawned Redis where the queue matters.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petrel_tests::ports::{free_port, wait_for_port};
use petrel_tests::redis::RedisServer;
use petrel_tests::relay_proc::relay_bin;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Upper bound for a whole test.
const LIMIT: Duration = Duration::from_secs(180);
/// How long a config change may take to be picked up (the relay checks
/// the file every 2 s).
const RELOAD: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// A running relay, stderr into a file; SIGKILLed when dropped.
struct Relay {
    child: Child,
    log: PathBuf,
}

impl Relay {
    async fn start(dir: &Path, config: &Path, ports: &[SocketAddr]) -> Relay {
        let log = dir.join(format!("relay-{}.log", free_port()));
        let child = Command::new(relay_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn petrel-relay");
        let relay = Relay { child, log };
        for &addr in ports {
            if let Err(e) = wait_for_port(addr, Duration::from_secs(30)).await {
                panic!("relay not listening on {addr}: {e}; log:\n{}", relay.log());
            }
        }
        relay
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak and current resident memory of the process, in kB.
    fn memory_kb(&self) -> (u64, u64) {
        let pid = self.child.id().expect("relay running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

/// Waits until the log has a line containing every one of `words`.
async fn wait_for_log(relay: &Relay, words: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + RELOAD;
    loop {
        let log = relay.log();
        if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {words:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects, reads the greeting, says EHLO; returns the EHLO reply.
async fn ehlo(addr: SocketAddr) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut reader = BufReader::new(stream);
    let mut replies = Vec::new();
    for command in [None, Some("EHLO client.test\r\n")] {
        if let Some(c) = command {
            reader.get_mut().write_all(c.as_bytes()).await.unwrap();
        }
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).await.unwrap() > 0,
                "closed after {reply}"
            );
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        replies.push(reply);
    }
    let _ = reader.get_mut().write_all(b"QUIT\r\n").await;
    replies.pop().unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to http");
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
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

fn users_file(dir: &Path) -> PathBuf {
    let hash = petrel_relay::inbound::auth::hash_password("s3cret").expect("hash");
    let path = dir.join("users");
    std::fs::write(&path, format!("app:{hash}\n")).unwrap();
    path
}

/// A Redis-queued relay with one plain listener; `listener` is the YAML
/// of its extra fields, `prefix` the key prefix.
fn redis_config(
    smtp: SocketAddr,
    http: SocketAddr,
    redis: &str,
    users: &Path,
    listener: &str,
    prefix: &str,
) -> String {
    format!(
        r#"
hostname: relay.test
listeners: [{{name: smtp, address: "{smtp}"{listener}}}]
authUsersFile: {users}
trustedNetworks: ["127.0.0.0/8"]
domains:
  - domain: example.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: {key}}}
queue: {{redis: {{url: "{redis}", keyPrefix: {prefix}}}}}
delivery: {{transport: maildir, maildir: {{path: maildir}}}}
http: {{address: "{http}"}}
"#,
        users = users.display(),
        key = repo()
            .join("examples/local/dkim-example.test.key")
            .display(),
    )
}

/// Replaces the config file in one step, as a ConfigMap update does.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn metric(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn reloaded_auth_applies_to_the_next_session_and_a_new_prefix_needs_a_restart() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dir = tempfile::tempdir().unwrap();
        let users = users_file(dir.path());
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        let path = dir.path().join("relay.yaml");
        std::fs::write(
            &path,
            redis_config(smtp, http, &redis.url(), &users, "", "petrel"),
        )
        .unwrap();
        let relay = Relay::start(dir.path(), &path, &[smtp, http]).await;
        assert!(
            !ehlo(smtp).await.contains("AUTH"),
            "auth: none offers no AUTH"
        );

        // `auth` (and allowInsecureAuth) are live: the next session has them.
        rewrite(
            &path,
            &redis_config(
                smtp,
                http,
                &redis.url(),
                &users,
                ", auth: optional, allowInsecureAuth: true",
                "petrel",
            ),
        );
        let deadline = tokio::time::Instant::now() + RELOAD;
        loop {
            if ehlo(smtp).await.contains("AUTH PLAIN LOGIN") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "AUTH never offered:\n{}",
                relay.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, metrics) = http_get(http, "/metrics").await;
        assert_eq!(
            metric(&metrics, "petrel_config_restart_required "),
            Some(0.0),
            "{metrics}"
        );

        // The key prefix is fixed when the queue opens: the relay says so,
        // names the field, and keeps running on the old one.
        rewrite(
            &path,
            &redis_config(
                smtp,
                http,
                &redis.url(),
                &users,
                ", auth: optional, allowInsecureAuth: true",
                "moved",
            ),
        );
        let line = wait_for_log(&relay, &["restart", "queue.redis.keyPrefix"]).await;
        assert!(
            !line.contains(&redis.url()),
            "no URL (it may carry a password) in {line}"
        );
        let (_, metrics) = http_get(http, "/metrics").await;
        assert_eq!(
            metric(&metrics, "petrel_config_restart_required "),
            Some(1.0),
            "{metrics}"
        );
        assert!(
            metric(&metrics, "petrel_config_reloads_total{result=\"applied\"}").unwrap_or(0.0)
                >= 2.0,
            "{metrics}"
        );
        assert!(ehlo(smtp).await.contains("AUTH PLAIN LOGIN"));
        // Logs written to a file carry no colour codes.
        assert!(
            !relay.log().contains('\u{1b}'),
            "ANSI escapes in the log file"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn unauthenticated_uploads_are_refused_unread_and_memory_stays_bounded() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        // Nothing is trusted: every send API client must authenticate.
        let config = format!(
            r#"
listeners: [{{name: smtp, address: "{smtp}"}}]
domains:
  - domain: example.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: {key}}}
queue: {{embedded: {{path: queue.redb}}}}
delivery: {{transport: maildir, maildir: {{path: maildir}}}}
limits: {{maxMessageSize: 26214400}}
http: {{address: "{http}", maxConcurrentRequests: 1000, maxConcurrentRequestsPerClient: 1000}}
"#,
            key = repo().join("examples/local/dkim-example.test.key").display(),
        );
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, config).unwrap();
        let relay = Relay::start(dir.path(), &path, &[smtp, http]).await;
        let (before, _) = relay.memory_kb();

        // 200 clients each start a 20 MB upload without credentials and
        // keep sending until the relay answers.
        const CLIENTS: usize = 200;
        const SIZE: usize = 20 * 1024 * 1024;
        let mut uploads = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            uploads.spawn(async move {
                let stream = TcpStream::connect(http).await.expect("connect");
                let (mut read, mut write) = stream.into_split();
                let head = format!(
                    "POST /v1/send HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {SIZE}\r\n\r\n{{\"from\":\"a@example.test\",\"text\":\""
                );
                let sender = tokio::spawn(async move {
                    if write.write_all(head.as_bytes()).await.is_err() {
                        return 0;
                    }
                    let chunk = vec![b'a'; 64 * 1024];
                    let mut sent = 0;
                    while sent < SIZE {
                        if write.write_all(&chunk).await.is_err() {
                            break;
                        }
                        sent += chunk.len();
                    }
                    sent
                });
                let mut answer = Vec::new();
                let mut buf = [0u8; 1024];
                while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
                sender.abort();
                String::from_utf8_lossy(&answer).into_owned()
            });
        }
        let mut statuses = std::collections::BTreeMap::new();
        while let Some(answer) = uploads.join_next().await {
            let answer = answer.unwrap();
            let status = answer.split_whitespace().nth(1).unwrap_or("none").to_string();
            *statuses.entry(status).or_insert(0) += 1;
        }
        assert_eq!(statuses.get("401"), Some(&CLIENTS), "{statuses:?}\n{}", relay.log());
        // Probes answered throughout and after.
        assert_eq!(http_get(http, "/healthz").await.0, 200);
        let (peak, now) = relay.memory_kb();
        eprintln!("relay memory: before {before} kB, peak {peak} kB, now {now} kB");
        assert!(peak < 100 * 1024, "peak RSS {peak} kB over 100 MB");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_client_that_never_sends_client_hello_is_cut_off_by_the_handshake_timeout() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = petrel_tests::tls::TestCa::new().unwrap();
        let cert = ca.issue_server_cert(&["relay.test"]).unwrap();
        let files = cert.write_to_dir(dir.path()).unwrap();
        let (smtp, http) = (loopback(free_port()), loopback(free_port()));
        // A command timeout far beyond the test's limit: only the
        // handshake timeout can end the connection in time.
        let config = format!(
            r#"
hostname: relay.test
listeners: [{{name: smtp, address: "{smtp}", tls: starttls}}]
tls: {{certFile: {cert}, keyFile: {key}}}
trustedNetworks: ["127.0.0.0/8"]
queue: {{embedded: {{path: queue.redb}}}}
delivery: {{transport: maildir, maildir: {{path: maildir}}}}
limits: {{commandTimeout: 1h, tlsHandshakeTimeout: 1s}}
http: {{address: "{http}"}}
"#,
            cert = files.cert.display(),
            key = files.key.display(),
        );
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, config).unwrap();
        let relay = Relay::start(dir.path(), &path, &[smtp, http]).await;
        let stream = TcpStream::connect(smtp).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220"), "{line}");
        reader
            .get_mut()
            .write_all(b"EHLO c.test\r\n")
            .await
            .unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        reader.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220"), "{line}");
        // Now silence. The relay must hang up (EOF), well inside LIMIT.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("still connected after 60s:\n{}", relay.log()));
        assert!(matches!(n, Ok(0)) || n.is_err(), "{n:?}");
    })
    .await
    .expect("test timed out");
}
