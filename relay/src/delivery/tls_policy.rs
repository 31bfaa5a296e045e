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
use super::tls_rpt::probe::probing_config;
use super::tls_rpt::{self, Entry, FailureDetail, Outcome, PolicyDesc, TlsReport};
use crate::queue::now_millis;
use std::sync::Arc;

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
    if let Some(problem) = &found.problem
        && cfg.delivery.tls_rpt
    {
        // RFC 8460 section 4.3.2.2: a policy that could not be had is a
        // failure of the domain's policy, reported under the cached one.
        let policy = found
            .policy
            .as_ref()
            .map(|c| PolicyDesc::sts(&c.policy))
            .unwrap_or_else(PolicyDesc::none);
        let detail = FailureDetail {
            result_type: problem.result_type().to_string(),
            ..FailureDetail::default()
        };
        count(ctx, &domain, &policy, Outcome::Failure(detail)).await;
    }
    let Some(mut cached) = found.policy else {
        return Ok((hosts, settings));
    };
    let report = |probe| {
        cfg.delivery.tls_rpt.then(|| TlsReport {
            policy: Arc::new(PolicyDesc::sts(&cached.policy)),
            probe,
        })
    };
    match cached.policy.mode {
        Mode::None => Ok((hosts, settings)),
        Mode::Testing => {
            if let Err(why) = mta_sts::allowed_hosts(&cached.policy, hosts.clone(), |h| &h.name) {
                tracing::warn!(destination = %domain, why, "MTA-STS testing: enforce would defer this delivery");
            }
            // Certificates are checked for the report only, delivery goes
            // on as configured (RFC 8461 section 5).
            let probe = if cfg.delivery.tls_rpt && settings.tls != TlsPolicy::Disabled {
                match super::tls::mozilla_roots(ca_file)
                    .map_err(|e| e.to_string())
                    .and_then(|roots| probing_config(Arc::new(roots)).map_err(|e| e.to_string()))
                {
                    Ok(probing) => Some(probing),
                    Err(error) => {
                        tracing::warn!(%error, "cannot build the TLS-RPT certificate probe");
                        None
                    }
                }
            } else {
                None
            };
            let tls_report = report(probe.as_ref().map(|(_, p)| p.clone()));
            let settings = match probe {
                // Only where the configured mode did not verify anyway.
                Some((config, _)) if settings.tls_label != "verified" => ConnectSettings {
                    tls_config: config,
                    tls_report,
                    ..settings
                },
                _ => ConnectSettings {
                    tls_report: report(None),
                    ..settings
                },
            };
            Ok((hosts, settings))
        }
        Mode::Enforce => {
            let hosts = match mta_sts::allowed_hosts(&cached.policy, hosts.clone(), |h| &h.name) {
                Ok(allowed) => allowed,
                Err(why) => {
                    // RFC 8461 section 5.1: the policy may have changed
                    // without a new TXT id; check before deferring.
                    match mta_sts::refetch(ctx.state.as_ref(), &fetch, &domain, &cached.id).await {
                        Ok(fresh) if fresh.policy != cached.policy => {
                            tracing::info!(destination = %domain, mode = fresh.policy.mode.as_str(), "MTA-STS policy refetched after no MX matched");
                            cached = fresh;
                            if cached.policy.mode != Mode::Enforce {
                                return Ok((hosts, settings));
                            }
                            mta_sts::allowed_hosts(&cached.policy, hosts, |h| &h.name)
                                .map_err(|why| Fault::TlsPolicy(format!("{domain}: {why}")))?
                        }
                        Ok(_) | Err(_) => {
                            return Err(Fault::TlsPolicy(format!("{domain}: {why}")));
                        }
                    }
                }
            };
            let tls_report = cfg.delivery.tls_rpt.then(|| TlsReport {
                policy: Arc::new(PolicyDesc::sts(&cached.policy)),
                probe: None,
            });
            Ok((
                hosts,
                ConnectSettings {
                    tls: TlsPolicy::Required,
                    tls_config: mx_tls,
                    tls_label: "mta-sts",
                    tls_report,
                    ..settings
                },
            ))
        }
    }
}

/// Counts one TLS-RPT session; a backend that cannot count costs the
/// report one session, never the delivery.
pub(super) async fn count(
    ctx: &DeliveryContext,
    domain: &str,
    policy: &PolicyDesc,
    outcome: Outcome,
) {
    let entry = Entry {
        domain: domain.to_string(),
        policy: policy.clone(),
        outcome,
    };
    if let Err(error) = tls_rpt::store::record(ctx.state.as_ref(), now_millis(), &entry).await {
        tracing::debug!(%error, domain, "cannot count a TLS-RPT session");
    }
}

/// What a message itself asks of TLS (RFC 8689), which decides whether it
/// can share connections with other mail to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MessageTls {
    /// Nothing: the destination's policy applies.
    Default,
    /// `MAIL FROM ... REQUIRETLS`: verified TLS to a server offering
    /// REQUIRETLS, or a bounce with 5.7.30.
    Required,
    /// `TLS-Required: No`: the recipient domain's policy (MTA-STS,
    /// `verified`) does not stop delivery; TLS is used when offered.
    Optional,
}

impl MessageTls {
    /// The class of a unit's flags (REQUIRETLS wins over the header,
    /// which inbound already ignores on such messages).
    pub fn of(flags: &crate::queue::MessageFlags) -> MessageTls {
        if flags.require_tls {
            MessageTls::Required
        } else if flags.tls_optional {
            MessageTls::Optional
        } else {
            MessageTls::Default
        }
    }
}

/// Labels of settings whose certificate check names the MX host.
const VERIFIED_LABELS: &[&str] = &["verified", "mta-sts", "dane"];

/// The destination's hosts and settings adjusted for what the message
/// asks (pure once the destination's policy is applied):
/// `Required` keeps a verified policy (MTA-STS, DANE, `verified`) and
/// otherwise verifies PKIX against the MX name; `Optional` drops the
/// destination's policy for opportunistic TLS without verification.
pub fn for_message(
    class: MessageTls,
    settings: ConnectSettings,
    verified: std::sync::Arc<rustls::ClientConfig>,
    unverified: std::sync::Arc<rustls::ClientConfig>,
) -> ConnectSettings {
    match class {
        MessageTls::Default => settings,
        MessageTls::Required if VERIFIED_LABELS.contains(&settings.tls_label) => ConnectSettings {
            tls: TlsPolicy::Required,
            require_tls: true,
            ..settings
        },
        MessageTls::Required => ConnectSettings {
            tls: TlsPolicy::Required,
            tls_config: verified,
            tls_label: "verified",
            require_tls: true,
            ..settings
        },
        MessageTls::Optional => ConnectSettings {
            tls: TlsPolicy::Opportunistic,
            tls_config: unverified,
            tls_label: "opportunistic",
            require_tls: false,
            tls_report: None,
            ..settings
        },
    }
}

/// The destination's policy and the message's wishes together: MTA-STS
/// (unless `TLS-Required: No`), then [`for_message`].
pub(super) async fn apply_message_tls(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    class: MessageTls,
    hosts: Vec<MxHost>,
    settings: ConnectSettings,
) -> Result<(Vec<MxHost>, ConnectSettings), Fault> {
    if cfg.delivery.transport != Transport::Mx {
        // A smarthost is ours: its settings stand; REQUIRETLS still needs
        // the smarthost to offer it.
        let require_tls = class == MessageTls::Required;
        return Ok((
            hosts,
            ConnectSettings {
                require_tls,
                ..settings
            },
        ));
    }
    let (hosts, settings) = if class == MessageTls::Optional {
        (hosts, settings)
    } else {
        apply_mta_sts(ctx, cfg, domain, hosts, settings).await?
    };
    let (verified, _) = ctx.verified_configs(cfg.delivery.tls.ca_file.as_deref())?;
    Ok((
        hosts,
        for_message(class, settings, verified, ctx.unverified_tls.clone()),
    ))
}

/// The TLS result type of a failed connection attempt, `None` when the
/// failure is not about TLS (network, greeting, DNS).
pub fn failure_result(failure: &super::classify::Failure) -> Option<&'static str> {
    use super::classify::Failure;
    match failure {
        Failure::Fault(Fault::TlsNotOffered) => Some("starttls-not-supported"),
        Failure::Fault(Fault::Certificate { result, .. } | Fault::Dane { result, .. }) => {
            Some(result)
        }
        Failure::Fault(Fault::Tls(_)) => Some("validation-failure"),
        Failure::Fault(_) | Failure::Reply(_) | Failure::Session(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(label: &'static str) -> ConnectSettings {
        ConnectSettings {
            ehlo_name: "relay.test".into(),
            timeouts: super::super::smtp_client::Timeouts {
                connect: std::time::Duration::from_secs(1),
                greeting: std::time::Duration::from_secs(1),
                command: std::time::Duration::from_secs(1),
                data: std::time::Duration::from_secs(1),
            },
            tls: TlsPolicy::Opportunistic,
            tls_config: super::super::tls::unverified().unwrap(),
            tls_label: label,
            auth: None,
            require_tls: false,
            tls_report: None,
        }
    }

    #[test]
    fn what_the_message_asks_changes_the_settings() {
        let verified = super::super::tls::verified_mx(None).unwrap();
        let unverified = super::super::tls::unverified().unwrap();
        let table = [
            (
                MessageTls::Default,
                "opportunistic",
                TlsPolicy::Opportunistic,
                "opportunistic",
                false,
            ),
            (
                MessageTls::Required,
                "opportunistic",
                TlsPolicy::Required,
                "verified",
                true,
            ),
            (
                MessageTls::Required,
                "encrypted",
                TlsPolicy::Required,
                "verified",
                true,
            ),
            (
                MessageTls::Required,
                "mta-sts",
                TlsPolicy::Required,
                "mta-sts",
                true,
            ),
            (
                MessageTls::Optional,
                "mta-sts",
                TlsPolicy::Opportunistic,
                "opportunistic",
                false,
            ),
            (
                MessageTls::Optional,
                "verified",
                TlsPolicy::Opportunistic,
                "opportunistic",
                false,
            ),
        ];
        for (class, label, tls, want_label, require) in table {
            let s = for_message(class, settings(label), verified.clone(), unverified.clone());
            assert_eq!(
                (s.tls, s.tls_label, s.require_tls),
                (tls, want_label, require),
                "{class:?} {label}"
            );
        }
        let s = for_message(
            MessageTls::Required,
            settings("encrypted"),
            verified.clone(),
            unverified.clone(),
        );
        assert!(
            std::sync::Arc::ptr_eq(&s.tls_config, &verified),
            "encrypted becomes verified"
        );
        let flags = crate::queue::MessageFlags {
            require_tls: true,
            tls_optional: true,
            ..Default::default()
        };
        assert_eq!(MessageTls::of(&flags), MessageTls::Required);
    }

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
