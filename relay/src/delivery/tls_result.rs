//! What a failed TLS attempt means, in TLS-RPT's words (RFC 8460 section
//! 4.3.2.1): pure mapping from rustls' errors, shared by the delivery
//! diagnostics, the `petrel_outbound_tls_total` metric and TLS-RPT.

use super::dane::verify::TlsaMismatch;

/// TLS-RPT result types for negotiation failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsResult {
    /// The server offered no STARTTLS.
    StarttlsNotSupported,
    /// The certificate does not name the MX host.
    CertificateHostMismatch,
    /// The certificate is expired (or not yet valid).
    CertificateExpired,
    /// The certificate does not chain to a trusted anchor.
    CertificateNotTrusted,
    /// Any other verification or negotiation failure.
    ValidationFailure,
    /// DANE: the certificate matches none of the MX host's TLSA records,
    /// or none of them is usable.
    TlsaInvalid,
    /// DANE: the DNSSEC answer for the MX or TLSA records failed
    /// validation (bogus).
    DnssecInvalid,
}

impl TlsResult {
    /// The RFC 8460 name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsResult::StarttlsNotSupported => "starttls-not-supported",
            TlsResult::CertificateHostMismatch => "certificate-host-mismatch",
            TlsResult::CertificateExpired => "certificate-expired",
            TlsResult::CertificateNotTrusted => "certificate-not-trusted",
            TlsResult::ValidationFailure => "validation-failure",
            TlsResult::TlsaInvalid => "tlsa-invalid",
            TlsResult::DnssecInvalid => "dnssec-invalid",
        }
    }

    /// The result of a rustls handshake error, when it is about the
    /// certificate; `None` for other failures (network, protocol).
    pub fn of_rustls(error: &rustls::Error) -> Option<TlsResult> {
        use rustls::CertificateError as C;
        match error {
            rustls::Error::InvalidCertificate(c) => Some(match c {
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    TlsResult::CertificateHostMismatch
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsResult::CertificateExpired,
                C::UnknownIssuer => TlsResult::CertificateNotTrusted,
                C::Other(other) if other.0.is::<TlsaMismatch>() => TlsResult::TlsaInvalid,
                // rustls' list is non-exhaustive: everything else is a
                // failed validation.
                _ => TlsResult::ValidationFailure,
            }),
            rustls::Error::NoCertificatesPresented => Some(TlsResult::ValidationFailure),
            _ => None,
        }
    }

    /// As [`TlsResult::of_rustls`], for the I/O error tokio-rustls returns.
    pub fn of_io(error: &std::io::Error) -> Option<TlsResult> {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(TlsResult::of_rustls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError as C;

    #[test]
    fn certificate_errors_map_to_tls_rpt_result_types() {
        let cases = [
            (C::NotValidForName, "certificate-host-mismatch"),
            (C::Expired, "certificate-expired"),
            (C::NotValidYet, "certificate-expired"),
            (C::UnknownIssuer, "certificate-not-trusted"),
            (C::BadSignature, "validation-failure"),
        ];
        for (c, want) in cases {
            let e = rustls::Error::InvalidCertificate(c);
            assert_eq!(TlsResult::of_rustls(&e).map(TlsResult::as_str), Some(want));
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            assert_eq!(TlsResult::of_io(&io).map(TlsResult::as_str), Some(want));
        }
        assert_eq!(TlsResult::of_rustls(&rustls::Error::DecryptError), None);
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(TlsResult::of_io(&plain), None);
    }
}
