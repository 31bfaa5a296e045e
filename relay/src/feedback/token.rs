//! Feedback tokens, sealed with HMAC-SHA256 under the [`FeedbackKeys`].
//!
//! - VERP (`b+<token>@<returnPathDomain>`): the queue id and an HMAC over
//!   queue id and recipient. A local part has at most 64 octets
//!   (RFC 5321 4.5.3.1.1) and MTAs may change its case, so the token is
//!   lower-case base32 (decoded case-insensitively) of
//!   `version|format(1) queue-id mac(10)`; the recipient is not carried
//!   (it would not fit) but comes from the DSN (`Final-Recipient`,
//!   `Original-Recipient`) and must match the MAC. Queue ids of 32
//!   lower-case hex digits (the relay's own) are packed into 16 bytes.
//! - Unsubscribe URL (`/u/<token>`): URL-safe base64 of
//!   `version(1) domain recipient queue-id` (each with a 2-byte length)
//!   and a 16-byte MAC.
//! - Unsubscribe mailto (`u+<token>@<returnPathDomain>`): base32 of
//!   `version(1) mac(15)` over sending domain and recipient. It carries
//!   neither (they would not fit in a local part): the recipient is the
//!   sender of the unsubscribe mail, the domain is found by trying each
//!   configured sending domain.
//!
//! A token that does not decode, has an unknown version or a MAC that does
//! not verify is refused as a whole.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::key::FeedbackKeys;
use crate::tracking::TokenError;

const VERP_VERSION: u8 = 0x10;
/// Format nibble: the queue id starts with 32 hex digits, packed.
const QID_HEX: u8 = 0;
/// Format nibble: the queue id is carried as it is.
const QID_RAW: u8 = 1;
const VERP_MAC: usize = 10;
/// Longest VERP token in bytes before base32: `b+` and 61 characters fit
/// the 64 octets of a local part.
const VERP_MAX_BYTES: usize = 38;
const URL_VERSION: u8 = 1;
const URL_MAC: usize = 16;
const MAILTO_VERSION: u8 = 1;
const MAILTO_MAC: usize = 15;

/// Local-part prefix of a VERP address.
pub const VERP_PREFIX: &str = "b+";
/// Local-part prefix of a mailto unsubscribe address.
pub const MAILTO_PREFIX: &str = "u+";

/// Who unsubscribes from what, as a valid unsubscribe token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubscribeClaims {
    /// The sending domain the recipient no longer wants mail from.
    pub sending_domain: String,
    /// The recipient, lower-cased.
    pub recipient: String,
    /// The message the link came in (URL tokens only; the mailto form has
    /// no room for it).
    pub queue_id: Option<String>,
}

/// What a valid VERP token says, once matched with a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerpClaims {
    /// Queue id of the message that bounced.
    pub queue_id: String,
    /// The sending domain of the message, lower-cased.
    pub sending_domain: String,
    /// The recipient it bounced for, lower-cased.
    pub recipient: String,
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Lower-case RFC 4648 base32 without padding.
fn base32(data: &[u8]) -> String {
    let mut out = String::with_capacity((data.len() * 8).div_ceil(5));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(BASE32[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes [`base32`], ignoring case; `None` on any other character or a
/// length no encoding produces.
fn unbase32(text: &str) -> Option<Vec<u8>> {
    if matches!(text.len() % 8, 1 | 3 | 6) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c.to_ascii_lowercase() {
            c @ b'a'..=b'z' => c - b'a',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    // Left-over bits must be the zero padding of a canonical encoding.
    (acc == 0).then_some(out)
}

fn is_hex32(s: &str) -> bool {
    s.len() >= 32
        && s.as_bytes()[..32]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

fn pack_queue_id(queue_id: &str) -> (u8, Vec<u8>) {
    if is_hex32(queue_id) {
        let mut out: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&queue_id[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        out.extend_from_slice(&queue_id.as_bytes()[32..]);
        (QID_HEX, out)
    } else {
        (QID_RAW, queue_id.as_bytes().to_vec())
    }
}

fn unpack_queue_id(format: u8, bytes: &[u8]) -> Option<String> {
    match format {
        QID_HEX if bytes.len() >= 16 => {
            let mut id: String = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
            id.push_str(std::str::from_utf8(&bytes[16..]).ok()?);
            Some(id)
        }
        QID_RAW => String::from_utf8(bytes.to_vec()).ok(),
        _ => None,
    }
}

fn verp_mac_input(head: &[u8], sending_domain: &str, recipient: &str) -> Vec<u8> {
    let mut data = head.to_vec();
    data.push(0);
    data.extend_from_slice(sending_domain.trim().to_ascii_lowercase().as_bytes());
    data.push(0);
    data.extend_from_slice(recipient.trim().to_lowercase().as_bytes());
    data
}

fn mailto_mac_input(sending_domain: &str, recipient: &str) -> Vec<u8> {
    let mut data = vec![MAILTO_VERSION];
    data.extend_from_slice(sending_domain.trim().to_ascii_lowercase().as_bytes());
    data.push(0);
    data.extend_from_slice(recipient.trim().to_lowercase().as_bytes());
    data
}

fn push_field(raw: &mut Vec<u8>, field: &str) {
    let bytes = field.as_bytes();
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    raw.extend_from_slice(&len.to_be_bytes());
    raw.extend_from_slice(&bytes[..usize::from(len)]);
}

fn take_field(rest: &mut &[u8]) -> Option<String> {
    if rest.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let body = rest.get(2..2 + len)?;
    *rest = &rest[2 + len..];
    String::from_utf8(body.to_vec()).ok()
}

impl FeedbackKeys {
    /// The VERP token (without `b+`) of the message `queue_id` from
    /// `sending_domain` to `recipient`. [`TokenError::TooLong`] when the
    /// queue id does not fit in a local part (the relay's own ids always do).
    pub fn verp_token(
        &self,
        queue_id: &str,
        sending_domain: &str,
        recipient: &str,
    ) -> Result<String, TokenError> {
        let (format, packed) = pack_queue_id(queue_id);
        let mut raw = Vec::with_capacity(VERP_MAX_BYTES);
        raw.push(VERP_VERSION | format);
        raw.extend_from_slice(&packed);
        if raw.len() + VERP_MAC > VERP_MAX_BYTES {
            return Err(TokenError::TooLong("queue id"));
        }
        let mac = self
            .verp
            .sign(&verp_mac_input(&raw, sending_domain, recipient));
        raw.extend_from_slice(&mac.as_ref()[..VERP_MAC]);
        Ok(base32(&raw))
    }

    /// The VERP envelope sender `b+<token>@<return_path_domain>`.
    pub fn verp_sender(
        &self,
        queue_id: &str,
        sending_domain: &str,
        recipient: &str,
        return_path_domain: &str,
    ) -> Result<String, TokenError> {
        Ok(format!(
            "{VERP_PREFIX}{}@{}",
            self.verp_token(queue_id, sending_domain, recipient)?,
            return_path_domain.to_ascii_lowercase()
        ))
    }

    /// What a VERP token (without `b+`) names, once its MAC is checked
    /// against the first pair of one of `recipients` (from the report) and
    /// one of `sending_domains` (those using the return-path domain) it
    /// was sealed for. [`TokenError::Invalid`] when it is not ours or
    /// names none of them.
    pub fn open_verp(
        &self,
        token: &str,
        recipients: &[&str],
        sending_domains: &[&str],
    ) -> Result<VerpClaims, TokenError> {
        if token.len() > 62 {
            return Err(TokenError::Invalid);
        }
        let raw = unbase32(token).ok_or(TokenError::Invalid)?;
        if raw.len() < 1 + VERP_MAC + 1 || raw[0] & 0xf0 != VERP_VERSION {
            return Err(TokenError::Invalid);
        }
        let (head, mac) = raw.split_at(raw.len() - VERP_MAC);
        for recipient in recipients {
            for domain in sending_domains {
                if self
                    .verp
                    .verify_truncated(&verp_mac_input(head, domain, recipient), mac)
                {
                    let queue_id =
                        unpack_queue_id(head[0] & 0x0f, &head[1..]).ok_or(TokenError::Invalid)?;
                    return Ok(VerpClaims {
                        queue_id,
                        sending_domain: domain.trim().to_ascii_lowercase(),
                        recipient: recipient.trim().to_lowercase(),
                    });
                }
            }
        }
        Err(TokenError::Invalid)
    }

    /// The token of the one-click URL `<baseUrl>/u/<token>`: URL-safe,
    /// naming the sending domain, the recipient and the message.
    pub fn unsubscribe_url_token(
        &self,
        sending_domain: &str,
        recipient: &str,
        queue_id: &str,
    ) -> String {
        let mut raw = vec![URL_VERSION];
        push_field(&mut raw, &sending_domain.trim().to_ascii_lowercase());
        push_field(&mut raw, &recipient.trim().to_lowercase());
        push_field(&mut raw, queue_id);
        let mac = self.unsubscribe.sign(&raw);
        raw.extend_from_slice(&mac.as_ref()[..URL_MAC]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Opens a one-click URL token, refusing anything not sealed by this
    /// key.
    pub fn open_unsubscribe(&self, token: &str) -> Result<UnsubscribeClaims, TokenError> {
        if token.len() > 2048 {
            return Err(TokenError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() < 1 + 6 + URL_MAC || raw[0] != URL_VERSION {
            return Err(TokenError::Invalid);
        }
        let (body, mac) = raw.split_at(raw.len() - URL_MAC);
        if !self.unsubscribe.verify_truncated(body, mac) {
            return Err(TokenError::Invalid);
        }
        let mut rest = &body[1..];
        let sending_domain = take_field(&mut rest).ok_or(TokenError::Invalid)?;
        let recipient = take_field(&mut rest).ok_or(TokenError::Invalid)?;
        let queue_id = take_field(&mut rest).ok_or(TokenError::Invalid)?;
        if !rest.is_empty() || sending_domain.is_empty() || recipient.is_empty() {
            return Err(TokenError::Invalid);
        }
        Ok(UnsubscribeClaims {
            sending_domain,
            recipient,
            queue_id: (!queue_id.is_empty()).then_some(queue_id),
        })
    }

    /// The local part `u+<token>` of the mailto unsubscribe address
    /// (`u+<token>@<returnPathDomain>`) of `recipient` at `sending_domain`.
    pub fn unsubscribe_mailto_local(&self, sending_domain: &str, recipient: &str) -> String {
        let mac = self
            .mailto
            .sign(&mailto_mac_input(sending_domain, recipient));
        let mut raw = vec![MAILTO_VERSION];
        raw.extend_from_slice(&mac.as_ref()[..MAILTO_MAC]);
        format!("{MAILTO_PREFIX}{}", base32(&raw))
    }

    /// Opens a mailto token (without `u+`): the first pair of one of
    /// `recipients` (who sent the unsubscribe mail) and one of
    /// `sending_domains` (the configured ones) it was sealed for.
    pub fn open_unsubscribe_mailto<'a>(
        &self,
        token: &str,
        recipients: &[&'a str],
        sending_domains: &[&'a str],
    ) -> Result<UnsubscribeClaims, TokenError> {
        if token.len() > 62 {
            return Err(TokenError::Invalid);
        }
        let raw = unbase32(token).ok_or(TokenError::Invalid)?;
        if raw.len() != 1 + MAILTO_MAC || raw[0] != MAILTO_VERSION {
            return Err(TokenError::Invalid);
        }
        for recipient in recipients {
            for domain in sending_domains {
                if self
                    .mailto
                    .verify_truncated(&mailto_mac_input(domain, recipient), &raw[1..])
                {
                    return Ok(UnsubscribeClaims {
                        sending_domain: domain.trim().to_ascii_lowercase(),
                        recipient: recipient.trim().to_lowercase(),
                        queue_id: None,
                    });
                }
            }
        }
        Err(TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> FeedbackKeys {
        FeedbackKeys::from_secret(&[7u8; 32])
    }

    #[test]
    fn base32_round_trips_and_ignores_case() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base32(&data);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
            );
            assert_eq!(unbase32(&text).unwrap(), data);
            assert_eq!(unbase32(&text.to_ascii_uppercase()).unwrap(), data);
        }
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert!(unbase32("mzxw6ytbo1").is_none());
        assert!(unbase32("a").is_none());
    }

    #[test]
    fn verp_senders_fit_a_local_part_and_survive_case_folding() {
        let qid = "0123456789abcdef0123456789abcdef";
        let table = [
            (qid.to_string(), "Rcpt@Dest.example"),
            (format!("{qid}-12"), "a@b.c"),
            ("dsn-77".to_string(), "x@y.z"),
            ("q".repeat(27), "x@y.z"),
        ];
        for (queue_id, rcpt) in table {
            let sender = keys()
                .verp_sender(&queue_id, "example.com", rcpt, "Bounces.Example.com")
                .unwrap();
            let (local, domain) = sender.split_once('@').unwrap();
            assert!(local.len() <= 64, "{sender}");
            assert_eq!(domain, "bounces.example.com");
            let token = local.strip_prefix(VERP_PREFIX).unwrap();
            for seen in [token.to_string(), token.to_ascii_uppercase()] {
                let claims = keys()
                    .open_verp(
                        &seen,
                        &["other@x.test", &rcpt.to_uppercase()],
                        &["other.test", "Example.COM"],
                    )
                    .unwrap();
                assert_eq!(claims.queue_id, queue_id);
                assert_eq!(claims.sending_domain, "example.com");
                assert_eq!(claims.recipient, rcpt.to_lowercase());
            }
        }
        assert!(matches!(
            keys().verp_token(&"q".repeat(28), "e.test", "a@b"),
            Err(TokenError::TooLong(_))
        ));
    }

    #[test]
    fn verp_tokens_refuse_forgery() {
        let qid = "0123456789abcdef0123456789abcdef";
        let good = keys().verp_token(qid, "e.test", "a@x.test").unwrap();
        let other = FeedbackKeys::from_secret(&[8u8; 32])
            .verp_token(qid, "e.test", "a@x.test")
            .unwrap();
        assert!(keys().open_verp(&good, &["a@x.test"], &["e.test"]).is_ok());
        assert!(
            keys()
                .open_verp(&good, &["a@x.test"], &["other.test"])
                .is_err(),
            "bound to its sending domain"
        );
        let mut flipped = good.clone().into_bytes();
        flipped[5] = if flipped[5] == b'a' { b'b' } else { b'a' };
        let table = [
            ("other key", other, "a@x.test"),
            ("other recipient", good.clone(), "b@x.test"),
            ("flipped", String::from_utf8(flipped).unwrap(), "a@x.test"),
            ("truncated", good[..good.len() - 2].to_string(), "a@x.test"),
            ("not base32", "0189!!".repeat(5), "a@x.test"),
            ("empty", String::new(), "a@x.test"),
            ("too long", "a".repeat(80), "a@x.test"),
        ];
        for (name, token, rcpt) in table {
            assert!(
                keys().open_verp(&token, &[rcpt], &["e.test"]).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn unsubscribe_url_tokens_round_trip_and_refuse_forgery() {
        let token = keys().unsubscribe_url_token("Example.com", "A@x.test", "q1");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            keys().open_unsubscribe(&token).unwrap(),
            UnsubscribeClaims {
                sending_domain: "example.com".into(),
                recipient: "a@x.test".into(),
                queue_id: Some("q1".into()),
            }
        );
        let other =
            FeedbackKeys::from_secret(&[8u8; 32]).unsubscribe_url_token("e.test", "a@x", "q");
        let mut flipped = token.clone().into_bytes();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        for bad in [
            other,
            String::from_utf8(flipped).unwrap(),
            token[..token.len() - 1].to_string(),
            String::new(),
            "!!".into(),
        ] {
            assert!(keys().open_unsubscribe(&bad).is_err(), "{bad}");
        }
        // A VERP token is not an unsubscribe token.
        let verp = keys().verp_token("q1", "e.test", "a@x.test").unwrap();
        assert!(keys().open_unsubscribe(&verp).is_err());
    }

    #[test]
    fn mailto_tokens_need_the_right_sender_and_domain() {
        let local = keys().unsubscribe_mailto_local("example.com", "a@x.test");
        assert!(local.len() <= 64);
        let token = local.strip_prefix(MAILTO_PREFIX).unwrap();
        let claims = keys()
            .open_unsubscribe_mailto(
                &token.to_ascii_uppercase(),
                &["A@X.test"],
                &["other.test", "Example.com"],
            )
            .unwrap();
        assert_eq!(claims.sending_domain, "example.com");
        assert_eq!(claims.recipient, "a@x.test");
        assert!(
            keys()
                .open_unsubscribe_mailto(token, &["b@x.test"], &["example.com"])
                .is_err()
        );
        assert!(
            keys()
                .open_unsubscribe_mailto(token, &["a@x.test"], &["other.test"])
                .is_err()
        );
    }
}
