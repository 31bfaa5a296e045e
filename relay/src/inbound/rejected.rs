//! `rejected` events: a refusal of a message or recipient (policy,
//! suppression with `onSuppressed: refuse`, size, quota, a bad tag
//! header, the backend away) becomes an event with the reply, recorded
//! in the background so the reply never waits for it (see
//! [`crate::events::emit`]). Protocol noise (syntax, sequence, AUTH,
//! connection limits) is not about a message and makes no event.
//!
//! SMTP records from the one place refusals become replies (the session's
//! dialogue loop), HTTP from the send API's mapping of refusals.

use smtp_proto::Request;

use super::InboundContext;
use super::reply::Reject;
use crate::events::{Event, EventType, emit};
use crate::queue::now_millis;

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

/// Whether a refusal (by its metric label) is about a message or a
/// recipient, so it deserves a `rejected` event.
pub fn is_about_a_message(reason: &str) -> bool {
    !(reason.starts_with("auth_")
        || matches!(
            reason,
            "syntax"
                | "bad_sequence"
                | "unknown_command"
                | "not_implemented"
                | "line_too_long"
                | "timeout"
                | "connection_lost"
                | "shutdown"
                | "too_many_errors"
                | "too_many_connections"
                | "too_many_connections_from_client"
        ))
}

/// The `rejected` events of `reject`: one per recipient, or one without
/// a recipient when none was involved (a refused MAIL FROM).
pub fn events(
    relay: &str,
    reject: &Reject,
    mail_from: Option<&str>,
    sending_domain: Option<&str>,
    recipients: &[String],
) -> Vec<Event> {
    let base = {
        let mut e = Event::new(EventType::Rejected, relay, now_millis());
        e.from = mail_from.map(str::to_string);
        e.sending_domain = sending_domain.filter(|d| !d.is_empty()).map(str::to_string);
        e.response = Some(reject.render().trim_end().to_string());
        e.enhanced_status = Some(reject.esc.to_string()).filter(|s| !s.is_empty());
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
/// has an event log and the refusal is about a message.
pub fn record(
    ctx: &InboundContext,
    reject: &Reject,
    mail_from: Option<&str>,
    sending_domain: Option<&str>,
    recipients: &[String],
) {
    let Some(log) = &ctx.events else { return };
    if !is_about_a_message(reject.reason) {
        return;
    }
    let events = events(&ctx.relay, reject, mail_from, sending_domain, recipients);
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
        for reason in [
            "relay_denied",
            "suppressed",
            "too_big",
            "quota_exhausted",
            "bad_tags",
            "queue_unavailable",
        ] {
            assert!(is_about_a_message(reason), "{reason}");
        }
        for reason in [
            "syntax",
            "bad_sequence",
            "auth_failed",
            "too_many_connections",
            "shutdown",
        ] {
            assert!(!is_about_a_message(reason), "{reason}");
        }
    }

    #[test]
    fn one_event_per_recipient_with_the_reply() {
        let reject = Reject::new(
            550,
            "5.1.1",
            "suppressed",
            "Recipient address rejected: suppressed",
        );
        let rcpts = vec!["a@x.test".to_string(), "b@y.test".to_string()];
        let events = events("relay-0", &reject, Some("s@e.test"), Some("e.test"), &rcpts);
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].id, events[1].id);
        assert_eq!(events[1].recipient.as_deref(), Some("b@y.test"));
        assert_eq!(events[1].destination.as_deref(), Some("y.test"));
        assert_eq!(
            events[0].response.as_deref(),
            Some("550 5.1.1 Recipient address rejected: suppressed")
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
