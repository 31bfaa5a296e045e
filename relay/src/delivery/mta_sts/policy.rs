//! MTA-STS records and policies (RFC 8461), parsed strictly, and MX
//! pattern matching. Pure: no I/O here.

use serde::{Deserialize, Serialize};

/// Largest `max_age` a policy may ask for (RFC 8461 section 3.2: one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// Why a TXT record or a policy was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No `v=STSv1` TXT record, or more than one (section 3.1: the domain
    /// then has no MTA-STS).
    #[error("{0} v=STSv1 TXT records (exactly one is needed)")]
    RecordCount(usize),
    /// The TXT record is malformed.
    #[error("invalid _mta-sts TXT record: {0}")]
    Record(String),
    /// The policy file is malformed.
    #[error("invalid MTA-STS policy: {0}")]
    Policy(String),
}

/// The `_mta-sts.<domain>` TXT record's policy id: the domain has a policy,
/// and a different id than a cached one means it changed.
pub fn parse_txt(records: &[String]) -> Result<String, PolicyError> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return Err(PolicyError::RecordCount(sts.len()));
    };
    let mut id = None;
    for (i, field) in record.split(';').enumerate() {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            // A trailing `;` is allowed.
            continue;
        }
        let Some((key, value)) = field.split_once('=') else {
            return Err(PolicyError::Record(format!("field {field:?} has no '='")));
        };
        match (i, key) {
            (0, "v") if value == "STSv1" => {}
            (0, _) => return Err(PolicyError::Record("must start with v=STSv1".into())),
            (_, "id") => {
                let ok = (1..=32).contains(&value.len())
                    && value.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok || id.is_some() {
                    return Err(PolicyError::Record(format!("bad id {value:?}")));
                }
                id = Some(value.to_string());
            }
            // Extensions (section 3.1) are ignored, but must be well formed.
            (_, key) if is_ext_name(key) && !value.is_empty() => {}
            (_, key) => return Err(PolicyError::Record(format!("bad field {key:?}"))),
        }
    }
    id.ok_or_else(|| PolicyError::Record("no id".into()))
}

fn is_ext_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A policy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual, report what enforce would have refused.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    /// As written in the policy, and in metric labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// enforce, testing or none.
    pub mode: Mode,
    /// `mx` patterns: host names, or `*.` and a domain for one label.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// Parses a policy file (section 3.2): `key: value` lines ending in LF or
/// CRLF; `version: STSv1`, `mode` and `max_age` exactly once, `mx` at least
/// once unless the mode is `none`; unknown keys ignored.
pub fn parse_policy(text: &str) -> Result<Policy, PolicyError> {
    let bad = |m: String| Err(PolicyError::Policy(m));
    let mut version = false;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.trim_end_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return bad(format!("line {line:?} is not `key: value`"));
        };
        let value = value.trim_start_matches([' ', '\t']);
        match key {
            "version" if version => return bad("version given twice".into()),
            "version" if value == "STSv1" => version = true,
            "version" => return bad(format!("version {value:?} is not STSv1")),
            "mode" if mode.is_some() => return bad("mode given twice".into()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return bad(format!("mode {other:?} is not enforce, testing or none")),
                })
            }
            "max_age" if max_age.is_some() => return bad("max_age given twice".into()),
            "max_age" => {
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return bad(format!("max_age {value:?} is not a number of seconds"));
                }
                let secs: u64 = value.parse().unwrap_or(u64::MAX);
                // Larger values are clamped, as a cache bound rather than
                // a reason to ignore the domain's wish for protection.
                max_age = Some(secs.min(MAX_AGE_LIMIT));
            }
            "mx" => {
                if !is_mx_pattern(value) {
                    return bad(format!("mx {value:?} is not a host name or *.domain"));
                }
                mx.push(value.trim_end_matches('.').to_ascii_lowercase());
            }
            key if is_ext_name(key) => {}
            key => return bad(format!("bad key {key:?}")),
        }
    }
    if !version {
        return bad("no version: STSv1".into());
    }
    let Some(mode) = mode else {
        return bad("no mode".into());
    };
    let Some(max_age) = max_age else {
        return bad("no max_age".into());
    };
    if mx.is_empty() && mode != Mode::None {
        return bad("no mx".into());
    }
    Ok(Policy { mode, mx, max_age })
}

fn is_mx_pattern(value: &str) -> bool {
    let host = value.strip_prefix("*.").unwrap_or(value);
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether MX host `host` matches `pattern` (section 4.1): equal ignoring
/// case, or `*.rest` where the host is exactly one label and `rest`.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let pattern = pattern.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail.eq_ignore_ascii_case(rest)),
        None => host.eq_ignore_ascii_case(pattern),
    }
}

impl Policy {
    /// Whether the policy allows delivery to MX host `host`.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(records: &[&str]) -> Result<String, PolicyError> {
        parse_txt(&records.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn txt_records() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["v=STSv1; id=20160831085700Z;"], Some("20160831085700Z")),
            (&["v=STSv1;id=abc"], Some("abc")),
            (&["v=STSv1; id=abc; ext.x=1"], Some("abc")),
            (&["v=spf1 -all", "v=STSv1; id=abc"], Some("abc")),
            (&["v=STSv1; id=abc", "v=STSv1; id=def"], None),
            (&[], None),
            (&["v=STSv1;"], None),
            (&["v=STSv1; id="], None),
            (&["v=STSv1; id=has-dash"], None),
            (&["v=STSv1; id=123456789012345678901234567890123"], None),
            (&["v=STSv1; id=a; id=b"], None),
            (&["v=STSv1; id=a; garbage"], None),
            (&["v=STSv10; id=a"], None),
        ];
        for (records, want) in cases {
            assert_eq!(txt(records).ok().as_deref(), *want, "{records:?}");
        }
    }

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";

    #[test]
    fn the_rfc_example_parses() {
        let p = parse_policy(GOOD).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        assert_eq!(p.max_age, 604_800);
        // LF endings and an unknown extension key are fine.
        let lf = "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 86400\nnew_thing: x\n";
        assert_eq!(parse_policy(lf).unwrap().mode, Mode::Testing);
        let none = "version: STSv1\nmode: none\nmax_age: 86400\n";
        assert_eq!(parse_policy(none).unwrap().mx, Vec::<String>::new());
        let big = "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 9999999999\n";
        assert_eq!(parse_policy(big).unwrap().max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn bad_policies_are_refused() {
        let cases = [
            ("no version", "mode: enforce\nmx: a.example\nmax_age: 1\n"),
            (
                "wrong version",
                "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            ),
            (
                "bad mode",
                "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n",
            ),
            ("no mode", "version: STSv1\nmx: a.example\nmax_age: 1\n"),
            ("no mx", "version: STSv1\nmode: enforce\nmax_age: 1\n"),
            (
                "no max_age",
                "version: STSv1\nmode: enforce\nmx: a.example\n",
            ),
            (
                "max_age text",
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1d\n",
            ),
            (
                "negative",
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            ),
            (
                "two modes",
                "version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n",
            ),
            (
                "bad mx",
                "version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
            ),
            (
                "mid wildcard",
                "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
            ),
            (
                "not key value",
                "version: STSv1\nmode enforce\nmx: a.example\nmax_age: 1\n",
            ),
            ("html", "<html><body>Not found</body></html>\n"),
        ];
        for (why, text) in cases {
            assert!(parse_policy(text).is_err(), "{why}: {text:?}");
        }
    }

    #[test]
    fn mx_patterns_match_per_rfc_8461_4_1() {
        let cases = [
            ("mail.example.com", "mail.example.com", true),
            ("mail.example.com", "MAIL.Example.COM.", true),
            ("mail.example.com", "mail2.example.com", false),
            ("*.example.com", "mx1.example.com", true),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", "example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "mx1.example.org", false),
        ];
        for (pattern, host, want) in cases {
            assert_eq!(mx_matches(pattern, host), want, "{pattern} vs {host}");
        }
    }
}
