//! Which message and recipient a report is about. First from evidence
//! that cannot be forged without the feedback key:
//!
//! 1. the VERP token of the address the report was sent to
//!    (`b+<token>@<returnPathDomain>`), checked against the recipients the
//!    report names;
//! 2. a VERP address in the returned headers (`Return-Path`, which the
//!    final MTA adds, or any other header carrying it): how ARF reports
//!    sent to a fixed feedback-loop address are attributed;
//! 3. the unsubscribe tokens of the returned `List-Unsubscribe` header
//!    (the URL token names domain, recipient and message; the mailto one
//!    domain and recipient).
//!
//! Then, when none of them is there, from the returned `Message-ID` and
//! the queue id of Petrel's `Received` header (`id <queue id>`), looked
//! up in what the relay stored of each message it sent
//! ([`super::sent`]): the report is attributed only to a recipient it
//! names (`Final-Recipient`/`Original-Recipient`, `Original-Rcpt-To`,
//! the returned `To`/`Delivered-To`/`X-Original-To`) that is one of the
//! recipients that message was really sent to. Every recipient of a
//! message sees its `Message-ID`, so alone it would let anyone name any
//! address (suppressing strangers, or pushing a domain over its complaint
//! threshold); bound to the stored recipients, a forger can at most
//! report a co-recipient of a message they received themselves, and a
//! `Message-ID` the relay never sent attributes nothing.

use super::key::FeedbackKeys;
use super::report::Returned;
use super::sent::{self, SentMessage};
use super::token::{MAILTO_PREFIX, VERP_PREFIX};

/// Where an attribution came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The VERP address the report was sent to.
    Envelope,
    /// A VERP address in the returned headers.
    ReturnedHeaders,
    /// An unsubscribe token in the returned `List-Unsubscribe`.
    UnsubscribeHeader,
    /// The stored record of the message the returned `Message-ID` (or
    /// Petrel's `Received` queue id) names, for one of its recipients.
    MessageRecord,
}

/// The message and recipient a report is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribution {
    /// Queue id of the message (absent when only a mailto token named it).
    pub queue_id: Option<String>,
    /// The sending domain, lower-cased.
    pub sending_domain: String,
    /// The recipient, lower-cased.
    pub recipient: String,
    /// How it was found.
    pub source: Source,
}

/// What attribution needs to know: the keys, each sending domain's
/// return-path domain and the stored records of the messages the report's
/// returned headers name.
pub struct Attributor<'a> {
    /// The feedback keys.
    pub keys: &'a FeedbackKeys,
    /// (sending domain, return-path domain), lower-cased.
    pub domains: &'a [(String, String)],
    /// Records of sent messages found by the returned `Message-ID` or
    /// queue id (empty when none was looked up).
    pub records: &'a [SentMessage],
}

fn is_base32(b: u8) -> bool {
    b.is_ascii_alphabetic() || (b'2'..=b'7').contains(&b)
}

fn is_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

/// Every `<prefix><base32>@<domain>` in `text`: (token, domain lower-cased).
pub fn find_tokens(text: &str, prefix: &str) -> Vec<(String, String)> {
    let bytes = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find(prefix) {
        let start = from + at + prefix.len();
        from = start;
        let end = start + bytes[start..].iter().take_while(|b| is_base32(**b)).count();
        if end - start < 10 || bytes.get(end) != Some(&b'@') {
            continue;
        }
        let dstart = end + 1;
        let dend = dstart
            + bytes[dstart..]
                .iter()
                .take_while(|b| is_domain_byte(**b))
                .count();
        let domain = lower[dstart..dend].trim_end_matches('.').to_string();
        if !domain.is_empty() {
            out.push((text[start..end].to_string(), domain));
        }
        from = dend;
    }
    out
}

/// Every `/u/<token>` in `text`.
fn find_url_tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("/u/") {
        let after = &rest[at + 3..];
        let len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        if len >= 16 {
            out.push(&after[..len]);
        }
        rest = &after[len..];
    }
    out
}

/// Addresses in header values such as `To:` (`Name <a@b>, c@d`),
/// lower-cased.
pub fn addresses_in(value: &str) -> Vec<String> {
    value
        .split([',', ';'])
        .filter_map(|part| {
            let part = part.trim();
            let addr = match (part.rfind('<'), part.rfind('>')) {
                (Some(open), Some(close)) if open < close => &part[open + 1..close],
                _ => part,
            };
            let addr = addr.trim();
            (addr.contains('@') && !addr.contains(' ')).then(|| addr.to_lowercase())
        })
        .collect()
}

impl Attributor<'_> {
    fn sending_domains_of(&self, return_path: &str) -> Vec<&str> {
        self.domains
            .iter()
            .filter(|(_, rp)| rp.eq_ignore_ascii_case(return_path))
            .map(|(d, _)| d.as_str())
            .collect()
    }

    fn open_verp(
        &self,
        token: &str,
        domain: &str,
        candidates: &[&str],
    ) -> Option<(String, String, String)> {
        let senders = self.sending_domains_of(domain);
        let claims = self.keys.open_verp(token, candidates, &senders).ok()?;
        Some((claims.queue_id, claims.sending_domain, claims.recipient))
    }

    /// Attributes a report sent to `envelope_rcpt` naming `candidates`
    /// (the recipients it reports on, lower-cased), with the `returned`
    /// headers of the original. `None` when nothing verifies.
    pub fn attribute(
        &self,
        envelope_rcpt: &str,
        candidates: &[String],
        returned: &Returned,
    ) -> Option<Attribution> {
        let mut candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let header_addresses: Vec<String> = ["to", "delivered-to", "x-original-to"]
            .iter()
            .flat_map(|h| returned.all(h))
            .flat_map(addresses_in)
            .collect();
        candidates.extend(header_addresses.iter().map(String::as_str));

        if let Some((local, domain)) = envelope_rcpt.rsplit_once('@')
            && local.len() > VERP_PREFIX.len()
            && local[..VERP_PREFIX.len()].eq_ignore_ascii_case(VERP_PREFIX)
            && let Some((queue_id, sending_domain, recipient)) =
                self.open_verp(&local[VERP_PREFIX.len()..], domain, &candidates)
        {
            return Some(Attribution {
                queue_id: Some(queue_id),
                sending_domain,
                recipient,
                source: Source::Envelope,
            });
        }
        for (_, value) in returned
            .fields
            .iter()
            .filter(|(n, _)| n != "list-unsubscribe")
        {
            for (token, domain) in find_tokens(value, VERP_PREFIX) {
                if let Some((queue_id, sending_domain, recipient)) =
                    self.open_verp(&token, &domain, &candidates)
                {
                    return Some(Attribution {
                        queue_id: Some(queue_id),
                        sending_domain,
                        recipient,
                        source: Source::ReturnedHeaders,
                    });
                }
            }
        }
        for value in returned.all("list-unsubscribe") {
            for token in find_url_tokens(value) {
                if let Ok(claims) = self.keys.open_unsubscribe(token) {
                    return Some(Attribution {
                        queue_id: claims.queue_id,
                        sending_domain: claims.sending_domain,
                        recipient: claims.recipient,
                        source: Source::UnsubscribeHeader,
                    });
                }
            }
            for (token, domain) in find_tokens(value, MAILTO_PREFIX) {
                let senders = self.sending_domains_of(&domain);
                if let Ok(claims) = self
                    .keys
                    .open_unsubscribe_mailto(&token, &candidates, &senders)
                {
                    return Some(Attribution {
                        queue_id: None,
                        sending_domain: claims.sending_domain,
                        recipient: claims.recipient,
                        source: Source::UnsubscribeHeader,
                    });
                }
            }
        }
        let senders: Vec<&str> = self.domains.iter().map(|(d, _)| d.as_str()).collect();
        let (record, recipient) = sent::matching(self.records, &candidates, &senders)?;
        Some(Attribution {
            queue_id: Some(record.queue_id.clone()),
            sending_domain: record.sending_domain.clone(),
            recipient,
            source: Source::MessageRecord,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QID: &str = "0123456789abcdef0123456789abcdef";

    fn keys() -> FeedbackKeys {
        FeedbackKeys::from_secret(&[3u8; 32])
    }

    fn domains() -> Vec<(String, String)> {
        vec![
            ("example.com".into(), "bounces.example.com".into()),
            ("other.test".into(), "rp.other.test".into()),
        ]
    }

    #[test]
    fn tokens_are_found_in_header_text() {
        let text = "<B+ABCDEFGHIJKL@Bounces.Example.com>, b+short@x.y, u+mnopqrstuvwx@rp.test.";
        assert_eq!(
            find_tokens(text, "b+"),
            vec![(
                "ABCDEFGHIJKL".to_string(),
                "bounces.example.com".to_string()
            )]
        );
        assert_eq!(
            find_tokens(text, "u+"),
            vec![("mnopqrstuvwx".to_string(), "rp.test".to_string())]
        );
        assert_eq!(
            addresses_in("\"Ann\" <Ann@X.test>, bob@y.test"),
            vec!["ann@x.test", "bob@y.test"]
        );
    }

    #[test]
    fn attribution_prefers_the_envelope_and_refuses_what_does_not_verify() {
        let keys = keys();
        let domains = domains();
        let a = Attributor {
            keys: &keys,
            domains: &domains,
            records: &[],
        };
        let sender = keys
            .verp_sender(QID, "example.com", "gone@dest.test", "bounces.example.com")
            .unwrap();
        let got = a
            .attribute(
                &sender.to_uppercase(),
                &["gone@dest.test".into()],
                &Returned::default(),
            )
            .unwrap();
        assert_eq!(got.queue_id.as_deref(), Some(QID));
        assert_eq!(got.sending_domain, "example.com");
        assert_eq!(got.recipient, "gone@dest.test");
        assert_eq!(got.source, Source::Envelope);

        // Another recipient than the one sealed: nothing.
        assert!(
            a.attribute(&sender, &["else@dest.test".into()], &Returned::default())
                .is_none()
        );
        // The token under another return-path domain: nothing.
        let moved = sender.replace("bounces.example.com", "rp.other.test");
        assert!(
            a.attribute(&moved, &["gone@dest.test".into()], &Returned::default())
                .is_none()
        );
        // A Message-ID alone attributes nothing.
        let returned = Returned::from_text(&format!(
            "Message-ID: <{QID}@relay.test>\r\nTo: gone@dest.test\r\n"
        ));
        assert!(
            a.attribute("fbl@bounces.example.com", &[], &returned)
                .is_none()
        );
    }

    #[test]
    fn a_stored_record_attributes_only_its_own_recipients() {
        let keys = keys();
        let domains = domains();
        let records = [SentMessage {
            queue_id: QID.into(),
            sending_domain: "example.com".into(),
            recipients: vec!["gone@dest.test".into(), "co@dest.test".into()],
        }];
        let a = Attributor {
            keys: &keys,
            domains: &domains,
            records: &records,
        };
        let returned =
            Returned::from_text("Message-ID: <m@example.com>\r\nTo: Gone <Gone@dest.test>\r\n");
        let got = a
            .attribute("fbl@bounces.example.com", &[], &returned)
            .unwrap();
        assert_eq!(got.source, Source::MessageRecord);
        assert_eq!(got.queue_id.as_deref(), Some(QID));
        assert_eq!(got.sending_domain, "example.com");
        assert_eq!(got.recipient, "gone@dest.test");
        // A recipient the report names that the message was not sent to.
        let returned =
            Returned::from_text("Message-ID: <m@example.com>\r\nTo: stranger@dest.test\r\n");
        assert!(
            a.attribute(
                "fbl@bounces.example.com",
                &["else@dest.test".into()],
                &returned
            )
            .is_none()
        );
        // A key-bound token still comes first.
        let sender = keys
            .verp_sender(QID, "example.com", "co@dest.test", "bounces.example.com")
            .unwrap();
        let returned = Returned::from_text(&format!(
            "Return-Path: <{sender}>\r\nTo: gone@dest.test, co@dest.test\r\n"
        ));
        let got = a
            .attribute("fbl@bounces.example.com", &[], &returned)
            .unwrap();
        assert_eq!(got.source, Source::ReturnedHeaders);
        assert_eq!(got.recipient, "co@dest.test");
    }

    #[test]
    fn returned_headers_attribute_reports_sent_elsewhere() {
        let keys = keys();
        let domains = domains();
        let a = Attributor {
            keys: &keys,
            domains: &domains,
            records: &[],
        };
        let sender = keys
            .verp_sender(QID, "example.com", "rcpt@dest.test", "bounces.example.com")
            .unwrap();
        let returned = Returned::from_text(&format!(
            "Return-Path: <{sender}>\r\nTo: Rcpt <rcpt@dest.test>\r\nSubject: x\r\n"
        ));
        let got = a
            .attribute("fbl@bounces.example.com", &[], &returned)
            .unwrap();
        assert_eq!(got.source, Source::ReturnedHeaders);
        assert_eq!(got.recipient, "rcpt@dest.test");

        let url = keys.unsubscribe_url_token("example.com", "rcpt@dest.test", QID);
        let returned = Returned::from_text(&format!(
            "List-Unsubscribe: <https://u.example.com/u/{url}>,\r\n <mailto:u+x@bounces.example.com>\r\nTo: undisclosed-recipients:;\r\n"
        ));
        let got = a
            .attribute("fbl@bounces.example.com", &[], &returned)
            .unwrap();
        assert_eq!(got.source, Source::UnsubscribeHeader);
        assert_eq!(got.queue_id.as_deref(), Some(QID));
        assert_eq!(got.recipient, "rcpt@dest.test");
    }
}
