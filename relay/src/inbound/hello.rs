//! EHLO, HELO and STARTTLS: greeting the client and what we offer it.

use tokio::io::{AsyncRead, AsyncWrite};

use super::session::{Flow, Session, State};
use crate::config::{AuthMode, ListenerRole, TlsMode};
use crate::refusal::Refusal;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// EHLO/HELO: resets any transaction (RFC 5321 4.1.4) and lists the
    /// extensions this connection may use.
    pub(super) fn hello(&mut self, host: String, esmtp: bool) -> Result<(), Refusal> {
        self.config = self.ctx.config.get();
        self.state.envelope = None;
        self.state.helo = Some(
            host.chars()
                .filter(|c| c.is_ascii_graphic() || !c.is_ascii())
                .take(255)
                .collect(),
        );
        self.state.esmtp = esmtp;
        self.state.state = State::Ready;
        let hostname = self.config.hostname.clone();
        if !esmtp {
            self.queue_reply(250, "", &hostname);
            return Ok(());
        }
        let mut lines = vec![
            format!("{hostname} greets {}", self.state.peer.ip()),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.limits.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.starttls_offered() {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        if self.requiretls_offered() {
            lines.push("REQUIRETLS".to_string());
        }
        lines.push("HELP".to_string());
        self.queue_multi(250, &lines);
        Ok(())
    }

    /// STARTTLS is offered on a `starttls` listener until TLS is up.
    pub(super) fn starttls_offered(&self) -> bool {
        self.listener.tls == TlsMode::Starttls && self.state.tls.is_none() && self.ctx.tls.is_some()
    }

    /// REQUIRETLS (RFC 8689 section 4.1) only on an encrypted connection:
    /// a client asking for TLS end to end must have had TLS to us too. The
    /// feedback listener relays nothing, so it has nothing to promise.
    pub(super) fn requiretls_offered(&self) -> bool {
        self.state.tls.is_some() && self.listener.role != ListenerRole::Feedback
    }

    /// AUTH is offered when the listener allows it, users are configured,
    /// nobody has authenticated yet, and the connection is encrypted (or the
    /// listener explicitly allows AUTH in clear).
    pub(super) fn auth_offered(&self) -> bool {
        self.listener.auth != AuthMode::None
            && self.ctx.users.is_some()
            && self.state.user.is_none()
            && (self.state.tls.is_some() || self.listener.allow_insecure_auth)
    }

    /// STARTTLS: 220, then the caller runs the handshake. Input pipelined
    /// after STARTTLS is discarded (RFC 3207 4.2: it could be injected by
    /// a man in the middle).
    pub(super) fn starttls(&mut self) -> Result<Flow, Refusal> {
        if self.state.tls.is_some() {
            return Err(Refusal::BadSequence("TLS already active"));
        }
        if !self.starttls_offered() {
            return Err(Refusal::NotImplemented("STARTTLS not offered here"));
        }
        if matches!(self.state.state, State::Mail | State::Rcpt) {
            return Err(Refusal::BadSequence(
                "STARTTLS not allowed during a mail transaction",
            ));
        }
        self.queue_reply(220, "2.0.0", "Ready to start TLS");
        self.rbuf.clear();
        Ok(Flow::StartTls)
    }
}
