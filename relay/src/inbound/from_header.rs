//! The header From bound to the client: with `fromHeader: enforce` on the
//! envelope sender's domain, every address in From and Sender must be a
//! sending domain this client may use (the same rule as MAIL FROM), so an
//! app allowed `example.test` cannot write `From: ceo@bank.test`, and the
//! DKIM `d=` the relay signs with aligns with From for DMARC.
//!
//! A message without From is let through: it names no author to
//! misrepresent (and much legitimate tooling submits without one).

use mail_parser::{Address, HeaderName, HeaderValue, MessageParser};

use crate::config::{FromHeaderPolicy, RelayConfig};
use crate::policy::{self, Client};
use crate::refusal::Refusal;

/// Checks the From and Sender headers of `raw` for a message whose
/// envelope sender is in `sending_domain`. Pure.
pub fn check(
    config: &RelayConfig,
    client: &Client<'_>,
    sending_domain: &str,
    raw: &[u8],
) -> Result<(), Refusal> {
    let policy = config
        .domain(sending_domain)
        .map_or(FromHeaderPolicy::Enforce, |d| d.from_header);
    if policy == FromHeaderPolicy::Off {
        return Ok(());
    }
    let Some(message) = MessageParser::new().parse_headers(header_block(raw)) else {
        return Ok(());
    };
    for header in message.headers() {
        if !matches!(header.name, HeaderName::From | HeaderName::Sender) {
            continue;
        }
        let addresses: Vec<&str> = match &header.value {
            HeaderValue::Address(Address::List(list)) => {
                list.iter().filter_map(|a| a.address.as_deref()).collect()
            }
            HeaderValue::Address(Address::Group(groups)) => groups
                .iter()
                .flat_map(|g| g.addresses.iter())
                .filter_map(|a| a.address.as_deref())
                .collect(),
            _ => Vec::new(),
        };
        // A From or Sender field with no address in it cannot be
        // checked, so it cannot be let through either.
        if addresses.is_empty() {
            return Err(Refusal::FromHeader("(none)".to_string()));
        }
        for address in addresses {
            let domain = address
                .rsplit_once('@')
                .map_or("", |(_, d)| d)
                .trim()
                .trim_end_matches('.');
            if domain.is_empty() || policy::check_sender(client, address, config).is_err() {
                return Err(Refusal::FromHeader(printable(domain)));
            }
        }
    }
    Ok(())
}

/// The header section: up to and including the first empty line.
fn header_block(raw: &[u8]) -> &[u8] {
    if raw.starts_with(b"\r\n") {
        return &raw[..2];
    }
    match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &raw[..end + 4],
        None => raw,
    }
}

/// The domain as it may appear in a reply line: client text, bounded and
/// without control characters.
fn printable(domain: &str) -> String {
    let d: String = domain
        .chars()
        .filter(|c| !c.is_control())
        .take(253)
        .collect();
    if d.is_empty() {
        "(none)".to_string()
    } else {
        d.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RelayConfig {
        RelayConfig::from_yaml(
            r#"
listeners: [{name: smtp, address: "127.0.0.1:2525"}]
trustedNetworks: ["10.0.0.0/8"]
queue: {embedded: {path: q}}
domains:
  - domain: example.test
    allowedUsers: [app]
    dkim: {selector: s1, algorithm: ed25519, keyFile: k}
  - domain: other.test
    allowedUsers: [someone-else]
    dkim: {selector: s1, algorithm: ed25519, keyFile: k}
  - domain: forward.test
    fromHeader: off
    dkim: {selector: s1, algorithm: ed25519, keyFile: k}
"#,
        )
        .unwrap()
    }

    #[test]
    fn from_and_sender_must_be_domains_the_client_may_use() {
        let config = config();
        let app = Client {
            ip: "192.0.2.1".parse().unwrap(),
            user: Some("app"),
        };
        let trusted = Client {
            ip: "10.0.0.1".parse().unwrap(),
            user: None,
        };
        let refused = |d: &str| Err(Refusal::FromHeader(d.to_string()));
        let table: &[(&Client<'_>, &str, &str, Result<(), Refusal>)] = &[
            (
                &app,
                "example.test",
                "From: App <app@example.test>\r\n",
                Ok(()),
            ),
            (
                &app,
                "example.test",
                "From: CEO <ceo@bank.test>\r\n",
                refused("bank.test"),
            ),
            // The display name is not the address, however it is encoded.
            (
                &app,
                "example.test",
                "From: \"app@example.test\" <ceo@bank.test>\r\n",
                refused("bank.test"),
            ),
            (
                &app,
                "example.test",
                "From: =?UTF-8?B?YXBwQGV4YW1wbGUudGVzdA==?= <ceo@Bank.Test>\r\n",
                refused("bank.test"),
            ),
            (
                &app,
                "example.test",
                "From: =?UTF-8?Q?J=C3=B6rg?= <jorg@example.test>\r\n",
                Ok(()),
            ),
            // Every mailbox of a multi-author From counts, and every From field.
            (
                &app,
                "example.test",
                "From: a@example.test, b@bank.test\r\n",
                refused("bank.test"),
            ),
            (
                &app,
                "example.test",
                "From: a@example.test\r\nFrom: b@bank.test\r\n",
                refused("bank.test"),
            ),
            (
                &app,
                "example.test",
                "From: Team: a@example.test, b@bank.test;\r\n",
                refused("bank.test"),
            ),
            // Sender too, when present.
            (
                &app,
                "example.test",
                "From: a@example.test\r\nSender: x@bank.test\r\n",
                refused("bank.test"),
            ),
            // A configured domain this user may not send as.
            (
                &app,
                "example.test",
                "From: a@other.test\r\n",
                refused("other.test"),
            ),
            // Trusted clients have no user: any sending domain of the relay.
            (&trusted, "example.test", "From: a@other.test\r\n", Ok(())),
            (
                &trusted,
                "example.test",
                "From: a@bank.test\r\n",
                refused("bank.test"),
            ),
            // No From at all: nothing to misrepresent.
            (&app, "example.test", "Subject: hi\r\n", Ok(())),
            // A From with no address cannot be checked.
            (
                &app,
                "example.test",
                "From: undisclosed\r\n",
                refused("(none)"),
            ),
            // Only headers count: a From line in the body is text.
            (
                &app,
                "example.test",
                "Subject: hi\r\n\r\nFrom: ceo@bank.test\r\n",
                Ok(()),
            ),
            // `fromHeader: off` on the envelope domain.
            (&trusted, "forward.test", "From: ceo@bank.test\r\n", Ok(())),
        ];
        for (client, domain, headers, want) in table {
            let raw = format!("{headers}\r\nbody\r\n");
            assert_eq!(
                &check(&config, client, domain, raw.as_bytes()),
                want,
                "{headers:?}"
            );
        }
    }
}
