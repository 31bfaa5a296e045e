//! Where a domain wants its reports: the `_smtp._tls.<domain>` TXT record
//! (RFC 8460 section 3), parsed purely, looked up thinly.

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;

/// One reporting address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rua {
    /// `mailto:` address (percent-decoding of `%2C` etc. applied).
    Mailto(String),
    /// `https:` URL, POSTed to.
    Https(String),
}

/// The reporting addresses of a domain from its TXT records: exactly one
/// record must start with `v=TLSRPTv1` (section 3: otherwise none is
/// used); unknown URI schemes are skipped.
pub fn parse(records: &[String]) -> Vec<Rua> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.split(';')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("v=TLSRPTv1"))
        })
        .collect();
    let [record] = ours.as_slice() else {
        return Vec::new();
    };
    let Some(rua) = record.split(';').skip(1).find_map(|field| {
        let (name, value) = field.split_once('=')?;
        name.trim().eq_ignore_ascii_case("rua").then_some(value)
    }) else {
        return Vec::new();
    };
    rua.split(',')
        .filter_map(|uri| {
            let uri = uri.trim();
            let (scheme, rest) = uri.split_once(':')?;
            if scheme.eq_ignore_ascii_case("mailto") {
                let address = percent_decode(rest);
                (address.contains('@') && !address.contains(['\r', '\n', '<', '>']))
                    .then_some(Rua::Mailto(address))
            } else if scheme.eq_ignore_ascii_case("https") && rest.starts_with("//") {
                Some(Rua::Https(uri.to_string()))
            } else {
                None
            }
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Looks up `_smtp._tls.<domain>`; no record, or DNS failure, is no address.
pub async fn lookup(resolver: &TokioResolver, domain: &str) -> Result<Vec<Rua>, String> {
    match resolver.txt_lookup(format!("_smtp._tls.{domain}.")).await {
        Ok(lookup) => {
            let records: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    // Several strings are one record (RFC 7208 style).
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            Ok(parse(&records))
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        let m = |a: &str| Rua::Mailto(a.into());
        let h = |u: &str| Rua::Https(u.into());
        let table: &[(&[&str], Vec<Rua>)] = &[
            (
                &["v=TLSRPTv1; rua=mailto:tls@dest.test"],
                vec![m("tls@dest.test")],
            ),
            (
                &["v=TLSRPTv1;rua=mailto:a@x.test, https://r.x.test/v1"],
                vec![m("a@x.test"), h("https://r.x.test/v1")],
            ),
            (
                &["v=TLSRPTv1; rua=mailto:a%2Cb@x.test"],
                vec![m("a,b@x.test")],
            ),
            (
                &["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x.test"],
                vec![m("a@x.test")],
            ),
            // Two TLSRPT records: none is used.
            (
                &[
                    "v=TLSRPTv1; rua=mailto:a@x.test",
                    "v=TLSRPTv1; rua=mailto:b@x.test",
                ],
                vec![],
            ),
            (&["v=TLSRPTv2; rua=mailto:a@x.test"], vec![]),
            (&["v=TLSRPTv1"], vec![]),
            (
                &["v=TLSRPTv1; rua=http://plain.test/, ftp:x, mailto:nobody"],
                vec![],
            ),
            (&[], vec![]),
        ];
        for (records, want) in table {
            let records: Vec<String> = records.iter().map(|s| s.to_string()).collect();
            assert_eq!(&parse(&records), want, "{records:?}");
        }
    }
}
