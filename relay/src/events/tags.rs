//! Tags: a small string map an app attaches to a message (HTTP `tags`,
//! SMTP header `X-Petrel-Tags: key=value, key2=value2`) and gets back in
//! every event of that message. One validation for both ways in.
//!
//! Rules: at most [`MAX_TAGS`] keys; a key is 1-64 of `A-Z a-z 0-9 _ . -`;
//! a value is printable ASCII (space to `~`), at most 256 characters. In
//! the header form values cannot contain `,` (the separator); keys and
//! values are trimmed of surrounding spaces. The header is removed from
//! the message before it is signed and delivered.

use std::collections::BTreeMap;

/// A message's tags.
pub type Tags = BTreeMap<String, String>;

/// The header SMTP clients set tags with.
pub const HEADER: &str = "X-Petrel-Tags";
/// Most tags per message.
pub const MAX_TAGS: usize = 10;
/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VALUE: usize = 256;

/// Why tags were refused; the text names the offending tag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// More than [`MAX_TAGS`] keys.
    #[error("at most {MAX_TAGS} tags are allowed, got {0}")]
    TooMany(usize),
    /// A key that is empty, too long or has other characters.
    #[error("tag key {0:?} must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadKey(String),
    /// A value that is too long or not printable ASCII.
    #[error("tag {0:?}: value must be printable ASCII, at most 256 characters")]
    BadValue(String),
    /// The same key twice in the header.
    #[error("tag {0:?} is given twice")]
    Duplicate(String),
    /// A header item without `=`.
    #[error("tag item {0:?} is not key=value")]
    Syntax(String),
}

fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= MAX_VALUE && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Checks a tag map against the rules.
pub fn validate(tags: &BTreeMap<String, String>) -> Result<(), TagError> {
    if tags.len() > MAX_TAGS {
        return Err(TagError::TooMany(tags.len()));
    }
    for (key, value) in tags {
        if !valid_key(key) {
            return Err(TagError::BadKey(key.clone()));
        }
        if !valid_value(value) {
            return Err(TagError::BadValue(key.clone()));
        }
    }
    Ok(())
}

/// Parses a header value `key=value, key2=value2` (unfolded).
pub fn parse_header(value: &str) -> Result<BTreeMap<String, String>, TagError> {
    let mut tags = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(TagError::Syntax(item.to_string()));
        };
        let (key, value) = (key.trim(), value.trim());
        if tags.insert(key.to_string(), value.to_string()).is_some() {
            return Err(TagError::Duplicate(key.to_string()));
        }
    }
    validate(&tags)?;
    Ok(tags)
}

/// The header block of `data` (up to and including the blank line), or
/// all of it when there is no body.
fn header_end(data: &[u8]) -> usize {
    let mut i = 0;
    while i < data.len() {
        let end = data[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| i + p + 1);
        let line = &data[i..end];
        if line == b"\r\n" || line == b"\n" {
            return end;
        }
        i = end;
    }
    data.len()
}

/// Whether the header section of `data` has an [`HEADER`] field, so a
/// message without one is passed on as it is, not copied by
/// [`take_header`].
pub fn carries_header(data: &[u8]) -> bool {
    let end = header_end(data);
    data[..end]
        .split(|&b| b == b'\n')
        .filter(|line| !matches!(line.first(), Some(b' ' | b'\t')))
        .any(|line| {
            line.iter().position(|&b| b == b':').is_some_and(|n| {
                line[..n]
                    .trim_ascii_end()
                    .eq_ignore_ascii_case(HEADER.as_bytes())
            })
        })
}

/// Removes every `X-Petrel-Tags` field (with its folded lines) from the
/// header of `data` and returns the message without it and the tags it
/// named (merged; a key in two fields is a [`TagError::Duplicate`]).
/// `None` when there was no such header.
pub fn take_header(data: &[u8]) -> Result<(Vec<u8>, Option<Tags>), TagError> {
    let end = header_end(data);
    let mut out = Vec::with_capacity(data.len());
    let mut values: Vec<String> = Vec::new();
    let mut in_tags = false;
    let mut i = 0;
    while i < end {
        let line_end = data[i..end]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(end, |p| i + p + 1);
        let line = &data[i..line_end];
        let folded = matches!(line.first(), Some(b' ' | b'\t'));
        if folded && in_tags {
            if let Some(v) = values.last_mut() {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(line).trim());
            }
        } else {
            in_tags = false;
            let name_end = line.iter().position(|&b| b == b':');
            let is_tags = !folded
                && name_end.is_some_and(|n| {
                    line[..n]
                        .trim_ascii_end()
                        .eq_ignore_ascii_case(HEADER.as_bytes())
                });
            match (is_tags, name_end) {
                (true, Some(n)) => {
                    in_tags = true;
                    values.push(String::from_utf8_lossy(&line[n + 1..]).trim().to_string());
                }
                _ => out.extend_from_slice(line),
            }
        }
        i = line_end;
    }
    out.extend_from_slice(&data[end..]);
    if values.is_empty() {
        return Ok((out, None));
    }
    let mut tags = BTreeMap::new();
    for value in &values {
        for (k, v) in parse_header(value)? {
            if tags.insert(k.clone(), v).is_some() {
                return Err(TagError::Duplicate(k));
            }
        }
    }
    validate(&tags)?;
    Ok((out, Some(tags)))
}

/// The `Message-ID` header's id, angle brackets removed.
pub fn header_message_id(data: &[u8]) -> Option<String> {
    let end = header_end(data);
    let headers = &data[..end];
    let mut i = 0;
    while i < headers.len() {
        let line_end = headers[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(headers.len(), |p| i + p + 1);
        let line = &headers[i..line_end];
        if let Some(n) = line.iter().position(|&b| b == b':')
            && line[..n]
                .trim_ascii_end()
                .eq_ignore_ascii_case(b"Message-ID")
        {
            // The value may be folded on to the next line.
            let mut value = String::from_utf8_lossy(&line[n + 1..]).trim().to_string();
            if value.is_empty() {
                let next_end = headers[line_end..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(headers.len(), |p| line_end + p + 1);
                value = String::from_utf8_lossy(&headers[line_end..next_end])
                    .trim()
                    .to_string();
            }
            let id = value.trim_start_matches('<');
            let id = id.split('>').next().unwrap_or(id).trim();
            return (!id.is_empty()).then(|| id.to_string());
        }
        i = line_end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn finds_the_tags_header_only_in_the_header_section() {
        let table: [(&[u8], bool); 6] = [
            (b"From: a\r\nX-Petrel-Tags: a=b\r\n\r\nbody\r\n", true),
            (b"x-petrel-tags : a=b\r\n\r\n", true),
            (
                b"From: a\r\nSubject: x\r\n\r\nX-Petrel-Tags: a=b\r\n",
                false,
            ),
            (
                b"Subject: x\r\n X-Petrel-Tags: folded into Subject\r\n\r\n",
                false,
            ),
            (b"X-Petrel-Tagsy: a=b\r\n\r\n", false),
            (b"", false),
        ];
        for (data, want) in table {
            assert_eq!(
                carries_header(data),
                want,
                "{}",
                String::from_utf8_lossy(data)
            );
            // Agrees with what take_header finds.
            if let Ok((_, found)) = take_header(data) {
                assert_eq!(found.is_some(), want, "{}", String::from_utf8_lossy(data));
            }
        }
    }

    #[test]
    fn tag_rules() {
        assert!(validate(&map(&[("order_id", "A-17"), ("a.b-c", "")])).is_ok());
        let long_key = "k".repeat(65);
        let table: Vec<(BTreeMap<String, String>, TagError)> = vec![
            (map(&[("", "x")]), TagError::BadKey("".into())),
            (map(&[("a b", "x")]), TagError::BadKey("a b".into())),
            (map(&[(&long_key, "x")]), TagError::BadKey(long_key.clone())),
            (map(&[("k", "caf\u{e9}")]), TagError::BadValue("k".into())),
            (map(&[("k", "a\tb")]), TagError::BadValue("k".into())),
            (
                map(&[("k", &"v".repeat(257))]),
                TagError::BadValue("k".into()),
            ),
        ];
        for (tags, want) in table {
            assert_eq!(validate(&tags), Err(want));
        }
        assert!(validate(&map(&[("k", &"v".repeat(256))])).is_ok());
        let eleven: BTreeMap<String, String> =
            (0..11).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(validate(&eleven), Err(TagError::TooMany(11)));
    }

    #[test]
    fn header_values_parse_and_name_the_bad_tag() {
        assert_eq!(
            parse_header(" order=17 , campaign = spring sale ,").unwrap(),
            map(&[("order", "17"), ("campaign", "spring sale")])
        );
        assert_eq!(parse_header("a=b=c").unwrap(), map(&[("a", "b=c")]));
        assert_eq!(
            parse_header("novalue"),
            Err(TagError::Syntax("novalue".into()))
        );
        assert_eq!(
            parse_header("a=1, a=2"),
            Err(TagError::Duplicate("a".into()))
        );
        assert_eq!(parse_header("b@d=1"), Err(TagError::BadKey("b@d".into())));
    }

    #[test]
    fn the_header_is_removed_with_its_folded_lines_and_only_from_the_header() {
        let msg = b"Subject: hi\r\nX-Petrel-Tags: order=17,\r\n  campaign=spring\r\nFrom: a@b\r\nx-petrel-tags : extra=1\r\n\r\nX-Petrel-Tags: body=stays\r\n";
        let (out, tags) = take_header(msg).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Subject: hi\r\nFrom: a@b\r\n\r\nX-Petrel-Tags: body=stays\r\n"
        );
        assert_eq!(
            tags.unwrap(),
            map(&[("order", "17"), ("campaign", "spring"), ("extra", "1")])
        );
        let plain = b"Subject: hi\r\n\r\nbody\r\n";
        assert_eq!(take_header(plain).unwrap(), (plain.to_vec(), None));
        assert_eq!(
            take_header(b"X-Petrel-Tags: k\r\n\r\n").unwrap_err(),
            TagError::Syntax("k".into())
        );
        assert_eq!(
            take_header(b"X-Petrel-Tags: k=1\r\nX-Petrel-Tags: k=2\r\n\r\n").unwrap_err(),
            TagError::Duplicate("k".into())
        );
    }

    #[test]
    fn message_ids_lose_their_brackets() {
        let table: [(&[u8], Option<&str>); 5] = [
            (b"Message-ID: <abc@x.test>\r\n\r\nb", Some("abc@x.test")),
            (b"message-id:<abc@x.test>\r\n\r\n", Some("abc@x.test")),
            (
                b"Message-ID:\r\n <folded@x.test>\r\n\r\n",
                Some("folded@x.test"),
            ),
            (b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n", None),
            (b"Message-ID: <>\r\n\r\n", None),
        ];
        for (msg, want) in table {
            assert_eq!(
                header_message_id(msg).as_deref(),
                want,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }
}
