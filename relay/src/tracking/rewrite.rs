//! The tracking rewriter, pure: message bytes in (CRLF, before DKIM
//! signing), rewritten bytes or a reason out.
//!
//! Only `text/html` parts change, each decoded from its transfer encoding,
//! run through lol_html (a real streaming HTML tokenizer, working in the
//! part's own charset, so untouched bytes pass through as they were) and
//! encoded again as it was. Every other byte of the message, headers,
//! boundaries and other parts included, stays identical.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use lol_html::html_content::{ContentType, Element};
use lol_html::{AsciiCompatibleEncoding, HtmlRewriter, Settings, element, end, end_tag};

use super::mime::{self, HtmlPart, TransferEncoding};
use super::transfer;

/// Where tracked URLs point, and what to track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options<'a> {
    /// Host of tracked links and pixels.
    pub domain: &'a str,
    /// `https` or `http`.
    pub scheme: &'a str,
    /// Add the open pixel.
    pub opens: bool,
    /// Rewrite links.
    pub clicks: bool,
}

/// Makes the tokens of one message (its queue id and recipient are the
/// factory's business).
pub trait TokenFactory {
    /// The token of the open pixel.
    fn open(&mut self) -> String;
    /// The token of a link to `url`; `None` leaves the link as it is (a
    /// URL too long to carry in a token).
    fn click(&mut self, url: &str) -> Option<String>;
}

/// Why a message or a part was left as it was. `label` is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The message has no header section.
    #[error("not a MIME message")]
    Unparseable,
    /// No `text/html` part.
    #[error("no HTML part")]
    NoHtml,
    /// Neither opens nor clicks asked for.
    #[error("tracking is off")]
    Off,
    /// A charset lol_html cannot work in (not ASCII-compatible, or unknown).
    #[error("charset {0:?} cannot be rewritten")]
    Charset(String),
    /// A transfer encoding other than 7bit, 8bit, quoted-printable, base64,
    /// or a base64 body that does not decode.
    #[error("transfer encoding {0:?} cannot be rewritten")]
    Encoding(String),
    /// The HTML tokenizer gave up (ambiguous markup, memory bound).
    #[error("HTML rewriting failed: {0}")]
    Html(String),
    /// A 7bit/8bit line would exceed 998 octets with no place to break it.
    #[error("a line would exceed 998 octets")]
    LineTooLong,
    /// Nothing to track: no trackable link, and no pixel asked for.
    #[error("nothing to track")]
    Nothing,
    /// The message said `X-Petrel-Track: off` (or the send API `track: false`).
    #[error("opted out")]
    OptedOut,
    /// The message already carries a DKIM signature that rewriting would break.
    #[error("already DKIM-signed by the client")]
    Signed,
    /// The tracking key cannot be loaded.
    #[error("no usable tracking key")]
    NoKey,
}

impl Skip {
    /// The `result` label of `petrel_tracking_rewrite_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Skip::Unparseable => "unparseable",
            Skip::NoHtml => "no_html",
            Skip::Off => "off",
            Skip::Charset(_) => "charset",
            Skip::Encoding(_) => "encoding",
            Skip::Html(_) => "html_error",
            Skip::LineTooLong => "line_too_long",
            Skip::Nothing => "nothing_to_track",
            Skip::OptedOut => "opted_out",
            Skip::Signed => "signed",
            Skip::NoKey => "no_key",
        }
    }

    /// True when the message should have been tracked but could not be
    /// (logged as a warning); false for the ordinary reasons (no HTML,
    /// opted out, nothing to track).
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Skip::Unparseable
                | Skip::Charset(_)
                | Skip::Encoding(_)
                | Skip::Html(_)
                | Skip::LineTooLong
                | Skip::NoKey
        )
    }
}

/// A rewritten message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewritten {
    /// The whole message, rewritten.
    pub data: Vec<u8>,
    /// Links rewritten.
    pub links: usize,
    /// Open pixels added (one per rewritten HTML part).
    pub pixels: usize,
    /// HTML parts left alone, and why (the others were rewritten).
    pub skipped: Vec<Skip>,
}

/// Rewrites the HTML parts of `message`. `Err` says why nothing changed.
pub fn rewrite(
    message: &[u8],
    options: &Options<'_>,
    tokens: &mut dyn TokenFactory,
) -> Result<Rewritten, Skip> {
    if !options.opens && !options.clicks {
        return Err(Skip::Off);
    }
    let parts = mime::html_parts(message).map_err(|_| Skip::Unparseable)?;
    if parts.is_empty() {
        return Err(Skip::NoHtml);
    }
    let mut out = Vec::with_capacity(message.len() + 1024);
    let mut copied = 0;
    let mut done = Rewritten {
        data: Vec::new(),
        links: 0,
        pixels: 0,
        skipped: Vec::new(),
    };
    for part in &parts {
        match rewrite_part(&message[part.body.clone()], part, options, tokens) {
            Ok(Some((body, links, pixel))) => {
                out.extend_from_slice(&message[copied..part.body.start]);
                out.extend_from_slice(&body);
                copied = part.body.end;
                done.links += links;
                done.pixels += usize::from(pixel);
            }
            Ok(None) => done.skipped.push(Skip::Nothing),
            Err(skip) => done.skipped.push(skip),
        }
    }
    if copied == 0 {
        // Every part skipped: report the first reason.
        return Err(done.skipped.swap_remove(0));
    }
    out.extend_from_slice(&message[copied..]);
    done.data = out;
    Ok(done)
}

/// One part's new encoded body, with the links rewritten and whether a
/// pixel was added; `None` when nothing changed.
fn rewrite_part(
    encoded: &[u8],
    part: &HtmlPart,
    options: &Options<'_>,
    tokens: &mut dyn TokenFactory,
) -> Result<Option<(Vec<u8>, usize, bool)>, Skip> {
    let decoded = match &part.encoding {
        TransferEncoding::SevenBit | TransferEncoding::EightBit => encoded.to_vec(),
        TransferEncoding::QuotedPrintable => transfer::decode_qp(encoded),
        TransferEncoding::Base64 => transfer::decode_base64(encoded)
            .ok_or_else(|| Skip::Encoding("base64 (undecodable)".into()))?,
        TransferEncoding::Other(other) => return Err(Skip::Encoding(other.clone())),
    };
    let charset = part.charset.as_deref().unwrap_or("us-ascii");
    let encoding = encoding_rs::Encoding::for_label_no_replacement(charset.as_bytes())
        .and_then(AsciiCompatibleEncoding::new)
        .ok_or_else(|| Skip::Charset(charset.to_string()))?;
    let (html, links, pixel) = rewrite_html(&decoded, encoding, options, tokens)?;
    if links == 0 && !pixel {
        return Ok(None);
    }
    // Keep the encoded body's own ending: a part that ended with a line
    // break still does.
    let trailing_crlf = encoded.ends_with(b"\r\n");
    let mut body = match &part.encoding {
        TransferEncoding::QuotedPrintable => transfer::encode_qp(&html),
        TransferEncoding::Base64 => {
            let mut b = transfer::encode_base64(&html);
            if trailing_crlf {
                b.extend_from_slice(b"\r\n");
            }
            return Ok(Some((b, links, pixel)));
        }
        _ if transfer::longest_line(&html) > transfer::MAX_LINE => {
            transfer::wrap_long_lines(&html).ok_or(Skip::LineTooLong)?
        }
        _ => html,
    };
    if trailing_crlf && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    Ok(Some((body, links, pixel)))
}

/// Runs the tokenizer over one decoded HTML body in `encoding`.
fn rewrite_html(
    html: &[u8],
    encoding: AsciiCompatibleEncoding,
    options: &Options<'_>,
    tokens: &mut dyn TokenFactory,
) -> Result<(Vec<u8>, usize, bool), Skip> {
    let tokens = RefCell::new(tokens);
    let links = Cell::new(0usize);
    let pixel = options.opens.then(|| {
        let token = tokens.borrow_mut().open();
        format!(
            "<img src=\"{}://{}/o/{token}.gif\" width=\"1\" height=\"1\" alt=\"\">",
            options.scheme, options.domain
        )
    });
    let placed = Rc::new(Cell::new(false));
    let mut out = Vec::with_capacity(html.len() + 512);
    let mut settings = Settings::new().with_encoding(encoding);
    if options.clicks {
        settings = settings.append_element_content_handler(element!("a[href]", |el| {
            if let Some(url) = trackable(el, options.domain)
                && let Some(token) = tokens.borrow_mut().click(&url)
            {
                let href = format!("{}://{}/c/{token}", options.scheme, options.domain);
                el.set_attribute("href", &href)?;
                links.set(links.get() + 1);
            }
            Ok(())
        }));
    }
    if let Some(img) = pixel.clone() {
        let placed_at_body = placed.clone();
        settings = settings.append_element_content_handler(element!("body", move |el| {
            let img = img.clone();
            let placed = placed_at_body.clone();
            if el.can_have_content() {
                el.on_end_tag(end_tag!(move |end| {
                    if !placed.replace(true) {
                        end.before(&img, ContentType::Html);
                    }
                    Ok(())
                }))?;
            }
            Ok(())
        }));
        let img = pixel.clone().unwrap_or_default();
        let placed_at_end = placed.clone();
        settings = settings.append_document_content_handler(end!(move |end| {
            if !placed_at_end.replace(true) {
                end.append(&img, ContentType::Html);
            }
            Ok(())
        }));
    }
    let mut rewriter = HtmlRewriter::new(settings, |chunk: &[u8]| out.extend_from_slice(chunk));
    rewriter
        .write(html)
        .and_then(|()| rewriter.end())
        .map_err(|e| Skip::Html(e.to_string()))?;
    Ok((out, links.get(), pixel.is_some()))
}

/// The URL a link points at, when it is one to track: absolute `http(s)`
/// with a host, not already on the tracking domain, not marked
/// `data-petrel-track="off"`.
fn trackable(el: &Element<'_, '_>, tracking_domain: &str) -> Option<String> {
    if el
        .get_attribute("data-petrel-track")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("off"))
    {
        return None;
    }
    let raw = el.get_attribute("href")?;
    let url = decode_entities(raw.trim_matches(|c: char| c.is_ascii_whitespace()));
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))?;
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    if host.is_empty() || host == tracking_domain.to_ascii_lowercase() {
        return None;
    }
    // A URL with white space or control characters inside is malformed;
    // leave it to the reader's client.
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some(url)
}

/// Decodes the character references an attribute value may carry
/// (`&amp;` in query strings above all); unknown ones stay as written, like
/// browsers do.
pub fn decode_entities(value: &str) -> String {
    if !value.contains('&') {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest[1..].find(';').map(|j| j + 1).filter(|&j| j <= 10);
        let decoded = end.and_then(|j| {
            let name = &rest[1..j];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "sol" => Some('/'),
                "colon" => Some(':'),
                "quest" => Some('?'),
                "equals" => Some('='),
                "num" => Some('#'),
                "percnt" => Some('%'),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, j + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens `o1`, `c1`, `c2`..., recording the URLs.
    #[derive(Default)]
    struct Counting {
        urls: Vec<String>,
    }

    impl TokenFactory for Counting {
        fn open(&mut self) -> String {
            "o1".into()
        }
        fn click(&mut self, url: &str) -> Option<String> {
            if url.len() > 100 {
                return None;
            }
            self.urls.push(url.to_string());
            Some(format!("c{}", self.urls.len()))
        }
    }

    const OPTS: Options<'static> = Options {
        domain: "t.example.com",
        scheme: "https",
        opens: true,
        clicks: true,
    };

    fn html_message(body: &str) -> Vec<u8> {
        format!("Subject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{body}").into_bytes()
    }

    #[test]
    fn which_links_are_rewritten() {
        let table: &[(&str, Option<&str>)] = &[
            (
                r#"<a href="https://shop.example/x?a=1&amp;b=2">"#,
                Some("https://shop.example/x?a=1&b=2"),
            ),
            (
                r#"<a href=" HTTP://Shop.Example ">"#,
                Some("HTTP://Shop.Example"),
            ),
            (
                r#"<A HREF='http://a.example/p#frag'>"#,
                Some("http://a.example/p#frag"),
            ),
            (r#"<a href="mailto:a@b.example">"#, None),
            (r#"<a href="tel:+4912345">"#, None),
            (r##"<a href="#top">"##, None),
            (r#"<a href="/relative/path">"#, None),
            (r#"<a href="//cdn.example/x">"#, None),
            (
                r#"<a href="https://x.example" data-petrel-track="off">"#,
                None,
            ),
            (
                r#"<a href="https://x.example" data-petrel-track="OFF ">"#,
                None,
            ),
            (r#"<a href="https://t.example.com/c/abc">"#, None),
            (r#"<a href="https://">"#, None),
            (r#"<a href="javascript:alert(1)">"#, None),
            (r#"<a name="x">"#, None),
            (r#"<link href="https://x.example/style.css">"#, None),
            (r#"<!-- <a href="https://x.example/c"> -->"#, None),
            (r#"<a href="https://x.example/{}">"#, None),
        ];
        for (html, want) in table {
            let html = html.replace("{}", &"y".repeat(200));
            let mut tokens = Counting::default();
            let options = Options {
                opens: false,
                ..OPTS
            };
            let result = rewrite(&html_message(&html), &options, &mut tokens);
            match want {
                Some(url) => {
                    let out = result.unwrap_or_else(|e| panic!("{html}: {e}"));
                    assert_eq!(tokens.urls, vec![url.to_string()], "{html}");
                    let text = String::from_utf8(out.data).unwrap().to_ascii_lowercase();
                    assert!(
                        text.contains("href=\"https://t.example.com/c/c1\""),
                        "{text}"
                    );
                }
                None => assert_eq!(result, Err(Skip::Nothing), "{html}"),
            }
        }
    }

    #[test]
    fn pixel_goes_before_body_end_or_at_the_end() {
        let img = r#"<img src="https://t.example.com/o/o1.gif" width="1" height="1" alt="">"#;
        let table = [
            (
                "<html><body><p>hi</p></body></html>",
                format!("<html><body><p>hi</p>{img}</body></html>"),
            ),
            ("<p>no body tag</p>", format!("<p>no body tag</p>{img}")),
            (
                "<body>a</BODY><body>b</body>",
                format!("<body>a{img}</BODY><body>b</body>"),
            ),
        ];
        let options = Options {
            clicks: false,
            ..OPTS
        };
        for (html, want) in table {
            let out = rewrite(&html_message(html), &options, &mut Counting::default()).unwrap();
            assert_eq!(out.data, html_message(&want), "{html}");
            assert_eq!(out.pixels, 1);
        }
    }

    #[test]
    fn headers_and_other_bytes_stay() {
        let body = "<body><p>caf\u{e9}</p>\r\n<a href=\"https://a.example/\">a</a>\r\n</body>";
        let msg = html_message(body);
        let out = rewrite(&msg, &OPTS, &mut Counting::default()).unwrap();
        let want = html_message(
            "<body><p>caf\u{e9}</p>\r\n<a href=\"https://t.example.com/c/c1\">a</a>\r\n<img src=\"https://t.example.com/o/o1.gif\" width=\"1\" height=\"1\" alt=\"\"></body>",
        );
        assert_eq!(
            String::from_utf8(out.data).unwrap(),
            String::from_utf8(want).unwrap()
        );
        assert_eq!(out.links, 1);
    }

    #[test]
    fn iso_8859_1_bytes_pass_through() {
        let mut msg = b"Content-Type: text/html; charset=ISO-8859-1\r\n\r\n<p>caf".to_vec();
        msg.extend_from_slice(b"\xe9 <a href=\"http://a.example/\xe9\">x</a></p>");
        let out = rewrite(&msg, &OPTS, &mut Counting::default()).unwrap();
        let mut tokens = Counting::default();
        rewrite(&msg, &OPTS, &mut tokens).unwrap();
        assert_eq!(tokens.urls, vec!["http://a.example/\u{e9}".to_string()]);
        assert!(
            out.data.windows(4).any(|w| w == b"caf\xe9"),
            "Latin-1 byte kept"
        );
    }

    #[test]
    fn what_is_left_alone() {
        let plain = b"Subject: x\r\n\r\n<a href=\"https://a.example\">x</a>";
        assert_eq!(
            rewrite(plain, &OPTS, &mut Counting::default()),
            Err(Skip::NoHtml)
        );
        assert_eq!(
            rewrite(
                b"\r\n<a href=\"https://a.b\">",
                &OPTS,
                &mut Counting::default()
            ),
            Err(Skip::Unparseable)
        );
        let off = Options {
            opens: false,
            clicks: false,
            ..OPTS
        };
        assert_eq!(
            rewrite(
                &html_message("<a href=\"https://a.b\">"),
                &off,
                &mut Counting::default()
            ),
            Err(Skip::Off)
        );
        let utf16 = b"Content-Type: text/html; charset=utf-16\r\n\r\n<a href=\"https://a.b\">";
        assert_eq!(
            rewrite(utf16, &OPTS, &mut Counting::default()),
            Err(Skip::Charset("utf-16".into()))
        );
        let unknown = b"Content-Type: text/html; charset=x-klingon\r\n\r\n<a href=\"https://a.b\">";
        assert!(matches!(
            rewrite(unknown, &OPTS, &mut Counting::default()),
            Err(Skip::Charset(_))
        ));
        let binary = b"Content-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n<a href=\"https://a.b\">";
        assert!(matches!(
            rewrite(binary, &OPTS, &mut Counting::default()),
            Err(Skip::Encoding(_))
        ));
        let bad64 = b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!";
        assert!(matches!(
            rewrite(bad64, &OPTS, &mut Counting::default()),
            Err(Skip::Encoding(_))
        ));
    }

    #[test]
    fn long_7bit_lines_are_broken_at_white_space() {
        let links: String = (0..20)
            .map(|i| format!("<a href=\"https://a.example/{i}\">l</a> "))
            .collect();
        let msg = html_message(&links);
        struct Long;
        impl TokenFactory for Long {
            fn open(&mut self) -> String {
                "o".repeat(80)
            }
            fn click(&mut self, _: &str) -> Option<String> {
                Some("c".repeat(80))
            }
        }
        let out = rewrite(&msg, &OPTS, &mut Long).unwrap();
        assert_eq!(out.links, 20);
        assert!(transfer::longest_line(&out.data) <= transfer::MAX_LINE);
        let one_line = html_message(&format!(
            "<a href=\"https://a.example/\">{}</a>",
            "x".repeat(995)
        ));
        assert_eq!(rewrite(&one_line, &OPTS, &mut Long), Err(Skip::LineTooLong));
    }

    #[test]
    fn entities() {
        let table = [
            ("a&amp;b", "a&b"),
            ("&#38;&#x26;&#X26;", "&&&"),
            ("&unknown;x", "&unknown;x"),
            ("&amp", "&amp"),
            ("q&quot;", "q\""),
            ("&#xD800;", "&#xD800;"),
            ("&", "&"),
        ];
        for (input, want) in table {
            assert_eq!(decode_entities(input), want, "{input}");
        }
    }
}
