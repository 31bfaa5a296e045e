//! Who may relay, and as whom: pure decisions, no I/O.
//!
//! The inbound session asks these functions and turns their refusals into
//! SMTP replies; keeping them pure makes the no-open-relay rules readable in
//! one place and testable as tables.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{AuthMode, RelayConfig, SendingDomain};

/// Why a path (the `<...>` of MAIL FROM or RCPT TO) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressProblem {
    /// `@a,@b:user@c`: source routes are not relayed (RFC 5321 allows
    /// servers to ignore them; a relay must not honour them).
    SourceRoute,
    /// `user%other@domain`: the "percent hack" asks us to relay onwards.
    PercentHack,
    /// `host!user@domain`: a UUCP bang path, same trick.
    BangPath,
    /// A quoted local part holding `@`, `%` or `!`: hides one of the tricks.
    QuotedTrick,
    /// More than one `@` outside quotes.
    DoubleAt,
    /// No `@domain`, or an empty local part or domain.
    MissingDomain,
    /// Not a syntactically valid address (bad characters, dots, length).
    Syntax,
    /// A recipient at an address literal (`user@[10.0.0.5]`).
    AddressLiteral,
}

impl AddressProblem {
    /// True when the address is well formed but asks for a relay trick
    /// (550 5.7.1), false for plain bad syntax (501 5.1.3).
    pub fn is_relay_trick(self) -> bool {
        matches!(
            self,
            AddressProblem::SourceRoute
                | AddressProblem::PercentHack
                | AddressProblem::BangPath
                | AddressProblem::QuotedTrick
                | AddressProblem::AddressLiteral
        )
    }

    /// What the client is told.
    pub fn describe(self) -> &'static str {
        match self {
            AddressProblem::SourceRoute => "source routes are not accepted",
            AddressProblem::PercentHack => "'%' relaying is not accepted",
            AddressProblem::BangPath => "'!' bang paths are not accepted",
            AddressProblem::QuotedTrick => {
                "quoted local parts with '@', '%' or '!' are not accepted"
            }
            AddressProblem::DoubleAt => "address has more than one '@'",
            AddressProblem::MissingDomain => "address needs a local part and a domain",
            AddressProblem::Syntax => "address is not valid",
            AddressProblem::AddressLiteral => "recipients at address literals are not accepted",
        }
    }
}

/// Longest address accepted (RFC 5321 4.5.3.1.3: path of 256 octets).
pub const MAX_ADDRESS_LEN: usize = 254;

/// Checks the raw text between `<` and `>` as the client sent it, before
/// any parser normalises it away (smtp-proto strips source routes and
/// quotes). Returns the address to use (quotes kept as sent).
pub fn check_path(raw: &str) -> Result<&str, AddressProblem> {
    let raw = raw.trim();
    if raw.starts_with('@') {
        return Err(AddressProblem::SourceRoute);
    }
    if raw.is_empty() {
        return Err(AddressProblem::MissingDomain);
    }
    if raw.len() > MAX_ADDRESS_LEN {
        return Err(AddressProblem::Syntax);
    }
    // Split off a quoted local part, if any.
    let (local, rest, quoted) = if let Some(after) = raw.strip_prefix('"') {
        let mut escaped = false;
        let mut end = None;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else {
            return Err(AddressProblem::Syntax);
        };
        (&after[..end], &after[end + 1..], true)
    } else {
        match raw.find('@') {
            Some(i) => (&raw[..i], &raw[i..], false),
            None => (raw, "", false),
        }
    };
    if quoted && local.contains(['@', '%', '!']) {
        return Err(AddressProblem::QuotedTrick);
    }
    // RFC 5321 4.1.2 qtextSMTP / quoted-pairSMTP: printable characters
    // only. A CR, NUL or other control character inside quotes would
    // reach the queue, logs and DSN headers (and the HTTP API has no line
    // framing to stop a CRLF).
    if quoted && local.chars().any(char::is_control) {
        return Err(AddressProblem::Syntax);
    }
    let Some(domain) = rest.strip_prefix('@') else {
        return Err(if rest.is_empty() {
            AddressProblem::MissingDomain
        } else {
            AddressProblem::Syntax
        });
    };
    if domain.contains('@') {
        return Err(AddressProblem::DoubleAt);
    }
    if local.is_empty() || domain.is_empty() {
        return Err(AddressProblem::MissingDomain);
    }
    if !quoted {
        if local.contains('%') {
            return Err(AddressProblem::PercentHack);
        }
        if local.contains('!') {
            return Err(AddressProblem::BangPath);
        }
        if !valid_dot_atom(local) {
            return Err(AddressProblem::Syntax);
        }
    }
    if !valid_domain(domain) {
        return Err(if domain.contains(['%', '!']) {
            AddressProblem::PercentHack
        } else {
            AddressProblem::Syntax
        });
    }
    Ok(raw)
}

/// [`check_path`] for a recipient, also refusing address literals:
/// delivery routes by MX only, so such mail could never leave, and a relay
/// inside a cluster must not be steerable at internal addresses.
pub fn check_recipient(raw: &str) -> Result<&str, AddressProblem> {
    let address = check_path(raw)?;
    if domain_of(address).starts_with('[') {
        return Err(AddressProblem::AddressLiteral);
    }
    Ok(address)
}

/// RFC 5322 dot-atom (with UTF-8 allowed, RFC 6531).
fn valid_dot_atom(s: &str) -> bool {
    !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || "!#$%&'*+-/=?^_`{|}~.".contains(c)
                || (!c.is_ascii() && !c.is_control())
        })
}

/// A domain name or an address literal `[1.2.3.4]`.
fn valid_domain(s: &str) -> bool {
    if let Some(lit) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let lit = lit.strip_prefix("IPv6:").unwrap_or(lit);
        return lit.parse::<IpAddr>().is_ok();
    }
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && !c.is_control())
                })
        })
}

/// The domain of a checked address, lower-cased.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// Who the client is, as far as relaying goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client<'a> {
    /// The peer address.
    pub ip: IpAddr,
    /// The AUTH user, once authenticated.
    pub user: Option<&'a str>,
}

/// Why a client may not relay, or may not use a sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Not trusted and not authenticated, on a listener that offers AUTH.
    AuthRequired,
    /// Not trusted and not authenticated, and AUTH is not offered here.
    NotTrusted,
    /// The MAIL FROM domain is not a configured sending domain.
    UnknownDomain(String),
    /// The AUTH user may not send as this domain.
    UserNotAllowed {
        /// The user.
        user: String,
        /// The domain.
        domain: String,
    },
    /// The null sender `<>` is for bounces; submissions must name a sender.
    NullSender,
    /// A feedback listener takes mail only for the return-path domains.
    NotReturnPath(String),
}

impl Denied {
    /// Label for the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::AuthRequired => "auth_required",
            Denied::NotTrusted => "relay_denied",
            Denied::UnknownDomain(_) => "unknown_sender_domain",
            Denied::UserNotAllowed { .. } => "sender_not_allowed",
            Denied::NullSender => "null_sender",
            Denied::NotReturnPath(_) => "not_return_path",
        }
    }

    /// What the client is told.
    pub fn describe(&self) -> String {
        match self {
            Denied::AuthRequired => "Authentication required".to_string(),
            Denied::NotTrusted => {
                "Relaying denied: your address is not in a trusted network and AUTH is not offered here"
                    .to_string()
            }
            Denied::UnknownDomain(d) => {
                format!("Relaying denied: {d} is not a sending domain of this relay")
            }
            Denied::UserNotAllowed { user, domain } => {
                format!("Relaying denied: user {user} may not send as {domain}")
            }
            Denied::NullSender => "Relaying denied: the null sender is not accepted for submission".to_string(),
            Denied::NotReturnPath(a) => {
                format!("Relaying denied: {a} is not a return-path address of this relay")
            }
        }
    }
}

/// True when `ip` is in one of `networks`. IPv4-mapped IPv6 peers count as
/// their IPv4 address, so `127.0.0.0/8` matches `::ffff:127.0.0.1`.
pub fn is_trusted(ip: IpAddr, networks: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// May this client relay at all on a listener with `auth`?
pub fn may_relay(client: &Client<'_>, auth: AuthMode, trusted: &[IpNet]) -> Result<(), Denied> {
    if client.user.is_some() {
        return Ok(());
    }
    if auth != AuthMode::Required && is_trusted(client.ip, trusted) {
        return Ok(());
    }
    match auth {
        AuthMode::None => Err(Denied::NotTrusted),
        AuthMode::Optional | AuthMode::Required => Err(Denied::AuthRequired),
    }
}

/// May this client send as `sender` (a checked address, or empty for
/// `<>`)? Returns the configured sending domain.
pub fn check_sender<'c>(
    client: &Client<'_>,
    sender: &str,
    config: &'c RelayConfig,
) -> Result<&'c SendingDomain, Denied> {
    if sender.is_empty() {
        return Err(Denied::NullSender);
    }
    let domain = domain_of(sender);
    let Some(sending) = config.domain(domain) else {
        return Err(Denied::UnknownDomain(domain.to_ascii_lowercase()));
    };
    if let Some(user) = client.user
        && !sending.allowed_users.is_empty()
        && !sending.allowed_users.iter().any(|u| u == user)
    {
        return Err(Denied::UserNotAllowed {
            user: user.to_string(),
            domain: sending.domain.clone(),
        });
    }
    Ok(sending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DkimAlgorithm, DkimConfig, RateLimits, SuppressedAction};

    #[test]
    fn paths() {
        use AddressProblem::*;
        let table: &[(&str, Result<&str, AddressProblem>)] = &[
            ("user@example.test", Ok("user@example.test")),
            (
                "first.last+tag@sub.example.test",
                Ok("first.last+tag@sub.example.test"),
            ),
            ("\"john doe\"@example.test", Ok("\"john doe\"@example.test")),
            ("user@[127.0.0.1]", Ok("user@[127.0.0.1]")),
            ("jörg@bücher.example", Ok("jörg@bücher.example")),
            ("@relay.example:user@victim.example", Err(SourceRoute)),
            ("@a,@b:user@c.example", Err(SourceRoute)),
            ("user%victim.example@example.test", Err(PercentHack)),
            ("victim.example!user@example.test", Err(BangPath)),
            ("\"user@victim.example\"@example.test", Err(QuotedTrick)),
            ("\"user%victim\"@example.test", Err(QuotedTrick)),
            ("user@victim.example@example.test", Err(DoubleAt)),
            ("user", Err(MissingDomain)),
            ("user@", Err(MissingDomain)),
            ("@", Err(SourceRoute)),
            ("", Err(MissingDomain)),
            (".user@example.test", Err(Syntax)),
            ("us..er@example.test", Err(Syntax)),
            ("user@exa mple.test", Err(Syntax)),
            ("user@-bad.example", Err(Syntax)),
            ("user@example..test", Err(Syntax)),
            ("\"unterminated@example.test", Err(Syntax)),
            ("\"a\rb\"@example.test", Err(Syntax)),
            ("\"a\r\nRSET\"@example.test", Err(Syntax)),
            ("\"a\\\u{0}b\"@example.test", Err(Syntax)),
            ("\"a\u{85}b\"@example.test", Err(Syntax)),
        ];
        for (input, want) in table {
            assert_eq!(check_path(input), *want, "{input}");
        }
        assert!(SourceRoute.is_relay_trick() && !DoubleAt.is_relay_trick());
        assert_eq!(check_recipient("a@x.org"), Ok("a@x.org"));
        assert_eq!(check_recipient("a@[10.0.0.5]"), Err(AddressLiteral));
        assert_eq!(check_recipient("a@[IPv6:::1]"), Err(AddressLiteral));
        assert_eq!(check_recipient("@a:b@c.org"), Err(SourceRoute));
    }

    fn config() -> RelayConfig {
        let mut c = RelayConfig::from_yaml(
            "listeners: [{name: smtp, address: '127.0.0.1:2525'}]\nqueue: {embedded: {path: /tmp/q}}\n",
        )
        .unwrap();
        for (domain, users) in [
            ("example.test", vec![]),
            ("corp.test", vec!["alice".to_string()]),
        ] {
            c.domains.push(SendingDomain {
                domain: domain.into(),
                dkim: DkimConfig {
                    selector: "s1".into(),
                    algorithm: DkimAlgorithm::Ed25519,
                    key_file: "/nonexistent".into(),
                },
                allowed_users: users,
                on_suppressed: SuppressedAction::Refuse,
                return_path_domain: None,
                tracking: None,
                rate_limits: RateLimits::default(),
                from_header: Default::default(),
                unsubscribe: None,
                feedback_id: None,
                reputation: Default::default(),
            });
        }
        c
    }

    #[test]
    fn relay_decisions() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let table = [
            (inside, None, AuthMode::None, Ok(())),
            (mapped, None, AuthMode::None, Ok(())),
            (inside, None, AuthMode::Optional, Ok(())),
            (inside, None, AuthMode::Required, Err(Denied::AuthRequired)),
            (inside, Some("bob"), AuthMode::Required, Ok(())),
            (outside, None, AuthMode::None, Err(Denied::NotTrusted)),
            (outside, None, AuthMode::Optional, Err(Denied::AuthRequired)),
            (outside, Some("bob"), AuthMode::Optional, Ok(())),
        ];
        for (ip, user, auth, want) in table {
            assert_eq!(
                may_relay(&Client { ip, user }, auth, &trusted),
                want,
                "{ip} {user:?} {auth:?}"
            );
        }
    }

    #[test]
    fn sender_decisions() {
        let c = config();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let anon = Client { ip, user: None };
        let alice = Client {
            ip,
            user: Some("alice"),
        };
        let bob = Client {
            ip,
            user: Some("bob"),
        };
        assert_eq!(
            check_sender(&anon, "a@Example.TEST", &c).unwrap().domain,
            "example.test"
        );
        assert_eq!(
            check_sender(&anon, "a@corp.test", &c).unwrap().domain,
            "corp.test"
        );
        assert_eq!(
            check_sender(&alice, "a@corp.test", &c).unwrap().domain,
            "corp.test"
        );
        assert_eq!(
            check_sender(&bob, "a@example.test", &c).unwrap().domain,
            "example.test"
        );
        assert_eq!(
            check_sender(&bob, "a@corp.test", &c).unwrap_err(),
            Denied::UserNotAllowed {
                user: "bob".into(),
                domain: "corp.test".into()
            }
        );
        assert_eq!(
            check_sender(&anon, "a@other.test", &c).unwrap_err(),
            Denied::UnknownDomain("other.test".into())
        );
        assert_eq!(
            check_sender(&anon, "a@sub.example.test", &c)
                .unwrap_err()
                .reason(),
            "unknown_sender_domain"
        );
        assert_eq!(check_sender(&anon, "", &c).unwrap_err(), Denied::NullSender);
    }
}
