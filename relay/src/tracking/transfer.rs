//! Content-Transfer-Encoding codecs for the rewriter: decode a part's body,
//! and encode it again with legal lines (RFC 2045: quoted-printable and
//! base64 lines at most 76 characters; RFC 5322: any line at most 998).

use base64::Engine;

/// Longest encoded line of quoted-printable and base64 (RFC 2045).
pub const MAX_ENCODED_LINE: usize = 76;
/// Longest line of a 7bit/8bit body, CRLF excluded (RFC 5322 2.1.1).
pub const MAX_LINE: usize = 998;

/// Decodes quoted-printable. Malformed `=` sequences are kept as they are
/// (RFC 2045 6.7 note 1), so decoding never fails.
pub fn decode_qp(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        // Soft line break: `=`, optional trailing white space, CRLF (or end).
        let mut j = i + 1;
        while j < input.len() && matches!(input[j], b' ' | b'\t') {
            j += 1;
        }
        if input[j..].starts_with(b"\r\n") {
            i = j + 2;
            continue;
        }
        if j == input.len() {
            i = j;
            continue;
        }
        match (
            input.get(i + 1).and_then(|&c| hex(c)),
            input.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            _ => {
                out.push(b'=');
                i += 1;
            }
        }
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Encodes quoted-printable: CRLF in the data stays a hard line break,
/// every encoded line is at most 76 characters, trailing white space and
/// a leading `.` or `From ` are encoded so no transport can alter them, and
/// a leading `-` too, so no line can be taken for a boundary delimiter.
pub fn encode_qp(data: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(data.len() + data.len() / 8);
    let lines: Vec<&[u8]> = split_crlf(data);
    for (n, line) in lines.iter().enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let mut col = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal = |col: usize| match b {
                b'=' => false,
                b' ' | b'\t' => !last,
                // A line starting `--` could read as a MIME boundary.
                b'.' | b'-' => col != 0,
                b'F' => !(col == 0 && line[i..].starts_with(b"From ")),
                33..=126 => true,
                _ => false,
            };
            // Room for a soft break `=` unless this is the line's last token.
            let limit = if last {
                MAX_ENCODED_LINE
            } else {
                MAX_ENCODED_LINE - 1
            };
            let width = |col: usize| if literal(col) { 1 } else { 3 };
            if col + width(col) > limit {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            if literal(col) {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            col += width(col);
        }
    }
    out
}

/// Splits on CRLF; a bare CR or LF stays inside its line (and is encoded).
fn split_crlf(data: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == b'\r' && data[i + 1] == b'\n' {
            lines.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    lines.push(&data[start..]);
    lines
}

/// Decodes base64, ignoring line breaks and other white space. `None` when
/// the content is not base64.
pub fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = input
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .ok()
}

/// Encodes base64 in CRLF-separated lines of 76 characters.
pub fn encode_base64(data: &[u8]) -> Vec<u8> {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(text.len() + text.len() / 38 + 2);
    for (i, chunk) in text.as_bytes().chunks(MAX_ENCODED_LINE).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(chunk);
    }
    out
}

/// Length of the longest line (CRLF excluded).
pub fn longest_line(data: &[u8]) -> usize {
    split_crlf(data).iter().map(|l| l.len()).max().unwrap_or(0)
}

/// Breaks lines longer than [`MAX_LINE`] after a space or tab (in HTML a
/// line break there is the same white space). `None` when a long line has
/// no such place.
pub fn wrap_long_lines(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() + 64);
    for (n, line) in split_crlf(data).into_iter().enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let mut rest = line;
        while rest.len() > MAX_LINE {
            let cut = rest[..MAX_LINE]
                .iter()
                .rposition(|&b| b == b' ' || b == b'\t')?;
            if cut == 0 {
                return None;
            }
            out.extend_from_slice(&rest[..cut]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[cut..];
        }
        out.extend_from_slice(rest);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_decoding() {
        let table: &[(&[u8], &[u8])] = &[
            (b"a=3Db", b"a=b"),
            (b"caf=C3=A9", "café".as_bytes()),
            (b"soft=\r\nbreak", b"softbreak"),
            (b"soft= \t\r\nbreak", b"softbreak"),
            (b"end=", b"end"),
            (b"bad=ZZ", b"bad=ZZ"),
            (b"low=3d", b"low="),
            (b"line\r\nnext", b"line\r\nnext"),
        ];
        for (input, want) in table {
            assert_eq!(
                decode_qp(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn qp_round_trips_with_legal_lines() {
        let long = "x".repeat(300)
            + " <a href=\"https://example.com/?a=1\">é</a> \r\n.dot\r\nFrom me\t\r\n--boundary";
        let samples: Vec<Vec<u8>> = vec![
            long.into_bytes(),
            b"=".repeat(200),
            vec![0, 1, 2, 255, b'\r', b'\n', b'\n', b'\r', b'x'],
            Vec::new(),
            "é".repeat(100).into_bytes(),
        ];
        for data in samples {
            let enc = encode_qp(&data);
            assert!(
                longest_line(&enc) <= MAX_ENCODED_LINE,
                "{}",
                String::from_utf8_lossy(&enc)
            );
            assert!(
                enc.iter()
                    .all(|&b| b == b'\r' || b == b'\n' || (32..127).contains(&b))
            );
            for line in split_crlf(&enc) {
                assert!(
                    !line.starts_with(b".")
                        && !line.starts_with(b"From ")
                        && !line.starts_with(b"-")
                );
                assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"));
            }
            assert_eq!(decode_qp(&enc), data);
        }
    }

    #[test]
    fn base64_round_trips_in_76_column_lines() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let enc = encode_base64(&data);
        assert!(split_crlf(&enc).iter().all(|l| l.len() <= 76));
        assert_eq!(split_crlf(&enc)[0].len(), 76);
        assert_eq!(decode_base64(&enc).unwrap(), data);
        assert_eq!(decode_base64(b"aGk=\r\n").unwrap(), b"hi");
        assert_eq!(decode_base64(b"not base64!"), None);
    }

    #[test]
    fn long_lines_break_at_white_space() {
        let line = format!("{} {}", "a".repeat(990), "b".repeat(500));
        let out = wrap_long_lines(line.as_bytes()).unwrap();
        assert!(longest_line(&out) <= MAX_LINE);
        assert_eq!(String::from_utf8(out).unwrap().replace("\r\n", ""), line);
        assert_eq!(wrap_long_lines("c".repeat(1200).as_bytes()), None);
        assert_eq!(
            wrap_long_lines(b"short\r\nlines").unwrap(),
            b"short\r\nlines"
        );
    }
}
