//! One DNS record an owner must publish, and how to compare it with what DNS
//! serves (pure). Shared by the SendingDomain controller (every record of a
//! domain) and the DkimKey controller (whether a pending key is published).

use petrel_crds::status::{DnsRecordPurpose, DnsRecordState, DnsRecordType};

/// Longest character-string in a TXT record (RFC 1035 3.3).
pub const TXT_CHUNK: usize = 255;

/// One record the domain owner must publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredRecord {
    /// Fully qualified name without trailing dot.
    pub name: String,
    /// Record type.
    pub type_: DnsRecordType,
    /// The value as one string (TXT strings concatenated), used for comparison.
    pub value: String,
    /// Why the record is needed.
    pub purpose: DnsRecordPurpose,
    /// A hint for a person (which key, which domain).
    pub note: Option<String>,
}

impl DesiredRecord {
    /// The value as a person pastes it into a zone: TXT values over 255 bytes
    /// are split into quoted strings, shorter ones are given as is.
    pub fn presentation(&self) -> String {
        match self.type_ {
            DnsRecordType::TXT if self.value.len() > TXT_CHUNK => split_txt(&self.value),
            _ => self.value.clone(),
        }
    }
}

/// Splits a TXT value into quoted character-strings of at most 255 bytes,
/// never inside a UTF-8 character, escaping `"` and `\`.
pub fn split_txt(value: &str) -> String {
    let mut parts = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let mut end = rest.len().min(TXT_CHUNK);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (chunk, tail) = rest.split_at(end);
        parts.push(format!(
            "\"{}\"",
            chunk.replace('\\', "\\\\").replace('"', "\\\"")
        ));
        rest = tail;
    }
    parts.join(" ")
}

/// What a TXT lookup returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxtAnswer {
    /// The records at the name, each with its strings concatenated.
    Records(Vec<String>),
    /// NXDOMAIN or no TXT records at the name.
    NotFound,
    /// The lookup failed (SERVFAIL, timeout, refused), with a reason.
    Failed(String),
}

/// Compares what DNS serves with a desired TXT record: the verification state
/// and, when it differs, the observed value.
pub fn evaluate(desired: &DesiredRecord, answer: &TxtAnswer) -> (DnsRecordState, Option<String>) {
    let records = match answer {
        TxtAnswer::Records(records) => records,
        TxtAnswer::NotFound => return (DnsRecordState::Missing, None),
        TxtAnswer::Failed(_) => return (DnsRecordState::Unknown, None),
    };
    if desired.type_ == DnsRecordType::MX {
        // Every MX of the name must lead to the wanted host, whatever its
        // preference: a sender may use any of them, and a bounce reaching
        // another host is lost to attribution.
        let host = |s: &str| {
            let exchange = s.split_whitespace().last().unwrap_or_default();
            exchange.trim_end_matches('.').to_ascii_lowercase()
        };
        let want = host(&desired.value);
        return if !want.is_empty() && !records.is_empty() && records.iter().all(|r| host(r) == want)
        {
            (DnsRecordState::Verified, None)
        } else {
            (DnsRecordState::Mismatch, Some(records.join(" | ")))
        };
    }
    if desired.type_ == DnsRecordType::CNAME {
        // A name has one CNAME; host names compare case-insensitively.
        let target = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
        return match records.as_slice() {
            [one] if !desired.value.is_empty() && target(one) == target(&desired.value) => {
                (DnsRecordState::Verified, None)
            }
            _ => (DnsRecordState::Mismatch, Some(records.join(" | "))),
        };
    }
    // Only records of the same kind are candidates (a domain has many TXT records).
    let kind = record_kind(&desired.value);
    let candidates: Vec<&String> = records
        .iter()
        .filter(|r| {
            kind.as_ref()
                .is_none_or(|k| record_kind(r).as_ref() == Some(k))
        })
        .collect();
    if candidates.is_empty() {
        return (DnsRecordState::Missing, None);
    }
    let want = normalize(&desired.value);
    if candidates.len() == 1 && normalize(candidates[0]) == want {
        return (DnsRecordState::Verified, None);
    }
    // Several SPF or DMARC records are an error for receivers even if one matches.
    let observed = candidates
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    (DnsRecordState::Mismatch, Some(observed))
}

/// `v=spf1`, `v=DMARC1` or `v=DKIM1`, lowercased, if the value starts with one.
fn record_kind(value: &str) -> Option<String> {
    let first = value.split([' ', ';']).next()?.trim().to_ascii_lowercase();
    matches!(first.as_str(), "v=spf1" | "v=dmarc1" | "v=dkim1").then_some(first)
}

/// Comparison form, so a record receivers read the same way as ours verifies:
/// SPF terms compare case-insensitively with any spacing; DKIM and DMARC are
/// tag lists (RFC 6376 3.2, RFC 7489 6.3) whose tag order, spacing around `;`
/// and `=`, a trailing `;` and tags left at their default do not matter. The
/// DKIM key (`p=`) keeps its case (base64) but not its whitespace.
fn normalize(value: &str) -> String {
    let collapsed = || {
        value
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_ascii_lowercase()
    };
    let (defaults, case_kept): (&[(&str, &str)], &[&str]) = match record_kind(value).as_deref() {
        Some("v=dkim1") => (&[("k", "rsa")], &["p"]),
        Some("v=dmarc1") => (&[("pct", "100"), ("adkim", "r"), ("aspf", "r")], &[]),
        // `+` is the default SPF qualifier: `+ip4:x` is `ip4:x`.
        Some("v=spf1") => {
            return value
                .split_whitespace()
                .map(|t| t.strip_prefix('+').unwrap_or(t))
                .collect::<Vec<_>>()
                .join(" ")
                .to_ascii_lowercase();
        }
        _ => return collapsed(),
    };
    let mut tags = std::collections::BTreeMap::new();
    for tag in value.split(';') {
        let tag: String = tag.split_whitespace().collect();
        if tag.is_empty() {
            continue;
        }
        let Some((name, val)) = tag.split_once('=') else {
            return collapsed();
        };
        let name = name.to_ascii_lowercase();
        let val = if case_kept.contains(&name.as_str()) {
            val.to_string()
        } else {
            val.to_ascii_lowercase()
        };
        if tags.insert(name, val).is_some() {
            // A duplicate tag makes the record invalid for receivers.
            return collapsed();
        }
    }
    for (name, val) in defaults {
        tags.entry((*name).to_string())
            .or_insert_with(|| (*val).to_string());
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}
