//! An SMTP server on 127.0.0.1 that records what it receives and answers as
//! the test scripts it: the "recipient's MX" for delivery tests.
//!
//! It speaks enough ESMTP for a real client (EHLO, STARTTLS, PIPELINING,
//! 8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES), parses commands with
//! smtp-proto, and records every transaction it accepts (250 after DATA) as
//! a [`Received`]. Tests decide per recipient, per message or per session
//! how it answers: 4xx/5xx replies, dropping the connection mid-DATA, a 421
//! greeting, or slow replies.
//!
//! ```no_run
//! # async fn f() -> Result<(), petrel_tests::smtp_sink::SinkError> {
//! use std::time::Duration;
//! use petrel_tests::smtp_sink::{Mode, Reply, SmtpSink};
//! let sink = SmtpSink::start().await?;
//! sink.on_rcpt("bad@example.org", Reply::new(550, "5.1.1 no such user"));
//! sink.on_next_data(Reply::new(451, "4.3.0 try again later")); // first message only
//! // ... point the relay at sink.addr() ...
//! let got = sink.wait_for(1, Duration::from_secs(10)).await;
//! assert_eq!(got[0].rcpt_to, vec!["good@example.org"]);
//! sink.set_mode(Mode::DropMidData); // for the next connections
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::tls::{TestCa, TlsError};

/// Longest command line accepted (RFC 5321 says 512; extensions need more).
const MAX_LINE: usize = 4096;
/// Most recipients per transaction (RFC 5321's minimum is 100).
const MAX_RCPTS: usize = 1000;
/// A session idle this long is closed, so stuck clients cannot pile up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors from starting the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Binding 127.0.0.1:0 failed.
    #[error("binding SMTP sink: {0}")]
    Bind(#[source] std::io::Error),
    /// Generating its STARTTLS certificate failed.
    #[error("STARTTLS certificate: {0}")]
    Tls(#[from] TlsError),
}

/// One SMTP reply, e.g. `Reply::new(550, "5.1.1 no such user")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit code.
    pub code: u16,
    /// Text after the code, usually starting with the enhanced status code.
    pub text: String,
}

impl Reply {
    /// A reply with this code and text.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    /// `250 2.0.0 OK`.
    pub fn ok() -> Self {
        Self::new(250, "2.0.0 OK")
    }

    fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    fn line(&self) -> String {
        format!("{} {}\r\n", self.code, self.text)
    }
}

/// How the sink treats each new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Behave like a normal MX.
    #[default]
    Normal,
    /// Greet with `421 4.3.2` and close: a server refusing service.
    Greeting421,
    /// Answer DATA with 354, read the first chunk of the message, then close
    /// the connection without a reply: a crash mid-transfer.
    DropMidData,
    /// Wait this long before every reply (greeting included): a slow or,
    /// with a long duration, hung server.
    Stall(Duration),
}

/// A transaction the sink accepted (answered 2xx after DATA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// MAIL FROM address, empty for the null sender `<>`.
    pub mail_from: String,
    /// Accepted RCPT TO addresses, in order.
    pub rcpt_to: Vec<String>,
    /// The message as received, dot-unstuffed, ending with CRLF.
    pub data: Vec<u8>,
    /// Whether the session had switched to TLS with STARTTLS.
    pub tls: bool,
    /// The EHLO/HELO name the client gave.
    pub ehlo: String,
    /// MAIL FROM carried BODY=8BITMIME.
    pub body_8bitmime: bool,
    /// MAIL FROM carried SMTPUTF8.
    pub smtputf8: bool,
    /// MAIL FROM carried REQUIRETLS.
    pub requiretls: bool,
}

impl Received {
    /// The message as text (lossy UTF-8), for asserting on headers and body.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// ESMTP extensions and TLS the sink offers; see [`SmtpSink::builder`].
#[derive(Debug, Clone)]
pub struct SinkBuilder {
    starttls: bool,
    pipelining: bool,
    eightbitmime: bool,
    smtputf8: bool,
    requiretls: bool,
    size: Option<usize>,
    hostname: String,
}

impl Default for SinkBuilder {
    fn default() -> Self {
        Self {
            starttls: true,
            pipelining: true,
            eightbitmime: true,
            smtputf8: true,
            requiretls: false,
            size: Some(32 * 1024 * 1024),
            hostname: "mx.example.org".into(),
        }
    }
}

impl SinkBuilder {
    /// Offer STARTTLS (default on), with a certificate for `localhost`,
    /// `127.0.0.1` and the hostname, signed by the sink's own [`TestCa`].
    pub fn starttls(mut self, on: bool) -> Self {
        self.starttls = on;
        self
    }
    /// Advertise PIPELINING (default on).
    pub fn pipelining(mut self, on: bool) -> Self {
        self.pipelining = on;
        self
    }
    /// Advertise 8BITMIME (default on).
    pub fn eightbitmime(mut self, on: bool) -> Self {
        self.eightbitmime = on;
        self
    }
    /// Advertise SMTPUTF8 (default on).
    pub fn smtputf8(mut self, on: bool) -> Self {
        self.smtputf8 = on;
        self
    }
    /// Advertise REQUIRETLS (RFC 8689) after STARTTLS (default off).
    pub fn requiretls(mut self, on: bool) -> Self {
        self.requiretls = on;
        self
    }
    /// Maximum message size, advertised as SIZE and enforced (default 32 MiB).
    /// `None` advertises no SIZE but still caps messages at 32 MiB.
    pub fn size(mut self, max: Option<usize>) -> Self {
        self.size = max;
        self
    }
    /// Name in the greeting and EHLO reply, also put in the certificate
    /// (default `mx.example.org`).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }

    /// Bind 127.0.0.1 on a free port and start accepting connections.
    pub async fn start(self) -> Result<SmtpSink, SinkError> {
        let (ca, acceptor, leaf) = if self.starttls {
            let ca = TestCa::new()?;
            let cert = ca.issue_server_cert(&["localhost", "127.0.0.1", &self.hostname])?;
            let acceptor = TlsAcceptor::from(cert.server_config()?);
            let leaf = cert.chain_der.first().cloned();
            (Some(Arc::new(ca)), Some(acceptor), leaf)
        } else {
            (None, None, None)
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(SinkError::Bind)?;
        let addr = listener.local_addr().map_err(SinkError::Bind)?;
        let shared = Arc::new(Shared::default());
        let config = Arc::new(Config {
            pipelining: self.pipelining,
            eightbitmime: self.eightbitmime,
            smtputf8: self.smtputf8,
            requiretls: self.requiretls,
            size: self.size,
            hostname: self.hostname,
            acceptor,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), config));
        Ok(SmtpSink {
            addr,
            shared,
            ca,
            leaf,
            task,
        })
    }
}

/// Fixed per-sink settings.
struct Config {
    pipelining: bool,
    eightbitmime: bool,
    smtputf8: bool,
    requiretls: bool,
    size: Option<usize>,
    hostname: String,
    acceptor: Option<TlsAcceptor>,
}

impl Config {
    fn max_size(&self) -> usize {
        self.size.unwrap_or(32 * 1024 * 1024)
    }
}

/// What the test has scripted; read by sessions on every decision.
#[derive(Default)]
struct Script {
    mode: Mode,
    mail: Option<Reply>,
    rcpt: HashMap<String, Reply>,
    data: Option<Reply>,
    next_data: VecDeque<Reply>,
}

#[derive(Default)]
struct Shared {
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
    notify: Notify,
    connections: AtomicUsize,
    transactions: AtomicUsize,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
}

impl Shared {
    fn script<T>(&self, f: impl FnOnce(&mut Script) -> T) -> T {
        f(&mut self.script.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a connection as closed, once (QUIT answered or the session
    /// ended, whichever comes first).
    fn close(&self, closed: &AtomicBool) {
        if !closed.swap(true, Ordering::SeqCst) {
            let _ = self
                .open
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A running SMTP sink; stops (and drops every session) when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca: Option<Arc<TestCa>>,
    leaf: Option<rustls::pki_types::CertificateDer<'static>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every session.
        self.task.abort();
    }
}

impl SmtpSink {
    /// Start with defaults: STARTTLS, PIPELINING, 8BITMIME, SMTPUTF8, SIZE 32 MiB.
    pub async fn start() -> Result<Self, SinkError> {
        Self::builder().start().await
    }

    /// Choose which extensions to offer.
    pub fn builder() -> SinkBuilder {
        SinkBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port alone, e.g. for a relay's smarthost or MX port setting.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The CA that signed the STARTTLS certificate (None without STARTTLS);
    /// give `ca.cert_pem()` to a client that must verify the sink.
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_deref()
    }

    /// The certificate the sink presents (issued by [`SmtpSink::ca`]), for
    /// DANE TLSA records; `None` without STARTTLS.
    pub fn leaf_cert(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        self.leaf.as_ref()
    }

    /// Transactions accepted so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received()
    }

    /// Wait until at least `n` transactions were accepted, or `timeout`
    /// passed; returns all accepted so far (fewer than `n` on timeout, so
    /// assert on the length).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a message arriving in between wakes us.
            notified.as_mut().enable();
            let got = self.shared.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.shared.received();
            }
        }
    }

    /// Connections accepted so far (including ones refused by the mode).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The most connections that were open at the same time. A connection
    /// counts from its accept until the sink answers its QUIT (before any
    /// stall, so a client that saw the reply knows it is no longer counted)
    /// or the session ends.
    pub fn max_concurrent_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// Messages received to the final dot, whatever the reply (2xx, 4xx,
    /// 5xx, too big): counts delivery attempts, e.g. a retry after 451.
    pub fn transactions(&self) -> usize {
        self.shared.transactions.load(Ordering::SeqCst)
    }

    /// Behaviour for new connections (sessions already running keep theirs).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.script(|s| s.mode = mode);
    }

    /// Answer MAIL FROM with this reply (a non-2xx reply rejects the sender).
    pub fn on_mail(&self, reply: Reply) {
        self.shared.script(|s| s.mail = Some(reply));
    }

    /// Answer RCPT TO for `address` (case-insensitive) with this reply; a
    /// non-2xx reply means the recipient is not part of the transaction.
    pub fn on_rcpt(&self, address: &str, reply: Reply) {
        self.shared
            .script(|s| s.rcpt.insert(address.to_ascii_lowercase(), reply));
    }

    /// Answer the end of every DATA with this reply (until [`reset`](Self::reset)).
    pub fn on_data(&self, reply: Reply) {
        self.shared.script(|s| s.data = Some(reply));
    }

    /// Answer the end of the next DATA only with this reply; queued replies
    /// are used first, one per message, before [`on_data`](Self::on_data).
    /// E.g. 451 then 250 to test a retry.
    pub fn on_next_data(&self, reply: Reply) {
        self.shared.script(|s| s.next_data.push_back(reply));
    }

    /// Forget every scripted reply and go back to [`Mode::Normal`].
    pub fn reset(&self) {
        self.shared.script(|s| *s = Script::default());
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, config: Arc<Config>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let now_open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
                shared.max_open.fetch_max(now_open, Ordering::SeqCst);
                sessions.spawn(connection(stream, shared.clone(), config.clone()));
            }
            // Reap finished sessions so the set stays small.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// One TCP connection: plain session, then a TLS session after STARTTLS.
async fn connection(mut stream: TcpStream, shared: Arc<Shared>, config: Arc<Config>) {
    let mode = shared.script(|s| s.mode);
    let closed = Arc::new(AtomicBool::new(false));
    let mut session = Session::new(shared.clone(), config, mode, false, closed.clone());
    if let Err(e) = session.greet(&mut stream).await {
        tracing::debug!("sink session ended: {e}");
    }
    shared.close(&closed);
}

/// Why a session loop stopped.
enum End {
    Closed,
    StartTls,
}

#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    flags: u64,
    rcpt_to: Vec<String>,
}

/// The state of one SMTP session (reset after STARTTLS).
struct Session {
    shared: Arc<Shared>,
    config: Arc<Config>,
    mode: Mode,
    tls: bool,
    ehlo: Option<String>,
    tx: Transaction,
    out: Vec<u8>,
    /// Set once the connection no longer counts as open.
    closed: Arc<AtomicBool>,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        config: Arc<Config>,
        mode: Mode,
        tls: bool,
        closed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            shared,
            config,
            mode,
            tls,
            ehlo: None,
            tx: Transaction::default(),
            out: Vec::new(),
            closed,
        }
    }

    /// Greet, run the session, and upgrade to TLS when asked.
    async fn greet(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if self.mode == Mode::Greeting421 {
            self.push(&Reply::new(421, "4.3.2 Service not available"));
            return self.flush(stream).await;
        }
        self.push_raw(format!(
            "220 {} ESMTP petrel test sink\r\n",
            self.config.hostname
        ));
        match self.run(stream).await? {
            End::Closed => Ok(()),
            End::StartTls => {
                let Some(acceptor) = self.config.acceptor.clone() else {
                    return Ok(());
                };
                let mut tls = tokio::time::timeout(IDLE_TIMEOUT, acceptor.accept(stream))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                // RFC 3207: forget everything from before the handshake.
                let mut session = Session::new(
                    self.shared.clone(),
                    self.config.clone(),
                    self.mode,
                    true,
                    self.closed.clone(),
                );
                session.run(&mut tls).await?;
                let _ = tls.shutdown().await;
                Ok(())
            }
        }
    }

    /// Read commands until QUIT, EOF, an error or STARTTLS. Replies are
    /// buffered and flushed when no complete command is waiting (PIPELINING).
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> std::io::Result<End> {
        let mut input: Vec<u8> = Vec::with_capacity(MAX_LINE);
        loop {
            let Some(pos) = input.iter().position(|&b| b == b'\n') else {
                if input.len() >= MAX_LINE {
                    self.push(&Reply::new(500, "5.5.2 Line too long"));
                    self.flush(stream).await?;
                    return Ok(End::Closed);
                }
                self.flush(stream).await?;
                if read_some(stream, &mut input).await? == 0 {
                    return Ok(End::Closed);
                }
                continue;
            };
            if pos >= MAX_LINE {
                self.push(&Reply::new(500, "5.5.2 Line too long"));
                self.flush(stream).await?;
                return Ok(End::Closed);
            }
            let line: Vec<u8> = input.drain(..=pos).collect();
            match self.command(&line) {
                Next::Continue => {}
                Next::Quit => {
                    self.flush(stream).await?;
                    return Ok(End::Closed);
                }
                Next::StartTls => {
                    self.flush(stream).await?;
                    // Commands pipelined after STARTTLS are discarded (RFC 3207).
                    return Ok(End::StartTls);
                }
                Next::Data => {
                    self.flush(stream).await?;
                    if self.mode == Mode::DropMidData {
                        let mut scratch = Vec::new();
                        if input.is_empty() {
                            read_some(stream, &mut scratch).await?;
                        }
                        return Ok(End::Closed);
                    }
                    let Some(data) = self.receive_data(stream, &mut input).await? else {
                        return Ok(End::Closed);
                    };
                    self.end_of_data(data);
                }
            }
        }
    }

    /// Read the message after 354 into a bounded buffer, dot-unstuffed by
    /// smtp-proto. `None` means the client went away mid-message. A message
    /// over the size limit is drained and answered 552.
    async fn receive_data<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        input: &mut Vec<u8>,
    ) -> std::io::Result<Option<Result<Vec<u8>, Reply>>> {
        let mut receiver = smtp_proto::request::receiver::DataReceiver::new();
        let mut data = Vec::new();
        let mut too_big = false;
        let max = self.config.max_size();
        loop {
            let mut iter = input.iter();
            let done = receiver.ingest(&mut iter, &mut data);
            let consumed = input.len() - iter.as_slice().len();
            input.drain(..consumed);
            if data.len() > max {
                too_big = true;
                data.clear();
            }
            if done {
                return Ok(Some(if too_big {
                    Err(Reply::new(552, "5.3.4 Message too big"))
                } else {
                    Ok(data)
                }));
            }
            if read_some(stream, input).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Decide the reply to a complete message and record it when accepted.
    fn end_of_data(&mut self, data: Result<Vec<u8>, Reply>) {
        let tx = std::mem::take(&mut self.tx);
        self.shared.transactions.fetch_add(1, Ordering::SeqCst);
        let data = match data {
            Ok(d) => d,
            Err(reply) => {
                self.push(&reply);
                return;
            }
        };
        let reply = self
            .shared
            .script(|s| s.next_data.pop_front().or_else(|| s.data.clone()))
            .unwrap_or_else(|| Reply::new(250, "2.0.0 Message accepted"));
        if reply.is_positive() {
            let received = Received {
                mail_from: tx.mail_from.unwrap_or_default(),
                rcpt_to: tx.rcpt_to,
                data,
                tls: self.tls,
                ehlo: self.ehlo.clone().unwrap_or_default(),
                body_8bitmime: tx.flags & MAIL_BODY_8BITMIME != 0,
                smtputf8: tx.flags & MAIL_SMTPUTF8 != 0,
                requiretls: tx.flags & smtp_proto::MAIL_REQUIRETLS != 0,
            };
            self.shared
                .received
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(received);
            self.shared.notify.notify_waiters();
        }
        self.push(&reply);
    }

    /// Handle one command line; pure apart from reading the script.
    fn command(&mut self, line: &[u8]) -> Next {
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(smtp_proto::Error::UnknownCommand) => {
                self.push(&Reply::new(500, "5.5.2 Unknown command"));
                return Next::Continue;
            }
            Err(e) => {
                self.push(&Reply::new(501, format!("5.5.4 Syntax error: {e:?}")));
                return Next::Continue;
            }
        };
        match request {
            Request::Ehlo { host } | Request::Lhlo { host } => {
                self.ehlo = Some(host.into_owned());
                self.tx = Transaction::default();
                let ehlo = self.ehlo_reply();
                self.push_raw(ehlo);
            }
            Request::Helo { host } => {
                self.ehlo = Some(host.into_owned());
                self.tx = Transaction::default();
                self.push_raw(format!("250 {}\r\n", self.config.hostname));
            }
            Request::Mail { from } => {
                if self.ehlo.is_none() {
                    self.push(&Reply::new(503, "5.5.1 EHLO first"));
                } else if self.tx.mail_from.is_some() {
                    self.push(&Reply::new(503, "5.5.1 Nested MAIL"));
                } else if from.size > self.config.max_size() {
                    self.push(&Reply::new(552, "5.3.4 Message too big"));
                } else if from.flags & smtp_proto::MAIL_REQUIRETLS != 0
                    && !(self.config.requiretls && self.tls)
                {
                    self.push(&Reply::new(555, "5.5.4 REQUIRETLS not offered"));
                } else {
                    let reply = self
                        .shared
                        .script(|s| s.mail.clone())
                        .unwrap_or_else(Reply::ok);
                    if reply.is_positive() {
                        self.tx.mail_from = Some(from.address.into_owned());
                        self.tx.flags = from.flags;
                    }
                    self.push(&reply);
                }
            }
            Request::Rcpt { to } => {
                if self.tx.mail_from.is_none() {
                    self.push(&Reply::new(503, "5.5.1 MAIL first"));
                } else if self.tx.rcpt_to.len() >= MAX_RCPTS {
                    self.push(&Reply::new(452, "4.5.3 Too many recipients"));
                } else {
                    let address = to.address.into_owned();
                    let reply = self
                        .shared
                        .script(|s| s.rcpt.get(&address.to_ascii_lowercase()).cloned())
                        .unwrap_or_else(Reply::ok);
                    if reply.is_positive() {
                        self.tx.rcpt_to.push(address);
                    }
                    self.push(&reply);
                }
            }
            Request::Data => {
                if self.tx.rcpt_to.is_empty() {
                    self.push(&Reply::new(554, "5.5.1 No valid recipients"));
                } else {
                    self.push(&Reply::new(354, "Start mail input; end with <CRLF>.<CRLF>"));
                    return Next::Data;
                }
            }
            Request::Rset => {
                self.tx = Transaction::default();
                self.push(&Reply::ok());
            }
            Request::Noop { .. } => self.push(&Reply::ok()),
            Request::Quit => {
                self.shared.close(&self.closed);
                self.push(&Reply::new(221, "2.0.0 Bye"));
                return Next::Quit;
            }
            Request::StartTls => {
                if self.tls || self.config.acceptor.is_none() {
                    self.push(&Reply::new(502, "5.5.1 STARTTLS not available"));
                } else {
                    self.push(&Reply::new(220, "2.0.0 Ready to start TLS"));
                    return Next::StartTls;
                }
            }
            other => {
                let name = other.name();
                self.push(&Reply::new(502, format!("5.5.1 {name} not implemented")));
            }
        }
        Next::Continue
    }

    fn ehlo_reply(&self) -> String {
        let c = &self.config;
        let mut lines = vec![c.hostname.clone()];
        if c.pipelining {
            lines.push("PIPELINING".into());
        }
        if c.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if c.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if let Some(size) = c.size {
            lines.push(format!("SIZE {size}"));
        }
        if c.acceptor.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if c.requiretls && self.tls {
            lines.push("REQUIRETLS".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    fn push(&mut self, reply: &Reply) {
        self.out.extend_from_slice(reply.line().as_bytes());
    }

    fn push_raw(&mut self, text: String) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// Write buffered replies, after the mode's delay if it stalls.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        if let Mode::Stall(delay) = self.mode {
            tokio::time::sleep(delay).await;
        }
        let out = std::mem::take(&mut self.out);
        tokio::time::timeout(IDLE_TIMEOUT, async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

/// What the session loop does after a command.
enum Next {
    Continue,
    Data,
    StartTls,
    Quit,
}

/// Read up to 64 KiB more into `buf` under the idle timeout; 0 means EOF.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 64 * 1024];
    let n = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut chunk))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let config = Arc::new(Config {
            pipelining: true,
            eightbitmime: true,
            smtputf8: false,
            requiretls: false,
            size: Some(1000),
            hostname: "mx.test".into(),
            acceptor: None,
        });
        Session::new(
            Arc::new(Shared::default()),
            config,
            Mode::Normal,
            false,
            Arc::new(AtomicBool::new(false)),
        )
    }

    fn replies(s: &mut Session) -> String {
        String::from_utf8(std::mem::take(&mut s.out)).unwrap()
    }

    #[test]
    fn commands_follow_the_smtp_state_machine() {
        let mut s = session();
        let cases: &[(&str, &str)] = &[
            ("MAIL FROM:<a@x>\r\n", "503 "),
            (
                "EHLO client\r\n",
                "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 1000\r\n250 ENHANCEDSTATUSCODES\r\n",
            ),
            ("RCPT TO:<b@y>\r\n", "503 "),
            ("MAIL FROM:<a@x> SIZE=5000\r\n", "552 "),
            ("MAIL FROM:<a@x>\r\n", "250 "),
            ("DATA\r\n", "554 "),
            ("RCPT TO:<b@y>\r\n", "250 "),
            ("STARTTLS\r\n", "502 "),
            ("BDAT 10 LAST\r\n", "502 "),
            ("BOGUS\r\n", "500 "),
            ("RSET\r\n", "250 "),
            ("DATA\r\n", "554 "),
        ];
        for (command, want) in cases {
            s.command(command.as_bytes());
            let got = replies(&mut s);
            assert!(
                got.starts_with(want),
                "{command:?}: got {got:?}, want {want:?}"
            );
        }
    }
}
