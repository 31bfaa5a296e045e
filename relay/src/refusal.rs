//! Every way the relay refuses inbound mail, as one type.
//!
//! A [`Refusal`] carries everything the two front doors need: the SMTP
//! reply code and enhanced status (RFC 3463), the text, the bounded label
//! of `petrel_messages_rejected_total`, whether an SMTP session ends, and
//! the HTTP status the send API answers with. A new refusal is one variant;
//! the compiler then finds every `match` below that must say how it looks.

use std::borrow::Cow;

use crate::policy::Denied;

/// Why a command, a message or a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    // --- dialogue and syntax ---
    /// 503 5.5.1: command out of sequence.
    BadSequence(&'static str),
    /// 501 5.5.2: syntax error in parameters.
    Syntax(Cow<'static, str>),
    /// 501 5.5.4: a parameter with a bad value.
    InvalidParameter(String),
    /// 555 5.5.4: a MAIL/RCPT parameter this relay does not support.
    UnsupportedParameter(Cow<'static, str>),
    /// 504 5.5.4: an AUTH mechanism other than PLAIN or LOGIN.
    MechanismNotSupported,
    /// 501 5.5.2: an AUTH response that is not valid base64/SASL.
    InvalidAuthResponse,
    /// 501 5.0.0: the client answered `*` to an AUTH challenge.
    AuthCancelled,
    /// 500 5.5.1: not an SMTP command.
    UnknownCommand,
    /// 500 5.5.6: a line longer than `limits.maxLineLength`.
    LineTooLong,
    /// 502 5.5.1: a command or extension not offered here.
    NotImplemented(&'static str),

    // --- addresses ---
    /// 501 5.1.7: a malformed sender address.
    BadSender(Cow<'static, str>),
    /// 501 5.1.3: a malformed recipient address.
    BadRecipient(Cow<'static, str>),
    /// 553 5.6.7: a non-ASCII address without SMTPUTF8.
    NeedsSmtpUtf8,
    /// 550 5.7.1: a source route, percent hack or bang path.
    AddressTrick(String),

    // --- policy ---
    /// 530 5.7.0 or 550 5.7.1: who may relay, as whom.
    Denied(Denied),
    /// 550 5.7.1: the header From (or Sender) names a domain this client
    /// may not send as.
    FromHeader(String),
    /// 552 5.3.4: over `limits.maxMessageSize`.
    TooBig,
    /// 550 5.6.0: an invalid `X-Petrel-Tags` header or `tags` field.
    BadTags(String),
    /// 452 4.5.3: over `limits.maxRecipients`.
    TooManyRecipients,
    /// 554 5.5.1: no recipient left to send to.
    NoRecipients,
    /// 451 4.7.1: the sending domain's daily quota is used up.
    QuotaExhausted(String),
    /// 451 4.7.1 (HTTP 503): the reputation guard paused the sending domain.
    Paused {
        /// The sending domain.
        domain: String,
        /// Which rate is over what (`bounce rate 7.2% over 24h exceeds 5%`).
        why: String,
    },
    /// 550 5.1.1: the recipient is on the suppression list.
    Suppressed {
        /// The recipient.
        address: String,
        /// Why it is suppressed.
        reason: String,
    },

    // --- AUTH ---
    /// 530 5.7.0: AUTH attempted in clear where TLS is required first.
    AuthNeedsTls,
    /// 530 5.7.0 (HTTP 403): Basic credentials sent in clear by a client
    /// outside the trusted networks, without `http.allowInsecureAuth`.
    PlaintextCredentials,
    /// 535 5.7.8: wrong user name or password.
    AuthFailed,
    /// 421 4.7.0: too many failed attempts from this client.
    AuthBlocked,
    /// 454 4.7.0: every password check slot is busy.
    AuthBusy,
    /// 454 4.7.0: the failure counter could not be read or written.
    AuthUnavailable,

    // --- our side ---
    /// 451 4.3.0: the queue backend failed or timed out.
    QueueUnavailable,
    /// 451 4.3.0: the sending domain vanished from the config mid-transaction.
    DomainRemoved,
    /// 451 4.3.0: the domain's DKIM key is unusable right now.
    DkimUnavailable(Option<String>),

    // --- connection ---
    /// 421 4.7.0: `limits.maxConnections` reached.
    TooManyConnections,
    /// 421 4.7.0: `limits.maxConnectionsPerIp` reached.
    TooManyConnectionsFromClient,
    /// 421 4.7.0: `limits.maxErrors` refusals in one session.
    TooManyErrors,
    /// 421 4.3.2: the relay is shutting down.
    ShuttingDown,
    /// 421 4.4.2: the client was silent too long.
    Timeout(&'static str),
    /// 421 4.4.2: the connection broke mid-message.
    ConnectionLost,
}

impl Refusal {
    /// The SMTP reply code.
    pub fn code(&self) -> u16 {
        use Refusal::*;
        match self {
            BadSequence(_) => 503,
            Syntax(_) | InvalidParameter(_) | InvalidAuthResponse | AuthCancelled => 501,
            UnsupportedParameter(_) => 555,
            MechanismNotSupported => 504,
            UnknownCommand | LineTooLong => 500,
            NotImplemented(_) => 502,
            BadSender(_) | BadRecipient(_) => 501,
            NeedsSmtpUtf8 => 553,
            AddressTrick(_) | FromHeader(_) | BadTags(_) | Suppressed { .. } => 550,
            Denied(crate::policy::Denied::AuthRequired) | AuthNeedsTls | PlaintextCredentials => {
                530
            }
            Denied(_) => 550,
            TooBig => 552,
            TooManyRecipients => 452,
            NoRecipients => 554,
            QuotaExhausted(_)
            | Paused { .. }
            | QueueUnavailable
            | DomainRemoved
            | DkimUnavailable(_) => 451,
            AuthFailed => 535,
            AuthBusy | AuthUnavailable => 454,
            AuthBlocked
            | TooManyConnections
            | TooManyConnectionsFromClient
            | TooManyErrors
            | ShuttingDown
            | Timeout(_)
            | ConnectionLost => 421,
        }
    }

    /// The enhanced status code (RFC 3463).
    pub fn esc(&self) -> &'static str {
        use Refusal::*;
        match self {
            BadSequence(_) | UnknownCommand | NotImplemented(_) | NoRecipients => "5.5.1",
            Syntax(_) | InvalidAuthResponse => "5.5.2",
            InvalidParameter(_) | UnsupportedParameter(_) | MechanismNotSupported => "5.5.4",
            AuthCancelled => "5.0.0",
            LineTooLong => "5.5.6",
            BadSender(_) => "5.1.7",
            BadRecipient(_) => "5.1.3",
            NeedsSmtpUtf8 => "5.6.7",
            Denied(crate::policy::Denied::AuthRequired) | AuthNeedsTls | PlaintextCredentials => {
                "5.7.0"
            }
            AddressTrick(_) | Denied(_) | FromHeader(_) => "5.7.1",
            TooBig => "5.3.4",
            BadTags(_) => "5.6.0",
            TooManyRecipients => "4.5.3",
            QuotaExhausted(_) | Paused { .. } => "4.7.1",
            Suppressed { .. } => "5.1.1",
            AuthFailed => "5.7.8",
            AuthBlocked | AuthBusy | AuthUnavailable => "4.7.0",
            QueueUnavailable | DomainRemoved | DkimUnavailable(_) => "4.3.0",
            TooManyConnections | TooManyConnectionsFromClient | TooManyErrors => "4.7.0",
            ShuttingDown => "4.3.2",
            Timeout(_) | ConnectionLost => "4.4.2",
        }
    }

    /// What the client is told, one line.
    pub fn text(&self) -> Cow<'static, str> {
        use Refusal::*;
        match self {
            BadSequence(why) | NotImplemented(why) | Timeout(why) => Cow::Borrowed(why),
            Syntax(why) | UnsupportedParameter(why) | BadSender(why) | BadRecipient(why) => {
                why.clone()
            }
            InvalidParameter(param) => format!("Invalid value for {param}").into(),
            MechanismNotSupported => "Mechanism not supported, use PLAIN or LOGIN".into(),
            InvalidAuthResponse => "Invalid AUTH response".into(),
            AuthCancelled => "Authentication cancelled".into(),
            UnknownCommand => "Command unrecognized".into(),
            LineTooLong => "Line too long".into(),
            NeedsSmtpUtf8 => "Non-ASCII address requires SMTPUTF8".into(),
            AddressTrick(why) => format!("Relaying denied: {why}").into(),
            Denied(denied) => denied.describe().into(),
            FromHeader(domain) => {
                format!("From header domain {domain} is not a sending domain you may use").into()
            }
            TooBig => "Message size exceeds fixed maximum message size".into(),
            BadTags(why) => format!("Invalid {} header: {why}", crate::events::tags::HEADER).into(),
            TooManyRecipients => "Too many recipients".into(),
            NoRecipients => "No valid recipients".into(),
            QuotaExhausted(domain) => {
                format!("Daily sending quota of {domain} exhausted, try again later").into()
            }
            Paused { domain, why } => format!("sending for {domain} is paused: {why}").into(),
            Suppressed { address, reason } => {
                format!("Recipient {address} is on the suppression list ({reason})").into()
            }
            AuthNeedsTls => "Must issue a STARTTLS command first".into(),
            PlaintextCredentials => {
                "Credentials over plain HTTP are refused from outside the trusted networks: use HTTPS".into()
            }
            AuthFailed => "Authentication credentials invalid".into(),
            AuthBlocked => {
                "Too many failed AUTH attempts from your address, try again later".into()
            }
            AuthBusy | AuthUnavailable => "Temporary authentication failure, try again later".into(),
            QueueUnavailable => "Temporary failure, please try again later".into(),
            DomainRemoved => "Sending domain no longer configured, try again later".into(),
            DkimUnavailable(Some(domain)) => {
                format!("Cannot sign for {domain} now, try again later").into()
            }
            DkimUnavailable(None) => "Cannot sign now, try again later".into(),
            TooManyConnections => "Too many connections, try again later".into(),
            TooManyConnectionsFromClient => {
                "Too many connections from your address, try again later".into()
            }
            TooManyErrors => "Too many errors, closing connection".into(),
            ShuttingDown => "Service shutting down, try again later".into(),
            ConnectionLost => "Connection lost".into(),
        }
    }

    /// Bounded label for `petrel_messages_rejected_total{reason}`.
    pub fn label(&self) -> &'static str {
        use Refusal::*;
        match self {
            BadSequence(_) => "bad_sequence",
            Syntax(_)
            | InvalidParameter(_)
            | UnsupportedParameter(_)
            | MechanismNotSupported
            | InvalidAuthResponse => "syntax",
            AuthCancelled => "auth_cancelled",
            UnknownCommand => "unknown_command",
            LineTooLong => "line_too_long",
            NotImplemented(_) => "not_implemented",
            BadSender(_) | BadRecipient(_) | NeedsSmtpUtf8 => "bad_address",
            AddressTrick(_) => "address_trick",
            Denied(denied) => denied.reason(),
            FromHeader(_) => "from_header_domain",
            TooBig => "too_big",
            BadTags(_) => "bad_tags",
            TooManyRecipients => "too_many_recipients",
            NoRecipients => "no_recipients",
            QuotaExhausted(_) => "quota_exhausted",
            Paused { .. } => "reputation_paused",
            Suppressed { .. } => "suppressed",
            AuthNeedsTls | PlaintextCredentials => "auth_needs_tls",
            AuthFailed => "auth_failed",
            AuthBlocked => "auth_blocked",
            AuthBusy => "auth_busy",
            AuthUnavailable => "auth_unavailable",
            QueueUnavailable => "queue_unavailable",
            DomainRemoved => "domain_removed",
            DkimUnavailable(_) => "dkim_key",
            TooManyConnections => "too_many_connections",
            TooManyConnectionsFromClient => "too_many_connections_from_client",
            TooManyErrors => "too_many_errors",
            ShuttingDown => "shutdown",
            Timeout(_) => "timeout",
            ConnectionLost => "connection_lost",
        }
    }

    /// Whether an SMTP session closes after this reply.
    pub fn disconnects(&self) -> bool {
        use Refusal::*;
        matches!(
            self,
            AuthBlocked
                | TooManyConnections
                | TooManyConnectionsFromClient
                | TooManyErrors
                | ShuttingDown
                | Timeout(_)
                | ConnectionLost
        )
    }

    /// Whether this counts towards `limits.maxErrors`. Refusing a
    /// recipient for being suppressed or one too many is normal for a bulk
    /// sender (RFC 5321 3.3: send the rest in a new transaction), not a
    /// sign of a broken or hostile client.
    pub fn counts_as_error(&self) -> bool {
        !matches!(
            self,
            Refusal::TooManyRecipients | Refusal::Suppressed { .. }
        )
    }

    /// Whether this refusal is about a message or a recipient and so
    /// deserves a `rejected` event: policy, From header, suppression, size,
    /// quota, tags, AUTH refusals and our side failing. Protocol noise
    /// (syntax, sequence, unknown commands) and connection handling are not
    /// about a message and make none.
    pub fn is_event_worthy(&self) -> bool {
        use Refusal::*;
        match self {
            AddressTrick(_)
            | BadSender(_)
            | BadRecipient(_)
            | NeedsSmtpUtf8
            | Denied(_)
            | FromHeader(_)
            | TooBig
            | BadTags(_)
            | TooManyRecipients
            | NoRecipients
            | QuotaExhausted(_)
            | Paused { .. }
            | Suppressed { .. }
            | AuthNeedsTls
            | PlaintextCredentials
            | AuthFailed
            | AuthBlocked
            | AuthBusy
            | AuthUnavailable
            | QueueUnavailable
            | DomainRemoved
            | DkimUnavailable(_) => true,
            BadSequence(_)
            | Syntax(_)
            | InvalidParameter(_)
            | UnsupportedParameter(_)
            | MechanismNotSupported
            | InvalidAuthResponse
            | AuthCancelled
            | UnknownCommand
            | LineTooLong
            | NotImplemented(_)
            | TooManyConnections
            | TooManyConnectionsFromClient
            | TooManyErrors
            | ShuttingDown
            | Timeout(_)
            | ConnectionLost => false,
        }
    }

    /// The HTTP status of the send API for this refusal: credentials
    /// problems 401, policy 403, size 413, other permanent failures 422,
    /// rate limits 429, everything temporary 503.
    pub fn http_status(&self) -> u16 {
        use Refusal::*;
        match self {
            Denied(crate::policy::Denied::AuthRequired) | AuthNeedsTls | AuthFailed => 401,
            Denied(_) | AddressTrick(_) | FromHeader(_) | PlaintextCredentials => 403,
            TooBig => 413,
            BadSequence(_)
            | Syntax(_)
            | InvalidParameter(_)
            | UnsupportedParameter(_)
            | MechanismNotSupported
            | InvalidAuthResponse
            | AuthCancelled
            | UnknownCommand
            | LineTooLong
            | NotImplemented(_)
            | BadSender(_)
            | BadRecipient(_)
            | NeedsSmtpUtf8
            | NoRecipients
            | BadTags(_)
            | Suppressed { .. } => 422,
            QuotaExhausted(_)
            | TooManyRecipients
            | AuthBlocked
            | TooManyConnections
            | TooManyConnectionsFromClient
            | TooManyErrors => 429,
            AuthBusy
            | AuthUnavailable
            | QueueUnavailable
            | DomainRemoved
            | DkimUnavailable(_)
            | Paused { .. }
            | ShuttingDown
            | Timeout(_)
            | ConnectionLost => 503,
        }
    }

    /// The SMTP reply line, CRLF terminated.
    pub fn render(&self) -> String {
        crate::inbound::reply::render(self.code(), self.esc(), &self.text())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code(), self.esc(), self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_statuses_and_labels() {
        let denied = |d| Refusal::Denied(d);
        let table: Vec<(Refusal, &str, u16, &str)> = vec![
            (
                Refusal::BadSequence("Need MAIL first"),
                "503 5.5.1 Need MAIL first\r\n",
                422,
                "bad_sequence",
            ),
            (
                denied(Denied::AuthRequired),
                "530 5.7.0 Authentication required\r\n",
                401,
                "auth_required",
            ),
            (
                denied(Denied::UnknownDomain("bank.test".into())),
                "550 5.7.1 Relaying denied: bank.test is not a sending domain of this relay\r\n",
                403,
                "unknown_sender_domain",
            ),
            (
                Refusal::FromHeader("bank.test".into()),
                "550 5.7.1 From header domain bank.test is not a sending domain you may use\r\n",
                403,
                "from_header_domain",
            ),
            (
                Refusal::AuthFailed,
                "535 5.7.8 Authentication credentials invalid\r\n",
                401,
                "auth_failed",
            ),
            (
                Refusal::TooBig,
                "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                413,
                "too_big",
            ),
            (
                Refusal::Suppressed {
                    address: "a@x.org".into(),
                    reason: "hard-bounce".into(),
                },
                "550 5.1.1 Recipient a@x.org is on the suppression list (hard-bounce)\r\n",
                422,
                "suppressed",
            ),
            (
                Refusal::QuotaExhausted("example.test".into()),
                "451 4.7.1 Daily sending quota of example.test exhausted, try again later\r\n",
                429,
                "quota_exhausted",
            ),
            (
                Refusal::Paused {
                    domain: "example.com".into(),
                    why: "bounce rate 7.2% over 24h exceeds 5%".into(),
                },
                "451 4.7.1 sending for example.com is paused: bounce rate 7.2% over 24h exceeds 5%\r\n",
                503,
                "reputation_paused",
            ),
            (
                Refusal::TooManyRecipients,
                "452 4.5.3 Too many recipients\r\n",
                429,
                "too_many_recipients",
            ),
            (
                Refusal::QueueUnavailable,
                "451 4.3.0 Temporary failure, please try again later\r\n",
                503,
                "queue_unavailable",
            ),
            (
                Refusal::ShuttingDown,
                "421 4.3.2 Service shutting down, try again later\r\n",
                503,
                "shutdown",
            ),
        ];
        for (refusal, line, status, label) in table {
            assert_eq!(refusal.render(), line, "{refusal:?}");
            assert_eq!(refusal.http_status(), status, "{refusal:?}");
            assert_eq!(refusal.label(), label, "{refusal:?}");
        }
        assert!(Refusal::ShuttingDown.disconnects());
        assert!(Refusal::AuthBlocked.disconnects());
        assert!(!Refusal::AuthFailed.disconnects());
        assert!(!Refusal::TooManyRecipients.counts_as_error());
        assert!(Refusal::AuthFailed.counts_as_error());
    }

    #[test]
    fn codes_agree_with_enhanced_status_class() {
        // A 4xx reply must carry a 4.x.x status and a 5xx a 5.x.x one
        // (RFC 3463 2), whatever the variant.
        let all = [
            Refusal::Syntax("x".into()),
            Refusal::InvalidParameter("SIZE".into()),
            Refusal::UnsupportedParameter("X".into()),
            Refusal::MechanismNotSupported,
            Refusal::InvalidAuthResponse,
            Refusal::AuthCancelled,
            Refusal::UnknownCommand,
            Refusal::LineTooLong,
            Refusal::NotImplemented("x"),
            Refusal::BadSender("x".into()),
            Refusal::BadRecipient("x".into()),
            Refusal::NeedsSmtpUtf8,
            Refusal::AddressTrick("x".into()),
            Refusal::Denied(Denied::NotTrusted),
            Refusal::Denied(Denied::NullSender),
            Refusal::NoRecipients,
            Refusal::AuthNeedsTls,
            Refusal::PlaintextCredentials,
            Refusal::AuthBusy,
            Refusal::AuthUnavailable,
            Refusal::DomainRemoved,
            Refusal::DkimUnavailable(None),
            Refusal::TooManyConnections,
            Refusal::TooManyConnectionsFromClient,
            Refusal::TooManyErrors,
            Refusal::Timeout("x"),
            Refusal::ConnectionLost,
        ];
        for r in all {
            let class = r.code() / 100;
            assert_eq!(
                r.esc().as_bytes()[0] - b'0',
                class as u8,
                "{r:?} code {} esc {}",
                r.code(),
                r.esc()
            );
            let status = r.http_status();
            if class == 4 {
                assert!(status == 429 || status == 503, "{r:?} -> {status}");
            } else {
                assert!((400..500).contains(&status), "{r:?} -> {status}");
            }
        }
    }
}
