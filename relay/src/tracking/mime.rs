//! Finds the HTML parts of a message, with byte ranges into the original,
//! so the rewriter can replace exactly one part's body and leave every other
//! byte (headers, boundaries, preamble, other parts) as it was.
//!
//! A walker of our own rather than a full parser's offsets: the rewriter's
//! promise is byte-identity outside the parts it touches, so it must know
//! exactly where a body starts and ends (RFC 2046 5.1.1: the CRLF before a
//! delimiter belongs to the delimiter).

use std::ops::Range;

/// Deepest multipart nesting walked; deeper parts are left alone.
pub const MAX_DEPTH: usize = 32;
/// Most parts walked in one message; beyond it the rest are left alone.
pub const MAX_PARTS: usize = 500;

/// Content-Transfer-Encoding of a part (RFC 2045 6.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEncoding {
    /// `7bit` (also when the header is absent).
    SevenBit,
    /// `8bit`.
    EightBit,
    /// `quoted-printable`.
    QuotedPrintable,
    /// `base64`.
    Base64,
    /// Anything else (`binary`, `x-uuencode`, ...): not rewritten.
    Other(String),
}

/// A `text/html` leaf part, not an attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HtmlPart {
    /// The encoded body in the message, without the CRLF of the next
    /// boundary delimiter.
    pub body: Range<usize>,
    /// Its transfer encoding.
    pub encoding: TransferEncoding,
    /// The `charset` parameter, lower-cased; `None` when absent.
    pub charset: Option<String>,
}

/// The parsed `Content-Type` of a part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentType {
    /// Type, lower-cased (`text`).
    pub kind: String,
    /// Subtype, lower-cased (`html`).
    pub subtype: String,
    /// Parameters, names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl ContentType {
    /// The value of parameter `name` (lower-case).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why the message's structure cannot be walked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MimeError {
    /// The message has no header section.
    #[error("no header section")]
    NoHeaders,
}

/// The `text/html` parts of `message`, in order. Parts inside attached
/// messages (`message/rfc822`) are not walked: they are someone else's mail.
pub fn html_parts(message: &[u8]) -> Result<Vec<HtmlPart>, MimeError> {
    let (headers, body) = split_entity(message, 0..message.len());
    if headers.is_empty() {
        return Err(MimeError::NoHeaders);
    }
    let mut out = Vec::new();
    let mut budget = MAX_PARTS;
    walk(message, headers, body, false, 0, &mut budget, &mut out);
    Ok(out)
}

fn walk(
    msg: &[u8],
    headers: Range<usize>,
    body: Range<usize>,
    in_digest: bool,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<HtmlPart>,
) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    let fields = &msg[headers];
    let content_type = header_value(fields, "content-type").and_then(|v| parse_content_type(&v));
    let Some(ct) = content_type else {
        // Default text/plain (or message/rfc822 in a digest): never touched.
        let _ = in_digest;
        return;
    };
    if ct.kind == "multipart" {
        if depth >= MAX_DEPTH {
            return;
        }
        let Some(boundary) = ct.param("boundary").filter(|b| valid_boundary(b)) else {
            return;
        };
        let digest = ct.subtype == "digest";
        for part in split_multipart(msg, body, boundary.as_bytes()) {
            let (h, b) = split_entity(msg, part);
            walk(msg, h, b, digest, depth + 1, budget, out);
        }
        return;
    }
    if ct.kind != "text" || ct.subtype != "html" {
        return;
    }
    if header_value(fields, "content-disposition")
        .is_some_and(|d| d.trim().to_ascii_lowercase().starts_with("attachment"))
    {
        return;
    }
    let encoding = match header_value(fields, "content-transfer-encoding")
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("7bit") | Some("") => TransferEncoding::SevenBit,
        Some("8bit") => TransferEncoding::EightBit,
        Some("quoted-printable") => TransferEncoding::QuotedPrintable,
        Some("base64") => TransferEncoding::Base64,
        Some(other) => TransferEncoding::Other(other.to_string()),
    };
    out.push(HtmlPart {
        body,
        encoding,
        charset: ct.param("charset").map(|c| c.to_ascii_lowercase()),
    });
}

/// Splits an entity into its header section (up to and including the last
/// header line's CRLF) and its body (after the empty line).
pub fn split_entity(msg: &[u8], range: Range<usize>) -> (Range<usize>, Range<usize>) {
    let data = &msg[range.clone()];
    if data.starts_with(b"\r\n") {
        return (range.start..range.start, range.start + 2..range.end);
    }
    match find(data, b"\r\n\r\n") {
        Some(i) => (
            range.start..range.start + i + 2,
            range.start + i + 4..range.end,
        ),
        // Headers only, no body.
        None => (range.clone(), range.end..range.end),
    }
}

/// The bodies of a multipart's parts (between delimiters), in order.
/// Preamble and epilogue are not parts. A missing close delimiter ends the
/// last part at the end of the body.
pub fn split_multipart(msg: &[u8], body: Range<usize>, boundary: &[u8]) -> Vec<Range<usize>> {
    let data = &msg[body.clone()];
    let mut parts = Vec::new();
    // Position after the current delimiter line, when inside a part.
    let mut open: Option<usize> = None;
    let mut line_start = 0;
    while line_start <= data.len() {
        let line_end = find(&data[line_start..], b"\r\n").map(|i| line_start + i);
        let line = &data[line_start..line_end.unwrap_or(data.len())];
        if let Some(close) = delimiter(line, boundary) {
            if let Some(start) = open.take() {
                // The CRLF before the delimiter belongs to it.
                let end = line_start.saturating_sub(2).max(start);
                parts.push(body.start + start..body.start + end);
            }
            if close {
                return parts;
            }
            open = Some(line_end.map_or(data.len(), |e| e + 2));
        }
        match line_end {
            Some(e) => line_start = e + 2,
            None => break,
        }
    }
    if let Some(start) = open {
        parts.push(body.start + start.min(data.len())..body.end);
    }
    parts
}

/// `Some(is_close)` when `line` is a delimiter of `boundary` (RFC 2046:
/// `--boundary` or `--boundary--`, then optional linear white space).
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let (close, rest) = match rest.strip_prefix(b"--") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    rest.iter()
        .all(|&b| b == b' ' || b == b'\t')
        .then_some(close)
}

fn valid_boundary(b: &str) -> bool {
    (1..=70).contains(&b.len()) && !b.contains(['\r', '\n'])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The unfolded value of the first header field `name` (lower-case).
pub fn header_value(headers: &[u8], name: &str) -> Option<String> {
    let mut value: Option<Vec<u8>> = None;
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = value.as_mut() {
            if matches!(line.first(), Some(b' ' | b'\t')) {
                v.push(b' ');
                v.extend_from_slice(line);
                continue;
            }
            break;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_bytes())
        {
            value = Some(line[colon + 1..].to_vec());
        }
    }
    value.map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Parses `type/subtype; name=value; name="quoted value"`. Comments and
/// RFC 2231 continuations are not understood (such parameters are dropped).
pub fn parse_content_type(value: &str) -> Option<ContentType> {
    let mut rest = value.trim_start();
    let end = rest.find([';', ' ', '\t', '(']).unwrap_or(rest.len());
    let (mime, tail) = rest.split_at(end);
    let (kind, subtype) = mime.split_once('/')?;
    if kind.is_empty() || subtype.is_empty() {
        return None;
    }
    let mut ct = ContentType {
        kind: kind.to_ascii_lowercase(),
        subtype: subtype.to_ascii_lowercase(),
        params: Vec::new(),
    };
    rest = tail;
    while let Some(i) = rest.find(';') {
        rest = rest[i + 1..].trim_start();
        let Some(eq) = rest.find('=') else { break };
        let name = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut consumed = quoted.len();
            while let Some((j, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        consumed = j + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            rest = &quoted[consumed..];
            v
        } else {
            let end = rest.find([';', ' ', '\t']).unwrap_or(rest.len());
            let v = rest[..end].to_string();
            rest = &rest[end..];
            v
        };
        if !name.is_empty() && !name.contains('*') {
            ct.params.push((name, value));
        }
    }
    Some(ct)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Want = Option<(
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    )>;

    #[test]
    fn content_types() {
        let table: &[(&str, Want)] = &[
            ("text/html", Some(("text", "html", &[]))),
            (
                " Text/HTML; charset=\"ISO-8859-1\"",
                Some(("text", "html", &[("charset", "ISO-8859-1")])),
            ),
            (
                "multipart/alternative;\r\n boundary=\"a b\\\"c\"; x=1",
                Some((
                    "multipart",
                    "alternative",
                    &[("boundary", "a b\"c"), ("x", "1")],
                )),
            ),
            (
                "multipart/mixed; boundary=abc;charset=utf-8",
                Some((
                    "multipart",
                    "mixed",
                    &[("boundary", "abc"), ("charset", "utf-8")],
                )),
            ),
            (
                "text/html; title*=us-ascii'en'x",
                Some(("text", "html", &[])),
            ),
            ("texthtml", None),
            ("/html", None),
            ("", None),
        ];
        for (input, want) in table {
            let got = parse_content_type(input);
            let want = want.map(|(k, s, p)| ContentType {
                kind: k.into(),
                subtype: s.into(),
                params: p
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            });
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn header_values_unfold_and_match_case_insensitively() {
        let h = b"Subject: x\r\ncontent-TYPE: multipart/mixed;\r\n\tboundary=b\r\nX: y\r\n";
        assert_eq!(
            header_value(h, "content-type").as_deref(),
            Some(" multipart/mixed; \tboundary=b")
        );
        assert_eq!(header_value(h, "content-disposition"), None);
    }

    #[test]
    fn multipart_bodies_exclude_the_delimiter_crlf() {
        let msg = b"pre\r\n--b\r\nA: 1\r\n\r\none\r\n--b  \r\n\r\ntwo\r\n--b--\r\nepilogue";
        let parts = split_multipart(msg, 0..msg.len(), b"b");
        let got: Vec<&[u8]> = parts.iter().map(|r| &msg[r.clone()]).collect();
        assert_eq!(got, vec![&b"A: 1\r\n\r\none"[..], &b"\r\ntwo"[..]]);
        // `--bb` is not a delimiter of `b`; a missing close ends at the body end.
        let msg = b"--b\r\nx\r\n--bb\r\ny";
        let parts = split_multipart(msg, 0..msg.len(), b"b");
        assert_eq!(parts, vec![5..msg.len()]);
    }

    #[test]
    fn finds_html_leaves_only() {
        let msg = b"Content-Type: multipart/mixed; boundary=o\r\n\r\n\
--o\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n\
--i\r\nContent-Type: text/plain\r\n\r\nplain\r\n\
--i\r\nContent-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>x</p>\r\n\
--i--\r\n\
--o\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=a.html\r\n\r\n<p>att</p>\r\n\
--o\r\nContent-Type: message/rfc822\r\n\r\nContent-Type: text/html\r\n\r\n<p>inner</p>\r\n\
--o--\r\n";
        let parts = html_parts(msg).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(&msg[parts[0].body.clone()], b"<p>x</p>");
        assert_eq!(parts[0].encoding, TransferEncoding::QuotedPrintable);
        assert_eq!(parts[0].charset.as_deref(), Some("utf-8"));

        let single = b"Subject: x\r\nContent-Type: text/html\r\n\r\n<p>y</p>\r\n";
        let parts = html_parts(single).unwrap();
        assert_eq!(&single[parts[0].body.clone()], b"<p>y</p>\r\n");
        assert_eq!(parts[0].encoding, TransferEncoding::SevenBit);
        assert!(
            html_parts(b"Subject: x\r\n\r\n<p>text/plain</p>")
                .unwrap()
                .is_empty()
        );
        assert_eq!(html_parts(b"\r\nbody"), Err(MimeError::NoHeaders));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let mut msg = Vec::new();
        for i in 0..(MAX_DEPTH + 10) {
            msg.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=x{i}\r\n\r\n--x{i}\r\n")
                    .as_bytes(),
            );
        }
        msg.extend_from_slice(b"Content-Type: text/html\r\n\r\n<a href=\"http://a.b\">x</a>");
        assert!(html_parts(&msg).unwrap().is_empty());
    }
}
