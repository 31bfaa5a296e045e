//! One SMTP session: a sans-IO state machine over any byte stream.
//!
//! The session owns a read buffer and a write buffer. Replies are queued
//! and flushed only when the session needs more input, which is exactly
//! what PIPELINING needs (RFC 2920: replies to a batch go out together).
//! Every read is under a deadline: a whole command line within
//! `commandTimeout`, each DATA line (or 1000 bytes of BDAT) within
//! `dataTimeout`, so byte-at-a-time clients are cut off too. Every buffer
//! is bounded (line length, message size). STARTTLS ends the plaintext session and
//! hands its state back, so the caller can wrap the stream in TLS and
//! resume with a new `Session` over the TLS stream: no stream enum, and
//! unit tests can drive a session over `tokio::io::duplex`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::InboundContext;
use super::rejected;
use super::reply::{render, render_multi};
use super::tls::TlsInfo;
use crate::config::{Listener, RelayConfig};
use crate::queue::MessageFlags;
use crate::refusal::Refusal;

/// Where a session is in the SMTP dialogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connected, greeting not sent yet.
    Greeting,
    /// Greeted (or TLS just started): EHLO/HELO needed.
    Connected,
    /// After EHLO/HELO, no transaction.
    Ready,
    /// MAIL FROM accepted.
    Mail,
    /// At least one RCPT TO accepted.
    Rcpt,
}

/// The mail transaction in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Envelope sender as the client gave it.
    pub mail_from: String,
    /// The configured sending domain, lower-cased.
    pub sending_domain: String,
    /// Recipients to deliver to.
    pub recipients: Vec<String>,
    /// Suppressed recipients accepted and dropped (`onSuppressed: drop`).
    pub dropped: Vec<String>,
    /// SMTPUTF8 / BODY=8BITMIME from MAIL FROM.
    pub flags: MessageFlags,
    /// Message received so far by BDAT (RFC 3030); `None` before the
    /// first chunk.
    pub chunks: Option<Vec<u8>>,
    /// The BDAT chunks went over the size limit (the rest is discarded).
    pub oversize: bool,
    /// Tags given with the HTTP send API (SMTP clients use the
    /// `X-Petrel-Tags` header, read at the end of DATA).
    pub tags: std::collections::BTreeMap<String, String>,
}

impl Envelope {
    /// Recipients accepted so far, kept or dropped.
    pub fn accepted(&self) -> usize {
        self.recipients.len() + self.dropped.len()
    }
}

/// Everything a session knows, carried across STARTTLS.
#[derive(Clone, Debug)]
pub struct SessionState {
    /// Dialogue state.
    pub state: State,
    /// The client.
    pub peer: SocketAddr,
    /// EHLO/HELO argument.
    pub helo: Option<String>,
    /// EHLO (true) or HELO (false).
    pub esmtp: bool,
    /// TLS parameters once TLS is up.
    pub tls: Option<TlsInfo>,
    /// The AUTH user once authenticated.
    pub user: Option<String>,
    /// The transaction in progress.
    pub envelope: Option<Envelope>,
    /// The envelope DATA or BDAT LAST just took, for a `rejected` event
    /// if the message is refused.
    pub last_transaction: Option<super::rejected::Transaction>,
    /// The command line being refused, for the `rejected` event of
    /// [`Session::reply_refusal`].
    pub refused_command: Option<Vec<u8>>,
    /// Refusals so far, for `limits.maxErrors`.
    pub errors: u32,
}

impl SessionState {
    /// A new connection from `peer`, before the greeting.
    pub fn new(peer: SocketAddr) -> SessionState {
        SessionState {
            state: State::Greeting,
            peer,
            helo: None,
            esmtp: false,
            tls: None,
            user: None,
            envelope: None,
            last_transaction: None,
            refused_command: None,
            errors: 0,
        }
    }

    /// The state after a TLS handshake: RFC 3207 4.2 discards everything
    /// learnt in plaintext (EHLO, AUTH, transaction); no new greeting.
    pub fn after_tls(peer: SocketAddr, tls: TlsInfo, errors: u32) -> SessionState {
        SessionState {
            state: State::Connected,
            tls: Some(tls),
            errors,
            ..SessionState::new(peer)
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum Finished<S> {
    /// The connection is done (QUIT, error, timeout, shutdown).
    Closed,
    /// The client asked for STARTTLS and got 220: run the handshake on
    /// `io` and resume with [`Session::new`] and [`SessionState::after_tls`].
    StartTls {
        /// The plaintext stream, with nothing buffered.
        io: S,
        /// What the session knew (errors count carries over); boxed to
        /// keep the common `Closed` small.
        state: Box<SessionState>,
    },
}

/// What the dispatcher does after a command.
pub(super) enum Flow {
    Continue,
    Quit,
    StartTls,
}

/// Why the session stops reading.
#[derive(Debug)]
pub(super) enum End {
    /// Peer closed.
    Eof,
    /// No input within the timeout.
    Timeout,
    /// Socket error.
    Io,
    /// We decided to close (refusal with disconnect, too many errors).
    Closed,
}

/// One line of input.
pub(super) enum Line {
    Ok(Vec<u8>),
    /// Longer than `limits.maxLineLength`; the rest of it was discarded.
    TooLong,
    /// The relay is shutting down and the session is idle.
    Shutdown,
}

/// An SMTP session over `S`.
pub struct Session<S> {
    pub(super) io: S,
    pub(super) rbuf: Vec<u8>,
    pub(super) wbuf: Vec<u8>,
    /// What the session knows.
    pub state: SessionState,
    pub(super) ctx: Arc<InboundContext>,
    /// Config snapshot, refreshed at each EHLO and MAIL so reloads apply to
    /// the next transaction, never in the middle of one.
    pub(super) config: Arc<RelayConfig>,
    pub(super) listener: Arc<Listener>,
    pub(super) shutdown: watch::Receiver<bool>,
}

const READ_CHUNK: usize = 16 * 1024;

/// Bytes of bulk (BDAT) data that must arrive per `dataTimeout`.
pub(super) const BULK_RECORD: usize = 1000;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A session on `io`; `shutdown` turning true makes an idle session
    /// say 421 4.3.2 and close.
    pub fn new(
        io: S,
        state: SessionState,
        ctx: Arc<InboundContext>,
        listener: Arc<Listener>,
        shutdown: watch::Receiver<bool>,
    ) -> Session<S> {
        let config = ctx.config.get();
        Session {
            io,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            state,
            ctx,
            config,
            listener,
            shutdown,
        }
    }

    /// Runs the dialogue to its end.
    pub async fn run(mut self) -> Finished<S> {
        let result = self.dialogue().await;
        match result {
            Ok(Flow::StartTls) => {
                // The 220 must reach the client before the handshake.
                if self.flush().await.is_err() {
                    return Finished::Closed;
                }
                return Finished::StartTls {
                    io: self.io,
                    state: Box::new(self.state),
                };
            }
            Ok(_) | Err(End::Closed) => {}
            Err(End::Timeout) => {
                tracing::debug!(peer = %self.state.peer, "session timed out");
                self.queue_reply(421, "4.4.2", "Timeout, closing connection");
            }
            Err(End::Eof) | Err(End::Io) => {}
        }
        let _ = self.flush().await;
        let timeout = self.command_timeout();
        let _ = tokio::time::timeout(timeout, self.io.shutdown()).await;
        Finished::Closed
    }

    async fn dialogue(&mut self) -> Result<Flow, End> {
        if self.state.state == State::Greeting {
            if *self.shutdown.borrow() {
                self.refuse(Refusal::ShuttingDown).await?;
            }
            let greeting = format!("{} ESMTP Petrel ready", self.config.hostname);
            self.queue_reply(220, "", &greeting);
            self.state.state = State::Connected;
        }
        loop {
            let idle = self.state.envelope.is_none();
            let line = match self.read_line(self.command_timeout(), idle).await? {
                Line::Ok(line) => line,
                Line::TooLong => {
                    self.refuse(Refusal::LineTooLong).await?;
                    continue;
                }
                Line::Shutdown => {
                    self.refuse(Refusal::ShuttingDown).await?;
                    continue;
                }
            };
            match self.dispatch(&line).await {
                Ok(Flow::Continue) => {}
                Ok(flow) => return Ok(flow),
                Err(refusal) => {
                    self.state.refused_command = Some(line);
                    self.refuse(refusal).await?
                }
            }
        }
    }

    /// Records a `rejected` event for a refusal of the command `line`
    /// (module `rejected`), without waiting for it. Refusals outside a
    /// command (a line too long, shutdown) name no message.
    fn record_rejection(&mut self, line: Option<&[u8]>, refusal: &Refusal) {
        let Some(line) = line else { return };
        let (from, rcpt, ends_data) = rejected::command_addresses(line);
        let open = self.state.envelope.as_ref().map(rejected::Transaction::of);
        let done = ends_data
            .then(|| self.state.last_transaction.take())
            .flatten();
        let in_transaction = done.is_some() || open.is_some();
        let tx = done.or(open).unwrap_or_default();
        let from = from.or_else(|| in_transaction.then(|| tx.mail_from.clone()));
        let recipients = match rcpt {
            Some(r) => vec![r],
            None if ends_data => tx.recipients.clone(),
            None => Vec::new(),
        };
        if !ends_data && from.is_none() && recipients.is_empty() {
            return;
        }
        rejected::record(
            &self.ctx,
            refusal,
            from.as_deref(),
            Some(&tx.sending_domain),
            &recipients,
        );
    }

    /// Sends a refusal, counts it, and closes when it says so or when the
    /// session has made too many errors.
    ///
    /// The one place an SMTP refusal becomes a reply: metrics (and
    /// anything else that records refusals) hook in here.
    pub(super) async fn refuse(&mut self, refusal: Refusal) -> Result<(), End> {
        self.reply_refusal(&refusal);
        if refusal.disconnects() {
            return Err(End::Closed);
        }
        if !refusal.counts_as_error() {
            return Ok(());
        }
        self.state.errors += 1;
        if self.state.errors >= self.config.limits.max_errors {
            self.reply_refusal(&Refusal::TooManyErrors);
            return Err(End::Closed);
        }
        Ok(())
    }

    /// Counts, logs, records the `rejected` event of and queues the reply
    /// of one refusal.
    fn reply_refusal(&mut self, refusal: &Refusal) {
        // The feedback listener is an MX open to the internet: its
        // refusals (relaying attempts) are counted, not events of any
        // sending domain.
        if refusal.is_event_worthy() && self.listener.role != crate::config::ListenerRole::Feedback
        {
            let line = self.state.refused_command.take();
            self.record_rejection(line.as_deref(), refusal);
        }
        self.state.refused_command = None;
        self.ctx
            .metrics
            .rejected
            .with_label_values(&[refusal.label()])
            .inc();
        tracing::debug!(peer = %self.state.peer, code = refusal.code(), esc = refusal.esc(), reason = refusal.label(), "refused");
        self.queue_reply(refusal.code(), refusal.esc(), &refusal.text());
    }

    async fn dispatch(&mut self, line: &[u8]) -> Result<Flow, Refusal> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => return Err(parse_error(e)),
        };
        match request {
            Request::Ehlo { host } => self.hello(host, true).map(|_| Flow::Continue),
            Request::Helo { host } => self.hello(host, false).map(|_| Flow::Continue),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self
                .auth(mechanism, initial_response)
                .await
                .map(|_| Flow::Continue),
            Request::Mail { from } => self.mail(from, line).await.map(|_| Flow::Continue),
            Request::Rcpt { to } => self.rcpt(to, line).await.map(|_| Flow::Continue),
            Request::Data => self.data().await,
            Request::Rset => {
                self.reset_transaction();
                self.queue_reply(250, "2.0.0", "Reset OK");
                Ok(Flow::Continue)
            }
            Request::Noop { .. } => {
                self.queue_reply(250, "2.0.0", "OK");
                Ok(Flow::Continue)
            }
            Request::Vrfy { .. } => {
                self.queue_reply(
                    252,
                    "2.1.5",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                );
                Ok(Flow::Continue)
            }
            Request::Help { .. } => {
                self.queue_reply(
                    214,
                    "2.0.0",
                    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
                );
                Ok(Flow::Continue)
            }
            Request::Quit => {
                self.queue_reply(221, "2.0.0", "Bye");
                Ok(Flow::Quit)
            }
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last).await,
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => Err(Refusal::NotImplemented("Command not implemented")),
        }
    }

    /// Ends the transaction, keeping EHLO and AUTH.
    pub(super) fn reset_transaction(&mut self) {
        self.state.envelope = None;
        if matches!(self.state.state, State::Mail | State::Rcpt) {
            self.state.state = State::Ready;
        }
    }

    pub(super) fn command_timeout(&self) -> Duration {
        self.config.limits.command_timeout.into()
    }

    pub(super) fn data_timeout(&self) -> Duration {
        self.config.limits.data_timeout.into()
    }

    /// Queues a one-line reply.
    pub(super) fn queue_reply(&mut self, code: u16, esc: &str, text: &str) {
        self.wbuf
            .extend_from_slice(render(code, esc, text).as_bytes());
    }

    /// Queues a multi-line reply.
    pub(super) fn queue_multi(&mut self, code: u16, lines: &[String]) {
        self.wbuf
            .extend_from_slice(render_multi(code, lines).as_bytes());
    }

    /// Writes queued replies.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let timeout = self.command_timeout();
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(_)) => Err(End::Io),
            Err(_) => Err(End::Timeout),
        }
    }

    /// Reads more input. With `watch_shutdown`, returns `Ok(false)` when the
    /// relay starts shutting down instead of waiting for the client.
    pub(super) async fn fill(
        &mut self,
        timeout: Duration,
        watch_shutdown: bool,
    ) -> Result<bool, End> {
        // Read straight into the buffer's spare room: no copy, bounded.
        self.rbuf.reserve(READ_CHUNK);
        let mut shutdown = self.shutdown.clone();
        let read = tokio::time::timeout(timeout, self.io.read_buf(&mut self.rbuf));
        let result = if watch_shutdown {
            tokio::select! {
                r = read => r,
                true = super::stopping(&mut shutdown) => return Ok(false),
            }
        } else {
            read.await
        };
        match result {
            Err(_) => Err(End::Timeout),
            Ok(Err(_)) => Err(End::Io),
            Ok(Ok(0)) => Err(End::Eof),
            Ok(Ok(_)) => Ok(true),
        }
    }

    /// The next line (up to LF, inclusive), bounded by `maxLineLength`.
    pub(super) async fn read_line(
        &mut self,
        timeout: Duration,
        watch_shutdown: bool,
    ) -> Result<Line, End> {
        let max = self.config.limits.max_line_length as usize;
        let mut skipping = false;
        // The whole line must arrive in time, not each read: a client
        // dribbling a byte a second must not hold a session forever.
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.rbuf.drain(..=pos).collect();
                if skipping || line.len() > max {
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Ok(line));
            }
            if self.rbuf.len() > max {
                skipping = true;
                self.rbuf.clear();
            }
            self.flush().await?;
            if watch_shutdown && *self.shutdown.borrow() {
                return Ok(Line::Shutdown);
            }
            if !self.fill(remaining(deadline)?, watch_shutdown).await? {
                return Ok(Line::Shutdown);
            }
        }
    }

    /// Skips `n` bytes of input.
    pub(super) async fn discard_bytes(&mut self, mut n: usize) -> Result<(), End> {
        loop {
            let take = n.min(self.rbuf.len());
            self.rbuf.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.flush().await?;
            self.fill_bulk(n).await?;
        }
    }

    /// Reads more bulk data (BDAT) when `needed` more bytes are expected:
    /// within `dataTimeout`, all of them or at least [`BULK_RECORD`] bytes
    /// must arrive, so a client trickling bytes is cut off like one
    /// trickling a DATA line.
    pub(super) async fn fill_bulk(&mut self, needed: usize) -> Result<(), End> {
        let deadline = Instant::now() + self.data_timeout();
        let want = self.rbuf.len() + needed.min(BULK_RECORD);
        while self.rbuf.len() < want {
            self.fill(remaining(deadline)?, false).await?;
        }
        Ok(())
    }
}

/// Time left until `deadline`, or a timeout when it has passed.
pub(super) fn remaining(deadline: Instant) -> Result<Duration, End> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(End::Timeout);
    }
    Ok(left)
}

/// The reply to input smtp-proto could not parse.
fn parse_error(e: smtp_proto::Error) -> Refusal {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Refusal::UnknownCommand,
        E::InvalidSenderAddress => Refusal::BadSender("Invalid sender address".into()),
        E::InvalidRecipientAddress => Refusal::BadRecipient("Invalid recipient address".into()),
        E::SyntaxError { syntax } => Refusal::Syntax(format!("Syntax: {syntax}").into()),
        E::InvalidParameter { param } => Refusal::InvalidParameter(param.to_string()),
        E::UnsupportedParameter { param } => {
            let param: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect();
            Refusal::UnsupportedParameter(format!("Unsupported parameter {param}").into())
        }
        E::ResponseTooLong => Refusal::LineTooLong,
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => {
            Refusal::Syntax("Syntax error".into())
        }
    }
}
