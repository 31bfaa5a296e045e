//! Outbound TLS against a real Postfix as the MX (issue 14's check).
//!
//! `dest.test`'s MX `mx.dest.test` is a private Postfix instance
//! (tests/src/postfix.rs) offering STARTTLS; the relay is the real
//! `petrel-relay` binary with `delivery.mx.nameservers` on the in-process
//! DNS, `delivery.mx.port` on Postfix and `delivery.tls.caFile` holding
//! the test CA. With MTA-STS, the policy is served over HTTPS on
//! 127.0.0.1:443 (the relay's default `mtaStsPort`) by a certificate from
//! the same CA.
//!
//! - `enforce` and a CA-signed certificate for `mx.dest.test`: delivered,
//!   and Postfix's Received header and log show TLS.
//! - `enforce` and a self-signed certificate for `other.example`: deferred
//!   with a TLS diagnostic; Postfix never sees a MAIL FROM, so nothing went
//!   in plain text. The same for a CA-signed certificate for that name.
//! - `testing` with that self-signed certificate: delivered (over TLS).
//! - `outboundTls: verified` without MTA-STS: as `enforce`, both ways.
//!
//! Postfix missing is a failure with the way to fix it, never a pass.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petrel_tests::dns::DnsServer;
use petrel_tests::https::HttpsServer;
use petrel_tests::ports::free_port;
use petrel_tests::postfix::PostfixMx;
use petrel_tests::relay_proc::{RelayProc, relay_bin};
use petrel_tests::tls::TestCa;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::Mutex;

/// Upper bound for a whole test.
const LIMIT: Duration = Duration::from_secs(180);
/// How long a delivery or a deferral may take to show.
const DELIVERY: Duration = Duration::from_secs(60);
/// Longest wait for a SIGTERMed relay to exit.
const GRACE: Duration = Duration::from_secs(30);
/// MTA-STS policies are fetched from 127.0.0.1:443: one test at a time.
static PORT_443: Mutex<()> = Mutex::const_new(());

/// The certificate Postfix presents.
#[derive(Clone, Copy)]
enum MxCert {
    /// Signed by the test CA, for `mx.dest.test`.
    Valid,
    /// Self-signed, for `other.example`.
    SelfSignedOtherName,
    /// Signed by the test CA, but for `other.example`.
    CaSignedOtherName,
}

/// How the destination asks for TLS.
#[derive(Clone, Copy)]
enum Policy {
    /// An MTA-STS policy with this `mode`, `outboundTls` left at its
    /// default (opportunistic).
    MtaSts(&'static str),
    /// No MTA-STS; `outboundTls: verified`.
    Verified,
}

struct World {
    postfix: PostfixMx,
    relay: RelayProc,
    config: PathBuf,
    https: Option<HttpsServer>,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// Postfix, DNS, the policy host (for [`Policy::MtaSts`]) and the relay.
async fn world(cert: MxCert, policy: Policy) -> World {
    let version = PostfixMx::version().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("postfix {version}");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let (chain, key) = match cert {
        MxCert::Valid => {
            let c = ca.issue_server_cert(&["mx.dest.test"]).unwrap();
            (c.chain_pem, c.key_pem)
        }
        MxCert::SelfSignedOtherName => self_signed("other.example"),
        MxCert::CaSignedOtherName => {
            let c = ca.issue_server_cert(&["other.example"]).unwrap();
            (c.chain_pem, c.key_pem)
        }
    };
    let postfix = PostfixMx::start("mx.dest.test", "dest.test", &chain, &key)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let dns = DnsServer::start().await.expect("dns");
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", Ipv4Addr::LOCALHOST);
    let (https, sts_port, outbound_tls) = match policy {
        Policy::MtaSts(mode) => {
            dns.add_txt("_mta-sts.dest.test", "v=STSv1; id=1;");
            dns.add_a("mta-sts.dest.test", Ipv4Addr::LOCALHOST);
            let (https, port) = policy_host(&ca).await;
            https.respond(
                200,
                "text/plain; charset=utf-8",
                &format!(
                    "version: STSv1\r\nmode: {mode}\r\nmx: mx.dest.test\r\nmax_age: 86400\r\n"
                ),
            );
            (Some(https), port, "opportunistic")
        }
        Policy::Verified => (None, 443, "verified"),
    };
    let ca_file = ca.write_ca(dir.path()).unwrap();

    let (smtp, http) = (loopback(free_port()), loopback(free_port()));
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
  lease: 10s
delivery:
  transport: mx
  outboundTls: {outbound_tls}
  tls:
    caFile: "{ca_file}"
  mx:
    port: {port}
    nameservers: ["{dns}"]
    mtaStsPort: {sts_port}
  # One attempt: a deferral stays deferred for the test's lifetime.
  retrySchedule: [1h]
  timeouts:
    connect: 5s
    greeting: 10s
    command: 10s
    data: 10s
http:
  address: "{http}"
"#,
        key = repo()
            .join("examples/local/dkim-example.test.key")
            .display(),
        ca_file = ca_file.display(),
        port = postfix.port(),
        dns = dns.addr(),
    );
    let config = dir.path().join("relay.yaml");
    std::fs::write(&config, yaml).unwrap();
    let relay = RelayProc::start(dir.path(), &config, smtp, http).await;
    World {
        postfix,
        relay,
        config,
        https,
        _dns: dns,
        _dir: dir,
    }
}

/// The MTA-STS policy host for `mta-sts.dest.test`, on 443 when it can
/// bind it (root, port free); otherwise on a free port the relay is told
/// about through `delivery.mx.mtaStsPort`.
async fn policy_host(ca: &TestCa) -> (HttpsServer, u16) {
    let cert = ca.issue_server_cert(&["mta-sts.dest.test"]).unwrap();
    match HttpsServer::start_on(&cert, 443).await {
        Ok(https) => (https, 443),
        Err(e) => {
            let https = HttpsServer::start(&cert).await.expect("https");
            eprintln!(
                "cannot bind 127.0.0.1:443 ({e}): policy host on {} via delivery.mx.mtaStsPort",
                https.port()
            );
            let port = https.port();
            (https, port)
        }
    }
}

/// A self-signed certificate (no CA the relay knows) for `name`:
/// `(certificate PEM, key PEM)`.
fn self_signed(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Sends one message to the relay; returns the queue id from its 250.
async fn send(smtp: SocketAddr, subject: &str) -> String {
    let stream = TcpStream::connect(smtp).await.expect("connect relay");
    let mut r = BufReader::new(stream);
    async fn reply(r: &mut BufReader<TcpStream>) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.expect("read");
            assert!(!line.is_empty(), "relay closed after {all}");
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
    cmd(&mut r, "RCPT TO:<user@dest.test>", "250").await;
    cmd(&mut r, "DATA", "354").await;
    let body = format!(
        "From: <app@example.test>\r\nTo: <user@dest.test>\r\nSubject: {subject}\r\n\r\nhello\r\n."
    );
    let done = cmd(&mut r, &body, "250").await;
    cmd(&mut r, "QUIT", "221").await;
    done.trim()
        .rsplit(' ')
        .next()
        .expect("queue id in the reply")
        .to_string()
}

/// The `queue list --json` row of message `id` (embedded queue, through
/// the running relay's admin API).
async fn row(config: &Path, id: &str) -> Option<Value> {
    let out = tokio::time::timeout(
        DELIVERY,
        Command::new(relay_bin())
            .args(["queue", "list", "--json", "--config"])
            .arg(config)
            .current_dir(config.parent().expect("config in a directory"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("queue list hung")
    .expect("run petrel-relay queue list");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "queue list: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    list.as_array()
        .expect("list is an array")
        .iter()
        .find(|r| r["queueId"] == id)
        .cloned()
}

/// Polls until message `id` is deferred; its row.
async fn wait_deferred(w: &World, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        if let Some(r) = row(&w.config, id).await
            && r["state"] == "deferred"
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never deferred: {:?}\nrelay log:\n{}\npostfix log:\n{}",
            row(&w.config, id).await,
            w.relay.log(),
            w.postfix.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With MTA-STS, the relay fetched the policy (so it, not the configured
/// mode, decided): a request for the well-known path on the policy host.
fn policy_fetched(w: &World) {
    if let Some(https) = &w.https {
        let requests = https.requests();
        assert!(
            requests.contains(&(
                "/.well-known/mta-sts.txt".to_string(),
                "mta-sts.dest.test".to_string()
            )),
            "policy never fetched: {requests:?}"
        );
    }
}

/// Postfix's log lines that contain `needle`.
fn log_lines(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The message arrives at Postfix, whose Received header and log show TLS.
async fn delivered_over_tls(cert: MxCert, policy: Policy, subject: &str) {
    let w = world(cert, policy).await;
    send(w.relay.smtp, subject).await;
    let got = w.postfix.wait_for_messages(1, DELIVERY).await;
    assert_eq!(
        got.len(),
        1,
        "not delivered\nrelay log:\n{}\npostfix log:\n{}",
        w.relay.log(),
        w.postfix.log()
    );
    let mail = &got[0];
    assert!(mail.contains(&format!("Subject: {subject}")), "{mail}");
    let received = mail
        .split("\nReceived: ")
        .nth(1)
        .expect("Postfix's Received header");
    assert!(
        received.contains("(using TLSv1.") && received.contains("with ESMTPS"),
        "Received header shows no TLS: {mail}"
    );
    let log = w.postfix.log();
    let tls = log_lines(&log, "TLS connection established from");
    assert!(!tls.is_empty(), "no TLS in the Postfix log:\n{log}");
    policy_fetched(&w);
    eprintln!(
        "Received: {}",
        received.split("\n\tfor").next().unwrap_or(received)
    );
    for line in tls.iter().chain(&log_lines(&log, "status=sent")) {
        eprintln!("postfix: {line}");
    }
    assert!(w.relay.terminate(GRACE).await, "relay exited cleanly");
    // Postfix offers PIPELINING and CHUNKING, so the relay sent the
    // message with BDAT, not DATA. Postfix counts both in the disconnect
    // line it logs once the relay's pooled session has ended.
    assert!(
        w.postfix.wait_for_log(" bdat=1", DELIVERY).await,
        "no BDAT in Postfix's session counts:\n{}",
        w.postfix.log()
    );
    let log = w.postfix.log();
    assert!(
        log_lines(&log, "disconnect from")
            .iter()
            .all(|l| !l.contains(" data=")),
        "{log}"
    );
}

/// The message is deferred with a TLS diagnostic; Postfix saw the relay
/// connect but never a MAIL FROM, and nothing arrived.
async fn deferred_never_plain(cert: MxCert, policy: Policy, subject: &str) {
    let w = world(cert, policy).await;
    let id = send(w.relay.smtp, subject).await;
    let r = wait_deferred(&w, &id).await;
    let reply = r["lastReply"].as_str().unwrap_or_default().to_string();
    let lower = reply.to_ascii_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "deferral without a TLS diagnostic: {r}"
    );
    // The relay's session with Postfix is over once it is deferred; wait
    // for Postfix to log its end (the disconnect line counts the commands
    // it got: `ehlo=1 starttls=0/1`), then read what the relay sent. The
    // harness's own port probe shows as `commands=0/0`, without `ehlo=`.
    assert!(
        w.postfix.wait_for_log(" ehlo=", DELIVERY).await,
        "Postfix never saw the relay:\n{}",
        w.postfix.log()
    );
    let log = w.postfix.log();
    let sessions = log_lines(&log, "disconnect from");
    assert!(
        sessions
            .iter()
            .filter(|l| l.contains(" ehlo="))
            .all(|l| l.contains("starttls=")),
        "a session without STARTTLS:\n{log}"
    );
    // Postfix counts MAIL FROM in the disconnect line (`mail=1`) and logs
    // `client=` when one opens a queue file: neither may appear.
    assert!(
        sessions.iter().all(|l| !l.contains(" mail=")),
        "MAIL FROM reached Postfix:\n{log}"
    );
    assert!(log_lines(&log, ": client=").is_empty(), "{log}");
    assert!(w.postfix.messages().is_empty(), "a message arrived");
    policy_fetched(&w);
    eprintln!("deferred: {}", r["lastReply"]);
    for line in log_lines(&log, "postfix/smtpd") {
        eprintln!("postfix: {line}");
    }
    assert!(w.relay.terminate(GRACE).await, "relay exited cleanly");
}

#[tokio::test]
async fn enforce_delivers_over_tls_to_postfix_with_a_ca_signed_certificate() {
    let _port = PORT_443.lock().await;
    tokio::time::timeout(
        LIMIT,
        delivered_over_tls(MxCert::Valid, Policy::MtaSts("enforce"), "enforce ok"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn enforce_defers_a_self_signed_other_name_and_never_sends_plain_text() {
    let _port = PORT_443.lock().await;
    tokio::time::timeout(
        LIMIT,
        deferred_never_plain(
            MxCert::SelfSignedOtherName,
            Policy::MtaSts("enforce"),
            "enforce bad",
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn enforce_defers_a_ca_signed_certificate_for_another_name() {
    let _port = PORT_443.lock().await;
    tokio::time::timeout(
        LIMIT,
        deferred_never_plain(
            MxCert::CaSignedOtherName,
            Policy::MtaSts("enforce"),
            "enforce other name",
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn testing_delivers_despite_a_self_signed_other_name() {
    let _port = PORT_443.lock().await;
    tokio::time::timeout(
        LIMIT,
        delivered_over_tls(
            MxCert::SelfSignedOtherName,
            Policy::MtaSts("testing"),
            "testing bad",
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn verified_without_mta_sts_delivers_with_a_ca_signed_certificate() {
    tokio::time::timeout(
        LIMIT,
        delivered_over_tls(MxCert::Valid, Policy::Verified, "verified ok"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn verified_without_mta_sts_defers_a_self_signed_other_name() {
    tokio::time::timeout(
        LIMIT,
        deferred_never_plain(
            MxCert::SelfSignedOtherName,
            Policy::Verified,
            "verified bad",
        ),
    )
    .await
    .expect("test timed out");
}
