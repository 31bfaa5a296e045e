//! DNSSEC-validated lookups for DANE: the security of a destination's MX
//! RRset and the TLSA records of each MX host (RFC 7672 section 2.2).
//!
//! The validating resolver is separate from the one that routes mail:
//! validation costs extra queries (DNSKEY, DS up to an anchor), and an
//! address lookup must not fail because a zone's signatures do.

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::{RData, Record, RecordType};

/// What DNSSEC says about an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// Validated from a trust anchor.
    Secure,
    /// Provably unsigned (or no answer whose status matters).
    Insecure,
    /// Validation failed: signatures, keys or proofs are wrong.
    Bogus(String),
    /// The lookup itself failed (timeout, SERVFAIL): try later.
    Failed(String),
}

/// A TLSA lookup's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// Records in a signed zone, validated.
    Secure(Vec<TLSA>),
    /// No records, or records from an unsigned zone (which must not be
    /// used: anyone on the path could have made them).
    NotSecure,
    /// Validation failed.
    Bogus(String),
    /// The lookup failed.
    Failed(String),
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// The security of a set of answer records of `rtype`: secure only when
/// every one is.
pub fn security_of(records: &[Record], rtype: RecordType) -> Security {
    let mut records = records
        .iter()
        .filter(|r| r.record_type() == rtype)
        .peekable();
    if records.peek().is_none() {
        return Security::Insecure;
    }
    let mut all_secure = true;
    for r in records {
        match r.proof {
            Proof::Secure => {}
            Proof::Bogus => return Security::Bogus(format!("{} {rtype}: bogus", r.name)),
            Proof::Insecure | Proof::Indeterminate => all_secure = false,
        }
    }
    if all_secure {
        Security::Secure
    } else {
        Security::Insecure
    }
}

/// A lookup error's meaning: bogus, no data, or a failure.
fn classify_error(what: &str, e: &NetError) -> Security {
    match e {
        NetError::Dns(DnsError::DnssecBogus) => Security::Bogus(format!("{what}: DNSSEC bogus")),
        NetError::Dns(DnsError::Nsec { proof, .. }) if *proof == Proof::Bogus => {
            Security::Bogus(format!("{what}: DNSSEC denial of existence bogus"))
        }
        e if e.is_nx_domain() || e.is_no_records_found() => Security::Insecure,
        e => Security::Failed(format!("{what}: {e}")),
    }
}

/// Whether the resolver's nameservers serve DNSSEC: the root's DNSKEY
/// RRset validates against the anchors. Without that every answer would
/// look bogus, so DANE is inactive rather than deferring all mail (RFC
/// 7672 needs a DNSSEC-capable resolver; Postfix likewise treats answers
/// from a non-validating resolver as insecure).
pub async fn dnssec_available(resolver: &TokioResolver) -> bool {
    match resolver.lookup(".", RecordType::DNSKEY).await {
        Ok(lookup) => security_of(lookup.answers(), RecordType::DNSKEY) == Security::Secure,
        Err(_) => false,
    }
}

/// Whether `domain`'s MX RRset is signed and valid. No MX records (the
/// domain itself is the MX) counts as insecure: only the host name
/// itself is then a reference identifier.
pub async fn mx_security(resolver: &TokioResolver, domain: &str) -> Security {
    match resolver.mx_lookup(fqdn(domain).as_str()).await {
        Ok(lookup) => security_of(lookup.answers(), RecordType::MX),
        Err(e) => classify_error(&format!("MX of {domain}"), &e),
    }
}

/// The TLSA records at `_<port>._tcp.<host>`.
pub async fn tlsa(resolver: &TokioResolver, host: &str, port: u16) -> TlsaAnswer {
    let name = format!("_{port}._tcp.{}", fqdn(host));
    match resolver.lookup(name.as_str(), RecordType::TLSA).await {
        Ok(lookup) => match security_of(lookup.answers(), RecordType::TLSA) {
            Security::Secure => TlsaAnswer::Secure(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => Some(t.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            Security::Insecure => TlsaAnswer::NotSecure,
            Security::Bogus(why) => TlsaAnswer::Bogus(why),
            Security::Failed(why) => TlsaAnswer::Failed(why),
        },
        Err(e) => match classify_error(&format!("TLSA {name}"), &e) {
            Security::Secure | Security::Insecure => TlsaAnswer::NotSecure,
            Security::Bogus(why) => TlsaAnswer::Bogus(why),
            Security::Failed(why) => TlsaAnswer::Failed(why),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::Name;
    use hickory_resolver::proto::rr::rdata::MX;

    fn mx(proof: Proof) -> Record {
        let name = Name::from_ascii("dane.test.").unwrap();
        let mut r = Record::from_rdata(
            name,
            60,
            RData::MX(MX::new(10, Name::from_ascii("mx.dane.test.").unwrap())),
        );
        r.proof = proof;
        r
    }

    #[test]
    fn an_rrset_is_secure_only_when_every_record_is() {
        use Proof::*;
        let cases: [(&[Proof], &str); 5] = [
            (&[Secure, Secure], "secure"),
            (&[Secure, Insecure], "insecure"),
            (&[Indeterminate], "insecure"),
            (&[Secure, Bogus], "bogus"),
            (&[], "insecure"),
        ];
        for (proofs, want) in cases {
            let records: Vec<Record> = proofs.iter().map(|p| mx(*p)).collect();
            let got = match security_of(&records, RecordType::MX) {
                Security::Secure => "secure",
                Security::Insecure => "insecure",
                Security::Bogus(_) => "bogus",
                Security::Failed(_) => "failed",
            };
            assert_eq!(got, want, "{proofs:?}");
        }
    }
}
