//! Which TLS policy a destination gets, as pure decisions.
//!
//! Precedence (see `../shared/design.md`): MTA-STS `enforce` before the
//! configured per-destination mode (`delivery.tls.policies`) before the
//! default `delivery.outboundTls`.

use petrel_crds::config::{OutboundTls, RelayConfig, Transport};

use super::DeliveryContext;
use super::classify::Fault;
use super::mta_sts::{self, FetchSettings, Mode};
use super::mx::MxHost;
use super::smtp_client::{ConnectSettings, TlsPolicy};

/// The configured mode for mail to `domain`.
pub fn configured(cfg: &RelayConfig, domain: &str) -> OutboundTls {
    cfg.delivery.tls.mode_for(domain, cfg.delivery.outbound_tls)
}

/// How the SMTP client uses STARTTLS in `mode`; whether the certificate is
/// checked is the rustls config's job.
pub fn client_policy(mode: OutboundTls) -> TlsPolicy {
    match mode {
        OutboundTls::Opportunistic => TlsPolicy::Opportunistic,
        // Never plain text, never a fallback after a failed handshake.
        OutboundTls::Encrypted | OutboundTls::Verified => TlsPolicy::Required,
    }
}

/// Applies the destination's MTA-STS policy to the MX hosts and the
/// connection settings built from the configured mode.
///
/// `enforce`: only matching hosts, verified TLS (label `mta-sts`), or a
/// temporary failure naming the hosts when none matches. `testing`: as
/// configured, logging what `enforce` would refuse. `none` or no policy:
/// as configured.
pub(super) async fn apply_mta_sts(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    hosts: Vec<MxHost>,
    settings: ConnectSettings,
) -> Result<(Vec<MxHost>, ConnectSettings), Fault> {
    if cfg.delivery.transport != Transport::Mx || !cfg.delivery.mta_sts {
        return Ok((hosts, settings));
    }
    let ca_file = cfg.delivery.tls.ca_file.as_deref();
    let (mx_tls, https_tls) = ctx.verified_configs(ca_file)?;
    let resolver = ctx
        .resolver(&cfg.delivery.mx.nameservers)
        .map_err(|e| Fault::DnsTemporary(e.to_string()))?;
    let fetch = FetchSettings {
        resolver,
        port: cfg.delivery.mx.mta_sts_port,
        tls: https_tls,
        timeout: cfg.delivery.timeouts.connect.get(),
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let found = mta_sts::discover(ctx.state.as_ref(), &fetch, &domain).await;
    let Some(cached) = found.policy else {
        return Ok((hosts, settings));
    };
    match cached.policy.mode {
        Mode::None => Ok((hosts, settings)),
        Mode::Testing => {
            if let Err(why) = mta_sts::allowed_hosts(&cached.policy, hosts.clone(), |h| &h.name) {
                tracing::warn!(destination = %domain, why, "MTA-STS testing: enforce would defer this delivery");
            }
            Ok((hosts, settings))
        }
        Mode::Enforce => {
            let hosts = mta_sts::allowed_hosts(&cached.policy, hosts, |h| &h.name)
                .map_err(|why| Fault::TlsPolicy(format!("{domain}: {why}")))?;
            Ok((
                hosts,
                ConnectSettings {
                    tls: TlsPolicy::Required,
                    tls_config: mx_tls,
                    tls_label: "mta-sts",
                    ..settings
                },
            ))
        }
    }
}

/// The TLS result type of a failed connection attempt, `None` when the
/// failure is not about TLS (network, greeting, DNS).
pub fn failure_result(failure: &super::classify::Failure) -> Option<&'static str> {
    use super::classify::Failure;
    match failure {
        Failure::Fault(Fault::TlsNotOffered) => Some("starttls-not-supported"),
        Failure::Fault(Fault::Certificate { result, .. }) => Some(result),
        Failure::Fault(Fault::Tls(_)) => Some("validation-failure"),
        Failure::Fault(_) | Failure::Reply(_) | Failure::Session(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_opportunistic_may_fall_back_to_plain_text() {
        assert_eq!(
            client_policy(OutboundTls::Opportunistic),
            TlsPolicy::Opportunistic
        );
        assert_eq!(client_policy(OutboundTls::Encrypted), TlsPolicy::Required);
        assert_eq!(client_policy(OutboundTls::Verified), TlsPolicy::Required);
    }
}
