//! The outbound SMTP client: one connection to one server, any number of
//! transactions over it.
//!
//! [`SmtpClient`] is generic over the stream so tests drive it over an
//! in-memory duplex; [`connect`] does TCP, the greeting, EHLO, STARTTLS
//! (per the TLS policy) and AUTH, and hands back a ready client. Replies
//! are parsed with smtp-proto; every read and write runs under the RFC 5321
//! timeout of its stage, and every buffer is bounded.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use smtp_proto::EhloResponse;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls_result::TlsResult;
use tokio_rustls::client::TlsStream;

use super::classify::{Failure, Fault, Reply, Severity};

/// Longest reply accepted (all lines together).
const MAX_REPLY: usize = 64 * 1024;

/// RFC 5321 timeouts for each stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect: Duration,
    /// The greeting.
    pub greeting: Duration,
    /// Each command's reply, and each write.
    pub command: Duration,
    /// The reply to the end of DATA.
    pub data: Duration,
}

impl From<&petrel_crds::config::OutboundTimeouts> for Timeouts {
    fn from(t: &petrel_crds::config::OutboundTimeouts) -> Self {
        Timeouts {
            connect: t.connect.get(),
            greeting: t.greeting.get(),
            command: t.command.get(),
            data: t.data.get(),
        }
    }
}

/// What the server announced in its EHLO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE; `Some(0)` means no stated limit.
    pub size: Option<usize>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// AUTH PLAIN.
    pub auth_plain: bool,
    /// AUTH LOGIN.
    pub auth_login: bool,
}

impl Capabilities {
    fn from_ehlo(ehlo: &EhloResponse<String>) -> Capabilities {
        Capabilities {
            pipelining: ehlo.has_capability(smtp_proto::EXT_PIPELINING),
            size: ehlo
                .has_capability(smtp_proto::EXT_SIZE)
                .then_some(ehlo.size),
            eight_bit: ehlo.has_capability(smtp_proto::EXT_8BIT_MIME),
            smtputf8: ehlo.has_capability(smtp_proto::EXT_SMTP_UTF8),
            starttls: ehlo.has_capability(smtp_proto::EXT_START_TLS),
            auth_plain: ehlo.auth_mechanisms & smtp_proto::AUTH_PLAIN != 0,
            auth_login: ehlo.auth_mechanisms & smtp_proto::AUTH_LOGIN != 0,
        }
    }
}

/// The envelope of one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// MAIL FROM (empty for `<>`).
    pub mail_from: &'a str,
    /// RCPT TO, in order.
    pub recipients: &'a [String],
    /// Declared BODY=8BITMIME.
    pub eight_bit: bool,
    /// Needs SMTPUTF8.
    pub smtputf8: bool,
}

/// Result for one recipient: the accepting reply, or why it failed.
pub type RcptResult = Result<Reply, Failure>;

/// Results of one transaction, one per recipient in envelope order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Per recipient.
    pub results: Vec<RcptResult>,
    /// The failure was about the server, not the recipients (connection
    /// lost, 421, MAIL FROM refused temporarily): recipients that failed
    /// temporarily are worth trying at the next MX. The connection must not
    /// be reused when `connection_lost`.
    pub host_failure: bool,
    /// The connection is gone or in an unknown state.
    pub connection_lost: bool,
}

/// One SMTP connection.
pub struct SmtpClient<S> {
    stream: S,
    buf: Vec<u8>,
    timeouts: Timeouts,
    /// What the server offers (after the last EHLO).
    pub caps: Capabilities,
}

fn io_fault(e: std::io::Error) -> Fault {
    Fault::Io(e.to_string())
}

/// Length of the first complete reply in `buf`, if there is one: lines up
/// to one whose fourth byte is not `-`.
fn complete_reply_len(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
        let line = &buf[start..start + nl + 1];
        start += nl + 1;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

/// Parses one complete reply with smtp-proto.
pub fn parse_reply(raw: &[u8]) -> Result<Reply, Fault> {
    let mut receiver = ResponseReceiver::default();
    match receiver.parse(&mut raw.iter()) {
        Ok(r) => {
            let esc = (r.esc != [0, 0, 0]).then_some(r.esc);
            Ok(Reply {
                code: r.code,
                esc,
                message: r.message,
            })
        }
        Err(e) => Err(Fault::Protocol(format!(
            "bad reply {:?}: {e:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        ))),
    }
}

/// Dot-stuffs `data` for DATA (RFC 5321 4.5.2) and appends the final
/// `.`, making sure the message ends with CRLF first.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 5);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        if out.ends_with(b"\n") {
            out.pop();
        }
        // A trailing CR gets its LF, not a second CR (no bare CR on the wire).
        if !out.ends_with(b"\r") {
            out.push(b'\r');
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Removes CR, LF and angle brackets from an address put on a command line.
fn address(a: &str) -> String {
    a.chars()
        .filter(|c| !matches!(c, '\r' | '\n' | '<' | '>'))
        .collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    /// Wraps a connected stream (the greeting not yet read).
    pub fn new(stream: S, timeouts: Timeouts) -> SmtpClient<S> {
        SmtpClient {
            stream,
            buf: Vec::new(),
            timeouts,
            caps: Capabilities::default(),
        }
    }

    /// The raw bytes of the next reply.
    async fn read_raw(&mut self, timeout: Duration, stage: &'static str) -> Result<Vec<u8>, Fault> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(len) = complete_reply_len(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            if self.buf.len() > MAX_REPLY {
                return Err(Fault::Protocol(format!("reply to {stage} too long")));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| Fault::Timeout(stage))?
                .map_err(io_fault)?;
            if n == 0 {
                return Err(Fault::Io(format!(
                    "connection closed while waiting for {stage}"
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next reply.
    pub async fn read_reply(
        &mut self,
        timeout: Duration,
        stage: &'static str,
    ) -> Result<Reply, Fault> {
        let raw = self.read_raw(timeout, stage).await?;
        parse_reply(&raw)
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), Fault> {
        let timeout = self.timeouts.command.max(self.timeouts.data);
        tokio::time::timeout(timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| Fault::Timeout(stage))?
        .map_err(io_fault)
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str, stage: &'static str) -> Result<Reply, Fault> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(self.timeouts.command, stage).await
    }

    /// Reads the greeting.
    pub async fn greeting(&mut self) -> Result<Reply, Fault> {
        self.read_reply(self.timeouts.greeting, "greeting").await
    }

    /// EHLO, falling back to HELO when EHLO is refused. `Ok(Err(reply))`
    /// when both are refused.
    pub async fn ehlo(&mut self, hostname: &str) -> Result<Result<Capabilities, Reply>, Fault> {
        self.write(format!("EHLO {hostname}\r\n").as_bytes(), "EHLO")
            .await?;
        let raw = self.read_raw(self.timeouts.command, "EHLO").await?;
        let reply = parse_reply(&raw)?;
        if reply.severity() == Severity::Positive {
            let caps = match EhloResponse::parse(&mut raw.iter()) {
                Ok(ehlo) => Capabilities::from_ehlo(&ehlo),
                // A server whose extension list smtp-proto cannot read is
                // treated as offering none: still a working server.
                Err(_) => Capabilities::default(),
            };
            self.caps = caps;
            return Ok(Ok(caps));
        }
        let helo = self.command(&format!("HELO {hostname}"), "HELO").await?;
        if helo.severity() == Severity::Positive {
            self.caps = Capabilities::default();
            Ok(Ok(self.caps))
        } else {
            Ok(Err(reply))
        }
    }

    /// AUTH PLAIN or LOGIN (whichever is offered, PLAIN first).
    pub async fn auth(&mut self, user: &str, password: &str) -> Result<Result<(), Reply>, Fault> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let reply = if self.caps.auth_plain || !self.caps.auth_login {
            let token = b64.encode(format!("\0{user}\0{password}"));
            self.command(&format!("AUTH PLAIN {token}"), "AUTH").await?
        } else {
            let r = self.command("AUTH LOGIN", "AUTH").await?;
            if r.code != 334 {
                return Ok(Err(r));
            }
            let r = self.command(&b64.encode(user), "AUTH").await?;
            if r.code != 334 {
                return Ok(Err(r));
            }
            self.command(&b64.encode(password), "AUTH").await?
        };
        if reply.severity() == Severity::Positive {
            Ok(Ok(()))
        } else {
            Ok(Err(reply))
        }
    }

    /// RSET between transactions; false when the server refused it (the
    /// connection should then be closed).
    pub async fn rset(&mut self) -> Result<bool, Fault> {
        Ok(self.command("RSET", "RSET").await?.severity() == Severity::Positive)
    }

    /// QUIT, best effort.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.write(b"QUIT\r\n", "QUIT").await;
            let _ = self.read_reply(Duration::from_secs(5), "QUIT").await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    /// The stream and any bytes already read past the last reply.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    fn mail_command(&self, env: &Envelope<'_>, size: usize) -> String {
        let mut line = format!("MAIL FROM:<{}>", address(env.mail_from));
        if self.caps.size.is_some() {
            line.push_str(&format!(" SIZE={size}"));
        }
        // Without 8BITMIME the body goes as it is: nearly every server
        // accepts 8-bit text, and downgrading would break DKIM signatures.
        if env.eight_bit && self.caps.eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.caps.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        line
    }

    /// One mail transaction: MAIL, RCPT for each recipient, DATA, with
    /// PIPELINING when offered. Faults before any result become temporary
    /// failures of every recipient with `connection_lost` set.
    pub async fn send(&mut self, env: &Envelope<'_>, data: &[u8]) -> Transaction {
        let n = env.recipients.len();
        let all = |f: Failure| vec![Err(f); n];
        if env.smtputf8 && !self.caps.smtputf8 {
            return Transaction {
                results: all(Failure::Fault(Fault::Unsendable {
                    status: "5.6.7",
                    reason: "the message needs SMTPUTF8 and the server does not offer it".into(),
                })),
                host_failure: false,
                connection_lost: false,
            };
        }
        if let Some(limit) = self.caps.size
            && limit > 0
            && data.len() > limit
        {
            return Transaction {
                results: all(Failure::Fault(Fault::Unsendable {
                    status: "5.3.4",
                    reason: format!(
                        "message of {} bytes exceeds the server's limit of {limit}",
                        data.len()
                    ),
                })),
                host_failure: false,
                connection_lost: false,
            };
        }
        match self.send_inner(env, data).await {
            Ok(t) => t,
            Err((fault, partial)) => {
                let mut results = partial;
                results.resize(n, Err(Failure::Fault(fault.clone())));
                // Recipients refused for good before the fault keep their
                // answers; everything else is retried.
                let results = results
                    .into_iter()
                    .map(|r| match r {
                        Err(Failure::Reply(reply)) if reply.severity() == Severity::Permanent => {
                            Err(Failure::Reply(reply))
                        }
                        _ => Err(Failure::Fault(fault.clone())),
                    })
                    .collect();
                Transaction {
                    results,
                    host_failure: true,
                    connection_lost: true,
                }
            }
        }
    }

    async fn send_inner(
        &mut self,
        env: &Envelope<'_>,
        data: &[u8],
    ) -> Result<Transaction, (Fault, Vec<RcptResult>)> {
        let n = env.recipients.len();
        let mail = self.mail_command(env, data.len());
        let rcpts: Vec<String> = env
            .recipients
            .iter()
            .map(|r| format!("RCPT TO:<{}>", address(r)))
            .collect();
        let cmd = self.timeouts.command;
        let pipelining = self.caps.pipelining;

        let mail_reply;
        let mut rcpt_replies: Vec<Reply> = Vec::with_capacity(n);
        let mut data_reply: Option<Reply> = None;
        if pipelining {
            let mut batch = String::new();
            batch.push_str(&mail);
            batch.push_str("\r\n");
            for r in &rcpts {
                batch.push_str(r);
                batch.push_str("\r\n");
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), "MAIL")
                .await
                .map_err(|f| (f, vec![]))?;
            mail_reply = self
                .read_reply(cmd, "MAIL")
                .await
                .map_err(|f| (f, vec![]))?;
            for _ in 0..n {
                match self.read_reply(cmd, "RCPT").await {
                    Ok(r) => rcpt_replies.push(r),
                    Err(f) => return Err((f, rcpt_errors(&mail_reply, &rcpt_replies))),
                }
            }
            data_reply = Some(
                self.read_reply(cmd, "DATA")
                    .await
                    .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?,
            );
        } else {
            mail_reply = self.command(&mail, "MAIL").await.map_err(|f| (f, vec![]))?;
            if mail_reply.severity() == Severity::Positive {
                for r in &rcpts {
                    match self.command(r, "RCPT").await {
                        Ok(reply) => rcpt_replies.push(reply),
                        Err(f) => return Err((f, rcpt_errors(&mail_reply, &rcpt_replies))),
                    }
                }
            }
        }

        // MAIL refused: every recipient shares that answer.
        if mail_reply.severity() != Severity::Positive {
            if let Some(d) = &data_reply
                && d.code == 354
            {
                // A confused server accepted DATA anyway: end it empty.
                self.write(b".\r\n", "DATA")
                    .await
                    .map_err(|f| (f, vec![]))?;
                let _ = self.read_reply(self.timeouts.data, "end of DATA").await;
            }
            let host_failure =
                mail_reply.severity() != Severity::Permanent || mail_reply.code == 421;
            return Ok(Transaction {
                results: vec![Err(Failure::Session(mail_reply.clone())); n],
                host_failure,
                connection_lost: mail_reply.code == 421,
            });
        }

        let accepted = rcpt_replies
            .iter()
            .filter(|r| r.severity() == Severity::Positive)
            .count();
        let lost_421 = rcpt_replies.iter().any(|r| r.code == 421);

        if !pipelining && accepted > 0 {
            data_reply = Some(
                self.command("DATA", "DATA")
                    .await
                    .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?,
            );
        }

        let final_reply = match data_reply {
            Some(d) if d.code == 354 => {
                if accepted == 0 {
                    // RFC 2920 3.1: DATA accepted with no recipient; send
                    // an empty message and ignore the outcome.
                    self.write(b".\r\n", "DATA")
                        .await
                        .map_err(|f| (f, vec![]))?;
                    let _ = self.read_reply(self.timeouts.data, "end of DATA").await;
                    None
                } else {
                    let body = dot_stuff(data);
                    self.write(&body, "DATA")
                        .await
                        .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?;
                    Some(
                        self.read_reply(self.timeouts.data, "end of DATA")
                            .await
                            .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?,
                    )
                }
            }
            // DATA must be answered 354 or refused: a 2xx means the body
            // was never sent, so it cannot count as a delivery.
            Some(d) if d.severity() == Severity::Positive => {
                return Err((
                    Fault::Protocol(format!("DATA answered {d} instead of 354")),
                    rcpt_errors(&mail_reply, &rcpt_replies),
                ));
            }
            Some(d) => Some(d),
            None => None,
        };

        let results = rcpt_replies
            .into_iter()
            .map(|r| {
                if r.severity() != Severity::Positive {
                    return Err(Failure::Reply(r));
                }
                match &final_reply {
                    Some(f) if f.severity() == Severity::Positive => Ok(f.clone()),
                    Some(f) => Err(Failure::Session(f.clone())),
                    None => Err(Failure::Fault(Fault::Protocol("no reply to DATA".into()))),
                }
            })
            .collect();
        let lost = lost_421 || final_reply.as_ref().is_some_and(|r| r.code == 421);
        Ok(Transaction {
            results,
            host_failure: lost,
            connection_lost: lost,
        })
    }
}

/// Results known so far when a fault interrupts the RCPT phase.
fn rcpt_errors(mail: &Reply, rcpts: &[Reply]) -> Vec<RcptResult> {
    if mail.severity() != Severity::Positive {
        return Vec::new();
    }
    rcpts
        .iter()
        .map(|r| match r.severity() {
            Severity::Permanent => Err(Failure::Reply(r.clone())),
            Severity::Positive
            | Severity::Intermediate
            | Severity::Transient
            | Severity::Invalid => Err(Failure::Fault(Fault::Io("interrupted".into()))),
        })
        .collect()
}

/// A TCP stream, upgraded to TLS or not.
pub enum Stream {
    /// Plain text.
    Plain(TcpStream),
    /// After STARTTLS or implicit TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How to use TLS on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS when offered, plain text otherwise.
    Opportunistic,
    /// STARTTLS must be offered and succeed.
    Required,
    /// TLS from the first byte (smarthost on 465).
    Implicit,
    /// Never (smarthost `tls: none`).
    Disabled,
}

/// Everything [`connect`] needs.
#[derive(Clone)]
pub struct ConnectSettings {
    /// Our name for EHLO.
    pub ehlo_name: String,
    /// Stage timeouts.
    pub timeouts: Timeouts,
    /// TLS policy.
    pub tls: TlsPolicy,
    /// rustls config for the handshake (whether certificates are verified).
    pub tls_config: Arc<rustls::ClientConfig>,
    /// The TLS policy in force, for logs, metrics and the connection pool
    /// key (`opportunistic`, `encrypted`, `verified`, `mta-sts`, `none`).
    pub tls_label: &'static str,
    /// AUTH user and password (smarthost).
    pub auth: Option<(String, String)>,
}

/// A ready connection.
pub struct Connection {
    /// The client, after EHLO (and STARTTLS, AUTH).
    pub client: SmtpClient<Stream>,
    /// TLS is in use.
    pub tls: bool,
    /// The server's host name (for logs and DSNs).
    pub host: String,
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    addr: SocketAddr,
    settings: &ConnectSettings,
) -> Result<TlsStream<TcpStream>, Fault> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
    let connector = TlsConnector::from(settings.tls_config.clone());
    tokio::time::timeout(settings.timeouts.connect, connector.connect(name, tcp))
        .await
        .map_err(|_| Fault::Timeout("TLS handshake"))?
        .map_err(|e| {
            let detail = format!("{e} (TLS policy {})", settings.tls_label);
            match TlsResult::of_io(&e) {
                Some(result) => Fault::Certificate {
                    result: result.as_str(),
                    detail,
                },
                None => Fault::Tls(detail),
            }
        })
}

/// A greeting or EHLO refusal: about the server, never the recipients.
fn refused(reply: Reply) -> Failure {
    Failure::Session(reply)
}

/// Connects to `addr` (server `host`), reads the greeting, says EHLO, does
/// STARTTLS and AUTH per `settings`. Any failure is about this host: the
/// caller tries the next one.
///
/// With `opportunistic` TLS, a server that offers STARTTLS but then refuses
/// it or fails the handshake (often an old stack speaking only TLS 1.0,
/// which rustls refuses) gets the mail in plain text on a new connection,
/// as Postfix's `may` level does: otherwise it would be deferred until the
/// mail expires. This gives an attacker nothing that stripping STARTTLS
/// from the EHLO reply does not already; `required` never falls back.
pub async fn connect(
    addr: SocketAddr,
    host: &str,
    settings: &ConnectSettings,
) -> Result<Connection, Failure> {
    match connect_once(addr, host, settings).await {
        Err(Failure::Fault(Fault::Tls(_) | Fault::Timeout("TLS handshake")))
            if settings.tls == TlsPolicy::Opportunistic =>
        {
            let plain = ConnectSettings {
                tls: TlsPolicy::Disabled,
                ..settings.clone()
            };
            connect_once(addr, host, &plain).await
        }
        other => other,
    }
}

async fn connect_once(
    addr: SocketAddr,
    host: &str,
    settings: &ConnectSettings,
) -> Result<Connection, Failure> {
    let t = settings.timeouts;
    let tcp = tokio::time::timeout(t.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Fault(Fault::Timeout("connect")))?
        .map_err(|e| Failure::Fault(Fault::Connect(format!("{addr}: {e}"))))?;
    let _ = tcp.set_nodelay(true);

    if settings.tls == TlsPolicy::Implicit {
        let tls = handshake(tcp, host, addr, settings)
            .await
            .map_err(Failure::Fault)?;
        let mut client = SmtpClient::new(Stream::Tls(Box::new(tls)), t);
        return finish(&mut client, settings, true)
            .await
            .map(|()| Connection {
                client,
                tls: true,
                host: host.to_string(),
            });
    }

    let mut plain = SmtpClient::new(tcp, t);
    let greeting = plain.greeting().await.map_err(Failure::Fault)?;
    if greeting.severity() != Severity::Positive {
        return Err(refused(greeting));
    }
    let caps = match plain
        .ehlo(&settings.ehlo_name)
        .await
        .map_err(Failure::Fault)?
    {
        Ok(caps) => caps,
        Err(reply) => return Err(refused(reply)),
    };
    let want_tls = matches!(settings.tls, TlsPolicy::Opportunistic | TlsPolicy::Required);
    if want_tls && caps.starttls {
        let reply = plain
            .command("STARTTLS", "STARTTLS")
            .await
            .map_err(Failure::Fault)?;
        if reply.code != 220 {
            // Offered but refused: a broken server; for `required` that is
            // a failure, for opportunistic the host is tried later.
            return Err(Failure::Fault(Fault::Tls(format!(
                "STARTTLS refused: {reply}"
            ))));
        }
        // Bytes sent before the handshake must be dropped (RFC 3207 5,
        // CVE-2011-0411 style injection), so `_early` is discarded.
        let (tcp, _early) = plain.into_parts();
        let tls = handshake(tcp, host, addr, settings)
            .await
            .map_err(Failure::Fault)?;
        let mut client = SmtpClient::new(Stream::Tls(Box::new(tls)), t);
        match client
            .ehlo(&settings.ehlo_name)
            .await
            .map_err(Failure::Fault)?
        {
            Ok(_) => {}
            Err(reply) => return Err(refused(reply)),
        }
        return auth(&mut client, settings).await.map(|()| Connection {
            client,
            tls: true,
            host: host.to_string(),
        });
    }
    if settings.tls == TlsPolicy::Required {
        return Err(Failure::Fault(Fault::TlsNotOffered));
    }
    let (tcp, early) = plain.into_parts();
    let mut client = SmtpClient::new(Stream::Plain(tcp), t);
    client.buf = early;
    client.caps = caps;
    auth(&mut client, settings).await.map(|()| Connection {
        client,
        tls: false,
        host: host.to_string(),
    })
}

/// Greeting and EHLO on an implicit-TLS connection, then AUTH.
async fn finish(
    client: &mut SmtpClient<Stream>,
    settings: &ConnectSettings,
    _tls: bool,
) -> Result<(), Failure> {
    let greeting = client.greeting().await.map_err(Failure::Fault)?;
    if greeting.severity() != Severity::Positive {
        return Err(refused(greeting));
    }
    match client
        .ehlo(&settings.ehlo_name)
        .await
        .map_err(Failure::Fault)?
    {
        Ok(_) => {}
        Err(reply) => return Err(refused(reply)),
    }
    auth(client, settings).await
}

async fn auth(client: &mut SmtpClient<Stream>, settings: &ConnectSettings) -> Result<(), Failure> {
    let Some((user, password)) = &settings.auth else {
        return Ok(());
    };
    match client.auth(user, password).await.map_err(Failure::Fault)? {
        Ok(()) => Ok(()),
        // Refused credentials are our misconfiguration, not the
        // recipients' fault: defer, never bounce.
        Err(reply) => Err(Failure::Fault(Fault::Protocol(format!(
            "AUTH refused: {reply}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            greeting: Duration::from_secs(5),
            command: Duration::from_secs(5),
            data: Duration::from_secs(5),
        }
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".\r\nx"), b"..\r\nx\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\n"), b"x\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"x\r"), b"x\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\r\n."), b"x\r\n..\r\n.\r\n");
    }

    #[test]
    fn replies_split_and_parse() {
        assert_eq!(complete_reply_len(b"250-a\r\n250 b\r\nrest"), Some(14));
        assert_eq!(complete_reply_len(b"250-a\r\n250"), None);
        assert_eq!(complete_reply_len(b"250\r\n"), Some(5));
        let r = parse_reply(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n").unwrap();
        assert_eq!((r.code, r.esc), (550, Some([5, 1, 1])));
        assert_eq!(r.message, "no such\nuser");
        let r = parse_reply(b"250 ok\r\n").unwrap();
        assert_eq!(r.esc, None);
        assert!(parse_reply(b"hello\r\n").is_err());
    }

    /// A scripted server on the other end of a duplex: answers each line
    /// with the next scripted reply, records what it received.
    async fn server(io: DuplexStream, script: Vec<(&'static str, &'static str)>) -> Vec<String> {
        let (r, mut w) = tokio::io::split(io);
        let mut r = BufReader::new(r);
        let mut seen = Vec::new();
        w.write_all(b"220 hi\r\n").await.unwrap();
        let mut in_data = false;
        let mut script = script.into_iter();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return seen;
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    seen.push("<data end>".into());
                } else {
                    seen.push(format!("data:{}", line.trim_end()));
                    continue;
                }
            } else {
                seen.push(line.trim_end().to_string());
            }
            let Some((expect, reply)) = script.next() else {
                return seen;
            };
            assert!(
                seen.last().unwrap().starts_with(expect),
                "{seen:?} vs {expect}"
            );
            if expect == "DATA" && reply.starts_with("354") {
                in_data = true;
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn per_recipient_results_without_pipelining() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"),
                ("MAIL FROM:<s@a.test> SIZE=", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("RCPT TO:<y@b.test>", "550 5.1.1 no such user\r\n"),
                ("RCPT TO:<z@b.test>", "451 4.3.0 try later\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "250 2.0.0 queued\r\n"),
                ("RSET", "250 ok\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        assert_eq!(c.greeting().await.unwrap().code, 220);
        let caps = c.ehlo("relay.test").await.unwrap().unwrap();
        assert!(caps.eight_bit && !caps.pipelining && caps.size == Some(1000));
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into(), "z@b.test".into()];
        let env = Envelope {
            mail_from: "s@a.test",
            recipients: &rcpts,
            eight_bit: true,
            smtputf8: false,
        };
        let t = c.send(&env, b"Subject: x\r\n\r\n.dot\r\n").await;
        assert!(!t.host_failure && !t.connection_lost);
        assert_eq!(t.results[0].as_ref().unwrap().code, 250);
        assert_eq!(
            t.results[1].as_ref().unwrap_err().reply().unwrap().code,
            550
        );
        assert_eq!(
            t.results[2].as_ref().unwrap_err().reply().unwrap().code,
            451
        );
        assert!(c.rset().await.unwrap());
        drop(c);
        let seen = srv.await.unwrap();
        assert!(
            seen.contains(&"MAIL FROM:<s@a.test> SIZE=20 BODY=8BITMIME".to_string()),
            "{seen:?}"
        );
        assert!(seen.contains(&"data:..dot".to_string()), "{seen:?}");
    }

    #[tokio::test]
    async fn a_refused_sender_is_not_a_bad_recipient() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250 mx\r\n"),
                ("MAIL FROM:<s@a.test>", "550 sender rejected\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        c.ehlo("relay.test").await.unwrap().unwrap();
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into()];
        let env = Envelope {
            mail_from: "s@a.test",
            recipients: &rcpts,
            eight_bit: false,
            smtputf8: false,
        };
        let t = c.send(&env, b"x\r\n").await;
        drop(c);
        srv.await.unwrap();
        for r in &t.results {
            let failure = r.as_ref().unwrap_err();
            assert_eq!(
                failure.outcome(),
                super::super::classify::Outcome::Permanent
            );
            assert!(
                !super::super::classify::is_hard_bounce(failure),
                "a MAIL FROM refusal must not suppress recipients: {failure:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_2xx_reply_to_data_is_not_a_delivery() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250 mx\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "250 ok\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        c.ehlo("relay.test").await.unwrap().unwrap();
        let rcpts = vec!["x@b.test".to_string()];
        let env = Envelope {
            mail_from: "s@a.test",
            recipients: &rcpts,
            eight_bit: false,
            smtputf8: false,
        };
        let t = c.send(&env, b"x\r\n").await;
        drop(c);
        srv.await.unwrap();
        let failure = t.results[0].as_ref().expect_err("the body was never sent");
        assert_eq!(
            failure.outcome(),
            super::super::classify::Outcome::Temporary
        );
        assert!(t.connection_lost);
    }

    /// A TCP server offering STARTTLS that accepts it and then sends
    /// garbage instead of a TLS handshake; it counts connections and
    /// records whether a message arrived in plain text.
    async fn broken_tls_server() -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            // At most two connections: the TLS attempt and a plain one.
            for _ in 0..2 {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let (r, mut w) = tcp.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 hi\r\n").await.unwrap();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end().to_string();
                    seen.push(line.clone());
                    if line == "STARTTLS" {
                        // Wait for the ClientHello, then answer with junk.
                        w.write_all(b"220 go ahead\r\n").await.unwrap();
                        let mut hello = [0u8; 512];
                        let _ = r.read(&mut hello).await;
                        let _ = w.write_all(b"this is not TLS\r\n").await;
                        break;
                    }
                    let reply: &[u8] = if line.starts_with("EHLO") {
                        b"250-mx\r\n250 STARTTLS\r\n"
                    } else if line == "QUIT" {
                        b"221 bye\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() || line == "QUIT" {
                        break;
                    }
                }
            }
            seen
        });
        (addr, task)
    }

    fn settings(tls: TlsPolicy) -> ConnectSettings {
        ConnectSettings {
            ehlo_name: "relay.test".into(),
            timeouts: timeouts(),
            tls,
            tls_config: super::super::tls::unverified().unwrap(),
            tls_label: "opportunistic",
            auth: None,
        }
    }

    #[tokio::test]
    async fn opportunistic_tls_falls_back_to_plain_text_after_a_failed_handshake() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let (addr, srv) = broken_tls_server().await;
            let conn = connect(addr, "mx.test", &settings(TlsPolicy::Opportunistic))
                .await
                .expect("plain text after the failed handshake");
            assert!(!conn.tls);
            conn.client.quit().await;
            let seen = srv.await.unwrap();
            assert_eq!(
                seen.iter().filter(|l| *l == "STARTTLS").count(),
                1,
                "{seen:?}"
            );

            let (addr, srv) = broken_tls_server().await;
            let err = connect(addr, "mx.test", &settings(TlsPolicy::Required))
                .await
                .err()
                .expect("required TLS never falls back");
            assert!(matches!(err, Failure::Fault(Fault::Tls(_))), "{err:?}");
            srv.abort();
        })
        .await
        .expect("test timed out");
    }

    /// Stand-in for a fuzz target: the reply reader and parser take
    /// whatever a hostile server sends without panicking.
    #[test]
    fn garbage_replies_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"0123456789 -.\r\n5abc\xff";
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Some(n) = complete_reply_len(&bytes) {
                let _ = parse_reply(&bytes[..n]);
            }
            let _ = parse_reply(&bytes);
        }
    }

    #[tokio::test]
    async fn auth_login_and_plain() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 AUTH LOGIN\r\n"),
                ("AUTH LOGIN", "334 VXNlcm5hbWU6\r\n"),
                ("dXNlcg==", "334 UGFzc3dvcmQ6\r\n"),
                ("c2VjcmV0", "235 2.7.0 ok\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        let caps = c.ehlo("relay.test").await.unwrap().unwrap();
        assert!(caps.auth_login && !caps.auth_plain);
        assert!(c.auth("user", "secret").await.unwrap().is_ok());
        drop(c);
        srv.await.unwrap();

        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 AUTH PLAIN LOGIN\r\n"),
                // base64("\0user\0secret")
                (
                    "AUTH PLAIN AHVzZXIAc2VjcmV0",
                    "535 5.7.8 bad credentials\r\n",
                ),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        c.ehlo("relay.test").await.unwrap().unwrap();
        assert_eq!(
            c.auth("user", "secret").await.unwrap().unwrap_err().code,
            535
        );
        drop(c);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn pipelined_transaction_and_smtputf8_refusal() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"250-mx\r\n250 PIPELINING\r\n").await.unwrap();
            // MAIL, RCPT, DATA arrive together; answer all at once.
            let mut lines = Vec::new();
            for _ in 0..3 {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                lines.push(l);
            }
            w.write_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
                .await
                .unwrap();
            loop {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                if l == ".\r\n" {
                    break;
                }
            }
            w.write_all(b"250 done\r\n").await.unwrap();
            lines
        });
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        assert!(c.ehlo("relay.test").await.unwrap().unwrap().pipelining);
        let rcpts = vec!["x@b.test".to_string()];
        let mut env = Envelope {
            mail_from: "",
            recipients: &rcpts,
            eight_bit: false,
            smtputf8: true,
        };
        let t = c.send(&env, b"x\r\n").await;
        let failure = t.results[0].as_ref().unwrap_err();
        assert_eq!(failure.dsn_status(), "5.6.7");
        env.smtputf8 = false;
        let t = c.send(&env, b"x\r\n").await;
        assert_eq!(t.results[0].as_ref().unwrap().message, "done");
        let lines = srv.await.unwrap();
        assert_eq!(lines[0], "MAIL FROM:<>\r\n");
    }

    #[tokio::test]
    async fn dropped_connection_keeps_permanent_answers_and_retries_the_rest() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            for reply in ["250 mx\r\n", "250 ok\r\n", "550 5.1.1 unknown\r\n"] {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            // Drop the connection at the second RCPT.
        });
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        c.ehlo("relay.test").await.unwrap().unwrap();
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into()];
        let env = Envelope {
            mail_from: "s@a.test",
            recipients: &rcpts,
            eight_bit: false,
            smtputf8: false,
        };
        let t = c.send(&env, b"x\r\n").await;
        srv.await.unwrap();
        assert!(t.connection_lost && t.host_failure);
        assert_eq!(
            t.results[0].as_ref().unwrap_err().reply().unwrap().code,
            550
        );
        assert!(matches!(t.results[1], Err(Failure::Fault(Fault::Io(_)))));
    }
}
