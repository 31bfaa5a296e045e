//! What a remote reply or a fault means for a recipient: delivered, try
//! again later, or give up.
//!
//! The decision is made from the reply's severity (first digit) and its
//! enhanced status code (RFC 3463), matched exhaustively so a new kind of
//! reply cannot silently fall into the wrong bucket.

use std::fmt;

/// One SMTP reply from a remote server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code (`5.1.1` as `[5, 1, 1]`) when the server sent one.
    pub esc: Option<[u8; 3]>,
    /// Text of the reply, lines joined with `\n`.
    pub message: String,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, esc: Option<[u8; 3]>, message: impl Into<String>) -> Reply {
        Reply {
            code,
            esc,
            message: message.into(),
        }
    }

    /// The severity, from the first digit of the code.
    pub fn severity(&self) -> Severity {
        Severity::of(self.code)
    }

    /// `5.1.1` when there is an enhanced code.
    pub fn enhanced(&self) -> Option<String> {
        self.esc.map(|[a, b, c]| format!("{a}.{b}.{c}"))
    }

    /// The status for a DSN: the enhanced code, or one derived from the
    /// reply code (`5.0.0` / `4.0.0`) when the server sent none. Its class
    /// follows the outcome [`classify`] gave the reply, so a `450 5.1.1`
    /// (retried) is reported `4.1.1`, never a permanent status on a
    /// recipient that is still being retried (RFC 3463 section 2).
    pub fn dsn_status(&self) -> String {
        let class = match classify(self) {
            Outcome::Delivered => 2,
            Outcome::Temporary => 4,
            Outcome::Permanent => 5,
        };
        match self.esc {
            Some([_, subject, detail]) => format!("{class}.{subject}.{detail}"),
            None => format!("{class}.0.0"),
        }
    }

    /// One line, safe for logs and DSN `Diagnostic-Code` fields.
    pub fn one_line(&self) -> String {
        let text: String = self
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        match self.enhanced() {
            Some(e) => format!("{} {} {}", self.code, e, text.trim()),
            None => format!("{} {}", self.code, text.trim()),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Severity of a reply code (RFC 5321 4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// 2yz: done.
    Positive,
    /// 3yz: go on (354 after DATA, 334 during AUTH).
    Intermediate,
    /// 4yz: not now.
    Transient,
    /// 5yz: never.
    Permanent,
    /// Anything else: a broken server.
    Invalid,
}

impl Severity {
    /// The severity of a reply code.
    pub fn of(code: u16) -> Severity {
        match code / 100 {
            2 => Severity::Positive,
            3 => Severity::Intermediate,
            4 => Severity::Transient,
            5 => Severity::Permanent,
            _ => Severity::Invalid,
        }
    }
}

/// What happens to a recipient after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the destination: the unit is done for this recipient.
    Delivered,
    /// Try again later (possibly at another MX first).
    Temporary,
    /// Give up: bounce to the sender.
    Permanent,
}

/// The outcome a final reply (to RCPT or to the end of DATA) means.
///
/// An intermediate reply where a final one was due is a protocol fault, so
/// temporary. An enhanced code whose class disagrees with the reply code
/// (`550 4.2.2`) follows the reply code, as RFC 3463 section 2 asks.
pub fn classify(reply: &Reply) -> Outcome {
    match reply.severity() {
        Severity::Positive => Outcome::Delivered,
        Severity::Intermediate => Outcome::Temporary,
        Severity::Transient => Outcome::Temporary,
        Severity::Permanent => Outcome::Permanent,
        Severity::Invalid => Outcome::Temporary,
    }
}

/// A failure that is not a reply: the network, TLS, DNS, or a server that
/// does not speak SMTP properly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// TCP connect refused, reset or unreachable.
    Connect(String),
    /// A stage took longer than its timeout.
    Timeout(&'static str),
    /// The connection closed or failed mid-session.
    Io(String),
    /// The TLS handshake failed.
    Tls(String),
    /// Verified TLS refused the server's certificate (never a reason to
    /// fall back to plain text).
    Certificate {
        /// TLS-RPT result type (`certificate-host-mismatch`, ...).
        result: &'static str,
        /// rustls' reason and the TLS policy in force.
        detail: String,
    },
    /// TLS is mandatory (`encrypted`, `verified`, MTA-STS) and the server
    /// offers no STARTTLS.
    TlsNotOffered,
    /// The destination's TLS policy (MTA-STS `enforce`) allows none of its
    /// servers: try later, the policy or the MX may be fixed.
    TlsPolicy(String),
    /// DANE: DNSSEC validation of the MX or TLSA records failed (bogus),
    /// or they could not be looked up; the host must not be used without
    /// them (RFC 7672 section 2.1.1).
    Dane {
        /// TLS-RPT result type (`dnssec-invalid`, `tlsa-invalid`).
        result: &'static str,
        /// What failed.
        detail: String,
    },
    /// The server sent something that is not an SMTP reply.
    Protocol(String),
    /// DNS did not answer usefully (SERVFAIL, timeout): try later.
    DnsTemporary(String),
    /// DNS says there is no such domain, or no mail for it (null MX).
    DnsPermanent {
        /// Enhanced status for the DSN: 5.1.2 (no such domain) or 5.1.10
        /// (null MX).
        status: &'static str,
        /// What DNS said.
        reason: String,
    },
    /// The message cannot be sent to this server as it is (needs SMTPUTF8,
    /// too big): status for the DSN.
    Unsendable {
        /// Enhanced status (5.6.7, 5.3.4).
        status: &'static str,
        /// Why.
        reason: String,
    },
    /// Local delivery (Maildir) failed: disk full, permissions.
    Local(String),
    /// Held back by a rate or connection limit (named) until the message
    /// grew too old: temporary, so it ends as an expiry.
    Throttled(String),
}

impl Fault {
    /// Whether the fault is worth retrying.
    pub fn outcome(&self) -> Outcome {
        match self {
            Fault::Connect(_)
            | Fault::Timeout(_)
            | Fault::Io(_)
            | Fault::Tls(_)
            | Fault::Certificate { .. }
            | Fault::TlsNotOffered
            | Fault::TlsPolicy(_)
            | Fault::Dane { .. }
            | Fault::Protocol(_)
            | Fault::DnsTemporary(_)
            | Fault::Local(_)
            | Fault::Throttled(_) => Outcome::Temporary,
            Fault::DnsPermanent { .. } | Fault::Unsendable { .. } => Outcome::Permanent,
        }
    }

    /// Status for a DSN.
    pub fn dsn_status(&self) -> String {
        match self {
            Fault::Connect(_) => "4.4.1",
            Fault::Timeout(_) => "4.4.2",
            Fault::Io(_) => "4.4.2",
            Fault::Tls(_) | Fault::Certificate { .. } => "4.7.5",
            Fault::TlsNotOffered => "4.7.10",
            Fault::TlsPolicy(_) => "4.7.5",
            Fault::Dane { .. } => "4.7.5",
            Fault::Protocol(_) => "4.5.0",
            Fault::DnsTemporary(_) => "4.4.3",
            Fault::Local(_) => "4.3.0",
            Fault::Throttled(_) => "4.4.7",
            Fault::DnsPermanent { status, .. } | Fault::Unsendable { status, .. } => status,
        }
        .to_string()
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Connect(e) => write!(f, "connect failed: {e}"),
            Fault::Timeout(stage) => write!(f, "timed out waiting for {stage}"),
            Fault::Io(e) => write!(f, "connection lost: {e}"),
            Fault::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Fault::Certificate { result, detail } => {
                write!(f, "TLS certificate refused ({result}): {detail}")
            }
            Fault::TlsNotOffered => f.write_str("TLS required but STARTTLS not offered"),
            Fault::TlsPolicy(why) => write!(f, "TLS policy not met: {why}"),
            Fault::Dane { result, detail } => write!(f, "DANE ({result}): {detail}"),
            Fault::Protocol(e) => write!(f, "protocol error: {e}"),
            Fault::DnsTemporary(e) => write!(f, "DNS lookup failed: {e}"),
            Fault::DnsPermanent { reason, .. } => f.write_str(reason),
            Fault::Unsendable { reason, .. } => f.write_str(reason),
            Fault::Local(e) => write!(f, "local delivery failed: {e}"),
            Fault::Throttled(why) => write!(
                f,
                "held back ({why}) until the maximum queue lifetime ran out"
            ),
        }
    }
}

/// Why a recipient failed: a reply from the server, or a fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server answered this recipient's RCPT TO with this reply: the
    /// only reply that speaks about the recipient's address.
    Reply(Reply),
    /// The server refused the session or the whole transaction (greeting,
    /// EHLO, MAIL FROM, DATA or its end). Classified like any reply, but
    /// it says nothing about the recipient's address: `550 5.1.8` to MAIL
    /// FROM is about the sender, so it must never suppress a recipient.
    Session(Reply),
    /// Something else went wrong.
    Fault(Fault),
}

impl Failure {
    /// Temporary or permanent.
    pub fn outcome(&self) -> Outcome {
        match self {
            Failure::Reply(r) | Failure::Session(r) => classify(r),
            Failure::Fault(f) => f.outcome(),
        }
    }

    /// Status for a DSN.
    pub fn dsn_status(&self) -> String {
        match self {
            Failure::Reply(r) | Failure::Session(r) => r.dsn_status(),
            Failure::Fault(f) => f.dsn_status(),
        }
    }

    /// The remote reply, when there was one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Failure::Reply(r) | Failure::Session(r) => Some(r),
            Failure::Fault(_) => None,
        }
    }

    /// The metrics class (`5.1`, `5.x`).
    pub fn class(&self) -> String {
        match self {
            Failure::Reply(r) | Failure::Session(r) => {
                crate::metrics::status_class(r.enhanced().as_deref(), r.code)
            }
            Failure::Fault(f) => {
                let status = f.dsn_status();
                crate::metrics::status_class(Some(&status), 0)
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Reply(r) | Failure::Session(r) => r.fmt(f),
            Failure::Fault(x) => x.fmt(f),
        }
    }
}

/// Whether a permanent failure says the address itself is bad, so sending
/// to it again is pointless and hurts the sender's reputation: enhanced
/// 5.1.x (bad mailbox, bad domain, null MX), or 550/551/553 from a server
/// without enhanced codes. 5.7.1 (policy) and 5.2.x (mailbox full, message
/// too big) are about this message or this sender, not the address, and
/// so is any reply that was not to RCPT TO ([`Failure::Session`]).
pub fn is_hard_bounce(failure: &Failure) -> bool {
    match failure {
        Failure::Session(_) => false,
        Failure::Reply(r) => match (r.severity(), r.esc) {
            (Severity::Permanent, Some([5, 1, _])) => true,
            (Severity::Permanent, Some(_)) => false,
            (Severity::Permanent, None) => matches!(r.code, 550 | 551 | 553),
            (Severity::Positive, _)
            | (Severity::Intermediate, _)
            | (Severity::Transient, _)
            | (Severity::Invalid, _) => false,
        },
        Failure::Fault(Fault::DnsPermanent { .. }) => true,
        Failure::Fault(
            Fault::Connect(_)
            | Fault::Timeout(_)
            | Fault::Io(_)
            | Fault::Tls(_)
            | Fault::Certificate { .. }
            | Fault::TlsNotOffered
            | Fault::TlsPolicy(_)
            | Fault::Dane { .. }
            | Fault::Protocol(_)
            | Fault::DnsTemporary(_)
            | Fault::Unsendable { .. }
            | Fault::Local(_)
            | Fault::Throttled(_),
        ) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_classify_by_severity() {
        let table: &[(u16, Option<[u8; 3]>, Outcome, bool)] = &[
            (250, Some([2, 0, 0]), Outcome::Delivered, false),
            (251, None, Outcome::Delivered, false),
            (354, None, Outcome::Temporary, false),
            (421, Some([4, 4, 2]), Outcome::Temporary, false),
            (450, Some([4, 2, 0]), Outcome::Temporary, false),
            (451, None, Outcome::Temporary, false),
            (452, Some([4, 5, 3]), Outcome::Temporary, false),
            (550, Some([5, 1, 1]), Outcome::Permanent, true),
            (550, Some([5, 7, 1]), Outcome::Permanent, false),
            (552, Some([5, 2, 2]), Outcome::Permanent, false),
            (553, Some([5, 1, 3]), Outcome::Permanent, true),
            (550, None, Outcome::Permanent, true),
            (551, None, Outcome::Permanent, true),
            (553, None, Outcome::Permanent, true),
            (554, None, Outcome::Permanent, false),
            (552, None, Outcome::Permanent, false),
            // The reply code wins over a disagreeing enhanced code.
            (450, Some([5, 1, 1]), Outcome::Temporary, false),
            (999, None, Outcome::Temporary, false),
            (100, None, Outcome::Temporary, false),
        ];
        for &(code, esc, outcome, hard) in table {
            let reply = Reply::new(code, esc, "text");
            assert_eq!(classify(&reply), outcome, "{code} {esc:?}");
            assert_eq!(
                is_hard_bounce(&Failure::Reply(reply)),
                hard,
                "{code} {esc:?} hard"
            );
        }
    }

    #[test]
    fn faults_classify() {
        assert_eq!(
            Fault::Connect("refused".into()).outcome(),
            Outcome::Temporary
        );
        assert_eq!(
            Fault::DnsTemporary("SERVFAIL".into()).outcome(),
            Outcome::Temporary
        );
        assert_eq!(Fault::TlsNotOffered.outcome(), Outcome::Temporary);
        let null_mx = Fault::DnsPermanent {
            status: "5.1.10",
            reason: "null MX".into(),
        };
        assert_eq!(null_mx.outcome(), Outcome::Permanent);
        assert_eq!(null_mx.dsn_status(), "5.1.10");
        assert!(is_hard_bounce(&Failure::Fault(null_mx)));
        let utf8 = Fault::Unsendable {
            status: "5.6.7",
            reason: "no SMTPUTF8".into(),
        };
        assert!(!is_hard_bounce(&Failure::Fault(utf8.clone())));
        // A refusal of the sender or the session is permanent but says
        // nothing about the recipient's address: never suppress for it.
        for (code, esc) in [(550, Some([5, 1, 8])), (550, None), (553, Some([5, 1, 7]))] {
            let session = Failure::Session(Reply::new(code, esc, "sender rejected"));
            assert_eq!(session.outcome(), Outcome::Permanent);
            assert!(!is_hard_bounce(&session), "{code} {esc:?}");
        }
        assert_eq!(Failure::Fault(utf8).class(), "5.6");
    }

    #[test]
    fn replies_print_on_one_line() {
        let r = Reply::new(550, Some([5, 1, 1]), "no such\nuser\r");
        assert_eq!(r.one_line(), "550 5.1.1 no such user");
        assert_eq!(r.dsn_status(), "5.1.1");
        assert_eq!(Reply::new(554, None, "no").dsn_status(), "5.0.0");
        // The class follows the reply code, as the outcome does.
        assert_eq!(Reply::new(450, Some([5, 1, 1]), "x").dsn_status(), "4.1.1");
        assert_eq!(Reply::new(550, Some([4, 2, 2]), "x").dsn_status(), "5.2.2");
        assert_eq!(Reply::new(999, None, "x").dsn_status(), "4.0.0");
    }
}
