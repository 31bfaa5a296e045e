//! Header edits, pure: the RFC 8058 pair and `Feedback-ID`, written into
//! the header section before the message is DKIM-signed (so `h=` covers
//! them), and removing an app's fields when ours replace them.

use crate::config::{FeedbackIdPart, UnsubscribeMode};
use crate::inbound::headers::{has_header, header_len};

/// The one-click field (RFC 8058 3.1).
pub const LIST_UNSUBSCRIBE: &str = "List-Unsubscribe";
/// Its companion, always `List-Unsubscribe=One-Click`.
pub const LIST_UNSUBSCRIBE_POST: &str = "List-Unsubscribe-Post";
/// Gmail's feedback loop identifier.
pub const FEEDBACK_ID: &str = "Feedback-ID";
/// The only body `POST /u/<token>` accepts, and the Post field's value.
pub const ONE_CLICK: &str = "List-Unsubscribe=One-Click";

/// The `List-Unsubscribe` value: the HTTPS link, then the mailto address
/// when the domain has a return path (`mailto` is `u+<token>@<domain>`).
pub fn list_unsubscribe_value(base_url: &str, token: &str, mailto: Option<&str>) -> String {
    let base = base_url.trim_end_matches('/');
    match mailto {
        // Folded before the second entry: RFC 5322 lines stay short.
        Some(address) => format!("<{base}/u/{token}>,\r\n <mailto:{address}>"),
        None => format!("<{base}/u/{token}>"),
    }
}

/// What [`add_list_unsubscribe`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// Ours added (the message had none).
    Added,
    /// The app's replaced by ours (`mode: replace`).
    Replaced,
    /// The app's kept (`mode: add-if-missing`).
    KeptApps,
}

impl Added {
    /// Label of `petrel_unsubscribe_headers_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            Added::Added => "added",
            Added::Replaced => "replaced",
            Added::KeptApps => "kept",
        }
    }
}

/// Adds `List-Unsubscribe: value` and `List-Unsubscribe-Post`, keeping or
/// replacing an app's `List-Unsubscribe` per `mode`.
pub fn add_list_unsubscribe(data: Vec<u8>, mode: UnsubscribeMode, value: &str) -> (Vec<u8>, Added) {
    let has = has_header(&data[..header_len(&data)], LIST_UNSUBSCRIBE);
    let (data, added) = match (has, mode) {
        (false, _) => (data, Added::Added),
        (true, UnsubscribeMode::AddIfMissing) => return (data, Added::KeptApps),
        (true, UnsubscribeMode::Replace) => (
            remove_fields(data, &[LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST]),
            Added::Replaced,
        ),
    };
    // Without an app's List-Unsubscribe a stray Post field means nothing
    // of the app's; ours says what ours does.
    let data = remove_fields(data, &[LIST_UNSUBSCRIBE_POST]);
    let fields = format!("{LIST_UNSUBSCRIBE}: {value}\r\n{LIST_UNSUBSCRIBE_POST}: {ONE_CLICK}\r\n");
    (prepend(data, &fields), added)
}

/// The `Feedback-ID` value of a template: `{domain}` the sending domain,
/// `{tag:NAME}` the message's tag (empty when absent). Substituted values
/// lose `:` (the field's separator) and control characters.
pub fn feedback_id_value(
    parts: &[FeedbackIdPart],
    domain: &str,
    tags: &std::collections::BTreeMap<String, String>,
) -> String {
    let clean =
        |s: &str| -> String { s.chars().filter(|c| *c != ':' && !c.is_control()).collect() };
    parts
        .iter()
        .map(|p| match p {
            FeedbackIdPart::Literal(text) => text.chars().filter(|c| !c.is_control()).collect(),
            FeedbackIdPart::Domain => clean(domain),
            FeedbackIdPart::Tag(name) => tags.get(name).map(|v| clean(v)).unwrap_or_default(),
        })
        .collect()
}

/// Sets `Feedback-ID: value`, replacing any the app wrote: the domain's
/// owner configured the template.
pub fn set_feedback_id(data: Vec<u8>, value: &str) -> Vec<u8> {
    let data = remove_fields(data, &[FEEDBACK_ID]);
    prepend(data, &format!("{FEEDBACK_ID}: {value}\r\n"))
}

fn prepend(data: Vec<u8>, fields: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.len() + data.len());
    out.extend_from_slice(fields.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// The message without the header fields named `names` (folded lines included).
pub fn remove_fields(data: Vec<u8>, names: &[&str]) -> Vec<u8> {
    let hlen = header_len(&data);
    if !names.iter().any(|n| has_header(&data[..hlen], n)) {
        return data;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut skipping = false;
    let mut pos = 0;
    while pos < hlen {
        let end = data[pos..hlen]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(hlen, |e| pos + e + 2);
        let line = &data[pos..end];
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            skipping = names.iter().any(|n| field_named(line, n));
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out.extend_from_slice(&data[hlen..]);
    out
}

fn field_named(line: &[u8], name: &str) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        && line[name.len()..]
            .iter()
            .find(|&&b| b != b' ' && b != b'\t')
            == Some(&b':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_feedback_id;

    const MSG: &[u8] = b"From: a@example.test\r\nSubject: hi\r\n\r\nList-Unsubscribe: body\r\n";

    #[test]
    fn values() {
        assert_eq!(
            list_unsubscribe_value("https://u.example.test/", "tok", None),
            "<https://u.example.test/u/tok>"
        );
        assert_eq!(
            list_unsubscribe_value(
                "https://u.example.test/x",
                "tok",
                Some("u+tok@b.example.test")
            ),
            "<https://u.example.test/x/u/tok>,\r\n <mailto:u+tok@b.example.test>"
        );
    }

    #[test]
    fn added_kept_or_replaced() {
        let (out, how) = add_list_unsubscribe(
            MSG.to_vec(),
            UnsubscribeMode::AddIfMissing,
            "<https://x/u/t>",
        );
        assert_eq!(how, Added::Added);
        assert_eq!(
            out,
            b"List-Unsubscribe: <https://x/u/t>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\
              From: a@example.test\r\nSubject: hi\r\n\r\nList-Unsubscribe: body\r\n"
                .to_vec()
        );
        let apps =
            b"From: a@example.test\r\nlist-unsubscribe: <mailto:app@x>,\r\n <https://app/u>\r\n\
                     List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody\r\n";
        let (out, how) = add_list_unsubscribe(
            apps.to_vec(),
            UnsubscribeMode::AddIfMissing,
            "<https://x/u/t>",
        );
        assert_eq!((out.as_slice(), how), (&apps[..], Added::KeptApps));
        let (out, how) =
            add_list_unsubscribe(apps.to_vec(), UnsubscribeMode::Replace, "<https://x/u/t>");
        assert_eq!(how, Added::Replaced);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "List-Unsubscribe: <https://x/u/t>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\
             From: a@example.test\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn feedback_id_from_the_template() {
        let parts = parse_feedback_id("{tag:campaign}:{tag:customer}:{domain}:petrel").unwrap();
        let tags = [("campaign".to_string(), "spring:sale".to_string())].into();
        let value = feedback_id_value(&parts, "example.test", &tags);
        assert_eq!(value, "springsale::example.test:petrel");
        let out = set_feedback_id(
            b"Feedback-ID: app\r\n\tfolded\r\nFrom: a@example.test\r\n\r\nb\r\n".to_vec(),
            &value,
        );
        assert_eq!(
            out,
            b"Feedback-ID: springsale::example.test:petrel\r\nFrom: a@example.test\r\n\r\nb\r\n"
                .to_vec()
        );
    }
}
