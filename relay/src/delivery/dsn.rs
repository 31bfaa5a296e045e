//! Delivery status notifications (RFC 3464): the bounce a sender gets when
//! a recipient failed for good, or a warning when delivery is delayed.
//!
//! Built by hand rather than with a MIME builder: the format is small and
//! fixed, and the `message/delivery-status` part has its own field syntax
//! (RFC 3464 section 2) that generic builders do not know. The report is
//! parsed back with mail-parser in the tests.

use chrono::{DateTime, Utc};

use crate::queue::{DeliveryUnit, MessageFlags, Millis, NewMessage};

/// What happened to a recipient, as the DSN `Action` field says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnAction {
    /// Permanent failure or expiry: the relay gave up.
    Failed,
    /// Still trying: a warning.
    Delayed,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
        }
    }
}

/// One recipient's entry in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The envelope recipient.
    pub address: String,
    /// Failed or delayed.
    pub action: DsnAction,
    /// Enhanced status (`5.1.1`, `4.4.7`).
    pub status: String,
    /// The server that answered, when one did.
    pub remote_mta: Option<String>,
    /// The server's reply (`550 5.1.1 no such user`) or the local reason.
    pub diagnostic: Option<String>,
    /// Whether `diagnostic` is an SMTP reply (`smtp;`) or a local reason
    /// (`x-petrel;`).
    pub diagnostic_is_smtp: bool,
}

/// Everything a report needs besides the recipients.
pub struct DsnContext<'a> {
    /// The relay's hostname (Reporting-MTA, From, Message-ID).
    pub hostname: &'a str,
    /// The unit that failed or is delayed.
    pub unit: &'a DeliveryUnit,
    /// The original message; only its header is returned.
    pub original: &'a [u8],
    /// Now.
    pub now: Millis,
    /// For delayed reports: when the relay gives up.
    pub will_retry_until: Option<Millis>,
}

/// Whether a unit may be bounced at all: never to the null sender (RFC
/// 5321 6.1, it would loop), never about a DSN.
pub fn may_notify(unit: &DeliveryUnit) -> bool {
    !unit.mail_from.is_empty() && !unit.flags.is_dsn
}

fn date(ms: Millis) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc2822()
}

/// Replaces line breaks and other controls, so a remote reply cannot
/// inject fields into the report.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The header block of a message: up to the first empty line.
pub fn header_block(message: &[u8]) -> &[u8] {
    if let Some(i) = message.windows(4).position(|w| w == b"\r\n\r\n") {
        return &message[..i + 2];
    }
    if let Some(i) = message.windows(2).position(|w| w == b"\n\n") {
        return &message[..i + 1];
    }
    message
}

/// Builds the DSN as a message from `<>` to the unit's envelope sender, or
/// `None` when the unit must not be notified (see [`may_notify`]) or there
/// is nothing to report.
pub fn build(ctx: &DsnContext<'_>, recipients: &[DsnRecipient]) -> Option<NewMessage> {
    if !may_notify(ctx.unit) || recipients.is_empty() {
        return None;
    }
    let unit = ctx.unit;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let boundary = format!("=_petrel_{id}");
    let delayed = recipients.iter().all(|r| r.action == DsnAction::Delayed);
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let host = one_line(ctx.hostname);

    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
    ));
    out.push_str(&format!("To: <{}>\r\n", one_line(&unit.mail_from)));
    out.push_str(&format!("Subject: {subject}\r\n"));
    out.push_str(&format!("Date: {}\r\n", date(ctx.now)));
    out.push_str(&format!("Message-ID: <{id}@{host}>\r\n"));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    out.push_str("\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

    // Human-readable part.
    out.push_str(&format!("\r\n--{boundary}\r\n"));
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    out.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
    if delayed {
        out.push_str(&format!(
            "This is the mail system at {host}.\r\n\r\nYour message (queue id {}) has not been \
             delivered yet to the recipients below. It will be retried",
            one_line(&unit.message_id)
        ));
        match ctx.will_retry_until {
            Some(until) => out.push_str(&format!(" until {}.\r\n", date(until))),
            None => out.push_str(".\r\n"),
        }
        out.push_str("You do not need to resend it.\r\n\r\n");
    } else {
        out.push_str(&format!(
            "This is the mail system at {host}.\r\n\r\nYour message (queue id {}) could not be \
             delivered to the recipients below. This is a permanent error; it will not be \
             retried.\r\n\r\n",
            one_line(&unit.message_id)
        ));
    }
    for r in recipients {
        out.push_str(&format!("<{}>: ", one_line(&r.address)));
        match (&r.remote_mta, &r.diagnostic) {
            (Some(mta), Some(d)) => {
                out.push_str(&format!("host {} said: {}\r\n", one_line(mta), one_line(d)))
            }
            (None, Some(d)) => out.push_str(&format!("{}\r\n", one_line(d))),
            (_, None) => out.push_str(&format!("status {}\r\n", one_line(&r.status))),
        }
    }

    // Machine-readable part (RFC 3464 section 2).
    out.push_str(&format!("\r\n--{boundary}\r\n"));
    out.push_str("Content-Type: message/delivery-status\r\n\r\n");
    out.push_str(&format!("Reporting-MTA: dns; {host}\r\n"));
    out.push_str(&format!(
        "X-Petrel-Queue-ID: {}\r\n",
        one_line(&unit.message_id)
    ));
    out.push_str(&format!("Arrival-Date: {}\r\n", date(unit.received_at)));
    for r in recipients {
        out.push_str("\r\n");
        // utf-8 address type (RFC 6533) when the address is not ASCII.
        let kind = if r.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        out.push_str(&format!(
            "Final-Recipient: {kind}; {}\r\n",
            one_line(&r.address)
        ));
        out.push_str(&format!("Action: {}\r\n", r.action.as_str()));
        out.push_str(&format!("Status: {}\r\n", one_line(&r.status)));
        if let Some(mta) = &r.remote_mta {
            out.push_str(&format!("Remote-MTA: dns; {}\r\n", one_line(mta)));
        }
        if let Some(d) = &r.diagnostic {
            let kind = if r.diagnostic_is_smtp {
                "smtp"
            } else {
                "x-petrel"
            };
            out.push_str(&format!("Diagnostic-Code: {kind}; {}\r\n", one_line(d)));
        }
        out.push_str(&format!("Last-Attempt-Date: {}\r\n", date(ctx.now)));
        if let (DsnAction::Delayed, Some(until)) = (r.action, ctx.will_retry_until) {
            out.push_str(&format!("Will-Retry-Until: {}\r\n", date(until)));
        }
    }

    // The original header (RFC 3462 text/rfc822-headers), not the body:
    // enough to identify the message without sending it all back.
    out.push_str(&format!("\r\n--{boundary}\r\n"));
    out.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
    let mut data = out.into_bytes();
    let headers = header_block(ctx.original);
    data.extend_from_slice(headers);
    if !headers.ends_with(b"\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let eight_bit = !data.is_ascii();
    Some(NewMessage {
        id: format!("dsn-{id}"),
        mail_from: String::new(),
        recipients: vec![unit.mail_from.clone()],
        data,
        sending_domain: unit.sending_domain.clone(),
        received_at: ctx.now,
        flags: MessageFlags {
            smtputf8: !unit.mail_from.is_ascii(),
            eight_bit,
            is_dsn: true,
            per_recipient: false,
            ..MessageFlags::default()
        },
        tags: Default::default(),
        header_message_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};

    fn unit() -> DeliveryUnit {
        DeliveryUnit {
            id: "m1:x.test".into(),
            message_id: "m1".into(),
            domain: "x.test".into(),
            recipients: vec!["a@x.test".into(), "b@x.test".into()],
            mail_from: "sender@example.test".into(),
            sending_domain: "example.test".into(),
            received_at: 1_700_000_000_000,
            flags: MessageFlags::default(),
            attempts: 1,
            next_attempt_at: 0,
            last_error: None,
            delay_notified: false,
            tags: Default::default(),
            header_message_id: None,
            history: Vec::new(),
            held_ms: 0,
        }
    }

    const ORIGINAL: &[u8] =
        b"From: s@example.test\r\nTo: a@x.test\r\nSubject: hello\r\n\r\nsecret body\r\n";

    fn failed(addr: &str) -> DsnRecipient {
        DsnRecipient {
            address: addr.into(),
            action: DsnAction::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.x.test".into()),
            diagnostic: Some("550 5.1.1 no such\r\nInjected: yes".into()),
            diagnostic_is_smtp: true,
        }
    }

    #[test]
    fn bounce_is_a_well_formed_report() {
        let u = unit();
        let ctx = DsnContext {
            hostname: "relay.example.test",
            unit: &u,
            original: ORIGINAL,
            now: 1_700_000_100_000,
            will_retry_until: None,
        };
        let dsn = build(&ctx, &[failed("a@x.test"), failed("b@x.test")]).unwrap();
        assert_eq!(dsn.mail_from, "");
        assert_eq!(dsn.recipients, vec!["sender@example.test".to_string()]);
        assert!(dsn.flags.is_dsn);

        let msg = MessageParser::default().parse(&dsn.data).unwrap();
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(msg.parts.len(), 4, "root + 3 parts");

        let human = msg.body_text(0).unwrap();
        assert!(human.contains("<a@x.test>: host mx.x.test said: 550 5.1.1 no such"));

        let status = &msg.parts[2];
        let sct = status.content_type().unwrap();
        assert_eq!(
            (sct.ctype(), sct.subtype()),
            ("message", Some("delivery-status"))
        );
        let text = String::from_utf8_lossy(status.contents());
        assert!(
            text.contains("Reporting-MTA: dns; relay.example.test\r\n"),
            "{text}"
        );
        assert!(text.contains("Arrival-Date: "), "{text}");
        assert_eq!(
            text.matches("Final-Recipient: rfc822; ").count(),
            2,
            "{text}"
        );
        assert_eq!(text.matches("Action: failed\r\n").count(), 2);
        assert!(text.contains("Status: 5.1.1\r\n"));
        assert!(text.contains("Remote-MTA: dns; mx.x.test\r\n"));
        // The remote reply's line break cannot inject a field.
        assert!(
            text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such  Injected: yes\r\n"),
            "{text}"
        );
        assert!(!text.contains("\r\nInjected:"));

        let headers = &msg.parts[3];
        let hct = headers.content_type().unwrap();
        assert_eq!(
            (hct.ctype(), hct.subtype()),
            ("text", Some("rfc822-headers"))
        );
        let h = String::from_utf8_lossy(headers.contents());
        assert!(h.contains("Subject: hello"), "{h}");
        assert!(!String::from_utf8_lossy(&dsn.data).contains("secret body"));
    }

    #[test]
    fn delayed_report_says_until_when() {
        let u = unit();
        let ctx = DsnContext {
            hostname: "relay.example.test",
            unit: &u,
            original: ORIGINAL,
            now: 1_700_000_100_000,
            will_retry_until: Some(1_700_400_000_000),
        };
        let r = DsnRecipient {
            action: DsnAction::Delayed,
            status: "4.2.0".into(),
            ..failed("a@x.test")
        };
        let dsn = build(&ctx, &[r]).unwrap();
        let msg = MessageParser::default().parse(&dsn.data).unwrap();
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let text = String::from_utf8_lossy(msg.parts[2].contents()).to_string();
        assert!(text.contains("Action: delayed\r\n"));
        assert!(text.contains("Will-Retry-Until: "));
    }

    #[test]
    fn never_to_the_null_sender_nor_about_a_dsn() {
        let mut u = unit();
        u.mail_from.clear();
        let ctx = DsnContext {
            hostname: "h",
            unit: &u,
            original: ORIGINAL,
            now: 0,
            will_retry_until: None,
        };
        assert!(build(&ctx, &[failed("a@x.test")]).is_none());
        let mut u = unit();
        u.flags.is_dsn = true;
        let ctx = DsnContext { unit: &u, ..ctx };
        assert!(build(&ctx, &[failed("a@x.test")]).is_none());
    }

    #[test]
    fn header_block_stops_at_the_blank_line() {
        assert_eq!(
            header_block(ORIGINAL),
            b"From: s@example.test\r\nTo: a@x.test\r\nSubject: hello\r\n"
        );
        assert_eq!(header_block(b"A: b\n\nbody"), b"A: b\n");
        assert_eq!(header_block(b"A: b"), b"A: b");
    }
}
