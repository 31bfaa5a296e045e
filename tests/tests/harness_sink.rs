//! Tests of the SMTP sink over real TCP on 127.0.0.1 (plain and STARTTLS).

use std::time::Duration;

use petrel_tests::smtp_sink::{Mode, Reply, SmtpSink};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const LIMIT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

/// A minimal SMTP client: write lines, read (multi-line) replies.
struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(io: S) -> Self {
        Self {
            io: BufReader::new(io),
        }
    }

    /// Read one reply; returns the code and all its lines' text joined by '\n'.
    async fn reply(&mut self) -> (u16, String) {
        let mut text = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.io.read_line(&mut line).await.unwrap();
            assert!(n > 0, "connection closed while waiting for a reply");
            let code: u16 = line[..3].parse().unwrap();
            text.push(line[4..].trim_end().to_string());
            if line.as_bytes()[3] == b' ' {
                return (code, text.join("\n"));
            }
        }
    }

    async fn send(&mut self, data: &str) {
        self.io.get_mut().write_all(data.as_bytes()).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    /// True when the server closed the connection (EOF or reset).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        !matches!(self.io.read(&mut buf).await, Ok(n) if n > 0)
    }
}

async fn connect(sink: &SmtpSink) -> Client<TcpStream> {
    Client::new(TcpStream::connect(sink.addr()).await.unwrap())
}

/// EHLO, MAIL, RCPTs, DATA with `body`; returns the final reply code.
async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    from: &str,
    to: &[&str],
    body: &str,
) -> u16 {
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).await.0, 250);
    for rcpt in to {
        c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    }
    let (code, _) = c.cmd("DATA").await;
    if code != 354 {
        return code;
    }
    c.send(body).await;
    c.send(".\r\n").await;
    c.reply().await.0
}

#[tokio::test]
async fn harness_sink_records_plain_transaction() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();
        let mut c = connect(&sink).await;
        assert_eq!(c.reply().await.0, 220);
        let (code, ehlo) = c.cmd("EHLO client.test").await;
        assert_eq!(code, 250);
        for ext in [
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "SIZE",
            "STARTTLS",
            "ENHANCEDSTATUSCODES",
        ] {
            assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
        }
        // A line starting with a dot is stuffed on the wire and unstuffed by the sink.
        let body = "Subject: hi\r\n\r\n..leading dot\r\nbye\r\n";
        assert_eq!(
            send_message(
                &mut c,
                "a@example.com",
                &["b@example.org", "c@example.org"],
                body
            )
            .await,
            250
        );
        assert_eq!(c.cmd("QUIT").await.0, 221);

        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.mail_from, "a@example.com");
        assert_eq!(m.rcpt_to, vec!["b@example.org", "c@example.org"]);
        assert_eq!(m.data, b"Subject: hi\r\n\r\n.leading dot\r\nbye\r\n");
        assert!(!m.tls);
        assert_eq!(m.ehlo, "client.test");
        assert_eq!(sink.connections(), 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_starttls_with_test_ca() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();
        let mut c = connect(&sink).await;
        c.reply().await;
        c.cmd("EHLO client.test").await;
        assert_eq!(c.cmd("STARTTLS").await.0, 220);
        let tcp = c.io.into_inner();
        let config = sink.ca().expect("sink has a CA").client_config().unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = TlsConnector::from(config).connect(name, tcp).await.unwrap();
        let mut c = Client::new(tls);
        let (code, ehlo) = c.cmd("EHLO client.test").await;
        assert_eq!(code, 250);
        assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered twice: {ehlo}");
        assert_eq!(
            send_message(&mut c, "", &["x@example.org"], "hello\r\n").await,
            250
        );

        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].tls);
        assert_eq!(got[0].mail_from, "");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_scripted_replies() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();
        sink.on_rcpt("Bad@Example.org", Reply::new(550, "5.1.1 no such user"));
        sink.on_next_data(Reply::new(451, "4.3.0 try later"));
        let mut c = connect(&sink).await;
        c.reply().await;
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        assert_eq!(
            c.cmd("RCPT TO:<bad@example.org>").await,
            (550, "5.1.1 no such user".into())
        );
        assert_eq!(c.cmd("RCPT TO:<good@example.org>").await.0, 250);
        assert_eq!(c.cmd("DATA").await.0, 354);
        c.send("one\r\n.\r\n").await;
        assert_eq!(c.reply().await.0, 451);
        // The one-shot reply is used up: the retry is accepted.
        assert_eq!(
            send_message(&mut c, "a@example.com", &["good@example.org"], "two\r\n").await,
            250
        );

        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1, "the 451'd message is not recorded");
        assert_eq!(sink.transactions(), 2, "but it counts as an attempt");
        assert_eq!(got[0].rcpt_to, vec!["good@example.org"]);
        assert_eq!(got[0].data, b"two\r\n");

        sink.on_data(Reply::new(554, "5.7.1 rejected"));
        assert_eq!(
            send_message(&mut c, "a@example.com", &["good@example.org"], "three\r\n").await,
            554
        );
        sink.on_mail(Reply::new(421, "4.7.0 not now"));
        assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await.0, 421);
        sink.reset();
        assert_eq!(
            send_message(&mut c, "a@example.com", &["bad@example.org"], "four\r\n").await,
            250
        );
        let got = sink.wait_for(2, WAIT).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].text(), "four\r\n");

        // A command line longer than the limit closes the session.
        let long = format!("NOOP {}", "x".repeat(5000));
        assert_eq!(c.cmd(&long).await.0, 500);
        assert!(c.closed().await);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_pipelined_commands() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();
        let mut c = connect(&sink).await;
        c.reply().await;
        c.cmd("EHLO client.test").await;
        c.send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
            .await;
        let codes = [c.reply().await.0, c.reply().await.0, c.reply().await.0, c.reply().await.0];
        assert_eq!(codes, [250, 250, 250, 354]);
        c.send("body\r\n.\r\nQUIT\r\n").await;
        assert_eq!(c.reply().await.0, 250);
        assert_eq!(c.reply().await.0, 221);
        assert_eq!(sink.wait_for(1, WAIT).await[0].rcpt_to.len(), 2);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_session_modes() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();

        sink.set_mode(Mode::Greeting421);
        let mut c = connect(&sink).await;
        assert_eq!(c.reply().await.0, 421);
        assert!(c.closed().await);

        sink.set_mode(Mode::DropMidData);
        let mut c = connect(&sink).await;
        c.reply().await;
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@example.org>").await;
        assert_eq!(c.cmd("DATA").await.0, 354);
        c.send("Subject: partial\r\n").await;
        assert!(c.closed().await, "connection dropped mid-DATA");

        // Stalled: no greeting arrives while we wait (the stall is an hour).
        sink.set_mode(Mode::Stall(Duration::from_secs(3600)));
        let mut c = connect(&sink).await;
        let greeting = tokio::time::timeout(Duration::from_millis(200), c.reply()).await;
        assert!(greeting.is_err(), "a stalled sink must not answer");

        assert!(sink.received().is_empty());
        assert_eq!(sink.connections(), 3);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_extension_toggles() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::builder()
            .starttls(false)
            .pipelining(false)
            .eightbitmime(false)
            .smtputf8(false)
            .size(Some(100))
            .start()
            .await
            .unwrap();
        assert!(sink.ca().is_none());
        let mut c = connect(&sink).await;
        c.reply().await;
        let (_, ehlo) = c.cmd("EHLO client.test").await;
        for ext in ["PIPELINING", "8BITMIME", "SMTPUTF8", "STARTTLS"] {
            assert!(!ehlo.contains(ext), "{ext} offered: {ehlo}");
        }
        assert!(ehlo.contains("SIZE 100"));
        assert_eq!(c.cmd("STARTTLS").await.0, 502);
        assert_eq!(c.cmd("MAIL FROM:<a@example.com> SIZE=1000").await.0, 552);
        let big = "x".repeat(200) + "\r\n";
        assert_eq!(
            send_message(&mut c, "a@example.com", &["b@example.org"], &big).await,
            552
        );
        assert!(sink.received().is_empty());
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_sink_many_concurrent_sessions() {
    tokio::time::timeout(LIMIT, async {
        let sink = SmtpSink::start().await.unwrap();
        let addr = sink.addr();
        let clients: Vec<_> = (0..40)
            .map(|i| {
                tokio::spawn(async move {
                    let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
                    c.reply().await;
                    c.cmd("EHLO client.test").await;
                    let to = format!("user{i}@example.org");
                    send_message(&mut c, "a@example.com", &[&to], "hi\r\n").await
                })
            })
            .collect();
        for client in clients {
            assert_eq!(client.await.unwrap(), 250);
        }
        let got = sink.wait_for(40, WAIT).await;
        assert_eq!(got.len(), 40);
        assert_eq!(sink.connections(), 40);
    })
    .await
    .expect("test timed out");
}
