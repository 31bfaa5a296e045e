//! DATA: receive the message, fix its headers, sign it, make it durable,
//! and only then say 250.

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::accept::{self, Origin};
use super::headers;
use super::session::{End, Envelope, Flow, Session, State, remaining};
use crate::refusal::Refusal;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// DATA: 354, the message up to `CRLF.CRLF`, then the final reply.
    pub(super) async fn data(&mut self) -> Result<Flow, Refusal> {
        match self.state.state {
            State::Greeting | State::Connected => {
                return Err(Refusal::BadSequence("Send EHLO or HELO first"));
            }
            State::Ready => return Err(Refusal::BadSequence("Need MAIL before DATA")),
            State::Mail => return Err(Refusal::BadSequence("Need RCPT before DATA")),
            State::Rcpt => {}
        }
        if self
            .state
            .envelope
            .as_ref()
            .is_some_and(|e| e.chunks.is_some())
        {
            return Err(Refusal::BadSequence("DATA not allowed after BDAT"));
        }
        self.queue_reply(354, "", "Start mail input; end with <CRLF>.<CRLF>");
        let received = match self.receive_data().await {
            Ok(r) => r,
            Err(End::Timeout) => {
                self.reset_transaction();
                return Err(Refusal::Timeout("Timeout waiting for data, closing"));
            }
            Err(_) => {
                self.reset_transaction();
                return Err(Refusal::ConnectionLost);
            }
        };
        let envelope = self.state.envelope.take();
        self.reset_transaction();
        let Some(envelope) = envelope else {
            return Err(Refusal::BadSequence("Need MAIL before DATA"));
        };
        let Some(raw) = received else {
            return Err(Refusal::TooBig);
        };
        let shutting_down = *self.shutdown.borrow();
        let result = self.accept(envelope, raw).await;
        if shutting_down {
            // The message was handled; now tell the client to go away.
            return result.and(Err(Refusal::ShuttingDown));
        }
        result.map(|_| Flow::Continue)
    }

    /// BDAT (RFC 3030): exactly `size` bytes follow the command, whatever
    /// they contain; they are read (or skipped) before any reply so the
    /// dialogue stays in step even when the chunk is refused.
    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> Result<Flow, Refusal> {
        let lost = |_| Refusal::ConnectionLost;
        if self.state.state != State::Rcpt {
            self.discard_bytes(size).await.map_err(lost)?;
            let why = match self.state.state {
                State::Mail => "Need RCPT before BDAT",
                State::Ready => "Need MAIL before BDAT",
                _ => "Send EHLO or HELO first",
            };
            return Err(Refusal::BadSequence(why));
        }
        let max = usize::try_from(self.config.limits.max_message_size).unwrap_or(usize::MAX);
        let have = self
            .state
            .envelope
            .as_ref()
            .and_then(|e| e.chunks.as_ref())
            .map_or(0, Vec::len);
        let fits = !self.state.envelope.as_ref().is_some_and(|e| e.oversize)
            && have.saturating_add(size) <= max;
        let chunk = if fits {
            Some(self.read_bytes(size).await.map_err(lost)?)
        } else {
            self.discard_bytes(size).await.map_err(lost)?;
            None
        };
        if let Some(envelope) = self.state.envelope.as_mut() {
            let buf = envelope.chunks.get_or_insert_with(Vec::new);
            match chunk {
                Some(c) => buf.extend_from_slice(&c),
                None => {
                    envelope.oversize = true;
                    buf.clear();
                }
            }
        }
        if !last {
            self.queue_reply(250, "2.0.0", &format!("{size} octets received"));
            return Ok(Flow::Continue);
        }
        let envelope = self.state.envelope.take();
        self.reset_transaction();
        let Some(mut envelope) = envelope else {
            return Err(Refusal::BadSequence("Need MAIL before BDAT"));
        };
        if envelope.oversize {
            return Err(Refusal::TooBig);
        }
        let raw = envelope.chunks.take().unwrap_or_default();
        let shutting_down = *self.shutdown.borrow();
        let result = self.accept(envelope, raw).await;
        if shutting_down {
            return result.and(Err(Refusal::ShuttingDown));
        }
        result.map(|_| Flow::Continue)
    }

    /// Reads exactly `n` bytes (n is bounded by the size limit).
    async fn read_bytes(&mut self, n: usize) -> Result<Vec<u8>, End> {
        while self.rbuf.len() < n {
            self.flush().await?;
            self.fill_bulk(n - self.rbuf.len()).await?;
        }
        Ok(self.rbuf.drain(..n).collect())
    }

    /// Reads dot-stuffed data. `None` when it exceeded the size limit (the
    /// rest was read and discarded, so the dialogue stays in step).
    async fn receive_data(&mut self) -> Result<Option<Vec<u8>>, End> {
        let max = usize::try_from(self.config.limits.max_message_size).unwrap_or(usize::MAX);
        let mut receiver = DataReceiver::new();
        let mut discard: Option<DummyDataReceiver> = None;
        let mut message = Vec::new();
        // smtp-proto finds the terminating dot after a CRLF; a virtual CRLF
        // in front makes an empty message (".\r\n" at once) end too.
        self.rbuf.splice(0..0, *b"\r\n");
        let mut first = true;
        // Each line must arrive within `dataTimeout` (like Postfix's
        // per-record deadline): RFC 5321's per-read timeout alone lets a
        // client sending a byte at a time hold the session forever.
        let timeout = self.data_timeout();
        let mut deadline = Instant::now() + timeout;
        loop {
            if !self.rbuf.is_empty() {
                if memchr::memchr(b'\n', &self.rbuf).is_some() {
                    deadline = Instant::now() + timeout;
                }
                let mut bytes = self.rbuf.iter();
                let done = match discard.as_mut() {
                    Some(d) => d.ingest(&mut bytes),
                    None => receiver.ingest(&mut bytes, &mut message),
                };
                // Only what was read goes; the buffer keeps its room for the
                // next read instead of being allocated again for each one.
                let consumed = self.rbuf.len() - bytes.as_slice().len();
                self.rbuf.drain(..consumed);
                if first {
                    first = false;
                    if message.starts_with(b"\r\n") {
                        message.drain(..2);
                    }
                }
                if discard.is_none() && message.len() > max {
                    discard = Some(DummyDataReceiver::new_data(&receiver));
                    message = Vec::new();
                }
                if done {
                    return Ok(discard.is_none().then_some(message));
                }
            }
            self.flush().await?;
            self.fill(remaining(deadline)?, false).await?;
        }
    }

    /// Hands the message to the shared accept path and queues the reply.
    async fn accept(&mut self, envelope: Envelope, raw: Vec<u8>) -> Result<(), Refusal> {
        if self.listener.role == crate::config::ListenerRole::Feedback {
            return self.feedback_data(envelope, raw).await;
        }
        self.state.last_transaction = Some(super::rejected::Transaction::of(&envelope));
        let config = self.config.clone();
        let tls = self
            .state
            .tls
            .as_ref()
            .map(|t| (t.version.as_str(), t.cipher.as_str()));
        let helo = self.state.helo.clone().unwrap_or_default();
        let origin = Origin {
            helo: &helo,
            ip: self.state.peer.ip(),
            protocol: headers::protocol(self.state.esmtp, tls.is_some(), self.state.user.is_some()),
            tls,
            user: self.state.user.as_deref(),
        };
        match accept::accept(&self.ctx, &config, envelope, raw, &origin).await? {
            Some(id) => self.queue_reply(250, "2.0.0", &format!("Ok: queued as {id}")),
            None => self.queue_reply(250, "2.0.0", "Ok: accepted"),
        }
        Ok(())
    }
}
