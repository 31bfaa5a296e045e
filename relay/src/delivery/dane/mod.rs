//! DANE for SMTP (RFC 7672): DNSSEC-validated TLSA records of an MX host
//! make TLS mandatory and pin the server's certificate, so neither a
//! stripped STARTTLS nor a forged certificate gets mail through.
//!
//! ```text
//! lookup (validating resolver: MX security, TLSA per host)
//!   -> decide (pure: HostDane per host) -> settings_for (connect settings)
//!   -> verify (rustls verifier: DANE-EE / DANE-TA)
//! ```
//!
//! Per host, after MTA-STS has filtered the hosts: secure usable TLSA
//! records win over every other policy (label `dane`); secure TLSA
//! records none of which is usable still make TLS mandatory (RFC 7672
//! section 2.2 / 3.1.3); an unsigned zone or no records leave the other
//! policies in force; a bogus answer or a failed TLSA lookup makes the
//! host unusable (tried later, bounced at expiry with the reason).

pub mod anchors;
pub mod lookup;
pub mod tlsa;
pub mod verify;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use petrel_crds::config::{RelayConfig, Transport};
use rustls::pki_types::ServerName;

use super::DeliveryContext;
use super::classify::Fault;
use super::mx::MxHost;
use super::smtp_client::{ConnectSettings, TlsPolicy};
use super::tls_policy::MessageTls;
use super::tls_rpt::{PolicyDesc, PolicyType, TlsReport};
use lookup::{Security, TlsaAnswer};
use tlsa::Tlsa;

/// The policy label of DANE in logs, events and metrics.
pub const LABEL: &str = "dane";

/// What DANE says about one MX host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostDane {
    /// No DANE: the destination's other policies apply.
    None,
    /// TLS mandatory, certificate verified against these records.
    Verify(Vec<Tlsa>),
    /// Secure TLSA records exist but none is usable: TLS mandatory,
    /// certificate unchecked.
    EncryptOnly,
    /// Do not use this host now.
    Unusable {
        /// TLS-RPT result type.
        result: &'static str,
        /// Why.
        detail: String,
    },
}

/// DANE for one host from its TLSA answer. Pure.
pub fn decide(answer: TlsaAnswer) -> HostDane {
    match answer {
        TlsaAnswer::NotSecure => HostDane::None,
        TlsaAnswer::Secure(records) if records.is_empty() => HostDane::None,
        TlsaAnswer::Secure(records) => {
            let usable: Vec<Tlsa> = records.iter().filter_map(Tlsa::usable).collect();
            if usable.is_empty() {
                HostDane::EncryptOnly
            } else {
                HostDane::Verify(usable)
            }
        }
        TlsaAnswer::Bogus(detail) => HostDane::Unusable {
            result: "dnssec-invalid",
            detail,
        },
        // RFC 7672 section 2.1.1: a failed TLSA lookup must not be taken
        // for "no TLSA records", or an attacker could block the lookup.
        TlsaAnswer::Failed(detail) => HostDane::Unusable {
            result: "tlsa-invalid",
            detail,
        },
    }
}

/// DANE for a destination's hosts.
#[derive(Clone, Debug, Default)]
pub struct DanePlan {
    /// The destination domain, a DANE-TA reference identifier when the MX
    /// lookup was secure.
    domain: Option<String>,
    hosts: HashMap<String, HostDane>,
}

impl DanePlan {
    /// No DANE for any host (DANE off, smarthost).
    pub fn none() -> DanePlan {
        DanePlan::default()
    }

    /// What DANE says about `host`.
    pub fn host(&self, host: &str) -> &HostDane {
        self.hosts.get(host).unwrap_or(&HostDane::None)
    }

    /// Whether any host is under DANE (its TLS must not be pooled with
    /// another policy's).
    pub fn any(&self) -> bool {
        self.hosts.values().any(|h| *h != HostDane::None)
    }
}

/// The names a DANE-TA chain may be issued for: the MX host, and the
/// destination when the MX RRset was secure (RFC 7672 section 3.2.2).
pub fn reference_names(host: &str, secure_domain: Option<&str>) -> Vec<ServerName<'static>> {
    [Some(host), secure_domain]
        .into_iter()
        .flatten()
        .filter_map(|n| ServerName::try_from(n.trim_end_matches('.').to_string()).ok())
        .collect()
}

/// Looks up DANE for `hosts` of `domain`. A bogus or failed MX answer
/// defers the whole destination: the hosts themselves may be forged.
pub(super) async fn plan(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    class: MessageTls,
    hosts: &[MxHost],
) -> Result<DanePlan, Fault> {
    // `TLS-Required: No` (RFC 8689 section 5) sets DANE aside as it does
    // MTA-STS.
    if !cfg.delivery.dane
        || cfg.delivery.transport != Transport::Mx
        || class == MessageTls::Optional
    {
        return Ok(DanePlan::none());
    }
    let resolver = ctx.dane_resolver(cfg)?;
    if !ctx.dnssec_available(&resolver).await {
        return Ok(DanePlan::none());
    }
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let secure_domain = match lookup::mx_security(&resolver, &domain).await {
        Security::Secure => Some(domain.clone()),
        Security::Insecure => None,
        Security::Bogus(detail) => {
            return Err(Fault::Dane {
                result: "dnssec-invalid",
                detail,
            });
        }
        Security::Failed(detail) => return Err(Fault::DnsTemporary(detail)),
    };
    let mut plan = DanePlan {
        domain: secure_domain,
        hosts: HashMap::new(),
    };
    for host in hosts {
        let answer = lookup::tlsa(&resolver, &host.name, cfg.delivery.mx.port).await;
        let decided = decide(answer);
        if decided != HostDane::None {
            tracing::debug!(destination = %domain, host = %host.name, dane = ?decided, "DANE applies");
        }
        plan.hosts.insert(host.name.clone(), decided);
    }
    Ok(plan)
}

/// The connect settings for `host`: `base` unless DANE applies.
pub fn settings_for<'a>(
    plan: &DanePlan,
    host: &str,
    base: &'a ConnectSettings,
    unverified: &Arc<rustls::ClientConfig>,
) -> Result<Cow<'a, ConnectSettings>, Fault> {
    let records: &[Tlsa] = match plan.host(host) {
        HostDane::Verify(records) => records,
        _ => &[],
    };
    let tls_config = match plan.host(host) {
        HostDane::None => return Ok(Cow::Borrowed(base)),
        HostDane::Unusable { result, detail } => {
            return Err(Fault::Dane {
                result,
                detail: format!("{host}: {detail}"),
            });
        }
        HostDane::EncryptOnly => unverified.clone(),
        HostDane::Verify(records) => {
            let verifier = verify::DaneVerifier::new(
                records.clone(),
                reference_names(host, plan.domain.as_deref()),
                Arc::new(rustls::crypto::ring::default_provider()),
            );
            verify::client_config(verifier).map_err(|e| Fault::Tls(e.to_string()))?
        }
    };
    Ok(Cow::Owned(ConnectSettings {
        // Never plain text: a missing STARTTLS is a downgrade attack.
        tls: TlsPolicy::Required,
        tls_config,
        tls_label: LABEL,
        // TLS-RPT counts this host's sessions under its TLSA records, not
        // under the destination's MTA-STS policy.
        tls_report: Some(TlsReport {
            policy: Arc::new(PolicyDesc {
                policy_type: PolicyType::Tlsa,
                strings: records.iter().map(Tlsa::presentation).collect(),
                mx_host: Vec::new(),
            }),
            probe: None,
        }),
        ..base.clone()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::TLSA;

    #[test]
    fn decides_per_host_from_the_tlsa_answer() {
        let ee = TLSA::new(3.into(), 1.into(), 1.into(), vec![1; 32]);
        let pkix = TLSA::new(1.into(), 1.into(), 1.into(), vec![1; 32]);
        assert_eq!(decide(TlsaAnswer::NotSecure), HostDane::None);
        assert_eq!(decide(TlsaAnswer::Secure(vec![])), HostDane::None);
        assert!(matches!(
            decide(TlsaAnswer::Secure(vec![ee.clone(), pkix.clone()])),
            HostDane::Verify(r) if r.len() == 1
        ));
        assert_eq!(
            decide(TlsaAnswer::Secure(vec![pkix])),
            HostDane::EncryptOnly
        );
        assert!(matches!(
            decide(TlsaAnswer::Bogus("x".into())),
            HostDane::Unusable {
                result: "dnssec-invalid",
                ..
            }
        ));
        assert!(matches!(
            decide(TlsaAnswer::Failed("x".into())),
            HostDane::Unusable { .. }
        ));
    }

    #[test]
    fn the_destination_is_a_reference_name_only_when_the_mx_was_secure() {
        let names = |d| {
            reference_names("mx.dane.test", d)
                .into_iter()
                .map(|n| n.to_str().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(None), ["mx.dane.test"]);
        assert_eq!(names(Some("dane.test")), ["mx.dane.test", "dane.test"]);
    }
}
