//! DNSSEC signing for the in-process DNS server ([`crate::dns`]): zone
//! keys, RRSIGs made on the fly over the answer, and NSEC proofs for
//! NODATA answers, so a validating resolver (DANE) sees real secure,
//! insecure and bogus answers.
//!
//! A test signs a zone with [`crate::dns::DnsServer::sign_zone`] and gives
//! the relay [`ZoneKey::anchor_line`] as a trust anchor. A delegation (an
//! NS record at a name below a signed zone, with no key of its own) is an
//! unsigned child: the parent proves with a signed NSEC that it has no DS.

use std::time::Duration;

use hickory_proto::dnssec::crypto::Ed25519SigningKey;
use hickory_proto::dnssec::rdata::{DNSKEY, DNSSECRData, NSEC, RRSIG};
use hickory_proto::dnssec::{DnssecSigner, SigningKey};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType};

/// Why a zone key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("DNSSEC: {0}")]
pub struct DnssecError(String);

/// A zone's signing key (Ed25519, algorithm 15), used as KSK and ZSK.
pub struct ZoneKey {
    apex: Name,
    signer: DnssecSigner,
}

impl std::fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneKey")
            .field("apex", &self.apex)
            .finish_non_exhaustive()
    }
}

/// How long signatures are valid: generous both ways, so clock skew
/// between the test and the resolver never matters.
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

impl ZoneKey {
    /// A fresh key for the zone at `apex` (`"dane.test"`, `"."`).
    pub fn generate(apex: &str) -> Result<ZoneKey, DnssecError> {
        let err = |e: &dyn std::fmt::Display| DnssecError(e.to_string());
        let mut apex = Name::from_ascii(apex).map_err(|e| err(&e))?;
        apex.set_fqdn(true);
        let pkcs8 = Ed25519SigningKey::generate_pkcs8().map_err(|e| err(&e))?;
        let key = Ed25519SigningKey::from_pkcs8(&pkcs8).map_err(|e| err(&e))?;
        let dnskey = DNSKEY::from_key(&key.to_public_key().map_err(|e| err(&e))?);
        let signer = DnssecSigner::new(dnskey, Box::new(key), apex.clone(), VALIDITY * 2);
        Ok(ZoneKey { apex, signer })
    }

    /// The zone's DNSKEY record data.
    pub fn dnskey(&self) -> DNSKEY {
        self.signer.to_dnskey()
    }

    /// The key as a trust anchor line (`dane.test. IN DNSKEY 257 3 15 ...`).
    pub fn anchor_line(&self) -> String {
        format!("{} IN DNSKEY {}", self.apex, self.dnskey())
    }

    /// An RRSIG over `rdatas` at `name` (one type), or `None` for an empty
    /// set. `corrupt` flips a signature bit: a bogus answer.
    pub fn sign(&self, name: &Name, ttl: u32, rdatas: &[RData], corrupt: bool) -> Option<Record> {
        let first = rdatas.first()?;
        let mut set = RecordSet::with_ttl(name.clone(), first.record_type(), ttl);
        for r in rdatas {
            set.add_rdata(r.clone());
        }
        let inception = time::OffsetDateTime::now_utc() - VALIDITY;
        let rrsig = RRSIG::from_rrset(&set, DNSClass::IN, inception, &self.signer).ok()?;
        let rrsig = if corrupt {
            let mut sig = rrsig.sig().to_vec();
            if let Some(b) = sig.last_mut() {
                *b ^= 1;
            }
            RRSIG::from_sig(rrsig.input().clone(), sig)
        } else {
            rrsig
        };
        Some(Record::from_rdata(
            name.clone(),
            ttl,
            RData::DNSSEC(DNSSECRData::RRSIG(rrsig)),
        ))
    }
}

/// An NSEC at `name` listing `types` (plus NSEC and RRSIG): the signed
/// proof that no other type exists there. The next name is the closest
/// possible successor, so the record covers no other name.
pub fn nsec(name: &Name, ttl: u32, types: Vec<RecordType>) -> Record {
    let next = Name::from_ascii("\\000")
        .and_then(|label| label.append_domain(name))
        .unwrap_or_else(|_| name.clone());
    Record::from_rdata(
        name.clone(),
        ttl,
        RData::DNSSEC(DNSSECRData::NSEC(NSEC::new_cover_self(next, types))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;

    #[test]
    fn signs_and_names_the_anchor() {
        let key = ZoneKey::generate("dane.test").unwrap();
        assert!(
            key.anchor_line()
                .starts_with("dane.test. IN DNSKEY 257 3 15 "),
            "{}",
            key.anchor_line()
        );
        let name = Name::from_ascii("mx.dane.test.").unwrap();
        let good = key
            .sign(&name, 0, &[RData::A(A([127, 0, 0, 1].into()))], false)
            .unwrap();
        let bad = key
            .sign(&name, 0, &[RData::A(A([127, 0, 0, 1].into()))], true)
            .unwrap();
        assert_ne!(good, bad);
        assert!(key.sign(&name, 0, &[], false).is_none());
    }
}
