//! Reading what comes back to the return path: RFC 3464 delivery status
//! notifications (`multipart/report; report-type=delivery-status`) and
//! RFC 5965 abuse reports (`report-type=feedback-report`), with the
//! returned headers of the original message. MIME structure and transfer
//! encodings are mail-parser's; the machine-readable parts are groups of
//! header-like fields (RFC 3464 2.1), read by [`field_groups`].
//!
//! Everything here is pure: bytes in, a [`Report`] out, never a panic on
//! bad input.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// What a mail to the feedback listener is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A delivery status notification.
    Dsn(Dsn),
    /// An abuse (ARF) report.
    Arf(Arf),
    /// Any other mail (a mailto unsubscribe, an auto-reply, a person).
    Other(Returned),
}

/// Why a mail that claims to be a report could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a MIME message at all.
    #[error("not a MIME message")]
    NotMime,
    /// A `multipart/report` without its machine-readable part.
    #[error("{0} report without its {1} part")]
    MissingPart(&'static str, &'static str),
    /// A delivery-status part without any per-recipient fields.
    #[error("delivery-status part names no recipient")]
    NoRecipients,
    /// A feedback-report part without `Feedback-Type`.
    #[error("feedback-report part without Feedback-Type")]
    NoFeedbackType,
}

/// A DSN: what happened per recipient, and the original's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dsn {
    /// `Reporting-MTA` (the name, without the `dns;` type).
    pub reporting_mta: Option<String>,
    /// One entry per recipient field group.
    pub recipients: Vec<DsnRecipient>,
    /// Headers of the message the DSN is about.
    pub returned: Returned,
}

/// `Action` of a DSN recipient (RFC 3464 2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Delivery failed for good.
    Failed,
    /// Not delivered yet; the reporting MTA keeps trying.
    Delayed,
    /// Delivered (a success DSN).
    Delivered,
    /// Relayed to a system that sends no DSNs.
    Relayed,
    /// Expanded (a mailing list or alias).
    Expanded,
    /// Missing or unknown.
    Unknown,
}

impl Action {
    fn parse(value: &str) -> Action {
        // Values may carry a comment: "failed (bad destination)".
        let word = value.split(['(', ' ', '\t']).next().unwrap_or("");
        match word.to_ascii_lowercase().as_str() {
            "failed" => Action::Failed,
            "delayed" => Action::Delayed,
            "delivered" => Action::Delivered,
            "relayed" => Action::Relayed,
            "expanded" => Action::Expanded,
            _ => Action::Unknown,
        }
    }
}

/// One recipient of a DSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// `Final-Recipient`, without the address type.
    pub final_recipient: Option<String>,
    /// `Original-Recipient`, without the address type.
    pub original_recipient: Option<String>,
    /// `Action`.
    pub action: Action,
    /// `Status`: `5.1.1`, when well formed.
    pub status: Option<String>,
    /// `Diagnostic-Code`, without the type (`550 5.1.1 ... user unknown`).
    pub diagnostic: Option<String>,
    /// `Remote-MTA`, without the type.
    pub remote_mta: Option<String>,
}

impl DsnRecipient {
    /// The class of the status: 2, 4 or 5 (from `Status`, else from the
    /// diagnostic's reply code).
    pub fn class(&self) -> Option<u8> {
        let from_status = self
            .status
            .as_deref()
            .and_then(|s| s.bytes().next())
            .filter(|b| matches!(b, b'2' | b'4' | b'5'))
            .map(|b| b - b'0');
        from_status.or_else(|| {
            let code = self.diagnostic.as_deref()?.trim().get(..3)?;
            match code.parse::<u16>().ok()? {
                200..=299 => Some(2),
                400..=499 => Some(4),
                500..=599 => Some(5),
                _ => None,
            }
        })
    }

    /// The addresses this group names, original first (lower-cased).
    pub fn addresses(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in [&self.original_recipient, &self.final_recipient]
            .into_iter()
            .flatten()
        {
            let a = a.to_lowercase();
            if !a.is_empty() && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// An ARF report (RFC 5965 3.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Arf {
    /// `Feedback-Type`: `abuse`, `fraud`, `virus`, `not-spam`, ...
    pub feedback_type: String,
    /// `Original-Rcpt-To` values (lower-cased), when the provider gives them.
    pub original_rcpt_to: Vec<String>,
    /// `Original-Mail-From`.
    pub original_mail_from: Option<String>,
    /// `User-Agent` of the reporter.
    pub user_agent: Option<String>,
    /// Headers of the reported message.
    pub returned: Returned,
}

/// Header fields of a returned or reported message, in order, names
/// lower-cased, values unfolded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Returned {
    /// (name, value) pairs.
    pub fields: Vec<(String, String)>,
}

impl Returned {
    /// From the raw text of a header block (anything after the first blank
    /// line is ignored).
    pub fn from_text(text: &str) -> Returned {
        Returned {
            fields: field_groups(text).into_iter().next().unwrap_or_default(),
        }
    }

    /// The first value of `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (lower-case).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Message-ID`, angle brackets removed.
    pub fn message_id(&self) -> Option<String> {
        let id = self.get("message-id")?.trim();
        let id = id.trim_start_matches('<').trim_end_matches('>').trim();
        (!id.is_empty()).then(|| id.to_string())
    }
}

/// Splits RFC 822-style field text into groups separated by blank lines;
/// continuation lines (starting with white space) are unfolded; lines
/// without a colon are skipped. Names are lower-cased, values trimmed.
pub fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && !name.contains(' ') {
                group.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// The value after a type (`rfc822; a@b`, `dns; mx.example`,
/// `smtp; 550 ...`), without angle brackets around an address.
fn typed(value: &str) -> String {
    let v = value.split_once(';').map_or(value, |(_, v)| v).trim();
    v.trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_string()
}

fn status_code(value: &str) -> Option<String> {
    let code = value.split_whitespace().next()?;
    let parts: Vec<&str> = code.split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| code.to_string())
}

fn get<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn parse_dsn_fields(text: &str) -> Result<Dsn, ParseError> {
    let groups = field_groups(text);
    let mut dsn = Dsn::default();
    for group in &groups {
        if let Some(mta) = get(group, "reporting-mta") {
            dsn.reporting_mta.get_or_insert_with(|| typed(mta));
        }
        let final_recipient = get(group, "final-recipient").map(typed);
        if final_recipient.is_none() && get(group, "action").is_none() {
            continue; // the per-message group
        }
        dsn.recipients.push(DsnRecipient {
            final_recipient,
            original_recipient: get(group, "original-recipient").map(typed),
            action: get(group, "action").map_or(Action::Unknown, Action::parse),
            status: get(group, "status").and_then(status_code),
            diagnostic: get(group, "diagnostic-code").map(typed),
            remote_mta: get(group, "remote-mta").map(typed),
        });
    }
    if dsn.recipients.is_empty() {
        return Err(ParseError::NoRecipients);
    }
    Ok(dsn)
}

fn parse_arf_fields(text: &str) -> Result<Arf, ParseError> {
    let fields: Vec<(String, String)> = field_groups(text).into_iter().flatten().collect();
    let mut arf = Arf::default();
    for (name, value) in &fields {
        match name.as_str() {
            "feedback-type" => arf.feedback_type = value.trim().to_ascii_lowercase(),
            "original-rcpt-to" => {
                let a = typed(value).to_lowercase();
                if !a.is_empty() {
                    arf.original_rcpt_to.push(a);
                }
            }
            "original-mail-from" => arf.original_mail_from = Some(typed(value)),
            "user-agent" => arf.user_agent = Some(value.clone()),
            _ => {}
        }
    }
    if arf.feedback_type.is_empty() {
        return Err(ParseError::NoFeedbackType);
    }
    Ok(arf)
}

/// The header block of a message's raw bytes.
fn header_block(raw: &[u8]) -> Returned {
    let text = String::from_utf8_lossy(raw);
    Returned::from_text(&text)
}

/// Reads a mail that reached the feedback listener.
pub fn parse(raw: &[u8]) -> Result<Report, ParseError> {
    let message = MessageParser::default()
        .parse(raw)
        .ok_or(ParseError::NotMime)?;
    let root = message.root_part();
    let report_type = root
        .content_type()
        .filter(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct
                    .subtype()
                    .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
        .map(|ct| {
            ct.attribute("report-type")
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let kind = match report_type.as_deref() {
        Some("delivery-status") => "delivery-status",
        Some("feedback-report") => "feedback-report",
        _ => return Ok(Report::Other(header_block(raw))),
    };
    let mut machine: Option<String> = None;
    let mut returned: Option<Returned> = None;
    for part in message.parts.iter().skip(1) {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let full = format!(
            "{}/{}",
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("").to_ascii_lowercase()
        );
        match full.as_str() {
            "message/delivery-status" | "message/global-delivery-status"
                if kind == "delivery-status" =>
            {
                machine
                    .get_or_insert_with(|| String::from_utf8_lossy(part.contents()).into_owned());
            }
            "message/feedback-report" if kind == "feedback-report" => {
                machine
                    .get_or_insert_with(|| String::from_utf8_lossy(part.contents()).into_owned());
            }
            "text/rfc822-headers" | "message/global-headers" => {
                returned.get_or_insert_with(|| header_block(part.contents()));
            }
            "message/rfc822" | "message/global" => {
                let headers = match &part.body {
                    PartType::Message(m) => header_block(m.raw_message()),
                    _ => header_block(part.contents()),
                };
                returned.get_or_insert(headers);
            }
            _ => {}
        }
    }
    let returned = returned.unwrap_or_default();
    match kind {
        "delivery-status" => {
            let text = machine.ok_or(ParseError::MissingPart(
                "delivery-status",
                "message/delivery-status",
            ))?;
            let mut dsn = parse_dsn_fields(&text)?;
            dsn.returned = returned;
            Ok(Report::Dsn(dsn))
        }
        _ => {
            let text = machine.ok_or(ParseError::MissingPart(
                "feedback-report",
                "message/feedback-report",
            ))?;
            let mut arf = parse_arf_fields(&text)?;
            arf.returned = returned;
            Ok(Report::Arf(arf))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DSN as Postfix writes it (bounce(8) with `bounce_notice_recipient`
    /// defaults), with the returned headers as `text/rfc822-headers`.
    fn postfix_dsn(status: &str, action: &str, diagnostic: &str) -> String {
        format!(
            "Return-Path: <>\r\n\
Received: by mx.dest.test (Postfix)\r\n\tid 4F1A2B3C4D; Wed,  2 Dec 2026 01:00:00 +0000 (UTC)\r\n\
Date: Wed,  2 Dec 2026 01:00:00 +0000 (UTC)\r\n\
From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: b+abcdefghijklmnop@bounces.example.com\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"4F1A2B3C4D.1764637200/mx.dest.test\"\r\n\
Content-Transfer-Encoding: 8bit\r\n\
Message-Id: <20261202010000.4F1A2B3C4D@mx.dest.test>\r\n\
\r\n\
This is a MIME-encapsulated message.\r\n\
\r\n\
--4F1A2B3C4D.1764637200/mx.dest.test\r\n\
Content-Description: Notification\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
This is the mail system at host mx.dest.test.\r\n\
\r\n\
I'm sorry to have to inform you that your message could not\r\n\
be delivered to one or more recipients.\r\n\
\r\n\
<gone@dest.test>: host inner.dest.test said: {diagnostic}\r\n\
\r\n\
--4F1A2B3C4D.1764637200/mx.dest.test\r\n\
Content-Description: Delivery report\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.dest.test\r\n\
X-Postfix-Queue-ID: 4F1A2B3C4D\r\n\
X-Postfix-Sender: rfc822; b+abcdefghijklmnop@bounces.example.com\r\n\
Arrival-Date: Wed,  2 Dec 2026 00:59:59 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; gone@dest.test\r\n\
Original-Recipient: rfc822;Gone@dest.test\r\n\
Action: {action}\r\n\
Status: {status}\r\n\
Remote-MTA: dns; inner.dest.test\r\n\
Diagnostic-Code: smtp; {diagnostic}\r\n\
\r\n\
--4F1A2B3C4D.1764637200/mx.dest.test\r\n\
Content-Description: Undelivered Message Headers\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Return-Path: <b+abcdefghijklmnop@bounces.example.com>\r\n\
Received: from relay.test (relay.test [192.0.2.1])\r\n\
\tby mx.dest.test (Postfix) with ESMTPS id 4F1A2B3C4D\r\n\
\tfor <gone@dest.test>; Wed,  2 Dec 2026 00:59:59 +0000 (UTC)\r\n\
Message-ID: <m1@example.com>\r\n\
From: sender@example.com\r\n\
To: gone@dest.test\r\n\
Subject: hi\r\n\
\r\n\
--4F1A2B3C4D.1764637200/mx.dest.test--\r\n"
        )
    }

    #[test]
    fn postfix_dsns() {
        let table = [
            (
                "5.1.1",
                "failed",
                "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown in local\r\n    recipient table",
                Action::Failed,
                Some(5),
            ),
            (
                "4.4.1",
                "delayed",
                "451 4.4.1 try again later",
                Action::Delayed,
                Some(4),
            ),
            (
                "5.0.0 (permanent failure)",
                "failed (bad destination)",
                "554 no",
                Action::Failed,
                Some(5),
            ),
        ];
        for (status, action, diagnostic, want_action, want_class) in table {
            let raw = postfix_dsn(status, action, diagnostic);
            let Ok(Report::Dsn(dsn)) = parse(raw.as_bytes()) else {
                panic!("not a DSN: {status}");
            };
            assert_eq!(dsn.reporting_mta.as_deref(), Some("mx.dest.test"));
            assert_eq!(dsn.recipients.len(), 1);
            let r = &dsn.recipients[0];
            assert_eq!(r.action, want_action, "{action}");
            assert_eq!(r.class(), want_class);
            assert_eq!(r.addresses(), vec!["gone@dest.test"]);
            assert_eq!(r.remote_mta.as_deref(), Some("inner.dest.test"));
            assert!(
                r.diagnostic
                    .as_deref()
                    .unwrap()
                    .starts_with(&diagnostic[..6]),
                "{:?}",
                r.diagnostic
            );
            assert!(!r.diagnostic.as_deref().unwrap().contains('\n'));
            assert_eq!(dsn.returned.message_id().as_deref(), Some("m1@example.com"));
            assert_eq!(
                dsn.returned.get("return-path"),
                Some("<b+abcdefghijklmnop@bounces.example.com>")
            );
        }
        let r = match parse(postfix_dsn("5.1.1", "failed", "550 5.1.1 x").as_bytes()) {
            Ok(Report::Dsn(d)) => d.recipients[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(r.status.as_deref(), Some("5.1.1"));
    }

    /// Postfix's local delivery to an unknown user: no Remote-MTA, an
    /// X-Postfix diagnostic, the original as message/rfc822, LF endings.
    #[test]
    fn local_delivery_dsn_with_the_whole_message() {
        let raw = "From: MAILER-DAEMON@mx.dest.test\n\
Content-Type: multipart/report; report-type=\"Delivery-Status\"; boundary=\"B\"\n\
MIME-Version: 1.0\n\
\n\
--B\n\
Content-Type: text/plain\n\
\n\
unknown user\n\
--B\n\
Content-Type: message/delivery-status\n\
\n\
Reporting-MTA: dns; mx.dest.test\n\
\n\
Final-Recipient: rfc822; nobody@dest.test\n\
Action: failed\n\
Status: 5.1.1\n\
Diagnostic-Code: X-Postfix; unknown user: \"nobody\"\n\
--B\n\
Content-Type: message/rfc822\n\
\n\
Return-Path: <b+x@bounces.example.com>\n\
Message-ID: <orig@example.com>\n\
Subject: hi\n\
\n\
body\n\
--B--\n";
        let Ok(Report::Dsn(dsn)) = parse(raw.as_bytes()) else {
            panic!("not a DSN");
        };
        let r = &dsn.recipients[0];
        assert_eq!(r.final_recipient.as_deref(), Some("nobody@dest.test"));
        assert_eq!(r.original_recipient, None);
        assert_eq!(r.diagnostic.as_deref(), Some("unknown user: \"nobody\""));
        assert_eq!(r.remote_mta, None);
        assert_eq!(
            dsn.returned.message_id().as_deref(),
            Some("orig@example.com")
        );
    }

    #[test]
    fn arf_reports() {
        let raw = "From: fbl@provider.test\r\n\
To: fbl@bounces.example.com\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"part\"\r\n\
\r\n\
--part\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report.\r\n\
--part\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: Abuse\r\n\
User-Agent: ProviderFBL/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <b+x@bounces.example.com>\r\n\
Original-Rcpt-To: <Rcpt@Dest.test>\r\n\
Arrival-Date: Wed, 2 Dec 2026 01:00:00 +0000\r\n\
\r\n\
--part\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
Return-Path: <b+x@bounces.example.com>\r\n\
Message-ID: <orig@example.com>\r\n\
Subject: buy\r\n\
\r\n\
body\r\n\
--part--\r\n";
        let Ok(Report::Arf(arf)) = parse(raw.as_bytes()) else {
            panic!("not ARF");
        };
        assert_eq!(arf.feedback_type, "abuse");
        assert_eq!(arf.original_rcpt_to, vec!["rcpt@dest.test"]);
        assert_eq!(arf.user_agent.as_deref(), Some("ProviderFBL/1.0"));
        assert_eq!(
            arf.returned.message_id().as_deref(),
            Some("orig@example.com")
        );
    }

    #[test]
    fn what_is_not_a_readable_report() {
        let table: &[(&str, Result<&str, ParseError>)] = &[
            ("Subject: hi\r\n\r\nplain mail\r\n", Ok("other")),
            (
                "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsorry\r\n--b--\r\n",
                Err(ParseError::MissingPart(
                    "delivery-status",
                    "message/delivery-status",
                )),
            ),
            (
                "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n--b--\r\n",
                Err(ParseError::NoRecipients),
            ),
            (
                "Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\nVersion: 1\r\n--b--\r\n",
                Err(ParseError::NoFeedbackType),
            ),
            ("", Err(ParseError::NotMime)),
        ];
        for (raw, want) in table {
            let got = parse(raw.as_bytes());
            match (want, got) {
                (Ok("other"), Ok(Report::Other(_))) => {}
                (Err(e), Err(g)) => assert_eq!(*e, g, "{raw:?}"),
                (_, got) => panic!("{raw:?}: {got:?}"),
            }
        }
        // Arbitrary bytes never panic.
        for len in [1usize, 7, 100, 1000] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 131 % 256) as u8).collect();
            let _ = parse(&junk);
        }
    }

    #[test]
    fn field_groups_unfold_and_split() {
        let groups = field_groups("A: 1\r\nB: two\r\n  lines\r\nnot a field\r\n\r\n\r\nC:3\n");
        assert_eq!(
            groups,
            vec![
                vec![
                    ("a".to_string(), "1".to_string()),
                    ("b".to_string(), "two lines".to_string())
                ],
                vec![("c".to_string(), "3".to_string())],
            ]
        );
    }
}
