//! Header fixes applied to every accepted message before signing: a
//! Received trace header, and Message-ID and Date when the client left them
//! out (RFC 6409 8.2, 8.3). Pure functions over bytes.

use std::net::IpAddr;

/// Connection facts that go into the Received header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceInfo<'a> {
    /// What the client said in EHLO/HELO.
    pub helo: &'a str,
    /// The client's address.
    pub ip: IpAddr,
    /// Our host name.
    pub hostname: &'a str,
    /// RFC 3848 protocol: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA.
    pub protocol: &'static str,
    /// TLS version and cipher suite, when TLS was used.
    pub tls: Option<(&'a str, &'a str)>,
    /// Queue id.
    pub id: &'a str,
    /// RFC 5322 date of receipt.
    pub date: &'a str,
}

/// RFC 3848 `with` keyword.
pub fn protocol(esmtp: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp, tls, auth) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    }
}

/// Keeps a client-supplied token safe for a header: printable, no
/// parentheses that would break the comment, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !matches!(c, '(' | ')' | '\\'))
        .take(255)
        .collect()
}

/// The Received header, folded, CRLF terminated.
pub fn received(t: &TraceInfo<'_>) -> String {
    let literal = match t.ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    };
    let tls = match t.tls {
        Some((version, cipher)) => format!("\r\n\t(using {version} with cipher {cipher})"),
        None => String::new(),
    };
    format!(
        "Received: from {} ({literal})\r\n\tby {} (Petrel) with {}{tls}\r\n\tid {};\r\n\t{}\r\n",
        sanitize(t.helo),
        t.hostname,
        t.protocol,
        t.id,
        t.date
    )
}

/// Turns bare LF and bare CR line ends into CRLF (clients and BDAT may
/// send them); queued messages always use CRLF. Bare CR matters as much
/// as bare LF: a stored `<CR>.<CR>` would leave the outbound side
/// un-stuffed, and a next hop that treats a lone CR as a line end would
/// see the end of DATA there (SMTP smuggling).
pub fn normalize_crlf(data: Vec<u8>) -> Vec<u8> {
    let bare_lf = |i: usize| data[i] == b'\n' && (i == 0 || data[i - 1] != b'\r');
    let bare_cr = |i: usize| data[i] == b'\r' && data.get(i + 1) != Some(&b'\n');
    let bare = (0..data.len())
        .filter(|&i| bare_lf(i) || bare_cr(i))
        .count();
    if bare == 0 {
        return data;
    }
    let mut out = Vec::with_capacity(data.len() + bare);
    for (i, &b) in data.iter().enumerate() {
        if bare_lf(i) || bare_cr(i) {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
    }
    out
}

/// Length of the header section, up to and including the CRLF of the last
/// header line (the empty line is not included). Zero when the message
/// does not start with a header.
pub fn header_len(data: &[u8]) -> usize {
    let mut pos = 0;
    while pos < data.len() {
        let end = match data[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(e) => pos + e + 2,
            None => data.len(),
        };
        let line = &data[pos..end];
        if line == b"\r\n" {
            return pos;
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        let is_field = line
            .iter()
            .position(|&b| b == b':')
            .is_some_and(|colon| colon > 0 && line[..colon].iter().all(|&b| b.is_ascii_graphic()));
        if !(is_field || (continuation && pos > 0)) {
            return pos;
        }
        pos = end;
    }
    pos
}

/// True when the header section holds a field named `name`.
pub fn has_header(headers: &[u8], name: &str) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            && line[name.len()..]
                .iter()
                .find(|&&b| b != b' ' && b != b'\t')
                == Some(&b':')
    })
}

/// True when the header section says `TLS-Required: No` (RFC 8689
/// section 5; the value is case-insensitive, surrounding space ignored).
pub fn tls_required_no(headers: &[u8]) -> bool {
    crate::tracking::mime::header_value(headers, "tls-required")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("no"))
}

/// The message as queued (before DKIM): Received first, then the client's
/// headers, Message-ID and Date added when missing, then the body.
pub fn prepare(data: Vec<u8>, trace: &TraceInfo<'_>) -> Vec<u8> {
    let data = normalize_crlf(data);
    let hlen = header_len(&data);
    let (headers, rest) = data.split_at(hlen);
    let mut out = Vec::with_capacity(data.len() + 512);
    out.extend_from_slice(received(trace).as_bytes());
    out.extend_from_slice(headers);
    if !has_header(headers, "Message-ID") {
        out.extend_from_slice(
            format!("Message-ID: <{}@{}>\r\n", trace.id, trace.hostname).as_bytes(),
        );
    }
    if !has_header(headers, "Date") {
        out.extend_from_slice(format!("Date: {}\r\n", trace.date).as_bytes());
    }
    if !rest.starts_with(b"\r\n") {
        // No header/body separator: what followed the headers is body.
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> TraceInfo<'static> {
        TraceInfo {
            helo: "client.example (evil)\r\nX: y",
            ip: "192.0.2.7".parse().unwrap(),
            hostname: "relay.test",
            protocol: "ESMTPS",
            tls: Some(("TLSv1.3", "TLS13_AES_128_GCM_SHA256")),
            id: "abc123",
            date: "Mon, 23 Nov 2026 13:00:00 +0000",
        }
    }

    #[test]
    fn header_sections() {
        let table: &[(&[u8], usize)] = &[
            (b"Subject: a\r\n\r\nbody\r\n", 12),
            (b"Subject: a\r\n b\r\nTo: x\r\n\r\nbody", 23),
            (b"Subject: a\r\n", 12),
            (b"just a body\r\n", 0),
            (b"\r\nbody", 0),
            (b" folded first\r\n\r\n", 0),
        ];
        for (data, want) in table {
            assert_eq!(
                header_len(data),
                *want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn tls_required_no_is_read_from_the_header_section() {
        let table: &[(&[u8], bool)] = &[
            (b"TLS-Required: No\r\n", true),
            (b"tls-required:no  \r\n", true),
            (b"Subject: x\r\nTLS-Required:\r\n No\r\n", true),
            (b"TLS-Required: Yes\r\n", false),
            (b"TLS-Required: Nope\r\n", false),
            (b"X-TLS-Required: No\r\n", false),
            (b"Subject: TLS-Required: No\r\n", false),
        ];
        for (h, want) in table {
            assert_eq!(tls_required_no(h), *want, "{}", String::from_utf8_lossy(h));
        }
    }

    #[test]
    fn finds_headers_case_insensitively() {
        let h = b"message-id: <x@y>\r\nDate : now\r\nX-Date-Foo: 1\r\n";
        assert!(has_header(h, "Message-ID"));
        assert!(has_header(h, "Date"));
        assert!(!has_header(h, "Subject"));
        assert!(!has_header(b"X-Date-Foo: 1\r\n", "Date"));
    }

    #[test]
    fn adds_missing_headers_only() {
        let out = prepare(b"Subject: hi\nFrom: a@b\n\nbody\n".to_vec(), &trace());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("Received: from client.example evilX: y ([192.0.2.7])\r\n\tby relay.test (Petrel) with ESMTPS\r\n\t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)\r\n\tid abc123;\r\n\tMon, 23 Nov 2026 13:00:00 +0000\r\n"), "{text}");
        assert!(text.contains("Subject: hi\r\nFrom: a@b\r\nMessage-ID: <abc123@relay.test>\r\nDate: Mon, 23 Nov 2026 13:00:00 +0000\r\n\r\nbody\r\n"), "{text}");

        let kept = prepare(
            b"Date: x\r\nMessage-ID: <m@c>\r\n\r\nb\r\n".to_vec(),
            &trace(),
        );
        let text = String::from_utf8(kept).unwrap();
        assert_eq!(text.matches("Message-ID").count(), 1);
        assert_eq!(text.matches("Date:").count(), 1);

        let bodyonly = String::from_utf8(prepare(b"hello\r\n".to_vec(), &trace())).unwrap();
        assert!(bodyonly.ends_with("+0000\r\n\r\nhello\r\n"), "{bodyonly}");
    }

    #[test]
    fn line_ends_become_crlf() {
        let table: &[(&[u8], &[u8])] = &[
            (b"a\r\nb\r\n", b"a\r\nb\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"\n.\n", b"\r\n.\r\n"),
            (b"a\r.\rb", b"a\r\n.\r\nb"),
            (b"a\r", b"a\r\n"),
            (b"\r\r\n", b"\r\n\r\n"),
            (b"\n\r", b"\r\n\r\n"),
        ];
        for (input, want) in table {
            assert_eq!(
                normalize_crlf(input.to_vec()),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol(false, true, true), "SMTP");
        assert_eq!(protocol(true, false, false), "ESMTP");
        assert_eq!(protocol(true, true, true), "ESMTPSA");
    }
}
