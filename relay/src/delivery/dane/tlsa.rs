//! TLSA records as SMTP uses them (RFC 7672 section 3.1), and whether a
//! certificate matches one: pure functions over DER bytes.
//!
//! Only DANE-TA(2) and DANE-EE(3) are usable for SMTP: PKIX-TA(0) and
//! PKIX-EE(1) need a public CA the sender and the receiver agree on, which
//! SMTP does not have (RFC 7672 section 3.1.3). Selectors full
//! certificate(0) and SPKI(1), matching types exact(0), SHA-256(1) and
//! SHA-512(2); anything else makes the record unusable, not the RRset.

use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use rustls::pki_types::CertificateDer;

/// What a usable record pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// DANE-TA(2): a trust anchor in the server's chain.
    TrustAnchor,
    /// DANE-EE(3): the server's own certificate or key.
    EndEntity,
}

/// Which part of a certificate is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The whole certificate, DER.
    Certificate,
    /// The SubjectPublicKeyInfo, DER.
    PublicKey,
}

/// How the data is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    /// Byte for byte.
    Exact,
    /// SHA-256 of the part.
    Sha256,
    /// SHA-512 of the part.
    Sha512,
}

/// One usable TLSA record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    /// DANE-TA or DANE-EE.
    pub usage: Usage,
    /// Certificate or public key.
    pub part: Part,
    /// Exact or a digest.
    pub digest: Digest,
    /// The association data.
    pub data: Vec<u8>,
}

impl Tlsa {
    /// The record as SMTP can use it, `None` when it is unusable (PKIX
    /// usages, unassigned or private values, data of the wrong length).
    pub fn usable(record: &TLSA) -> Option<Tlsa> {
        let usage = match record.cert_usage {
            CertUsage::DaneTa => Usage::TrustAnchor,
            CertUsage::DaneEe => Usage::EndEntity,
            _ => return None,
        };
        let part = match record.selector {
            Selector::Full => Part::Certificate,
            Selector::Spki => Part::PublicKey,
            _ => return None,
        };
        let (digest, len) = match record.matching {
            Matching::Raw => (Digest::Exact, None),
            Matching::Sha256 => (Digest::Sha256, Some(32)),
            Matching::Sha512 => (Digest::Sha512, Some(64)),
            _ => return None,
        };
        // A digest of the wrong size can match nothing (RFC 7671 section 10.1).
        if record.cert_data.is_empty() || len.is_some_and(|l| record.cert_data.len() != l) {
            return None;
        }
        Some(Tlsa {
            usage,
            part,
            digest,
            data: record.cert_data.clone(),
        })
    }

    /// The record in presentation form (`3 1 1 <hex>`), as TLS-RPT's
    /// `policy-string` lists it.
    pub fn presentation(&self) -> String {
        let usage = match self.usage {
            Usage::TrustAnchor => 2,
            Usage::EndEntity => 3,
        };
        let selector = match self.part {
            Part::Certificate => 0,
            Part::PublicKey => 1,
        };
        let matching = match self.digest {
            Digest::Exact => 0,
            Digest::Sha256 => 1,
            Digest::Sha512 => 2,
        };
        let hex: String = self.data.iter().map(|b| format!("{b:02x}")).collect();
        format!("{usage} {selector} {matching} {hex}")
    }

    /// Whether `cert` is what this record pins (usage aside).
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let Some(part) = select(cert, self.part) else {
            return false;
        };
        match self.digest {
            Digest::Exact => part == self.data,
            Digest::Sha256 => digest(&ring::digest::SHA256, &part) == self.data,
            Digest::Sha512 => digest(&ring::digest::SHA512, &part) == self.data,
        }
    }
}

fn digest(alg: &'static ring::digest::Algorithm, data: &[u8]) -> Vec<u8> {
    ring::digest::digest(alg, data).as_ref().to_vec()
}

/// The selected part of `cert`, `None` when it does not parse.
fn select(cert: &CertificateDer<'_>, part: Part) -> Option<Vec<u8>> {
    match part {
        Part::Certificate => Some(cert.as_ref().to_vec()),
        Part::PublicKey => public_key_info(cert),
    }
}

/// The DER SubjectPublicKeyInfo of `cert`.
pub fn public_key_info(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let anchor = webpki::anchor_from_trusted_cert(cert).ok()?;
    Some(webpki::spki_for_anchor(&anchor).as_ref().to_vec())
}

/// The association data of `usage part digest` for `cert`: what a zone
/// publishes (tests, diagnostics).
pub fn association(cert: &CertificateDer<'_>, part: Part, digest_kind: Digest) -> Option<Vec<u8>> {
    let part = select(cert, part)?;
    Some(match digest_kind {
        Digest::Exact => part,
        Digest::Sha256 => digest(&ring::digest::SHA256, &part),
        Digest::Sha512 => digest(&ring::digest::SHA512, &part),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `mx.dane.test` (made once with
    /// openssl and committed: the relay does not depend on rcgen).
    fn cert() -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut include_str!("testdata/mx.pem").as_bytes())
            .next()
            .expect("a certificate")
            .expect("valid PEM")
    }

    fn record(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TLSA {
        TLSA::new(usage.into(), selector.into(), matching.into(), data)
    }

    #[test]
    fn only_dane_usages_with_known_selectors_and_digests_are_usable() {
        let sha = vec![7u8; 32];
        let cases = [
            (3, 1, 1, sha.clone(), true),
            (2, 0, 1, sha.clone(), true),
            (3, 0, 2, vec![1u8; 64], true),
            (3, 1, 0, vec![1, 2, 3], true),
            (0, 1, 1, sha.clone(), false),
            (1, 1, 1, sha.clone(), false),
            (4, 1, 1, sha.clone(), false),
            (3, 2, 1, sha.clone(), false),
            (3, 1, 3, sha.clone(), false),
            (3, 1, 1, vec![7u8; 31], false),
            (3, 1, 2, sha.clone(), false),
        ];
        for (u, s, m, data, usable) in cases {
            assert_eq!(
                Tlsa::usable(&record(u, s, m, data)).is_some(),
                usable,
                "{u} {s} {m}"
            );
        }
    }

    #[test]
    fn matches_certificate_and_key_by_every_digest() {
        let cert = cert();
        for part in [Part::Certificate, Part::PublicKey] {
            for digest in [Digest::Exact, Digest::Sha256, Digest::Sha512] {
                let data = association(&cert, part, digest).unwrap();
                let mut tlsa = Tlsa {
                    usage: Usage::EndEntity,
                    part,
                    digest,
                    data,
                };
                assert!(tlsa.matches(&cert), "{part:?} {digest:?}");
                tlsa.data[0] ^= 1;
                assert!(!tlsa.matches(&cert), "{part:?} {digest:?} altered");
            }
        }
        let ee = Tlsa {
            usage: Usage::EndEntity,
            part: Part::PublicKey,
            digest: Digest::Sha256,
            data: vec![0xab, 0x01],
        };
        assert_eq!(ee.presentation(), "3 1 1 ab01");
        let spki = public_key_info(&cert).unwrap();
        assert_eq!(spki[0], 0x30, "SPKI is a DER SEQUENCE");
        assert!(cert.as_ref().windows(spki.len()).any(|w| w == spki));
    }
}
