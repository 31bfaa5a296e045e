//! Certificate checks that report instead of refusing: MTA-STS `testing`
//! mode delivers as configured but TLS-RPT must still say whether the
//! certificate would have passed (RFC 8461 section 5, RFC 8460).
//!
//! The verifier runs webpki's full check (chain to the trust anchors, MX
//! host name), remembers the verdict, and accepts the chain regardless;
//! handshake signatures are still verified. A group's connections are
//! made one after another, so one [`Probe`] per group is read after each.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::delivery::tls_result::TlsResult;

/// The verdict of the last handshake: `Ok` when the certificate would
/// have passed verified TLS.
#[derive(Debug, Default)]
pub struct Probe {
    last: Mutex<Option<Result<(), TlsResult>>>,
}

impl Probe {
    /// The verdict since the last call, if a certificate was checked.
    pub fn take(&self) -> Option<Result<(), TlsResult>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set(&self, verdict: Result<(), TlsResult>) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(verdict);
    }
}

#[derive(Debug)]
struct ProbingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    probe: Arc<Probe>,
}

impl ServerCertVerifier for ProbingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ())
            .map_err(|e| TlsResult::of_rustls(&e).unwrap_or(TlsResult::ValidationFailure));
        self.probe.set(verdict);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client config that accepts any certificate but tells `Probe` whether
/// it chains to `roots` and names the host.
pub fn probing_config(
    roots: Arc<RootCertStore>,
) -> Result<(Arc<ClientConfig>, Arc<Probe>), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let probe = Arc::new(Probe::default());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProbingVerifier {
            inner,
            probe: probe.clone(),
        }))
        .with_no_client_auth();
    Ok((Arc::new(config), probe))
}
