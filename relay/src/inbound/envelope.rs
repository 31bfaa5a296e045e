//! MAIL FROM and RCPT TO: the envelope, and every relay decision.

use std::time::Duration;

use smtp_proto::{
    MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS, MAIL_SMTPUTF8, MailFrom, RcptTo,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::InboundContext;
use super::session::{Envelope, Session, State};
use crate::config::{ListenerRole, RelayConfig, SendingDomain, SuppressedAction};
use crate::policy::{self, AddressProblem, Client};
use crate::queue::{MessageFlags, QueueError, now_millis};
use crate::refusal::Refusal;

/// The raw path between `<` and `>` of a MAIL/RCPT line, as sent (quotes
/// respected), before smtp-proto normalises it.
pub fn raw_path(line: &[u8]) -> Option<&str> {
    let start = line.iter().position(|&b| b == b'<')? + 1;
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in line[start..].iter().enumerate() {
        match b {
            b'\\' if quoted && !escaped => {
                escaped = true;
                continue;
            }
            b'"' if !escaped => quoted = !quoted,
            b'>' if !quoted => return std::str::from_utf8(&line[start..start + i]).ok(),
            _ => {}
        }
        escaped = false;
    }
    None
}

pub(super) fn address_reject(problem: AddressProblem, sender: bool) -> Refusal {
    if problem.is_relay_trick() {
        Refusal::AddressTrick(problem.describe().to_string())
    } else if sender {
        Refusal::BadSender(format!("Bad sender address: {}", problem.describe()).into())
    } else {
        Refusal::BadRecipient(format!("Bad recipient address: {}", problem.describe()).into())
    }
}

/// Backend failure on the way to a decision: temporary, never a silent yes.
pub(super) fn backend_reject(error: Option<QueueError>) -> Refusal {
    match error {
        Some(e) => tracing::warn!(error = %e, "queue backend error during SMTP session"),
        None => tracing::warn!("queue backend timed out during SMTP session"),
    }
    Refusal::QueueUnavailable
}

/// Runs a backend call under the queue timeout.
pub(super) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, QueueError>>,
) -> Result<T, Refusal> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(backend_reject(Some(e))),
        Err(_) => Err(backend_reject(None)),
    }
}

/// Key of a domain's daily quota counter (UTC day).
pub fn quota_key(domain: &str) -> String {
    format!(
        "quota:{}:{}",
        domain.to_ascii_lowercase(),
        chrono::Utc::now().format("%Y-%m-%d")
    )
}

/// 451 4.7.1 when the sending domain's daily quota is used up (the
/// counter is shared by all relay pods).
pub(super) async fn check_quota(
    ctx: &InboundContext,
    config: &RelayConfig,
    sending: &SendingDomain,
) -> Result<(), Refusal> {
    let Some(quota) = sending.rate_limits.daily_quota else {
        return Ok(());
    };
    let used = bounded(
        config.queue.timeout.into(),
        ctx.state.counter(&quota_key(&sending.domain)),
    )
    .await?;
    if used >= u64::from(quota) {
        return Err(Refusal::QuotaExhausted(sending.domain.clone()));
    }
    Ok(())
}

/// 451 4.7.1 while the reputation guard has the sending domain paused
/// (the record is shared by all relay pods). A backend that cannot say is
/// no reason to refuse here: the suppression lookup and the enqueue that
/// follow need it too and answer 451 4.3.0 themselves.
pub(super) async fn check_paused(
    ctx: &InboundContext,
    config: &RelayConfig,
    sending: &SendingDomain,
) -> Result<(), Refusal> {
    let timeout: Duration = config.queue.timeout.into();
    let asked = ctx.reputation.recent_refusal(sending, now_millis());
    match tokio::time::timeout(timeout, asked).await {
        Ok(Ok(Some(refusal))) => Err(refusal),
        Ok(Ok(None)) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(%error, domain = %sending.domain, "cannot read the reputation state; not refusing for it");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(domain = %sending.domain, "reading the reputation state timed out; not refusing for it");
            Ok(())
        }
    }
}

/// Adds a checked recipient, consulting the suppression list: refused with
/// 550 5.1.1, or kept aside as dropped, per the domain's `onSuppressed`.
pub(super) async fn add_recipient(
    ctx: &InboundContext,
    config: &RelayConfig,
    envelope: &mut Envelope,
    address: String,
) -> Result<(), Refusal> {
    let lower = address.to_lowercase();
    let suppressed = bounded(
        config.queue.timeout.into(),
        ctx.state
            .suppressed(&lower, &envelope.sending_domain, now_millis()),
    )
    .await?;
    let Some(entry) = suppressed else {
        envelope.recipients.push(address);
        return Ok(());
    };
    let domain = &envelope.sending_domain;
    ctx.metrics.suppressed.with_label_values(&[domain]).inc();
    match config
        .domain(domain)
        .map(|d| d.on_suppressed)
        .unwrap_or_default()
    {
        SuppressedAction::Refuse => Err(Refusal::Suppressed {
            address,
            reason: entry.reason.to_string(),
        }),
        SuppressedAction::Drop => {
            tracing::info!(
                event = "suppressed_dropped",
                %domain,
                reason = %entry.reason,
                "suppressed recipient accepted and dropped"
            );
            envelope.dropped.push(address);
            Ok(())
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn need_hello(&self) -> Result<(), Refusal> {
        match self.state.state {
            State::Greeting | State::Connected => {
                Err(Refusal::BadSequence("Send EHLO or HELO first"))
            }
            _ => Ok(()),
        }
    }

    /// MAIL FROM: who may relay, as whom, how big, whether the domain is
    /// paused by the reputation guard and whether it still has quota.
    pub(super) async fn mail(
        &mut self,
        from: MailFrom<String>,
        line: &[u8],
    ) -> Result<(), Refusal> {
        self.need_hello()?;
        if self.state.envelope.is_some() {
            return Err(Refusal::BadSequence("Nested MAIL command"));
        }
        self.config = self.ctx.config.get();
        let config = self.config.clone();
        let raw =
            raw_path(line).ok_or_else(|| Refusal::Syntax("Syntax: MAIL FROM:<address>".into()))?;
        let address = if raw.is_empty() {
            ""
        } else {
            policy::check_path(raw).map_err(|p| address_reject(p, true))?
        };
        if self.listener.role == ListenerRole::Feedback {
            let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
            if !smtputf8 && !address.is_ascii() {
                return Err(Refusal::NeedsSmtpUtf8);
            }
            if from.size as u64 > config.limits.max_message_size {
                return Err(Refusal::TooBig);
            }
            self.feedback_mail(address, smtputf8);
            return Ok(());
        }
        let client = Client {
            ip: self.state.peer.ip(),
            user: self.state.user.as_deref(),
        };
        policy::may_relay(&client, self.listener.auth, &config.trusted_networks)
            .map_err(Refusal::Denied)?;
        let sending = policy::check_sender(&client, address, &config).map_err(Refusal::Denied)?;
        if from.size as u64 > config.limits.max_message_size {
            return Err(Refusal::TooBig);
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return Err(Refusal::UnsupportedParameter(
                "Parameter not supported".into(),
            ));
        }
        let require_tls = from.flags & MAIL_REQUIRETLS != 0;
        if require_tls && !self.requiretls_offered() {
            // RFC 8689 section 4.1: only after TLS, where it was offered.
            return Err(Refusal::UnsupportedParameter(
                "REQUIRETLS is offered only over TLS".into(),
            ));
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !address.is_ascii() {
            return Err(Refusal::NeedsSmtpUtf8);
        }
        check_paused(&self.ctx, &config, sending).await?;
        check_quota(&self.ctx, &config, sending).await?;
        self.state.envelope = Some(Envelope {
            mail_from: address.to_string(),
            sending_domain: sending.domain.to_ascii_lowercase(),
            recipients: Vec::new(),
            dropped: Vec::new(),
            flags: MessageFlags {
                smtputf8,
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
                is_dsn: false,
                per_recipient: false,
                require_tls,
                tls_optional: false,
            },
            chunks: None,
            oversize: false,
            tags: Default::default(),
        });
        self.state.state = State::Mail;
        self.queue_reply(250, "2.1.0", "Sender OK");
        Ok(())
    }

    /// RCPT TO: syntax and tricks, the recipient limit, the suppression list.
    pub(super) async fn rcpt(&mut self, _to: RcptTo<String>, line: &[u8]) -> Result<(), Refusal> {
        self.need_hello()?;
        let config = self.config.clone();
        let Some(envelope) = self.state.envelope.as_ref() else {
            return Err(Refusal::BadSequence("Need MAIL before RCPT"));
        };
        let raw =
            raw_path(line).ok_or_else(|| Refusal::Syntax("Syntax: RCPT TO:<address>".into()))?;
        let address = policy::check_recipient(raw).map_err(|p| address_reject(p, false))?;
        if !envelope.flags.smtputf8 && !address.is_ascii() {
            return Err(Refusal::NeedsSmtpUtf8);
        }
        if envelope
            .recipients
            .iter()
            .chain(&envelope.dropped)
            .any(|r| r == address)
        {
            self.queue_reply(250, "2.1.5", "Recipient OK (duplicate)");
            return Ok(());
        }
        if envelope.accepted() >= config.limits.max_recipients as usize {
            return Err(Refusal::TooManyRecipients);
        }
        if self.listener.role == ListenerRole::Feedback {
            let address = address.to_string();
            return self.feedback_rcpt(&address);
        }
        let address = address.to_string();
        let Some(envelope) = self.state.envelope.as_mut() else {
            return Err(Refusal::BadSequence("Need MAIL before RCPT"));
        };
        add_recipient(&self.ctx, &config, envelope, address).await?;
        self.state.state = State::Rcpt;
        self.queue_reply(250, "2.1.5", "Recipient OK");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_paths() {
        let table: &[(&[u8], Option<&str>)] = &[
            (b"MAIL FROM:<a@b.c> SIZE=10\r\n", Some("a@b.c")),
            (b"MAIL FROM:<>\r\n", Some("")),
            (b"RCPT TO:<@x.y:a@b.c>\r\n", Some("@x.y:a@b.c")),
            (b"RCPT TO:<\"a>b\"@c.d>\r\n", Some("\"a>b\"@c.d")),
            (b"RCPT TO:<\"a\\\">b\"@c.d>\r\n", Some("\"a\\\">b\"@c.d")),
            (b"RCPT TO:<a@b.c\r\n", None),
            (b"RCPT TO:a@b.c\r\n", None),
        ];
        for (line, want) in table {
            assert_eq!(raw_path(line), *want, "{}", String::from_utf8_lossy(line));
        }
    }
}
