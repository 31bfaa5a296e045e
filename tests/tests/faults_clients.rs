//! Fault: clients that hold resources. Slow clients (one byte a second) are
//! timed out without starving the others, and 2,000 concurrent connections
//! are held and served.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use petrel_crds::config::Duration as CfgDuration;
use petrel_tests::bench::client::Client;
use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::redis::Persistence;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
const CONNECTIONS: usize = 2000;

/// What happened to a client that sent `payload` one byte a second.
#[derive(Debug)]
struct Dribble {
    /// Bytes of the payload written before the server closed.
    sent: usize,
    /// Whether the server closed before the whole payload was sent.
    closed_early: bool,
    /// Everything the server said.
    transcript: String,
}

/// Connects, sends `prefix` at once (pipelined commands), then `payload`
/// one byte a second until the server closes the connection or the payload
/// is exhausted.
async fn dribble(addr: SocketAddr, prefix: &[u8], payload: &[u8]) -> Dribble {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    });
    let _ = w.write_all(prefix).await;
    let mut sent = 0;
    for &b in payload {
        if reader.is_finished() || w.write_all(&[b]).await.is_err() {
            break;
        }
        sent += 1;
        // The point of the test: a client this slow.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let closed_early = reader.is_finished();
    drop(w);
    let transcript = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Dribble {
        sent,
        closed_early,
        transcript,
    }
}

async fn slow_clients_are_cut(prefix: &'static [u8], payload: &'static [u8], phase: &str) {
    let s = Scenario::start(1, Persistence::None, |c| {
        c.limits.command_timeout = CfgDuration::from_secs(2);
        c.limits.data_timeout = CfgDuration::from_secs(2);
    })
    .await
    .expect("scenario");
    let addr = s.relays[0].smtp_addr();
    let slow: Vec<_> = (0..20)
        .map(|_| tokio::spawn(dribble(addr, prefix, payload)))
        .collect();
    // Meanwhile ordinary clients are served.
    let report = s.send(phase, 30, 5, 1).await;
    assert_eq!(
        accepted_ids(&report).len(),
        30,
        "{phase}: normal clients starved: {:?} {:?}\n{}",
        report.transient.first(),
        report.failed.first(),
        s.logs()
    );
    for (i, task) in slow.into_iter().enumerate() {
        let d = task.await.expect("dribbler");
        assert!(
            d.closed_early,
            "{phase}: slow client {i} was never timed out ({} of {} bytes sent); server said {:?}",
            d.sent,
            payload.len(),
            d.transcript
        );
    }
    assert!(s.sink.wait_for(30, 30, Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_slow_client_in_command_is_timed_out_without_starving_others() {
    tokio::time::timeout(
        LIMIT,
        slow_clients_are_cut(
            b"",
            b"EHLO a-very-slow-client-that-never-finishes.example.test\r\n",
            "cmd",
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_slow_client_in_data_is_timed_out_without_starving_others() {
    tokio::time::timeout(
        LIMIT,
        slow_clients_are_cut(
            b"EHLO slow.test\r\nMAIL FROM:<sender@example.test>\r\nRCPT TO:<slow@example.net>\r\nDATA\r\n",
            b"Subject: a message that arrives one byte per second and never ends\r\n\r\nbody",
            "data",
        ),
    )
    .await
    .expect("test timed out");
}

/// The soft limit on open files of this process.
fn nofile_limit() -> Option<(u64, String)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some((fields.get(3)?.parse().ok()?, fields.get(4)?.to_string()))
}

/// Raises the soft fd limit to the hard one (the `ulimit -n` of a shell),
/// before the relay is spawned so it inherits it too.
fn raise_nofile(needed: u64) {
    let Some((soft, hard)) = nofile_limit() else {
        return;
    };
    if soft >= needed {
        return;
    }
    let _ = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={hard}:{hard}"),
        ])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_two_thousand_concurrent_connections_are_held_and_served() {
    // Client and relay each hold one fd per connection, plus slack.
    let needed = (CONNECTIONS as u64) * 2 + 500;
    raise_nofile(needed);
    if let Some((soft, _)) = nofile_limit() {
        assert!(
            soft >= needed,
            "open-file limit {soft} < {needed}: raise `ulimit -n`"
        );
    }
    tokio::time::timeout(LIMIT, async {
        let s = Scenario::start(1, Persistence::None, |_| {})
            .await
            .expect("scenario");
        let addr = s.relays[0].smtp_addr();
        // Open them 100 at a time; each must be greeted.
        let clients: Vec<Client> = futures::stream::iter(0..CONNECTIONS)
            .map(|i| async move {
                let (c, greeting) = Client::connect(addr, Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                assert_eq!(greeting.code, 220, "connection {i} greeted {greeting}");
                c
            })
            .buffer_unordered(100)
            .collect()
            .await;
        assert_eq!(clients.len(), CONNECTIONS);
        // All held: each still answers.
        let clients: Vec<Client> = futures::stream::iter(clients)
            .map(|mut c| async move {
                let r = c
                    .command("EHLO many.test")
                    .await
                    .expect("EHLO on a held connection");
                assert!(r.is_positive(), "EHLO: {r}");
                c
            })
            .buffer_unordered(200)
            .collect()
            .await;
        // And with all of them open, mail still flows.
        let report = s.send("many", 20, 4, 1).await;
        assert_eq!(
            accepted_ids(&report).len(),
            20,
            "{:?}\n{}",
            report.failed.first(),
            s.logs()
        );
        assert!(
            s.sink.wait_for(20, 20, Duration::from_secs(30)).await,
            "{}",
            s.logs()
        );
        drop(clients);
    })
    .await
    .expect("test timed out");
}
