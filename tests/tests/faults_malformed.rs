//! Fault: malformed input from clients. Every case gets well-formed SMTP
//! replies (or a clean close), never a panic; the relay keeps serving and
//! its memory stays bounded.
//!
//! Needs the relay binary: `cargo build -p petrel-relay` first.

use std::net::SocketAddr;
use std::time::Duration;

use petrel_crds::config::Duration as CfgDuration;
use petrel_tests::bench::client::{Client, ClientError, Reply};
use petrel_tests::bench::procstat;
use petrel_tests::bench::scenario::{Scenario, accepted_ids};
use petrel_tests::redis::Persistence;

const LIMIT: Duration = Duration::from_secs(120);

/// A named malformed input; each is followed by `QUIT` so a server that
/// survives it closes the session itself.
struct Case {
    name: &'static str,
    input: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let ehlo = b"EHLO fuzz.test\r\n".to_vec();
    let with = |prefix: &[u8], rest: &[u8]| [prefix, rest].concat();
    let mail = b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n".to_vec();
    vec![
        Case { name: "overlong command line (100 KB)", input: [b"EHLO ".as_slice(), &vec![b'a'; 100_000], b"\r\n"].concat() },
        Case { name: "overlong line without any newline (1 MB)", input: vec![b'x'; 1_000_000] },
        Case { name: "bare LF commands", input: b"EHLO lf.test\nMAIL FROM:<sender@example.test>\nNOOP\n".to_vec() },
        Case { name: "bare CR commands", input: b"EHLO cr.test\rMAIL FROM:<sender@example.test>\rNOOP\r\n".to_vec() },
        Case { name: "NUL bytes", input: b"EHLO \0\0\0\r\nMAIL FROM:<a\0b@example.test>\r\n\0\0\0\0\r\n".to_vec() },
        Case { name: "invalid UTF-8", input: with(&ehlo, b"MAIL FROM:<\xc3\x28\xff@example.test>\r\nRCPT TO:<\xfe\xfe@example.net>\r\nVRFY \x80\x81\r\n") },
        Case { name: "unknown verbs and empty lines", input: b"\r\n\r\nFOO\r\nEHLO\r\nMAIL\r\nRCPT TO:\r\nDATA\r\n".to_vec() },
        Case {
            name: "garbage after PIPELINING (before DATA)",
            input: with(
                &ehlo,
                b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<r@example.net>\r\n\x00\xff\xfe garbage \x1b[31m\r\n\x01\x02\r\nDATA\r\nSubject: g\r\n\r\nbody\r\n.\r\n",
            ),
        },
        Case {
            name: "garbage inside pipelined DATA",
            input: with(
                &ehlo,
                &with(&mail, b"\x00\xff\xfe garbage \x1b[31m\r\n\x01\x02\r\n.\r\n"),
            ),
        },
        Case { name: "commands pipelined past DATA", input: with(&ehlo, b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\nRSET\r\nNOOP\r\n.\r\n") },
        Case { name: "huge header (2 MB single line)", input: with(&ehlo, &with(&mail, &[b"Subject: ".as_slice(), &vec![b'h'; 2_000_000], b"\r\n\r\nbody\r\n.\r\n"].concat())) },
        Case { name: "many headers (100k)", input: with(&ehlo, &with(&mail, &[b"X-H: v\r\n".repeat(100_000).as_slice(), b"\r\nbody\r\n.\r\n"].concat())) },
        Case { name: "message over maxMessageSize (3 MB body)", input: with(&ehlo, &with(&mail, &[b"Subject: big\r\n\r\n".as_slice(), &b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n".repeat(45_000), b".\r\n"].concat())) },
        Case { name: "SMTP smuggling: bare-LF dot inside DATA", input: with(&ehlo, &with(&mail, b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n")) },
        Case { name: "AUTH and STARTTLS not offered", input: with(&ehlo, b"AUTH PLAIN AGZvbwBiYXI=\r\nSTARTTLS\r\n") },
        Case { name: "overlong address", input: with(&ehlo, &[b"MAIL FROM:<".as_slice(), &vec![b'a'; 5000], b"@example.test>\r\n"].concat()) },
    ]
}

/// Sends the case followed by QUIT and reads every reply until the server
/// closes. Err when a line is not an SMTP reply.
async fn run_case(addr: SocketAddr, case: &Case) -> Result<Vec<Reply>, String> {
    let (mut c, greeting) = Client::connect(addr, Duration::from_secs(10))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut replies = vec![greeting];
    // The server may close mid-way (e.g. 421 or 500 on an overlong line):
    // a failed write is fine, we then read what it said.
    let _ = c.send_raw(&case.input).await;
    let _ = c.send_raw(b"\r\nQUIT\r\n").await;
    loop {
        match c.read_reply().await {
            Ok(r) => {
                let quit = r.code == 221;
                replies.push(r);
                if quit || replies.len() > 200_000 {
                    return Ok(replies);
                }
            }
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => return Ok(replies),
            Err(ClientError::Malformed(line)) => {
                return Err(format!("not an SMTP reply: {line:?}"));
            }
            Err(ClientError::Timeout(_)) => return Err("no reply and no close within 10 s".into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_malformed_input_gets_clear_replies_and_relay_keeps_serving() {
    tokio::time::timeout(LIMIT, async {
        let mut s = Scenario::start(1, Persistence::None, |c| {
            c.limits.max_message_size = 1024 * 1024;
            c.limits.max_errors = 1000;
            // A case that leaves the session waiting shows as a 421, fast.
            c.limits.command_timeout = CfgDuration::from_secs(5);
            c.limits.data_timeout = CfgDuration::from_secs(5);
        })
        .await
        .expect("scenario");
        let addr = s.relays[0].smtp_addr();
        let pid = s.relays[0].pid().expect("relay pid");
        let mut failures = Vec::new();
        for case in corpus() {
            match run_case(addr, &case).await {
                Ok(replies) => {
                    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
                    let last = replies
                        .iter()
                        .rev()
                        .find(|r| r.code >= 400)
                        .map(Reply::to_string);
                    eprintln!("{}: {codes:?} {}", case.name, last.unwrap_or_default());
                    if !s.relays[0].is_running() {
                        failures.push(format!("{}: relay died", case.name));
                        break;
                    }
                    // The smuggled transaction must never be accepted as a
                    // second message.
                    if case.name.starts_with("SMTP smuggling") {
                        // Vulnerable: "\n.\n" ends the first message, and the
                        // smuggled MAIL/RCPT/DATA get a second 354.
                        let data_starts = replies.iter().filter(|r| r.code == 354).count();
                        if data_starts > 1 {
                            failures.push(format!(
                                "{}: smuggled a second DATA: {replies:?}",
                                case.name
                            ));
                        }
                    }
                }
                Err(e) => failures.push(format!("{}: {e}", case.name)),
            }
        }
        assert!(
            failures.is_empty(),
            "malformed input failures:\n{}\n{}",
            failures.join("\n"),
            s.logs()
        );

        // Memory stayed bounded: 1 MB messages, 2 MB headers and 1 MB lines
        // must not be buffered whole many times over.
        let hwm_mb = procstat::status_kb(pid, "VmHWM").unwrap_or(0) / 1024;
        assert!(
            hwm_mb < 512,
            "relay peak RSS {hwm_mb} MB after the malformed corpus"
        );

        // Still serving.
        let report = s.send("after-malformed", 5, 1, 1).await;
        assert_eq!(
            accepted_ids(&report).len(),
            5,
            "{:?}\n{}",
            report.failed.first(),
            s.logs()
        );
        assert!(
            s.sink.wait_for(5, 5, Duration::from_secs(30)).await,
            "{}",
            s.logs()
        );
        assert!(s.relays[0].is_running());
    })
    .await
    .expect("test timed out");
}
