//! `rejected` events: a refusal of a message or recipient (policy,
//! suppression with `onSuppressed: refuse`, size, quota, From header, a bad
//! tag header, the backend away) becomes an event with the reply, recorded
//! in the background so the reply never waits for it (see
//! [`crate::events::emit`]). Which refusals qualify is
//! [`Refusal::is_event_worthy`]; protocol noise makes no event, nor does a
//! refusal that names no sender, recipient or message.
//!
//! SMTP records from the one place refusals become replies
//! (`Session::reply_refusal`), HTTP from `InboundSubmit::refused`.

use smtp_proto::Request;

use super::InboundContext;
use crate::events::{Event, EventType, emit};
use crate::queue::now_millis;
use crate::refusal::Refusal;

/// The envelope of a transaction that ended with DATA or BDAT, kept for
/// the event if its end is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    /// Envelope sender.
    pub mail_from: String,
    /// Sending domain.
    pub sending_domain: String,
    /// Recipients accepted at RCPT (kept and dropped).
    pub recipients: Vec<String>,
}

impl Transaction {
    /// The part of `envelope` a `rejected` event names.
    pub fn of(envelope: &super::session::Envelope) -> Transaction {
        Transaction {
            mail_from: envelope.mail_from.clone(),
            sending_domain: envelope.sending_domain.clone(),
            recipients: envelope
                .recipients
                .iter()
                .chain(&envelope.dropped)
                .cloned()
                .collect(),
        }
    }
}

/// The `rejected` events of `reject`: one per recipient, or one without
/// a recipient when none was involved (a refused MAIL FROM).
pub fn events(
    relay: &str,
    refusal: &Refusal,
    mail_from: Option<&str>,
    sending_domain: Option<&str>,
    recipients: &[String],
) -> Vec<Event> {
    let base = {
        let mut e = Event::new(EventType::Rejected, relay, now_millis());
        e.from = mail_from.map(str::to_string);
        e.sending_domain = sending_domain.filter(|d| !d.is_empty()).map(str::to_string);
        e.response = Some(refusal.render().trim_end().to_string());
        e.enhanced_status = Some(refusal.esc().to_string());
        e
    };
    if recipients.is_empty() {
        return vec![base];
    }
    recipients
        .iter()
        .map(|r| {
            let mut e = base.clone().with_recipient(r);
            e.id = uuid::Uuid::new_v4().to_string();
            e
        })
        .collect()
}

/// Records the events of a refusal in the background, when the context
/// has an event log, the refusal is event-worthy and it names a sender or
/// recipient (an AUTH failure before any message names neither).
pub fn record(
    ctx: &InboundContext,
    refusal: &Refusal,
    mail_from: Option<&str>,
    sending_domain: Option<&str>,
    recipients: &[String],
) {
    let Some(log) = &ctx.events else { return };
    if !refusal.is_event_worthy() || (mail_from.is_none() && recipients.is_empty()) {
        return;
    }
    let events = events(&ctx.relay, refusal, mail_from, sending_domain, recipients);
    let timeout = ctx.config.get().queue.timeout.into();
    emit::publish_in_background(log.clone(), ctx.metrics.clone(), events, timeout);
}

/// What an SMTP command line says about the refused message: the sender
/// and recipient it names, if any.
pub fn command_addresses(line: &[u8]) -> (Option<String>, Option<String>, bool) {
    match Request::parse(&mut line.iter()) {
        Ok(Request::Mail { from }) => (Some(from.address.to_string()), None, false),
        Ok(Request::Rcpt { to }) => (None, Some(to.address.to_string()), false),
        Ok(Request::Data) | Ok(Request::Bdat { .. }) => (None, None, true),
        _ => (None, None, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_messages_make_events() {
        for refusal in [
            Refusal::Denied(crate::policy::Denied::NotTrusted),
            Refusal::Suppressed {
                address: "a@x.test".into(),
                reason: "bounce".into(),
            },
            Refusal::TooBig,
            Refusal::QuotaExhausted("e.test".into()),
            Refusal::FromHeader("other.test".into()),
            Refusal::BadTags("bad".into()),
            Refusal::AuthFailed,
            Refusal::QueueUnavailable,
        ] {
            assert!(refusal.is_event_worthy(), "{refusal:?}");
        }
        for refusal in [
            Refusal::Syntax("x".into()),
            Refusal::BadSequence("x"),
            Refusal::UnknownCommand,
            Refusal::TooManyConnections,
            Refusal::ShuttingDown,
        ] {
            assert!(!refusal.is_event_worthy(), "{refusal:?}");
        }
    }

    #[test]
    fn one_event_per_recipient_with_the_reply() {
        let reject = Refusal::Suppressed {
            address: "a@x.test".into(),
            reason: "bounce".into(),
        };
        let rcpts = vec!["a@x.test".to_string(), "b@y.test".to_string()];
        let events = events("relay-0", &reject, Some("s@e.test"), Some("e.test"), &rcpts);
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].id, events[1].id);
        assert_eq!(events[1].recipient.as_deref(), Some("b@y.test"));
        assert_eq!(events[1].destination.as_deref(), Some("y.test"));
        assert_eq!(
            events[0].response.as_deref(),
            Some("550 5.1.1 Recipient a@x.test is on the suppression list (bounce)")
        );
        assert_eq!(events[0].enhanced_status.as_deref(), Some("5.1.1"));
        assert_eq!(events[0].from.as_deref(), Some("s@e.test"));
        let mail = super::events("r", &reject, Some("s@e.test"), None, &[]);
        assert_eq!(mail.len(), 1);
        assert_eq!(mail[0].recipient, None);
    }

    #[test]
    fn command_lines_name_their_addresses() {
        assert_eq!(
            command_addresses(b"MAIL FROM:<s@e.test>\r\n"),
            (Some("s@e.test".into()), None, false)
        );
        assert_eq!(
            command_addresses(b"RCPT TO:<r@x.test>\r\n"),
            (None, Some("r@x.test".into()), false)
        );
        assert_eq!(command_addresses(b"DATA\r\n"), (None, None, true));
        assert_eq!(command_addresses(b"NOOP\r\n"), (None, None, false));
    }
}
